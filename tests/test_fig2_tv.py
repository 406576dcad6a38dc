"""train/fig2_tv.py: Fig. 2 (TV smoothing before quantization) on a trained net.

The pure function on a synthetic map, then the program end to end on a tiny
ResNet-8 trained for two epochs on random 16x16 images (tests/test_classify's
helpers).  The same effect on a real CIFAR JPEG with a fixed Laplacian map is
tests/test_tv.py::test_fig2_tv_smoothing_reduces_4bit_quantization_error.
"""
import json

import numpy as np
import pytest

from tests.test_classify import tiny_config, tiny_dataset
from train import classify
from train import fig2_tv

ROW_KEYS = {"steps", "alpha", "mse", "relative_mse", "unique_codes",
            "code_entropy_bits", "clipped_fraction", "mean", "std", "min",
            "max", "mean_square", "zero_fraction", "total_variation"}


def piecewise_map(seed=0, noise=0.3, spikes=12, spike=3.0):
  """Two channels of constant patches (levels 0/1/2) + Gaussian noise + a few
  isolated positive spikes (the outliers that set α = max)."""
  rng = np.random.default_rng(seed)
  m = np.zeros((32, 32, 2), np.float32)
  m[4:20, 6:26, 0] = 1.0
  m[16:30, 12:30, 0] += 1.0
  m[:, 16:, 1] = 2.0
  m[8:24, 8:24, 1] -= 1.0
  m += noise * rng.standard_normal(m.shape).astype(np.float32)
  rows, cols = rng.integers(0, 32, (2, spikes))
  m[rows, cols, rng.integers(0, 2, spikes)] += spike
  return m


def test_tv_steps_reduce_quantization_error_on_piecewise_constant_map():
  """Measured (noise 0.3, seeds 0-5): MSE ratio 1 step / 0 steps 0.82-0.94,
  3 steps / 1 step 0.67-0.78; asserted on seed 0 (0.87, 0.67)."""
  result = fig2_tv.tv_quantization_effect(piecewise_map(), 0.1, (0, 1, 3), 4,
                                          return_maps=True)
  assert {"gamma_sq", "gamma", "eps", "bits", "relu", "alpha_mode", "shape",
          "rows", "maps"} <= set(result)
  assert result["alpha_mode"] == "max" and result["bits"] == 4
  np.testing.assert_allclose(result["gamma"], np.sqrt(0.1))
  rows = result["rows"]
  assert [r["steps"] for r in rows] == [0, 1, 3]
  for r in rows:
    assert ROW_KEYS <= set(r), set(r) ^ ROW_KEYS
    assert all(np.isfinite(r[k]) for k in ROW_KEYS)
    assert r["alpha"] == pytest.approx(r["max"])  # alpha = max of each map
    assert r["min"] >= 0.0  # ReLU after the steps
    assert r["relative_mse"] == pytest.approx(r["mse"] / r["mean_square"])
    assert 1 <= r["unique_codes"] <= 16
  mse = [r["mse"] for r in rows]
  assert mse[1] < 0.95 * mse[0] and mse[2] < 0.85 * mse[1], mse
  assert rows[0]["max"] > rows[1]["max"] > rows[2]["max"]  # outliers shrink
  assert rows[0]["total_variation"] > rows[2]["total_variation"]
  assert set(result["maps"]) == {0, 1, 3}
  assert result["maps"][3].shape == (32, 32, 2)
  np.testing.assert_allclose(result["maps"][0],
                             np.maximum(piecewise_map(), 0.0))


def test_fixed_alpha_and_nhwc_input():
  m = piecewise_map()[None]
  result = fig2_tv.tv_quantization_effect(m, 0.1, [3, 0], 4, alpha=2.5)
  assert result["alpha_mode"] == "fixed" and result["shape"] == [1, 32, 32, 2]
  assert [r["steps"] for r in result["rows"]] == [0, 3]
  assert all(r["alpha"] == 2.5 for r in result["rows"])
  assert result["rows"][0]["clipped_fraction"] > 0


def test_dead_relu_map_has_zero_error():
  """A map with nothing above 0 (a dead ReLU channel) quantizes exactly."""
  result = fig2_tv.tv_quantization_effect(-np.ones((8, 8, 1)), 0.1, (0, 1), 4)
  for r in result["rows"]:
    assert r["mse"] == 0.0 and r["unique_codes"] == 1 and r["max"] == 0.0
  summary = fig2_tv.per_image_summary(
      np.stack([-np.ones((8, 8, 1)), piecewise_map()[:8, :8, :1]]), 0.1,
      (1,), 4)
  assert summary["num_images"] == 2
  assert [r["steps"] for r in summary["rows"]] == [0, 1]
  assert summary["rows"][0]["median_mse_ratio"] == 1.0  # the live map only


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_map=np.ones((4, 4))), "feature_map"),
    (dict(gamma_sq=0.0), "gamma_sq"),
    (dict(bits=1), "bits"),
    (dict(bits=20), "bits"),
    (dict(steps=[-1]), "steps"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(feature_map=piecewise_map(), gamma_sq=0.1, steps=(0, 1), bits=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fig2_tv.tv_quantization_effect(**args)


# ----------------------------------------------------- the program, tiny ---

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fig2_run")
  data = tiny_dataset()
  classify.train_and_evaluate(tiny_config(model="resnet8"), str(workdir),
                              dataset=data, verbose=False)
  return workdir, data


def test_program_end_to_end(tiny_run, tmp_path):
  workdir, data = tiny_run
  out = tmp_path / "fig2"
  result = fig2_tv.run(str(workdir), str(out), image_index=3, layer=1,
                       steps=(1, 3), bits=4, num_images=5, dataset=data,
                       verbose=False)
  for name in ("fig2.json", "fig2.md", "fig2.png"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  saved = json.loads((out / "fig2.json").read_text())
  assert saved["layer"] == 1 and saved["num_layers"] == 3
  assert saved["feature_map_shape"] == [16, 16, 16]
  assert 0 <= saved["channel"] < 16
  assert saved["run"]["finished"] and saved["run"]["which"] == "best"
  for key in ("whole_map_alpha_max", "channel_alpha_max",
              "whole_map_alpha_trained"):
    rows = saved[key]["rows"]
    assert [r["steps"] for r in rows] == [0, 1, 3], key
    assert all(np.isfinite(r[k]) for r in rows for k in ROW_KEYS), key
  # The next quantizer of block 1 is block 2's input quantizer.
  params = classify.load_source_variables(str(workdir), "best")["params"]
  assert saved["trained_alpha"]["param"] == "stage2_block1/aq_in/alpha"
  assert saved["trained_alpha"]["alpha"] == pytest.approx(
      float(params["stage2_block1"]["aq_in"]["alpha"]))
  assert result["channel"] == saved["channel"]
  summary = saved["summary"]
  assert summary["alpha_max"]["num_images"] == 5
  for key in ("alpha_max", "alpha_trained"):
    rows = summary[key]["rows"]
    assert [r["steps"] for r in rows] == [0, 1, 3]
    assert rows[0]["median_mse_ratio"] == 1.0
    assert all(0 <= r["improved_fraction"] <= 1 for r in rows)
  text = (out / "fig2.md").read_text()
  assert "| TV steps |" in text and "relative MSE" in text
  assert "Test images 0..4" in text
  # The last block feeds the float classifier: no trained alpha.  Its
  # pre-activation (1x1 projection shortcut), an explicit channel, the final
  # model, no summary.
  last = fig2_tv.run(str(workdir), str(tmp_path / "last"), layer=3,
                     channel="5", which="final", map_kind="preact",
                     num_images=0, dataset=data, verbose=False)
  assert last["trained_alpha"] is None and last["channel"] == 5
  assert last["whole_map_alpha_trained"] is None and last["summary"] is None
  assert last["map"] == "preact" and last["feature_map_shape"] == [4, 4, 64]
  assert all(np.isfinite(r["mse"]) for r in last["whole_map_alpha_max"]["rows"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=0), r"valid range \[1, 3\]"),
    (dict(layer=4), r"valid range \[1, 3\]"),
    (dict(image_index=24), r"valid range \[0, 23\]"),
    (dict(channel=16), r"valid range \[0, 15\]"),
    (dict(which="last"), "best' or 'final"),
    (dict(map_kind="input"), "map must be one of"),
    (dict(num_images=-1), "num_images"),
    (dict(gamma_sq=-0.1), "gamma_sq"),
])
def test_program_rejects_out_of_range(tiny_run, tmp_path, kwargs, match):
  workdir, data = tiny_run
  with pytest.raises(ValueError, match=match):
    fig2_tv.run(str(workdir), str(tmp_path), dataset=data, verbose=False,
                **{"num_images": 0, **kwargs})


def test_program_needs_checkpoints(tmp_path):
  (tmp_path / "config.json").write_text(tiny_config().to_json())
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    fig2_tv.run(str(tmp_path), str(tmp_path / "out"), dataset=tiny_dataset(),
                verbose=False)
  with pytest.raises(FileNotFoundError, match="config.json"):
    fig2_tv.run(str(tmp_path / "missing"), str(tmp_path / "out"),
                dataset=tiny_dataset(), verbose=False)
