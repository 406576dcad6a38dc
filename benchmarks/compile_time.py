"""First-step compile time: unrolled blocks against ``scan_blocks=True``.

    python benchmarks/compile_time.py [--output results/benchmarks/compile_time.md]

For each model (default ResNet-110 and Stable ResNet-56, 4w4a, CIFAR-10
shapes) the trainer's own training step (``train.classify``: its config,
model, optimiser, ``make_train_step`` and ``jit_train_step``, bits traced)
is built with the blocks unrolled (the default) and with blocks 2..n of
every stage under ``nn.scan``, in the same process, interleaved over
``--rounds`` (``jax.clear_caches()`` before each build, no persistent
cache).  Per build:

* ``init``: the jitted ``model.init`` of ``create_train_state`` (compile +
  run);
* ``lower``: tracing the train step to StableHLO (``.lower``), and the
  StableHLO size in lines;
* ``compile``: XLA's compilation of it, wall and process CPU seconds;
* ``first step``: lower + compile + the first call (what a run waits for
  before its first step), and ``init + first step``;
* ``step``: the median wall time of ``--steps`` further steps;
* the trainer's evaluation step (forward only, ``make_eval_step``):
  lower + compile, and the median of ``max(--steps, 1)`` calls.

A probe isolates why a plain scan runs slower on XLA:CPU: ``--probe_layers``
3x3 convolutions (16 channels, batch 32, 32x32, ReLU) unrolled, under
``jax.lax.scan``, and under ``jax.lax.scan`` with
``operators.canonical_conv_grads()`` (what ``scan_blocks`` uses): forward,
gradient in the input only and in the kernels only (``--skip_probe`` skips
it).

Cells are medians over rounds; ratios are unrolled / scanned of the per-round
values.  The CPU model and load average are printed: on a shared machine the
wall times move with the load, the ratios much less.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cifar  # pylint: disable=wrong-import-position
from pdeq_jax import layers  # pylint: disable=wrong-import-position
from pdeq_jax import operators  # pylint: disable=wrong-import-position
from pdeq_jax import xla_options  # pylint: disable=wrong-import-position
from train import classify  # pylint: disable=wrong-import-position

LABELS = {"resnet110": "ResNet-110", "stable_resnet56": "Stable ResNet-56"}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(name: str, scan: bool, precision: str, batch: int,
            steps: int) -> Dict[str, float]:
  """One build of the trainer's step, timed phase by phase."""
  jax.clear_caches()
  config = cifar.get_config(f"{name},cifar10,{precision}")
  config.model.scan_blocks = scan
  model = classify.create_model(config, 10)
  t0 = time.perf_counter()
  state, tx = classify.create_train_state(config, model, (32, 32, 3),
                                          steps_per_epoch=100)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  mesh = classify.make_mesh()
  step = classify.jit_train_step(classify.make_train_step(model, tx), mesh)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  bits = layers.QuantBits.make(config.quant.weight_bits,
                               config.quant.act_bits)
  key = jax.random.PRNGKey(0)
  t0, c0 = time.perf_counter(), _cpu_seconds()
  lowered = step.lower(state, x, y, bits, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), _cpu_seconds()
  state, metrics = compiled(state, x, y, bits, key)
  jax.block_until_ready(metrics)
  t3 = time.perf_counter()
  times = []
  for _ in range(steps):
    s0 = time.perf_counter()
    state, metrics = compiled(state, x, y, bits, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - s0)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"{name} scan={scan}: non-finite loss")
  # the evaluation step (forward only), as the trainer's evaluate() runs it
  evaluate = classify.jit_eval_step(classify.make_eval_step(model), mesh)
  variables = {"params": state.params, **state.model_state}
  mask = jnp.ones((batch,), jnp.float32)
  e0 = time.perf_counter()
  compiled_eval = evaluate.lower(variables, x, y, mask, bits).compile()
  e1 = time.perf_counter()
  jax.block_until_ready(compiled_eval(variables, x, y, mask, bits))
  eval_times = []
  for _ in range(max(steps, 1)):
    s0 = time.perf_counter()
    jax.block_until_ready(compiled_eval(variables, x, y, mask, bits))
    eval_times.append(time.perf_counter() - s0)
  return {"init": init_s, "lower": t1 - t0, "compile": t2 - t1,
          "compile_cpu": c2 - c0, "first": t3 - t0,
          "init_first": init_s + t3 - t0,
          "step": statistics.median(times) if times else float("nan"),
          "hlo_lines": float(lowered.as_text().count("\n")),
          "eval_compile": e1 - e0, "eval_step": statistics.median(eval_times)}


def conv_probe(layers_n: int, repeats: int = 3) -> List[str]:
  """Markdown rows: seconds per call, unrolled vs scanned 3x3 convs."""
  x = jnp.ones((32, 32, 32, 16), jnp.float32)
  ks = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (layers_n, 3, 3, 16, 16))
  conv = lambda v, k: jax.nn.relu(jax.lax.conv_general_dilated(
      v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

  def unrolled(ks, x):
    for i in range(layers_n):
      x = conv(x, ks[i])
    return jnp.sum(x)

  def scanned(ks, x):
    return jnp.sum(jax.lax.scan(lambda c, k: (conv(c, k), None), x, ks)[0])

  def scanned_canonical(ks, x):  # what scan_blocks runs
    def body(c, k):
      with operators.canonical_conv_grads():
        return jax.nn.relu(operators.conv(c, k)), None
    return jnp.sum(jax.lax.scan(body, x, ks)[0])

  rows = []
  for what, make in (("forward", lambda f: f),
                     ("gradient in the input", lambda f: jax.grad(f, 1)),
                     ("gradient in the kernels", lambda f: jax.grad(f, 0))):
    cells = []
    for f in (unrolled, scanned, scanned_canonical):
      run = xla_options.jit(make(f)).lower(ks, x).compile()
      jax.block_until_ready(run(ks, x))
      t = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(ks, x))
        t.append(time.perf_counter() - t0)
      cells.append(statistics.median(t))
    rows.append(f"| {what} | {cells[0]:.3f} | {cells[1]:.3f} | "
                f"{cells[2]:.3f} | {cells[1] / cells[0]:.1f}x | "
                f"{cells[2] / cells[0]:.1f}x |")
    print(rows[-1], flush=True)
  return rows


def table(results: Dict[str, Dict[bool, List[Dict[str, float]]]],
          args: argparse.Namespace) -> str:
  med = lambda rows, k: statistics.median(r[k] for r in rows)
  ratio = lambda a, b, k: statistics.median(
      u[k] / s[k] for u, s in zip(a, b))
  lines = [
      "# First-step compile time: unrolled blocks vs `scan_blocks=True`", "",
      f"`python benchmarks/compile_time.py --models {','.join(args.models)} "
      f"--precision {args.precision} --batch {args.batch} --steps "
      f"{args.steps} --rounds {args.rounds}`", "",
      f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; jax "
      f"{jax.__version__}, backend {jax.default_backend()}; load average "
      f"before: {args.load_before}, after: "
      f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.", "",
      "Trainer's train step (`train.classify`), CIFAR-10 shapes, "
      f"{args.precision}, batch {args.batch}; medians over {args.rounds} "
      "interleaved round(s), seconds.", "",
      "| model | blocks | init | lower | compile (wall) | compile (CPU) | "
      "first step | init + first step | step after compile | StableHLO "
      "lines | eval step: lower + compile | eval step |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name in args.models:
    for scan in (False, True):
      rows = results[name][scan]
      lines.append(
          f"| {LABELS.get(name, name)} | {'scanned' if scan else 'unrolled'} "
          f"| {med(rows, 'init'):.2f} | {med(rows, 'lower'):.2f} "
          f"| {med(rows, 'compile'):.2f} | {med(rows, 'compile_cpu'):.2f} "
          f"| {med(rows, 'first'):.2f} | {med(rows, 'init_first'):.2f} "
          f"| {med(rows, 'step'):.3f} | {med(rows, 'hlo_lines'):.0f} "
          f"| {med(rows, 'eval_compile'):.2f} | {med(rows, 'eval_step'):.3f} |")
    a, b = results[name][False], results[name][True]
    lines.append(
        f"| {LABELS.get(name, name)} | **unrolled / scanned** "
        f"| {ratio(a, b, 'init'):.2f}x | {ratio(a, b, 'lower'):.2f}x "
        f"| {ratio(a, b, 'compile'):.2f}x | {ratio(a, b, 'compile_cpu'):.2f}x "
        f"| {ratio(a, b, 'first'):.2f}x | {ratio(a, b, 'init_first'):.2f}x "
        f"| {ratio(a, b, 'step'):.2f}x | {ratio(a, b, 'hlo_lines'):.2f}x "
        f"| {ratio(a, b, 'eval_compile'):.2f}x "
        f"| {ratio(a, b, 'eval_step'):.2f}x |")
  if args.probe:
    lines += [
        "", f"Probe: {args.probe_layers} 3x3 convolutions (16 channels, "
        "batch 32, 32x32, ReLU), seconds per call (median of 3), same "
        "compiler options as the trainer.", "",
        "| program | unrolled | `lax.scan` | `lax.scan`, canonical conv "
        "gradients | scan / unrolled | canonical scan / unrolled |",
        "|---|---:|---:|---:|---:|---:|"] + args.probe
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet110,stable_resnet56",
                      type=lambda s: s.split(","))
  parser.add_argument("--precision", default="4w4a")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--probe_layers", type=int, default=8)
  parser.add_argument("--skip_probe", action="store_true")
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  for key in ("batch", "rounds"):
    if getattr(args, key) < 1:
      parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
  if args.probe_layers < 1:
    parser.error(f"--probe_layers must be >= 1, got {args.probe_layers}")
  if args.steps < 0:
    parser.error(f"--steps must be >= 0, got {args.steps}")
  args.load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
  results: Dict[str, Dict[bool, List[Dict[str, float]]]] = {
      n: {False: [], True: []} for n in args.models}
  for r in range(args.rounds):
    for name in args.models:
      for scan in ((False, True) if r % 2 == 0 else (True, False)):
        row = measure(name, scan, args.precision, args.batch, args.steps)
        results[name][scan].append(row)
        print(f"round {r + 1} {name} {'scanned' if scan else 'unrolled'}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
              flush=True)
  args.probe = [] if args.skip_probe else conv_probe(args.probe_layers)
  text = table(results, args)
  print(text)
  if args.output:
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
