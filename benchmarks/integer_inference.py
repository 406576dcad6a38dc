"""Batch inference images/s of one quantized CNN on four paths, side by side.

    python benchmarks/integer_inference.py --workdir=runs/resnet20_4w4a \
        [--allow_unfinished] [--batch 128] [--rounds 5] [--output table.md]
    python benchmarks/integer_inference.py --model resnet20   # random weights

Paths (the same network): the fake-quant float model (JAX, jit), the JAX
integer program (int8 operands, int32 accumulators, int64 requantization),
onnxruntime float32 (the same graph on float tensors: float ``Conv``, float
requantization with ``Round``) and onnxruntime integer (``ConvInteger``).
Each path: one warm-up call, then ``rounds`` timed rounds of ``steps`` calls
on one batch of real CIFAR-10 test images; the best round is reported.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from pdeq_jax import layers  # pylint: disable=wrong-import-position
from pdeq_jax import models  # pylint: disable=wrong-import-position
from pdeq_jax.data import images as image_data  # pylint: disable=wrong-import-position
from pdeq_jax.deploy import convert as convert_lib  # pylint: disable=wrong-import-position
from pdeq_jax.deploy import onnx_export  # pylint: disable=wrong-import-position
from pdeq_jax.deploy import program as prog  # pylint: disable=wrong-import-position


def _time(fn, x, rounds, steps):
  np.asarray(fn(x))  # compile / warm up
  best = float("inf")
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(steps):
      out = fn(x)
    np.asarray(out)
    best = min(best, (time.perf_counter() - t) / steps)
  return x.shape[0] / best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="")
  parser.add_argument("--allow_unfinished", action="store_true")
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--data_dir", default=os.environ.get("PDEQ_DATA_DIR"))
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  data = image_data.load_image_dataset("cifar10_jpeg", args.data_dir,
                                       max_train=1000, max_test=args.batch)
  if args.workdir:
    from train import classify  # pylint: disable=import-outside-toplevel
    from train import export  # pylint: disable=import-outside-toplevel
    config, variables, bits, note = export.load_run(
        args.workdir, allow_unfinished=args.allow_unfinished)
    data_full = classify.load_data(config)
    mean, std = data_full.mean, data_full.std
    model = classify.create_model(config, data_full.num_classes)
    name = f"{config.model.name} ({note})"
  else:
    model = models.create(args.model, 10)
    x0 = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x0)
    bits, mean, std = (4, 4), data.mean, data.std
    name = f"{args.model} (random weights)"
  x = image_data.normalize(data.test_images[:args.batch], mean, std)
  qbits = layers.QuantBits.make(*bits)
  program = convert_lib.convert(model, variables, bits, mean, std)
  fake = jax.jit(lambda v: model.apply(variables, v, qbits))
  integer = prog.jit_run(program)
  ort_float = onnx_export.session(program, float_mode=True)
  ort_int = onnx_export.session(program)
  paths = [
      ("fake-quant float model (JAX)", fake),
      ("integer program (JAX)", integer),
      ("onnxruntime float32", lambda v: ort_float.run(None, {"x": v})[0]),
      ("onnxruntime integer", lambda v: ort_int.run(None, {"x": v})[0]),
  ]
  rates = {label: _time(fn, x, args.rounds, args.steps) for label, fn in paths}
  base = rates["onnxruntime float32"]
  rows = [f"| {label} | {rate:,.0f} | {rate / base:.2f} |"
          for label, rate in rates.items()]
  load = os.getloadavg()
  text = "\n".join([
      f"Batch-{args.batch} inference, {name}, {bits[0]}W{bits[1]}A, "
      f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end; best "
      f"of {args.rounds} rounds of {args.steps} calls.", "",
      "| path | images/s | vs onnxruntime float32 |", "|---|---|---|",
      *rows, ""])
  print(text)
  if args.output:
    pathlib.Path(args.output).write_text(text)


if __name__ == "__main__":
  main()
