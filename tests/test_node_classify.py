"""End-to-end node classification on real Cora: learning, resume, CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pde_gcn as gcn_configs
from pdeq_jax.data import planetoid
from train import node_classify
from tests.conftest import REPO_ROOT


def _small_config(data_dir, arg="cora,sym,4w4a", epochs=40):
  config = gcn_configs.get_config(arg)
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth = 4
  config.model.width = 16
  config.model.h = 0.5
  config.model.alpha_init = 1.0
  config.optim.lr = 0.02
  config.optim.lr_kernel = 1e-3
  config.optim.lr_alpha = 0.01
  config.num_epochs = epochs
  config.checkpoint_every = 10
  return config


def _feature_only_baseline(data_dir) -> float:
  """Logistic regression on the node features alone (no graph)."""
  data = planetoid.load_planetoid("cora", data_dir / "planetoid",
                                  download=False)
  x, y = jnp.asarray(data.features), jnp.asarray(data.labels)
  tr, te = np.flatnonzero(data.train_mask), np.flatnonzero(data.test_mask)
  w = jnp.zeros((x.shape[1], data.num_classes))
  opt = optax.adam(0.05)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(
        x[tr] @ w, y[tr]).mean() + 5e-4 * jnp.sum(w ** 2)
    g = jax.grad(loss)(w)
    updates, state = opt.update(g, state)
    return optax.apply_updates(w, updates), state

  for _ in range(200):
    w, state = step(w, state)
  return float(jnp.mean(jnp.argmax(x[te] @ w, -1) == y[te]))


def test_short_training_on_cora_beats_feature_only_baseline(data_dir, tmp_path):
  baseline = _feature_only_baseline(data_dir)
  results = node_classify.train_and_evaluate(
      _small_config(data_dir, "cora,sym,fp", epochs=60), str(tmp_path),
      verbose=False)
  assert results["test_acc"] > baseline + 0.1, (results["test_acc"], baseline)
  assert (tmp_path / "metrics.jsonl").exists()
  assert (tmp_path / "curves.png").exists()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 60


def test_quantized_run_reports_consistency(data_dir, tmp_path):
  results = node_classify.train_and_evaluate(
      _small_config(data_dir, epochs=20), str(tmp_path), verbose=False)
  stats = results["consistency"]
  assert len(stats["mse"]) == 4
  assert all(m > 0 for m in stats["mse"]), "4-bit must differ from clip-only"
  assert results["act_mse"] == pytest.approx(np.mean(stats["mse"]))
  assert (tmp_path / "layerwise_mse.png").exists()
  ratio = np.asarray(stats["mse_over_rounding_noise"])
  assert ratio.shape == (4,) and np.all(ratio > 0)
  # the first layer's state carries only the opening layer's rounding (plus
  # clipping differences), so it sits near one rounding's noise power
  assert 0.2 < ratio[0] < 5.0, ratio
  # recomputed from the checkpoint (as for runs trained before the ratio
  # existed): the same statistics
  stored = json.loads((tmp_path / "results.json").read_text())
  del stored["consistency"]["mse_over_rounding_noise"]
  (tmp_path / "results.json").write_text(json.dumps(stored))
  again = node_classify.recompute_consistency(_small_config(data_dir, epochs=20),
                                              str(tmp_path))
  np.testing.assert_allclose(again["consistency"]["mse_over_rounding_noise"],
                             ratio, rtol=1e-5)
  assert again["act_mse"] == pytest.approx(results["act_mse"], rel=1e-5)


def test_resume_after_interruption_gives_identical_results(data_dir, tmp_path):
  config = _small_config(data_dir, "cora,nonsym,4w4a", epochs=30)
  config.quant.gradual = True
  config.quant.epochs_per_step = 2
  config.patience = 3  # counted from the target bits on: never stops here
  full = node_classify.train_and_evaluate(config, str(tmp_path / "full"),
                                          verbose=False)
  part = node_classify.train_and_evaluate(config, str(tmp_path / "split"),
                                          max_epochs_this_call=10,
                                          verbose=False)
  assert part == {"interrupted_at_epoch": 10}
  resumed = node_classify.train_and_evaluate(config, str(tmp_path / "split"),
                                             verbose=False)
  for key in ("test_acc", "val_acc", "best_epoch", "act_mse"):
    assert resumed[key] == full[key], key
  a = [json.loads(l) for l in (tmp_path / "full/metrics.jsonl").open()]
  b = [json.loads(l) for l in (tmp_path / "split/metrics.jsonl").open()]
  assert a == b
  # the bits follow the schedule: 16, minus one every 2 epochs, down to 4
  scheduled = [max(4, 16 - e // 2) for e in range(30)]
  assert [r["act_bits"] for r in a] == scheduled
  # (this tuned config keeps float weights: 32 bits, never scheduled)
  assert [r["weight_bits"] for r in a] == [config.quant.weight_bits] * 30
  # selection only among the 4-bit epochs (24..29): the best of them by
  # validation accuracy (ties: lower validation loss), whatever the
  # higher-precision epochs before reached
  at_target = [r for r in a if r["act_bits"] == 4]
  best = max(at_target, key=lambda r: (r["val_acc"], -r["val_loss"]))
  assert full["best_epoch"] == best["epoch"] >= 24
  assert full["val_acc"] == pytest.approx(best["val_acc"])
  assert full["test_acc"] == pytest.approx(best["test_acc"])
  assert full["epochs_run"] == 30 and not full["stopped_early"]


def test_resume_refuses_a_different_config(data_dir, tmp_path):
  config = _small_config(data_dir, epochs=2)
  node_classify.train_and_evaluate(config, str(tmp_path), verbose=False)
  config.model.h = 0.25
  with pytest.raises(ValueError, match="model.h"):
    node_classify.train_and_evaluate(config, str(tmp_path), verbose=False)


def test_bad_bits_in_config_raise(data_dir, tmp_path):
  config = _small_config(data_dir, epochs=1)
  config.quant.act_bits = 1
  with pytest.raises(ValueError, match="config.quant.act_bits"):
    node_classify.train_and_evaluate(config, str(tmp_path), verbose=False)


def test_config_arg_errors():
  with pytest.raises(ValueError, match="dataset"):
    gcn_configs.get_config("corra,sym,fp")
  with pytest.raises(ValueError, match="precision"):
    gcn_configs.get_config("cora,sym,3w3a")


def _cli(*args, cwd=REPO_ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_overrides_and_unknown_keys(data_dir, tmp_path):
  base = ["--config=configs/pde_gcn.py:cora,nonsym,4w4a",
          f"--config.data.data_dir={data_dir / 'planetoid'}",
          "--config.model.depth=2", "--config.model.width=8",
          "--config.num_epochs=3"]
  ok = _cli(*base, "--config.model.symmetric=True", "--config.quant.act_bits=8",
            f"--workdir={tmp_path / 'ok'}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  results = json.loads((tmp_path / "ok/results.json").read_text())
  assert results["symmetric"] is True and results["act_bits"] == 8
  assert "test" in ok.stdout
  bad = _cli(*base, "--config.model.not_a_key=3",
             f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode != 0
  assert "not_a_key" in bad.stderr


def test_clip_only_reference_keeps_the_weight_bits(data_dir):
  from pdeq_jax import consistency, layers
  config = _small_config(data_dir, epochs=1)
  config.model.depth = 2
  config.quant.weight_bits = 4
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  bits = layers.QuantBits.make(4, 4)
  stats = node_classify.evaluate_consistency(model, params, task, bits)

  def run(b):
    logits, hidden = model.apply({"params": params}, task.features,
                                 task.graph, b, return_hidden=True)
    acc = jnp.mean(jnp.argmax(logits[task.test_idx], -1)
                   == task.labels[task.test_idx])
    return float(acc), hidden

  _, hidden_b = run(bits)
  acc_ref, hidden_ref = run(layers.QuantBits.make(4, None))
  want = consistency.activation_mse(hidden_b, hidden_ref)
  np.testing.assert_allclose(stats["mse"], want["mse"], rtol=1e-6)
  assert stats["test_acc_clip_only"] == acc_ref
  # float weights in the reference give another error (so the comparison
  # above tells the two references apart)
  _, hidden_float_w = run(layers.QuantBits.make(None, None))
  other = consistency.activation_mse(hidden_b, hidden_float_w)["mse"]
  assert np.any(np.abs(other - want["mse"]) > 1e-4 * want["mse"])
