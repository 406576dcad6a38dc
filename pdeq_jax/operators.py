"""Linear operators of the stable networks and their adjoints (via ``jax.vjp``).

The transpose ``Kᵀ`` of every operator is obtained in exactly one way: as the
vector-Jacobian product of the linear map ``K`` (``adjoint``).  No second
weight tensor, no hand-written transposed convolution.  This module holds:

* convolutions (NHWC inputs, HWIO kernels), depthwise and the separable
  operator ``K_dw K_1x1`` of the stable MobileNetV2 (Eq. 22);
* the weighted graph gradient of PDE-GCN, ``(S x)_e = w_e (x_i - x_j)``, and
  its adjoint, the weighted divergence;
* the symmetric step ``x - h Kᵀ σ(K x)`` (Eq. 6), the channel growth of
  Eq. 20, 2x2 average pooling;
* ``spectral_norm`` by power iteration and the stability margin
  ``h L ||K||² < 2`` of each layer.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
LinearFn = Callable[[Array], Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _check_rank(value: Array, rank: int, name: str, layout: str) -> None:
  if jnp.ndim(value) != rank:
    raise ValueError(f"{name} must have rank {rank} ({layout}), got shape "
                     f"{jnp.shape(value)}")


def conv(x: Array, kernel: Array, *, stride: int = 1, padding: Any = "SAME",
         feature_group_count: int = 1) -> Array:
  """2-D convolution, NHWC input and HWIO kernel."""
  _check_rank(x, 4, "x", "NHWC")
  _check_rank(kernel, 4, "kernel", "HWIO")
  if x.shape[-1] != kernel.shape[2] * feature_group_count:
    raise ValueError(f"x has {x.shape[-1]} channels but kernel expects "
                     f"{kernel.shape[2]} x {feature_group_count} groups")
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=feature_group_count)


def adjoint(linear_fn: LinearFn, x_shape: Sequence[int],
            dtype: Any = jnp.float32) -> LinearFn:
  """``y -> Kᵀ y`` for the linear map ``K = linear_fn``, via ``jax.vjp``."""
  _, vjp = jax.vjp(linear_fn, jnp.zeros(tuple(x_shape), dtype))
  return lambda y: vjp(y)[0]


def conv_adjoint(conv_fn: LinearFn, x_shape: Sequence[int],
                 dtype: Any = jnp.float32) -> LinearFn:
  """Kᵀ of a convolution ``conv_fn`` (a transposed convolution sharing K)."""
  return adjoint(conv_fn, x_shape, dtype)


def depthwise_conv(x: Array, kernel_dw: Array, *, stride: int = 1) -> Array:
  """Depthwise convolution; ``kernel_dw`` is [kh, kw, 1, C]."""
  _check_rank(kernel_dw, 4, "kernel_dw", "HW1C")
  if kernel_dw.shape[2] != 1:
    raise ValueError(f"kernel_dw must be [kh, kw, 1, C], got {kernel_dw.shape}")
  return conv(x, kernel_dw, stride=stride, feature_group_count=x.shape[-1])


def separable_operator(x: Array, kernel_1x1: Array, kernel_dw: Array) -> Array:
  """``K = K_dw K_1x1`` (Eq. 22): a 1x1 convolution, then a depthwise one."""
  return depthwise_conv(conv(x, kernel_1x1), kernel_dw)


def symmetric_update(x: Array, linear_fn: LinearFn, h: Any,
                     act: Callable[[Array], Array]) -> Array:
  """``x - h Kᵀ act(K x)`` for any linear map ``K``; ``Kᵀ`` via ``jax.vjp``."""
  y, k_transpose = jax.vjp(linear_fn, x)
  (update,) = k_transpose(act(y))
  return x - h * update


def symmetric_step(x: Array, kernel: Array, h: Any,
                   act: Callable[[Array], Array]) -> Array:
  """Eq. 6 for a 3x3 'SAME' convolution: ``x - h Kᵀ act(K x)``."""
  _check_rank(kernel, 4, "kernel", "HWIO")
  if kernel.shape[2] != kernel.shape[3]:
    raise ValueError(f"symmetric_step needs a square kernel (in == out "
                     f"channels), got {kernel.shape}")
  return symmetric_update(x, lambda v: conv(v, kernel), h, act)


def grow_channels(x_prev: Array, x_new: Array, n_out: int) -> Array:
  """Channel change of Eq. 20: ``concat(x_new, x_prev[..., :n_out - n_in])``.

  ``x_new`` is the updated state ``x_j + h F(x_j)`` with ``n_in`` channels;
  the extra ``n_out - n_in`` channels are copied from the block's input.
  Requires ``n_in <= n_out <= 2 n_in``.
  """
  n_in = x_new.shape[-1]
  if not n_in <= n_out <= 2 * n_in:
    raise ValueError(f"channel change needs n_in <= n_out <= 2 n_in, got "
                     f"n_in={n_in}, n_out={n_out}")
  if x_prev.shape[-1] < n_out - n_in:
    raise ValueError(f"x_prev has {x_prev.shape[-1]} channels, fewer than the "
                     f"{n_out - n_in} to copy")
  return jnp.concatenate([x_new, x_prev[..., : n_out - n_in]], axis=-1)


def avg_pool2x2(x: Array) -> Array:
  """2x2 average pooling with stride 2 (the stable nets' resolution change)."""
  _check_rank(x, 4, "x", "NHWC")
  n, hh, ww, c = x.shape
  if hh % 2 or ww % 2:
    raise ValueError(f"avg_pool2x2 needs even height and width, got {x.shape}")
  return x.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------
# Graph operators (PDE-GCN).


def gcn_edge_weights(senders: Array, receivers: Array, num_nodes: int) -> Array:
  """``w_ij = 1/sqrt(d_i d_j)`` with degrees of ``A + I`` (edges as given)."""
  ones = jnp.ones(senders.shape, jnp.float32)
  degree = jax.ops.segment_sum(ones, senders, num_nodes) + 1.0
  return jax.lax.rsqrt(degree[senders] * degree[receivers])


def _check_graph(x: Array, senders: Array, receivers: Array,
                 edge_weight: Array) -> None:
  _check_rank(x, 2, "x", "[num_nodes, channels]")
  if not senders.shape == receivers.shape == edge_weight.shape:
    raise ValueError(f"senders {senders.shape}, receivers {receivers.shape} "
                     f"and edge_weight {edge_weight.shape} must have one "
                     "entry per edge")


@jax.custom_vjp
def _graph_gradient(x, senders, receivers, edge_weight):
  w = edge_weight[:, None]
  return w * (x[senders] - x[receivers])


def _graph_divergence_impl(e, senders, receivers, edge_weight, num_nodes):
  we = edge_weight[:, None] * e
  out = jax.ops.segment_sum(we, senders, num_nodes)
  return out - jax.ops.segment_sum(we, receivers, num_nodes)


def _graph_gradient_fwd(x, senders, receivers, edge_weight):
  return (_graph_gradient(x, senders, receivers, edge_weight),
          (x, senders, receivers, edge_weight))


def _graph_gradient_bwd(res, g):
  x, senders, receivers, edge_weight = res
  grad_x = _graph_divergence_impl(g, senders, receivers, edge_weight,
                                  x.shape[0])
  grad_w = jnp.sum(g * (x[senders] - x[receivers]), axis=-1)
  return grad_x, None, None, grad_w


_graph_gradient.defvjp(_graph_gradient_fwd, _graph_gradient_bwd)


def graph_gradient(x: Array, senders: Array, receivers: Array,
                   edge_weight: Array) -> Array:
  """``(S x)_e = w_e (x[senders_e] - x[receivers_e])``: [N, C] -> [E, C].

  Its vjp (hence ``adjoint(graph_gradient)``) is the weighted divergence,
  written with two segment sums rather than XLA's generic scatter of a gather
  transpose.
  """
  _check_graph(x, senders, receivers, edge_weight)
  return _graph_gradient(x, senders, receivers, edge_weight)


def graph_divergence(e: Array, senders: Array, receivers: Array,
                     edge_weight: Array, num_nodes: int) -> Array:
  """``Sᵀ e``, the adjoint of ``graph_gradient``, obtained via ``jax.vjp``."""
  x_shape = (num_nodes, e.shape[-1])
  return adjoint(lambda x: graph_gradient(x, senders, receivers, edge_weight),
                 x_shape, e.dtype)(e)


# ----------------------------------------------------------------------------
# Spectral norms and stability margins.


def spectral_norm(linear_fn: LinearFn, x_shape: Sequence[int], iters: int = 50,
                  key: Optional[Array] = None, dtype: Any = jnp.float32
                  ) -> Array:
  """Largest singular value of ``linear_fn`` by power iteration on ``KᵀK``."""
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  key = jax.random.PRNGKey(0) if key is None else key
  k_transpose = adjoint(linear_fn, x_shape, dtype)
  v = jax.random.normal(key, tuple(x_shape), dtype)
  v = v / jnp.linalg.norm(v)

  def body(_, v):
    w = k_transpose(linear_fn(v))
    return w / (jnp.linalg.norm(w) + 1e-30)

  v = jax.lax.fori_loop(0, iters, body, v)
  return jnp.linalg.norm(linear_fn(v))


class StabilityMargin(NamedTuple):
  """``h L ||K||²`` of one layer; the forward step contracts when it is < 2."""
  spectral_norm: float
  h_l_norm_sq: float
  stable: bool


def stability_margin(linear_fn: LinearFn, x_shape: Sequence[int], h: float,
                     lipschitz: float = 1.0, iters: int = 50
                     ) -> StabilityMargin:
  norm = float(spectral_norm(linear_fn, x_shape, iters))
  value = h * lipschitz * norm ** 2
  return StabilityMargin(norm, value, value < 2.0)


def stability_report(kernels: Dict[str, Array], x_shape_fn: Callable[[Array],
                                                                      Sequence[int]],
                     h: float, lipschitz: float = 1.0, iters: int = 50
                     ) -> Iterable[Dict[str, Any]]:
  """One row per named 3x3 kernel: ``||K||``, ``h L ||K||²``, stable or not."""
  rows = []
  for name, kernel in kernels.items():
    m = stability_margin(lambda v, k=kernel: conv(v, k), x_shape_fn(kernel), h,
                         lipschitz, iters)
    rows.append({"layer": name, **m._asdict()})
  return rows
