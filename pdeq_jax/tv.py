"""Total-variation (TV) smoothing, a non-pointwise activation (Sec. 3, Eq. 14).

All functions take NHWC arrays and act on every channel of every example
independently (no channel or batch mixing). With the forward differences

  (G_x x)[n, i, j, c] = x[n, i, j + 1, c] - x[n, i, j, c],   j = 0 .. W-2,
  (G_y x)[n, i, j, c] = x[n, i + 1, j, c] - x[n, i, j, c],   i = 0 .. H-2,

(the stencil [-1, 1]; only W-1 / H-1 differences exist, which is the
zero-flux / Neumann boundary), one TV step of Eq. 14 reads

  S(x) = x - γ² (D_x + D_y) x,     D_x = G_xᵀ W_x G_x,
  W_x = diag(1 / (|G_x x| + ε)),   D_y likewise,

so D_x x = G_xᵀ (G_x x / (|G_x x| + ε)). This is exactly one gradient-descent
step of size γ² on the ε-smoothed anisotropic TV

  Φ_ε(x) = Σ φ_ε(G_x x) + Σ φ_ε(G_y x),   φ_ε(t) = |t| - ε log(1 + |t| / ε),

because φ_ε'(t) = t / (|t| + ε); see `smoothed_total_variation`. At inference
W G x ≈ sign(G x) (the limit ε → 0), giving the multiplication-free form

  S₀(x) = x - γ² (G_xᵀ sign(G_x x) + G_yᵀ sign(G_y x)).

Properties (tested in tests/test_tv.py):

* Mass conservation: Σ_{i,j} (x - S(x)) = 0 per example and channel, since
  every column sum of G_xᵀ, G_yᵀ vanishes (zero flux through the boundary).
* Jacobian of the ε-form: J = I - γ² Gᵀ diag(φ_ε''(G x)) G with
  φ_ε''(t) = ε / (|t| + ε)² ∈ (0, 1/ε]. J is symmetric with eigenvalues in
  [1 - 8 γ² / ε, 1] (‖G_xᵀG_x + G_yᵀG_y‖ ≤ 8), and eigenvalue exactly 1 on maps
  that are constant per channel. Hence ‖J‖₂ = 1 (non-expansive, the paper's
  "Jacobian norm smaller than 1" up to the constant mode that TV cannot damp)
  whenever γ² ≤ ε / 4, and ‖J‖₂ ≤ max(1, 8 γ² / ε - 1) always. Locally the
  condition is milder: J is non-expansive at x if every difference t of x has
  (|t| + ε)² ≥ 4 γ² ε (then γ² φ_ε''(t) ≤ 1/4 on every edge).
* The sign form is piecewise affine with Jacobian I almost everywhere.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Any

# ε of the smoothed TV weights W = diag(1 / (|G x| + ε)).
DEFAULT_EPS = 1e-3
# The default γ of every TV layer: γ² <= ε / 4 makes the ε-form step
# non-expansive (‖J‖₂ = 1; 0.015² = 2.25e-4 <= 2.5e-4 at ε = 1e-3).  The
# former default 0.1 had the bound 8γ²/ε - 1 = 79.
NON_EXPANSIVE_GAMMA = 0.015
assert NON_EXPANSIVE_GAMMA ** 2 <= DEFAULT_EPS / 4

__all__ = [
    "DEFAULT_EPS",
    "NON_EXPANSIVE_GAMMA",
    "forward_diff_x",
    "forward_diff_y",
    "forward_diff_x_adjoint",
    "forward_diff_y_adjoint",
    "tv_smooth",
    "tv_smooth_sign",
    "total_variation",
    "smoothed_total_variation",
    "tv_jacobian_norm",
    "tv_jacobian_bound",
]


# ----------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------


def _as_nhwc(x: ArrayLike, name: str = "x") -> Array:
  """Returns `x` as a floating rank-4 array or raises ValueError."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(
        f"`{name}` must be a rank-4 array in NHWC layout "
        f"(batch, height, width, channels); got rank {x.ndim} with shape "
        f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.result_type(float))
  return x


def _check_eps(eps: ArrayLike) -> None:
  """Raises ValueError when `eps` is concrete and not strictly positive."""
  if jnp.ndim(eps) != 0:
    raise ValueError(f"`eps` must be a scalar > 0; got shape {jnp.shape(eps)}.")
  try:
    value = float(eps)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced: cannot be checked here
  if not value > 0.0:
    raise ValueError(
        f"`eps` must be > 0 (allowed range (0, inf)); got {value}.")


def _check_gamma(gamma: ArrayLike) -> None:
  """Raises ValueError unless `gamma` is a scalar (shape [])."""
  if jnp.ndim(gamma) != 0:
    raise ValueError(
        "`gamma` must be a scalar (one learned value per layer, shape []); "
        f"got shape {tuple(jnp.shape(gamma))}.")


def _gamma_sq(gamma: ArrayLike, dtype: Any) -> Array:
  """γ² in the dtype of the feature map (keeps bf16/f32 maps in their dtype)."""
  g = jnp.asarray(gamma).astype(dtype)
  return g * g


# ----------------------------------------------------------------------------
# difference operators and their adjoints
# ----------------------------------------------------------------------------


def forward_diff_x(x: ArrayLike) -> Array:
  """G_x x: forward differences along the width axis, shape [N, H, W-1, C]."""
  x = _as_nhwc(x)
  return x[:, :, 1:, :] - x[:, :, :-1, :]


def forward_diff_y(x: ArrayLike) -> Array:
  """G_y x: forward differences along the height axis, shape [N, H-1, W, C]."""
  x = _as_nhwc(x)
  return x[:, 1:, :, :] - x[:, :-1, :, :]


def _forward_diff_adjoint(g: ArrayLike, size: Optional[int], axis: int,
                          size_name: str, direction: str) -> Array:
  """Gᵀ g along ``axis`` (1 = height, 2 = width): zero-padded differences."""
  g = _as_nhwc(g, "g")
  if size is None:
    size = g.shape[axis] + 1
  if g.shape[axis] != size - 1:
    raise ValueError(
        f"`g` must have {size_name} `{size_name}` - 1 = {size - 1} (the number "
        f"of {direction} differences); got shape {tuple(g.shape)}.")
  pad = [(0, 0)] * 4
  pad[axis] = (1, 1)
  gp = jnp.pad(g, pad)
  n = gp.shape[axis]
  return (jax.lax.slice_in_dim(gp, 0, n - 1, axis=axis) -
          jax.lax.slice_in_dim(gp, 1, n, axis=axis))


def forward_diff_x_adjoint(g: ArrayLike,
                           width: Optional[int] = None) -> Array:
  """G_xᵀ g (a negative divergence): [N, H, W-1, C] -> [N, H, W, C].

  (G_xᵀ g)[..., j, :] = g[..., j-1, :] - g[..., j, :] with g[-1] = g[W-1] = 0,
  so that <G_x x, g> = <x, G_xᵀ g> exactly.  ``width`` (W) defaults to g's
  width + 1, the only consistent value, and is checked when given.
  """
  return _forward_diff_adjoint(g, width, 2, "width", "horizontal")


def forward_diff_y_adjoint(g: ArrayLike,
                           height: Optional[int] = None) -> Array:
  """G_yᵀ g (a negative divergence): [N, H-1, W, C] -> [N, H, W, C].

  (G_yᵀ g)[:, i] = g[:, i-1] - g[:, i] with g[-1] = g[H-1] = 0.  ``height``
  defaults to g's height + 1 and is checked when given.
  """
  return _forward_diff_adjoint(g, height, 1, "height", "vertical")


# ----------------------------------------------------------------------------
# TV step (Eq. 14) and its inference form
# ----------------------------------------------------------------------------


def tv_smooth(x: ArrayLike,
              gamma: ArrayLike,
              *,
              eps: ArrayLike = DEFAULT_EPS) -> Array:
  """One TV smoothing step of Eq. 14: S(x) = x - γ² (D_x + D_y) x.

  D_x x = G_xᵀ (G_x x / (|G_x x| + ε)) and likewise for y. Differentiable in
  `x` and `gamma`; `gamma` may be traced, so changing it does not recompile.

  Args:
    x: feature maps, NHWC.
    gamma: scalar γ (the step is γ²).
    eps: ε > 0 of the weights W = diag(1 / (|G x| + ε)).

  Returns:
    S(x), same shape and dtype as `x`.
  """
  x = _as_nhwc(x)
  _check_gamma(gamma)
  _check_eps(eps)
  h, w = x.shape[1], x.shape[2]
  eps = jnp.asarray(eps, x.dtype)
  gx = forward_diff_x(x)
  gy = forward_diff_y(x)
  flux = (forward_diff_x_adjoint(gx / (jnp.abs(gx) + eps), w)
          + forward_diff_y_adjoint(gy / (jnp.abs(gy) + eps), h))
  return x - _gamma_sq(gamma, x.dtype) * flux


def tv_smooth_sign(x: ArrayLike, gamma: ArrayLike) -> Array:
  """Inference form of Eq. 14: x - γ² (G_xᵀ sign(G_x x) + G_yᵀ sign(G_y x)).

  Only additions, subtractions and a sign (times the constant γ²); equals the
  ε → 0 limit of `tv_smooth` (with sign(0) = 0). Its gradient w.r.t. `x` is the
  identity almost everywhere; w.r.t. `gamma` it is -2γ Gᵀ sign(G x).

  Args:
    x: feature maps, NHWC.
    gamma: scalar γ.

  Returns:
    S₀(x), same shape and dtype as `x`.
  """
  x = _as_nhwc(x)
  _check_gamma(gamma)
  h, w = x.shape[1], x.shape[2]
  flux = (forward_diff_x_adjoint(jnp.sign(forward_diff_x(x)), w)
          + forward_diff_y_adjoint(jnp.sign(forward_diff_y(x)), h))
  return x - _gamma_sq(gamma, x.dtype) * flux


# ----------------------------------------------------------------------------
# diagnostics
# ----------------------------------------------------------------------------


def total_variation(x: ArrayLike) -> Array:
  """Anisotropic TV Σ |G_x x| + Σ |G_y x| per example (summed over H, W, C).

  Args:
    x: NHWC array.

  Returns:
    Array of shape [N].
  """
  x = _as_nhwc(x)
  return (jnp.sum(jnp.abs(forward_diff_x(x)), axis=(1, 2, 3))
          + jnp.sum(jnp.abs(forward_diff_y(x)), axis=(1, 2, 3)))


def smoothed_total_variation(x: ArrayLike, *, eps: ArrayLike = DEFAULT_EPS) -> Array:
  """Φ_ε(x) = Σ φ_ε(G x), φ_ε(t) = |t| - ε log(1 + |t|/ε), per example.

  `tv_smooth(x, γ, eps=ε) == x - γ² ∇Φ_ε(x)`: the TV step is gradient descent
  on Φ_ε, whose gradient is (8/ε)-Lipschitz, so Φ_ε(S(x)) ≤ Φ_ε(x) whenever
  γ² ≤ ε/4 (descent lemma). Φ_ε → total_variation as ε → 0.

  Args:
    x: NHWC array.
    eps: ε > 0.

  Returns:
    Array of shape [N].
  """
  x = _as_nhwc(x)
  _check_eps(eps)
  eps = jnp.asarray(eps, x.dtype)

  def phi(t: Array) -> Array:
    a = jnp.abs(t)
    return jnp.sum(a - eps * jnp.log1p(a / eps), axis=(1, 2, 3))

  return phi(forward_diff_x(x)) + phi(forward_diff_y(x))


def tv_jacobian_norm(x: ArrayLike,
                     gamma: ArrayLike,
                     *,
                     eps: Optional[ArrayLike] = DEFAULT_EPS,
                     iters: int = 100,
                     key: Optional[Array] = None) -> Array:
  """Spectral norm of the Jacobian of x ↦ S(x) at `x`, by power iteration.

  Iterates v ← Jᵀ J v / ‖Jᵀ J v‖ with J v from `jax.jvp` and Jᵀ u from
  `jax.vjp`, over the whole NHWC array (the map is block diagonal over examples
  and channels, so this is the max over them). The estimate converges from
  below. `eps=None` differentiates the sign form (whose Jacobian is I almost
  everywhere, so the result is 1). Values ≤ 1 (up to the iteration's accuracy)
  mean the TV layer is non-expansive at `x`; note ‖J‖ ≥ 1 always, because maps
  that are constant per channel are left unchanged (eigenvalue 1).

  Args:
    x: NHWC point at which to linearise.
    gamma: scalar γ.
    eps: ε of `tv_smooth`, or None for `tv_smooth_sign`.
    iters: number of power iterations (static).
    key: PRNG key for the random start; defaults to PRNGKey(0).

  Returns:
    Scalar estimate of ‖∂S/∂x‖₂.
  """
  x = _as_nhwc(x)
  _check_gamma(gamma)
  if eps is not None:
    _check_eps(eps)
  if key is None:
    key = jax.random.PRNGKey(0)
  return _jacobian_norm(x, gamma, eps, key, iters=int(iters))


@functools.partial(jax.jit, static_argnames=("iters",))
def _jacobian_norm(x: Array, gamma: Array, eps: Optional[Array], key: Array,
                   *, iters: int) -> Array:
  """Jitted power iteration behind `tv_jacobian_norm` (arguments checked)."""
  if eps is None:
    fn = lambda z: tv_smooth_sign(z, gamma)
  else:
    fn = lambda z: tv_smooth(z, gamma, eps=eps)
  _, vjp_fn = jax.vjp(fn, x)

  def normal_op(v: Array) -> Array:
    _, jv = jax.jvp(fn, (x,), (v,))
    return vjp_fn(jv)[0]

  def normalise(v: Array) -> Array:
    return v / jnp.maximum(jnp.linalg.norm(v.ravel()), jnp.finfo(v.dtype).tiny)

  v0 = normalise(jax.random.normal(key, x.shape, x.dtype))
  v = jax.lax.fori_loop(0, iters, lambda _, v: normalise(normal_op(v)), v0)
  _, jv = jax.jvp(fn, (x,), (v,))
  return jnp.linalg.norm(jv.ravel())


def tv_jacobian_bound(gamma: ArrayLike, eps: ArrayLike) -> Array:
  """Global bound ‖∂S/∂x‖₂ ≤ max(1, 8 γ²/ε - 1), valid at every x.

  Equals 1 (non-expansive everywhere) iff γ² ≤ ε/4.

  Args:
    gamma: scalar γ.
    eps: ε > 0.

  Returns:
    Scalar bound.
  """
  _check_gamma(gamma)
  _check_eps(eps)
  g2 = jnp.square(jnp.asarray(gamma, jnp.result_type(float)))
  return jnp.maximum(1.0, 8.0 * g2 / eps - 1.0)
