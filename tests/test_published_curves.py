"""The authors' published per-layer curves: reading them, their RMSE
definition, and the Fig. 3 overlay."""

import numpy as np
import pytest

from pdeq_jax import consistency
from train import consistency_report


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_reads_the_published_columns_exactly(tmp_path):
  path = _write(tmp_path / "curves.csv",
                "unstable,stable,layer\r\n0.25,0.125,1\r\n0.5,0.0625,2\r\n\n"
                "# 1.5,0.75,3")
  table = consistency.read_published_layerwise(path)
  np.testing.assert_array_equal(table["unstable"], [0.25, 0.5, 1.5])
  np.testing.assert_array_equal(table["stable"], [0.125, 0.0625, 0.75])
  np.testing.assert_array_equal(table["layer"], [1, 2, 3])
  assert table["commented"].tolist() == [False, False, True]


@pytest.mark.parametrize("text,match", [
    ("stable,unstable,layer\n1,2,1\n", "header must be unstable,stable,layer"),
    ("unstable,stable,layer\n", "no data rows"),
    ("unstable,stable,layer\n# 1,2,1\n", "no data rows"),
    ("unstable,stable,layer\n1,2\n", "needs 3 values"),
    ("unstable,stable,layer\n0.1,x,1\n", "not a number"),
    ("", "an empty file"),
])
def test_malformed_published_files_are_named(tmp_path, text, match):
  path = _write(tmp_path / "bad.csv", text)
  with pytest.raises(ValueError, match=match) as err:
    consistency.read_published_layerwise(path)
  assert "bad.csv" in str(err.value)


def test_missing_published_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.csv"):
    consistency.read_published_layerwise(str(tmp_path / "nowhere.csv"))


def test_rmse_is_the_published_definition():
  # The authors' definition, written out: sqrt(sum ||a - a_q||^2 / numel).
  rng = np.random.default_rng(0)
  quantized = [rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 5))]
  reference = [rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 5))]
  expected = [np.sqrt(np.sum((q - r) ** 2) / q.size)
              for q, r in zip(quantized, reference)]
  stats = consistency.activation_mse(quantized, reference)
  np.testing.assert_allclose(consistency.rmse(stats["mse"]), expected,
                             rtol=1e-6)
  assert consistency.rmse([0.25, 0.0]).tolist() == [0.5, 0.0]
  with pytest.raises(ValueError, match="negative"):
    consistency.rmse([-1.0])


def test_relative_depth_and_overlay_plot(tmp_path):
  assert consistency.relative_depth(4).tolist() == [0.25, 0.5, 0.75, 1.0]
  runs = {"ResNet-20": {"mse": [0.01, 0.04, 0.09],
                        "normalized_mse": [0.1, 0.2, 0.3]}}
  published = {"ResNet-56 (authors, published)": {
      "rmse": np.linspace(0.09, 0.2, 26), "layer": np.arange(1, 27),
      "num_layers": 27}}
  path = tmp_path / "fig3.png"
  consistency.plot_against_published(runs, published, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_checks_the_published_file_before_writing(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    consistency_report.report([], str(out),
                              published_csv=str(tmp_path / "missing.csv"))
  with pytest.raises(ValueError, match="two names"):
    consistency_report.report(
        [], str(out), published_csv=_write(
            tmp_path / "ok.csv", "unstable,stable,layer\n1,1,1\n"),
        published_labels=("only one",))
  with pytest.raises(ValueError, match="--labels has 1 names for 2"):
    consistency_report.report(["a", "b"], str(out), labels=["only one"])
  with pytest.raises(ValueError, match="names must differ"):
    consistency_report.report(["x/seed0", "x/seed1"], str(out))
  assert not out.exists()


def test_authors_compare_report_orders_blocks_and_gives_rmse():
  import argparse  # pylint: disable=import-outside-toplevel
  from benchmarks import authors_compare  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(
      max_train=5000, val_fraction=0.1, num_epochs=10, precision="4w4a",
      start_bits=8, epochs_per_step=1, consistency_examples=0, seeds=2,
      models=["resnet20", "stable_resnet20"])

  def run(acc, mse):
    return {"test_acc": acc, "clip_only_acc": acc, "mse": mse,
            "normalized_mse": [m / 10 for m in mse], "wall_seconds": 1.0}
  runs = {("resnet20", "pdeq-jax"): [run(0.5, [0.04, 0.09]),
                                     run(0.6, [0.04, 0.09])],
          ("stable_resnet20", "pdeq-jax"): [run(0.4, [0.01, 0.16]),
                                            run(0.4, [0.01, 0.16])]}
  text = authors_compare.report(runs, args)
  # accuracy mean ± sample std over the two seeds; mean block RMSE
  # (0.2 + 0.3) / 2 and (0.1 + 0.4) / 2.
  assert "| resnet20 | pdeq-jax | 55.00 ± 7.07 |" in text
  assert "| 0.0650 ± 0.0000 | 0.2500 ± 0.0000 |" in text
  assert "- pdeq-jax, mse: 1/2 blocks (<>)" in text
