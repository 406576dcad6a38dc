"""Where a CNN training step spends its time on XLA:CPU (profiler tables).

    python benchmarks/profile_train_step.py [--model resnet56] \
        [--precision float] [--batch 128] [--xla_defaults] [--categories]

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
``--categories`` also sums the thunks by what they compute (convolution
forward / input gradient / weight gradient, the transposed copies the
weight gradients read, BatchNorm reductions, elementwise forward and
backward) and times each of the step's convolutions alone, which counts the
Eigen work the trace misses.
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
from typing import Dict, List

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


def step_wall_ms(trace_dir: str, steps: int) -> float:
  """ms per step that the client waited for the executable to complete."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  total = 0.0
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == "ThunkExecutor::Execute (wait for completion)":
          total += event.duration_ns / 1e6
  return total / steps


def categories(hlo_text: str, batch: int) -> Dict[str, str]:
  """Top-level instruction name -> what it computes in a training step.

  Convolutions: weight gradient (kernel-shaped output: dimension 0 is not
  ``batch``), input gradient (``transpose(`` in the op name) or forward.
  Copies: transposed activations for the weight gradients (batch moved to
  the minor dimension), other transposes (output gradients, kernels).  YNNPACK
  fusions: the BatchNorm reductions.  Other fusions: elementwise forward
  (BatchNorm, ReLU, residual add) or backward.
  """
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* "
                       r"([\w\-]+)\((.*)$", hlo_text, re.M):
    name, _, dims, opcode, rest = m.groups()
    dims = [int(d) for d in dims.split(",") if d]
    op_name = re.search(r'op_name="([^"]*)"', rest)
    backward = op_name is not None and "transpose(" in op_name.group(1)
    if opcode == "convolution":  # weight gradients carry no op name
      if dims and dims[0] != batch:
        out[name] = "conv weight gradient"
      else:
        out[name] = "conv input gradient" if backward else "conv forward"
    elif name.startswith(("transpose_copy_fusion", "copy")):
      out[name] = ("transposed activations (batch minor)"
                   if len(dims) == 4 and dims[-1] == batch
                   else "other copies / transposes")
    elif name.startswith("ynn_fusion"):
      out[name] = "BatchNorm reductions (YNNPACK)"
    elif opcode == "fusion":
      out[name] = ("elementwise backward" if backward
                   else "elementwise forward")
  return out


def standalone_conv_ms(hlo_text: str, batch: int, options, repeats: int = 5
                       ) -> Dict[str, List[float]]:
  """Each convolution of the step compiled and timed alone (best of
  ``repeats`` x 3 calls): category -> ms list.  Eigen convolutions run on
  the intra-op pool, outside their thunk's trace event, so the trace alone
  under-counts them (the weight gradients most)."""
  shapes = {m.group(1): [int(d) for d in m.group(2).split(",") if d]
            for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]",
                                 hlo_text, re.M)}
  cats = categories(hlo_text, batch)
  out: Dict[str, List[float]] = collections.defaultdict(list)
  cache: Dict[str, float] = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[[\d,]*\]\S* "
                       r"convolution\(%([\w.\-]+), %([\w.\-]+)\), "
                       r"window=\{([^}]*)\}, dim_labels=b01f_01io->b01f",
                       hlo_text, re.M):
    name, lhs, rhs, window = m.groups()
    key = f"{shapes[lhs]} {shapes[rhs]} {window}"
    if key not in cache:
      w = dict(kv.split("=") for kv in window.split())
      pair = lambda k, d: tuple(int(v) for v in w.get(k, d).split("x"))
      pads = [tuple(int(v) for v in p.split("_"))
              for p in w.get("pad", "0_0x0_0").split("x")]
      conv = lambda a, b, w=w, pads=pads, pair=pair: \
          jax.lax.conv_general_dilated(
              a, b, pair("stride", "1x1"), pads, pair("lhs_dilate", "1x1"),
              pair("rhs_dilate", "1x1"), ("NHWC", "HWIO", "NHWC"))
      a = jnp.ones(shapes[lhs], jnp.float32)
      b = jnp.ones(shapes[rhs], jnp.float32)
      f = jax.jit(conv, compiler_options=options)
      f(a, b).block_until_ready()
      best = float("inf")
      for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
          y = f(a, b)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / 3 * 1e3)
      cache[key] = best
    out[cats.get(name, "conv ?")].append(cache[key])
  return out


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
  parser.add_argument("--categories", action="store_true",
                      help="also sum the thunks by what they compute (conv "
                      "forward / input / weight gradient, transposes, BN, "
                      "elementwise)")
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

  if args.categories:
    hlo = compiled.as_text()
    cats = categories(hlo, args.batch)
    per_cat: Dict[str, float] = collections.Counter()
    per_cat_count: Dict[str, int] = collections.Counter()
    for name, ms in times.items():
      if name.startswith("end: "):
        continue
      cat = cats.get(name, "other")
      per_cat[cat] += ms
      per_cat_count[cat] += 1
    wall = step_wall_ms(trace_dir, args.steps)
    total = sum(per_cat.values())
    rows = [[c, f"{v:.1f}", per_cat_count[c], f"{100 * v / total:.0f}%"]
            for c, v in per_cat.most_common()]
    rows.append(["all thunks (summed over threads)", f"{total:.1f}", "",
                 "100%"])
    rows.append([f"step wall time x {os.cpu_count()} CPUs",
                 f"{wall * (os.cpu_count() or 1):.1f}", "", ""])
    print("\nThunks by what they compute (ms / step, summed over the "
          "executor's threads):\n")
    print(common.markdown_table(["category", "ms / step", "thunks", "share"],
                                rows))
    conv = standalone_conv_ms(hlo, args.batch, options)
    print("\nThe step's convolutions timed alone (wall ms, 2 threads):\n")
    print(common.markdown_table(
        ["convolutions", "count", "ms each (min-max)", "ms / step"],
        [[c, len(v), f"{min(v):.2f}-{max(v):.2f}", f"{sum(v):.1f}"]
         for c, v in sorted(conv.items())] +
        [["all", sum(len(v) for v in conv.values()), "",
          f"{sum(sum(v) for v in conv.values()):.1f}"]]))

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
