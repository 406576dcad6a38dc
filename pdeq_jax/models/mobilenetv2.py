"""Quantized CIFAR MobileNetV2 and its stable variant (Sec. 4.2, Eq. 21, 22).

Layout of the authors' code (``nets/__init__.py``, ``InvertedResidual``):
a float 3x3 stem with 16 channels (stride 1), BN, ReLU; seven stages of
inverted residuals ``(out, n, stride, t)`` =
``(16,1,1,1) (24,2,1,6) (32,3,2,6) (64,4,2,6) (96,3,1,6) (160,3,2,6)
(320,1,1,6)``; a float 1x1 "closing" convolution to 1280 channels, BN, ReLU;
global average pooling and a float Dense classifier.  2,236,074 parameters
for 10 classes.

Inverted residual (Eq. 21; every block, including ``t = 1``, has the 1x1
expansion, as in the authors' code):

    y = BN₃ K³₁ₓ₁ Q(relu(BN₂ K²_dw Q(relu(BN₁ K¹₁ₓ₁ Q(x)))))
    out = x + y   if stride 1 and n_in == n_out, else y

Stable inverted residual (Eq. 22): the separable operator
``K = K_dw K_1x1`` (:func:`pdeq_jax.operators.separable_operator`) plays the
role of K in the symmetric step, with ``Kᵀ = K_1x1ᵀ K_dwᵀ`` its ``jax.vjp``
adjoint.  Practical form (the authors'): ``x - h BN₂(Kᵀ Q(relu(BN₁(K x))))``
with no ReLU after the update; ``clean_form=True``: ``x - h Kᵀ Q(σ(K x))``.
Channels grow by Eq. 20 and the resolution halves by 2x2 average pooling.

In the authors' stable MobileNetV2 (1,719,306 parameters for 10 classes) only
the blocks that keep the shape are symmetric: the first block of every stage
(the one that changes width and/or stride) stays a standard inverted
residual.  ``stable_transitions=True`` makes every block symmetric (the
paper's Sec. 4.2 wording, "changing the resolutions and channel space is done
the same way as described in section 4.1"); the widths satisfy Eq. 20's
``n_in <= n_out <= 2 n_in`` throughout.

Residual streams here are not ReLU outputs, so block inputs are quantized on
a signed grid by default (``block_input_signed``); the authors' code clips
them at 0 (``block_input_signed=False`` reproduces that).  The depthwise
weights use the same runtime weight bits as the 1x1 weights (the authors
start them at 8 bits and then follow the same schedule).
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import flax.linen as nn
import jax

from pdeq_jax import layers
from pdeq_jax import operators
from pdeq_jax.models import resnet
from pdeq_jax.models import stable_resnet
from pdeq_jax.models.switches import ModelSwitches
from pdeq_jax.models.switches import QUANT_ONLY

Array = jax.Array

# (out channels, blocks, stride of the first block, expansion t)
CIFAR_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (16, 1, 1, 1), (24, 2, 1, 6), (32, 3, 2, 6), (64, 4, 2, 6),
    (96, 3, 1, 6), (160, 3, 2, 6), (320, 1, 1, 6))


class InvertedResidual(nn.Module):
  """Quantized MobileNetV2 block (Eq. 21): expand, depthwise, project.

  Attributes:
    features: output channels.
    strides: stride of the depthwise convolution.
    expansion: ``t``; the hidden width is ``round(n_in * t)``.
    input_signed: signed quantizer for the block input.
    switches: the quantizers (``quantize_*``; no TV switch here).
  """
  features: int
  strides: int = 1
  expansion: float = 6
  input_signed: bool = True
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    resnet.check_image_input(x)
    n_in = x.shape[-1]
    hidden = int(round(n_in * self.expansion))
    norm = resnet.batch_norm(train)
    conv = functools.partial(layers.QuantConv, use_bias=False,
                             quantize_weights=self.switches.quantize_weights,
                             kernel_init=resnet.conv_init)
    act_quant = functools.partial(layers.ActQuant, signed=False,
                                  enabled=self.switches.quantize_activations)
    x = layers.ActQuant(signed=self.input_signed,
                        enabled=self.switches.quantize_activations,
                        name="aq_in")(x, bits.activations)
    y = conv(hidden, 1, name="conv_expand")(x, bits.weights)
    y = act_quant(name="aq_expand")(nn.relu(norm(name="bn1")(y)),
                                    bits.activations)
    y = conv(hidden, 3, strides=self.strides, padding=((1, 1), (1, 1)),
             feature_group_count=hidden,
             name="conv_dw")(y, bits.weights)
    y = act_quant(name="aq_dw")(nn.relu(norm(name="bn2")(y)),
                                bits.activations)
    y = conv(self.features, 1, name="conv_project")(y, bits.weights)
    y = norm(name="bn3")(y)
    if self.strides == 1 and n_in == self.features:
      y = x + y
    return y


class StableInvertedResidual(nn.Module):
  """Symmetric step with the separable operator ``K = K_dw K_1x1`` (Eq. 22).

  Parameters: ``kernel_1x1`` ``[1, 1, n_in, hidden]`` and ``kernel_dw``
  ``[3, 3, 1, hidden]`` (``Kᵀ`` is their adjoint), two weight quantizers, two
  activation quantizers, and in the practical form BatchNorms of ``hidden``
  (after K) and ``n_in`` (after Kᵀ) channels.

  Attributes:
    features: ``n_out``, ``n_in <= n_out <= 2 n_in`` (Eq. 20).
    pool: 2x2 average pooling after the step.
    expansion: ``t``; hidden width ``round(n_in * t)``.
    h: step size.
    clean_form: plain Eq. 22 (no BatchNorm).
    act / act_signed: σ and whether its quantizer is signed.
    input_signed: signed quantizer for the block input.
    switches: the quantizers (``quantize_*``; no TV switch here).
  """
  features: int
  pool: bool = False
  expansion: float = 6
  h: float = 0.1
  clean_form: bool = False
  act: stable_resnet.Activation = nn.relu
  act_signed: bool = False
  input_signed: bool = True
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    resnet.check_image_input(x)
    n_in = x.shape[-1]
    operators.check_channel_growth(
        n_in, self.features, "StableInvertedResidual channel change", "features")
    hidden = int(round(n_in * self.expansion))
    x = layers.ActQuant(signed=self.input_signed,
                        enabled=self.switches.quantize_activations,
                        name="aq_in")(x, bits.activations)
    k_1x1 = self.param("kernel_1x1", resnet.conv_init, (1, 1, n_in, hidden))
    k_dw = self.param("kernel_dw", resnet.conv_init, (3, 3, 1, hidden))
    k_1x1 = layers.WeightQuant(enabled=self.switches.quantize_weights,
                               name="wq_1x1")(
        k_1x1, bits.weights)
    k_dw = layers.WeightQuant(enabled=self.switches.quantize_weights,
                              name="wq_dw")(
        k_dw, bits.weights)
    k_fn = lambda v: operators.separable_operator(v, k_1x1, k_dw)
    act_quant = layers.ActQuant(signed=self.act_signed,
                                enabled=self.switches.quantize_activations,
                                name="aq_mid")
    if self.clean_form:
      y = stable_resnet.symmetric_residual(
          x, k_fn, self.h, lambda v: act_quant(self.act(v), bits.activations))
    else:
      norm = resnet.batch_norm(train)
      bn1, bn2 = norm(name="bn1"), norm(name="bn2")
      y = stable_resnet.symmetric_residual(
          x, k_fn, self.h,
          lambda v: act_quant(self.act(bn1(v)), bits.activations), bn2)
    return stable_resnet.grow_and_pool(x, y, self.features, self.pool)


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2, standard (Eq. 21) or stable (Eq. 22).

  Attributes:
    num_classes: classifier outputs.
    stages: ``(out, n, stride, t)`` per stage.
    stem_features: channels of the float stem (16 in the authors' code).
    closing_features: channels of the float closing 1x1 convolution.
    stable: symmetric blocks (the stable MobileNetV2).
    stable_transitions: with ``stable``, also the width/stride-changing first
      block of each stage is symmetric (Eq. 20 growth + 2x2 pooling);
      False follows the authors' code.
    h, clean_form, act, act_signed: of the symmetric blocks.
    block_input_signed: signed quantizers for block inputs that do not
      follow a ReLU (False: clip at 0 as the authors' code does).
    switches: the quantizers (stem, closing convolution and classifier are
      float); no TV switch here.
  """
  num_classes: int
  stages: Sequence[Tuple[int, int, int, int]] = CIFAR_STAGES
  stem_features: int = 16
  closing_features: int = 1280
  stable: bool = False
  stable_transitions: bool = False
  h: float = 0.1
  clean_form: bool = False
  act: stable_resnet.Activation = nn.relu
  act_signed: bool = False
  block_input_signed: bool = True
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False
               ) -> resnet.Output:
    """Logits ``[N, num_classes]`` (and every block's output if asked)."""
    resnet.check_image_input(x)
    self.switches.check_supported("MobileNetV2", QUANT_ONLY)
    x = resnet.Stem(self.stem_features, name="stem")(x, train=train)
    hidden = []
    for s, (out, num_blocks, stride, t) in enumerate(self.stages):
      for b in range(num_blocks):
        first = b == 0
        input_signed = self.block_input_signed and not (s == 0 and first)
        name = f"stage{s + 1}_block{b + 1}"
        if self.stable and (not first or self.stable_transitions):
          block = StableInvertedResidual(
              out, pool=first and stride == 2, expansion=t, h=self.h,
              clean_form=self.clean_form, act=self.act,
              act_signed=self.act_signed, input_signed=input_signed,
              switches=self.switches, name=name)
        else:
          block = InvertedResidual(out, stride if first else 1, t,
                                   input_signed=input_signed,
                                   switches=self.switches, name=name)
        x = block(x, bits, train=train)
        hidden.append(x)
    x = layers.QuantConv(self.closing_features, 1, quantize_weights=False,
                         kernel_init=resnet.torch_default_init,
                         name="closing_conv")(x)
    x = nn.relu(resnet.batch_norm(train)(name="closing_bn")(x))
    hidden.append(x)
    logits = resnet.Head(self.num_classes, name="head")(x)
    return (logits, hidden) if return_hidden else logits
