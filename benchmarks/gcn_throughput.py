"""Training throughput of the quantized PDE-GCN: pdeq-jax vs PyTorch, one run.

    python benchmarks/gcn_throughput.py [--datasets cora,citeseer] [--epochs 30]

An "epoch" is what the trainer does per epoch: one full-batch training step
(forward, backward, Adam update) and one evaluation forward pass.  The PyTorch
side is written here for the benchmark (never a runtime dependency): the same
network, the same algebra (channel mixing on nodes, one direction per edge,
``index_add_`` scatters), the same quantizer with a straight-through estimator
and the Eq. 11 alpha gradient.  Both sides run on the same CPU threads, in
alternating rounds; the table reports the median epochs/s of each and their
ratio.  Needs ``pip install torch`` (CPU build) for the PyTorch column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pde_gcn as gcn_configs  # noqa: E402
from train import common  # noqa: E402
from train import node_classify  # noqa: E402


def jax_epoch_fn(config):
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  tx = node_classify.create_optimizer(config, params)
  opt_state = tx.init(params)
  train_step = node_classify.make_train_step(model, tx, task)
  eval_step = node_classify.make_eval_step(model, task)
  bits = node_classify.bits_for_epoch(config, 0)
  key = jax.random.PRNGKey(0)
  state = {"params": params, "opt": opt_state, "epoch": 0}

  def epoch():
    rng = jax.random.fold_in(key, state["epoch"])
    state["params"], state["opt"], _ = train_step(state["params"], state["opt"],
                                                  bits, rng)
    metrics = eval_step(state["params"], bits)
    jax.block_until_ready(metrics)
    state["epoch"] += 1
  return epoch, task


def torch_hash_keep_mask(torch, seed: int, shape, keep: float):
  """``pdeq_jax.models.pde_gcn.hash_keep_mask`` in eager PyTorch (int64 ops).

  The same murmur3-style finaliser of ``index * golden + seed`` on 32-bit
  words (kept in int64 and masked; products wrap mod 2^64, so the low 32
  bits are exact), the same threshold: bit-identical masks for the same
  seed (``tests/test_benchmarks.py``).
  """
  mask32 = 0xFFFFFFFF
  v = torch.arange(int(np.prod(shape)), dtype=torch.int64)
  v = (v * 0x9E3779B1 + (seed & mask32)) & mask32
  v = v ^ (v >> 16)
  v = (v * 0x85EBCA6B) & mask32
  v = v ^ (v >> 13)
  v = (v * 0xC2B2AE35) & mask32
  v = v ^ (v >> 16)
  threshold = min(int(keep * 2.0 ** 32), 2 ** 32 - 1)
  return (v < threshold).reshape(shape)


def torch_epoch_fn(config, task, threads: int, edge_mask: str = "bernoulli"):
  """A PyTorch epoch; ``edge_mask``: the edge dropout's mask.

  ``bernoulli``: ``torch.nn.functional.dropout`` (PyTorch's own); ``hash``:
  the counter-based hash mask the JAX side draws (:func:`torch_hash_keep_mask`,
  two seeds per layer).  Input and output dropout are Bernoulli on both
  sides (``jax.random`` on the JAX side).
  """
  import torch  # pylint: disable=import-outside-toplevel
  if edge_mask not in ("bernoulli", "hash"):
    raise ValueError(f"edge_mask must be 'bernoulli' or 'hash', got "
                     f"{edge_mask!r}")
  torch.set_num_threads(threads)
  torch.manual_seed(0)

  class MidriseQuant(torch.autograd.Function):
    """Signed mid-rise fake quantization, STE, Eq. 11 alpha gradient."""

    @staticmethod
    def forward(ctx, x, alpha, levels):
      t = torch.clamp(x / alpha, -1.0, 1.0)
      out = (2.0 * torch.round((t + 1.0) * levels * 0.5) - levels) * (
          alpha / levels)
      ctx.save_for_backward(x, alpha, out)
      return out

    @staticmethod
    def backward(ctx, g):
      x, alpha, out = ctx.saved_tensors
      below, above = x <= -alpha, x >= alpha
      inside = ~(below | above)
      gx = g * inside
      da = torch.where(inside, (out - x) / alpha,
                       above.to(x.dtype) - below.to(x.dtype))
      return gx, (g * da).sum().reshape(alpha.shape), None

  m = config.model
  quantized = config.quant.act_bits != node_classify.FLOAT_BITS
  levels = float(2 ** config.quant.act_bits - 1)
  graph = task.graph
  senders = torch.as_tensor(np.asarray(graph.senders), dtype=torch.long)
  receivers = torch.as_tensor(np.asarray(graph.receivers), dtype=torch.long)
  weights = torch.as_tensor(np.asarray(graph.weights))[:, None]
  sparse = task.features  # SparseFeatures (COO): PyTorch gets the same
  feat_index = torch.as_tensor(np.stack([np.asarray(sparse.rows),
                                         np.asarray(sparse.cols)]),
                               dtype=torch.long)
  feat_values = torch.as_tensor(np.asarray(sparse.values))
  feature_shape = tuple(sparse.shape)
  labels = torch.as_tensor(np.asarray(task.labels), dtype=torch.long)
  train_idx = torch.as_tensor(np.asarray(task.train_idx), dtype=torch.long)
  n, width, depth = feature_shape[0], m.width, m.depth
  if graph.direction_factor != 2.0:
    raise ValueError("the benchmark expects fold_edge_directions=True")

  class Net(torch.nn.Module):
    """The PDE-GCN_D of pdeq_jax.models.pde_gcn (one stored edge direction)."""

    def __init__(self):
      super().__init__()
      self.open = torch.nn.Parameter(
          torch.randn(feature_shape[1], width) * (2.0 / (feature_shape[1] +
                                                         width)) ** 0.5)
      self.close = torch.nn.Linear(width, task.num_classes, bias=False)
      eye = torch.eye(width).expand(depth, width, width)
      self.kernel = torch.nn.Parameter(eye + 1e-3 * torch.randn(depth, width,
                                                                 width))
      self.kernel_out = (None if m.symmetric else torch.nn.Parameter(
          eye + 1e-3 * torch.randn(depth, width, width)))
      self.alpha_state = torch.nn.Parameter(torch.full((depth,), 6.0))
      self.alpha_act = torch.nn.Parameter(torch.full((depth,), 6.0))

    def forward(self, values):
      drop = torch.nn.functional.dropout
      keep = 1.0 - m.dropout_edges

      def edge_drop(g):
        if edge_mask == "bernoulli":
          return drop(g, m.dropout_edges, True)
        seed = int(torch.randint(0, 2 ** 32, ()))
        return torch.where(torch_hash_keep_mask(torch, seed, g.shape, keep),
                           g / keep, 0.0)
      values = drop(values, m.dropout_in, self.training)
      x = torch.sparse.mm(torch.sparse_coo_tensor(feat_index, values,
                                                  feature_shape), self.open)
      x = torch.relu(x)
      x = drop(x, m.dropout_in, self.training)
      for j in range(depth):
        if quantized:
          x = MidriseQuant.apply(x, self.alpha_state[j], levels)
        kernel = self.kernel[j]
        if self.training and m.dropout_edges > 0:
          g = weights * (x[senders] - x[receivers])
          fwd = torch.tanh(edge_drop(g) @ kernel)
          bwd = torch.tanh(-edge_drop(g) @ kernel)
        else:
          xk = x @ kernel
          fwd = torch.tanh(weights * (xk[senders] - xk[receivers]))
          bwd = -fwd
        if quantized:
          e = (MidriseQuant.apply(fwd, self.alpha_act[j], levels) -
               MidriseQuant.apply(bwd, self.alpha_act[j], levels))
        else:
          e = fwd - bwd
        we = weights * e
        div = torch.zeros(n, width).index_add_(0, senders, we).index_add_(
            0, receivers, -we)
        out_kernel = kernel.t() if m.symmetric else self.kernel_out[j]
        x = x - m.h * (div @ out_kernel)
      x = drop(x, m.dropout_out, self.training)
      return torch.log_softmax(self.close(x), -1)

  net = Net()
  o = config.optim
  groups = [
      {"params": [net.open] + list(net.close.parameters()),
       "lr": o.lr, "weight_decay": o.weight_decay},
      {"params": [p for p in (net.kernel, net.kernel_out) if p is not None],
       "lr": o.lr_kernel, "weight_decay": o.weight_decay_kernel},
      {"params": [net.alpha_state, net.alpha_act], "lr": o.lr_alpha,
       "weight_decay": 0.0}]
  opt = torch.optim.Adam(groups)

  def epoch():
    net.train()
    opt.zero_grad()
    loss = torch.nn.functional.nll_loss(net(feat_values)[train_idx],
                                        labels[train_idx])
    loss.backward()
    opt.step()
    net.eval()
    with torch.no_grad():
      net(feat_values)
  return epoch


def measure(fn, epochs: int) -> float:
  t0 = time.perf_counter()
  for _ in range(epochs):
    fn()
  return epochs / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--datasets", default="cora,citeseer")
  parser.add_argument("--precisions", default="fp,4w4a")
  parser.add_argument("--forms", default="sym,nonsym")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch_masks", default="bernoulli,hash",
                      help="PyTorch edge-dropout masks to time, one column "
                      "each: bernoulli (torch's dropout), hash (the JAX "
                      "side's counter-based hash mask)")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  try:
    if args.no_torch:
      raise ImportError
    import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    have_torch = True
  except ImportError:
    have_torch = False
  masks = [k.strip() for k in args.torch_masks.split(",") if k.strip()]
  for k in masks:
    if k not in ("bernoulli", "hash"):
      raise ValueError(f"--torch_masks: {k!r} is not one of bernoulli, hash")
  if not masks:
    have_torch = False
  load_start = os.getloadavg()
  rows = []
  for dataset in args.datasets.split(","):
    for precision in args.precisions.split(","):
      for form in args.forms.split(","):
        config = gcn_configs.get_config(f"{dataset},{form},{precision}")
        jax_fn, task = jax_epoch_fn(config)
        torch_fns = {k: torch_epoch_fn(config, task, args.threads, k)
                     for k in masks} if have_torch else {}
        jax_fn()  # compile
        for fn in torch_fns.values():
          fn()
        jax_rates = []
        torch_rates = {k: [] for k in torch_fns}
        for _ in range(args.rounds):
          jax_rates.append(measure(jax_fn, args.epochs))
          for k, fn in torch_fns.items():
            torch_rates[k].append(measure(fn, args.epochs))
        j = statistics.median(jax_rates)
        row = [dataset, form, precision.upper(), config.model.width,
               f"{j:.2f}"]
        for k in masks:
          row.append(f"{statistics.median(torch_rates[k]):.2f}"
                     if torch_rates.get(k) else "–")
        if torch_fns:
          # Headline: against the faster PyTorch variant (per round).
          best = [max(r) for r in zip(*torch_rates.values())]
          row.append(f"{j / statistics.median(best):.2f}x")
        else:
          row.append("–")
        rows.append(row)
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
  load_end = os.getloadavg()
  mask_names = {"bernoulli": "PyTorch epochs/s (Bernoulli edge dropout)",
                "hash": "PyTorch epochs/s (hash edge dropout, as JAX)"}
  table = common.markdown_table(
      ["dataset", "form", "bits", "width", "pdeq-jax epochs/s"] +
      [mask_names[k] for k in masks] +
      ["ratio (vs the faster PyTorch column)"], rows)
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  header = (f"PDE-GCN_D, 32 layers, full-batch epoch = train step + eval "
            f"forward; {args.threads} CPU threads; median of {args.rounds} "
            f"rounds x {args.epochs} epochs; jax {jax.__version__}.  "
            f"CPU: {cpu} ({os.cpu_count()} CPUs); load average "
            f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end.  "
            f"Edge dropout: pdeq-jax draws counter-based hash masks; the "
            f"PyTorch columns draw Bernoulli masks (torch's dropout) or the "
            f"same hash masks in eager int64 ops; input/output dropout is "
            f"Bernoulli on both sides.  The ratio divides by the faster "
            f"PyTorch column, round by round.\n\n")
  print(header + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(header + table)


if __name__ == "__main__":
  main()
