"""The trainer's PDE-GCN epoch at several git commits, timed side by side.

    python benchmarks/gcn_commits.py --commits HEAD,12b9087 \
        [--config cora,sym,4w4a] [--rounds 4] [--epochs 5]

Each commit is exported with ``git archive`` into a temporary directory (no
worktree, nothing written to the repository) and imported by its own worker
process; the workers build the epoch of ``gcn_throughput.jax_epoch_fn`` (one
training step and one evaluation forward, with that commit's trainer code)
and time ``--epochs`` epochs whenever the driver asks, in rounds alternating
the order (ABC, CBA, ...), so that other jobs on the machine slow all
commits alike.  Printed per commit: median epochs/s, median CPU-seconds per
epoch (user + system of the worker, all threads) and the median of the
per-round speed ratios against the first commit, with the training loss
and validation accuracy after the last round (the commits' results, to see
whether they compute the same thing).  The load average is printed at the
start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import worker_rounds  # noqa: E402  (this directory, as run as a script)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(tree: str, name: str, depth: int) -> None:
  """Runs in the exported tree: answers each line ``n`` with n epochs' times."""
  os.chdir(tree)
  sys.path.insert(0, tree)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import pde_gcn as gcn_configs  # pylint: disable=import-outside-toplevel
  from train import node_classify  # pylint: disable=import-outside-toplevel
  config = gcn_configs.get_config(name)
  if depth:
    config.model.depth = depth
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  tx = node_classify.create_optimizer(config, params)
  train_step = node_classify.make_train_step(model, tx, task)
  eval_step = node_classify.make_eval_step(model, task)
  bits = node_classify.bits_for_epoch(config, 0)
  key = jax.random.PRNGKey(0)
  state = {"params": params, "opt": tx.init(params), "epoch": 0}

  def epoch():  # as gcn_throughput.jax_epoch_fn, keeping the metrics
    rng = jax.random.fold_in(key, state["epoch"])
    state["params"], state["opt"], state["loss"] = train_step(
        state["params"], state["opt"], bits, rng)
    state["eval"] = eval_step(state["params"], bits)
    jax.block_until_ready(state["eval"])
    state["epoch"] += 1

  t0 = time.perf_counter()
  epoch()
  m = config.model
  print(json.dumps({"first_epoch_s": time.perf_counter() - t0,
                    "depth": m.depth, "width": m.width,
                    "act_bits": config.quant.act_bits}), flush=True)
  for line in sys.stdin:
    n = int(line)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(n):
      epoch()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(json.dumps({
        "eps": n / wall, "cpu": cpu / n, "epoch": state["epoch"],
        "loss": float(np.asarray(state["loss"]).ravel()[0]),
        "val_acc": float(state["eval"]["val_acc"])}), flush=True)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f
                  if l.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--commits", default="HEAD")
  parser.add_argument("--config", default="cora,sym,4w4a")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--depth", type=int, default=0,
                      help="override the config's depth (0: keep it)")
  parser.add_argument("--worker", nargs=2, metavar=("TREE", "CONFIG"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(*args.worker, args.depth)
    return
  commits = [c.strip() for c in args.commits.split(",") if c.strip()]
  if not commits or len(set(commits)) != len(commits):
    raise ValueError(f"--commits: give distinct commits, got {args.commits!r}")
  env = dict(os.environ)
  sibling = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
  if not env.get("PDEQ_DATA_DIR") and os.path.isdir(sibling):
    env["PDEQ_DATA_DIR"] = sibling  # the exported trees have no sibling
  tmp = tempfile.mkdtemp(prefix="gcn_commits_")
  procs = {}
  try:
    for i, c in enumerate(commits):
      sha = subprocess.run(["git", "rev-parse", "--short", c], cwd=REPO_ROOT,
                           check=True, capture_output=True,
                           text=True).stdout.strip()
      tree = os.path.join(tmp, f"{i}_{sha}")
      os.makedirs(tree)
      archive = subprocess.run(["git", "archive", sha], cwd=REPO_ROOT,
                               check=True, capture_output=True).stdout
      subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
      procs[c] = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--worker", tree,
           args.config, "--depth", str(args.depth)], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True, env=env)
      print(f"{c} ({sha}): {worker_rounds.reply(procs[c], c)}", flush=True)
    load_start = os.getloadavg()
    results = worker_rounds.interleaved_rounds(
        procs, args.rounds, str(args.epochs), lambda r, c, d: print(
            f"round {r} {c}: {d['eps']:.2f} epochs/s, {d['cpu']:.3f} "
            f"CPU-s/epoch; loss {d['loss']:.6f} after epoch {d['epoch']}",
            flush=True))
    load_end = os.getloadavg()
  finally:
    for p in procs.values():
      if p.stdin:
        p.stdin.close()
      p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"\n{args.config}{f', depth {args.depth}' if args.depth else ''}, "
        f"{args.rounds} interleaved rounds x {args.epochs} "
        f"epochs (train step + eval forward); {_cpu_model()} "
        f"({os.cpu_count()} CPUs); load "
        f"average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end\n")
  print("| commit | epochs/s | CPU-s / epoch | speed vs "
        f"{commits[0]} | train loss, val acc after epoch "
        f"{results[commits[0]][-1]['epoch']} |")
  print("|---|---|---|---|---|")
  base = results[commits[0]]
  for c in commits:
    res = results[c]
    ratio = statistics.median(a["eps"] / b["eps"] for a, b in zip(res, base))
    print(f"| {c} | {statistics.median(d['eps'] for d in res):.2f} | "
          f"{statistics.median(d['cpu'] for d in res):.3f} | {ratio:.3f}x | "
          f"{res[-1]['loss']:.6f}, {res[-1]['val_acc']:.3f} |")


if __name__ == "__main__":
  main()
