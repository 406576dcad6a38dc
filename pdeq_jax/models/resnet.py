"""Quantized CIFAR ResNets (BasicBlock), the non-symmetric baselines of Sec. 5.3.

The layout follows the authors' code (``nets/resnet.py``), whose parameter
counts are those of the paper's Tables 4 and 5:

* stem: a float 3x3 convolution (stride 1), BatchNorm, ReLU;
* stages of BasicBlocks; the first block of a stage may change the width
  and/or stride 2, with a quantized 1x1 projection + BatchNorm on the shortcut
  ("option B") whenever the shape changes;
* global average pooling and a float Dense classifier.

The first convolution and the classifier stay in float, as in the authors'
code.  Inside a block (as in the authors' ``BasicBlock``) the block input is
quantized (unsigned: it follows a ReLU), then
``relu(shortcut + BN(K₂ Q(relu(BN(K₁ x)))))`` with quantized weights.

Widths 16/32/64 give ``resnet20/32/44/56/110`` (6n + 2 layers); widths
64..512 give the wide CIFAR ``resnet18/34`` used for CIFAR-100.  Bits are call
arguments (:class:`pdeq_jax.layers.QuantBits`); whether quantizers exist at
all is structure (``quantize_weights``, ``quantize_activations``).

This module also holds the small pieces the other CNNs share: the BatchNorm
factory, the kernel initialisers, the float stem and head.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import layers
from pdeq_jax.models import scan_blocks as scan_lib
from pdeq_jax.models.switches import ModelSwitches
from pdeq_jax.models.switches import QUANT_AND_TV

Array = jax.Array
Output = Union[Array, Tuple[Array, List[Array]]]

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), the authors'
# initialisation of every convolution (HWIO: fan_out = kh * kw * C_out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear / nn.Conv2d weight init: U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                      "uniform")


def batch_norm(train: bool) -> Callable[..., nn.Module]:
  """BatchNorm matching PyTorch's defaults (momentum 0.1, eps 1e-5).

  Statistics live in the ``'batch_stats'`` collection; running averages are
  used when ``train`` is False.
  """
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5)


def global_avg_pool(x: Array) -> Array:
  """Mean over the spatial axes of an NHWC map: ``[N, H, W, C] -> [N, C]``."""
  return jnp.mean(x, axis=(1, 2))


def check_image_input(x: Array, name: str = "x") -> None:
  """Raises ``ValueError`` unless ``x`` is an NHWC image batch."""
  if jnp.ndim(x) != 4:
    raise ValueError(f"{name} must be an NHWC image batch (rank 4), got shape "
                     f"{jnp.shape(x)}")


def relu_or_tv(switches: ModelSwitches, name: str,
               tv: Optional[bool] = None) -> Callable[[Array], Array]:
  """``nn.relu``, or a named ``TVActivation`` (``relu(S(x))``, one γ) when
  ``tv`` (default ``switches.tv_activation``)."""
  if switches.tv_activation if tv is None else tv:
    return layers.TVActivation(act=nn.relu, sign_form=switches.tv_sign_form,
                               gamma_init=switches.tv_gamma_init, name=name)
  return nn.relu


class Stem(nn.Module):
  """Float 3x3 convolution, BatchNorm and ReLU (never quantized)."""
  features: int

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = layers.QuantConv(self.features, 3, quantize_weights=False,
                         kernel_init=conv_init, name="conv")(x)
    x = batch_norm(train)(name="bn")(x)
    return nn.relu(x)


class Head(nn.Module):
  """Global average pooling and a float Dense classifier (never quantized)."""
  num_classes: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return layers.QuantDense(self.num_classes, quantize_weights=False,
                             kernel_init=torch_default_init,
                             name="dense")(global_avg_pool(x))


class BasicBlock(nn.Module):
  """Quantized BasicBlock: ``relu(shortcut(x) + BN(K₂ Q(relu(BN(K₁ x)))))``.

  ``x`` is quantized on entry (``input_signed=False``: it follows a ReLU).
  The shortcut is the identity, or a quantized 1x1 convolution (stride
  ``strides``) and BatchNorm when the shape changes (the authors' choice).

  Attributes:
    features: output channels.
    strides: 1, or 2 to halve the resolution (in K₁ and the shortcut).
    switches: quantizers and TV activations (``relu(S(·))``, Eq. 14, for
      both ReLUs when ``tv_activation``).
    input_signed: signed quantizer for the block input.
  """
  features: int
  strides: int = 1
  switches: ModelSwitches = ModelSwitches()
  input_signed: bool = False

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    norm = batch_norm(train)
    act = lambda name: relu_or_tv(self.switches, name)
    conv = functools.partial(layers.QuantConv, use_bias=False,
                             quantize_weights=self.switches.quantize_weights,
                             kernel_init=conv_init)
    x = layers.ActQuant(signed=self.input_signed,
                        enabled=self.switches.quantize_activations,
                        name="aq_in")(x, bits.activations)
    # padding 1 on both sides, as PyTorch (XLA's "SAME" pads a stride-2
    # 3x3 convolution only at the bottom/right).
    y = conv(self.features, 3, strides=self.strides, padding=((1, 1), (1, 1)),
             name="conv1")(
        x, bits.weights)
    y = act("tv1")(norm(name="bn1")(y))
    y = layers.ActQuant(signed=False,
                        enabled=self.switches.quantize_activations,
                        name="aq_mid")(y, bits.activations)
    y = conv(self.features, 3, name="conv2")(y, bits.weights)
    y = norm(name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, strides=self.strides,
                      name="shortcut_conv")(x, bits.weights)
      shortcut = norm(name="shortcut_bn")(shortcut)
    return act("tv2")(shortcut + y)


class ResNet(nn.Module):
  """CIFAR ResNet of BasicBlocks with quantized weights and activations.

  Attributes:
    num_classes: classifier outputs.
    stage_sizes: blocks per stage, e.g. ``(9, 9, 9)`` for ResNet-56.
    widths: channels per stage, e.g. ``(16, 32, 64)``; the stem has
      ``widths[0]`` channels and every stage after the first halves the
      resolution in its first block.
    switches: quantizers (the first convolution and the classifier are
      always float) and TV-smoothed ReLUs in the blocks (Sec. 3); no
      ``tv_stem``.
    scan_blocks: run blocks 2..n of every stage under ``nn.scan`` (compiled
      once per stage; stacked layout, see :mod:`pdeq_jax.models.scan_blocks`).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  switches: ModelSwitches = ModelSwitches()
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False) -> Output:
    """Logits ``[N, num_classes]`` (and the per-block outputs if asked).

    Args:
      x: NHWC images.
      bits: runtime bit widths (``FLOAT_BITS``: clip only, no rounding).
      train: batch statistics (and their update) instead of running averages.
      return_hidden: also return the list of every block's output.
    """
    check_image_input(x)
    self.switches.check_supported("ResNet", QUANT_AND_TV)
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must have the same length")
    x = Stem(self.widths[0], name="stem")(x, train=train)
    hidden = []
    for s, (num_blocks, width) in enumerate(zip(self.stage_sizes,
                                                self.widths)):
      for b in range(num_blocks):
        strides = 2 if s > 0 and b == 0 else 1
        if b == 1 and self.scan_blocks:
          x, outs = scan_lib.run_blocks(
              functools.partial(BasicBlock, width, 1, switches=self.switches),
              num_blocks - 1, x, bits, train=train, name=f"stage{s + 1}_blocks")
          hidden.extend(outs)
          break
        x = BasicBlock(width, strides, switches=self.switches,
                       name=f"stage{s + 1}_block{b + 1}")(x, bits, train=train)
        hidden.append(x)
    logits = Head(self.num_classes, name="head")(x)
    return (logits, hidden) if return_hidden else logits


CIFAR_WIDTHS = (16, 32, 64)
WIDE_WIDTHS = (64, 128, 256, 512)


def cifar_stage_sizes(depth: int) -> Tuple[int, int, int]:
  """``(n, n, n)`` for a 6n + 2 layer CIFAR ResNet (20, 32, 44, 56, 110...)."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
  n = (depth - 2) // 6
  return (n, n, n)
