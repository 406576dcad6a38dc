"""Noise-aware training (config.noise) resumes exactly; the noise CLI
(python -m train.noise) on finished runs; clear errors."""

import io
import json

from absl import flags
import jax
import numpy as np
import pytest

from configs import pde_gcn as gcn_configs
from pdeq_jax import noise
from tests.test_classify import tiny_config
from tests.test_classify import tiny_dataset
from train import classify
from train import cli
from train import noise as train_noise
from train import node_classify
from train import validate


def _gcn_config(data_dir, arg="cora,sym,4w4a", epochs=6, **noise_cfg):
  config = gcn_configs.get_config(arg)
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth = 2
  config.model.width = 8
  config.num_epochs = epochs
  config.checkpoint_every = 1
  config.patience = 0
  for k, v in noise_cfg.items():
    config.noise[k] = v
  return config


NOISY = {"train_sites": "weights,activations,mac", "train_sigma": 0.2,
         "train_epochs": 4, "ramp_epochs": 2}


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l)["loss"] for l in lines]


@pytest.fixture(scope="module")
def gcn_noisy_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gcn_noisy")
  results = node_classify.train_and_evaluate(
      _gcn_config(data_dir, **NOISY), str(workdir), verbose=False)
  return workdir, results


def test_gcn_noise_training_resumes_exactly(data_dir, tmp_path,
                                            gcn_noisy_run):
  workdir, results = gcn_noisy_run
  resumed = tmp_path / "resumed"
  config = _gcn_config(data_dir, **NOISY)
  out = node_classify.train_and_evaluate(config, str(resumed), verbose=False,
                                         max_epochs_this_call=3)
  assert out == {"interrupted_at_epoch": 3}
  again = node_classify.train_and_evaluate(config, str(resumed),
                                           verbose=False)
  for key in ("test_acc", "val_acc", "best_epoch", "train_acc"):
    assert again[key] == results[key], key
  assert _losses(resumed) == _losses(workdir)


def test_gcn_training_noise_acts_only_in_the_final_epochs(data_dir):
  config = _gcn_config(data_dir, **NOISY)
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  tx = node_classify.create_optimizer(config, params)
  opt = tx.init(params)
  step = node_classify.make_train_step(
      model, tx, task, train_noise.training_noise(config, 1))
  bits = node_classify.bits_for_epoch(config, 0)
  rng = jax.random.PRNGKey(0)
  loss = lambda epoch: float(step(params, opt, bits, rng, epoch)[2])
  # epochs 0-1: sigma 0, the same loss; 2 (ramp), 5: noisy, each its own draw
  assert loss(0) == loss(1)
  assert len({loss(1), loss(2), loss(5)}) == 3
  assert loss(5) == loss(5)


def test_image_training_noise_is_a_function_of_the_step():
  """The classify step draws its noise from state.step (and the seed): a
  resumed run, which restores the step, draws the same noise."""
  data = tiny_dataset(n_train=16, n_val=1, n_test=1, hw=8)
  config = tiny_config(**{"noise.train_sites": "mac,weights,activations",
                          "noise.train_sigma": 0.1, "noise.train_epochs": 1})
  model = classify.create_model(config, data.num_classes)
  state, tx = classify.create_train_state(config, model, data.image_shape, 4)
  noisy = train_noise.training_noise(config, 4)  # noise from step 4 on
  step = jax.jit(classify.make_train_step(model, tx, training_noise=noisy))
  bits = classify.bits_for_epoch(config, 1)
  x = (data.train_images[:16] / 255.0).astype(np.float32)
  y = data.train_labels[:16]
  at = lambda s: float(step(state.replace(step=jax.numpy.int32(s)), x, y,
                            bits, jax.random.PRNGKey(0))[1]["loss"])
  assert at(2) == at(3)          # before the final epoch: no noise
  assert at(4) == at(4)          # the same step: the same draw
  assert len({at(3), at(4), at(5)}) == 3


def test_noise_cli_on_a_gcn_run(gcn_noisy_run, tmp_path):
  workdir, _ = gcn_noisy_run
  out = tmp_path / "report"
  result = train_noise.run(str(workdir), "weights,activations,mac",
                           "0,0.5,0.05", draws=3, output=str(out),
                           verbose=False)
  assert result["sigmas"] == [0.0, 0.05, 0.5]
  for site in noise.SITES:
    r = result["sites"][site]
    assert len(r["acc"]) == 3 and all(len(a) == 3 for a in r["acc"])
    assert r["mean"][0] == result["clean_acc"] and r["std"][0] == 0.0
    assert r["std"][2] > 0  # the draws differ
  text = (out / "noise.md").read_text()
  assert "fallen by 1 / 5 / 20 points" in text and "| weights |" in text
  assert (out / "noise.png").stat().st_size > 0
  # the same seed gives the same numbers
  again = train_noise.run(str(workdir), "mac", "0,0.5", draws=3,
                          output=str(tmp_path / "r2"), verbose=False)
  assert again["sites"]["mac"]["acc"] == result["sites"]["mac"]["acc"][::2]
  text = train_noise.compare([str(out / "noise.json"),
                              str(tmp_path / "r2" / "noise.json")],
                             ["a", "b"], tmp_path / "cmp")
  assert "| mac | b |" in text and (tmp_path / "cmp" / "compare.png").exists()
  final = train_noise.run(str(workdir), "mac", "0", draws=1, which="final",
                          output=str(tmp_path / "r3"), verbose=False)
  assert final["which"] == "final" and "(final model)" in final["title"]


def test_threshold_interpolates():
  s = [0.0, 0.1, 0.2]
  assert train_noise.threshold(s, [0.9, 0.88, 0.5], 1) == pytest.approx(0.05)
  assert train_noise.threshold(s, [0.9, 0.88, 0.5], 20) == pytest.approx(
      0.1 + 0.18 / 0.38 * 0.1)
  assert train_noise.threshold(s, [0.9, 0.9, 0.9], 1) is None


@pytest.mark.parametrize("args,message", [
    (["--sigmas=0,x"], "error: --sigmas: 'x' is not a number"),
    (["--sigmas=0,-1"], "error: --sigmas: '-1' is not a finite number >= 0"),
    (["--sigmas=0,0.1,0.1"], "error: --sigmas: repeated value"),
    (["--sites=weights,bias"], "error: unknown noise site 'bias' (--sites;"),
    (["--draws=0"], "(--draws = 0;"),
])
def test_cli_errors(gcn_noisy_run, args, message, monkeypatch):
  workdir, _ = gcn_noisy_run
  fv = flags.FlagValues()
  train_noise.define_flags(fv)
  monkeypatch.setattr(train_noise, "FLAGS", fv)
  err = io.StringIO()
  status = cli.invoke(train_noise.main,
                      ["prog", f"--workdir={workdir}", *args], fv, stderr=err)
  assert status == 2
  line = err.getvalue().strip()
  assert "\n" not in line and line.startswith("error: ") and message in line


def test_activation_site_on_a_float_activation_run(data_dir, tmp_path):
  workdir = tmp_path / "fp"
  node_classify.train_and_evaluate(_gcn_config(data_dir, "cora,sym,fp",
                                               epochs=2), str(workdir),
                                   verbose=False)
  with pytest.raises(validate.ConfigError, match="has none"):
    train_noise.run(str(workdir), "activations", "0,0.1", draws=1,
                    verbose=False)
  r = train_noise.run(str(workdir), "weights,mac", "0,0.1", draws=1,
                      output=str(tmp_path / "o"), verbose=False)
  assert set(r["sites"]) == {"weights", "mac"}


@pytest.mark.parametrize("override,match", [
    ({"train_sites": "weights,foo", "train_sigma": 0.1, "train_epochs": 1},
     r"bad noise sites \(config.noise.train_sites = 'weights,foo'"),
    ({"train_sites": "mac", "train_sigma": 0.0, "train_epochs": 1},
     r"config.noise.train_sigma = 0.0"),
    ({"train_sites": "mac", "train_sigma": 0.1, "train_epochs": 7},
     r"noise epochs out of range .*\[1, num_epochs = 6\]"),
    ({"train_sites": "mac", "train_sigma": 0.1, "train_epochs": 2,
      "ramp_epochs": 3}, r"noise ramp out of range"),
])
def test_bad_noise_training_config(data_dir, override, match):
  with pytest.raises(validate.ConfigError, match=match):
    train_noise.check_train_config(_gcn_config(data_dir, **override))


def test_float_activation_noise_training_refused(data_dir):
  config = _gcn_config(data_dir, "cora,sym,fp", train_sites="activations",
                       train_sigma=0.1, train_epochs=1)
  with pytest.raises(validate.ConfigError, match="float activations"):
    train_noise.check_train_config(config)
