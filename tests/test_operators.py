"""Operators and adjoints: <K x, y> = <x, Kᵀ y>, spectral norms, stability."""
import functools

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdeq_jax import operators

seed_st = st.integers(min_value=0, max_value=2**31 - 1)


def _normal(rng, shape, scale=1.0):
  """Gaussian test data from a numpy Generator (no per-shape PRNG compiles)."""
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _keys(seed, n):
  """``n`` independent numpy Generators derived from ``seed``."""
  return [np.random.default_rng([seed, i]) for i in range(n)]


def _assert_adjoint(k_fn, kt_fn, x, y):
  """<K x, y> == <x, Kᵀ y> to float32 accuracy (relative to the norms)."""
  kx, kty = k_fn(x), kt_fn(y)
  chex.assert_equal_shape([kx, y])
  chex.assert_equal_shape([kty, x])
  kx, kty, x, y = (np.asarray(v, np.float64) for v in (kx, kty, x, y))
  lhs = np.vdot(kx, y)
  rhs = np.vdot(x, kty)
  scale = (np.linalg.norm(kx) * np.linalg.norm(y)
           + np.linalg.norm(x) * np.linalg.norm(kty)) + 1e-12
  assert abs(lhs - rhs) <= 2e-6 * scale, (lhs, rhs, scale)


def _dense(linear_fn, x_shape):
  """The matrix of a linear map, [out_size, in_size], column j = K e_j.

  Built from the images of the basis vectors (forward evaluation only, no
  autodiff), so it is independent of the ``jax.vjp`` adjoints under test.
  """
  n = int(np.prod(x_shape))
  basis = jnp.eye(n, dtype=jnp.float32).reshape((n,) + tuple(x_shape))
  cols = jax.lax.map(linear_fn, basis)
  return np.asarray(cols, np.float64).reshape(n, -1).T


def _random_graph(rng, num_nodes, num_edges, both_directions=True):
  """Random simple graph: senders, receivers (int32), no self loops."""
  pairs = set()
  max_pairs = num_nodes * (num_nodes - 1) // 2
  while len(pairs) < min(num_edges, max_pairs):
    i, j = rng.integers(0, num_nodes, 2)
    if i != j:
      pairs.add((min(i, j), max(i, j)))
  s = [p[0] for p in pairs]
  r = [p[1] for p in pairs]
  if both_directions:
    s, r = s + r, r + s
  return np.asarray(s, np.int32), np.asarray(r, np.int32)


# few distinct shapes (node / edge counts), so compiled kernels are reused
graph_st = st.tuples(st.sampled_from([4, 7]), st.sampled_from([3, 8]), seed_st,
                     st.booleans())
graph_channels_st = st.sampled_from([1, 3])
# jitted once per shape (the node count is static)
_jit_graph_gradient = jax.jit(operators.graph_gradient)
_jit_graph_divergence = jax.jit(operators.graph_divergence, static_argnums=4)
_jit_gcn_edge_weights = jax.jit(operators.gcn_edge_weights, static_argnums=2)


# ----------------------------------------------------------------------------
# Adjoint identities.


@given(seed=seed_st, cin=st.integers(1, 4), cout=st.integers(1, 5),
       hw=st.tuples(st.integers(3, 7), st.integers(3, 7)),
       ksize=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from(["SAME", "VALID"]))
def test_conv_adjoint_identity(seed, cin, cout, hw, ksize, stride, padding):
  k1, k2, k3 = _keys(seed, 3)
  x_shape = (2, *hw, cin)
  kernel = _normal(k1, (ksize, ksize, cin, cout))
  k_fn = lambda v: operators.conv(v, kernel, stride=stride, padding=padding)
  x = _normal(k2, x_shape)
  y = _normal(k3, jax.eval_shape(k_fn, x).shape)
  _assert_adjoint(k_fn, operators.conv_adjoint(k_fn, x_shape), x, y)


def test_stride2_conv_adjoint_shapes_and_matrix():
  kernel = _normal(np.random.default_rng(0), (3, 3, 2, 3))
  x_shape = (1, 6, 6, 2)
  k_fn = lambda v: operators.conv(v, kernel, stride=2)
  kt = operators.conv_adjoint(k_fn, x_shape)
  y = _normal(np.random.default_rng(1), (1, 3, 3, 3))
  chex.assert_shape(kt(y), x_shape)
  dense = _dense(k_fn, x_shape)
  np.testing.assert_allclose(np.asarray(kt(y)).reshape(-1),
                             dense.T @ np.asarray(y).reshape(-1),
                             rtol=1e-5, atol=1e-5)
  # jit-able, and the generic name is the same mechanism
  kt_jit = jax.jit(operators.adjoint(k_fn, x_shape))
  np.testing.assert_allclose(kt_jit(y), kt(y), rtol=1e-6, atol=1e-6)


@given(seed=seed_st, c=st.integers(1, 5), hw=st.integers(3, 7),
       stride=st.sampled_from([1, 2]))
def test_depthwise_adjoint_identity(seed, c, hw, stride):
  k1, k2, k3 = _keys(seed, 3)
  x_shape = (2, hw, hw, c)
  kernel = _normal(k1, (3, 3, 1, c))
  k_fn = lambda v: operators.depthwise_conv(v, kernel, stride=stride)
  x = _normal(k2, x_shape)
  y = _normal(k3, jax.eval_shape(k_fn, x).shape)
  _assert_adjoint(k_fn, operators.adjoint(k_fn, x_shape), x, y)


def test_depthwise_does_not_mix_channels():
  kernel = _normal(np.random.default_rng(0), (3, 3, 1, 3))
  x = jnp.zeros((1, 5, 5, 3)).at[0, 2, 2, 1].set(1.0)
  y = operators.depthwise_conv(x, kernel)
  np.testing.assert_allclose(y[..., 0], 0.0)
  np.testing.assert_allclose(y[..., 2], 0.0)
  # cross-correlation: the impulse response of channel 1 is its flipped kernel
  np.testing.assert_allclose(y[0, 1:4, 1:4, 1], kernel[::-1, ::-1, 0, 1],
                             rtol=1e-6)


@given(seed=seed_st, c=st.integers(1, 4), expand=st.integers(1, 3),
       hw=st.integers(3, 6))
def test_separable_adjoint_identity(seed, c, expand, hw):
  k1, k2, k3, k4 = _keys(seed, 4)
  x_shape = (2, hw, hw, c)
  k1x1 = _normal(k1, (1, 1, c, c * expand))
  kdw = _normal(k2, (3, 3, 1, c * expand))
  k_fn = lambda v: operators.separable_operator(v, k1x1, kdw)
  x = _normal(k3, x_shape)
  y = _normal(k4, (2, hw, hw, c * expand))
  _assert_adjoint(k_fn, operators.separable_adjoint(k1x1, kdw, x_shape), x, y)


def test_separable_is_depthwise_after_1x1():
  k1, k2, k3 = _keys(3, 3)
  k1x1 = _normal(k1, (1, 1, 2, 4))
  kdw = _normal(k2, (3, 3, 1, 4))
  x = _normal(k3, (1, 5, 5, 2))
  expected = operators.depthwise_conv(jnp.einsum("nhwc,cd->nhwd", x,
                                                 k1x1[0, 0]), kdw)
  np.testing.assert_allclose(operators.separable_operator(x, k1x1, kdw),
                             expected, rtol=1e-5, atol=1e-5)


@given(g=graph_st, c=graph_channels_st)
def test_graph_gradient_adjoint_identity(g, c):
  n, m, seed, both = g
  rng = np.random.default_rng(seed)
  s, r = _random_graph(rng, n, m, both)
  w = _jit_gcn_edge_weights(s, r, n)
  x = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(len(s), c)), jnp.float32)
  k_fn = lambda v: _jit_graph_gradient(v, s, r, w)
  kt_fn = lambda u: _jit_graph_divergence(u, s, r, w, n)
  _assert_adjoint(k_fn, kt_fn, x, e)
  # the divergence is the transpose of the dense incidence matrix
  dense = np.zeros((len(s), n))
  dense[np.arange(len(s)), s] += np.asarray(w)
  dense[np.arange(len(s)), r] -= np.asarray(w)
  np.testing.assert_allclose(kt_fn(e), dense.T @ np.asarray(e, np.float64),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k_fn(x), dense @ np.asarray(x, np.float64),
                             rtol=1e-5, atol=1e-5)


def _plain_gradient(v, s, r, w):
  return w[:, None] * (v[s] - v[r])


def _plain_divergence(u, s, r, w, n):
  return jax.vjp(lambda v: _plain_gradient(v, s, r, w),
                 jnp.zeros((n, u.shape[1]), u.dtype))[1](u)[0]


def _ours_divergence(u, s, r, w, n):
  return operators.graph_divergence(u, s, r, w, n)


def _graph_layer_loss(x, w, c, s, r, n, gfn, dfn):
  """Through S, tanh and Sᵀ (a PDE-GCN layer), then through Sᵀ S again."""
  z = x - 0.3 * dfn(jnp.tanh(gfn(x, s, r, w)), s, r, w, n)
  return jnp.sum(c * z) + jnp.sum(dfn(gfn(z, s, r, w), s, r, w, n) ** 2)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _graph_loss_and_grads(x, w, c, s, r, n, ours):
  gfn, dfn = ((operators.graph_gradient, _ours_divergence) if ours
              else (_plain_gradient, _plain_divergence))
  loss = lambda x, w: _graph_layer_loss(x, w, c, s, r, n, gfn, dfn)
  return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


@given(g=graph_st)
def test_graph_custom_vjps_match_plain_autodiff(g):
  """The segment-sum custom_vjp pair equals autodiff of the gather formula."""
  n, m, seed, both = g
  rng = np.random.default_rng(seed)
  s, r = _random_graph(rng, n, m, both)
  w = jnp.asarray(rng.uniform(0.2, 1.0, len(s)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  val_p, grads_p = _graph_loss_and_grads(x, w, c, s, r, n, False)
  val_o, grads_o = _graph_loss_and_grads(x, w, c, s, r, n, True)
  np.testing.assert_allclose(val_o, val_p, rtol=1e-5, atol=1e-5)
  for go, gp in zip(grads_o, grads_p):
    np.testing.assert_allclose(go, gp, rtol=1e-4, atol=1e-4)


@given(g=graph_st, c=graph_channels_st)
def test_graph_divergence_conserves_mass(g, c):
  n, m, seed, both = g
  rng = np.random.default_rng(seed)
  s, r = _random_graph(rng, n, m, both)
  w = _jit_gcn_edge_weights(s, r, n)
  e = jnp.asarray(rng.normal(size=(len(s), c)), jnp.float32)
  div = _jit_graph_divergence(e, s, r, w, n)
  chex.assert_shape(div, (n, c))
  np.testing.assert_allclose(div.sum(axis=0), 0.0, atol=1e-5)
  # and constants are in the kernel of the gradient
  np.testing.assert_allclose(
      _jit_graph_gradient(jnp.ones((n, c)), s, r, w), 0.0, atol=1e-6)


@given(g=graph_st)
def test_gcn_edge_weights_brute_force(g):
  n, m, seed, both = g
  rng = np.random.default_rng(seed)
  s, r = _random_graph(rng, n, m, both)
  adjacency = np.zeros((n, n))
  np.add.at(adjacency, (s, r), 1.0)
  degree = (adjacency + np.eye(n)).sum(axis=1)
  expected = [1.0 / np.sqrt(degree[i] * degree[j]) for i, j in zip(s, r)]
  got = operators.gcn_edge_weights(jnp.asarray(s), jnp.asarray(r), n)
  chex.assert_shape(got, (len(s),))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_graphs_tuple_helpers():
  rng = np.random.default_rng(0)
  n = 7
  s, r = _random_graph(rng, n, 9)
  w = operators.gcn_edge_weights(s, r, n)
  x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  graph = jraph.GraphsTuple(nodes=x, edges=None, senders=s, receivers=r,
                            n_node=np.array([n]), n_edge=np.array([len(s)]),
                            globals=None)
  # no edge features -> GCN weights
  e = operators.graph_gradient_from_graph(x, graph)
  np.testing.assert_allclose(e, operators.graph_gradient(x, s, r, w),
                             rtol=1e-6)
  weighted = operators.with_gcn_edge_weights(graph._replace(nodes=None))
  np.testing.assert_allclose(weighted.edges, w, rtol=1e-6)
  np.testing.assert_allclose(operators.graph_gradient_from_graph(x, weighted),
                             e, rtol=1e-6)
  np.testing.assert_allclose(
      operators.graph_divergence_from_graph(e, weighted),
      operators.graph_divergence(e, s, r, w, n), rtol=1e-6)
  assert operators.graph_num_nodes(weighted) == n


# ----------------------------------------------------------------------------
# Spectral norms.


def _largest_singular_value(linear_fn, x_shape):
  return np.linalg.svd(_dense(linear_fn, x_shape), compute_uv=False)[0]


@pytest.mark.parametrize("cin,cout,stride,hw", [(2, 2, 1, 5), (2, 3, 1, 4),
                                                (3, 2, 2, 6), (1, 4, 1, 4)])
def test_spectral_norm_matches_svd_conv(cin, cout, stride, hw):
  kernel = _normal(np.random.default_rng(cin * 10 + cout), (3, 3, cin, cout))
  x_shape = (1, hw, hw, cin)
  k_fn = lambda v: operators.conv(v, kernel, stride=stride)
  expected = _largest_singular_value(k_fn, x_shape)
  got = operators.spectral_norm(k_fn, x_shape, iters=300)
  chex.assert_shape(got, ())
  np.testing.assert_allclose(float(got), expected, rtol=2e-3)
  # a lower bound from below, never above (up to rounding)
  assert float(got) <= expected * (1 + 1e-5)


def test_spectral_norm_matches_svd_separable_and_graph():
  k1, k2 = _keys(1, 2)
  k1x1 = _normal(k1, (1, 1, 2, 4))
  kdw = _normal(k2, (3, 3, 1, 4))
  sep = lambda v: operators.separable_operator(v, k1x1, kdw)
  np.testing.assert_allclose(
      float(operators.spectral_norm(sep, (1, 4, 4, 2), iters=300)),
      _largest_singular_value(sep, (1, 4, 4, 2)), rtol=2e-3)

  rng = np.random.default_rng(3)
  n = 10
  s, r = _random_graph(rng, n, 16)
  w = operators.gcn_edge_weights(s, r, n)
  kmix = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
  ks = lambda v: operators.graph_gradient(v @ kmix, s, r, w)   # K S x
  np.testing.assert_allclose(
      float(jax.jit(lambda: operators.spectral_norm(ks, (n, 3), iters=300))()),
      _largest_singular_value(ks, (n, 3)), rtol=2e-3)


# ----------------------------------------------------------------------------
# Symmetric steps and stability.


def _step_jacobian(step, x):
  """Forward mode, independent of the reverse-mode adjoint inside the step."""
  size = x.size
  return np.asarray(jax.jacfwd(step)(x), np.float64).reshape(size, size)


smooth_act_st = st.sampled_from(["tanh", "softplus"])
_ACTS = {"tanh": jnp.tanh, "softplus": jax.nn.softplus}   # both have σ' <= 1


@given(seed=seed_st, act=smooth_act_st, cout=st.integers(1, 3),
       frac=st.floats(0.05, 0.99))
def test_symmetric_step_jacobian_is_symmetric_and_contractive(seed, act, cout,
                                                              frac):
  k1, k2 = _keys(seed, 2)
  c = 2
  x_shape = (1, 4, 4, c)
  kernel = _normal(k1, (3, 3, c, cout), 0.5)
  norm = _largest_singular_value(lambda v: operators.conv(v, kernel), x_shape)
  h = frac * 2.0 / norm**2                       # below the bound, L = 1
  x = _normal(k2, x_shape)
  jac = _step_jacobian(
      lambda v: operators.symmetric_step(v, kernel, h, _ACTS[act]), x)
  np.testing.assert_allclose(jac, jac.T, atol=1e-5)
  eig = np.linalg.eigvalsh((jac + jac.T) / 2)
  assert eig.min() > -1.0 + 1e-6 and eig.max() <= 1.0 + 1e-5, eig


def test_symmetric_step_large_h_leaves_unit_interval():
  """With h far above 2 / (L ||K||²) an eigenvalue drops below -1."""
  k1, k2 = _keys(0, 2)
  x_shape = (1, 4, 4, 2)
  kernel = _normal(k1, (3, 3, 2, 2), 0.5)
  norm = _largest_singular_value(lambda v: operators.conv(v, kernel), x_shape)
  x = _normal(k2, x_shape, 1e-3)                 # tanh' ~ 1 near 0
  for h, stable in [(1.9 / norm**2, True), (10.0 / norm**2, False)]:
    jac = _step_jacobian(
        lambda v, h=h: operators.symmetric_step(v, kernel, h, jnp.tanh), x)
    eig = np.linalg.eigvalsh((jac + jac.T) / 2)
    assert (eig.min() > -1.0) == stable, (h, eig.min())
    margin = operators.stability_margin(kernel, x_shape, h, iters=300)
    assert bool(margin.stable) == stable
  assert eig.min() < -5.0


def test_symmetric_step_matches_dense_formula():
  k1, k2 = _keys(5, 2)
  x_shape = (1, 4, 4, 2)
  kernel = _normal(k1, (3, 3, 2, 3))
  x = _normal(k2, x_shape)
  dense = _dense(lambda v: operators.conv(v, kernel), x_shape)
  xv = np.asarray(x, np.float64).reshape(-1)
  expected = xv - 0.2 * dense.T @ np.tanh(dense @ xv)
  got = jax.jit(lambda v: operators.symmetric_step(v, kernel, 0.2, jnp.tanh))(x)
  np.testing.assert_allclose(np.asarray(got).reshape(-1), expected, rtol=1e-5,
                             atol=1e-5)


def test_symmetric_update_graph_and_separable_jacobians_are_symmetric():
  rng = np.random.default_rng(1)
  n = 6
  s, r = _random_graph(rng, n, 8)
  w = operators.gcn_edge_weights(s, r, n)
  kmix = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
  ks = lambda v: operators.graph_gradient(v @ kmix, s, r, w)
  x = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
  # the graph operators are a custom_vjp pair (no forward mode): check the
  # step and its reverse-mode Jacobian against the dense formula
  # x - h Aᵀ tanh(A x), A = K S from the basis vectors
  step = lambda v: operators.symmetric_update(v, ks, 0.5, jnp.tanh, (n, 2))
  a = _dense(ks, (n, 2))
  xv = np.asarray(x, np.float64).reshape(-1)
  np.testing.assert_allclose(np.asarray(step(x)).reshape(-1),
                             xv - 0.5 * a.T @ np.tanh(a @ xv), rtol=1e-5,
                             atol=1e-5)
  jac = np.asarray(jax.jacrev(step)(x), np.float64).reshape(2 * n, 2 * n)
  expected = np.eye(2 * n) - 0.5 * a.T @ np.diag(1 - np.tanh(a @ xv) ** 2) @ a
  np.testing.assert_allclose(jac, expected, atol=1e-5)
  np.testing.assert_allclose(jac, jac.T, atol=1e-5)

  k1, k2, k3 = _keys(2, 3)
  k1x1 = _normal(k1, (1, 1, 2, 4))
  kdw = _normal(k2, (3, 3, 1, 4))
  sep = lambda v: operators.separable_operator(v, k1x1, kdw)
  xi = _normal(k3, (1, 3, 3, 2))
  jac = _step_jacobian(
      lambda v: operators.symmetric_update(v, sep, 0.1, jnp.tanh), xi)
  np.testing.assert_allclose(jac, jac.T, atol=1e-5)
  with pytest.raises(ValueError, match="x_shape"):
    operators.symmetric_update(xi, sep, 0.1, jnp.tanh, (1, 4, 4, 2))


def test_stability_margin_and_report():
  k1, k2 = _keys(7, 2)
  x_shape = (1, 5, 5, 2)
  kernels = {"a": _normal(k1, (3, 3, 2, 2), 0.1),
             "b": _normal(k2, (3, 3, 2, 2), 2.0)}
  m_kernel = operators.stability_margin(kernels["a"], x_shape, 0.1, iters=200)
  m_fn = operators.stability_margin(
      lambda v: operators.conv(v, kernels["a"]), x_shape, 0.1, iters=200)
  np.testing.assert_allclose(m_kernel.spectral_norm, m_fn.spectral_norm,
                             rtol=1e-6)
  np.testing.assert_allclose(m_kernel.h_l_norm_sq,
                             0.1 * m_kernel.spectral_norm**2, rtol=1e-6)
  np.testing.assert_allclose(m_kernel.h_max * m_kernel.spectral_norm**2, 2.0,
                             rtol=1e-6)
  m_jit = jax.jit(lambda k: operators.stability_margin(k, x_shape, 0.1))(
      kernels["a"])
  assert bool(m_jit.stable) == bool(m_kernel.stable)

  rows = operators.stability_report(kernels, lambda k: (1, 5, 5, k.shape[2]),
                                    h=0.5, iters=200)
  assert [row["layer"] for row in rows] == ["a", "b"]
  for row in rows:
    assert set(row) == {"layer", "spectral_norm", "h", "h_l_norm_sq",
                        "stable", "h_max"}
    assert row["stable"] == (row["h_l_norm_sq"] < 2.0)
    assert row["stable"] == (row["h"] < row["h_max"])
  assert rows[0]["stable"] and not rows[1]["stable"]


# ----------------------------------------------------------------------------
# Channel and resolution changes; argument validation.


@given(n_in=st.integers(1, 6), extra=st.integers(0, 6), seed=seed_st)
def test_grow_channels(n_in, extra, seed):
  k1, k2 = _keys(seed, 2)
  x_prev = _normal(k1, (2, 3, 3, n_in))
  x_new = _normal(k2, (2, 3, 3, n_in))
  n_out = n_in + extra
  if extra > n_in:
    with pytest.raises(ValueError, match=r"n_in.*n_out"):
      operators.grow_channels(x_prev, x_new, n_out)
    return
  y = operators.grow_channels(x_prev, x_new, n_out)
  chex.assert_shape(y, (2, 3, 3, n_out))
  np.testing.assert_array_equal(y[..., :n_in], x_new)           # x_j + h F
  np.testing.assert_array_equal(y[..., n_in:], x_prev[..., :extra])


def test_grow_channels_errors():
  x = jnp.ones((1, 2, 2, 4))
  with pytest.raises(ValueError, match=r"n_in=4, n_out=3.*\[4, 8\]"):
    operators.grow_channels(x, x, 3)
  with pytest.raises(ValueError, match=r"n_in=4, n_out=9"):
    operators.grow_channels(x, x, 9)
  with pytest.raises(ValueError, match="x_prev"):
    operators.grow_channels(jnp.ones((1, 4, 4, 4)), x, 6)
  np.testing.assert_array_equal(operators.grow_channels(x, 2 * x, 4), 2 * x)


def test_avg_pool2x2():
  x = _normal(np.random.default_rng(0), (2, 4, 6, 3))
  expected = np.asarray(x).reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
  y = operators.avg_pool2x2(x)
  chex.assert_shape(y, (2, 2, 3, 3))
  # float32 means of O(1) values: XLA's summation order differs from numpy's,
  # so entries near zero need an absolute tolerance (a few float32 ulps of
  # the partial sums)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    operators.avg_pool2x2(jnp.ones((1, 3, 4, 1)))
  with pytest.raises(ValueError, match=r"x must have rank 4 \(NHWC\)"):
    operators.avg_pool2x2(jnp.ones((3, 4, 1)))


def test_rank_and_shape_errors():
  kernel = jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match=r"x must have rank 4 \(NHWC\)"):
    operators.conv(jnp.ones((4, 4, 2)), kernel)
  with pytest.raises(ValueError, match=r"kernel must have rank 4 \(HWIO\)"):
    operators.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2)))
  with pytest.raises(ValueError, match="channels"):
    operators.conv(jnp.ones((1, 4, 4, 3)), kernel)
  with pytest.raises(ValueError, match="kernel_dw"):
    operators.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(ValueError, match="kernel_1x1"):
    operators.separable_operator(jnp.ones((1, 4, 4, 2)), kernel,
                                 jnp.ones((3, 3, 1, 2)))
  with pytest.raises(ValueError, match="kernel"):
    operators.symmetric_step(jnp.ones((1, 4, 4, 2)), jnp.ones((2, 2, 2, 2)),
                             0.1, jnp.tanh)
  with pytest.raises(ValueError, match=r"x must have rank 2"):
    operators.graph_gradient(jnp.ones((3,)), jnp.array([0]), jnp.array([1]),
                             jnp.ones((1,)))
  with pytest.raises(ValueError, match="one entry per edge"):
    operators.graph_gradient(jnp.ones((3, 1)), jnp.array([0, 1]),
                             jnp.array([1]), jnp.ones((1,)))
  with pytest.raises(ValueError, match=r"e must have rank 2"):
    operators.graph_divergence(jnp.ones((2,)), jnp.array([0, 1]),
                               jnp.array([1, 0]), jnp.ones((2,)), 3)
  with pytest.raises(ValueError, match="iters"):
    operators.spectral_norm(lambda v: v, (2,), iters=0)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4, 5)])
def test_materialize_is_the_identity_in_value_and_gradient(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  x = x.at[(0,) * len(shape)].set(-0.0) if shape else x
  g = jax.random.normal(jax.random.PRNGKey(1), shape)
  out, vjp = jax.vjp(jax.jit(operators.materialize), x)
  np.testing.assert_array_equal(np.asarray(out).view(np.int32),
                                np.asarray(x).view(np.int32))  # bit for bit
  np.testing.assert_array_equal(vjp(g)[0], g)
  # under jit, inside a chain XLA would otherwise fuse
  f = jax.jit(lambda v: jnp.sum(jnp.sin(operators.materialize(jnp.exp(v)))))
  np.testing.assert_allclose(jax.grad(f)(x), jnp.cos(jnp.exp(x)) * jnp.exp(x),
                             rtol=1e-6)
