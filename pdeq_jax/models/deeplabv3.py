"""Quantized DeepLabV3 with a ResNet-50 encoder (Sec. 5.2, Table 3).

The layout is torchvision's ``deeplabv3_resnet50(aux_loss=False)``:

* encoder: :class:`pdeq_jax.models.resnet50.BottleneckResNet` with stride
  replaced by dilation in the last stages (output stride 8 by default, or
  16), no classifier;
* head (torchvision's ``DeepLabHead``): ASPP — a 1x1 branch, three 3x3
  atrous branches (rates ``(12, 24, 36)`` at output stride 8, ``(6, 12, 18)``
  at 16), an image-pooling branch (global average, 1x1), each conv + BN +
  ReLU, concatenated and projected by a 1x1 conv + BN + ReLU + dropout(0.5) —
  then a 3x3 conv + BN + ReLU and a 1x1 classifier (with bias);
* bilinear upsampling of the logits to the input size (``align_corners=
  False``, as ``F.interpolate``).

Parameter count: with 21 classes it equals torchvision's 39,638,869 — the
encoder without ``fc`` (25,557,032 - 2,049,000 = 23,508,032) plus the head:
ASPP 1x1 (524,288 + BN 512), three 3x3 atrous (3 x (4,718,592 + 512)),
pooling 1x1 (524,288 + 512), projection (1,280 x 256 + 512), 3x3 conv
(589,824 + 512) and the classifier (256 x 21 + 21) = 16,130,837.  (Checked
against torchvision 0.28; with the auxiliary FCN head it would be the
42,004,074 of torchvision's model card.)

Quantization follows the encoder's switches: the ASPP input (the encoder's
last ReLU output) is quantized once and shared by the branches; the
concatenated branch outputs and the projection output are quantized before
the next convolution; every ASPP / head convolution has quantized weights,
except the final classifier, which stays float like the ResNet head (its
input, the last ReLU output, is not quantized either).  ``tv_activation``
replaces every ReLU of the encoder blocks and of the head that acts on a
spatial map by ``relu(S(x))``; the image-pooling branch works on a 1x1 map,
where ``S`` is the identity, so its ReLU stays pointwise.

Output: logits ``[N, H, W, num_classes]`` at the input resolution.  Dropout
needs a ``'dropout'`` PRNG stream when ``train=True``.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import layers
from pdeq_jax import tv
from pdeq_jax.models import resnet50
from pdeq_jax.models.resnet import batch_norm
from pdeq_jax.models.resnet import check_image_input
from pdeq_jax.models.resnet import relu_or_tv
from pdeq_jax.models.resnet import torch_default_init
from pdeq_jax.models.switches import ModelSwitches

Array = jax.Array
Output = Union[Array, Tuple[Array, List[Array]]]

# torchvision.models.segmentation.deeplabv3_resnet50(num_classes=21,
# aux_loss=False): sum of p.numel() over parameters (see module docstring).
TORCHVISION_DEEPLABV3_RESNET50_PARAMS_21 = 39_638_869
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling (torchvision's ``ASPP``), quantized.

  Parameters: ``branch0_{conv,bn}`` (1x1), ``branch{i}_{conv,bn}`` for the
  atrous rates, ``pool_{conv,bn}``, ``project_{conv,bn}``, the activation
  quantizers ``aq_in`` / ``aq_cat`` and the TV layers ``branch{i}_tv`` /
  ``project_tv``.
  """
  features: int = 256
  rates: Sequence[int] = ATROUS_RATES[8]
  dropout_rate: float = 0.5
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    norm = batch_norm(train)
    act = lambda name: relu_or_tv(self.switches, name)
    conv = functools.partial(resnet50.Conv, self.features,
                             quantize_weights=self.switches.quantize_weights)
    act_quant = functools.partial(layers.ActQuant, signed=False,
                                  enabled=self.switches.quantize_activations)
    x = act_quant(name="aq_in")(x, bits.activations)
    branches = []
    for i, rate in enumerate((None,) + tuple(self.rates)):
      y = (conv(1, name=f"branch{i}_conv") if rate is None else
           conv(3, dilation=int(rate), name=f"branch{i}_conv"))(x, bits.weights)
      branches.append(act(f"branch{i}_tv")(norm(name=f"branch{i}_bn")(y)))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = conv(1, name="pool_conv")(pooled, bits.weights)
    pooled = nn.relu(norm(name="pool_bn")(pooled))
    # Bilinear upsampling of a 1x1 map is a broadcast.
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = jnp.concatenate(branches, axis=-1)
    y = act_quant(name="aq_cat")(y, bits.activations)
    y = conv(1, name="project_conv")(y, bits.weights)
    y = act("project_tv")(norm(name="project_bn")(y))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class DeepLabHead(nn.Module):
  """ASPP, 3x3 conv + BN + ReLU, float 1x1 classifier (torchvision's head)."""
  num_classes: int
  features: int = 256
  rates: Sequence[int] = ATROUS_RATES[8]
  dropout_rate: float = 0.5
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False):
    y = ASPP(self.features, self.rates, self.dropout_rate,
             switches=self.switches, name="aspp")(x, bits, train=train)
    aspp_out = y
    y = layers.ActQuant(signed=False,
                        enabled=self.switches.quantize_activations,
                        name="aq")(y, bits.activations)
    y = resnet50.Conv(self.features, 3,
                      quantize_weights=self.switches.quantize_weights,
                      name="conv")(y, bits.weights)
    y = relu_or_tv(self.switches, "tv")(batch_norm(train)(name="bn")(y))
    hidden = [aspp_out, y]
    logits = resnet50.Conv(self.num_classes, 1, use_bias=True,
                           quantize_weights=False,
                           kernel_init=torch_default_init,
                           name="classifier")(y)
    return (logits, hidden) if return_hidden else logits


class DeepLabV3(nn.Module):
  """DeepLabV3 with a (quantized) ResNet-50 encoder; logits at input size.

  Attributes:
    num_classes: segmentation classes (19 for Cityscapes, 21 for VOC).
    output_stride: 8 (default, torchvision) or 16.
    atrous_rates: ASPP rates; ``None`` picks ``(12, 24, 36)`` at output
      stride 8 and ``(6, 12, 18)`` at 16.
    aspp_features: channels of the ASPP branches and the head (256).
    dropout_rate: dropout after the ASPP projection (0.5 in torchvision).
    backbone_stage_sizes / backbone_widths / stem_features: encoder shape
      (ResNet-50 by default; smaller for tests).
    switches: quantizers (the stem convolution and the classifier stay
      float) and TV-smoothed ReLUs (Sec. 3; ``tv_stem``: in the encoder's
      stem too).
  """
  num_classes: int
  output_stride: int = 8
  atrous_rates: Optional[Sequence[int]] = None
  aspp_features: int = 256
  dropout_rate: float = 0.5
  backbone_stage_sizes: Sequence[int] = resnet50.RESNET50_STAGE_SIZES
  backbone_widths: Sequence[int] = resnet50.RESNET50_WIDTHS
  stem_features: int = 64
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False) -> Output:
    """Logits ``[N, H, W, num_classes]`` (and the hidden maps if asked).

    Args:
      x: NHWC images.
      bits: runtime bit widths (``FLOAT_BITS``: clip only, no rounding).
      train: batch statistics and dropout (needs a ``'dropout'`` rng).
      return_hidden: also return every encoder block's output, the ASPP
        output and the head's last feature map.
    """
    check_image_input(x)
    self.switches.check_supported("DeepLabV3", ModelSwitches.names())
    if self.output_stride not in ATROUS_RATES:
      raise ValueError(f"output_stride must be one of {sorted(ATROUS_RATES)}, "
                       f"got {self.output_stride}")
    if len(self.backbone_stage_sizes) != 4:
      raise ValueError(f"the DeepLabV3 encoder needs 4 stages, got "
                       f"backbone_stage_sizes="
                       f"{tuple(self.backbone_stage_sizes)}")
    rates = (ATROUS_RATES[self.output_stride] if self.atrous_rates is None
             else tuple(self.atrous_rates))
    encoder = resnet50.BottleneckResNet(
        stage_sizes=self.backbone_stage_sizes, widths=self.backbone_widths,
        stem_features=self.stem_features,
        replace_stride_with_dilation=resnet50.dilation_for_output_stride(
            self.output_stride),
        return_features=True, switches=self.switches, name="backbone")
    features, hidden = encoder(x, bits, train=train, return_hidden=True)
    logits, head_hidden = DeepLabHead(
        self.num_classes, self.aspp_features, rates, self.dropout_rate,
        switches=self.switches, name="head")(features["out"], bits,
                                             train=train, return_hidden=True)
    n, h, w, _ = x.shape
    logits = jax.image.resize(logits, (n, h, w, self.num_classes),
                              method="bilinear", antialias=False)
    return (logits, hidden + head_hidden) if return_hidden else logits
