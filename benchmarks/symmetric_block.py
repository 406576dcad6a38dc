"""Cost of the symmetric operator (Kᵀ via jax.vjp) vs a two-kernel block.

    python benchmarks/symmetric_block.py [--batch 128] [--rounds 5]

Times forward + backward (gradients w.r.t. the input and every kernel) of

* symmetric: ``x - h Kᵀ relu(K x)``, one 3x3 kernel, ``Kᵀ`` the ``jax.vjp``
  adjoint of ``K`` (``pdeq_jax.layers.SymmetricConvStep``, the stable
  networks' operator);
* two-kernel: ``x - h K₂ relu(K₁ x)``, two independent 3x3 kernels (the
  standard residual block's pair of convolutions);

at the CIFAR ResNet stage shapes (32x32x16, 16x16x32, 8x8x64), float and
4W4A, compiled as the trainers compile (``pdeq_jax.xla_options``).  Both do
the same number of multiply-adds per call; the symmetric one has half the
parameters.  Rounds alternate between the variants; the table gives medians
and the time ratio symmetric / two-kernel (goal: <= 1.0, i.e. the adjoint is
not slower than a second convolution).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pdeq_jax import layers  # noqa: E402
from pdeq_jax import xla_options  # noqa: E402
from train import common  # noqa: E402

STEP = 0.1


class TwoKernelStep(nn.Module):
  """``x - h K₂ Q(relu(K₁ x))`` with two quantized 3x3 kernels."""
  quantized: bool

  @nn.compact
  def __call__(self, x, bits):
    conv = lambda name: layers.QuantConv(x.shape[-1], 3,
                                         quantize_weights=self.quantized,
                                         name=name)
    y = nn.relu(conv("conv1")(x, bits.weights))
    y = layers.ActQuant(enabled=self.quantized, name="aq")(y, bits.activations)
    return x - STEP * conv("conv2")(y, bits.weights)


def block(kind: str, quantized: bool) -> nn.Module:
  if kind == "symmetric":
    return layers.SymmetricConvStep(h=STEP, quantize_weights=quantized,
                                    quantize_activations=quantized)
  return TwoKernelStep(quantized)


def make_runner(kind, quantized, x, bits, steps):
  model = block(kind, quantized)
  variables = model.init(jax.random.PRNGKey(0), x, bits)

  def loss(variables, x):
    return jnp.sum(jnp.square(model.apply(variables, x, bits)))

  grad = xla_options.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(variables, x))
  num_params = sum(v.size for v in jax.tree_util.tree_leaves(variables))

  def run():
    out = None
    for _ in range(steps):
      out = grad(variables, x)
    jax.block_until_ready(out)
  return run, num_params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--shapes", default="32x16,16x32,8x64",
                      help="<size>x<channels>,...")
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  rows = []
  for shape in args.shapes.split(","):
    size, channels = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.PRNGKey(1),
                          (args.batch, size, size, channels))
    for precision, quantized, bits in (
        ("float", False, layers.FLOAT_BITS),
        ("4W4A", True, layers.QuantBits.make(4, 4))):
      runners = {kind: make_runner(kind, quantized, x, bits, args.steps)
                 for kind in ("symmetric", "two-kernel")}
      times = {kind: [] for kind in runners}
      for _ in range(args.rounds):
        for kind, (run, _) in runners.items():
          t0 = time.perf_counter()
          run()
          times[kind].append((time.perf_counter() - t0) / args.steps * 1e3)
      sym, two = times["symmetric"], times["two-kernel"]
      ratio = statistics.median(a / b for a, b in zip(sym, two))
      rows.append([f"{size}x{size}x{channels}", precision,
                   f"{statistics.median(sym):.2f}",
                   f"{statistics.median(two):.2f}", f"{ratio:.2f}x",
                   f"{runners['symmetric'][1]:,} / "
                   f"{runners['two-kernel'][1]:,}"])
      print(" | ".join(rows[-1]), flush=True)
  table = common.markdown_table(
      ["input", "bits", "symmetric ms", "two-kernel ms",
       "symmetric / two-kernel", "parameters (sym / two)"], rows)
  text = (f"Forward + backward of one block, batch {args.batch}; median of "
          f"{args.rounds} alternating rounds x {args.steps} calls; jax "
          f"{jax.__version__} on {jax.default_backend()}, compiler options "
          f"{xla_options.compiler_options()}\n\n{table}")
  print("\n" + text)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
