"""One frozen spec of quantize/TV switches for the CNNs (ModelSwitches).

The parameter-tree fingerprints below were computed with the models as they
were before the spec existed (each switch a field of every model dataclass,
commit 5781677): the same flat config options must give the same variables
(names, shapes, dtypes), so configs and checkpoints keep working.
"""
import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import pytest

from pdeq_jax import models
from pdeq_jax.models import resnet
from pdeq_jax.models.switches import ModelSwitches

NO_QUANT = dict(quantize_weights=False, quantize_activations=False)
# name -> (registry name, classes, flat options, fingerprint, leaves)
BEFORE_THE_SPEC = {
    "resnet20_4w4a": ("resnet20", 10, {}, "3837697b7aa6d530", 145),
    "resnet20_float_tv": ("resnet20", 10, dict(NO_QUANT, tv_activation=True,
                                               tv_gamma_init=0.2),
                          "beacc7a20f35eec3", 125),
    "stable_resnet20": ("stable_resnet20", 10, {}, "35e7a4e9a9204820", 115),
    "stable_resnet8_noquant": ("stable_resnet8", 10, NO_QUANT,
                               "5d8093f861fc704c", 34),
    "mobilenetv2": ("mobilenetv2", 10, {}, "1b95e9507317c159", 369),
    "stable_mobilenetv2_noact": ("stable_mobilenetv2", 10,
                                 dict(quantize_activations=False),
                                 "67f46ccbd280df54", 258),
    "resnet50_tv_stem": ("resnet50", 1000, dict(tv_activation=True,
                                                tv_stem=True),
                         "a35da0d32447491d", 416),
    "resnet50_float": ("resnet50", 1000, NO_QUANT, "0484b86540e462f0", 267),
    "deeplabv3_tv": ("deeplabv3_resnet50", 21, dict(tv_activation=True,
                                                    tv_sign_form=True),
                     "8ad32caa5f81269d", 466),
}


def _fingerprint(model):
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rows = sorted(("/".join(str(getattr(k, "key", k)) for k in path),
                 tuple(leaf.shape), str(leaf.dtype))
                for path, leaf in
                jax.tree_util.tree_flatten_with_path(variables)[0])
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16], len(rows)


@pytest.mark.parametrize("case", sorted(BEFORE_THE_SPEC))
def test_flat_config_options_give_the_parameter_trees_of_before(case):
  name, classes, options, digest, leaves = BEFORE_THE_SPEC[case]
  model = models.create(name, classes, **options)
  assert model.switches == ModelSwitches(**options)
  assert _fingerprint(model) == (digest, leaves)
  # the spec passed as one object is the same model
  assert models.create(name, classes,
                       switches=ModelSwitches(**options)) == model


def test_the_spec_is_frozen_validated_and_shared():
  spec = ModelSwitches(tv_activation=True)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.tv_activation = False
  hash(spec)  # a valid Flax module attribute
  with pytest.raises(ValueError, match="tv_gamma_init must lie in"):
    ModelSwitches(tv_gamma_init=1.5)
  with pytest.raises(ValueError, match="quantize_weights must be True or"):
    ModelSwitches(quantize_weights="yes")
  # every CNN and its blocks carry the one spec, no separate switch fields
  for cls in (resnet.ResNet, resnet.BasicBlock,
              type(models.create("resnet50", 10)),
              type(models.create("deeplabv3_resnet50", 5)),
              type(models.create("mobilenetv2", 10)),
              type(models.create("stable_resnet20", 10))):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert "switches" in fields, cls
    assert not fields & set(ModelSwitches.names()), cls


def test_switches_a_model_lacks_are_refused():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match="MobileNetV2 has no switch "
                     "tv_activation"):
    jax.eval_shape(models.create("mobilenetv2", 10, tv_activation=True).init,
                   jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="ResNet has no switch tv_stem"):
    jax.eval_shape(models.create("resnet20", 10, tv_stem=True).init,
                   jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="not both"):
    models.create("resnet20", 10, switches=ModelSwitches(),
                  tv_activation=True)
