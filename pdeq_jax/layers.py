"""Flax modules: they hold parameters and call the pure functions of the library.

Bit widths are call arguments (``QuantBits``), never module structure, so one
model (and one compiled step) serves the gradual 16 -> b schedule and the b-bit
vs clip-only comparison.  Whether a quantizer exists at all is structure
(``quantize=False`` gives the full-precision network with no clipping).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import operators
from pdeq_jax import quant
from pdeq_jax import tv

Array = jax.Array


class QuantBits(NamedTuple):
  """Runtime bit widths: int32 scalars (or None = clip only).  A pytree."""
  weights: quant.Bits = None
  activations: quant.Bits = None

  @classmethod
  def make(cls, weights: quant.Bits, activations: quant.Bits) -> "QuantBits":
    """Validated int32 arrays (None -> 32 = clip only), safe to pass to jit."""
    return cls(quant.bits_as_array(weights), quant.bits_as_array(activations))


FLOAT_BITS = QuantBits(None, None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def positive_alpha(alpha: Array, floor: float = 1e-4) -> Array:
  """Keeps a learned clipping scale positive without changing its gradient.

  The value is exactly ``max(alpha, floor)``; the derivative w.r.t. ``alpha``
  is passed straight through (1 everywhere, also at and below the floor), so
  an alpha that overshoots below the floor still receives the gradient that
  can bring it back.
  """
  return jnp.maximum(alpha, floor)


@positive_alpha.defjvp
def _positive_alpha_jvp(floor, primals, tangents):
  (alpha,), (alpha_dot,) = primals, tangents
  return positive_alpha(alpha, floor), alpha_dot


class ActQuant(nn.Module):
  """Activation quantizer with one learned clipping scale alpha (Eq. 9-11).

  Attributes:
    signed: values in [-alpha, alpha] (True) or [0, alpha] (False, after ReLU).
    enabled: False makes the module the identity (full-precision network).
    grid: "uniform" (Eq. 9) or "midrise" (authors' GCN grid; signed only).
    alpha_init: initial alpha (6.0 in the authors' code).
    lsq_grad_scale: LSQ scaling of the alpha gradient.
  """
  signed: bool = False
  enabled: bool = True
  grid: str = "uniform"
  alpha_init: float = quant.DEFAULT_ACT_ALPHA
  lsq_grad_scale: bool = False

  @nn.compact
  def __call__(self, x: Array, bits: quant.Bits) -> Array:
    if not self.enabled:
      # Stored, not re-derived: see operators.materialize.
      return operators.materialize(x)
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ())
    return quant.quantize(x, positive_alpha(alpha), bits, signed=self.signed,
                          grid=self.grid, lsq_grad_scale=self.lsq_grad_scale)


class WeightQuant(nn.Module):
  """Per-layer signed quantizer of standardized weights (Eq. 12)."""
  enabled: bool = True
  grid: str = "uniform"
  alpha_init: float = quant.DEFAULT_WEIGHT_ALPHA
  lsq_grad_scale: bool = False

  @nn.compact
  def __call__(self, w: Array, bits: quant.Bits) -> Array:
    if not self.enabled:
      return w
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ())
    return quant.quantize_weight(w, positive_alpha(alpha), bits, grid=self.grid,
                                 lsq_grad_scale=self.lsq_grad_scale)


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class QuantConv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with optionally quantized weights."""
  features: int
  kernel_size: Union[int, Sequence[int]] = 3
  strides: int = 1
  padding: Any = "SAME"
  use_bias: bool = False
  feature_group_count: int = 1
  quantize_weights: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.kaiming_normal()

  @nn.compact
  def __call__(self, x: Array, bits: quant.Bits = None) -> Array:
    if x.ndim != 4:
      raise ValueError(f"QuantConv input x must be NHWC (rank 4), got shape "
                       f"{x.shape}")
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f"input channels {in_features} not divisible by "
                       f"feature_group_count={self.feature_group_count}")
    kh, kw = _pair(self.kernel_size)
    kernel = self.param(
        "kernel", self.kernel_init,
        (kh, kw, in_features // self.feature_group_count, self.features))
    kernel = WeightQuant(enabled=self.quantize_weights, name="wq")(kernel, bits)
    y = operators.conv(x, kernel, stride=self.strides, padding=self.padding,
                       feature_group_count=self.feature_group_count)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class QuantDense(nn.Module):
  """Dense layer with optionally quantized weights."""
  features: int
  use_bias: bool = True
  quantize_weights: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, bits: quant.Bits = None) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    kernel = WeightQuant(enabled=self.quantize_weights, name="wq")(kernel, bits)
    y = x @ kernel
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class TVActivation(nn.Module):
  """``act(S(x))``: a TV-smoothing step before a pointwise activation (Eq. 14).

  gamma = ``gamma_max * sigmoid(rho)`` keeps it positive and small; it is
  initialised at ``gamma_init`` (default ``tv.NON_EXPANSIVE_GAMMA``: with
  ``gamma² <= eps / 4`` the step is non-expansive).  ``sign_form=True`` uses the inference form
  with ``sign(G x)`` (additions and a sign only).
  """
  act: Callable[[Array], Array] = nn.relu
  gamma_init: float = tv.NON_EXPANSIVE_GAMMA
  gamma_max: float = 1.0
  eps: float = tv.DEFAULT_EPS
  sign_form: bool = False

  def setup(self):
    if not 0 < self.gamma_init < self.gamma_max:
      raise ValueError(f"gamma_init must lie in (0, gamma_max={self.gamma_max}),"
                       f" got {self.gamma_init}")
    ratio = self.gamma_init / self.gamma_max
    rho0 = math.log(ratio / (1.0 - ratio))
    self.rho = self.param("rho", nn.initializers.constant(rho0), ())

  @property
  def gamma(self) -> Array:
    return self.gamma_max * jax.nn.sigmoid(self.rho)

  def __call__(self, x: Array, sign_form: Optional[bool] = None) -> Array:
    use_sign = self.sign_form if sign_form is None else sign_form
    # Recorded only when asked for (TV reports), never into init's variables.
    if self.is_mutable_collection("tv_inputs") and not self.is_initializing():
      self.sow("tv_inputs", "input", x)
      self.sow("tv_inputs", "gamma", self.gamma)
    if use_sign:
      return self.act(tv.tv_smooth_sign(x, self.gamma))
    return self.act(tv.tv_smooth(x, self.gamma, eps=self.eps))


class SymmetricConvStep(nn.Module):
  """Quantized symmetric step of Eq. 15: ``x - h Kᵀ Q(act(K x))``.

  ``Kᵀ`` is the adjoint of the same (optionally quantized) 3x3 convolution,
  obtained with ``jax.vjp``: there is no second weight tensor.  The outer
  quantizer of Eq. 15 is left to the caller (it depends on the network's
  residual-stream convention).

  Attributes:
    h: step size (the authors' ``stability_coeff``).
    act: activation sigma (ReLU in the CNNs).
    quantize_weights / quantize_activations: structure switches.
    norm: optional factory for a normalisation applied after K (practical
      form of the authors' code); called as ``norm()(y)``.
  """
  h: float = 0.1
  kernel_size: int = 3
  act: Callable[[Array], Array] = nn.relu
  quantize_weights: bool = True
  quantize_activations: bool = True
  norm: Optional[Callable[[], nn.Module]] = None

  @nn.compact
  def __call__(self, x: Array, bits: QuantBits = FLOAT_BITS) -> Array:
    if x.ndim != 4:
      raise ValueError(f"SymmetricConvStep input x must be NHWC (rank 4), got "
                       f"shape {x.shape}")
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.kaiming_normal(),
                        (self.kernel_size, self.kernel_size, channels, channels))
    kernel = WeightQuant(enabled=self.quantize_weights, name="wq")(
        kernel, bits.weights)
    k_fn = lambda v: operators.conv(v, kernel)
    y, k_transpose = jax.vjp(k_fn, x)
    if self.norm is not None:
      y = self.norm()(y)
    y = self.act(y)
    y = ActQuant(signed=False, enabled=self.quantize_activations, name="aq")(
        y, bits.activations)
    (kt_y,) = k_transpose(y)
    return x - self.h * kt_y
