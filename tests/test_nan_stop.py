"""A NaN or Inf stops training with a message naming the step, keeps the
last good checkpoint and writes no results.json (issue 23)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pde_gcn as gcn_configs
from pdeq_jax import layers
from train import classify
from train import common
from train import node_classify
from tests.test_classify import tiny_config, tiny_dataset


def _gcn_config(data_dir, epochs=8):
  config = gcn_configs.get_config("cora,sym,4w4a")
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth = 2
  config.model.width = 8
  config.num_epochs = epochs
  config.checkpoint_every = 2
  return config


@pytest.fixture(scope="module")
def clean_gcn(data_dir, tmp_path_factory):
  """The results of the run without a fault."""
  return node_classify.train_and_evaluate(
      _gcn_config(data_dir), str(tmp_path_factory.mktemp("clean")),
      verbose=False)


def _inject_gcn(monkeypatch, at_call: int, value: float, into: str):
  """The ``at_call``-th train step returns ``value`` as its loss (``into`` =
  "loss") or as every parameter (``into`` = "params")."""
  make = node_classify.make_train_step

  def patched(model, tx, task):
    step = make(model, tx, task)
    calls = {"n": 0}

    def faulty(params, opt_state, bits, rng):
      params, opt_state, loss = step(params, opt_state, bits, rng)
      calls["n"] += 1
      if calls["n"] == at_call:
        if into == "loss":
          loss = jnp.float32(value)
        else:
          params = jax.tree_util.tree_map(lambda p: p * value, params)
      return params, opt_state, loss
    return faulty
  monkeypatch.setattr(node_classify, "make_train_step", patched)


@pytest.mark.parametrize("value,into,message", [
    (np.nan, "loss", "loss = nan at epoch 4 (step 5); the last good "
     "checkpoint (step 4) is kept"),
    (np.inf, "loss", "loss = inf at epoch 4 (step 5); the last good "
     "checkpoint (step 4) is kept"),
    # NaN parameters after the 5th step: its loss is finite, the evaluation
    # of the same epoch is not
    (np.nan, "params", "at epoch 4 (step 5); the last good checkpoint "
     "(step 4) is kept"),
])
def test_gcn_stops_on_non_finite(data_dir, tmp_path, monkeypatch, value, into,
                                 message, clean_gcn):
  config = _gcn_config(data_dir)
  _inject_gcn(monkeypatch, at_call=5, value=value, into=into)
  with pytest.raises(common.NonFiniteError, match=message.replace(
      "(", r"\(").replace(")", r"\)")):
    node_classify.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert not (tmp_path / "results.json").exists()
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 4
  tree = ckpt.restore_raw()
  ckpt.close()
  assert common.tree_is_finite(tree["params"])
  # the fault gone, the same command resumes from the good checkpoint and
  # ends like a run that never saw it
  monkeypatch.undo()
  resumed = node_classify.train_and_evaluate(config, str(tmp_path),
                                             verbose=False)
  for key in ("val_acc", "test_acc", "best_epoch", "act_mse"):
    assert resumed[key] == clean_gcn[key], key


def _inject_image(monkeypatch, at_call: int, into: str):
  jit_step = classify.jit_train_step

  def patched(train_step, mesh):
    step = jit_step(train_step, mesh)
    calls = {"n": 0}

    def faulty(state, images, labels, bits, rng):
      state, metrics = step(state, images, labels, bits, rng)
      calls["n"] += 1
      if calls["n"] == at_call:
        if into == "loss":
          metrics = {**metrics, "loss": jnp.float32(np.nan)}
        else:
          state = state.replace(params=jax.tree_util.tree_map(
              lambda p: p * np.nan, state.params))
      return state, metrics
    return faulty
  monkeypatch.setattr(classify, "jit_train_step", patched)


@pytest.mark.parametrize("into,message", [
    # NaN loss at step 5: seen at the next check (log_every_steps=2: step 6)
    ("loss", r"loss = nan at step 6 \(epoch 1.50\); the last good checkpoint "
     r"\(step 4\) is kept"),
    # NaN weights after step 6 (its loss is still finite): seen before the
    # step-6 checkpoint is written
    ("params", r"parameters = nan at step 6 \(epoch 1.50\); the last good "
     r"checkpoint \(step 4\) is kept"),
])
def test_image_trainer_stops_on_non_finite(tmp_path, monkeypatch, into,
                                           message):
  config = tiny_config(num_epochs=2, checkpoint_every_steps=2)
  _inject_image(monkeypatch, at_call=5 if into == "loss" else 6, into=into)
  with pytest.raises(common.NonFiniteError, match=message):
    classify.train_and_evaluate(config, str(tmp_path), verbose=False,
                                dataset=tiny_dataset())
  assert not (tmp_path / "results.json").exists()
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 4
  assert common.tree_is_finite(ckpt.restore_raw()["state"]["params"])
  ckpt.close()


def test_traced_bits_below_two_rejected_where_they_enter(data_dir):
  config = _gcn_config(data_dir)
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  bad = layers.QuantBits(jnp.int32(32), jnp.int32(1))  # bypasses make()
  with pytest.raises(ValueError, match=r"bits.activations = 1"):
    node_classify.evaluate_consistency(model, params, task, bad)
  with pytest.raises(ValueError, match=r"bits.weights = 0"):
    common.check_runtime_bits(layers.QuantBits(jnp.int32(0), jnp.int32(4)))
  common.check_runtime_bits(layers.QuantBits.make(2, None))  # allowed


def test_metrics_line_cut_by_a_kill_is_dropped(tmp_path):
  writer = common.MetricWriter(tmp_path)
  writer.write(step=1, loss=0.5)
  writer.write(step=2, loss=0.4)
  with writer.path.open("a") as f:
    f.write('{"step": 3, "lo')  # killed mid-line
  assert [r["step"] for r in writer.read()] == [1, 2]
  writer.truncate_after(1)
  assert json.loads(writer.path.read_text()) == {"loss": 0.5, "step": 1}


def test_a_diverged_sweep_trial_ranks_last_and_the_sweep_goes_on(
    data_dir, tmp_path, monkeypatch):
  from train import sweep  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_trial(trainer, config, trial_dir, seeds_per_trial, *unused):
    calls.append(trial_dir.name)
    if len(calls) == 1:
      raise common.NonFiniteError("training diverged: loss = nan at epoch 3")
    return {"val_acc": 0.5, "test_acc": 0.4, "best_epoch": 7, "act_mse": None,
            "val_acc_per_seed": [0.5]}
  monkeypatch.setattr(sweep, "_train_trial", fake_trial)
  best = sweep.run_sweep(_gcn_config(data_dir), str(tmp_path), trials=2,
                         space="dropout", verbose=False)
  assert calls == ["trial_000", "trial_001"]
  assert best["trial"] == 1
  rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").open()]
  assert rows[-1]["trial"] == 0 and rows[-1]["diverged"] is True
  assert rows[-1]["val_acc"] == 0.0


def test_cli_divergence_is_one_line_and_status_1(data_dir, tmp_path):
  """A learning rate of 1e38 diverges in the first epoch: one line, exit
  status 1 (not 2: the input is valid), no results.json."""
  from tests.test_bad_inputs import run_program  # pylint: disable=import-outside-toplevel
  status, err = run_program("train.main", [
      "--config=configs/pde_gcn.py:cora,sym,4w4a",
      f"--config.data.data_dir={data_dir / 'planetoid'}",
      "--config.model.depth=2", "--config.model.width=8",
      "--config.num_epochs=4", "--config.optim.lr=1e38",
      f"--workdir={tmp_path}"])
  assert status == 1
  assert err.strip().splitlines() == [
      "error: training diverged: val_loss = inf at epoch 0 (step 1); no "
      "checkpoint was written; no results.json written (lower the learning "
      "rate or check the inputs)"]
  assert not (tmp_path / "results.json").exists()
