"""Scanned blocks (``scan_blocks=True``): layout conversion and equivalence.

The unrolled model is the reference: its variables, converted with
``stack_blocks``, must give the scanned model the same logits, hidden
outputs, BatchNorm updates, TV inputs and gradients (converted back).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar
from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import operators
from pdeq_jax.models import resnet
from pdeq_jax.models import scan_blocks
from pdeq_jax.models import stable_resnet
from pdeq_jax.models.switches import ModelSwitches
from train import validate

TINY = dict(num_classes=3, stage_sizes=(3, 1), widths=(4, 8))
BITS = layers.QuantBits.make(4, 4)


def _pair(cls, **kw):
  return cls(**TINY, **kw), cls(**TINY, scan_blocks=True, **kw)


MODELS = {
    "resnet_tv": lambda: _pair(resnet.ResNet, switches=ModelSwitches(
        tv_activation=True)),
    "stable": lambda: _pair(stable_resnet.StableResNet),
    "stable_clean": lambda: _pair(stable_resnet.StableResNet,
                                  clean_form=True),
}


def _images(n=2, size=8):
  return jax.random.normal(jax.random.PRNGKey(1), (n, size, size, 3))


def _close(a, b):
  jax.tree_util.tree_map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5),
      a, b)


@functools.lru_cache(maxsize=None)
def _init(kind):
  """The unrolled pair's variables (the reference), shared by the tests."""
  unrolled, _ = MODELS[kind]()
  return jax.jit(unrolled.init)(jax.random.PRNGKey(0), _images())


def test_stack_unstack_layout_and_round_trip():
  _, scanned = MODELS["resnet_tv"]()
  v0 = _init("resnet_tv")
  v1 = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), _images())
  stacked = scan_blocks.stack_blocks(v0)
  # the scanned model's own tree, shapes included
  assert (jax.tree_util.tree_structure(stacked)
          == jax.tree_util.tree_structure(v1))
  assert jax.tree_util.tree_map(jnp.shape, stacked) == \
      jax.tree_util.tree_map(jnp.shape, v1)
  # a stage of one block has nothing to scan
  assert set(stacked["params"]) == {"stem", "head", "stage1_block1",
                                    "stage1_blocks", "stage2_block1"}
  k = stacked["params"]["stage1_blocks"]["block"]["conv1"]["kernel"]
  assert k.shape == (2, 3, 3, 4, 4)
  np.testing.assert_array_equal(
      k[1], v0["params"]["stage1_block3"]["conv1"]["kernel"])
  # exact inverse, on variables and on a bare params tree
  back = scan_blocks.unstack_blocks(stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, v0)
  assert (jax.tree_util.tree_structure(back)
          == jax.tree_util.tree_structure(v0))
  p = scan_blocks.unstack_blocks(scan_blocks.stack_blocks(v0["params"]))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p, v0["params"])


def _outputs(model, labels):
  """Jitted: eval logits, hidden outputs and recorded TV inputs, train-mode
  gradients and BatchNorm updates (one compilation per model)."""
  x = _images()

  def run(variables):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    (logits, hidden), recorded = model.apply(
        variables, x, BITS, return_hidden=True, mutable=["tv_inputs"])

    def loss(p):
      out, new_state = model.apply({"params": p, **state}, x, BITS,
                                   train=True, mutable=list(state))
      return (-jnp.mean(jax.nn.log_softmax(out)[jnp.arange(2), labels]),
              new_state)
    grads, new_state = jax.grad(loss, has_aux=True)(params)
    return logits, hidden, recorded, grads, new_state
  return jax.jit(run)


@pytest.mark.parametrize("kind", ["resnet_tv", "stable", "stable_clean"])
def test_scanned_matches_unrolled(kind):
  unrolled, scanned = MODELS[kind]()
  labels = jnp.array([0, 2])
  v0 = _init(kind)
  o0, h0, r0, g0, s0 = _outputs(unrolled, labels)(v0)
  o1, h1, r1, g1, s1 = _outputs(scanned, labels)(scan_blocks.stack_blocks(v0))
  assert len(h0) == len(h1) == 4  # every block's output, in order
  _close(o0, o1)
  _close(h0, h1)
  r1 = scan_blocks.unstack_blocks(r1)  # TV inputs (resnet_tv), per block
  assert jax.tree_util.tree_structure(r1) == jax.tree_util.tree_structure(r0)
  assert bool(r0) == (kind == "resnet_tv")
  _close(r1, r0)
  g1, s1 = scan_blocks.unstack_blocks(g1), scan_blocks.unstack_blocks(s1)
  assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g0)
  _close(g1, g0)
  _close(s1, s0)


def test_conversion_errors():
  v = {"stage1_block1": {"w": jnp.ones(1)}, "stage1_block3": {"w": jnp.ones(1)}}
  with pytest.raises(ValueError, match="not consecutive"):
    scan_blocks.stack_blocks(v)
  with pytest.raises(ValueError, match="exactly"):
    scan_blocks.unstack_blocks({"stage1_blocks": {"other": {}}})


def test_config_switch_and_validation():
  config = cifar.get_config("resnet20,cifar10,4w4a,cpu")
  assert config.model.scan_blocks is False
  config.model.scan_blocks = True
  model = models.create(config.model.name, 10, scan_blocks=True)
  assert model.scan_blocks
  assert "scan_blocks" in cifar.get_config("stable_resnet56,cifar10,4w4a").model
  assert "scan_blocks" not in cifar.get_config("mobilenetv2,cifar10,4w4a").model
  config = cifar.get_config("resnet20,cifar10,4w4a,cpu")
  config.model.name = "mobilenetv2"
  config.model.scan_blocks = True
  with pytest.raises(validate.ConfigError, match="scan_blocks"):
    validate.image(config, num_devices=1)


@pytest.mark.parametrize("size,padding", [(3, "SAME"), (3, ((1, 1), (1, 1))),
                                          (1, "SAME")])
def test_canonical_conv_grads_equal_autodiff(size, padding):
  """The rewritten convolution gradients (used inside scanned blocks) equal
  autodiff's, to first and second order (the Stable blocks differentiate
  through an adjoint)."""
  kx, kk, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 5, 5, 3))
  k = jax.random.normal(kk, (size, size, 3, 4))
  y = jax.random.normal(ky, (2, 5, 5, 4))

  def grads(canonical):
    def f(x, k):
      return jnp.sum(jnp.sin(operators.conv(x, k, padding=padding)) * y)

    def second(x, k):  # through the adjoint K^T, as StableBlock
      adj = operators.adjoint(lambda v: operators.conv(v, k, padding=padding),
                              x.shape)
      return jnp.sum(jnp.cos(adj(y)) * x) + jnp.sum(jax.grad(f)(x, k) ** 2)

    def run(x, k):
      if canonical:
        with operators.canonical_conv_grads():
          return jax.grad(f, (0, 1))(x, k), jax.grad(second, (0, 1))(x, k)
      return jax.grad(f, (0, 1))(x, k), jax.grad(second, (0, 1))(x, k)
    return jax.jit(run)(x, k)

  _close(grads(True), grads(False))
  # a strided convolution keeps autodiff's rules (lax's transpose)
  jaxpr = lambda stride: str(jax.make_jaxpr(lambda x: operators.conv(
      x, k, stride=stride, padding=padding))(x))
  with operators.canonical_conv_grads():
    assert "custom_vjp" in jaxpr(1)
    assert "custom_vjp" not in jaxpr(2)
  assert "custom_vjp" not in jaxpr(1)  # outside the context: unchanged
