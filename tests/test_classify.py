"""Image-classification trainer: steps, sharding, resume, schedule, errors.

Small shapes throughout: ResNet-8 / Stable ResNet-8 on 16x16 images, batches
of 8-16.  The real-data test trains a few steps on real CIFAR-10 JPEG images.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar as cifar_configs
from pdeq_jax import layers
from pdeq_jax.data import images as image_data
from train import classify
from train import common

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.PRNGKey(0)  # the dropout stream (unused by these nets)


def tiny_dataset(n_train=64, n_val=16, n_test=24, hw=16, num_classes=4,
                 seed=0) -> image_data.ImageDataset:
  """Random images whose class shifts the mean colour (learnable)."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    base = rng.integers(0, 120, (n, hw, hw, 3))
    imgs = base + (labels * (120 // num_classes))[:, None, None, None]
    return imgs.astype(np.uint8), labels

  (tr, ytr), (va, yva), (te, yte) = split(n_train), split(n_val), split(n_test)
  mean = (tr / 255.0).mean(axis=(0, 1, 2)).astype(np.float32)
  std = (tr / 255.0).std(axis=(0, 1, 2)).astype(np.float32)
  return image_data.ImageDataset(
      train_images=tr, train_labels=ytr, val_images=va, val_labels=yva,
      test_images=te, test_labels=yte,
      class_names=tuple(f"c{i}" for i in range(num_classes)), mean=mean,
      std=std, name="tiny")


def tiny_config(model="resnet8", precision="4w4a", **overrides):
  config = cifar_configs.get_config(f"{model},cifar10_jpeg,{precision}")
  config.num_epochs = 2
  config.batch_size = 16
  config.eval_batch_size = 16
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.progress_every_s = 1e9
  config.quant.start_bits = 5  # reaches the target 4 bits in epoch 2
  config.quant.epochs_per_step = 1
  config.consistency.max_examples = 0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def dataset():
  return tiny_dataset()


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- configs ---

@pytest.mark.parametrize("arg", [
    "resnet56,cifar10,4w4a", "stable_resnet56,cifar10,4w8a",
    "mobilenetv2,cifar10,fp", "stable_mobilenetv2,cifar10,4w4a",
    "resnet34,cifar100,4w4a", "stable_resnet34,cifar100,fp",
    "resnet20,cifar10_jpeg,4w4a,cpu"])
def test_table_configs_resolve(arg):
  config = cifar_configs.get_config(arg)
  classify.check_config(config)
  assert config.task == "image_classification"
  assert config.model.name == arg.split(",")[0]
  if "cpu" not in arg:
    assert config.num_epochs == 400 and config.optim.lr == 0.1
    assert config.quant.start_bits == 16 and config.quant.epochs_per_step == 10


@pytest.mark.parametrize("arg, match", [
    ("resnet56,cifar10", "config arg"),
    ("resnet56,cifar10,4bits", "precision"),
    ("resnet56,cifar10,4w4a,gpu", "config arg"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(ValueError, match=match):
    cifar_configs.get_config(arg)


@pytest.mark.parametrize("key, value, match", [
    ("quant.act_bits", 1, "act_bits"),
    ("quant.weight_bits", 20, "weight_bits"),
    ("batch_size", 0, "batch_size"),
    ("optim.schedule", "linear", "schedule"),
    ("optim.weight_decay_on", "biases", "weight_decay_on"),
    ("quant.epochs_per_step", 0, "epochs_per_step"),
    ("data.threads", -1, "data.threads"),
    ("data.workers", -2, "data.workers"),
])
def test_bad_config_values(key, value, match):
  with pytest.raises(ValueError, match=match):
    classify.check_config(tiny_config(**{key: value}))


def test_imagenet_table1_is_configured_with_a_clear_data_error():
  from configs import tv_pipeline  # pylint: disable=import-outside-toplevel
  config = tv_pipeline.get_config("resnet50,imagenet2012,3w3a")
  assert config.stages == ("quantize", "tv_finetune", "quantize_continued")
  assert config.tv_finetune.model.tv_activation
  assert (config.quantize.quant.weight_bits, config.quantize.quant.act_bits
          ) == (3, 3)
  classify.check_config(config.quantize)
  with pytest.raises(RuntimeError, match="TensorFlow and a prepared"):
    classify.make_source(config.quantize)


def test_unknown_model_names_known_ones(dataset):
  with pytest.raises(ValueError, match="known models"):
    classify.create_model(tiny_config(model="resnet9"), 10)


def test_gradual_schedule_bits():
  config = tiny_config(precision="4w8a")
  config.quant.start_bits = 16
  config.quant.epochs_per_step = 10
  got = [tuple(int(b) for b in classify.bits_for_epoch(config, e))
         for e in (0, 9, 10, 75, 80, 119, 120, 399)]
  assert got == [(16, 16), (16, 16), (15, 15), (9, 9), (8, 8), (5, 8),
                 (4, 8), (4, 8)]
  fp = tiny_config(precision="fp")
  assert [int(b) for b in classify.bits_for_epoch(fp, 0)] == [32, 32]


# ------------------------------------------------------------------ steps ---

def _state_and_steps(config, data, mesh=None):
  model = classify.create_model(config, data.num_classes)
  state, tx = classify.create_train_state(config, model, data.image_shape,
                                          steps_per_epoch=4)
  mesh = mesh or classify.make_mesh()
  state = jax.device_put(state, classify.shardings(mesh)[0])
  step = classify.jit_train_step(classify.make_train_step(model, tx), mesh)
  return model, state, step, mesh


def test_bit_changes_do_not_recompile(dataset):
  config = tiny_config()
  _, state, step, mesh = _state_and_steps(config, dataset)
  x = jnp.asarray(image_data.normalize(dataset.train_images[:16],
                                       dataset.mean, dataset.std))
  y = jnp.asarray(dataset.train_labels[:16])
  for bits in ((8, 8), (6, 5), (4, 4)):
    state, metrics = step(state, x, y, layers.QuantBits.make(*bits), KEY)
    assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1
  assert int(state.step) == 3


def test_training_reduces_loss_on_tiny_data(dataset):
  config = tiny_config(precision="4w4a")
  config.optim.lr = 0.05
  _, state, step, _ = _state_and_steps(config, dataset)
  x = jnp.asarray(image_data.normalize(dataset.train_images[:16],
                                       dataset.mean, dataset.std))
  y = jnp.asarray(dataset.train_labels[:16])
  bits = layers.QuantBits.make(4, 4)
  losses = []
  for _ in range(12):
    state, metrics = step(state, x, y, bits, KEY)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses


SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_classify import tiny_dataset, tiny_config
from pdeq_jax import layers
from pdeq_jax.data import images as image_data
from train import classify
assert jax.device_count() == 2, jax.devices()
data = tiny_dataset()
out = {}
for name, devices in (("one", jax.devices()[:1]), ("two", jax.devices())):
  config = tiny_config(model=sys.argv[2])
  mesh = classify.make_mesh(devices)
  model = classify.create_model(config, data.num_classes)
  state, tx = classify.create_train_state(config, model, data.image_shape, 4)
  step = classify.jit_train_step(classify.make_train_step(model, tx), mesh)
  bits = layers.QuantBits.make(4, 4)
  for i in range(2):
    x = image_data.normalize(data.train_images[16 * i:16 * (i + 1)],
                             data.mean, data.std)
    y = data.train_labels[16 * i:16 * (i + 1)]
    x, y = classify.to_global((x, y), mesh)
    state, metrics = step(state, x, y, bits, jax.random.PRNGKey(0))
  if name == "two":
    assert len(x.sharding.device_set) == 2
  out[name] = [np.asarray(l).ravel().tolist()
               for l in jax.tree_util.tree_leaves((state.params,
                                                   state.model_state))]
  out[name + "_loss"] = float(metrics["loss"])
diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (1e-6 + np.max(np.abs(np.asarray(b)))))
         for a, b in zip(out["one"], out["two"])]
print(json.dumps({"max_rel_diff": max(diffs), "loss_one": out["one_loss"],
                  "loss_two": out["two_loss"]}))
"""


@pytest.mark.parametrize("model", ["resnet8", "stable_resnet8"])
def test_sharded_step_equals_single_device(model):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(REPO_ROOT),
                         model], capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # Same math, different reduction order across the two shards.
  assert result["max_rel_diff"] < 1e-4, result
  assert abs(result["loss_one"] - result["loss_two"]) < 1e-5, result


# -------------------------------------------------------------- full runs ---

def test_interrupted_run_resumes_to_identical_result(dataset, tmp_path):
  config = tiny_config(model="stable_resnet8")
  config.quant.start_bits = 5  # the second epoch is at the target: selected
  config.data.threads = 0  # batches made in the training thread
  full = classify.train_and_evaluate(config, str(tmp_path / "full"),
                                     verbose=False, dataset=dataset)
  # The interrupted run reads ahead (grain threads): the stream is the same
  # and the checkpointed iterator state is the consumed position.
  config.data.threads, config.data.prefetch = 2, 4
  # Crash mid-epoch (step 3 of 4), then again at an epoch boundary.
  part = tmp_path / "part"
  r1 = classify.train_and_evaluate(config, str(part), verbose=False,
                                   dataset=dataset, max_steps_this_call=3)
  assert r1 == {"interrupted_at_step": 3}
  saved = common.Checkpointer(part / "checkpoints")
  assert classify.decode_data_state(saved.restore_raw()["data"]) == {
      "step": 3, "iterator": {"next_index": 3}}
  saved.close()
  r2 = classify.train_and_evaluate(config, str(part), verbose=False,
                                   dataset=dataset, max_steps_this_call=1)
  assert r2 == {"interrupted_at_step": 4}
  resumed = classify.train_and_evaluate(config, str(part), verbose=False,
                                        dataset=dataset)
  for key in ("test_acc", "test_acc_final", "val_acc", "best_epoch",
              "act_mse"):
    assert resumed[key] == full[key], key
  np.testing.assert_array_equal(resumed["consistency"]["mse"],
                                full["consistency"]["mse"])
  # The metrics log has no duplicated steps after the two restarts.
  steps = [json.loads(l)["step"] for l in
           (part / "metrics.jsonl").read_text().splitlines()
           if "train_loss" in json.loads(l)]
  assert steps == sorted(set(steps))


def test_full_run_writes_reports(dataset, tmp_path):
  config = tiny_config(model="resnet8", precision="4w4a")
  config.quant.start_bits = 5  # epoch 1 at 5 bits, epoch 2 at the target 4
  results = classify.train_and_evaluate(config, str(tmp_path), verbose=False,
                                        dataset=dataset)
  for name in ("results.json", "report.md", "curves.png", "consistency.json",
               "layerwise_mse.png", "metrics.jsonl", "config.json"):
    assert (tmp_path / name).exists(), name
  c = results["consistency"]
  assert len(c["mse"]) == 3  # one hidden map per block of ResNet-8
  assert all(m >= 0 for m in c["mse"])
  assert c["examples"] == len(dataset.test_labels)
  assert 0 <= results["test_acc"] <= 1
  assert results["test_examples"] == len(dataset.test_labels)
  # Selection only among epochs trained at the target bits.
  assert results["best_epoch"] == 2
  # The report recomputed from the checkpoint equals the end-of-run one.
  again = classify.consistency_report(str(tmp_path), dataset=dataset)
  np.testing.assert_allclose(again["mse"], c["mse"], rtol=1e-6)
  assert again["test_acc_bits"] == c["test_acc_bits"]
  fp_dir = tmp_path / "fp"
  classify.train_and_evaluate(tiny_config(precision="fp", num_epochs=1),
                              str(fp_dir), verbose=False, dataset=dataset)
  with pytest.raises(ValueError, match="full-precision"):
    classify.consistency_report(str(fp_dir), dataset=dataset)
  # A different config in the same workdir is refused.
  other = tiny_config(model="resnet8", precision="4w8a")
  with pytest.raises(ValueError, match="different config"):
    classify.train_and_evaluate(other, str(tmp_path), verbose=False,
                                dataset=dataset)


def test_consistency_matches_unstreamed_reference(dataset):
  config = tiny_config(model="stable_resnet8")
  model = classify.create_model(config, dataset.num_classes)
  state, _ = classify.create_train_state(config, model, dataset.image_shape, 4)
  variables = {"params": state.params, **state.model_state}
  bits = layers.QuantBits.make(4, 3)
  source = classify.ArraySource(dataset)
  run = lambda batch_size: classify.evaluate_consistency(
      model, variables, source.eval_batches("test", batch_size), bits=bits,
      mesh=classify.make_mesh())
  x = jnp.asarray(image_data.normalize(dataset.test_images, dataset.mean,
                                       dataset.std))
  # Reference: every hidden map of the whole test set (eager, in batches of
  # 8), then one MSE over all.  Jitted and eager arithmetic differ in the
  # last ulp, which can move a value across a quantization threshold: a
  # few 1e-3 relative, hence the tolerances.
  hq, hr = [], []
  for i in range(0, 24, 8):
    hq.append(model.apply(variables, x[i:i + 8], bits, return_hidden=True)[1])
    hr.append(model.apply(variables, x[i:i + 8],
                          layers.QuantBits.make(4, None),
                          return_hidden=True)[1])
  cat = lambda hs: [jnp.concatenate(layer) for layer in zip(*hs)]
  ref = classify.consistency.activation_mse(cat(hq), cat(hr))
  exact = run(8)
  np.testing.assert_allclose(exact["mse"], ref["mse"], rtol=5e-3)
  np.testing.assert_allclose(exact["normalized_mse"], ref["normalized_mse"],
                             rtol=5e-3)
  assert exact["examples"] == 24
  # Batches of 16: the last one is padded with 8 masked examples.
  padded = run(16)
  assert padded["examples"] == 24
  np.testing.assert_allclose(padded["mse"], ref["mse"], rtol=2e-2)


def test_few_steps_on_real_cifar_reduce_loss(data_dir, tmp_path):
  data = image_data.load_image_dataset("cifar10_jpeg", str(data_dir),
                                       max_train=256, max_test=64)
  assert data.image_shape == (32, 32, 3) and data.num_classes == 10
  config = tiny_config(model="resnet8", precision="4w4a")
  config.optim.lr = 0.05
  _, state, step, mesh = _state_and_steps(config, data)
  bits = layers.QuantBits.make(4, 4)
  batch = next(image_data.train_batches(
      data.train_images, data.train_labels, 32, seed=0, epoch=0,
      mean=data.mean, std=data.std, augment=False))
  losses = []
  for _ in range(8):
    state, metrics = step(state, *classify.to_global(batch, mesh), bits, KEY)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.3, losses

