"""PDE-GCN model: shapes, parameter counts, adjoint use, exact rewrites."""
import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import operators
from pdeq_jax.models import pde_gcn


def _random_graph(num_nodes=12, num_edges=20, seed=0):
  rng = np.random.default_rng(seed)
  pairs = set()
  while len(pairs) < num_edges:
    i, j = rng.integers(0, num_nodes, 2)
    if i != j:
      pairs.add((min(i, j), max(i, j)))
  s = np.array([p[0] for p in pairs] + [p[1] for p in pairs])
  r = np.array([p[1] for p in pairs] + [p[0] for p in pairs])
  w = np.asarray(operators.gcn_edge_weights(jnp.asarray(s), jnp.asarray(r),
                                            num_nodes))
  return jraph.GraphsTuple(nodes=None, edges=w, senders=s, receivers=r,
                           n_node=np.array([num_nodes]),
                           n_edge=np.array([len(s)]), globals=None)


def _model(**kw):
  opts = dict(width=8, depth=4, h=0.3, dropout_in=0.0, dropout_out=0.0)
  opts.update(kw)
  return models.create("pde_gcn", num_classes=3, **opts)


def _count(params):
  return sum(np.size(p) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("symmetric", [True, False])
def test_shapes_and_parameter_counts(symmetric):
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  model = _model(symmetric=symmetric)
  params = model.init(jax.random.PRNGKey(1), x, graph)["params"]
  logits = model.apply({"params": params}, x, graph)
  chex.assert_shape(logits, (12, 3))
  np.testing.assert_allclose(jnp.exp(logits).sum(-1), 1.0, rtol=1e-5)
  kernels = 4 * 8 * 8 * (1 if symmetric else 2)
  expected = 5 * 8 + 8 * 3 + kernels + 2 * 4   # bias-free open/close
  assert _count(params) == expected
  assert ("kernel_out" in params) == (not symmetric)


def test_symmetric_model_has_about_half_the_kernel_parameters():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jnp.ones((12, 5))
  count = lambda s: _count(
      _model(symmetric=s, width=16, depth=8).init(jax.random.PRNGKey(0), x,
                                                  graph)["params"])
  ratio = count(True) / count(False)
  assert 0.5 < ratio < 0.56, ratio


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("quantized", [True, False])
def test_folding_edge_directions_is_exact(symmetric, quantized):
  g = _random_graph()
  folded = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=True)
  both = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=False)
  assert folded.senders.shape[0] * 2 == both.senders.shape[0]
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  model = _model(symmetric=symmetric, quantize_activations=quantized,
                 kernel_noise=0.3, alpha_init=2.0)
  params = model.init(jax.random.PRNGKey(1), x, folded)["params"]
  bits = layers.QuantBits.make(None, 4 if quantized else None)
  a = model.apply({"params": params}, x, folded, bits)
  b = model.apply({"params": params}, x, both, bits)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_folding_is_exact_for_zero_edges_on_a_midrise_grid():
  """Equal neighbours: Q(tanh(0)) != 0 on a mid-rise grid, yet both directions
  cancel; the folded form must reproduce that."""
  g = _random_graph()
  x = jnp.zeros((12, 5)).at[:, 0].set(jnp.arange(12) % 2)  # many equal rows
  folded = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=True)
  both = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=False)
  model = _model(quantize_activations=True, kernel_noise=0.0)
  params = model.init(jax.random.PRNGKey(1), x, folded)["params"]
  bits = layers.QuantBits.make(None, 2)
  _, ha = model.apply({"params": params}, x, folded, bits, return_hidden=True)
  _, hb = model.apply({"params": params}, x, both, bits, return_hidden=True)
  np.testing.assert_allclose(ha, hb, atol=1e-6)


def test_edge_dropout_is_training_only_and_seeded():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  model = _model(dropout_edges=0.5, kernel_noise=0.1)
  params = model.init(jax.random.PRNGKey(1), x, graph)["params"]
  run = lambda seed: model.apply({"params": params}, x, graph, train=True,
                                 rngs={"dropout": jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  evals = model.apply({"params": params}, x, graph)
  np.testing.assert_array_equal(evals, model.apply({"params": params}, x,
                                                   graph))


def test_hash_keep_mask_rate_and_independence():
  mask = pde_gcn.hash_keep_mask(jnp.uint32(3), (200, 64), 0.4)
  assert abs(float(mask.mean()) - 0.4) < 0.01
  other = pde_gcn.hash_keep_mask(jnp.uint32(4), (200, 64), 0.4)
  both = float((mask & other).mean())
  assert abs(both - 0.16) < 0.01, "masks of different seeds look dependent"


def test_symmetric_layer_uses_the_adjoint_of_k_s():
  """Eq. 23 by hand, with dense matrices: x - h Sᵀ Kᵀ tanh(K S x)."""
  g = _random_graph(num_nodes=7, num_edges=9)
  graph = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=False)
  n, c = 7, 4
  S = np.zeros((len(g.senders), n))
  for e, (i, j, w) in enumerate(zip(g.senders, g.receivers, g.edges)):
    S[e, i], S[e, j] = w, -w
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (c, c)))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (n, c)))
  params = pde_gcn.LayerParams(jnp.asarray(kernel), None, jnp.ones(()),
                               jnp.ones(()))
  spec = pde_gcn.QuantSpec(activations=False)
  got, _ = pde_gcn.pde_gcn_layer(jnp.asarray(x), params, graph, 0.2,
                                 layers.FLOAT_BITS, spec, symmetric=True)
  # rows are nodes: K acts on channels from the right
  want = x - 0.2 * S.T @ np.tanh(S @ x @ kernel) @ kernel.T
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
def test_non_symmetric_layer_is_eq24_with_dense_matrices(fold):
  """Eq. 24 by hand: x - h Sᵀ tanh(S x K₁) K₂ (two independent kernels)."""
  g = _random_graph(num_nodes=7, num_edges=9, seed=1)
  graph = pde_gcn.GraphOperator.from_graph(g, fold_edge_directions=fold)
  n, c = 7, 4
  S = np.zeros((len(g.senders), n))  # both directions of every edge
  for e, (i, j, w) in enumerate(zip(g.senders, g.receivers, g.edges)):
    S[e, i], S[e, j] = w, -w
  k1 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (c, c)))
  k2 = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (c, c)))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (n, c)))
  params = pde_gcn.LayerParams(jnp.asarray(k1), jnp.asarray(k2), jnp.ones(()),
                               jnp.ones(()))
  spec = pde_gcn.QuantSpec(activations=False)
  got, state = pde_gcn.pde_gcn_layer(jnp.asarray(x), params, graph, 0.2,
                                     layers.FLOAT_BITS, spec, symmetric=False)
  want = x - 0.2 * S.T @ np.tanh(S @ x @ k1) @ k2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(state, x)
  # K₂ = K₁ᵀ is the symmetric layer
  params = params._replace(kernel_out=jnp.asarray(k1.T))
  sym, _ = pde_gcn.pde_gcn_layer(jnp.asarray(x), params, graph, 0.2,
                                 layers.FLOAT_BITS, spec, symmetric=True)
  nonsym, _ = pde_gcn.pde_gcn_layer(jnp.asarray(x), params, graph, 0.2,
                                    layers.FLOAT_BITS, spec, symmetric=False)
  np.testing.assert_allclose(nonsym, sym, rtol=1e-4, atol=1e-5)


def test_scan_equals_unrolled_and_hidden_states():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  m1 = _model(scan_layers=True, kernel_noise=0.2)
  m2 = _model(scan_layers=False, kernel_noise=0.2)
  params = m1.init(jax.random.PRNGKey(1), x, graph)["params"]
  bits = layers.QuantBits.make(None, 4)
  l1, h1 = m1.apply({"params": params}, x, graph, bits, return_hidden=True)
  l2, h2 = m2.apply({"params": params}, x, graph, bits, return_hidden=True)
  np.testing.assert_allclose(l1, l2, atol=1e-5)
  chex.assert_shape(h1, (4, 12, 8))
  np.testing.assert_allclose(h1, h2, atol=1e-5)


def test_gradients_reach_every_parameter_group():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
  model = _model(symmetric=False, kernel_noise=0.2, alpha_init=1.0)
  params = model.init(jax.random.PRNGKey(1), x, graph)["params"]
  bits = layers.QuantBits.make(None, 4)
  grads = jax.grad(lambda p: model.apply({"params": p}, x, graph, bits)[:, 0]
                   .sum())(params)
  for name in ("kernel", "kernel_out", "alpha_state", "alpha_act"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name


def test_bad_inputs_raise():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  model = _model()
  with pytest.raises(ValueError, match="features"):
    model.init(jax.random.PRNGKey(0), jnp.ones((12,)), graph)
  with pytest.raises(ValueError, match="nodes"):
    model.init(jax.random.PRNGKey(0), jnp.ones((11, 5)), graph)
  with pytest.raises(ValueError, match="unknown model"):
    models.create("pde_gnc", 3)
  g = _random_graph()
  one_way = g._replace(senders=g.senders[:20], receivers=g.receivers[:20],
                       edges=g.edges[:20], n_edge=np.array([20]))
  with pytest.raises(ValueError, match="both"):
    pde_gcn.GraphOperator.from_graph(one_way, fold_edge_directions=True)


def test_data_calibrated_alpha_init():
  graph = pde_gcn.GraphOperator.from_graph(_random_graph())
  x = jax.random.uniform(jax.random.PRNGKey(0), (12, 5))
  model = _model(alpha_init_mode="max", alpha_init=1.5)
  params = model.init(jax.random.PRNGKey(1), x, graph)["params"]
  opened = jax.nn.relu(x @ params["open"]["kernel"])
  np.testing.assert_allclose(params["alpha_state"],
                             1.5 * np.abs(opened).max(), rtol=1e-5)
  edge = jnp.tanh(graph.gradient(opened))
  np.testing.assert_allclose(params["alpha_act"], 1.5 * np.abs(edge).max(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="alpha_init_mode"):
    _model(alpha_init_mode="mean").init(jax.random.PRNGKey(1), x, graph)


def test_kernel_statistics_measure_identity_and_symmetry():
  rng = np.random.default_rng(0)
  depth, width = 3, 5
  k1 = np.eye(width) + 0.1 * rng.standard_normal((depth, width, width))
  stats = pde_gcn.kernel_statistics({"kernel": k1,
                                     "kernel_out": np.swapaxes(k1, 1, 2)})
  np.testing.assert_allclose(stats["asymmetry"], 0.0, atol=1e-6)
  want = np.linalg.norm(k1 - np.eye(width), axis=(1, 2)) / np.sqrt(width)
  np.testing.assert_allclose(stats["identity_deviation"], want, rtol=1e-5)
  k2 = np.swapaxes(k1, 1, 2) + 0.5 * np.eye(width)
  stats = pde_gcn.kernel_statistics({"kernel": k1, "kernel_out": k2})
  want = 0.5 * np.sqrt(width) / np.linalg.norm(k1, axis=(1, 2))
  np.testing.assert_allclose(stats["asymmetry"], want, rtol=1e-5)
  assert "asymmetry" not in pde_gcn.kernel_statistics({"kernel": k1})
  with pytest.raises(ValueError, match="must be \\[depth, C, C\\]"):
    pde_gcn.kernel_statistics({"kernel": np.ones((3, 4, 5))})
