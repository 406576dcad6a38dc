"""What XLA:CPU can run in parallel: the limits behind the PDE-GCN step time.

    python benchmarks/xla_cpu_limits.py [--output results/benchmarks/xla_cpu_limits.md]

The 32-layer PDE-GCN training step is thousands of small operations on
[E, C] edge arrays (Cora: E = 5278 stored edges, C = 64).  This script measures,
side by side in one run, the properties of XLA:CPU that bound how fast such a
step can be on a small CPU, each as a ratio of two programs that do the same
work in two ways:

1. *Independent chains*: one jitted program with two data-independent chains
   of elementwise fusions against the program with one chain.  2.0x means the
   executor ran them one after the other (no inter-op parallelism).
2. *Host devices*: the per-layer gather / tanh / scatter body of a graph
   network over ``--layers`` layers on one CPU device, against the same edges
   split over two host devices (``--xla_force_host_platform_device_count=2``,
   ``shard_map``, no communication at all), in a subprocess.  1.0x means the
   two devices did not run concurrently.
3. *Residuals through lax.scan*: a scan that stacks an [E, C] value per
   iteration and reads it back in a reverse scan (what autodiff without
   rematerialisation does), against recomputing it in the reverse scan.
4. *One core vs all cores*: the trainer's own Cora sym 4W4A epoch (train step
   + evaluation) pinned to one core with ``taskset`` against the default, in
   subprocesses (skipped where ``taskset`` is missing or with
   ``--skip_trainer``).

Matmul rates at the step's shapes (``A B`` and the weight-gradient ``Aᵀ B``)
are printed for context.  Times are the best of ``--repeats`` calls; the
trainer's epoch is the median of ``--trainer_epochs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def call_times(fn: Callable[[], object], repeats: int) -> List[float]:
  """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def best_ms(fn: Callable[[], object], repeats: int) -> float:
  return 1e3 * min(call_times(fn, repeats))


def elementwise_chain(a, steps: int):
  """``steps`` tanh fusions that XLA may not merge (optimization barriers)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  for _ in range(steps):
    a = jax.lax.optimization_barrier(jnp.tanh(a * 1.01 + 0.01))
  return a


def measure_chains(edges: int, channels: int, steps: int, repeats: int
                   ) -> Dict[str, float]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.full((edges, channels), 0.3)
  y = jnp.full((edges, channels), 0.5)
  one = jax.jit(lambda a, b: (elementwise_chain(a, steps), b))
  two = jax.jit(lambda a, b: (elementwise_chain(a, steps),
                              elementwise_chain(b, steps)))
  return {"one": best_ms(lambda: one(x, y), repeats),
          "two": best_ms(lambda: two(x, y), repeats)}


def graph_body_program(nodes: int, layers: int):
  """``layers`` gather / 4 x tanh / scatter steps on a state [N, C]."""
  import jax  # pylint: disable=import-outside-toplevel

  def layer(x, senders, receivers):
    g = elementwise_chain(x[senders] - x[receivers], 4)
    return (jax.ops.segment_sum(g, senders, nodes)
            - jax.ops.segment_sum(g, receivers, nodes))

  def run(x, senders, receivers):
    body = lambda state, _: (state - 0.1 * layer(state, senders, receivers),
                             None)
    return jax.lax.scan(body, x, None, length=layers)[0]
  return run


def measure_devices(edges: int, channels: int, nodes: int, layers: int,
                    repeats: int) -> Dict[str, float]:
  """Runs in a subprocess with two host devices (see ``--_devices_child``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec  # pylint: disable=import-outside-toplevel
  if len(jax.devices()) < 2:
    raise RuntimeError("expected two host devices, got "
                       f"{len(jax.devices())}")
  rng = np.random.default_rng(0)
  edges -= edges % 2
  senders = jnp.asarray(rng.integers(0, nodes, edges), jnp.int32)
  receivers = jnp.asarray(rng.integers(0, nodes, edges), jnp.int32)
  x = jnp.full((nodes, channels), 0.1)
  run = graph_body_program(nodes, layers)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
  split = jax.shard_map(run, mesh=mesh,
                        in_specs=(PartitionSpec(), PartitionSpec("d"),
                                  PartitionSpec("d")),
                        out_specs=PartitionSpec("d"), check_vma=False)
  one_device = jax.jit(run)
  two_devices = jax.jit(split)
  return {"one": best_ms(lambda: one_device(x, senders, receivers), repeats),
          "two": best_ms(lambda: two_devices(x, senders, receivers), repeats)}


def measure_residuals(edges: int, channels: int, layers: int, repeats: int
                      ) -> Dict[str, float]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  step = lambda c: jnp.tanh(c * 1.01)

  def stored(x):
    def forward(c, _):
      c = step(c)
      return c, c
    c, stack = jax.lax.scan(forward, x, None, length=layers)
    backward = lambda acc, saved: (acc + 0.5 * saved, None)
    return jax.lax.scan(backward, c, stack, reverse=True)[0]

  def recomputed(x):
    c = jax.lax.scan(lambda c, _: (step(c), None), x, None, length=layers)[0]
    backward = lambda acc, _: (acc + 0.5 * step(acc), None)
    return jax.lax.scan(backward, c, None, length=layers)[0]

  x = jnp.full((edges, channels), 0.3)
  stored_fn, recomputed_fn = jax.jit(stored), jax.jit(recomputed)
  return {"stored": best_ms(lambda: stored_fn(x), repeats),
          "recomputed": best_ms(lambda: recomputed_fn(x), repeats)}


def measure_matmuls(edges: int, channels: int, repeats: int
                    ) -> Dict[str, float]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jnp.full((edges, channels), 0.01)
  k = jnp.full((channels, channels), 0.02)
  ab = jax.jit(lambda a, k: a @ k)
  atb = jax.jit(lambda a, b: a.T @ b)
  return {"ab": best_ms(lambda: ab(a, k), repeats),
          "atb": best_ms(lambda: atb(a, a), repeats)}


def trainer_epoch_ms(epochs: int) -> float:
  """Median ms of the trainer's Cora sym 4W4A epoch in this process."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
  import gcn_throughput  # pylint: disable=import-outside-toplevel
  from configs import pde_gcn as gcn_configs  # pylint: disable=import-outside-toplevel
  epoch, _ = gcn_throughput.jax_epoch_fn(
      gcn_configs.get_config("cora,sym,4w4a"))
  return 1e3 * float(np.median(call_times(epoch, epochs)))


def run_child(flag: str, args, env_extra: Dict[str, str],
              prefix: List[str]) -> Dict[str, float]:
  env = dict(os.environ, **env_extra)
  command = prefix + [sys.executable, os.path.abspath(__file__), flag,
                      f"--edges={args.edges}", f"--channels={args.channels}",
                      f"--nodes={args.nodes}", f"--layers={args.layers}",
                      f"--repeats={args.repeats}",
                      f"--trainer_epochs={args.trainer_epochs}"]
  proc = subprocess.run(command, env=env, capture_output=True, text=True,
                        cwd=REPO_ROOT, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--edges", type=int, default=5278,
                      help="rows of the edge arrays (Cora: 5278)")
  parser.add_argument("--channels", type=int, default=64)
  parser.add_argument("--nodes", type=int, default=2708)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--chain", type=int, default=32,
                      help="elementwise fusions per chain")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--trainer_epochs", type=int, default=10)
  parser.add_argument("--skip_trainer", action="store_true")
  parser.add_argument("--output", default="")
  parser.add_argument("--_devices_child", action="store_true",
                      help=argparse.SUPPRESS)
  parser.add_argument("--_trainer_child", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._devices_child:  # pylint: disable=protected-access
    print(json.dumps(measure_devices(args.edges, args.channels, args.nodes,
                                     args.layers, args.repeats)))
    return
  if args._trainer_child:  # pylint: disable=protected-access
    print(json.dumps({"epoch": trainer_epoch_ms(args.trainer_epochs)}))
    return

  import jax  # pylint: disable=import-outside-toplevel
  shape = f"[{args.edges}, {args.channels}]"
  rows = []
  chains = measure_chains(args.edges, args.channels, args.chain, args.repeats)
  rows.append([f"{args.chain} tanh fusions on {shape}: 2 independent chains "
               f"vs 1", f"{chains['two']:.2f}", f"{chains['one']:.2f}",
               f"{chains['two'] / chains['one']:.2f}x",
               "2.0x = the chains ran one after the other"])
  flags = os.environ.get("XLA_FLAGS", "")
  devices = run_child(
      "--_devices_child", args,
      {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2"}, [])
  rows.append([f"{args.layers} graph layers (gather, 4 tanh, 2 scatters) on "
               f"{shape}: 1 device vs edges split over 2 host devices",
               f"{devices['one']:.2f}", f"{devices['two']:.2f}",
               f"{devices['one'] / devices['two']:.2f}x",
               "2.0x = the devices ran concurrently, 1.0x = not at all"])
  residuals = measure_residuals(args.edges, args.channels, args.layers,
                                args.repeats)
  rows.append([f"scan of {args.layers}: {shape} stored per iteration and "
               "read back vs recomputed",
               f"{residuals['stored']:.2f}", f"{residuals['recomputed']:.2f}",
               f"{residuals['stored'] / residuals['recomputed']:.2f}x",
               "> 1 = storing costs more than recomputing"])
  if not args.skip_trainer and shutil.which("taskset"):
    single = run_child("--_trainer_child", args, {}, ["taskset", "-c", "0"])
    full = run_child("--_trainer_child", args, {}, [])
    rows.append([f"trainer's Cora sym 4W4A epoch: 1 core vs {os.cpu_count()}",
                 f"{single['epoch']:.1f}", f"{full['epoch']:.1f}",
                 f"{single['epoch'] / full['epoch']:.2f}x",
                 "speed-up from the extra cores"])
  matmuls = measure_matmuls(args.edges, args.channels, args.repeats)
  flop = 2.0 * args.edges * args.channels ** 2
  rate = lambda ms: f"{flop / ms / 1e6:.0f} GFLOP/s"

  from train import common  # pylint: disable=import-outside-toplevel
  table = common.markdown_table(["measurement", "A (ms)", "B (ms)", "A / B",
                                 "reading"], rows)
  header = (f"XLA:CPU execution limits, jax {jax.__version__}, "
            f"{os.cpu_count()} CPUs, best of {args.repeats} calls (the "
            f"trainer row: median of {args.trainer_epochs} epochs)\n\n")
  footer = (f"\n\nMatmuls at {shape} x [{args.channels}, {args.channels}]: "
            f"A B {matmuls['ab']:.3f} ms ({rate(matmuls['ab'])}), weight "
            f"gradient Aᵀ B {matmuls['atb']:.3f} ms ({rate(matmuls['atb'])}).\n")
  print(header + table + footer)
  if args.output:
    with open(args.output, "w") as f:
      f.write(header + table + footer)


if __name__ == "__main__":
  main()
