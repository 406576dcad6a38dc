"""TensorBoard summaries beside metrics.jsonl, read back with TensorBoard."""
import json
import subprocess
import sys

import numpy as np
import pytest

from configs import pde_gcn as gcn_configs
from train import common
from train import node_classify

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def _scalars(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)}
          for tag in acc.Tags()["scalars"]}


def test_metric_lines_become_scalars_and_a_resume_purges_stale_steps(
    tmp_path):
  writer = common.MetricWriter(tmp_path)
  for epoch in range(4):
    writer.write(epoch=epoch, loss=1.0 / (epoch + 1), act_bits=4,
                 val_acc=np.float32(0.5 + epoch / 10), name="x", flag=True,
                 per_layer=[1.0, 2.0])
  writer.close()
  scalars = _scalars(tmp_path)
  assert set(scalars) == {"loss", "act_bits", "val_acc"}
  assert scalars["loss"] == {e: np.float32(1.0 / (e + 1)) for e in range(4)}
  assert scalars["act_bits"] == {e: 4.0 for e in range(4)}
  # a resumed run (checkpoint after epoch 1) rewrites epochs 2 and 3
  resumed = common.MetricWriter(tmp_path)
  resumed.truncate_after(1, key="epoch")
  for epoch in (2, 3):
    resumed.write(epoch=epoch, loss=10.0 + epoch)
  resumed.close()
  scalars = _scalars(tmp_path)
  assert scalars["loss"] == {0: 1.0, 1: 0.5, 2: 12.0, 3: 13.0}
  # the purge marker drops the stale epochs of every tag, not only those
  # written again (TensorBoard's own out-of-order purge is per tag)
  assert scalars["val_acc"] == {0: np.float32(0.5), 1: np.float32(0.6)}
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  assert [r["epoch"] for r in resumed.read()] == [0, 1, 2, 3]


def test_non_finite_values_stay_out_of_tensorboard(tmp_path):
  # before the gradual schedule reaches the target bits there is no best
  # model yet (best_val_acc = -inf): the JSONL keeps it, the curves skip it
  writer = common.MetricWriter(tmp_path)
  writer.write(epoch=0, val_acc=0.3, best_val_acc=-np.inf)
  writer.write(epoch=1, val_acc=0.4, best_val_acc=0.4, loss=np.nan)
  writer.close()
  scalars = _scalars(tmp_path)
  assert scalars["best_val_acc"] == {1: np.float32(0.4)}
  assert "loss" not in scalars
  assert scalars["val_acc"] == {0: np.float32(0.3), 1: np.float32(0.4)}
  assert writer.read()[0]["best_val_acc"] == -np.inf


def test_node_classification_run_logs_losses_accuracies_bits_and_alpha(
    data_dir, tmp_path):
  config = gcn_configs.get_config("cora,sym,4w4a")
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth, config.model.width, config.num_epochs = 2, 8, 3
  node_classify.train_and_evaluate(config, str(tmp_path), verbose=False)
  scalars = _scalars(tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").open()]
  for tag in ("loss", "val_acc", "test_acc", "val_loss", "act_bits",
              "alpha_act_mean", "alpha_act_min", "alpha_act_max"):
    assert scalars[tag] == {r["epoch"]: np.float32(r[tag]) for r in lines}, tag
  assert all(r["alpha_act_min"] <= r["alpha_act_mean"] <= r["alpha_act_max"]
             for r in lines)


def test_quantizer_stats_of_weight_and_activation_alphas_and_tv_gamma():
  params = {"block": {"ActQuant_0": {"alpha": np.float32(2.0)},
                      "wq": {"alpha": np.float32(1.0)},
                      "WeightQuant_0": {"alpha": np.float32(3.0)},
                      "TVActivation_0": {"rho": np.float32(0.0)},
                      "kernel": np.ones((3, 3), np.float32)},
            "alpha_state": np.array([4.0, -1.0], np.float32)}
  stats = common.quantizer_stats(params)
  assert stats["alpha_weight_mean"] == 2.0
  assert (stats["alpha_weight_min"], stats["alpha_weight_max"]) == (1.0, 3.0)
  # the floor of layers.positive_alpha applies to a negative raw alpha
  assert stats["alpha_act_min"] == pytest.approx(1e-4)
  assert stats["alpha_act_max"] == 4.0
  assert stats["tv_gamma_mean"] == 0.5  # gamma_max (1) * sigmoid(0)
  assert common.quantizer_stats({"kernel": np.ones(2)}) == {}


def test_writing_summaries_does_not_import_torch(tmp_path):
  code = ("import sys; from train import common; "
          f"w = common.MetricWriter({str(tmp_path)!r}); w.write(step=1, loss=2.0);"
          " w.close(); assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True)
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_image_classification_run_logs_images_per_second_and_alpha(
    tmp_path):
  from tests.test_classify import tiny_config, tiny_dataset  # pylint: disable=import-outside-toplevel
  from train import classify  # pylint: disable=import-outside-toplevel
  config = tiny_config(model="resnet8", precision="4w4a")
  config.num_epochs = 1
  config.quant.gradual = False  # one epoch: straight to the target bits
  classify.train_and_evaluate(config, str(tmp_path), verbose=False,
                              dataset=tiny_dataset())
  scalars = _scalars(tmp_path)
  train_lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").open()
                 if "train_loss" in json.loads(l)]
  assert train_lines and all(r["images_per_second"] > 0 for r in train_lines)
  for tag in ("train_loss", "images_per_second", "act_bits", "alpha_act_mean",
              "alpha_weight_max", "lr"):
    assert scalars[tag] == {r["step"]: np.float32(r[tag])
                            for r in train_lines}, tag
  assert "val_acc" in scalars and "best_val_score" in scalars
