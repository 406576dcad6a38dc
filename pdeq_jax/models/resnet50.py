"""Quantized ImageNet ResNet-50 (Bottleneck v1.5), the encoder of Sec. 5.2.

The layout is torchvision's ``resnet50`` (the ImageNet network of Table 1 and
the DeepLabV3 encoder of Table 3), so torchvision weights can be imported
(:mod:`pdeq_jax.torchvision_import`):

* stem: a float 7x7/2 convolution (padding 3), BatchNorm, ReLU and a 3x3/2
  max pool (padding 1);
* four stages of Bottleneck blocks, ``(3, 4, 6, 3)`` of them, bottleneck
  widths 64/128/256/512 and output widths four times that; "v1.5": the stride
  of a stage's first block sits on its 3x3 convolution, not on the first 1x1;
  the first block of a stage has a 1x1 projection + BatchNorm on the shortcut;
* global average pooling and a float Dense classifier.

With 1000 classes the network has exactly torchvision's 25,557,032 weights
(plus one α scalar per quantizer and one γ per TV activation).

Quantization follows :class:`pdeq_jax.models.resnet.BasicBlock`: the first
convolution and the classifier stay float; inside a block the input is
quantized (unsigned: it follows a ReLU), then each inner activation after a
ReLU, with quantized weights for the three convolutions and the projection.
``tv_activation`` replaces every ReLU of the blocks by ``relu(S(x))``
(:class:`pdeq_jax.layers.TVActivation`, Eq. 14, one learned γ per layer);
``tv_stem`` does the same for the stem's ReLU (the paper applies TV "in every
non-linear activation"; off by default to keep the stem float and plain).

``replace_stride_with_dilation`` (torchvision's option) trades the stride of
stages 2..4 for dilation: ``(False, True, True)`` gives output stride 8 (the
DeepLabV3 encoder), ``(False, False, True)`` output stride 16.

Convolutions here use PyTorch's explicit symmetric padding (``dilation *
(k - 1) // 2`` on each side), not ``'SAME'``: with stride 2 on an even input
``'SAME'`` pads only at the end and would shift every feature map by one pixel
against torchvision.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Sequence, Tuple, Union

import flax.linen as nn
import jax

from pdeq_jax import layers
from pdeq_jax import quant
from pdeq_jax import tv
from pdeq_jax.models.resnet import Head
from pdeq_jax.models.resnet import batch_norm
from pdeq_jax.models.resnet import check_image_input
from pdeq_jax.models.resnet import conv_init
from pdeq_jax.models.resnet import relu_or_tv
from pdeq_jax.models.switches import ModelSwitches

Array = jax.Array
Features = Dict[str, Array]
Output = Union[Array, Features, Tuple[Union[Array, Features], List[Array]]]

EXPANSION = 4
RESNET50_STAGE_SIZES = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)
# torchvision.models.resnet50(): sum of p.numel() over parameters.
TORCHVISION_RESNET50_PARAMS = 25_557_032
# replace_stride_with_dilation for each output stride.
DILATION_FOR_OUTPUT_STRIDE = {8: (False, True, True), 16: (False, False, True),
                              32: (False, False, False)}


class Conv(nn.Module):
  """Convolution with PyTorch padding and dilation, optionally quantized.

  Same parameters as :class:`pdeq_jax.layers.QuantConv` (``kernel`` in HWIO,
  the weight quantizer ``wq``, optional ``bias``), plus ``dilation`` (atrous
  convolution), which ``QuantConv`` lacks.  Padding is ``dilation * (k - 1)
  // 2`` on each side, as ``nn.Conv2d(padding=dilation)`` for 3x3 kernels.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  use_bias: bool = False
  quantize_weights: bool = True
  kernel_init: Callable[..., Array] = conv_init

  @nn.compact
  def __call__(self, x: Array, bits: quant.Bits = None) -> Array:
    check_image_input(x)
    if self.strides < 1 or self.dilation < 1:
      raise ValueError(f"strides and dilation must be >= 1, got "
                       f"{self.strides} and {self.dilation}")
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features))
    kernel = layers.WeightQuant(enabled=self.quantize_weights, name="wq")(
        kernel, bits)
    pad = self.dilation * (k - 1) // 2
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class ImageNetStem(nn.Module):
  """Float 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool (never quantized);
  the ReLU is TV-smoothed with ``switches.tv_stem``."""
  features: int = 64
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    x = Conv(self.features, 7, strides=2, quantize_weights=False,
             name="conv")(x)
    x = batch_norm(train)(name="bn")(x)
    x = relu_or_tv(self.switches, "tv", tv=self.switches.tv_stem)(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
  """Quantized Bottleneck v1.5: ``relu(shortcut(x) + BN₃(K₃ a₂))``.

  With ``x`` quantized on entry, ``a₁ = Q(relu(BN₁(K₁ x)))`` (1x1),
  ``a₂ = Q(relu(BN₂(K₂ a₁)))`` (3x3, stride ``strides``, dilation
  ``dilation``) and ``K₃`` a 1x1 to ``EXPANSION * width`` channels.  The
  shortcut is the identity or, when the shape changes, a quantized 1x1
  convolution (stride ``strides``) and BatchNorm.

  Attributes:
    width: bottleneck width (output channels are ``EXPANSION * width``).
    strides: 1, or 2 to halve the resolution (in K₂ and the shortcut).
    dilation: dilation of K₂ (atrous encoder).
    switches: quantizers, and ``relu(S(·))`` for the three ReLUs (``tv1``,
      ``tv2``, ``tv3``) when ``tv_activation``.
  """
  width: int
  strides: int = 1
  dilation: int = 1
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False) -> Array:
    norm = batch_norm(train)
    act = lambda name: relu_or_tv(self.switches, name)
    conv = functools.partial(Conv,
                             quantize_weights=self.switches.quantize_weights)
    act_quant = functools.partial(layers.ActQuant, signed=False,
                                  enabled=self.switches.quantize_activations)
    out_features = EXPANSION * self.width
    x = act_quant(name="aq_in")(x, bits.activations)
    y = conv(self.width, 1, name="conv1")(x, bits.weights)
    y = act("tv1")(norm(name="bn1")(y))
    y = act_quant(name="aq_mid1")(y, bits.activations)
    y = conv(self.width, 3, strides=self.strides, dilation=self.dilation,
             name="conv2")(y, bits.weights)
    y = act("tv2")(norm(name="bn2")(y))
    y = act_quant(name="aq_mid2")(y, bits.activations)
    y = conv(out_features, 1, name="conv3")(y, bits.weights)
    y = norm(name="bn3")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = conv(out_features, 1, strides=self.strides,
                      name="shortcut_conv")(x, bits.weights)
      shortcut = norm(name="shortcut_bn")(shortcut)
    return act("tv3")(shortcut + y)


class BottleneckResNet(nn.Module):
  """ImageNet-layout ResNet of Bottleneck blocks; the defaults are ResNet-50.

  Parameters are named ``stem/{conv,bn}``, ``stage{s}_block{b}/{conv1,bn1,
  conv2,bn2,conv3,bn3,shortcut_conv,shortcut_bn,aq_*,tv*}`` and
  ``head/dense`` (torchvision's ``conv1/bn1``, ``layer{s}.{b-1}.*``, ``fc``).
  Smaller ``stage_sizes`` / ``widths`` give reduced variants (tests).

  Attributes:
    num_classes: classifier outputs (unused with ``return_features``).
    stage_sizes: blocks per stage.
    widths: bottleneck width per stage (outputs are ``EXPANSION`` times it).
    stem_features: channels of the stem convolution.
    replace_stride_with_dilation: one flag per stage after the first;
      ``True`` replaces that stage's stride 2 by dilation (torchvision).
    return_features: return ``{"low_level": stage-1 output, "out": last
      stage output}`` instead of logits (no classifier is built).
    switches: quantizers (the stem convolution and the classifier are
      always float), TV-smoothed ReLUs in the blocks (Sec. 3) and, with
      ``tv_stem``, in the stem.
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES
  widths: Sequence[int] = RESNET50_WIDTHS
  stem_features: int = 64
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  return_features: bool = False
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False) -> Output:
    """Logits ``[N, num_classes]`` or the feature dict (and hidden maps).

    Args:
      x: NHWC images.
      bits: runtime bit widths (``FLOAT_BITS``: clip only, no rounding).
      train: batch statistics (and their update) instead of running averages.
      return_hidden: also return the list of every block's output.
    """
    check_image_input(x)
    self.switches.check_supported("BottleneckResNet", ModelSwitches.names())
    if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must be non-empty and have the "
                       f"same length")
    dilate = tuple(bool(d) for d in self.replace_stride_with_dilation)
    if len(dilate) != len(self.stage_sizes) - 1:
      raise ValueError(f"replace_stride_with_dilation needs one flag per stage "
                       f"after the first ({len(self.stage_sizes) - 1}), got "
                       f"{dilate}")
    x = ImageNetStem(self.stem_features, switches=self.switches,
                     name="stem")(x, train=train)
    hidden, low_level, dilation = [], None, 1
    for s, (num_blocks, width) in enumerate(zip(self.stage_sizes,
                                                self.widths)):
      strides, previous_dilation = (1 if s == 0 else 2), dilation
      if s > 0 and dilate[s - 1]:
        dilation, strides = dilation * strides, 1
      for b in range(num_blocks):
        x = Bottleneck(width, strides if b == 0 else 1,
                       dilation=previous_dilation if b == 0 else dilation,
                       switches=self.switches,
                       name=f"stage{s + 1}_block{b + 1}")(x, bits, train=train)
        hidden.append(x)
      if s == 0:
        low_level = x
    if self.return_features:
      out = {"low_level": low_level, "out": x}
    else:
      out = Head(self.num_classes, name="head")(x)
    return (out, hidden) if return_hidden else out


ResNet50 = BottleneckResNet


def output_stride(replace_stride_with_dilation: Sequence[bool]) -> int:
  """Input-to-feature-map resolution ratio of the encoder (8, 16 or 32)."""
  return 32 // 2 ** sum(bool(d) for d in replace_stride_with_dilation)


def dilation_for_output_stride(stride: int) -> Tuple[bool, bool, bool]:
  """``replace_stride_with_dilation`` giving output stride 8, 16 or 32."""
  if stride not in DILATION_FOR_OUTPUT_STRIDE:
    raise ValueError(f"output stride must be one of "
                     f"{sorted(DILATION_FOR_OUTPUT_STRIDE)}, got {stride}")
  return DILATION_FOR_OUTPUT_STRIDE[stride]
