"""Checkpoint surgery (TV insertion) and the two-phase pipeline, end to end.

Tiny sizes: ResNet-8 on 16x16 random-class-colour images (tests/test_classify).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tv_pipeline
from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import surgery
from pdeq_jax import tv
from tests.test_classify import tiny_config
from tests.test_classify import tiny_dataset
from train import pipeline


def _init(model, x):
  return model.init(jax.random.PRNGKey(0), x, layers.FLOAT_BITS)


def _flat(tree):
  return {"/".join(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0] for k in [
              tuple(getattr(p, "key", str(p)) for p in k)]}


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))


def _logits(model, variables, x):
  return model.apply(variables, x, layers.QuantBits.make(4, 4))


def test_tv_insertion_keeps_weights_and_changes_output_by_gamma_squared(images):
  plain = models.create("resnet8", 10)
  trained = _init(plain, images)
  diffs = {}
  for gamma in (0.02, 0.04):
    with_tv = models.create("resnet8", 10, tv_activation=True,
                            tv_gamma_init=gamma)
    merged, report = surgery.transplant_variables(trained,
                                                  _init(with_tv, images))
    # Every array of the trained net is copied bit for bit ...
    flat_old, flat_new = _flat(trained), _flat(merged)
    for path, value in flat_old.items():
      np.testing.assert_array_equal(np.asarray(flat_new[path]),
                                    np.asarray(value))
    # ... and only the TV parameters are new: two per BasicBlock.
    assert report["new"] and all(p.endswith("rho") for p in report["new"])
    assert len(report["new"]) == 2 * 3
    assert not report["dropped"]
    gammas = [float(layers.TVActivation().gamma_max *
                    jax.nn.sigmoid(v)) for p, v in flat_new.items()
              if p.endswith("rho")]
    np.testing.assert_allclose(gammas, gamma, rtol=1e-5)
    diffs[gamma] = float(jnp.max(jnp.abs(
        _logits(with_tv, merged, images) - _logits(plain, trained, images))))
  # S(x) = x - γ² (flux), |flux| bounded: the output moves by O(γ²).
  assert diffs[0.02] > 0
  ratio = diffs[0.04] / diffs[0.02]
  assert 2.5 < ratio < 6.0, diffs


def test_transplant_errors(images):
  small = _init(models.create("resnet8", 10), images)
  other_classes = _init(models.create("resnet8", 7), images)
  with pytest.raises(ValueError, match="shape mismatch"):
    surgery.transplant_variables(small, other_classes)
  float_net = _init(models.create("resnet8", 10, quantize_activations=False,
                                  quantize_weights=False), images)
  with pytest.raises(ValueError, match="no place in the target"):
    surgery.transplant_variables(small, float_net)
  merged, report = surgery.transplant_variables(small, float_net,
                                                allow_dropped=("alpha",))
  assert report["dropped"] and all("alpha" in p for p in report["dropped"])
  # Quantizing a float network: the α's are new, everything else copied.
  _, report = surgery.transplant_variables(float_net, small)
  assert all(p.endswith("alpha") for p in report["new"])


def tiny_pipeline_config():
  config = tv_pipeline.get_config("resnet8,cifar10_jpeg,4w4a,cpu")
  for stage in config.stages:
    base = tiny_config(model="resnet8", precision="4w4a")
    stage_cfg = config[stage]
    for key in ("batch_size", "eval_batch_size", "log_every_steps",
                "checkpoint_every_steps", "progress_every_s"):
      stage_cfg[key] = base[key]
    stage_cfg.num_epochs = 1
    stage_cfg.quant.start_bits = 4
  config.pretrain.num_epochs = 2
  return config


def test_pipeline_runs_resumes_and_reports(tmp_path):
  data = tiny_dataset()
  config = tiny_pipeline_config()
  full = pipeline.train_and_evaluate(config, str(tmp_path / "full"),
                                     verbose=False, dataset=data)
  stages = full["stages"]
  assert list(stages) == list(config.stages)
  assert stages["pretrain"]["act_bits"] == 32
  assert stages["quantize"]["act_bits"] == 4
  tv_rows = stages["tv_finetune"]["tv_layers"]
  assert len(tv_rows) == 6
  for row in tv_rows:
    # γ starts at the non-expansive default (γ² <= ε/4) and one short
    # fine-tuning epoch keeps it there: the bound is exactly 1 ...
    assert row["gamma"] == pytest.approx(tv_pipeline.TV_GAMMA_INIT, rel=0.05)
    assert row["jacobian_bound"] == float(tv.tv_jacobian_bound(
        row["gamma"], layers.TVActivation.eps)) == 1.0
    # ... and the measured norm is 1: >= 1 always (per-channel constants are
    # fixed points), and not above it (an expansive γ such as the former
    # default 0.1 measures far above 1).
    assert 0.99 < row["jacobian_norm"] <= 1.0 + 1e-3, row
  # The sign-only inference form of the TV layers is evaluated too; with
  # small γ it changes the predictions little.
  assert abs(stages["tv_finetune"]["test_acc_sign_form"]
             - stages["tv_finetune"]["test_acc"]) <= 0.25
  assert "tv_layers" not in stages["quantize_continued"]
  text = (tmp_path / "full" / "pipeline.md").read_text()
  assert "tv_finetune" in text and "Jacobian norm" in text

  # Interrupted in the middle of the second stage (8 pretrain steps + 2):
  # resuming gives the same results as the uninterrupted run.
  config.stages = ("pretrain", "quantize")
  part = tmp_path / "part"
  out = pipeline.train_and_evaluate(config, str(part), verbose=False,
                                    dataset=data, max_steps_this_call=10)
  assert out["interrupted_stage"] == "quantize"
  assert out["interrupted_at_step"] == 2
  out = pipeline.train_and_evaluate(config, str(part), verbose=False,
                                    dataset=data)
  for stage in config.stages:
    for key in ("test_acc", "test_acc_final", "act_mse"):
      assert out["stages"][stage].get(key) == stages[stage].get(key), (stage,
                                                                        key)


def test_pipeline_config_errors():
  config = tiny_pipeline_config()
  config.stage_inputs.quantize = "tv_finetune"
  with pytest.raises(ValueError, match="runs before it"):
    pipeline.check_pipeline_config(config)
  config = tiny_pipeline_config()
  config.stages = ("pretrain", "missing")
  with pytest.raises(ValueError, match="no section"):
    pipeline.check_pipeline_config(config)
