"""Training-step throughput of the CIFAR ResNets: pdeq-jax vs PyTorch, one run.

    python benchmarks/train_throughput.py [--models resnet56,stable_resnet56] \
        [--precisions fp,4w4a] [--batch 128] [--steps 5] [--rounds 3] \
        [--output results/benchmarks/train_throughput.md]

One training step = forward + backward + SGD update (momentum 0.9, coupled
weight decay 1e-4 on every parameter, as ``torch.optim.SGD`` and the trainer's
default), BatchNorm in train mode, mean cross-entropy, on one random batch of
32x32x3 images and 10 classes.  Reported: images/s of each side, their ratio,
the 4W4A / float step-time overhead of each side and the peak memory of the
step.

* JAX: the registry model (``models.create(name, 10)``), one ``jax.jit`` step
  with the train state donated, as in ``train/classify.py``.  Bits are traced
  int32 arguments (``QuantBits.make``, ``--bits traced``, what the trainer
  does) or Python constants (``--bits static``).
* PyTorch (CPU, eager, NCHW): the same architectures written below, as in the
  authors' code: float stem and head; BasicBlocks with option-B 1x1 conv + BN
  shortcuts; stable blocks ``relu(x - h BN2(Kᵀ Q(relu(BN1(K x)))))`` with one
  shared 3x3 weight (``Kᵀ`` = ``conv_transpose2d`` with the same weight),
  channel growth by concatenating the first ``n_out - n_in`` input channels,
  and 2x2 average pooling.  Quantizers: standardised weights
  ``(w - mean) / (std + 1e-6)``, ``alpha * q(clamp(x / alpha))`` with the
  straight-through round ``t + (round(t L) / L - t).detach()`` on the grids
  of ``pdeq_jax.quant`` (signed weights: ``L = 2^(b-1) - 1``; unsigned
  activations: ``L = 2^b - 1``), learned alphas (3.0 / 6.0).
* Precisions: ``float`` = the quantized network with bits None (clip only, no
  rounding: the paper's full-precision reference), ``<w>w<a>a`` (e.g.
  ``4w4a``), ``fp`` = no quantizers at all (the trainer's ``fp`` config).

Both sides run in one process on the same CPU threads, interleaved: every
round times each config's JAX steps and then its PyTorch steps, so load from
other processes hits both; the tables give medians over rounds (ratios are
medians of per-round ratios).  Parameter counts of the two sides are asserted
equal (and equal to the authors' 855,770 / 405,850 for ResNet-56 / Stable
ResNet-56), and ``--check_batch`` compares logits and gradients of the two
sides with the same weights.  torch is imported lazily and is optional
(``pip install torch``, CPU build); it is not a dependency of pdeq-jax.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from pdeq_jax import layers  # noqa: E402
from pdeq_jax import models  # noqa: E402
from pdeq_jax import xla_options  # noqa: E402
from pdeq_jax.models import resnet as resnet_lib  # noqa: E402
from pdeq_jax.models import stable_resnet as stable_lib  # noqa: E402
from train import classify  # noqa: E402
from train import common  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
# The authors' parameter counts (alphas excluded), CIFAR-10.
EXPECTED_PARAMS = {"resnet56": 855_770, "stable_resnet56": 405_850}
ALPHA_FLOOR = 1e-4  # layers.positive_alpha
STD_EPS = 1e-6      # quant.standardize
MEMORY_TAG = "TRAIN_THROUGHPUT_MEMORY "


# ----------------------------------------------------------------- configs ---

def parse_precision(text: str) -> Tuple[bool, Optional[int], Optional[int]]:
  """``(quantized, weight_bits, act_bits)``; bits None = clip only."""
  text = text.strip().lower()
  if text == "fp":
    return False, None, None
  if text == "float":
    return True, None, None
  match = re.fullmatch(r"(\d+)w(\d+)a", text)
  if not match:
    raise ValueError(f"precision must be 'float', 'fp' or '<w>w<a>a', got "
                     f"{text!r}")
  return True, int(match.group(1)), int(match.group(2))


def precision_label(text: str) -> str:
  return {"float": "float (clip only)", "fp": "fp (no quantizers)"}.get(
      text, text.upper())


def build_jax_model(name: str, quantized: bool):
  model = models.create(name, NUM_CLASSES, quantize_weights=quantized,
                        quantize_activations=quantized)
  if isinstance(model, stable_lib.StableResNet):
    if model.clean_form:
      raise ValueError("the PyTorch side implements the practical stable form")
    kind = "stable"
  elif isinstance(model, resnet_lib.ResNet):
    if model.switches.tv_activation:
      raise ValueError("the PyTorch side has no TV activations")
    kind = "resnet"
  else:
    raise ValueError(f"{name!r} is not a CIFAR ResNet / Stable ResNet")
  return model, kind


def make_data(batch: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(batch,)).astype(np.int32)
  return x, y


def count_jax_params(params) -> Tuple[int, int]:
  """(parameters without alphas, alphas), as the trainer counts them."""
  sizes = classify.count_params(params)
  return sizes["num_params"], sizes["num_alpha"]


# --------------------------------------------------------------------- JAX ---

def jax_optimizer() -> optax.GradientTransformation:
  """SGD + momentum with coupled weight decay on every parameter."""
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.sgd(LR, momentum=MOMENTUM))


def make_jax_init(model, tx):
  def init(key):
    variables = dict(model.init(key, jnp.zeros((1, *IMAGE_SHAPE)),
                                layers.FLOAT_BITS, train=False))
    params = variables.pop("params")
    return {"params": params, "model_state": variables,
            "opt_state": tx.init(params)}
  return init


def make_jax_step(model, tx):
  """``step(state, images, labels, bits) -> (state, loss)``."""
  def step(state, images, labels, bits):
    model_state = state["model_state"]

    def loss_fn(params):
      logits, new_model_state = model.apply(
          {"params": params, **model_state}, images, bits, train=True,
          mutable=list(model_state))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(loss), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "model_state": dict(new_model_state),
            "opt_state": opt_state}, loss
  return step


def jax_bits(precision: str, mode: str):
  _, w, a = parse_precision(precision)
  if mode == "traced":
    return layers.QuantBits.make(w, a)
  return layers.QuantBits(w, a)


def compile_jax_step(model, tx, state_like, x, y, precision: str, mode: str,
                     compiler_options: Dict[str, Any]):
  """(compiled step taking (state, x, y[, bits]), bits argument or None)."""
  step = make_jax_step(model, tx)
  bits = jax_bits(precision, mode)
  if mode == "traced":
    lowered = jax.jit(step, donate_argnums=0,
                      compiler_options=compiler_options).lower(
                          state_like, x, y, bits)
    return lowered.compile(), bits
  lowered = jax.jit(lambda s, xx, yy: step(s, xx, yy, bits),
                    donate_argnums=0,
                    compiler_options=compiler_options).lower(state_like, x, y)
  return lowered.compile(), None


def xla_memory(compiled) -> Dict[str, int]:
  ma = compiled.memory_analysis()
  out = {k: int(getattr(ma, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


class JaxRunner:
  """One config's JAX state and compiled step."""

  def __init__(self, name, precision, x, y, mode, seed, compiled_cache,
               xla_defaults: bool = False):
    quantized, _, _ = parse_precision(precision)
    # The library's per-computation options (pdeq_jax.xla_options, as the
    # trainers compile), or XLA's defaults (the "before" column).
    options = {} if xla_defaults else xla_options.compiler_options()
    self.model, self.kind = build_jax_model(name, quantized)
    tx = jax_optimizer()
    self.state = jax.jit(make_jax_init(self.model, tx))(
        jax.random.PRNGKey(seed))
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    key = (name, quantized, precision if mode == "static" else "traced",
           tuple(sorted(options.items())))
    if key not in compiled_cache:
      t0 = time.perf_counter()
      compiled_cache[key] = compile_jax_step(self.model, tx, self.state,
                                             self.x, self.y, precision, mode,
                                             options)
      print(f"  compiled JAX step {name} {key[2]} in "
            f"{time.perf_counter() - t0:.1f}s", flush=True)
    self.compiled, traced_bits = compiled_cache[key]
    # Traced bits: one executable serves every precision of this model.
    self.bits = None if traced_bits is None else jax_bits(precision, mode)
    self.memory = xla_memory(self.compiled)
    self.params, self.alphas = count_jax_params(self.state["params"])
    self.loss = float("nan")

  def release(self) -> None:
    """Drops the state and executable; the measured fields stay."""
    self.state = self.compiled = self.x = self.y = None

  def host_variables(self):
    return jax.tree_util.tree_map(np.asarray,
                                  {"params": self.state["params"],
                                   **self.state["model_state"]})

  def run(self, steps: int) -> None:
    args = (self.x, self.y) + (() if self.bits is None else (self.bits,))
    loss = None
    for _ in range(steps):
      self.state, loss = self.compiled(self.state, *args)
    jax.block_until_ready((self.state, loss))
    self.loss = float(loss)


# ----------------------------------------------------------------- PyTorch ---

@functools.lru_cache(maxsize=None)
def torch_lib() -> types.SimpleNamespace:
  """The PyTorch networks (torch is imported here, only when needed)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def fake_quant(x, alpha, bits, signed):
    """alpha * q(clamp(x / alpha)), straight-through round (authors' code)."""
    alpha = alpha.clamp_min(ALPHA_FLOOR)
    t = torch.clamp(x / alpha, -1.0 if signed else 0.0, 1.0)
    if bits is not None:
      levels = float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
      t = t + (torch.round(t * levels) / levels - t).detach()
    return alpha * t

  def conv_weight(out_ch, in_ch, k):
    w = torch.empty(out_ch, in_ch, k, k)
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    return nn.Parameter(w)

  class ActQuant(nn.Module):
    def __init__(self, signed=False, alpha=6.0):
      super().__init__()
      self.signed = signed
      self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x, bits):
      return fake_quant(x, self.alpha, bits, self.signed)

    def pairs(self, prefix):
      return [(prefix + ("alpha",), self.alpha, "scalar")]

  class WeightQuant(ActQuant):
    def __init__(self):
      super().__init__(signed=True, alpha=3.0)

    def forward(self, w, bits):
      w_hat = (w - w.mean()) / (w.std(correction=0) + STD_EPS)
      return fake_quant(w_hat, self.alpha, bits, True)

  class QConv(nn.Module):
    """Conv (no bias) with an optional weight quantizer; symmetric
    ``padding=k // 2`` as in the authors' code (and pdeq-jax's ResNets)."""

    def __init__(self, in_ch, out_ch, k, stride=1, quantized=True):
      super().__init__()
      self.stride, self.k = stride, k
      self.weight = conv_weight(out_ch, in_ch, k)
      self.wq = WeightQuant() if quantized else None

    def forward(self, x, bits):
      w = self.weight if self.wq is None else self.wq(self.weight, bits)
      return F.conv2d(x, w, stride=self.stride, padding=self.k // 2)

    def pairs(self, prefix):
      out = [(prefix + ("kernel",), self.weight, "conv")]
      return out + (self.wq.pairs(prefix + ("wq",)) if self.wq else [])

  def bn_pairs(bn, prefix):
    return [(prefix + ("scale",), bn.weight, "vec"),
            (prefix + ("bias",), bn.bias, "vec")]

  def bn_stats(bn, prefix):
    return [(prefix + ("mean",), bn.running_mean, "vec"),
            (prefix + ("var",), bn.running_var, "vec")]

  def maybe_quant(q, x, bits):
    return x if q is None else q(x, bits)

  class BasicBlock(nn.Module):
    """relu(shortcut(x) + BN2(K2 Q(relu(BN1(K1 x))))), x = Q(x) on entry."""

    def __init__(self, n_in, n_out, stride, quantized):
      super().__init__()
      self.aq_in = ActQuant() if quantized else None
      self.conv1 = QConv(n_in, n_out, 3, stride, quantized)
      self.bn1 = nn.BatchNorm2d(n_out)
      self.aq_mid = ActQuant() if quantized else None
      self.conv2 = QConv(n_out, n_out, 3, 1, quantized)
      self.bn2 = nn.BatchNorm2d(n_out)
      self.shortcut = None
      if stride != 1 or n_in != n_out:  # option B
        self.shortcut = QConv(n_in, n_out, 1, stride, quantized)
        self.shortcut_bn = nn.BatchNorm2d(n_out)

    def forward(self, x, bits):
      w_bits, a_bits = bits
      x = maybe_quant(self.aq_in, x, a_bits)
      y = F.relu(self.bn1(self.conv1(x, w_bits)))
      y = maybe_quant(self.aq_mid, y, a_bits)
      y = self.bn2(self.conv2(y, w_bits))
      shortcut = x
      if self.shortcut is not None:
        shortcut = self.shortcut_bn(self.shortcut(x, w_bits))
      return F.relu(shortcut + y)

    def pairs(self, p):
      out = self.conv1.pairs(p + ("conv1",)) + bn_pairs(self.bn1, p + ("bn1",))
      out += self.conv2.pairs(p + ("conv2",)) + bn_pairs(self.bn2, p + ("bn2",))
      for name in ("aq_in", "aq_mid"):
        if getattr(self, name) is not None:
          out += getattr(self, name).pairs(p + (name,))
      if self.shortcut is not None:
        out += self.shortcut.pairs(p + ("shortcut_conv",))
        out += bn_pairs(self.shortcut_bn, p + ("shortcut_bn",))
      return out

    def stats(self, p):
      out = bn_stats(self.bn1, p + ("bn1",)) + bn_stats(self.bn2, p + ("bn2",))
      if self.shortcut is not None:
        out += bn_stats(self.shortcut_bn, p + ("shortcut_bn",))
      return out

  class StableBlock(nn.Module):
    """relu(x - h BN2(Kᵀ Q(relu(BN1(K x))))), x = Q(x); grow; 2x2 pool."""

    def __init__(self, n_in, n_out, pool, h, quantized):
      super().__init__()
      self.n_in, self.n_out, self.pool, self.h = n_in, n_out, pool, h
      self.aq_in = ActQuant() if quantized else None
      self.weight = conv_weight(n_in, n_in, 3)  # K; Kᵀ shares it
      self.wq = WeightQuant() if quantized else None
      self.bn1 = nn.BatchNorm2d(n_in)
      self.aq_mid = ActQuant() if quantized else None
      self.bn2 = nn.BatchNorm2d(n_in)

    def forward(self, x, bits):
      w_bits, a_bits = bits
      x = maybe_quant(self.aq_in, x, a_bits)
      w = self.weight if self.wq is None else self.wq(self.weight, w_bits)
      y = F.relu(self.bn1(F.conv2d(x, w, padding=1)))
      y = maybe_quant(self.aq_mid, y, a_bits)
      y = self.bn2(F.conv_transpose2d(y, w, padding=1))
      y = F.relu(x - self.h * y)
      if self.n_out > self.n_in:
        y = torch.cat([y, x[:, :self.n_out - self.n_in]], dim=1)
      return F.avg_pool2d(y, 2) if self.pool else y

    def pairs(self, p):
      out = [(p + ("kernel",), self.weight, "conv")]
      out += bn_pairs(self.bn1, p + ("bn1",)) + bn_pairs(self.bn2, p + ("bn2",))
      for name in ("aq_in", "wq", "aq_mid"):
        if getattr(self, name) is not None:
          out += getattr(self, name).pairs(p + (name,))
      return out

    def stats(self, p):
      return bn_stats(self.bn1, p + ("bn1",)) + bn_stats(self.bn2, p + ("bn2",))

  class Net(nn.Module):
    """Float stem conv/BN/ReLU, blocks, global average pool, float Linear."""

    def __init__(self, kind, stage_sizes, widths, num_classes, quantized,
                 h=0.1):
      super().__init__()
      self.stem_conv = QConv(3, widths[0], 3, 1, quantized=False)
      self.stem_bn = nn.BatchNorm2d(widths[0])
      blocks, self.names = [], []
      n_in = widths[0]
      for s, (num_blocks, width) in enumerate(zip(stage_sizes, widths)):
        for b in range(num_blocks):
          first = s > 0 and b == 0
          if kind == "resnet":
            blocks.append(BasicBlock(n_in, width, 2 if first else 1,
                                     quantized))
          else:
            blocks.append(StableBlock(n_in, width, first, h, quantized))
          self.names.append(f"stage{s + 1}_block{b + 1}")
          n_in = width
      self.blocks = nn.ModuleList(blocks)
      self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x, bits):
      x = F.relu(self.stem_bn(self.stem_conv(x, None)))
      for block in self.blocks:
        x = block(x, bits)
      return self.head(x.mean(dim=(2, 3)))

    def pairs(self):
      """(JAX params path, torch parameter, layout) for every parameter."""
      out = self.stem_conv.pairs(("stem", "conv"))
      out += bn_pairs(self.stem_bn, ("stem", "bn"))
      for name, block in zip(self.names, self.blocks):
        out += block.pairs((name,))
      out += [(("head", "dense", "kernel"), self.head.weight, "dense"),
              (("head", "dense", "bias"), self.head.bias, "vec")]
      return out

    def stats(self):
      out = bn_stats(self.stem_bn, ("stem", "bn"))
      for name, block in zip(self.names, self.blocks):
        out += block.stats((name,))
      return out

  def to_torch_layout(a, layout):
    a = np.asarray(a)
    if layout == "conv":  # HWIO -> OIHW
      a = a.transpose(3, 2, 0, 1)
    elif layout == "dense":  # [in, out] -> [out, in]
      a = a.T
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))

  def to_jax_layout(t, layout):
    a = t.detach().numpy()
    if layout == "conv":
      return a.transpose(2, 3, 1, 0)
    if layout == "dense":
      return a.T
    return a

  def lookup(tree, path):
    for k in path:
      tree = tree[k]
    return tree

  def load_jax(net, variables):
    """Copies JAX variables ({'params', 'batch_stats'}) into ``net``."""
    with torch.no_grad():
      for path, p, layout in net.pairs():
        p.copy_(to_torch_layout(lookup(variables["params"], path), layout))
      for path, p, layout in net.stats():
        p.copy_(to_torch_layout(lookup(variables["batch_stats"], path),
                                layout))
    pairs = net.pairs()
    named = {id(p) for _, p, _ in pairs}
    if len(named) != len(list(net.parameters())):
      raise AssertionError("not every PyTorch parameter has a JAX counterpart")

  return types.SimpleNamespace(torch=torch, F=F, Net=Net, load_jax=load_jax,
                               to_jax_layout=to_jax_layout, lookup=lookup)


def build_torch_net(jax_model, kind: str, quantized: bool):
  lib = torch_lib()
  return lib.Net(kind, tuple(jax_model.stage_sizes), tuple(jax_model.widths),
                 NUM_CLASSES, quantized, getattr(jax_model, "h", 0.1))


def count_torch_params(net) -> Tuple[int, int]:
  total = alphas = 0
  for name, p in net.named_parameters():
    if name.endswith("alpha"):
      alphas += p.numel()
    else:
      total += p.numel()
  return total, alphas


class TorchRunner:
  """One config's PyTorch network, optimizer and batch."""

  def __init__(self, name, precision, x, y, jax_runner, threads):
    lib = torch_lib()
    lib.torch.set_num_threads(threads)
    quantized, w, a = parse_precision(precision)
    self.bits = (w, a)
    net = build_torch_net(jax_runner.model, jax_runner.kind, quantized)
    lib.load_jax(net, jax_runner.host_variables())  # same start point
    self._start_training(net, x, y)

  def _start_training(self, net, x, y) -> None:
    """SGD on one fixed NCHW batch (shared with :class:`AuthorsRunner`)."""
    torch = torch_lib().torch
    self.net = net
    self.net.train()
    self.params, self.alphas = count_torch_params(self.net)
    self.opt = torch.optim.SGD(self.net.parameters(), lr=LR,
                               momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    self.y = torch.from_numpy(y.astype(np.int64))
    self.loss = float("nan")

  def forward(self):
    return self.net(self.x, self.bits)

  def run(self, steps: int) -> None:
    F = torch_lib().F
    loss = None
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(self.forward(), self.y)
      loss.backward()
      self.opt.step()
    self.loss = loss.item()

  def release(self) -> None:
    """Drops the network, optimizer and batch; the measured fields stay."""
    self.net = self.opt = self.x = self.y = None


# ------------------------------------------------------- the authors' code ---

@functools.lru_cache(maxsize=None)
def authors_lib(path: str) -> Optional[types.SimpleNamespace]:
  """The authors' ``nets.resnet`` / ``nets.stable_resnet``, imported from path.

  ``path`` is a checkout of BGUCompSci/CNNQuantizationThroughPDEs (nothing of
  it is copied here).  Only the two network modules and their
  ``net_components`` are imported: ``nets/__init__.py`` (names that
  ``nets/resnet.py`` lacks) and ``config.py`` are not executed.  None when
  ``path`` has no ``nets/resnet.py``.
  """
  import importlib  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.expanduser(path))
  nets_dir = os.path.join(path, "nets")
  if not os.path.isfile(os.path.join(nets_dir, "resnet.py")):
    return None
  torch_lib()  # torch first (and its OMP_WAIT_POLICY)
  if path not in sys.path:
    sys.path.append(path)  # net_components
  package = types.ModuleType("nets")
  package.__path__ = [nets_dir]
  saved = sys.modules.get("nets")
  sys.modules["nets"] = package
  try:
    resnet = importlib.import_module("nets.resnet")
    stable = importlib.import_module("nets.stable_resnet")
  finally:
    if saved is not None:
      sys.modules["nets"] = saved
  return types.SimpleNamespace(path=path, resnet=resnet, stable=stable)


def build_authors_net(lib: types.SimpleNamespace, jax_model, kind: str,
                      precision: str):
  """The authors' network with the JAX model's stages, or None for ``float``.

  ``fp``: no quantizers (their ``quantize_* = None``); ``<w>w<a>a``: their
  quantizers at those bits.  Their code has no clip-only "float" network.
  """
  quantized, w, a = parse_precision(precision)
  if quantized and (w is None or a is None):
    return None
  widths, sizes = list(jax_model.widths), list(jax_model.stage_sizes)
  block, net_class, extra = (
      (lib.resnet.BasicBlock, lib.resnet.ResNet, {}) if kind == "resnet" else
      (lib.stable.StableBlock, lib.stable.StableResNet,
       {"stable": True, "stability_coeff": float(jax_model.h)}))
  defs = [lib.resnet.LayerDef(block, widths[max(i - 1, 0)], widths[i],
                              sizes[i], 1 if i == 0 else 2)
          for i in range(len(widths))]
  return net_class(NUM_CLASSES, defs, quantize_weights=w,
                   quantize_activations=a, **extra)


class AuthorsRunner(TorchRunner):
  """The authors' network, trained by the same PyTorch loop."""

  def __init__(self, lib, name, precision, x, y, jax_runner, threads):
    # pylint: disable=super-init-not-called
    torch = torch_lib().torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self._start_training(build_authors_net(lib, jax_runner.model,
                                           jax_runner.kind, precision), x, y)

  def forward(self):
    return self.net(self.x)  # the authors' nets hold their bits themselves


def check_equivalence(name: str, precision: str, batch: int, seed: int
                      ) -> Dict[str, float]:
  """Compares logits and gradients of the two sides with the same weights.

  Both sides in train mode on ``batch`` random images.  The learned alphas are
  scaled by 1 + 5% noise first: with all of them at their initial value,
  2x2-pooled quantized channels land exactly on rounding ties of the next
  quantizer, where ulp-level differences pick different levels.

  Returns:
    ``logits``: max |Δ| / max |JAX logits|; ``grad_cos``: cosine similarity
    of the concatenated gradients; ``grad``: max |Δ| over every gradient
    divided by the largest JAX gradient entry.
  """
  lib = torch_lib()
  torch = lib.torch
  quantized, w, a = parse_precision(precision)
  model, kind = build_jax_model(name, quantized)
  state = jax.jit(make_jax_init(model, jax_optimizer()))(
      jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: (np.asarray(v) * np.float32(
          1 + 0.05 * rng.standard_normal())
                       if getattr(path[-1], "key", "") == "alpha"
                       else np.asarray(v)),
      {"params": state["params"], **state["model_state"]})
  x, y = make_data(batch, seed + 1)
  bits = layers.QuantBits(w, a)

  @jax.jit
  def loss_and_grads(params):
    def loss_fn(p):
      logits, _ = model.apply({"params": p, "batch_stats":
                               variables["batch_stats"]}, x, bits, train=True,
                              mutable=["batch_stats"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, y)), logits
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (_, logits_j), grads_j = loss_and_grads(variables["params"])
  net = build_torch_net(model, kind, quantized)
  lib.load_jax(net, variables)
  net.train()
  logits_t = net(torch.from_numpy(np.ascontiguousarray(
      x.transpose(0, 3, 1, 2))), (w, a))
  lib.F.cross_entropy(logits_t, torch.from_numpy(y.astype(np.int64))
                      ).backward()

  logits_j = np.asarray(logits_j)
  logits_err = float(np.max(np.abs(logits_j - logits_t.detach().numpy())) /
                     np.max(np.abs(logits_j)))
  pairs = [(np.asarray(lib.lookup(grads_j, path)).ravel(),
            lib.to_jax_layout(p.grad, layout).ravel())
           for path, p, layout in net.pairs()]
  g_j = np.concatenate([u for u, _ in pairs]).astype(np.float64)
  g_t = np.concatenate([v for _, v in pairs]).astype(np.float64)
  return {"logits": logits_err,
          "grad_cos": float(g_j @ g_t / (np.linalg.norm(g_j) *
                                         np.linalg.norm(g_t))),
          "grad": float(np.max(np.abs(g_j - g_t)) / np.max(np.abs(g_j)))}


# ---------------------------------------------------------------- fp guard ---

def fp_step_ratio(fp_model, quantized_model, precision: str = "4w4a",
                  batch: int = 128, rounds: int = 3, steps: int = 2,
                  warmup: int = 1, seed: int = 0) -> Dict[str, Any]:
  """Step time of the ``fp`` network over its ``precision`` twin, one process.

  Both steps are compiled as the trainers compile them (traced bits,
  ``xla_options``), warmed up, and timed in ``rounds`` interleaved rounds of
  ``steps`` steps.  ``ratio``: median of the per-round ratios fp wall time /
  quantized wall time (> 1: fp slower); ``cpu_ratio``: the same for the
  process's CPU time (user + system), which other jobs on a shared machine
  disturb much less than wall time.
  """
  if not parse_precision(precision)[0]:
    raise ValueError(f"precision must be a quantized one (float or "
                     f"<w>w<a>a), got {precision!r}")
  x, y = map(jnp.asarray, make_data(batch, seed))
  options = xla_options.compiler_options()
  tx = jax_optimizer()
  runs = {}
  for label, model, prec in (("fp", fp_model, "fp"),
                             (precision, quantized_model, precision)):
    state = jax.jit(make_jax_init(model, tx))(jax.random.PRNGKey(seed))
    compiled, bits = compile_jax_step(model, tx, state, x, y, prec,
                                      "traced", options)
    runs[label] = [compiled, state, bits]
  times: Dict[str, List[float]] = {label: [] for label in runs}
  cpu: Dict[str, List[float]] = {label: [] for label in runs}

  def run(label: str, n: int) -> None:
    compiled, state, bits = runs[label]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(n):
      state, loss = compiled(state, x, y, bits)
    jax.block_until_ready((state, loss))
    runs[label][1] = state
    times[label].append((time.perf_counter() - t0) / max(n, 1))
    cpu[label].append((_cpu_seconds() - cpu0) / max(n, 1))

  for label in runs:
    run(label, warmup)
    times[label].clear()
    cpu[label].clear()
  for _ in range(rounds):
    for label in runs:
      run(label, steps)
  ratio = lambda d: statistics.median(f / q for f, q in zip(d["fp"],
                                                             d[precision]))
  return {"ratio": ratio(times), "cpu_ratio": ratio(cpu),
          "fp_s": statistics.median(times["fp"]),
          "quantized_s": statistics.median(times[precision])}


def fp_guard(names: List[str], precision: str, limit: float, batch: int,
             rounds: int, steps: int, warmup: int) -> bool:
  """Prints fp / quantized step-time ratios; False if one exceeds ``limit``."""
  ok = True
  for name in names:
    r = fp_step_ratio(build_jax_model(name, False)[0],
                      build_jax_model(name, True)[0], precision, batch,
                      rounds, steps, warmup)
    # CPU time: robust to other jobs; the recomputation it guards against
    # costs CPU time as much as wall time.
    verdict = "ok" if r["cpu_ratio"] <= limit else f"FAIL (> {limit}x)"
    ok = ok and r["cpu_ratio"] <= limit
    print(f"fp guard {name} batch {batch}: fp {r['fp_s'] * 1e3:.0f} ms, "
          f"{precision.upper()} {r['quantized_s'] * 1e3:.0f} ms per step, "
          f"fp / {precision.upper()} = {r['ratio']:.2f}x wall, "
          f"{r['cpu_ratio']:.2f}x CPU time: {verdict} "
          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
  return ok


# --------------------------------------------------------- PASSIVE column ---

PASSIVE_TAG = "TRAIN_THROUGHPUT_PASSIVE "


class _InitOnly:
  """What TorchRunner needs of a JaxRunner: the model and initial weights."""

  def __init__(self, name, precision, seed):
    self.model, self.kind = build_jax_model(name, parse_precision(precision)[0])
    self.state = jax.jit(make_jax_init(self.model, jax_optimizer()))(
        jax.random.PRNGKey(seed))

  host_variables = JaxRunner.host_variables


def passive_child(spec: str, args) -> None:
  """Fresh process with OMP_WAIT_POLICY=PASSIVE: PyTorch (and authors') s/step."""
  name, precision = spec.split(":")
  x, y = make_data(args.batch, args.seed)
  init = _InitOnly(name, precision, args.seed)
  runners = {"torch": TorchRunner(name, precision, x, y, init, args.threads)}
  authors = authors_lib(args.authors_code) if args.authors_code else None
  if authors is not None and build_authors_net(
      authors, init.model, init.kind, precision) is not None:
    runners["authors"] = AuthorsRunner(authors, name, precision, x, y, init,
                                       args.threads)
  times = {side: [] for side in runners}
  for r in runners.values():
    r.run(args.warmup)
  for _ in range(args.rounds):
    for side, r in runners.items():
      t0 = time.perf_counter()
      r.run(args.steps)
      times[side].append((time.perf_counter() - t0) / args.steps)
  print(PASSIVE_TAG + json.dumps(times), flush=True)


def measure_passive(name: str, precision: str, args) -> Dict[str, List[float]]:
  cmd = [sys.executable, os.path.abspath(__file__), "--_passive_child",
         f"{name}:{precision}", "--batch", str(args.batch),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--rounds", str(args.rounds), "--threads", str(args.threads),
         "--seed", str(args.seed), "--authors_code", args.authors_code]
  env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(PASSIVE_TAG):
      return json.loads(line[len(PASSIVE_TAG):])
  print(f"  PASSIVE child {name}:{precision} failed (rc {proc.returncode}):"
        f"\n{proc.stderr[-2000:]}", file=sys.stderr)
  return {}


# ------------------------------------------------------------------ memory ---

def _proc_status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
  """Resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def memory_child(spec: str, args) -> None:
  """Runs in a fresh process: peak RSS growth over the training steps.

  Baseline: RSS after imports, the input batch and (JAX) the compiled init
  and step functions, i.e. before any parameter exists.  Then the peak-RSS
  counter is reset and the state is created and trained for warmup + steps
  steps; reported is peak RSS - baseline.
  """
  framework, name, precision = spec.split(":")
  if args.cache_dir:
    _enable_compilation_cache(args.cache_dir)
  quantized, _, _ = parse_precision(precision)
  x, y = make_data(args.batch, args.seed)
  steps = args.warmup + args.steps
  if framework == "jax":
    model, _ = build_jax_model(name, quantized)
    tx = jax_optimizer()
    init = jax.jit(make_jax_init(model, tx))
    key = jax.random.PRNGKey(args.seed)
    init_c = init.lower(key).compile()
    state_like = jax.eval_shape(init, key)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    compiled, bits = compile_jax_step(model, tx, state_like, xj, yj,
                                      precision, args.bits,
                                      xla_options.compiler_options())
    extra = () if bits is None else (bits,)
    jax.block_until_ready((xj, yj, extra))
    baseline = _proc_status_kb("VmRSS")
    _reset_peak_rss()
    state = init_c(key)
    for _ in range(steps):
      state, loss = compiled(state, xj, yj, *extra)
    jax.block_until_ready((state, loss))
  else:
    lib = torch_lib()
    torch = lib.torch
    torch.set_num_threads(args.threads)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))
    model, kind = build_jax_model(name, quantized)  # shapes only
    _, w, a = parse_precision(precision)
    authors = authors_lib(args.authors_code) if framework == "authors" \
        else None
    baseline = _proc_status_kb("VmRSS")
    _reset_peak_rss()
    if authors is not None:
      net = build_authors_net(authors, model, kind, precision)
      forward = net
    else:
      net = build_torch_net(model, kind, quantized)
      forward = lambda v: net(v, (w, a))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      loss = lib.F.cross_entropy(forward(xt), yt)
      loss.backward()
      opt.step()
    loss.item()
  peak = _proc_status_kb("VmHWM")
  print(MEMORY_TAG + json.dumps({"baseline_kib": baseline, "peak_kib": peak,
                                 "delta_bytes": (peak - baseline) * 1024}),
        flush=True)


def measure_rss(framework: str, name: str, precision: str, args,
                cache_dir: str) -> Optional[int]:
  cmd = [sys.executable, os.path.abspath(__file__), "--_memory_child",
         f"{framework}:{name}:{precision}", "--batch", str(args.batch),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--threads", str(args.threads), "--bits", args.bits,
         "--seed", str(args.seed), "--cache_dir", cache_dir,
         "--authors_code", args.authors_code]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(MEMORY_TAG):
      return int(json.loads(line[len(MEMORY_TAG):])["delta_bytes"])
  print(f"  memory child {framework}:{name}:{precision} failed "
        f"(rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
  return None


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _enable_compilation_cache(path: str) -> None:
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# -------------------------------------------------------------------- main ---

def mib(n: Optional[float]) -> str:
  return "–" if n is None else f"{n / 2 ** 20:.1f} MiB"


def rate_cell(rates: List[float]) -> str:
  if not rates:
    return "–"
  med = statistics.median(rates)
  if len(rates) == 1:
    return f"{med:.1f}"
  return f"{med:.1f} ({min(rates):.1f}–{max(rates):.1f})"


def check_text(c: Dict[str, float]) -> str:
  return (f"logits max |Δ| / max |JAX| = {c['logits']:.1e}; gradients: "
          f"cosine {c['grad_cos']:.7f}, max |Δ| / max |JAX| = "
          f"{c['grad']:.1e}")


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo; platform.processor() else)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=import-outside-toplevel
  return platform.processor() or "unknown CPU"


def environment_line(args, have_torch: bool) -> str:
  parts = [f"jax {jax.__version__} ({jax.default_backend()})"]
  if have_torch:
    torch = torch_lib().torch
    parts.append(f"torch {torch.__version__} ({args.threads} threads)")
  else:
    parts.append("torch: not used")
  parts.append(f"{os.cpu_count()} CPUs")
  parts.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if os.environ.get("GLIBC_TUNABLES"):
    parts.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']!r}")
  if have_torch:
    parts.append(f"OMP_WAIT_POLICY="
                 f"{os.environ.get('OMP_WAIT_POLICY', '')!r}")
  return ", ".join(parts)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet56,stable_resnet56",
                      help="registry names: resnet20/32/44/56/110, "
                      "stable_resnet8/20/56, ...")
  parser.add_argument("--precisions", default="fp,4w4a",
                      help="float (clip only), fp (no quantizers), <w>w<a>a")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch.set_num_threads")
  parser.add_argument("--bits", choices=("traced", "static"), default="traced",
                      help="JAX bits as traced int32 arguments (as the "
                      "trainer) or compile-time constants")
  parser.add_argument("--check_batch", type=int, default=4,
                      help="batch of the JAX/PyTorch logits+gradients check "
                      "(0: skip)")
  parser.add_argument("--skip_memory", action="store_true",
                      help="skip the peak-RSS subprocesses")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--xla_defaults", action="store_true",
                      help="also time the JAX step compiled with XLA's "
                      "default options (without pdeq_jax.xla_options): the "
                      "before/after of the library's CPU settings")
  parser.add_argument("--omp_wait_policy", default="env",
                      choices=("passive", "active", "env"),
                      help="OMP_WAIT_POLICY for torch's OpenMP threads "
                      "(default env: leave the environment alone, i.e. "
                      "PyTorch's defaults); see the notes")
  parser.add_argument("--passive", action="store_true",
                      help="extra PyTorch column(s) measured with "
                      "OMP_WAIT_POLICY=PASSIVE (in a child process, after "
                      "the interleaved rounds): for machines shared with "
                      "other jobs")
  parser.add_argument("--authors_code", default="",
                      help="path of a checkout of the authors' code "
                      "(BGUCompSci/CNNQuantizationThroughPDEs): adds their "
                      "nets/ networks as a third column (imported from "
                      "there, skipped when the path has no nets/resnet.py)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="", help="markdown file to write")
  parser.add_argument("--fp_guard", type=float, default=0.0,
                      help="guard mode: time only the fp and the first "
                      "quantized --precisions step of each model (JAX) and "
                      "exit with status 1 if fp is more than this many "
                      "times slower (e.g. 1.5)")
  parser.add_argument("--_memory_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_passive_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._memory_child:  # pylint: disable=protected-access
    memory_child(args._memory_child, args)  # pylint: disable=protected-access
    return
  if args._passive_child:  # pylint: disable=protected-access
    passive_child(args._passive_child, args)  # pylint: disable=protected-access
    return

  if args.fp_guard:
    quantized = [p for p in args.precisions.split(",")
                 if p.strip() and parse_precision(p)[0]]
    if not quantized:
      raise ValueError(f"--fp_guard needs a quantized precision in "
                       f"--precisions, got {args.precisions!r}")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not fp_guard(names, quantized[0].strip().lower(), args.fp_guard,
                    args.batch, args.rounds, args.steps, args.warmup):
      sys.exit(1)
    return

  if args.omp_wait_policy != "env":
    if "torch" in sys.modules:
      print("warning: torch already imported, --omp_wait_policy has no "
            "effect", file=sys.stderr)
    # Read by libgomp when torch is imported (and by the memory children).
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
  have_torch = False
  if not args.skip_torch:
    try:
      torch_lib()
      have_torch = True
    except ImportError:
      print("torch not installed: JAX columns only", file=sys.stderr)
  authors = None
  if have_torch and args.authors_code:
    authors = authors_lib(args.authors_code)
    if authors is None:
      print(f"--authors_code={args.authors_code!r} has no nets/resnet.py: "
            f"no authors' column", file=sys.stderr)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  precisions = [p.strip().lower() for p in args.precisions.split(",")
                if p.strip()]
  for p in precisions:
    parse_precision(p)
  for n in names:
    build_jax_model(n, True)
  env = environment_line(args, have_torch)
  load_start = os.getloadavg()
  print(env, flush=True)

  cache_dir = "" if args.skip_memory else tempfile.mkdtemp(prefix="jax_cc_")
  if cache_dir:
    _enable_compilation_cache(cache_dir)
  try:
    configs = [(n, p) for n in names for p in precisions]
    x, y = make_data(args.batch, args.seed)
    compiled_cache: Dict[Any, Any] = {}
    jax_runners, torch_runners, checks = {}, {}, {}
    default_runners, authors_runners = {}, {}
    sides = (("jax", jax_runners), ("jax_default", default_runners),
             ("torch", torch_runners), ("authors", authors_runners))
    times = {c: {side: [] for side, _ in sides} for c in configs}
    cpu_times = {c: {side: [] for side, _ in sides} for c in configs}
    # One config at a time (its runners interleaved round by round), then
    # its states and executables are released: a dozen live 1.5 GB training
    # states slowed every side by memory pressure.
    for c in configs:
      n, p = c
      if compiled_cache and n not in {k[0] for k in compiled_cache}:
        compiled_cache.clear()
      print(f"setting up {n} {p}", flush=True)
      jr = JaxRunner(n, p, x, y, args.bits, args.seed, compiled_cache)
      jax_runners[c] = jr
      if args.xla_defaults:
        default_runners[c] = JaxRunner(n, p, x, y, args.bits, args.seed,
                                       compiled_cache, xla_defaults=True)
        default_runners[c].run(args.warmup)
      if n in EXPECTED_PARAMS:
        assert jr.params == EXPECTED_PARAMS[n], (n, jr.params)
      if have_torch:
        tr = TorchRunner(n, p, x, y, jr, args.threads)
        assert (tr.params, tr.alphas) == (jr.params, jr.alphas), (
            f"{n} {p}: PyTorch has {tr.params} params + {tr.alphas} alphas, "
            f"JAX {jr.params} + {jr.alphas}")
        torch_runners[c] = tr
        if args.check_batch > 0:
          checks[c] = check_equivalence(n, p, args.check_batch, args.seed)
          print(f"  check {n} {p}: {check_text(checks[c])}", flush=True)
          if not (checks[c]["logits"] < 1e-3 and
                  checks[c]["grad_cos"] > 0.999):
            raise AssertionError(f"{n} {p}: the PyTorch network does not "
                                 f"match the JAX one: {checks[c]}")
      if authors is not None and build_authors_net(authors, jr.model,
                                                   jr.kind, p) is not None:
        ar = AuthorsRunner(authors, n, p, x, y, jr, args.threads)
        assert (ar.params, ar.alphas) == (jr.params, jr.alphas), (
            f"{n} {p}: the authors' net has {ar.params} params + "
            f"{ar.alphas} alphas, JAX {jr.params} + {jr.alphas}")
        authors_runners[c] = ar
        ar.run(args.warmup)
      jr.run(args.warmup)
      if have_torch:
        torch_runners[c].run(args.warmup)

      for r in range(args.rounds):
        for side, runners in sides:
          if c not in runners:
            continue
          cpu0, t0 = _cpu_seconds(), time.perf_counter()
          runners[c].run(args.steps)
          times[c][side].append((time.perf_counter() - t0) / args.steps)
          cpu_times[c][side].append((_cpu_seconds() - cpu0) / args.steps)
        line = f"round {r + 1}/{args.rounds} {n} {p}: JAX " + \
            f"{args.batch / times[c]['jax'][-1]:.1f} img/s"
        if times[c]["jax_default"]:
          line += (f", JAX with XLA defaults "
                   f"{args.batch / times[c]['jax_default'][-1]:.1f} img/s")
        if times[c]["torch"]:
          line += f", PyTorch {args.batch / times[c]['torch'][-1]:.1f} img/s"
        if times[c]["authors"]:
          line += (f", authors' code "
                   f"{args.batch / times[c]['authors'][-1]:.1f} img/s")
        print(line, flush=True)
      for _, runners in sides:
        if c in runners:
          runners[c].release()
      gc.collect()
    load_end = os.getloadavg()

    passive = {}
    if have_torch and args.passive:
      for n, p in configs:
        print(f"PASSIVE child: {n} {p}", flush=True)
        passive[n, p] = measure_passive(n, p, args)

    rss = {}
    if not args.skip_memory:
      for n, p in configs:
        sides_rss = ("jax", "torch") if have_torch else ("jax",)
        if (n, p) in authors_runners:
          sides_rss += ("authors",)
        for side in sides_rss:
          print(f"peak RSS: {side} {n} {p}", flush=True)
          rss[side, n, p] = measure_rss(side, n, p, args, cache_dir)
  finally:
    if cache_dir:
      shutil.rmtree(cache_dir, ignore_errors=True)

  def med_ratio(a: List[float], b: List[float]) -> float:
    return statistics.median(u / v for u, v in zip(a, b))

  rows = []
  for c in configs:
    n, p = c
    jr = jax_runners[c]
    jt, tt = times[c]["jax"], times[c]["torch"]
    dt = times[c]["jax_default"]
    row = [n, precision_label(p), f"{jr.params:,} + {jr.alphas} α",
           rate_cell([args.batch / t for t in jt])]
    if args.xla_defaults:
      row += [rate_cell([args.batch / t for t in dt]),
              f"{med_ratio(dt, jt):.2f}x"]
    row += [rate_cell([args.batch / t for t in tt]),
            f"{med_ratio(tt, jt):.2f}x" if tt else "–"]
    if args.xla_defaults:
      row.append(f"{med_ratio(tt, dt):.2f}x" if tt else "–")
    if authors is not None:
      at = times[c]["authors"]
      row += [rate_cell([args.batch / t for t in at]),
              f"{med_ratio(at, jt):.2f}x" if at else "–"]
    if args.passive and have_torch:
      pt = passive.get(c, {})
      row.append(rate_cell([args.batch / t for t in pt.get("torch", [])]))
      if authors is not None:
        row.append(rate_cell([args.batch / t
                              for t in pt.get("authors", [])]))
    rows.append(row)
  columns = ["model", "bits", "params", "JAX img/s"]
  if args.xla_defaults:
    columns += ["JAX img/s, XLA defaults", "speed-up of the library options"]
  columns += ["PyTorch img/s", "JAX / PyTorch"]
  if args.xla_defaults:
    columns.append("JAX with XLA defaults / PyTorch")
  if authors is not None:
    columns += ["authors' code img/s", "JAX / authors"]
  if args.passive and have_torch:
    columns.append("PyTorch img/s, PASSIVE")
    if authors is not None:
      columns.append("authors' code img/s, PASSIVE")
  table = common.markdown_table(columns, rows)

  cpu_rows = []
  for c in configs:
    jc, tc = cpu_times[c]["jax"], cpu_times[c]["torch"]
    jt, tt = times[c]["jax"], times[c]["torch"]

    def cores(cpu, wall):
      return f"{statistics.median(u / v for u, v in zip(cpu, wall)):.2f}"
    cpu_rows.append([
        c[0], precision_label(c[1]), f"{statistics.median(jc):.3f}",
        f"{statistics.median(tc):.3f}" if tc else "–",
        f"{med_ratio(tc, jc):.2f}x" if tc else "–",
        cores(jc, jt) + (" / " + cores(tc, tt) if tc else "")])
  cpu_table = common.markdown_table(
      ["model", "bits", "JAX CPU-s / step", "PyTorch CPU-s / step",
       "JAX / PyTorch", "cores busy JAX / PyTorch"], cpu_rows)

  overhead_rows = []
  for base in ("float", "fp"):
    if base not in precisions:
      continue
    for n in names:
      for p in precisions:
        if p in ("float", "fp"):
          continue
        cells = [n, f"{precision_label(p)} / {base}"]
        for side in ("jax", "torch") + (("authors",) if authors else ()):
          t_q, t_f = times[n, p][side], times[n, base][side]
          cells.append(f"{med_ratio(t_q, t_f):.3f}x" if t_q and t_f else "–")
        overhead_rows.append(cells)
  overhead = common.markdown_table(
      ["model", "step time ratio", "JAX", "PyTorch"] +
      (["authors' code"] if authors else []),
      overhead_rows) if overhead_rows else ""

  mem_rows = []
  for c in configs:
    n, p = c
    m = jax_runners[c].memory
    mem_rows.append([n, precision_label(p), mib(m["total"]), mib(m["temp"]),
                     mib(m["argument"]), mib(m["output"]), mib(m["alias"]),
                     mib(rss.get(("jax", n, p))),
                     mib(rss.get(("torch", n, p)))] +
                    ([mib(rss.get(("authors", n, p)))]
                     if authors is not None else []))
  memory = common.markdown_table(
      ["model", "bits", "JAX XLA total", "temp", "args", "outputs",
       "aliased", "JAX peak RSS Δ", "PyTorch peak RSS Δ"] +
      (["authors' code peak RSS Δ"] if authors is not None else []),
      mem_rows)

  check_lines = ""
  if checks:
    check_lines = (
        "Equivalence check (same weights, α scaled by 1 + 5% noise, train "
        f"mode, batch {args.check_batch}; "
        "asserted: logits < 1e-3 and gradient cosine > 0.999):\n\n" +
        "\n".join(f"* {n} {p}: {check_text(c)}"
                   for (n, p), c in checks.items()) + "\n\n")
  losses = ", ".join(
      f"{n} {p}: JAX {jax_runners[n, p].loss:.3f}" +
      (f" / PyTorch {torch_runners[n, p].loss:.3f}"
       if (n, p) in torch_runners else "") +
      (f" / authors {authors_runners[n, p].loss:.3f}"
       if (n, p) in authors_runners else "") for n, p in configs)

  header = (
      f"# Training-step throughput (train_throughput.py)\n\n"
      f"One SGD step (forward, backward, momentum {MOMENTUM}, weight decay "
      f"{WEIGHT_DECAY}, BatchNorm in train mode, cross-entropy), batch "
      f"{args.batch} of 32x32x3 random images, {NUM_CLASSES} classes.  "
      f"Median over {args.rounds} interleaved rounds x {args.steps} steps "
      f"(after {args.warmup} warm-up steps); img/s cells give median "
      f"(min–max); ratios are medians of per-round ratios.  JAX bits: "
      f"{args.bits}.\n\n{env}.\n\n")
  machine = (f"CPU: {cpu_model()} ({os.cpu_count()} CPUs); load average "
             f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
             f"{' (other jobs shared the CPU)' if load_start[0] > 0.5 else ''}"
             f".\n\n")
  notes = (
      "\nNotes:\n\n"
      "* JAX img/s: the step compiled as the trainers compile it, with "
      f"`pdeq_jax.xla_options.compiler_options()` = "
      f"`{xla_options.compiler_options()}`; XLA defaults: the same step "
      "compiled without them (`--xla_defaults`).\n"
      "* float = the quantized network with bits None: clipping, no "
      "rounding; fp = no quantizers at all.  With traced bits (the "
      "trainer's way) JAX runs one executable for every precision: it "
      "computes the rounded branch too and selects with `where`.\n"
      "* params: without the learned clipping scales α (counted apart); "
      "asserted equal on both sides and to the authors' counts for "
      "resnet56 / stable_resnet56.\n"
      "* JAX XLA total = arguments + outputs − aliased (donated) + temp, "
      "from the compiled step's `memory_analysis()`: the buffers XLA "
      "assigns for one step (state in and out, activations, gradients).\n"
      "* peak RSS Δ: a fresh subprocess per cell; baseline = RSS after "
      "imports, the batch and (JAX) the compiled init and step; then the "
      "peak-RSS counter (VmHWM) is reset via /proc/self/clear_refs, the "
      "model, optimizer state and warm-up + timed steps run, and peak RSS − "
      "baseline is reported.  Same method on both sides; it includes "
      "allocator caching and library workspaces, so it is an upper bound of "
      "live tensors.\n"
      "* PyTorch: eager, NCHW, default oneDNN convolutions, "
      "`torch.optim.SGD` (for-loop implementation).\n"
      "* PyTorch runs at its defaults (OMP_WAIT_POLICY as in the "
      "environment, shown above, unless `--omp_wait_policy` is given).  "
      "With libgomp's default active spinning, 2-thread torch ran 5-10x "
      "slower on the 2-core machine whenever other jobs were running, and "
      "PASSIVE cost it 15-25% on a quiet machine; `--passive` adds PyTorch "
      "columns measured with PASSIVE in a child process (after the "
      "interleaved rounds, so not interleaved with JAX).\n"
      "* authors' code (`--authors_code=PATH`): the networks of "
      "BGUCompSci/CNNQuantizationThroughPDEs `nets/resnet.py` / "
      "`nets/stable_resnet.py`, imported from PATH at run time (not copied "
      "here), with the JAX model's stages and widths (Stable ResNet: "
      "`stable=True`, `stability_coeff` = h), their quantizers at the row's "
      "bits (none for fp; their code has no clip-only float network: –), "
      "their own initialisation, trained by the same SGD loop as the "
      "PyTorch column.  Parameter and α counts are asserted equal to the "
      "JAX model's.\n"
      f"* final losses: {losses}.\n")
  text = (header + machine + table +
          "\nCPU time per step (user + system of the process, all threads; "
          "less sensitive to other jobs than wall time; the ratio is in "
          "throughput per CPU-second):\n\n" + machine + cpu_table +
          ("\nStep time relative to float (clip only) or fp (no "
           "quantizers), e.g. the cost of 4W4A quantization:\n\n" + machine + overhead if overhead else "") +
          "\nPeak memory of the training step:\n\n" + machine + memory +
          "\n" +
          check_lines + notes)
  print("\n" + text)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
