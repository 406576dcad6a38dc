"""Training-step cost of fake quantization: 4W4A conv stack vs the same in float.

    python benchmarks/quant_overhead.py [--batch 64] [--depth 6] [--width 32]

Both variants are the same Flax model (``layers.QuantConv`` + ``ActQuant``);
the float one is built with the quantizers switched off.  Steps are timed in
alternating rounds in one process; the table shows the median step time of
each and the ratio (goal: <= 1.15x; quantization is elementwise work).
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
import optax  # noqa: E402

from pdeq_jax import layers  # noqa: E402
from train import common  # noqa: E402


class ConvStack(nn.Module):
  depth: int
  width: int
  quantized: bool

  @nn.compact
  def __call__(self, x, bits):
    for i in range(self.depth):
      x = layers.QuantConv(self.width, 3, quantize_weights=self.quantized and i > 0)(
          x, bits.weights)
      x = nn.relu(x)
      x = layers.ActQuant(enabled=self.quantized)(x, bits.activations)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def make_step(model, tx):
  def loss_fn(params, x, y, bits):
    logits = model.apply(params, x, bits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y, bits):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, bits)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--depth", type=int, default=6)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (args.batch, 32, 32, 3))
  y = jax.random.randint(key, (args.batch,), 0, 10)
  bits = layers.QuantBits.make(4, 4)
  runners = {}
  for name, quantized in (("float", False), ("4W4A", True)):
    model = ConvStack(args.depth, args.width, quantized)
    params = model.init(key, x, bits)
    tx = optax.sgd(0.01, momentum=0.9)
    state = [params, tx.init(params)]
    step = make_step(model, tx)

    def run(state=state, step=step):
      for _ in range(args.steps):
        state[0], state[1], loss = step(state[0], state[1], x, y, bits)
      jax.block_until_ready(loss)
    run()  # compile
    runners[name] = run
  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
  med = {k: statistics.median(v) for k, v in times.items()}
  table = common.markdown_table(
      ["variant", "ms / training step", "ratio to float"],
      [[k, f"{v:.2f}", f"{v / med['float']:.3f}x"] for k, v in med.items()])
  print(f"conv stack: depth {args.depth}, width {args.width}, batch "
        f"{args.batch}, 32x32 input; median of {args.rounds} rounds x "
        f"{args.steps} steps; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}\n\n{table}")


if __name__ == "__main__":
  main()
