"""Stable (symmetric) quantized ResNets: Sec. 4 and 4.1 of the paper.

Every block is one symmetric step (Eq. 15)

    x_{j+1} = Q_b(x_j - h K_jᵀ Q_b(σ(K_j x_j)))

with ``K_jᵀ`` the adjoint of the same (quantized) 3x3 convolution, obtained
with ``jax.vjp`` (:func:`pdeq_jax.operators.adjoint`): one weight tensor per
block.  The outer ``Q_b`` is the next block's input quantizer.  Channels grow
by concatenation (Eq. 20, :func:`pdeq_jax.operators.grow_channels`: the
updated state followed by the first ``n_out - n_in`` channels of the block
input) and the resolution halves by 2x2 average pooling after the step: there
are no strided convolutions and no 1x1 projections.

Two forms of the step:

* practical (default), as in the authors' ``StableBlock``: BatchNorm after
  ``K`` and after ``Kᵀ`` and a ReLU after the residual update,
  ``relu(x - h BN₂(Kᵀ Q(relu(BN₁(K x)))))``;
* ``clean_form=True``: the paper's plain Eq. 15, ``x - h Kᵀ Q(σ(K x))``,
  via :func:`pdeq_jax.operators.symmetric_update` (the residual stream can
  then be negative, so block inputs are quantized on a signed grid).

The operator a step applies is the standardised, quantized kernel ``K_q``
(Eq. 12), not the float parameter: at initialisation (Stable ResNet-20,
4-bit weights, h = 0.1; ``benchmarks/stability_margin.py``, seeds 0 and 1)
the float kernels have ``h ||K||₂² = 0.76-0.88`` but ``K_q`` has
``h ||K_q||₂² = 54-67`` in stage 1 and up to 240 in stage 3, far above the
stability bound 2.  So the clean form ties its step size to the applied
kernel (the documented choice, ``max_h_norm_sq``): ``h_eff = min(h, c /
||K_q||₂²)`` with ``||K_q||₂`` estimated by power iteration
(:func:`pdeq_jax.operators.norm_tied_step`, ``c = 1``, half the bound),
which makes the step stable by construction whatever the weights' scale
(the estimate needs only be within a factor √2; measured at initialisation
with 16 iterations: ``h_eff ||K_q||₂² = 1.03-1.07``);
``max_h_norm_sq=None`` restores the fixed ``h`` of plain Eq. 15.
:func:`applied_kernels` and :func:`stability_report` measure the margin on
the applied operator, BatchNorm scales of the practical form included.

The stem (float 3x3 conv, BN, ReLU) and the classifier (float Dense) are those
of :mod:`pdeq_jax.models.resnet`.  With widths 16/32/64 and 9 blocks per
stage the network has 405,850 parameters (CIFAR-10), the authors' count.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import layers
from pdeq_jax import operators
from pdeq_jax.models import resnet
from pdeq_jax.models import scan_blocks as scan_lib
from pdeq_jax.models.switches import ModelSwitches
from pdeq_jax.models.switches import QUANT_ONLY

Array = jax.Array
LinearFn = Callable[[Array], Array]
Activation = Callable[[Array], Array]


def symmetric_residual(x: Array, linear_fn: LinearFn, h: Any,
                       inner: Activation,
                       outer: Optional[Activation] = None) -> Array:
  """``x - h outer(Kᵀ inner(K x))`` with ``Kᵀ`` the ``jax.vjp`` adjoint of K.

  ``outer=None`` is the plain symmetric step of Eq. 6 / 15 and calls
  :func:`pdeq_jax.operators.symmetric_update`.  A non-identity ``outer``
  (the authors' BatchNorm after ``Kᵀ``) takes ``Kᵀ`` from
  :func:`pdeq_jax.operators.adjoint`; either way ``Kᵀ`` shares K's weights.

  Args:
    x: the state ``x_j`` (the input of ``K``).
    linear_fn: the linear operator ``K`` (a convolution, or the separable
      ``K_dw K_1x1`` of the stable MobileNetV2).
    h: step size.
    inner: what acts on ``K x`` (σ, its quantizer, and a norm if any).
    outer: what acts on ``Kᵀ(·)`` before the update, or None.
  """
  if outer is None:
    return operators.symmetric_update(x, linear_fn, h, inner)
  k_transpose = operators.adjoint(linear_fn, x.shape, x.dtype)
  return x - h * outer(k_transpose(inner(linear_fn(x))))


def grow_and_pool(x_prev: Array, x_new: Array, n_out: int,
                  pool: bool) -> Array:
  """Eq. 20 channel growth to ``n_out``, then optional 2x2 average pooling."""
  y = operators.grow_channels(x_prev, x_new, n_out)
  return operators.avg_pool2x2(y) if pool else y


class StableBlock(nn.Module):
  """One symmetric step with channel growth and optional pooling.

  Parameters: one 3x3 kernel ``[3, 3, n_in, n_in]`` (``K``; ``Kᵀ`` is its
  adjoint), its weight quantizer, two activation quantizers and, in the
  practical form, two BatchNorms of ``n_in`` channels.

  Attributes:
    features: ``n_out``; requires ``n_in <= n_out <= 2 n_in``.
    pool: 2x2 average pooling after the step.
    h: step size (the authors' ``stability_coeff``).
    clean_form: the paper's plain Eq. 15 (no BatchNorm, no outer ReLU).
    max_h_norm_sq: clean form only: the step is ``min(h, max_h_norm_sq /
      ||K_q||₂²)`` for the applied kernel ``K_q`` (stable when < 2); None:
      the fixed ``h``.
    norm_iters: power iterations of that norm estimate.
    act: σ (ReLU; tanh etc. for analysis).
    act_signed: σ can be negative (tanh): quantize its output signed.
    input_signed: the block input is quantized on a signed grid.
    switches: the quantizers (``quantize_*``; no TV switch here).
  """
  features: int
  pool: bool = False
  h: float = 0.1
  clean_form: bool = False
  max_h_norm_sq: Optional[float] = 1.0
  norm_iters: int = 16
  act: Activation = nn.relu
  act_signed: bool = False
  input_signed: bool = False
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    resnet.check_image_input(x)
    n_in = x.shape[-1]
    operators.check_channel_growth(
        n_in, self.features, "StableBlock channel change", "features")
    x = layers.ActQuant(signed=self.input_signed,
                        enabled=self.switches.quantize_activations,
                        name="aq_in")(x, bits.activations)
    kernel = self.param("kernel", resnet.conv_init, (3, 3, n_in, n_in))
    kernel = layers.WeightQuant(enabled=self.switches.quantize_weights,
                                name="wq")(kernel, bits.weights)
    k_fn = lambda v: operators.conv(v, kernel)
    act_quant = layers.ActQuant(signed=self.act_signed,
                                enabled=self.switches.quantize_activations,
                                name="aq_mid")
    if self.clean_form:
      y = symmetric_residual(
          x, k_fn, self.step_size(k_fn, x.shape),
          lambda v: act_quant(self.act(v), bits.activations))
    else:
      norm = resnet.batch_norm(train)
      bn1, bn2 = norm(name="bn1"), norm(name="bn2")
      y = symmetric_residual(
          x, k_fn, self.h,
          lambda v: act_quant(self.act(bn1(v)), bits.activations), bn2)
      y = nn.relu(y)
    return grow_and_pool(x, y, self.features, self.pool)

  def step_size(self, k_fn: LinearFn, x_shape: Sequence[int]) -> Any:
    """The clean form's step: ``h``, or tied to the applied kernel's norm."""
    if self.max_h_norm_sq is None:
      return self.h
    return operators.norm_tied_step(k_fn, (1,) + tuple(x_shape[1:]), self.h,
                                    self.max_h_norm_sq, iters=self.norm_iters)


class StableResNet(nn.Module):
  """Fully symmetric ResNet (except the float stem and classifier).

  Attributes:
    num_classes: classifier outputs.
    stage_sizes: blocks per stage (``(9, 9, 9)``: Stable ResNet-56).
    widths: channels per stage; consecutive widths must satisfy Eq. 20's
      ``w <= w_next <= 2 w``.  The first block of every stage after the first
      grows the channels and pools.
    h: step size of every block (0.1 in the authors' runs).
    clean_form: the paper's plain Eq. 15 steps instead of the authors'
      practical form (BatchNorms and outer ReLU).
    max_h_norm_sq: clean form: step ``min(h, max_h_norm_sq / ||K_q||₂²)``
      per block (None: fixed ``h``).
    act / act_signed: σ and whether its quantizer is signed.
    switches: the quantizers (``quantize_*``; no TV switch here).
    scan_blocks: blocks 2..n of every stage under ``nn.scan`` (see
      :mod:`pdeq_jax.models.scan_blocks`; the analysis helpers below read
      the unrolled layout: ``scan_blocks.unstack_blocks`` first).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  h: float = 0.1
  clean_form: bool = False
  max_h_norm_sq: Optional[float] = 1.0
  act: Activation = nn.relu
  act_signed: bool = False
  switches: ModelSwitches = ModelSwitches()
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False
               ) -> resnet.Output:
    """Logits ``[N, num_classes]`` (and every block's output if asked)."""
    resnet.check_image_input(x)
    self.switches.check_supported("StableResNet", QUANT_ONLY)
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must have the same length")
    x = resnet.Stem(self.widths[0], name="stem")(x, train=train)
    hidden = []
    for s, (num_blocks, width) in enumerate(zip(self.stage_sizes,
                                                self.widths)):
      for b in range(num_blocks):
        first = s == 0 and b == 0  # its input follows the stem's ReLU
        block = functools.partial(
            StableBlock, width, pool=s > 0 and b == 0, h=self.h,
            clean_form=self.clean_form, max_h_norm_sq=self.max_h_norm_sq,
            act=self.act, act_signed=self.act_signed,
            input_signed=self.clean_form and not first,
            switches=self.switches)
        if b == 1 and self.scan_blocks:  # blocks 2..n are identical
          x, outs = scan_lib.run_blocks(block, num_blocks - 1, x, bits,
                                        train=train,
                                        name=f"stage{s + 1}_blocks")
          hidden.extend(outs)
          break
        x = block(name=f"stage{s + 1}_block{b + 1}")(x, bits, train=train)
        hidden.append(x)
    logits = resnet.Head(self.num_classes, name="head")(x)
    return (logits, hidden) if return_hidden else logits


def symmetric_kernels(params: Dict[str, Any]) -> Dict[str, Array]:
  """Block name -> float kernel *parameter* ``K`` of every symmetric step.

  This is not the operator the network applies (see :func:`applied_kernels`
  for the margin); accepts ``variables`` or ``variables['params']``.
  """
  params = params.get("params", params)
  return {name: sub["kernel"] for name, sub in params.items()
          if hasattr(sub, "keys") and "kernel" in sub}


def block_input_shape(name: str, image_size: int, channels: int
                      ) -> tuple:
  """``(1, H, W, C)`` of block ``stage{s}_block{b}``'s step (the first block
  of a later stage steps before its pooling)."""
  match = re.fullmatch(r"stage(\d+)_block(\d+)", name)
  if match is None:
    raise ValueError(f"block name must be 'stage<s>_block<b>', got {name!r}")
  stage, block = (int(p) for p in match.groups())
  size = image_size >> max(0, stage - 1 - (block == 1))
  return (1, size, size, channels)


def bn_scales(variables: Dict[str, Any], block: str, norm: str,
              eps: float = 1e-5) -> Array:
  """Eval-mode per-channel BatchNorm factor ``γ / sqrt(running var + ε)``."""
  scale = variables["params"][block][norm]["scale"]
  var = variables["batch_stats"][block][norm]["var"]
  return scale * jax.lax.rsqrt(var + eps)


def applied_kernels(variables: Dict[str, Any], weight_bits: Any = None, *,
                    clean_form: bool = False) -> Dict[str, Array]:
  """Block name -> HWIO kernel ``M`` of the operator each step applies.

  ``K_q`` is the kernel after the block's weight quantizer (standardised,
  then quantized at ``weight_bits``; ``None`` = clip only), or the float
  kernel in a block without one.  Clean form: ``M = K_q``.

  Practical (authors' BN) form, eval mode: the step is ``x - h S₂ K_qᵀ Q(σ(
  S₁ K_q x + b₁)) + ...`` with ``S₁, S₂`` the diagonal BN factors of
  :func:`bn_scales`.  Its Jacobian before the outer ReLU, ``I - h S₂ K_qᵀ D
  S₁ K_q`` (``0 <= D <= L``, diagonal), is similar (by ``S₂^{1/2}``) to the
  symmetric ``I - h Mᵀ D M`` with ``M = S₁^{1/2} K_q S₂^{1/2}`` when every
  factor is positive, so ``h L ||M||₂² < 2`` is its stability margin
  (eigenvalues in ``(-1, 1]``; non-expansive in the ``S₂^{-1/2}``-weighted
  norm, which the outer ReLU keeps).  ``M`` is ``K_q`` with output channel
  ``o`` scaled by ``sqrt(s₁[o])`` and input channel ``i`` by
  ``sqrt(s₂[i])``; non-positive factors (no such similarity: the step can
  expand) enter as ``sqrt(|s|)`` and :func:`stability_report` flags them.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a StableResNet.
    weight_bits: the weight bit width the step is run at.
    clean_form: whether the network is the clean form (no BatchNorms).
  """
  out = {}
  for name, kernel in symmetric_kernels(variables).items():
    block = variables["params"][name]
    if "wq" in block:
      kernel = layers.WeightQuant().apply({"params": block["wq"]}, kernel,
                                          weight_bits)
    if not clean_form:
      s1 = jnp.sqrt(jnp.abs(bn_scales(variables, name, "bn1")))
      s2 = jnp.sqrt(jnp.abs(bn_scales(variables, name, "bn2")))
      kernel = kernel * s1[None, None, None, :] * s2[None, None, :, None]
    out[name] = kernel
  return out


def stability_report(variables: Dict[str, Any], weight_bits: Any = None, *,
                     h: float = 0.1, clean_form: bool = False,
                     max_h_norm_sq: Optional[float] = 1.0,
                     image_size: int = 32, norm_iters: int = 16,
                     iters: int = 200) -> List[Dict[str, Any]]:
  """Per block: the margin ``h L ||M||₂² < 2`` of the applied operator.

  Rows of :func:`pdeq_jax.operators.stability_report` on
  :func:`applied_kernels` (``L = 1``: ReLU) with the step size each block
  uses (the clean form's norm-tied ``h_eff``, see ``StableBlock``), plus
  ``raw_h_l_norm_sq`` (the same ``h`` on the float parameter, the former,
  wrong report) and ``bn_scales_positive`` (practical form; ``stable`` is
  False when a BN factor is not positive).  Each block's operator acts on
  its input resolution (``image_size`` halved once per pooling before it).
  """
  kernels = applied_kernels(variables, weight_bits, clean_form=clean_form)
  shape = {name: block_input_shape(name, image_size, k.shape[2])
           for name, k in kernels.items()}
  steps = {}
  for name, kernel in kernels.items():
    if clean_form and max_h_norm_sq is not None:
      k_fn = lambda v, k=kernel: operators.conv(v, k)
      steps[name] = float(operators.norm_tied_step(
          k_fn, shape[name], h, max_h_norm_sq, iters=norm_iters))
    else:
      steps[name] = h
  rows = operators.stability_report(kernels, shape, steps, iters=iters)
  raw = operators.stability_report(symmetric_kernels(variables), shape, h,
                                   iters=iters)
  for row, raw_row in zip(rows, raw):
    row["raw_h_l_norm_sq"] = raw_row["h_l_norm_sq"]
    positive = True
    if not clean_form:
      positive = all(bool(jnp.all(bn_scales(variables, row["layer"], n) > 0))
                     for n in ("bn1", "bn2"))
    row["bn_scales_positive"] = positive
    row["stable"] = row["stable"] and positive
  return rows
