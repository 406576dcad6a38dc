"""One CNN training step in several process variants, timed side by side.

    python benchmarks/step_variants.py --model resnet20 --precision fp \
        --variants 'off|{}|{}' 'keep|{"PDEQ_JAX_KEEP_HOST_MEMORY": "1"}|{}' \
        'vw512|{}|{"xla_cpu_prefer_vector_width": 512}'

A variant is ``name|environment (JSON)|extra compiler options (JSON)``.
Each runs in its own worker process (environment variables such as glibc's
``MALLOC_*`` only act at process start) that compiles the step of
``train_throughput.py`` as the trainers compile it (``xla_options``
preset plus the variant's options; ``xla_options.keep_freed_host_memory()``
first, as ``train.main`` does: it acts if the environment says so), runs
2 warm-up steps, then ``--steps`` steps whenever the driver asks, in rounds
alternating the order.  Printed per variant: median wall ms, user and
system CPU-seconds and minor page faults per step, the resident set after
the last round, the medians of the
per-round wall and CPU ratios to the first variant, and the last loss and
a parameter checksum (equal values = the variant computes the same
numbers).  The load average is printed at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import worker_rounds  # noqa: E402  (this directory, as run as a script)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def worker(model_name: str, precision: str, batch: int, extra: str) -> None:
  sys.path.insert(0, BENCH_DIR)
  sys.path.insert(0, os.path.dirname(BENCH_DIR))
  from pdeq_jax import xla_options  # pylint: disable=import-outside-toplevel
  kept = xla_options.keep_freed_host_memory()  # before any computation
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import train_throughput as bench  # pylint: disable=import-outside-toplevel
  quantized, _, _ = bench.parse_precision(precision)
  model, _ = bench.build_jax_model(model_name, quantized)
  tx = bench.jax_optimizer()
  state = jax.jit(bench.make_jax_init(model, tx))(jax.random.PRNGKey(0))
  x, y = map(jnp.asarray, bench.make_data(batch, 0))
  options = {**xla_options.compiler_options(), **json.loads(extra)}
  compiled, bits = bench.compile_jax_step(model, tx, state, x, y, precision,
                                          "traced", options)
  st = {"state": state, "loss": None}

  def step():
    st["state"], st["loss"] = compiled(st["state"], x, y, bits)

  for _ in range(2):
    step()
  jax.block_until_ready(st["state"])
  temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  print(json.dumps({"options": options, "kept_host_memory": kept,
                    "temp_MiB": round(temp, 1)}), flush=True)
  for line in sys.stdin:
    n = int(line)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(n):
      step()
    jax.block_until_ready(st["state"])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    checksum = sum(float(np.abs(np.asarray(leaf, np.float64)).sum())
                   for leaf in jax.tree_util.tree_leaves(st["state"])
                   if np.issubdtype(np.asarray(leaf).dtype, np.floating))
    print(json.dumps({
        "wall": wall / n, "user": (r1.ru_utime - r0.ru_utime) / n,
        "sys": (r1.ru_stime - r0.ru_stime) / n,
        "minflt": (r1.ru_minflt - r0.ru_minflt) / n,
        "loss": float(st["loss"]), "checksum": checksum,
        "rss_MiB": _rss_mib()}), flush=True)


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--precision", default="fp")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", nargs="+",
                      default=["off|{}|{}",
                               'keep|{"PDEQ_JAX_KEEP_HOST_MEMORY": "1"}|{}'])
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.model, args.precision, args.batch, args.options)
    return
  variants = []
  for text in args.variants:
    parts = text.split("|")
    if len(parts) != 3:
      raise ValueError(f"--variants: {text!r} is not 'name|env json|"
                       f"options json'")
    variants.append((parts[0], json.loads(parts[1]), parts[2]))
  names = [v[0] for v in variants]
  if len(set(names)) != len(names):
    raise ValueError(f"--variants: names must differ, got {names}")
  procs = {}
  try:
    for name, env, options in variants:
      procs[name] = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--worker", "--model",
           args.model, "--precision", args.precision, "--batch",
           str(args.batch), "--options", options],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
          env={**os.environ, **env})
      print(f"{name}: {worker_rounds.reply(procs[name], name)}", flush=True)
    load_start = os.getloadavg()
    results = worker_rounds.interleaved_rounds(procs, args.rounds,
                                               str(args.steps))
    load_end = os.getloadavg()
  finally:
    for p in procs.values():
      p.stdin.close()
      p.wait()
  print(f"\n{args.model} {args.precision} batch {args.batch}, {args.rounds} "
        f"interleaved rounds x {args.steps} steps; load average "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end\n")
  print(f"| variant | wall ms | user CPU-s | system CPU-s | minor faults | "
        f"RSS MiB at the end | CPU / {names[0]} | wall / {names[0]} | "
        f"last loss | checksum |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  base = results[names[0]]
  cpu = lambda d: d["user"] + d["sys"]
  for n in names:
    res = results[n]
    med = lambda k, res=res: statistics.median(d[k] for d in res)
    cpu_ratio = statistics.median(cpu(a) / cpu(b) for a, b in zip(res, base))
    wall_ratio = statistics.median(a["wall"] / b["wall"]
                                   for a, b in zip(res, base))
    print(f"| {n} | {med('wall') * 1e3:.0f} | {med('user'):.3f} | "
          f"{med('sys'):.3f} | {med('minflt'):.0f} | "
          f"{res[-1]['rss_MiB']:.0f} | {cpu_ratio:.3f} | {wall_ratio:.3f} | "
          f"{res[-1]['loss']:.7f} | {res[-1]['checksum']:.6f} |")


if __name__ == "__main__":
  main()
