"""Consistency report of finished runs (Tables 4/5 and Fig. 3 of the paper).

    python -m train.consistency_report --workdirs=runs/resnet56_4w4a,runs/stable_resnet56_4w4a \
        --output=report_dir [--max_examples=0]

For every run: the same weights evaluated with b-bit and with clip-only
activations (accuracy of both) and the per-layer MSE between the two runs'
hidden maps; each run's ``consistency.json`` / ``results.json`` are updated,
and ``<output>/layerwise_mse.png`` puts all the runs on one plot (standard vs
stable, like Fig. 3) beside ``<output>/consistency.md``.
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


def report(workdirs, output: str, max_examples: int = 0,
           which: str = "best") -> str:
  validate.integer_at_least(max_examples, "--max_examples", 0)
  for workdir in workdirs:  # every run checked before anything is written
    classify.load_run_config(pathlib.Path(workdir))
  output_dir = pathlib.Path(output)
  output_dir.mkdir(parents=True, exist_ok=True)
  curves, rows = {}, []
  for workdir in workdirs:
    stats = classify.consistency_report(workdir, max_examples, which=which)
    label = pathlib.Path(workdir).resolve().parent.name \
        if pathlib.Path(workdir).name.startswith("seed") else \
        pathlib.Path(workdir).name
    curves[label] = stats["normalized_mse"]
    rows.append([label, stats["examples"],
                 f"{100 * stats['test_acc_bits']:.2f}",
                 f"{100 * stats['test_acc_clip_only']:.2f}",
                 f"{stats['overall_mse']:.4g}",
                 f"{stats['overall_normalized_mse']:.4g}",
                 f"{stats['normalized_mse'][-1]:.4g}"])
  text = ("Same weights, b-bit vs clip-only activations: test accuracy of "
          "both, MSE between every block's output (mean over blocks), the "
          "normalised MSE (per block, by the clip-only mean square) and its "
          "value at the last block.\n\n" + common.markdown_table(
              ["run", "test images", "acc b-bit %", "acc clip-only %",
               "act MSE", "normalised MSE", "normalised MSE, last block"],
              rows))
  common.write_text(output_dir / "consistency.md", text)
  consistency.plot_layerwise_mse(curves, str(output_dir / "layerwise_mse.png"),
                                 title="b-bit vs clip-only activations")
  print(text)
  return text


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs or not FLAGS.output:
    raise ValueError("--workdirs and --output are required")
  report(FLAGS.workdirs, FLAGS.output, FLAGS.max_examples, FLAGS.which)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
