"""A small sequential CNN, the kind the embedded-inference PTQ paper deploys.

``../shared/seeds/004_*`` (fixed-point post-training quantization for
embedded inference) evaluates a small sequential CNN (a few convolution +
pooling layers, then dense layers) on MNIST-sized images; this is a network
of that kind, written for this library (not the authors' code):

    conv 3x3 (c1) + bias, ReLU, max-pool 2x2
    conv 3x3 (c2) + bias, ReLU, max-pool 2x2
    flatten, dense (hidden) + bias, ReLU, dense (num_classes) + bias

All convolutions use "SAME" padding, so a 28x28 input gives 14x14 and 7x7
maps and the first dense layer has ``7·7·c2`` inputs.  No BatchNorm: every
multiplication is a plain convolution / matrix product, as on the embedded
targets of the paper.

Quantizers as in the other CNNs (:class:`pdeq_jax.layers.QuantConv` /
:class:`~pdeq_jax.layers.QuantDense` with a ``WeightQuant``; an ``ActQuant``
on each pooled / hidden activation, unsigned since it follows a ReLU), so
``pdeq_jax.ptq.FlaxProgram`` finds the sites: the image (``conv1/in``), the
four kernels (``*/wq``) and the three activations (``aq1``; ``aq2``, taken
after the flattening so that it is exactly ``dense1``'s input; ``aq3``).  Unlike the ResNets every layer, first and last included, follows
the ``quantize_weights`` switch.  Biases are never quantized.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import layers
from pdeq_jax.models.resnet import check_image_input
from pdeq_jax.models.switches import ModelSwitches
from pdeq_jax.models.switches import QUANT_ONLY

Array = jax.Array
Output = Union[Array, Tuple[Array, List[Array]]]


def _max_pool(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class SmallCNN(nn.Module):
  """Two conv + pool layers and two dense layers (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    channels: output channels of the two convolutions.
    hidden: width of the hidden dense layer.
    switches: weight / activation quantizers (``QUANT_ONLY``).
  """
  num_classes: int
  channels: Tuple[int, int] = (32, 64)
  hidden: int = 128
  switches: ModelSwitches = ModelSwitches()

  @nn.compact
  def __call__(self, x: Array, bits: layers.QuantBits = layers.FLOAT_BITS, *,
               train: bool = False, return_hidden: bool = False) -> Output:
    """Logits ``[N, num_classes]`` (and the three quantized activations if
    ``return_hidden``); ``train`` is accepted for the trainers' interface
    (the network has no train-time behaviour)."""
    del train
    check_image_input(x)
    self.switches.check_supported("SmallCNN", QUANT_ONLY)
    if len(self.channels) != 2:
      raise ValueError(f"channels must have 2 entries, got "
                       f"{tuple(self.channels)}")
    qw, qa = self.switches.quantize_weights, self.switches.quantize_activations
    hidden = []

    def act_quant(y, name):
      y = layers.ActQuant(signed=False, enabled=qa, name=name)(
          y, bits.activations)
      hidden.append(y)
      return y

    for i, c in enumerate(self.channels):
      x = layers.QuantConv(c, 3, use_bias=True, quantize_weights=qw,
                           name=f"conv{i + 1}")(x, bits.weights)
      x = _max_pool(nn.relu(x))
      if i == len(self.channels) - 1:
        # flattened before the quantizer: its output is dense1's very input
        x = jnp.reshape(x, (x.shape[0], -1))
      x = act_quant(x, f"aq{i + 1}")
    x = layers.QuantDense(self.hidden, quantize_weights=qw,
                          name="dense1")(x, bits.weights)
    x = act_quant(nn.relu(x), "aq3")
    logits = layers.QuantDense(self.num_classes, quantize_weights=qw,
                               name="dense2")(x, bits.weights)
    return (logits, hidden) if return_hidden else logits

