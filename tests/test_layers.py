"""Flax layers: bits as call arguments, one compiled model for every width."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import operators
from pdeq_jax import quant
from pdeq_jax import tv


class ConvStack(nn.Module):
  """conv -> act-quant -> symmetric step -> TV activation -> dense."""

  @nn.compact
  def __call__(self, x, bits):
    x = layers.QuantConv(8, 3)(x, bits.weights)
    x = layers.ActQuant(signed=False)(nn.relu(x), bits.activations)
    x = layers.SymmetricConvStep(h=0.1)(x, bits)
    x = layers.TVActivation(gamma_init=0.2)(x)
    return layers.QuantDense(3)(x.mean(axis=(1, 2)), bits.weights)


def _init():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  model = ConvStack()
  params = model.init(jax.random.PRNGKey(1), x, layers.QuantBits.make(4, 4))
  return model, params, x


def test_one_compiled_model_serves_every_bit_width():
  model, params, x = _init()
  traces = []

  @jax.jit
  def loss(params, bits):
    traces.append(1)
    return jnp.sum(model.apply(params, x, bits) ** 2)

  grad = jax.jit(jax.grad(loss))
  outs = []
  for w, a in [(16, 16), (8, 8), (4, 4), (4, 8), (2, 2), (None, None)]:
    bits = layers.QuantBits.make(w, a)
    outs.append(float(loss(params, bits)))
    grad(params, bits)
  assert loss._cache_size() == 1 and grad._cache_size() == 1
  assert len(set(outs)) == len(outs), "every bit width changed the output"


def test_parameters_and_alpha_inits():
  _, params, _ = _init()
  p = params["params"]
  assert float(p["QuantConv_0"]["wq"]["alpha"]) == quant.DEFAULT_WEIGHT_ALPHA
  assert float(p["ActQuant_0"]["alpha"]) == quant.DEFAULT_ACT_ALPHA
  assert "kernel" in p["SymmetricConvStep_0"]
  assert set(p["SymmetricConvStep_0"]) == {"kernel", "wq", "aq"}, \
      "the symmetric step has one weight tensor (Kᵀ is its adjoint)"
  gamma = 1.0 * jax.nn.sigmoid(p["TVActivation_0"]["rho"])
  np.testing.assert_allclose(gamma, 0.2, rtol=1e-5)


def test_every_parameter_receives_a_gradient():
  model, params, x = _init()
  grads = jax.grad(lambda p: jnp.sum(model.apply(
      p, x, layers.QuantBits.make(4, 4)) ** 2))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)


def test_symmetric_conv_step_matches_operator_when_float():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 4))
  step = layers.SymmetricConvStep(h=0.3, quantize_weights=False,
                                  quantize_activations=False, act=jnp.tanh)
  params = step.init(jax.random.PRNGKey(1), x)
  kernel = params["params"]["kernel"]
  np.testing.assert_allclose(
      step.apply(params, x),
      operators.symmetric_step(x, kernel, 0.3, jnp.tanh), rtol=1e-5,
      atol=1e-6)


def test_quant_conv_uses_quantized_standardized_weights():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 2))
  conv = layers.QuantConv(3, 3)
  params = conv.init(jax.random.PRNGKey(1), x, 4)
  kernel = params["params"]["kernel"]
  want = operators.conv(x, quant.quantize_weight(kernel, 3.0, 4))
  np.testing.assert_allclose(conv.apply(params, x, 4), want, rtol=1e-5,
                             atol=1e-5)
  float_conv = layers.QuantConv(3, 3, quantize_weights=False)
  np.testing.assert_allclose(float_conv.apply(params, x),
                             operators.conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_tv_activation_forms_and_gamma_gradient():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2))
  act = layers.TVActivation(gamma_init=0.1, act=lambda v: v)
  params = act.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(act.apply(params, x), tv.tv_smooth(x, 0.1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(act.apply(params, x, sign_form=True),
                             tv.tv_smooth_sign(x, 0.1), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda p: jnp.sum(act.apply(p, x) ** 2))(params)
  assert float(jnp.abs(g["params"]["rho"])) > 0
  with pytest.raises(ValueError, match="gamma_init"):
    layers.TVActivation(gamma_init=2.0).init(jax.random.PRNGKey(0), x)


def test_layer_input_errors():
  with pytest.raises(ValueError, match="NHWC"):
    layers.QuantConv(3).init(jax.random.PRNGKey(0), jnp.ones((5, 5, 2)))
  with pytest.raises(ValueError, match="bits"):
    layers.QuantBits.make(4, 1)
  disabled = layers.ActQuant(enabled=False)
  x = jnp.linspace(-10, 10, 7)
  chex.assert_trees_all_equal(disabled.apply({}, x, 2), x)


def test_positive_alpha_floors_the_value_and_passes_the_gradient():
  alphas = jnp.asarray([-2.0, 0.0, 1e-4, 5e-5, 0.5, 3.0])
  np.testing.assert_array_equal(layers.positive_alpha(alphas),
                                jnp.maximum(alphas, 1e-4))
  grads = jax.vmap(jax.grad(lambda a: 3.0 * layers.positive_alpha(a)))(alphas)
  np.testing.assert_array_equal(grads, 3.0)  # straight through, floor or not
  # a quantizer whose alpha fell below the floor still learns: the gradient
  # is the one Eq. 11 gives at the floor
  x = jnp.linspace(-1.0, 1.0, 11)
  aq = layers.ActQuant(signed=True)
  grad_at = lambda a: jax.grad(lambda p: jnp.sum(aq.apply(p, x, 4)))(
      {"params": {"alpha": jnp.float32(a)}})["params"]["alpha"]
  assert float(grad_at(-0.5)) == float(grad_at(1e-4)) != 0.0
