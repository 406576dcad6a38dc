"""Where a CNN training step spends its time on XLA:CPU (profiler tables).

    python benchmarks/profile_train_step.py [--model resnet56] \
        [--precision float] [--batch 128] [--xla_defaults]

Compiles the training step of ``benchmarks/train_throughput.py`` (forward,
backward, SGD), times it, then records ``--steps`` steps with
``jax.profiler`` and sums the XLA:CPU thunk events per kind (``ynn_fusion``,
``transpose_copy_fusion``, loop fusions, ...) and, for YNNPACK fusions, per
operation: convolution shape and dimension labels, reduction, dot.  A
convolution whose window covers the whole feature map (``size=32x32`` with a
3x3 output) is a weight gradient.

Caveat: thunks that hand work to another thread pool (Eigen convolutions)
appear with their dispatch time only, so the tables show YNNPACK
convolutions but not Eigen ones; compare step times (first line) for those.
The numbers are per step and summed over the executor's threads.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import train_throughput as bench  # noqa: E402
from pdeq_jax import xla_options  # noqa: E402
from train import common  # noqa: E402


def thunk_times(trace_dir: str, steps: int) -> Dict[str, float]:
  """ms per step of every XLA:CPU thunk event name in the newest trace."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  totals: Dict[str, float] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for event in line.events:
        if event.name != "ThunkExecutor::Execute":
          totals[event.name] += event.duration_ns / 1e6 / steps
  return totals


def ynn_operations(hlo_text: str) -> Dict[str, str]:
  """YNNPACK fusion name -> the operation its computation computes."""
  calls = dict(re.findall(r"%(ynn_fusion[.\d]*) = .*?calls=%([\w.\-]+)",
                          hlo_text))
  bodies = {m.group(1): m.group(0) for m in re.finditer(
      r"^%([\w.\-]+) \(.*?^}", hlo_text, re.S | re.M)}
  out = {}
  for fusion, computation in calls.items():
    body = bodies.get(computation, "")
    root = next((l for l in body.splitlines() if "ROOT" in l), "")
    op = re.search(r"= (\S+) (\w[\w-]*)\(", root)
    if not op:
      out[fusion] = "?"
      continue
    shape, kind = op.groups()
    if kind == "convolution":
      window = re.sub(r" pad=\S+", "", re.search(r"window=\{([^}]*)\}",
                                                   root).group(1))
      inputs = re.findall(r"param_[\d.]+: (\w+\[[\d,]*\])",
                          body.splitlines()[0])
      out[fusion] = (f"convolution {window}: {' x '.join(inputs)} -> "
                     f"{shape.split('{')[0]}")
    else:
      out[fusion] = f"{kind} -> {shape.split('{')[0]}"
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet56")
  parser.add_argument("--precision", default="float")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--xla_defaults", action="store_true",
                      help="compile without pdeq_jax.xla_options")
  args = parser.parse_args(argv)

  quantized, _, _ = bench.parse_precision(args.precision)
  model, _ = bench.build_jax_model(args.model, quantized)
  tx = bench.jax_optimizer()
  state = jax.jit(bench.make_jax_init(model, tx))(jax.random.PRNGKey(0))
  x, y = map(jnp.asarray, bench.make_data(args.batch, 0))
  options = {} if args.xla_defaults else xla_options.compiler_options()
  compiled, bits = bench.compile_jax_step(model, tx, state, x, y,
                                          args.precision, "traced", options)
  run = lambda s: compiled(s, x, y, bits)
  for _ in range(2):
    state, loss = run(state)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, loss = run(state)
  jax.block_until_ready(state)
  step_ms = (time.perf_counter() - t0) / args.steps * 1e3
  print(f"{args.model} {args.precision} batch {args.batch}, compiler options "
        f"{options}: {step_ms:.0f} ms/step ({args.batch / step_ms * 1e3:.1f} "
        f"img/s)\n")

  trace_dir = tempfile.mkdtemp(prefix="pdeq_profile_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    state, loss = run(state)
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  times = thunk_times(trace_dir, args.steps)

  kinds: Dict[str, float] = collections.Counter()
  counts: Dict[str, int] = collections.Counter()
  for name, ms in times.items():
    kind = re.sub(r"[.\d]+$", "", name)
    kinds[kind] += ms
    counts[kind] += 1
  print(common.markdown_table(
      ["thunk kind", "ms / step", "distinct thunks"],
      [[k, f"{v:.1f}", counts[k]] for k, v in kinds.most_common(args.top)]))

  operations = ynn_operations(compiled.as_text())
  if operations:
    per_op: Dict[str, float] = collections.Counter()
    per_op_count: Dict[str, int] = collections.Counter()
    for fusion, op in operations.items():
      per_op[op] += times.get(fusion, 0.0)
      per_op_count[op] += 1
    print("\nYNNPACK fusions by operation:\n")
    print(common.markdown_table(
        ["operation", "ms / step", "count", "ms each"],
        [[op, f"{v:.1f}", per_op_count[op], f"{v / per_op_count[op]:.2f}"]
         for op, v in per_op.most_common(args.top)]))


if __name__ == "__main__":
  main()
