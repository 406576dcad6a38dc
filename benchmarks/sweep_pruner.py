"""Wall time of a Cora sweep with and without Optuna's MedianPruner.

    python benchmarks/sweep_pruner.py --trials 12 --epochs 30 --depth 8 \
        --output results/benchmarks/sweep_pruner.md

Both sweeps run the same `train.sweep.run_sweep` on real Cora, in fresh
workdirs, with the same sampler and seed.  With ``--sampler random`` (the
default) the k-th trial proposed is the same in both sweeps (the sampler is
seeded by the sweep seed and the number of finished trials, and random draws
ignore the finished values), so the pruned sweep trains a subset of the
unpruned one's epochs: any difference in the best validation accuracy is a
winner that the pruner stopped.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from configs import pde_gcn as gcn_configs  # pylint: disable=wrong-import-position
from train import common  # pylint: disable=wrong-import-position
from train import sweep  # pylint: disable=wrong-import-position


def run(args, pruner: str, workdir: pathlib.Path):
  config = gcn_configs.get_config(args.config)
  config.num_epochs = args.epochs
  config.patience = 0
  config.model.depth = args.depth
  t0, c0 = time.perf_counter(), time.process_time()
  best = sweep.run_sweep(config, str(workdir), trials=args.trials,
                         space=args.space, sweep_seed=args.sweep_seed,
                         sampler=args.sampler, pruner=pruner,
                         pruner_startup_trials=args.startup_trials,
                         pruner_warmup_epochs=args.warmup_epochs,
                         verbose=False)
  wall = time.perf_counter() - t0
  cpu = time.process_time() - c0
  study = sweep.load_study(workdir)
  epochs = sum(len(t.intermediate_values) for t in study.trials)
  pruned = sum(t.state.name == "PRUNED" for t in study.trials)
  return {"pruner": pruner, "wall": wall, "cpu": cpu, "epochs": epochs,
          "pruned": pruned,
          "best_val": best["val_acc"], "best_test": best["test_acc"],
          "best_trial": best["trial"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cora,sym,fp")
  p.add_argument("--space", default="gcn_float")
  p.add_argument("--trials", type=int, default=12)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--sampler", default="random", choices=sweep.SAMPLERS)
  p.add_argument("--sweep_seed", type=int, default=0)
  p.add_argument("--startup_trials", type=int, default=4)
  p.add_argument("--warmup_epochs", type=int, default=5)
  p.add_argument("--pruners", default="none,median",
                 help="order of the runs (the first is the reference)")
  p.add_argument("--output", default="")
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for pruner in args.pruners.split(","):
      rows.append(run(args, pruner, pathlib.Path(tmp) / pruner))
      print(rows[-1], flush=True)
  table = common.markdown_table(
      ["pruner", "wall s", "CPU s (all threads)", "epochs trained", "trials pruned",
       "best val acc", "its test acc", "best trial"],
      [[r["pruner"], f"{r['wall']:.1f}", f"{r['cpu']:.1f}", r["epochs"], r["pruned"],
        f"{100 * r['best_val']:.2f}", f"{100 * r['best_test']:.2f}",
        r["best_trial"]] for r in rows])
  by_name = {r["pruner"]: r for r in rows}
  saving = 1 - by_name["median"]["wall"] / by_name["none"]["wall"]
  cpu_saving = 1 - by_name["median"]["cpu"] / by_name["none"]["cpu"]
  text = (f"Cora sweep ({args.config}, depth {args.depth}, {args.epochs} "
          f"epochs, no early stopping), {args.trials} trials, "
          f"{args.sampler} sampler (sweep seed {args.sweep_seed}), "
          f"'{args.space}' space; MedianPruner after {args.startup_trials} "
          f"trials and {args.warmup_epochs} warm-up epochs.\n\n{table}\n"
          f"Saved by the pruner: {100 * saving:.0f}% of the wall time, "
          f"{100 * cpu_saving:.0f}% of the CPU time (the machine's 2 cores "
          "are shared, so wall time varies with the other load).\n")
  print(text)
  if args.output:
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() + "\n" if out.exists() else ""
    out.write_text(f"{previous}Command: `python {' '.join(sys.argv)}`\n\n"
                   f"{text}")


if __name__ == "__main__":
  main()
