"""Fixed-point post-training quantization of a finished float run.

    python -m train.ptq --workdir=<finished float run> --budget=1.0 \
        [--search=sequential|independent|uniform8] [--val_examples=2000]

Loads the run's ``config.json`` and its best model, calibrates every
activation's peak on ``--calib_examples`` training images (never the test
set), searches per-tensor fixed-point formats (:mod:`pdeq_jax.ptq`) on a
class-balanced ``--val_examples`` subset of the validation split (the
accuracy drop stays within ``--budget`` % points for the sequential search)
and reports the test accuracy beside it.  Writes into ``--outdir`` (default
``<workdir>/ptq/<search>``): ``ptq.md`` (per-layer formats, accuracy,
memory and multiplication cost against all-8-bit), ``formats.json`` and
``bits.png`` (bits per layer).  ``--biases``: the conv/dense biases get
their own formats too (as in the paper; counted in the memory).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Dict, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax import ptq
from train import classify
from train import cli
from train import common

FLOAT_BITS = 32
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", None, "Workdir of a finished float run.",
                      flag_values=flag_values)
  flags.DEFINE_float("budget", 1.0, "Allowed validation accuracy drop, in % "
                     "points (> 0).", flag_values=flag_values)
  flags.DEFINE_string("search", "sequential", "sequential | independent | "
                      "uniform8.", flag_values=flag_values)
  flags.DEFINE_string("outdir", "", "Output directory (default "
                      "<workdir>/ptq/<search>).", flag_values=flag_values)
  flags.DEFINE_integer("val_examples", 2000, "Class-balanced validation "
                       "subset the search selects on (0: all).",
                       flag_values=flag_values)
  flags.DEFINE_integer("calib_examples", 512, "Training images that "
                       "calibrate the activation peaks.",
                       flag_values=flag_values)
  flags.DEFINE_integer("test_examples", 0, "Test images (0: all).",
                       flag_values=flag_values)
  flags.DEFINE_integer("min_bits", ptq.MIN_BITS, "Smallest bit width tried.",
                       flag_values=flag_values)
  flags.DEFINE_integer("max_bits", ptq.MAX_BITS, "Largest bit width tried.",
                       flag_values=flag_values)
  flags.DEFINE_string("which", "best", "best | final model of the run.",
                      flag_values=flag_values)
  flags.DEFINE_bool("biases", False, "Also give every conv/dense bias its "
                    "own format (as the paper; image classification only).",
                    flag_values=flag_values)


def check_float_run(config, workdir: pathlib.Path) -> None:
  """PTQ starts from a float network: clear errors otherwise."""
  quant = config.get("quant", {})
  w, a = quant.get("weight_bits", None), quant.get("act_bits", None)
  if (w, a) != (FLOAT_BITS, FLOAT_BITS):
    raise ValueError(
        f"{workdir} is not a float run (config.quant.weight_bits = {w}, "
        f"act_bits = {a}): PTQ needs a run trained in float (precision 'fp', "
        f"both {FLOAT_BITS})")


def image_problem(config, variables, *, val_examples: int,
                  calib_examples: int, dataset: Any = None,
                  biases: bool = False):
  """``(program, problem, test_fn)`` for an image-classification run
  (``biases``: the conv/dense biases get formats too)."""
  from pdeq_jax.data import images as image_data  # pylint: disable=import-outside-toplevel
  if float(config.data.get("val_fraction", 0.0)) <= 0:
    raise ValueError(
        "the run has no validation split (config.data.val_fraction = "
        f"{config.data.get('val_fraction')}): PTQ selects formats on "
        "validation, never on test; retrain with val_fraction > 0")
  source = classify.make_source(config, dataset)
  if not isinstance(source, classify.ArraySource):
    raise ValueError(f"dataset {config.data.name!r} is streamed: PTQ needs an "
                     "in-memory dataset")
  data = source.dataset
  if len(data.val_labels) == 0:
    raise ValueError("the run's validation split is empty: PTQ selects "
                     "formats on validation, never on test")
  batch = int(config.eval_batch_size)
  model = classify.create_model(config, source.num_classes)
  n_calib = min(int(calib_examples), len(data.train_labels))
  if n_calib < 1:
    raise ValueError(f"--calib_examples must be >= 1, got {calib_examples}")
  idx = np.sort(image_data.balanced_subset(data.train_labels, n_calib, 0))
  calib = [b[0] for b in image_data.eval_batches(
      data.train_images[idx], data.train_labels[idx], min(batch, n_calib),
      mean=data.mean, std=data.std)]
  program = ptq.FlaxProgram(model, variables, calib[0], biases=biases,
                            train=False)
  program.calibrate(variables, calib)
  # small batches: a rejected candidate stops after few of them
  val = list(source.eval_batches("val", min(batch, 250), val_examples))
  evaluate = program.accuracy_fn(variables, val)
  problem = ptq.Problem(program.sites, program.products, evaluate,
                        early_exit=True)

  def test_fn(bw, f, max_examples=0):
    fn = program.accuracy_fn(variables,
                             source.eval_batches("test", batch, max_examples))
    return fn(bw, f)
  return program, problem, test_fn


TASKS = ("image_classification", "node_classification")


def load_gcn_params(workdir: pathlib.Path, which: str = "best"):
  """The selected (``best``) or last parameters of a node-classification run."""
  ckpt = common.Checkpointer(workdir / "checkpoints")
  tree = ckpt.restore_raw()
  ckpt.close()
  if which == "best" and int(np.asarray(tree["best"]["epoch"])) >= 0:
    params = tree["best"]["params"]
  else:
    params = tree["params"]
  return jax.tree_util.tree_map(jnp.asarray, params)


def gcn_problem(config, params):
  """``(program, problem, test_fn)`` for a PDE-GCN node-classification run:
  formats selected on the validation nodes, calibrated on the training
  nodes, test nodes reported."""
  from pdeq_jax import models  # pylint: disable=import-outside-toplevel
  from train import node_classify  # pylint: disable=import-outside-toplevel
  task = node_classify.load_task(config)
  if int(task.val_idx.shape[0]) == 0:
    raise ValueError(f"{config.data.name}: the validation split is empty: "
                     "PTQ selects formats on validation, never on test")
  options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  options["grid"] = "fixed_point"
  model = models.create(config.model.name, task.num_classes,
                        quantize_activations=True, quantize_weights=False,
                        **options)
  program = ptq.GCNProgram(model, params, task.features, task.graph,
                           task.num_classes)
  program.calibrate(params, np.asarray(task.train_idx))
  evaluate = program.accuracy_fn(params, task.labels, task.val_idx)
  problem = ptq.Problem(program.sites, program.products, evaluate)
  test = program.accuracy_fn(params, task.labels, task.test_idx)
  return program, problem, lambda bw, f, max_examples=0: test(bw, f)


def run_ptq(workdir: str, *, budget: float = 1.0, search: str = "sequential",
            outdir: str = "", val_examples: int = 2000,
            calib_examples: int = 512, test_examples: int = 0,
            min_bits: int = ptq.MIN_BITS, max_bits: int = ptq.MAX_BITS,
            which: str = "best", dataset: Any = None,
            biases: bool = False) -> Dict[str, Any]:
  """The whole program (tests call it in-process)."""
  ptq.check_budget(budget)
  if search not in ptq.SEARCHES:
    raise ValueError(f"--search must be one of {', '.join(ptq.SEARCHES)}, "
                     f"got {search!r}")
  if which not in ("best", "final"):
    raise ValueError(f"--which must be 'best' or 'final', got {which!r}")
  if val_examples < 0 or test_examples < 0:
    raise ValueError("--val_examples and --test_examples must be >= 0")
  path = pathlib.Path(workdir)
  config = classify.load_run_config(path)
  check_float_run(config, path)
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"{path}: task {task!r} is not supported by train.ptq "
                     f"(allowed: {', '.join(map(repr, TASKS))})")
  start = time.perf_counter()
  if task == "image_classification":
    variables = jax.tree_util.tree_map(
        jnp.asarray, classify.load_source_variables(str(path), which))
    _, problem, test_fn = image_problem(
        config, variables, val_examples=val_examples,
        calib_examples=calib_examples, dataset=dataset, biases=biases)
  else:
    if biases:
      raise ValueError("--biases applies to image classification (conv/dense"
                       f" biases); {path} is a {task} run")
    _, problem, test_fn = gcn_problem(config, load_gcn_params(path, which))
    val_examples, calib_examples = "all validation-node", "all training-node"
  setup_s = time.perf_counter() - start
  kwargs = {} if search == "uniform8" else {"min_bits": min_bits,
                                            "max_bits": max_bits}
  result = ptq.search(problem, search, budget, **kwargs)
  row = ptq.summary(problem, result)
  zeros = np.zeros(len(problem.sites), np.int32)
  row["float_test_acc"] = test_fn(zeros, zeros, test_examples)
  row["test_acc"] = test_fn(result.bw, result.f, test_examples)
  row["test_drop"] = row["float_test_acc"] - row["test_acc"]
  row.update(budget=float(budget), setup_seconds=setup_s,
             val_examples=val_examples, calib_examples=calib_examples,
             workdir=str(path), model=config.model.name,
             dataset=config.data.name, biases=bool(biases))
  out = pathlib.Path(outdir) if outdir else path / "ptq" / search
  out.mkdir(parents=True, exist_ok=True)
  formats = ptq.formats_dict(problem.sites, result.bw, result.f)
  common.write_json(out / "formats.json", {"summary": row,
                                           "formats": formats,
                                           "trace": result.trace})
  common.write_text(out / "ptq.md", report(row, formats, problem))
  plot_bits(formats, out / "bits.png", f"{row['model']} {search}")
  print(summary_line(row), flush=True)
  return row


def summary_line(r: Dict[str, Any]) -> str:
  return (f"{r['model']} {r['search']} budget {r['budget']}: val "
          f"{r['val_acc']:.2f}% (float {r['float_val_acc']:.2f}, drop "
          f"{r['val_drop']:.2f}), test {r['test_acc']:.2f}% (float "
          f"{r['float_test_acc']:.2f}), memory {r['memory_vs_8bit']:+.1%}, "
          f"mult cost {r['mult_vs_8bit']:+.1%} vs 8-bit, search "
          f"{r['search_seconds']:.0f} s ({r['evaluations']} evaluations)")


def report(r: Dict[str, Any], formats, problem: ptq.Problem) -> str:
  macs = {}
  for p in problem.products:
    macs[p.weight] = macs.get(p.weight, 0) + p.macs
  text = (f"# PTQ of {r['model']} on {r['dataset']}: {r['search']} search, "
          f"budget {r['budget']} % points\n\n"
          f"Run: `{r['workdir']}`. Formats selected on {r['val_examples']} "
          f"validation examples, activations calibrated on "
          f"{r['calib_examples']} training examples; test reported beside."
          "\n\n")
  rows = [
      ["accuracy (val, %)", f"{r['float_val_acc']:.2f}",
       f"{r['val_acc']:.2f}", f"{-r['val_drop']:+.2f}"],
      ["accuracy (test, %)", f"{r['float_test_acc']:.2f}",
       f"{r['test_acc']:.2f}", f"{-r['test_drop']:+.2f}"],
  ]
  text += common.markdown_table(["", "float", "PTQ", "change"], rows)
  text += "\n" + common.markdown_table(
      ["cost", "PTQ", "all 8-bit", "vs 8-bit"],
      [["weight memory (KiB; with biases if quantized)",
        f"{r['memory_kib']:.2f}",
        f"{r['memory_kib_8bit']:.2f}", f"{r['memory_vs_8bit']:+.1%}"],
       ["multiplication cost (BW_w·BW_a·MACs per example; GCN: graph)",
        f"{r['mult_cost']:.4g}", f"{r['mult_cost_8bit']:.4g}",
        f"{r['mult_vs_8bit']:+.1%}"]])
  text += (f"\nSearch: {r['evaluations']} evaluations in "
           f"{r['search_seconds']:.1f} s (setup {r['setup_seconds']:.1f} s)."
           "\n\n## Per-tensor formats\n\n")
  text += common.markdown_table(
      ["site", "kind", "elements", "max abs", "BW", "F", "MACs"],
      [[f["site"], f["kind"], f["size"], f"{f['max_abs']:.4g}",
        f["bw"] or "float", f["f"] if f["bw"] else "-",
        macs.get(f["site"], "")] for f in formats])
  return text


def plot_bits(formats, path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(formats)), 4))
  bits = [f["bw"] or ptq.FLOAT_COST_BITS for f in formats]
  colors = [{"weight": "tab:blue", "bias": "tab:green"}.get(f["kind"],
                                                            "tab:orange")
            for f in formats]
  ax.bar(range(len(formats)), bits, color=colors)
  ax.set_xticks(range(len(formats)))
  ax.set_xticklabels([f["site"] for f in formats], rotation=90, fontsize=6)
  ax.set_ylabel("bits (blue: weights, green: biases, orange: activations)",
                fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise ValueError("--workdir is required (the workdir of a finished float "
                     "run)")
  run_ptq(FLAGS.workdir, budget=FLAGS.budget, search=FLAGS.search,
          outdir=FLAGS.outdir, val_examples=FLAGS.val_examples,
          calib_examples=FLAGS.calib_examples,
          test_examples=FLAGS.test_examples, min_bits=FLAGS.min_bits,
          max_bits=FLAGS.max_bits, which=FLAGS.which, biases=FLAGS.biases)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
