"""Consistency report of finished runs (Tables 4/5 and Fig. 3 of the paper).

    python -m train.consistency_report --workdirs=runs/resnet56_4w4a,runs/stable_resnet56_4w4a \
        --output=report_dir [--max_examples=0]

For every run: the same weights evaluated with b-bit and with clip-only
activations (accuracy of both) and the per-layer MSE between the two runs'
hidden maps; each run's ``consistency.json`` / ``results.json`` are updated,
and ``<output>/layerwise_mse.png`` puts all the runs on one plot (standard vs
stable, like Fig. 3) beside ``<output>/consistency.md``.

With ``--published_csv`` (the authors' per-layer file, e.g.
``<checkout>/website/source/resnet56_vs_stablenet56_layerwise_mse_cifar10.csv``)
``<output>/fig3_with_published.png`` also puts the authors' published
ResNet-56 / Stable ResNet-56 curves beside the runs' curves, in the published
definition (per-block RMSE) against relative depth.
"""

from __future__ import annotations

import pathlib

from absl import flags

from pdeq_jax import consistency
from train import classify
from train import cli
from train import common
from train import validate

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_list("workdirs", None, "Finished runs (b-bit activations).",
                    **fv)
  flags.DEFINE_string("output", None, "Directory for the joint table/plot.",
                      **fv)
  flags.DEFINE_integer("max_examples", 0, "Test images (0: all).", **fv)
  flags.DEFINE_enum("which", "best", ["best", "final"], "Model of each run.",
                    **fv)
  flags.DEFINE_string("published_csv", "", "The authors' published per-layer "
                      "CSV (columns unstable,stable,layer) to plot beside the "
                      "runs.", **fv)
  flags.DEFINE_list("published_labels", ["ResNet-56", "Stable ResNet-56"],
                    "Names of the published CSV's unstable and stable "
                    "columns.", **fv)
  flags.DEFINE_list("labels", None, "Names of the runs in the tables and "
                    "plots, one per --workdirs entry (default: the run "
                    "directories' names).", **fv)


def _run_name(workdir: str) -> str:
  """The run directory's name (its parent's for ``.../<run>/seed<k>``)."""
  path = pathlib.Path(workdir)
  return path.resolve().parent.name if path.name.startswith("seed") \
      else path.name


def report(workdirs, output: str, max_examples: int = 0,
           which: str = "best", published_csv: str = "",
           published_labels=("ResNet-56", "Stable ResNet-56"),
           labels=None) -> str:
  validate.integer_at_least(max_examples, "--max_examples", 0)
  if labels is not None and len(labels) != len(workdirs):
    raise ValueError(f"--labels has {len(labels)} names for "
                     f"{len(workdirs)} --workdirs: {list(labels)}")
  if labels is None:
    labels = [_run_name(workdir) for workdir in workdirs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"the runs' names must differ (they label the tables "
                     f"and curves), got {list(labels)}; pass --labels")
  published = {}
  if published_csv:
    if len(published_labels) != 2:
      raise ValueError("--published_labels needs two names (unstable, "
                       f"stable), got {list(published_labels)}")
    table = consistency.read_published_layerwise(published_csv)
    shown = ~table["commented"]  # the published figure's rows
    for column, name in zip(("unstable", "stable"), published_labels):
      published[f"{name} (authors, published)"] = {
          "rmse": table[column][shown], "layer": table["layer"][shown],
          "num_layers": int(table["layer"].max())}
  for workdir in workdirs:  # every run checked before anything is written
    classify.load_run_config(pathlib.Path(workdir))
  output_dir = pathlib.Path(output)
  output_dir.mkdir(parents=True, exist_ok=True)
  curves, runs, rows, block_rows = {}, {}, [], []
  for workdir, label in zip(workdirs, labels):
    stats = classify.consistency_report(workdir, max_examples, which=which)
    curves[label] = stats["normalized_mse"]
    runs[label] = stats
    block_rmse = consistency.rmse(stats["mse"])
    rows.append([label, stats["examples"],
                 f"{100 * stats['test_acc_bits']:.2f}",
                 f"{100 * stats['test_acc_clip_only']:.2f}",
                 f"{stats['overall_mse']:.4g}",
                 f"{float(block_rmse.mean()):.4g}",
                 f"{stats['overall_normalized_mse']:.4g}",
                 f"{stats['normalized_mse'][-1]:.4g}"])
    for block, (m, r, n) in enumerate(zip(stats["mse"], block_rmse,
                                          stats["normalized_mse"]), 1):
      block_rows.append([label, block, f"{float(m):.4g}", f"{float(r):.4g}",
                         f"{float(n):.4g}"])
  text = ("Same weights, b-bit vs clip-only activations: test accuracy of "
          "both, MSE between every block's output (mean over blocks), the "
          "normalised MSE (per block, by the clip-only mean square) and its "
          "value at the last block.  RMSE is the root of each block's MSE, "
          "the definition of the authors' published per-layer curves.\n\n"
          + common.markdown_table(
              ["run", "test images", "acc b-bit %", "acc clip-only %",
               "act MSE", "act RMSE", "normalised MSE",
               "normalised MSE, last block"], rows)
          + "\n\nPer block:\n\n" + common.markdown_table(
              ["run", "block", "MSE", "RMSE", "normalised MSE"], block_rows))
  common.write_text(output_dir / "consistency.md", text)
  consistency.plot_layerwise_mse(curves, str(output_dir / "layerwise_mse.png"),
                                 title="b-bit vs clip-only activations")
  if published:
    consistency.plot_against_published(
        runs, published, str(output_dir / "fig3_with_published.png"))
  print(text)
  return text


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs or not FLAGS.output:
    raise ValueError("--workdirs and --output are required")
  report(FLAGS.workdirs, FLAGS.output, FLAGS.max_examples, FLAGS.which,
         FLAGS.published_csv, FLAGS.published_labels, FLAGS.labels)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
