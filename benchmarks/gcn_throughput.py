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


def torch_epoch_fn(config, task, threads: int):
  import torch  # pylint: disable=import-outside-toplevel
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
          fwd = torch.tanh(drop(g, m.dropout_edges, True) @ kernel)
          bwd = torch.tanh(-drop(g, m.dropout_edges, True) @ kernel)
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
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  try:
    if args.no_torch:
      raise ImportError
    import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    have_torch = True
  except ImportError:
    have_torch = False
  rows = []
  for dataset in args.datasets.split(","):
    for precision in args.precisions.split(","):
      for form in args.forms.split(","):
        config = gcn_configs.get_config(f"{dataset},{form},{precision}")
        jax_fn, task = jax_epoch_fn(config)
        torch_fn = torch_epoch_fn(config, task, args.threads) if have_torch \
            else None
        jax_fn()  # compile
        if torch_fn:
          torch_fn()
        jax_rates, torch_rates = [], []
        for _ in range(args.rounds):
          jax_rates.append(measure(jax_fn, args.epochs))
          if torch_fn:
            torch_rates.append(measure(torch_fn, args.epochs))
        j = statistics.median(jax_rates)
        t = statistics.median(torch_rates) if torch_rates else float("nan")
        rows.append([dataset, form, precision.upper(), config.model.width,
                     f"{j:.2f}", f"{t:.2f}", f"{j / t:.2f}x" if torch_rates
                     else "–"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
  table = common.markdown_table(
      ["dataset", "form", "bits", "width", "pdeq-jax epochs/s",
       "PyTorch epochs/s", "ratio"], rows)
  header = (f"PDE-GCN_D, 32 layers, full-batch epoch = train step + eval "
            f"forward; {args.threads} CPU threads; median of {args.rounds} "
            f"rounds x {args.epochs} epochs; jax {jax.__version__}\n\n")
  print(header + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(header + table)


if __name__ == "__main__":
  main()
