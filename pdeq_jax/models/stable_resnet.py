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

The stem (float 3x3 conv, BN, ReLU) and the classifier (float Dense) are those
of :mod:`pdeq_jax.models.resnet`.  With widths 16/32/64 and 9 blocks per
stage the network has 405,850 parameters (CIFAR-10), the authors' count.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax

from pdeq_jax import layers
from pdeq_jax import operators
from pdeq_jax.models import resnet
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
    act: σ (ReLU; tanh etc. for analysis).
    act_signed: σ can be negative (tanh): quantize its output signed.
    input_signed: the block input is quantized on a signed grid.
    switches: the quantizers (``quantize_*``; no TV switch here).
  """
  features: int
  pool: bool = False
  h: float = 0.1
  clean_form: bool = False
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
          x, k_fn, self.h, lambda v: act_quant(self.act(v), bits.activations))
    else:
      norm = resnet.batch_norm(train)
      bn1, bn2 = norm(name="bn1"), norm(name="bn2")
      y = symmetric_residual(
          x, k_fn, self.h,
          lambda v: act_quant(self.act(bn1(v)), bits.activations), bn2)
      y = nn.relu(y)
    return grow_and_pool(x, y, self.features, self.pool)


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
    act / act_signed: σ and whether its quantizer is signed.
    switches: the quantizers (``quantize_*``; no TV switch here).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  h: float = 0.1
  clean_form: bool = False
  act: Activation = nn.relu
  act_signed: bool = False
  switches: ModelSwitches = ModelSwitches()

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
        x = StableBlock(width, pool=s > 0 and b == 0, h=self.h,
                        clean_form=self.clean_form, act=self.act,
                        act_signed=self.act_signed,
                        input_signed=self.clean_form and not first,
                        switches=self.switches,
                        name=f"stage{s + 1}_block{b + 1}")(x, bits,
                                                           train=train)
        hidden.append(x)
    logits = resnet.Head(self.num_classes, name="head")(x)
    return (logits, hidden) if return_hidden else logits


def symmetric_kernels(params: Dict[str, Any]) -> Dict[str, Array]:
  """Block name -> float kernel ``K`` of every symmetric step in ``params``.

  For :func:`pdeq_jax.operators.stability_report` (the per-layer margin
  ``h L ||K||₂² < 2``); accepts ``variables`` or ``variables['params']``.
  """
  params = params.get("params", params)
  return {name: sub["kernel"] for name, sub in params.items()
          if hasattr(sub, "keys") and "kernel" in sub}
