"""Reproduce a table of the paper: every row available offline, several seeds.

    python -m train.reproduce table7 --datasets=cora --seeds=5 \
        --workdir=workdirs/table7 [--num_epochs=400] [--forms=sym,nonsym]
    python -m train.reproduce cnn --pairs=resnet56:stable_resnet56 \
        --dataset=cifar10 --precisions=fp,4w8a,4w4a --workdir=workdirs/table4
    python -m train.reproduce cnn --pairs=resnet20:stable_resnet20 \
        --dataset=cifar10_jpeg --precisions=4w4a --cpu --workdir=workdirs/cpu

``cnn`` runs standard / stable network pairs (Tables 4 and 5) with
``configs/cifar.py`` and writes ``cnn_table.md`` (accuracy, activation MSE,
paper values where the paper has them) and
``layerwise_mse_<pair>_<precision>.png`` (Fig. 3: both nets on one plot).

Writes ``<workdir>/table7.md`` (paper value | ours mean ± sample std, accuracy and
activation MSE, wall time per run), ``table7.json`` with every run, and
``layerwise_mse_<dataset>_<precision>.png`` (symmetric vs non-symmetric per
layer, like the paper's Fig. 3).  Runs are resumable: finished runs are read
back from their ``results.json``.
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, List, Optional

from absl import flags
import numpy as np

from configs import cifar as cifar_configs
from configs import pde_gcn as gcn_configs
from pdeq_jax import consistency
from train import classify
from train import cli
from train import common
from train import node_classify
from train import sweep
from train import validate

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Command-line flags (defined only when run as a program)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_list("datasets", ["cora"], "Datasets to run.", **fv)
  flags.DEFINE_list("forms", ["nonsym", "sym"], "sym and/or nonsym.", **fv)
  flags.DEFINE_list("precisions", ["fp", "4w8a", "4w4a"], "Precision rows.",
                    **fv)
  flags.DEFINE_integer("seeds", 5, "Seeds per row.", **fv)
  flags.DEFINE_string("workdir", "workdirs/table7", "Output dir.", **fv)
  flags.DEFINE_integer("num_epochs", None, "Override the configs' epochs.",
                       **fv)
  flags.DEFINE_integer("patience", None, "Override early-stopping patience.",
                       **fv)
  flags.DEFINE_bool("report_only", False,
                    "Only tabulate finished runs; train nothing.", **fv)
  flags.DEFINE_bool("recompute_consistency", False,
                    "table7: re-evaluate finished quantized runs trained "
                    "before the rounding-noise ratio and kernel statistics "
                    "existed, from their checkpoints.", **fv)
  # cnn
  flags.DEFINE_list("pairs", ["resnet56:stable_resnet56"],
                    "standard:stable model pairs (cnn).", **fv)
  flags.DEFINE_string("dataset", "cifar10_jpeg", "Image dataset (cnn).", **fv)
  flags.DEFINE_bool("cpu", False, "CPU-sized configs (cnn).", **fv)
  flags.DEFINE_integer("max_train", None, "Training subset size (cnn).", **fv)


# Table 7 of the paper: (dataset, symmetric, precision) -> (accuracy %, MSE)
PAPER_TABLE7 = {
    ("cora", False, "fp"): (82.7, None), ("cora", True, "fp"): (84.3, None),
    ("cora", False, "4w8a"): (82.2, None), ("cora", True, "4w8a"): (84.0, None),
    ("cora", False, "4w4a"): (75.7, 6.11), ("cora", True, "4w4a"): (79.4, 2.03),
    ("citeseer", False, "fp"): (73.9, None),
    ("citeseer", True, "fp"): (75.6, None),
    ("citeseer", False, "4w8a"): (72.6, None),
    ("citeseer", True, "4w8a"): (74.1, None),
    ("citeseer", False, "4w4a"): (71.1, 20.48),
    ("citeseer", True, "4w4a"): (72.2, 12.44),
    ("pubmed", False, "fp"): (79.0, None), ("pubmed", True, "fp"): (80.2, None),
    ("pubmed", False, "4w8a"): (79.3, None),
    ("pubmed", True, "4w8a"): (80.1, None),
    ("pubmed", False, "4w4a"): (75.1, 5.14),
    ("pubmed", True, "4w4a"): (77.6, 2.52),
}


# Table 4 (CIFAR-10): (model, precision) -> (accuracy %, MSE); MSE is given
# for the 4W4A rows.
PAPER_TABLE4 = {
    ("resnet56", "fp"): (93.8, None), ("stable_resnet56", "fp"): (92.1, None),
    ("resnet56", "4w8a"): (93.0, None),
    ("stable_resnet56", "4w8a"): (92.3, None),
    ("resnet56", "4w4a"): (92.6, 0.076),
    ("stable_resnet56", "4w4a"): (91.6, 0.024),
    ("mobilenetv2", "fp"): (94.0, None),
    ("stable_mobilenetv2", "fp"): (93.1, None),
    ("mobilenetv2", "4w8a"): (92.9, None),
    ("stable_mobilenetv2", "4w8a"): (92.2, None),
    ("mobilenetv2", "4w4a"): (92.4, 0.067),
    ("stable_mobilenetv2", "4w4a"): (91.6, 0.034),
}


def _mean_std(values: List[float], scale: float = 1.0, digits: int = 1) -> str:
  """``mean ± sample std`` (ddof = 1); one value has no spread: ``± –``."""
  if not values:
    return "–"
  v = np.asarray(values, np.float64) * scale
  spread = f"{v.std(ddof=1):.{digits}f}" if v.size > 1 else "–"
  return f"{v.mean():.{digits}f} ± {spread}"


def run_table7(datasets, forms, precisions, seeds: int, workdir: str,
               num_epochs=None, patience=None, verbose: bool = True,
               config_overrides: Optional[Dict[str, Any]] = None,
               report_only: bool = False,
               recompute_consistency: bool = False) -> Dict[str, Any]:
  """Runs every (dataset, precision, form) row for ``seeds`` seeds.

  ``config_overrides`` ({"section.key": value}) applies to every run (e.g.
  a smaller model in tests).  ``report_only`` trains nothing: it tabulates
  the runs that have finished.  ``recompute_consistency`` re-evaluates the
  consistency statistics of finished quantized runs that lack the newest ones
  (rounding-noise ratio, kernel statistics), from their checkpoints, without
  training.
  """
  validate.reproduce("table7", datasets=datasets, forms=forms,
                     precisions=precisions, seeds=seeds,
                     num_epochs=num_epochs, patience=patience)
  workdir = pathlib.Path(workdir)
  planned = []  # every config is validated before anything is written
  for dataset in datasets:
    for precision in precisions:
      for form in forms:
        arg = f"{dataset},{form},{precision}"
        for seed in range(seeds):
          config = gcn_configs.get_config(arg)
          config.seed = seed
          if num_epochs is not None:
            config.num_epochs = num_epochs
          if patience is not None:
            config.patience = patience
          if config_overrides:
            config = sweep.apply_overrides(config, config_overrides)
          validate.gcn(config)
          planned.append((dataset, form, precision, seed, config))
  workdir.mkdir(parents=True, exist_ok=True)
  runs = []
  for dataset, form, precision, seed, config in planned:
    run_dir = workdir / f"{dataset}_{form}_{precision}" / f"seed{seed}"
    results = common.run_or_load(node_classify, config, run_dir,
                                 report_only, verbose=False)
    if results is None:
      continue
    if (recompute_consistency and "consistency" in results and
        "kernel_identity_deviation" not in results["consistency"]):
      # results.json keeps common.run_or_load's wall_seconds
      results = node_classify.recompute_consistency(config, str(run_dir))
    results["row"] = (dataset, form == "sym", precision)
    runs.append(results)
    if verbose:
      print(node_classify.summary_line(results), flush=True)
  write_table7(runs, workdir, seeds)
  return {"runs": runs}


def write_table7(runs, workdir: pathlib.Path, seeds: int) -> str:
  rows, grouped = [], {}
  for r in runs:
    grouped.setdefault(tuple(r["row"]), []).append(r)
  for (dataset, symmetric, precision), rs in grouped.items():
    paper_acc, paper_mse = PAPER_TABLE7.get((dataset, symmetric, precision),
                                            (None, None))
    accs = [r["test_acc"] for r in rs]
    mses = [r["act_mse"] for r in rs if r.get("act_mse") is not None]
    nmses = [r["consistency"]["overall_normalized_mse"] for r in rs
             if "consistency" in r]
    ratios = [r["consistency"]["overall_mse_over_rounding_noise"] for r in rs
              if "overall_mse_over_rounding_noise" in r.get("consistency", {})]
    asym = [np.mean(r["consistency"]["kernel_asymmetry"]) for r in rs
            if "kernel_asymmetry" in r.get("consistency", {})]
    rows.append([
        dataset, "sym" if symmetric else "non-sym", precision.upper(),
        "–" if paper_acc is None else f"{paper_acc:.1f}",
        _mean_std(accs, 100.0), _mean_std([r["val_acc"] for r in rs], 100.0),
        "–" if paper_mse is None else f"{paper_mse:.2f}",
        _mean_std(mses, 1e6, 2) if mses else "–",
        _mean_std(nmses, 1e3, 3) if nmses else "–",
        _mean_std(ratios, 1.0, 2) if ratios else "–",
        _mean_std(asym, 100.0, 1) if asym else "–",
        f"{np.mean([r['best_epoch'] for r in rs]):.0f}",
        f"{np.mean([r.get('wall_seconds', float('nan')) for r in rs]):.0f}",
        len(rs)])
  header = ["dataset", "form", "bits", "paper acc", "ours test acc",
            "ours val acc", "paper MSE", "ours act MSE ×1e6",
            "ours normalised MSE ×1e3", "ours MSE / rounding noise",
            "‖K₂−K₁ᵀ‖/‖K₁‖ %",
            "best epoch (mean)",
            "wall s / run", "seeds"]
  text = ("Table 7 (PDE-GCN_D, 32 layers): test accuracy at the epoch of best "
          "validation accuracy, mean ± sample std (ddof = 1) over seeds.  The paper's numbers are"
          " the best *test* accuracy of Optuna sweeps.  Activation MSE: mean "
          "over layers of the mean squared difference between the quantized "
          "layer inputs of the b-bit and the clip-only run of the same weights "
          "(as the authors' code compares them); normalised: each layer's MSE "
          "divided by the mean square of its clip-only states (Fig. 3), "
          "averaged over layers; MSE / rounding noise: each layer's MSE "
          "divided by step²/12 of its state quantizer (1 = that layer's own "
          "rounding only, larger = errors carried from earlier layers; "
          "independent of the learned alpha), averaged over layers; "
          "‖K₂−K₁ᵀ‖/‖K₁‖: how far the trained non-symmetric layers are from "
          "the symmetric form, mean over layers.  The "
          "paper's MSE column is on another scale "
          "(its code prints both a mean and a Frobenius norm).\n\n"
          + common.markdown_table(header, rows))
  common.write_text(workdir / "table7.md", text)
  common.write_json(workdir / "table7.json", runs)
  # Fig. 3-style plots: sym vs non-sym per (dataset, precision), seed 0.
  for (dataset, symmetric, precision), rs in grouped.items():
    if symmetric or "consistency" not in rs[0]:
      continue
    curves = {"non-symmetric": rs[0]["consistency"]["normalized_mse"]}
    partner = grouped.get((dataset, True, precision))
    if partner and "consistency" in partner[0]:
      curves["symmetric"] = partner[0]["consistency"]["normalized_mse"]
    consistency.plot_layerwise_mse(
        curves, str(workdir / f"layerwise_mse_{dataset}_{precision}.png"),
        title=f"PDE-GCN {dataset} {precision.upper()}: b-bit vs clip-only")
  print(text)
  return text


def run_cnn(pairs, dataset: str, precisions, seeds: int, workdir: str, *,
            cpu: bool = False, num_epochs=None, max_train=None,
            config_overrides: Optional[Dict[str, Any]] = None,
            report_only: bool = False, verbose: bool = True) -> Dict[str, Any]:
  """Standard vs stable CNN pairs (Tables 4/5, Fig. 3) for several seeds."""
  validate.reproduce("cnn", pairs=pairs, precisions=precisions, seeds=seeds,
                     num_epochs=num_epochs, dataset=dataset,
                     max_train=max_train)
  workdir = pathlib.Path(workdir)
  planned = []  # every config is validated before anything is written
  for pair in pairs:
    names = pair.split(":")
    for precision in precisions:
      for name in names:
        for seed in range(seeds):
          arg = f"{name},{dataset},{precision}" + (",cpu" if cpu else "")
          config = cifar_configs.get_config(arg)
          config.seed = seed
          if num_epochs is not None:
            config.num_epochs = num_epochs
          if max_train is not None:
            config.data.max_train = max_train
          if config_overrides:
            config = sweep.apply_overrides(config, config_overrides)
          classify.check_config(config)
          planned.append((pair, name, precision, seed, config))
  workdir.mkdir(parents=True, exist_ok=True)
  runs = []
  for pair, name, precision, seed, config in planned:
    run_dir = workdir / f"{name}_{precision}" / f"seed{seed}"
    results = common.run_or_load(classify, config, run_dir, report_only,
                                 verbose=verbose)
    if results is None:
      continue
    results["row"] = (pair, name, precision)
    runs.append(results)
    if verbose:
      print(classify.summary_line(results), flush=True)
  write_cnn_table(runs, workdir)
  return {"runs": runs}


def write_cnn_table(runs, workdir: pathlib.Path) -> str:
  grouped: Dict[tuple, list] = {}
  for r in runs:
    grouped.setdefault(tuple(r["row"]), []).append(r)
  rows = []
  for (pair, name, precision), rs in grouped.items():
    paper_acc, paper_mse = PAPER_TABLE4.get((name, precision), (None, None))
    if rs[0]["dataset"] not in ("cifar10", "cifar10_jpeg"):
      paper_acc = paper_mse = None
    nmse = [r["act_normalized_mse"] for r in rs if "act_normalized_mse" in r]
    mse = [r["act_mse"] for r in rs if "act_mse" in r]
    acc_clip = [r["consistency"]["test_acc_clip_only"] for r in rs
                if "consistency" in r]
    rows.append([
        name, precision.upper(), f"{rs[0]['num_params']:,}", rs[0]["epochs"],
        "–" if paper_acc is None else f"{paper_acc:.1f}",
        _mean_std([r["test_acc"] for r in rs], 100.0, 2),
        _mean_std(acc_clip, 100.0, 2) if acc_clip else "–",
        "–" if paper_mse is None else f"{paper_mse:.3f}",
        _mean_std(mse, 1.0, 4) if mse else "–",
        _mean_std(nmse, 1.0, 4) if nmse else "–",
        f"{np.mean([r.get('wall_seconds', float('nan')) for r in rs]):.0f}",
        len(rs)])
  header = ["model", "bits", "params", "epochs", "paper acc", "ours test acc",
            "ours acc, clip-only act.", "paper MSE", "ours act MSE",
            "ours normalised MSE", "wall s / run", "seeds"]
  text = ("Standard vs stable CNNs: test accuracy of the best-validation model"
          " (mean ± sample std, ddof = 1, over seeds); the same weights with clip-only "
          "activations; activation MSE between the b-bit and clip-only runs "
          "(every block's output, mean over blocks; normalised per block by "
          "the clip-only mean square, Fig. 3).  Paper values: Table 4 "
          "(CIFAR-10, 400 epochs).\n\n" + common.markdown_table(header, rows))
  common.write_text(workdir / "cnn_table.md", text)
  common.write_json(workdir / "cnn_table.json", runs)
  pairs = sorted({(p, prec) for (p, _, prec) in grouped})
  for pair, precision in pairs:
    curves = {}
    for name in pair.split(":"):
      rs = grouped.get((pair, name, precision), [])
      if rs and "consistency" in rs[0]:
        curves[name] = rs[0]["consistency"]["normalized_mse"]
    if curves:
      consistency.plot_layerwise_mse(
          curves, str(workdir / f"layerwise_mse_{pair.replace(':', '_vs_')}_"
                      f"{precision}.png"),
          title=f"{precision.upper()} vs clip-only activations (seed 0)")
  print(text)
  return text


def main(argv):
  common.quiet_absl_logging()
  if len(argv) != 2:
    raise ValueError("usage: python -m train.reproduce table7|cnn [flags]")
  validate.one_of(argv[1], "command", ("table7", "cnn"), "unknown table")
  if argv[1] == "cnn":
    run_cnn(FLAGS.pairs, FLAGS.dataset, FLAGS.precisions, FLAGS.seeds,
            FLAGS.workdir, cpu=FLAGS.cpu, num_epochs=FLAGS.num_epochs,
            max_train=FLAGS.max_train, report_only=FLAGS.report_only)
    return
  run_table7(FLAGS.datasets, FLAGS.forms, FLAGS.precisions, FLAGS.seeds,
             FLAGS.workdir, FLAGS.num_epochs, FLAGS.patience,
             report_only=FLAGS.report_only,
             recompute_consistency=FLAGS.recompute_consistency)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
