"""Total-variation smoothing as a non-pointwise activation (Sec. 3, Eq. 14).

``S(x) = x - γ² (D_x + D_y) x`` with ``D_x = G_xᵀ W_x G_x`` and
``W_x = diag(1 / (|G_x x| + ε))``; ``G_x``, ``G_y`` are forward differences
``[-1, 1]`` along width and height, applied per channel (no channel mixing)
with a zero-flux boundary: only the ``W-1`` (``H-1``) interior differences
exist, so ``Gᵀ`` sums to zero and ``S`` conserves the mass of every channel.

At inference ``W G x ≈ sign(G x)`` (the ε → 0 limit), so
``S(x) ≈ x - γ² (G_xᵀ sign(G_x x) + G_yᵀ sign(G_y x))``: additions and a sign.
All arrays are NHWC.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_nhwc(x: Array) -> None:
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be NHWC (rank 4), got shape {jnp.shape(x)}")


def _check_gamma(gamma: Any) -> None:
  if jnp.ndim(gamma) != 0:
    raise ValueError(f"gamma must be a scalar, got shape {jnp.shape(gamma)}")


def forward_diff_x(x: Array) -> Array:
  """``G_x x``: differences along width, [N, H, W-1, C]."""
  return x[:, :, 1:, :] - x[:, :, :-1, :]


def forward_diff_y(x: Array) -> Array:
  """``G_y x``: differences along height, [N, H-1, W, C]."""
  return x[:, 1:, :, :] - x[:, :-1, :, :]


def forward_diff_x_adjoint(g: Array) -> Array:
  """``G_xᵀ g`` for ``g`` of shape [N, H, W-1, C]; returns [N, H, W, C]."""
  pad = [(0, 0), (0, 0), (1, 0), (0, 0)]
  padded_left = jnp.pad(g, pad)                           # g[i-1] at i
  padded_right = jnp.pad(g, [(0, 0), (0, 0), (0, 1), (0, 0)])  # g[i] at i
  return padded_left - padded_right


def forward_diff_y_adjoint(g: Array) -> Array:
  """``G_yᵀ g`` for ``g`` of shape [N, H-1, W, C]; returns [N, H, W, C]."""
  return (jnp.pad(g, [(0, 0), (1, 0), (0, 0), (0, 0)]) -
          jnp.pad(g, [(0, 0), (0, 1), (0, 0), (0, 0)]))


def tv_smooth(x: Array, gamma: Any, *, eps: float = 1e-3) -> Array:
  """One TV step of Eq. 14: ``x - γ² (G_xᵀ W_x G_x + G_yᵀ W_y G_y) x``."""
  _check_nhwc(x)
  _check_gamma(gamma)
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps}")
  gx, gy = forward_diff_x(x), forward_diff_y(x)
  flux = (forward_diff_x_adjoint(gx / (jnp.abs(gx) + eps)) +
          forward_diff_y_adjoint(gy / (jnp.abs(gy) + eps)))
  return x - jnp.square(gamma) * flux


def tv_smooth_sign(x: Array, gamma: Any) -> Array:
  """Inference form: ``x - γ² (G_xᵀ sign(G_x x) + G_yᵀ sign(G_y x))``."""
  _check_nhwc(x)
  _check_gamma(gamma)
  flux = (forward_diff_x_adjoint(jnp.sign(forward_diff_x(x))) +
          forward_diff_y_adjoint(jnp.sign(forward_diff_y(x))))
  return x - jnp.square(gamma) * flux


def total_variation(x: Array) -> Array:
  """Anisotropic TV per example: sum of ``|G_x x| + |G_y x|``; shape [N]."""
  _check_nhwc(x)
  return (jnp.abs(forward_diff_x(x)).sum(axis=(1, 2, 3)) +
          jnp.abs(forward_diff_y(x)).sum(axis=(1, 2, 3)))


def tv_jacobian_norm(x: Array, gamma: Any, *, eps: float = 1e-3,
                     iters: int = 30, key=None) -> Array:
  """Spectral norm of the Jacobian of ``x -> S(x)`` at ``x`` (power iteration).

  The paper observes that trained TV layers have a Jacobian norm below 1
  (the activation is then non-expansive, i.e. stable).
  """
  key = jax.random.PRNGKey(0) if key is None else key
  fn = lambda v: tv_smooth(v, gamma, eps=eps)
  _, jvp_vjp = jax.vjp(fn, x)
  v = jax.random.normal(key, x.shape, x.dtype)
  v = v / jnp.linalg.norm(v)

  def body(_, v):
    jv = jax.jvp(fn, (x,), (v,))[1]
    (w,) = jvp_vjp(jv)
    return w / (jnp.linalg.norm(w) + 1e-30)

  v = jax.lax.fori_loop(0, iters, body, v)
  return jnp.linalg.norm(jax.jvp(fn, (x,), (v,))[1])
