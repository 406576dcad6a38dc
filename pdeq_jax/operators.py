"""Linear operators of the stable networks and their adjoints (via ``jax.vjp``).

The transpose ``Kᵀ`` of every operator is obtained in exactly one way: as the
vector-Jacobian product of the linear map ``K`` (:func:`adjoint`).  There is
no second weight tensor and no hand-written transposed convolution, so ``Kᵀ``
shares ``K``'s (possibly quantized) weights exactly.  This module holds:

* convolutions (NHWC inputs, HWIO kernels), depthwise convolutions and the
  separable operator ``K = K_dw K_1x1`` of the stable MobileNetV2 (Eq. 22);
* the weighted graph gradient of PDE-GCN, ``(S x)_e = w_e (x_i - x_j)`` with
  ``w_ij = 1/sqrt(d_i d_j)`` (degrees of ``A + I``), and its adjoint, the
  weighted divergence (Eq. 23);
* the symmetric step ``x - h Kᵀ σ(K x)`` (Eq. 6), the channel growth of
  Eq. 20 and 2x2 average pooling (the stable nets' resolution change);
* :func:`spectral_norm` by power iteration on ``KᵀK`` and the per-layer
  stability margin ``h L ||K||₂² < 2`` (Sec. 4).

All functions are pure and jit-able (shapes, strides, paddings and node
counts are static).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Optional,
                    Sequence, Union)

import jax
import jax.numpy as jnp
import jraph
import numpy as np

Array = jax.Array
LinearFn = Callable[[Array], Array]
Padding = Union[str, Sequence[tuple]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _check_rank(value: Any, rank: int, name: str, layout: str) -> None:
  """Raises ``ValueError`` unless ``value`` has the given rank."""
  if jnp.ndim(value) != rank:
    raise ValueError(f"{name} must have rank {rank} ({layout}), got shape "
                     f"{jnp.shape(value)}")


# ----------------------------------------------------------------------------
# Convolutions and the adjoint mechanism.


def conv(x: Array, kernel: Array, *, stride: int = 1, padding: Padding = "SAME",
         feature_group_count: int = 1) -> Array:
  """2-D convolution of an NHWC input with an HWIO kernel.

  A thin wrapper over ``jax.lax.conv_general_dilated``.

  Args:
    x: input, ``[N, H, W, C_in]``.
    kernel: ``[kh, kw, C_in / feature_group_count, C_out]``.
    stride: the same stride along height and width.
    padding: ``'SAME'``, ``'VALID'`` or explicit ``((lo, hi), (lo, hi))``.
    feature_group_count: grouped convolution (``C_in`` for depthwise).

  Returns:
    ``[N, H', W', C_out]``.
  """
  _check_rank(x, 4, "x", "NHWC")
  _check_rank(kernel, 4, "kernel", "HWIO")
  if x.shape[-1] != kernel.shape[2] * feature_group_count:
    raise ValueError(f"x has {x.shape[-1]} channels but kernel (HWIO "
                     f"{kernel.shape}) expects {kernel.shape[2]} x "
                     f"{feature_group_count} group(s)")
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  if _CANONICAL_GRADS.get() and _is_same_stride1(kernel, stride, padding,
                                                 feature_group_count):
    return _conv_same(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=feature_group_count)


# Inside a while loop (nn.scan over blocks) XLA:CPU runs the convolutions of
# autodiff's transpose rules (swapped kernel dimensions, batch contracted)
# on a slow path, 15-50x slower than outside a loop (jax-ml/jax#12868,
# benchmarks/compile_time.py).  Under canonical_conv_grads() a stride-1
# "same" convolution instead differentiates into NHWC/HWIO convolutions
# with explicit transposes, which stay on the fast path; the values are the
# same (a re-association-free rewrite of the same sums).
_CANONICAL_GRADS = contextvars.ContextVar("pdeq_canonical_conv_grads",
                                          default=False)


@contextlib.contextmanager
def canonical_conv_grads():
  """Within this context (at trace time), :func:`conv` of stride 1 with
  "same" padding differentiates through canonical-layout convolutions
  (reverse mode only: ``jax.vjp``/``jax.grad``, not ``jax.jvp``)."""
  token = _CANONICAL_GRADS.set(True)
  try:
    yield
  finally:
    _CANONICAL_GRADS.reset(token)


def _is_same_stride1(kernel: Array, stride: int, padding: Padding,
                     feature_group_count: int) -> bool:
  kh, kw = kernel.shape[:2]
  if stride != 1 or feature_group_count != 1 or kh != kw or kh % 2 == 0:
    return False
  p = (kh - 1) // 2
  if isinstance(padding, str):
    return padding == "SAME"
  return tuple(tuple(q) for q in padding) == ((p, p), (p, p))


def _raw_same(x: Array, kernel: Array) -> Array:
  p = (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _flip_swap(kernel: Array) -> Array:
  """The kernel of the transposed "same" convolution (HWIO)."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


@jax.custom_vjp
def _conv_same(x: Array, kernel: Array) -> Array:
  return _raw_same(x, kernel)


def _conv_same_fwd(x, kernel):
  return _raw_same(x, kernel), (x, kernel)


def _conv_same_bwd(res, dy):
  x, kernel = res
  return _conv_same(dy, _flip_swap(kernel)), _kernel_grad(x, dy,
                                                          kernel.shape[0])


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_grad(x: Array, dy: Array, size: int) -> Array:
  """``dk[a, b, i, o] = Σ x_pad[n, h + a, w + b, i] dy[n, h, w, o]`` as one
  NHWC/HWIO convolution (batch ↔ channels transposed explicitly)."""
  p = (size - 1) // 2
  dk = jax.lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
      (1, 1), ((p, p), (p, p)), dimension_numbers=_DIMENSION_NUMBERS)
  return jnp.transpose(dk, (1, 2, 0, 3))


def _kernel_grad_fwd(x, dy, size):
  return _kernel_grad(x, dy, size), (x, dy)


def _kernel_grad_bwd(size, res, g):
  x, dy = res
  return _conv_same(dy, _flip_swap(g)), _conv_same(x, g)


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def adjoint(linear_fn: LinearFn, x_shape: Sequence[int],
            dtype: Any = jnp.float32) -> LinearFn:
  """``y -> Kᵀ y`` for the linear map ``K = linear_fn``, via ``jax.vjp``.

  This is the project's only adjoint mechanism.  Because ``K`` is linear its
  vjp does not depend on the linearisation point, so zeros are used (under
  ``jit`` the forward evaluation at zeros is dead code and removed).

  Args:
    linear_fn: a linear map taking arrays of shape ``x_shape``.
    x_shape: the shape of ``K``'s input.
    dtype: the dtype of ``K``'s input.

  Returns:
    A function mapping an array shaped like ``K``'s output to ``Kᵀ y``
    (shaped ``x_shape``).
  """
  _, vjp = jax.vjp(linear_fn, jnp.zeros(tuple(x_shape), dtype))
  return lambda y: vjp(y)[0]


def conv_adjoint(conv_fn: LinearFn, x_shape: Sequence[int],
                 dtype: Any = jnp.float32) -> LinearFn:
  """``Kᵀ`` of a convolution ``conv_fn`` (a transposed convolution sharing K).

  Same as :func:`adjoint`; kept under this name for the public API.
  """
  return adjoint(conv_fn, x_shape, dtype)


def depthwise_conv(x: Array, kernel_dw: Array, *, stride: int = 1,
                   padding: Padding = "SAME") -> Array:
  """Depthwise convolution (no channel mixing); ``kernel_dw`` is [kh, kw, 1, C].

  Implemented as :func:`conv` with ``feature_group_count = C``.
  """
  _check_rank(x, 4, "x", "NHWC")
  _check_rank(kernel_dw, 4, "kernel_dw", "HW1C")
  if kernel_dw.shape[2] != 1 or kernel_dw.shape[3] != x.shape[-1]:
    raise ValueError(f"kernel_dw must be [kh, kw, 1, C] with C = "
                     f"{x.shape[-1]} (the channels of x), got "
                     f"{kernel_dw.shape}")
  return conv(x, kernel_dw, stride=stride, padding=padding,
              feature_group_count=x.shape[-1])


def separable_operator(x: Array, kernel_1x1: Array, kernel_dw: Array) -> Array:
  """``K x = K_dw (K_1x1 x)``: the operator of the stable MobileNetV2 (Eq. 22).

  First a 1x1 convolution (``kernel_1x1``: [1, 1, C, C_exp], usually an
  expansion), then a depthwise 3x3 'SAME' convolution on the expanded channels
  (``kernel_dw``: [3, 3, 1, C_exp]).  In the paper's notation this is
  ``K_dw² K_1x1¹``: the superscripts are the layer indices of Eq. 21, not
  powers.  The "depthwise operation applied twice" of Sec. 4.2 is ``K_dw`` in
  ``K`` and ``K_dwᵀ`` in ``Kᵀ`` within one step ``x - Kᵀ σ(K x)``; use
  :func:`separable_adjoint` (or :func:`symmetric_update`) for ``Kᵀ``.
  """
  _check_rank(kernel_1x1, 4, "kernel_1x1", "HWIO")
  if kernel_1x1.shape[:2] != (1, 1):
    raise ValueError(f"kernel_1x1 must be [1, 1, C_in, C_out], got "
                     f"{kernel_1x1.shape}")
  return depthwise_conv(conv(x, kernel_1x1), kernel_dw)


def separable_adjoint(kernel_1x1: Array, kernel_dw: Array,
                      x_shape: Sequence[int], dtype: Any = jnp.float32
                      ) -> LinearFn:
  """``y -> K_1x1ᵀ K_dwᵀ y``, the adjoint of :func:`separable_operator`."""
  return adjoint(lambda v: separable_operator(v, kernel_1x1, kernel_dw),
                 x_shape, dtype)


# ----------------------------------------------------------------------------
# Symmetric (stable) steps and the channel / resolution changes.


def symmetric_update(x: Array, linear_fn: LinearFn, h: Any,
                     act: Callable[[Array], Array],
                     x_shape: Optional[Sequence[int]] = None) -> Array:
  """``x - h Kᵀ act(K x)`` for any linear map ``K``; ``Kᵀ`` via ``jax.vjp``.

  Used for convolutions (:func:`symmetric_step`), the separable operator of
  the stable MobileNetV2 and ``K S`` of PDE-GCN.  The vjp is taken at ``x``
  itself, which for a linear map equals :func:`adjoint` and saves evaluating
  ``K`` twice.

  Args:
    x: the state ``x_j``.
    linear_fn: ``K``.
    h: the step size (scalar, may be traced).
    act: the activation ``σ`` (for stability: monotone with ``σ' <= L``).
    x_shape: optional expected shape of ``x`` (checked when given).

  Returns:
    ``x_{j+1}``, shaped like ``x``.
  """
  if x_shape is not None and tuple(x_shape) != tuple(x.shape):
    raise ValueError(f"x has shape {x.shape}, expected x_shape "
                     f"{tuple(x_shape)}")
  y, k_transpose = jax.vjp(linear_fn, x)
  (update,) = k_transpose(act(y))
  return x - h * update


def symmetric_step(x: Array, kernel: Array, h: Any,
                   act: Callable[[Array], Array]) -> Array:
  """Eq. 6 for a stride-1 'SAME' convolution: ``x - h Kᵀ act(K x)``.

  Args:
    x: ``[N, H, W, C]``.
    kernel: HWIO ``[kh, kw, C, C_out]``, odd ``kh, kw`` (3x3 in the paper).
      ``C_out`` may differ from ``C`` (a bottleneck ``K``, Sec. 2.1); the
      step itself maps C channels to C channels.
    h: step size.
    act: activation.
  """
  _check_rank(x, 4, "x", "NHWC")
  _check_rank(kernel, 4, "kernel", "HWIO")
  if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
    raise ValueError(f"kernel must have odd spatial size for a 'SAME' step, "
                     f"got {kernel.shape}")
  return symmetric_update(x, lambda v: conv(v, kernel), h, act)


def check_channel_growth(n_in: int, n_out: int, where: str = "channel change",
                         out_name: str = "n_out") -> None:
  """Eq. 20's constraint ``n_in <= n_out <= 2 n_in``, with a clear error."""
  if not n_in <= n_out <= 2 * n_in:
    raise ValueError(f"{where} needs n_in <= {out_name} <= 2 n_in, got "
                     f"n_in={n_in}, {out_name}={n_out} (allowed {out_name} in "
                     f"[{n_in}, {2 * n_in}])")


def grow_channels(x_prev: Array, x_new: Array, n_out: int) -> Array:
  """Channel change of Eq. 20: ``concat(x_new, x_prev[..., :n_out - n_in])``.

  ``x_prev`` is the block input ``x_j`` and ``x_new`` the updated state
  ``x_j + h F(x_j)`` (``n_in`` channels, last axis); the output keeps
  ``x_new`` in its first ``n_in`` channels and appends the first
  ``n_out - n_in`` channels of ``x_j``.  Requires ``n_in <= n_out <= 2 n_in``.
  """
  n_in = x_new.shape[-1]
  check_channel_growth(n_in, n_out)
  if x_prev.shape[:-1] != x_new.shape[:-1]:
    raise ValueError(f"x_prev {x_prev.shape} and x_new {x_new.shape} must "
                     "agree in all but the channel axis")
  if x_prev.shape[-1] < n_out - n_in:
    raise ValueError(f"x_prev has {x_prev.shape[-1]} channels, fewer than the "
                     f"n_out - n_in = {n_out - n_in} to copy")
  return jnp.concatenate([x_new, x_prev[..., : n_out - n_in]], axis=-1)


def avg_pool2x2(x: Array) -> Array:
  """2x2 average pooling with stride 2 (the stable nets' resolution change)."""
  _check_rank(x, 4, "x", "NHWC")
  n, hh, ww, c = x.shape
  if hh % 2 or ww % 2:
    raise ValueError(f"avg_pool2x2 needs even height and width, got x of "
                     f"shape {x.shape}")
  return x.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def materialize(x: Array) -> Array:
  """``x`` unchanged, stored in its own buffer: XLA cannot recompute it later.

  The identity in value (bit for bit) and in gradient.  XLA fuses
  elementwise producers into their consumers and duplicates them where a
  value has several users.  In a CNN without activation quantizers the
  residual stream ``x_{k+1} = relu(x_k + BN(conv(...)))`` is such a chain:
  XLA:CPU fused the whole stream, BatchNorm and ReLU of every earlier block
  included, into the transposed copies that the convolution weight gradients
  read, so each block recomputed all earlier ones (ResNet-20 ``fp`` at batch
  128: 1016 ms/step, 400 ms of it in those copies, against 379 ms with 4W4A
  quantizers, whose custom-VJP boundary stops the chain).  Calling this where
  a disabled quantizer sits (:class:`pdeq_jax.layers.ActQuant`) stores the
  activation once, as the quantized network does.

  How: a one-element ``dynamic_update_slice`` of ``x`` with its own first
  entry, behind a ``custom_jvp`` whose tangent (hence also its cotangent) is
  the identity.  XLA does not duplicate a dynamic-update-slice into consumer
  fusions.
  ``jax.lax.optimization_barrier`` does not help here: XLA:CPU removes it
  before fusion.  A regression test (``tests/test_benchmarks.py``) fails if
  the fp step becomes > 1.5x slower than the 4W4A step again.
  """
  return _materialize(x)


def _store(x: Array) -> Array:
  if x.ndim == 0:
    return x
  start = (0,) * x.ndim
  first = jax.lax.dynamic_slice(x, start, (1,) * x.ndim)
  return jax.lax.dynamic_update_slice(x, first, start)


@jax.custom_jvp
def _materialize(x):
  return _store(x)


# Identity tangent: forward mode works (dense Jacobian references in the tests
# use jax.jacfwd), and reverse mode transposes it to the identity cotangent.
_materialize.defjvp(lambda primals, tangents: (_store(primals[0]),
                                                tangents[0]))


# ----------------------------------------------------------------------------
# Graph operators (PDE-GCN).


def gcn_edge_weights(senders: Array, receivers: Array, num_nodes: int) -> Array:
  """``w_e = 1/sqrt(d_i d_j)`` for edge ``e = (i, j)``, degrees of ``A + I``.

  ``A`` is the adjacency given by the edge list (``A[s, r] += 1`` per edge);
  ``d_i = sum_j A[i, j] + 1``.  For a graph holding both directions of every
  edge this is the usual symmetric GCN normalisation.  ``num_nodes`` is static.
  """
  _check_rank(senders, 1, "senders", "[num_edges]")
  _check_rank(receivers, 1, "receivers", "[num_edges]")
  ones = jnp.ones(jnp.shape(senders), jnp.float32)
  degree = jax.ops.segment_sum(ones, senders, num_nodes) + 1.0
  return jax.lax.rsqrt(degree[senders] * degree[receivers])


def _check_graph(x: Array, senders: Array, receivers: Array,
                 edge_weight: Array, x_name: str, x_layout: str) -> None:
  _check_rank(x, 2, x_name, x_layout)
  _check_rank(senders, 1, "senders", "[num_edges]")
  if not (jnp.shape(senders) == jnp.shape(receivers)
          == jnp.shape(edge_weight)):
    raise ValueError(f"senders {jnp.shape(senders)}, receivers "
                     f"{jnp.shape(receivers)} and edge_weight "
                     f"{jnp.shape(edge_weight)} must have one entry per edge")


def _gradient_impl(x, senders, receivers, edge_weight):
  return edge_weight[:, None] * (x[senders] - x[receivers])


def _divergence_impl(e, senders, receivers, edge_weight, num_nodes):
  we = edge_weight[:, None] * e
  return (jax.ops.segment_sum(we, senders, num_nodes)
          - jax.ops.segment_sum(we, receivers, num_nodes))


# The gradient and the divergence are a custom_vjp pair, each the other's
# transpose: the vjp of S is two segment sums (rather than XLA's generic
# transpose of two gathers, ~1.5x slower on CPU at Cora size), and the vjp of
# Sᵀ is S again, so reverse-over-reverse (training through Sᵀ) stays on the
# fast path.  Tests check both against plain autodiff of the gather formula.


@jax.custom_vjp
def _graph_gradient(x, senders, receivers, edge_weight):
  return _gradient_impl(x, senders, receivers, edge_weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _graph_divergence(e, senders, receivers, edge_weight, num_nodes):
  return _divergence_impl(e, senders, receivers, edge_weight, num_nodes)


def _graph_gradient_fwd(x, senders, receivers, edge_weight):
  return (_graph_gradient(x, senders, receivers, edge_weight),
          (x, senders, receivers, edge_weight))


def _graph_gradient_bwd(res, g):
  x, senders, receivers, edge_weight = res
  grad_x = _graph_divergence(g, senders, receivers, edge_weight, x.shape[0])
  grad_w = jnp.sum(g * (x[senders] - x[receivers]), axis=-1)
  return (grad_x.astype(x.dtype), None, None,
          grad_w.astype(edge_weight.dtype))


def _graph_divergence_fwd(e, senders, receivers, edge_weight, num_nodes):
  return (_graph_divergence(e, senders, receivers, edge_weight, num_nodes),
          (e, senders, receivers, edge_weight))


def _graph_divergence_bwd(num_nodes, res, g):
  del num_nodes
  e, senders, receivers, edge_weight = res
  grad_e = _graph_gradient(g, senders, receivers, edge_weight)
  grad_w = jnp.sum(e * (g[senders] - g[receivers]), axis=-1)
  return (grad_e.astype(e.dtype), None, None,
          grad_w.astype(edge_weight.dtype))


_graph_gradient.defvjp(_graph_gradient_fwd, _graph_gradient_bwd)
_graph_divergence.defvjp(_graph_divergence_fwd, _graph_divergence_bwd)


def graph_gradient(x: Array, senders: Array, receivers: Array,
                   edge_weight: Array) -> Array:
  """``(S x)_e = w_e (x[senders_e] - x[receivers_e])``: [N, C] -> [E, C].

  Differentiable in ``x`` and ``edge_weight``; its vjp in ``x`` is
  :func:`graph_divergence`.
  """
  _check_graph(x, senders, receivers, edge_weight, "x", "[num_nodes, channels]")
  return _graph_gradient(x, senders, receivers, edge_weight)


def graph_divergence(e: Array, senders: Array, receivers: Array,
                     edge_weight: Array, num_nodes: int) -> Array:
  """``Sᵀ e``, the adjoint of :func:`graph_gradient`: [E, C] -> [N, C].

  ``(Sᵀ e)_i = sum_{e: s_e = i} w_e e_e - sum_{e: r_e = i} w_e e_e``.  This is
  literally ``jax.vjp`` of :func:`graph_gradient` (:func:`adjoint`), which
  dispatches to the segment-sum implementation.  Summed over nodes it is 0.
  """
  _check_graph(e, senders, receivers, edge_weight, "e", "[num_edges, channels]")
  x_shape = (num_nodes, e.shape[-1])
  return adjoint(lambda x: _graph_gradient(x, senders, receivers, edge_weight),
                 x_shape, e.dtype)(e)


def _graph_edge_weight(graph: jraph.GraphsTuple,
                       edge_weight: Optional[Array], num_nodes: int) -> Array:
  if edge_weight is not None:
    return edge_weight
  edges = graph.edges
  if edges is not None and jnp.shape(edges) in ((jnp.shape(graph.senders)[0],),
                                                (jnp.shape(graph.senders)[0],
                                                 1)):
    return jnp.reshape(edges, (-1,))
  return gcn_edge_weights(graph.senders, graph.receivers, num_nodes)


def graph_num_nodes(graph: jraph.GraphsTuple) -> int:
  """The (static) node count of a ``GraphsTuple``.

  From ``graph.nodes`` when present, else ``sum(n_node)`` (must be concrete).
  """
  if graph.nodes is not None:
    return int(jax.tree_util.tree_leaves(graph.nodes)[0].shape[0])
  return int(np.sum(np.asarray(graph.n_node)))


def with_gcn_edge_weights(graph: jraph.GraphsTuple,
                          num_nodes: Optional[int] = None
                          ) -> jraph.GraphsTuple:
  """``graph`` with ``edges`` replaced by the ``1/sqrt(d_i d_j)`` weights."""
  n = graph_num_nodes(graph) if num_nodes is None else num_nodes
  return graph._replace(edges=gcn_edge_weights(
      jnp.asarray(graph.senders), jnp.asarray(graph.receivers), n))


def graph_gradient_from_graph(x: Array, graph: jraph.GraphsTuple,
                              edge_weight: Optional[Array] = None) -> Array:
  """:func:`graph_gradient` on a ``GraphsTuple``.

  Edge weights: ``edge_weight`` if given, else ``graph.edges`` when it holds
  one scalar per edge, else :func:`gcn_edge_weights`.
  """
  _check_rank(x, 2, "x", "[num_nodes, channels]")
  w = _graph_edge_weight(graph, edge_weight, x.shape[0])
  return graph_gradient(x, graph.senders, graph.receivers, w)


def graph_divergence_from_graph(e: Array, graph: jraph.GraphsTuple,
                                edge_weight: Optional[Array] = None,
                                num_nodes: Optional[int] = None) -> Array:
  """:func:`graph_divergence` on a ``GraphsTuple`` (weights as above)."""
  n = graph_num_nodes(graph) if num_nodes is None else num_nodes
  w = _graph_edge_weight(graph, edge_weight, n)
  return graph_divergence(e, graph.senders, graph.receivers, w, n)


# ----------------------------------------------------------------------------
# Spectral norms and stability margins.


def spectral_norm(linear_fn: LinearFn, x_shape: Sequence[int], iters: int = 50,
                  key: Optional[Array] = None, dtype: Any = jnp.float32
                  ) -> Array:
  """Largest singular value of ``linear_fn`` by power iteration on ``KᵀK``.

  ``Kᵀ`` comes from :func:`adjoint`.  Returns ``||K v||`` for the final unit
  iterate ``v``: a lower bound on ``||K||₂`` that converges from below (the
  error decays like ``(σ₂/σ₁)^(4 iters)``).  Jit-able with static
  ``x_shape``/``iters``.

  Args:
    linear_fn: ``K``.
    x_shape: the shape of ``K``'s input (include a batch axis for convs; the
      norm of a convolution depends on the image size and padding).
    iters: power iterations (static, >= 1).
    key: PRNG key for the start vector (default ``PRNGKey(0)``).
    dtype: the input dtype.

  Returns:
    A float scalar array.
  """
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  key = jax.random.PRNGKey(0) if key is None else key
  k_transpose = adjoint(linear_fn, x_shape, dtype)
  v = jax.random.normal(key, tuple(x_shape), dtype)
  v = v / jnp.linalg.norm(v)

  def body(_, v):
    w = k_transpose(linear_fn(v))
    return w / (jnp.linalg.norm(w) + jnp.finfo(dtype).tiny)

  v = jax.lax.fori_loop(0, iters, body, v)
  return jnp.linalg.norm(linear_fn(v))


def norm_tied_step(linear_fn: LinearFn, x_shape: Sequence[int], h: Any,
                   max_h_norm_sq: float = 1.0, lipschitz: float = 1.0,
                   iters: int = 16, key: Optional[Array] = None) -> Array:
  """A step size tied to the operator's norm: ``min(h, c / (L ν²))``.

  ``ν`` is the :func:`spectral_norm` estimate of ``||K||₂`` (``iters`` power
  iterations from a fixed start, ``key`` default ``PRNGKey(0)``) and
  ``c = max_h_norm_sq``, so the step ``x - h_eff Kᵀ σ(K x)`` has
  ``h_eff L ν² <= c``.  With the default ``c = 1``, half the stability bound
  2, the true margin ``h_eff L ||K||₂² < 2`` holds as long as the estimate is
  within a factor √2 of ``||K||₂`` (power iteration converges from below;
  :func:`stability_margin` with many iterations checks it).  The result is
  under ``stop_gradient``: a step size, not a trained quantity.
  """
  if not max_h_norm_sq > 0:
    raise ValueError(f"max_h_norm_sq must be > 0, got {max_h_norm_sq}")
  nu = jax.lax.stop_gradient(spectral_norm(linear_fn, x_shape, iters, key))
  bound = max_h_norm_sq / (lipschitz * nu ** 2 + jnp.finfo(nu.dtype).tiny)
  return jnp.minimum(jnp.asarray(h, nu.dtype), bound)


class StabilityMargin(NamedTuple):
  """Stability of one symmetric step ``x - h Kᵀ σ(K x)`` with ``σ' <= L``.

  Attributes:
    spectral_norm: ``||K||₂``.
    h_l_norm_sq: ``h L ||K||₂²``; the step's Jacobian ``I - h Kᵀ D K`` has its
      eigenvalues in ``(-1, 1]`` when this is ``< 2``.
    stable: ``h_l_norm_sq < 2``.
    h_max: the largest stable step, ``2 / (L ||K||₂²)``.
  """
  spectral_norm: Array
  h_l_norm_sq: Array
  stable: Array
  h_max: Array


def stability_margin(kernel_or_linear_fn: Union[Array, LinearFn],
                     x_shape: Sequence[int], h: Any, lipschitz: float = 1.0,
                     iters: int = 50, key: Optional[Array] = None
                     ) -> StabilityMargin:
  """Margin ``h L ||K||₂² < 2`` of one layer.

  Args:
    kernel_or_linear_fn: an HWIO kernel (taken as a stride-1 'SAME'
      convolution) or any linear map.
    x_shape: the input shape of ``K``.
    h: step size.
    lipschitz: ``L``, a bound on ``σ'`` (1 for ReLU and tanh).
    iters: power iterations.
    key: PRNG key for the power iteration.

  Returns:
    A :class:`StabilityMargin` of scalar arrays (jit-able).
  """
  if callable(kernel_or_linear_fn):
    linear_fn = kernel_or_linear_fn
  else:
    kernel = kernel_or_linear_fn
    _check_rank(kernel, 4, "kernel", "HWIO")
    linear_fn = lambda v: conv(v, kernel)
  norm = spectral_norm(linear_fn, x_shape, iters, key)
  value = h * lipschitz * norm ** 2
  return StabilityMargin(norm, value, value < 2.0,
                         2.0 / (lipschitz * norm ** 2))


def stability_report(named_kernels: Mapping[str, Union[Array, LinearFn]],
                     x_shape_fn: Union[Sequence[int],
                                       Callable[[Any], Sequence[int]],
                                       Mapping[str, Sequence[int]]],
                     h: Any, lipschitz: float = 1.0, iters: int = 50
                     ) -> List[Dict[str, Any]]:
  """One row per layer: ``||K||₂``, ``h L ||K||₂²``, stable or not, ``h_max``.

  Args:
    named_kernels: layer name -> HWIO kernel (a 'SAME' stride-1 conv) or a
      linear map.
    x_shape_fn: the input shape of every layer, a function of the kernel
      (or linear map) returning it, e.g.
      ``lambda k: (1, 32, 32, k.shape[2])``, or a mapping name -> shape.
    h: step size (one for all layers) or a mapping name -> step size.
    lipschitz: ``L``.
    iters: power iterations.

  Returns:
    A list of dicts with keys ``layer``, ``spectral_norm``, ``h``,
    ``h_l_norm_sq``, ``stable`` and ``h_max`` (Python floats / bools).
  """
  rows = []
  for name, kernel in named_kernels.items():
    if isinstance(x_shape_fn, Mapping):
      x_shape = x_shape_fn[name]
    else:
      x_shape = x_shape_fn(kernel) if callable(x_shape_fn) else x_shape_fn
    h_layer = h[name] if isinstance(h, Mapping) else h
    m = stability_margin(kernel, x_shape, h_layer, lipschitz, iters)
    rows.append({"layer": name, "spectral_norm": float(m.spectral_norm),
                 "h": float(h_layer), "h_l_norm_sq": float(m.h_l_norm_sq),
                 "stable": bool(m.stable), "h_max": float(m.h_max)})
  return rows
