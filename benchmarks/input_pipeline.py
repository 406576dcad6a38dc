"""Input-pipeline throughput: the hand-written pipeline vs grain, one run.

    mkdir -p /tmp/old && git archive <old commit> | tar -x -C /tmp/old
    #   (or: git worktree add /tmp/old <old commit>)
    python benchmarks/input_pipeline.py --old /tmp/old [--max_train 20000] \
        [--batch 128] [--batches 60] [--rounds 3] [--workers 2] \
        [--train_steps 6] [--output results/benchmarks/input_pipeline.md]

Images/s delivered (no model) of

* the old pipeline: ``pdeq_jax/data/images.py`` of the checkout given by
  ``--old`` (imported from that file under another name; it needs only numpy
  and PIL): ``prefetch(train_batches(...), size=2)`` (numpy batches made in
  one background thread) and ``eval_batches``;
* the grain pipeline of this checkout (``pdeq_jax.data.images``):
  ``train_batches`` / ``eval_batches`` with 0, 1 and 2 grain threads and,
  with ``--workers N``, N worker processes (their start-up included),

on the same cached CIFAR-10 JPEG images, each measurement pulling
``--batches`` batches of ``--batch`` 32x32x3 images from a fresh iterator
(start-up included) with random crops and flips, normalised to float32.
Rounds are interleaved (old, then each new config) so that load from other
processes hits all of them; the table gives the median over rounds.

Then the check that a ResNet-20 (4W4A, the trainer's jitted step) training
step is not input-bound: images/s of ``--train_steps`` steps on one fixed
device batch against the same steps fed by the grain loader with the default
thread count (``DEFAULT_THREADS``); input-bound would show as the fed rate
falling below the fixed-batch rate, and as an input rate near the step rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar as cifar_configs  # noqa: E402
from pdeq_jax import layers  # noqa: E402
from pdeq_jax.data import images  # noqa: E402
from train import classify  # noqa: E402


def load_old(checkout: str):
  """The old ``images`` module of another checkout, under another name."""
  path = pathlib.Path(checkout) / "pdeq_jax" / "data" / "images.py"
  if not path.is_file():
    raise SystemExit(f"--old {checkout}: no {path}")
  spec = importlib.util.spec_from_file_location("old_pdeq_images", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # (its dataclasses look it up)
  spec.loader.exec_module(module)
  return module


def rate(make, batches: int, batch: int) -> float:
  """Images/s of ``batches`` batches of a fresh iterator (start-up in)."""
  start = time.perf_counter()
  it = make()
  for _ in range(batches):
    out = next(it)
    np.asarray(out[0]).sum(dtype=np.float32)  # touch the data
  seconds = time.perf_counter() - start
  close = getattr(it, "close", None)
  if close is not None:
    close()
  return batches * batch / seconds


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--old", required=True,
                 help="a checkout of the old code (e.g. git worktree of main)")
  p.add_argument("--max_train", type=int, default=20000)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--batches", type=int, default=60)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--workers", type=int, default=0,
                 help="also measure this many grain worker processes")
  p.add_argument("--train_steps", type=int, default=6)
  p.add_argument("--output", default="")
  args = p.parse_args(argv)

  old = load_old(args.old)
  data = images.load_image_dataset("cifar10_jpeg", max_train=args.max_train,
                                   max_test=2000)
  x, y, mean, std = (data.train_images, data.train_labels, data.mean,
                     data.std)
  b, nb = args.batch, args.batches
  if nb > images.steps_per_epoch(len(y), b):
    raise SystemExit(f"--batches {nb} exceeds one epoch of {len(y)} images")
  kw = dict(seed=0, epoch=0, mean=mean, std=std)
  configs = {
      "old: numpy batches + 1 prefetch thread (train)":
          lambda: old.prefetch(old.train_batches(x, y, b, **kw), size=2),
  }
  for threads in (0, 1, 2):
    configs[f"grain, {threads} threads (train)"] = (
        lambda t=threads: images.train_batches(x, y, b, threads=t, **kw))
  if args.workers:
    configs[f"grain, 1 thread + {args.workers} worker processes (train)"] = (
        lambda: images.train_batches(x, y, b, threads=1,
                                     workers=args.workers, **kw))
  tx, ty = data.test_images, data.test_labels
  configs["old: numpy batches (eval)"] = (
      lambda: old.eval_batches(tx, ty, b, mean=mean, std=std))
  configs[f"grain, {images.DEFAULT_THREADS} thread (eval)"] = (
      lambda: images.eval_batches(tx, ty, b, mean=mean, std=std))
  eval_batches = min(nb, -(-len(ty) // b))

  # same stream check: old vs new differ (different shuffles), new is
  # independent of threads
  a = [next(images.train_batches(x, y, b, threads=t, **kw))[1]
       for t in (0, 2)]
  assert np.array_equal(a[0], a[1])

  results = {name: [] for name in configs}
  for r in range(args.rounds):
    for name, make in configs.items():
      n = eval_batches if "(eval)" in name else nb
      results[name].append(rate(make, n, b))
      print(f"round {r + 1}: {name}: {results[name][-1]:.0f} img/s",
            flush=True)
  med = {k: statistics.median(v) for k, v in results.items()}
  base_train = med["old: numpy batches + 1 prefetch thread (train)"]
  base_eval = med["old: numpy batches (eval)"]

  # ResNet-20 4W4A train step: fixed batch vs fed by the grain loader
  config = cifar_configs.get_config("resnet20,cifar10_jpeg,4w4a")
  model = classify.create_model(config, 10)
  state, tx_ = classify.create_train_state(config, model, data.image_shape,
                                           steps_per_epoch=100)
  mesh = classify.make_mesh()
  state = jax.device_put(state, classify.shardings(mesh)[0])
  step = classify.jit_train_step(classify.make_train_step(model, tx_), mesh)
  bits = layers.QuantBits.make(4, 4)
  key = jax.random.PRNGKey(0)
  it = images.train_batches(x, y, b, **kw)
  fixed = classify.to_global(next(it), mesh)
  t0 = time.perf_counter()
  state, m = step(state, *fixed, bits, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  n = args.train_steps
  step_rates, fed_rates = [], []
  for _ in range(2):
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = step(state, *fixed, bits, key)
    jax.block_until_ready(m)
    step_rates.append(n * b / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = step(state, *classify.to_global(next(it), mesh), bits, key)
    jax.block_until_ready(m)
    fed_rates.append(n * b / (time.perf_counter() - t0))
  it.close()
  step_rate, fed_rate = statistics.median(step_rates), statistics.median(
      fed_rates)
  input_rate = med[f"grain, {images.DEFAULT_THREADS} threads (train)"]

  lines = [
      "# Input pipeline: hand-written numpy + thread vs grain",
      "",
      f"`python benchmarks/input_pipeline.py {' '.join(sys.argv[1:])}`",
      "",
      f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with "
      f"other jobs; jax {jax.__version__}, grain "
      f"{importlib.metadata.version('grain')}.  CIFAR-10 JPEG (decoded "
      f"cache), {len(y)} train / {len(ty)} test images, batch {b}, "
      f"{nb} batches per measurement (eval: {eval_batches}) from a fresh "
      f"iterator, start-up included; random crop (pad 4) + flip + "
      f"normalisation to float32; median of {args.rounds} interleaved "
      f"rounds.",
      "",
      "| pipeline | images/s | vs old |",
      "|---|---:|---:|",
  ]
  for name, value in med.items():
    base = base_eval if "(eval)" in name else base_train
    lines.append(f"| {name} | {value:,.0f} | {value / base:.2f}x |")
  lines += [
      "",
      f"Per-round images/s: " + "; ".join(
          f"{k}: {', '.join(f'{v:.0f}' for v in vs)}"
          for k, vs in results.items()),
      "",
      "## Is a ResNet-20 training step input-bound?",
      "",
      f"ResNet-20 4W4A, batch {b}, the trainer's jitted step "
      f"(compile {compile_s:.1f} s), {n} steps, median of 2:",
      "",
      "| | images/s |",
      "|---|---:|",
      f"| train step on one fixed batch (compute only) | {step_rate:,.0f} |",
      f"| train step fed by the grain loader ({images.DEFAULT_THREADS} "
      f"thread) | {fed_rate:,.0f} |",
      f"| grain loader alone ({images.DEFAULT_THREADS} thread, above) | "
      f"{input_rate:,.0f} |",
      "",
      f"Input delivers {input_rate / step_rate:.1f}x the images/s the step "
      f"consumes; the fed step runs at {fed_rate / step_rate:.2f}x the "
      f"compute-only rate.",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.output:
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(text)


if __name__ == "__main__":
  import importlib.metadata  # noqa: F401
  main()
