"""Property tests of the quantizer: grid, STE, Eq. 11, runtime bits."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdeq_jax import consistency
from pdeq_jax import quant

bits_st = st.integers(min_value=2, max_value=8)
alpha_st = st.floats(min_value=0.1, max_value=10.0)
seed_st = st.integers(min_value=0, max_value=2**31 - 1)
sign_grid_st = st.sampled_from([(False, "uniform"), (True, "uniform"),
                                (True, "midrise")])


def _sample(seed, alpha, n=257):
  """Values spread over the clip range and beyond."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.6 * alpha, 1.6 * alpha, n), jnp.float32)


def _expected_levels(bits, signed, grid):
  if not signed:
    return 2**bits
  return 2**bits if grid == "midrise" else 2**bits - 1


@given(bits=bits_st, alpha=alpha_st, seed=seed_st, sg=sign_grid_st)
def test_values_lie_on_the_grid(bits, alpha, seed, sg):
  signed, grid = sg
  x = _sample(seed, alpha)
  y = np.asarray(quant.quantize(x, alpha, bits, signed=signed, grid=grid))
  lo = -alpha if signed else 0.0
  assert np.all(y >= lo - 1e-5 * alpha) and np.all(y <= alpha * (1 + 1e-5))
  assert len(np.unique(y)) <= _expected_levels(bits, signed, grid)
  codes, scale = quant.to_integer(x, alpha, bits, signed=signed, grid=grid)
  # codes lie on the documented integer grid
  q_max = int(quant.num_levels(bits, signed=signed, grid=grid))
  codes = np.asarray(codes).astype(np.int64)
  assert codes.max() <= q_max and codes.min() >= (-q_max if signed else 0)
  if grid == "midrise":
    assert np.all(codes % 2 != 0), "mid-rise grid has no zero level"
  # codes times scale reproduce quantize exactly
  np.testing.assert_array_equal(codes.astype(np.float32) * np.float32(scale), y)


@given(bits=bits_st, alpha=alpha_st, seed=seed_st, sg=sign_grid_st)
def test_idempotent(bits, alpha, seed, sg):
  signed, grid = sg
  x = _sample(seed, alpha)
  once = quant.quantize(x, alpha, bits, signed=signed, grid=grid)
  twice = quant.quantize(once, alpha, bits, signed=signed, grid=grid)
  np.testing.assert_allclose(twice, once, rtol=0, atol=1e-6 * alpha)


def test_grid_values_match_eq9_by_hand():
  x = jnp.array([-7.0, -2.9, -0.2, 0.0, 0.4, 1.6, 5.9, 9.0])
  # unsigned, 2 bits, alpha 6: levels 0, 2, 4, 6
  np.testing.assert_allclose(quant.quantize(x, 6.0, 2, signed=False),
                             [0, 0, 0, 0, 0, 2, 6, 6])
  # signed, 3 bits -> q_2 on [-1, 1]: levels -6, -4, -2, 0, 2, 4, 6
  np.testing.assert_allclose(quant.quantize(x, 6.0, 3, signed=True),
                             [-6, -2, 0, 0, 0, 2, 6, 6])
  # mid-rise, 2 bits: levels -6, -2, 2, 6
  np.testing.assert_allclose(
      quant.quantize(x, 6.0, 2, signed=True, grid="midrise"),
      [-6, -2, -2, 2, 2, 2, 6, 6])


@given(alpha=alpha_st, seed=seed_st, signed=st.booleans())
def test_bits_none_is_clip_only(alpha, seed, signed):
  x = _sample(seed, alpha)
  lo = -alpha if signed else 0.0
  np.testing.assert_allclose(quant.quantize(x, alpha, None, signed=signed),
                             np.clip(x, lo, alpha), rtol=1e-6, atol=1e-6)
  # a traced 32 is clip only as well
  f = jax.jit(lambda v, b: quant.quantize(v, alpha, b, signed=signed))
  np.testing.assert_allclose(f(x, jnp.int32(32)), np.clip(x, lo, alpha),
                             rtol=1e-6, atol=1e-6)


@given(bits=bits_st, alpha=alpha_st, seed=seed_st, sg=sign_grid_st)
def test_traced_bits_equal_static_bits(bits, alpha, seed, sg):
  signed, grid = sg
  x = _sample(seed, alpha)
  f = jax.jit(lambda v, b: quant.quantize(v, alpha, b, signed=signed, grid=grid))
  g = jax.jit(lambda v: quant.quantize(v, alpha, bits, signed=signed, grid=grid))
  np.testing.assert_array_equal(f(x, jnp.int32(bits)), g(x))


@given(bits=bits_st, alpha=alpha_st, seed=seed_st, sg=sign_grid_st)
def test_ste_gradient_wrt_x(bits, alpha, seed, sg):
  signed, grid = sg
  x = _sample(seed, alpha)
  grad = jax.grad(lambda v: jnp.sum(
      quant.quantize(v, alpha, bits, signed=signed, grid=grid)))(x)
  lo = -alpha if signed else 0.0
  inside = (x > lo) & (x < alpha)
  np.testing.assert_array_equal(grad, np.where(inside, 1.0, 0.0))


@given(bits=bits_st, alpha=alpha_st, seed=seed_st, sg=sign_grid_st,
       lsq=st.booleans())
def test_alpha_gradient_is_eq11(bits, alpha, seed, sg, lsq):
  signed, grid = sg
  x = _sample(seed, alpha)
  cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=x.shape),
                    jnp.float32)
  fn = lambda a: quant.quantize(x, a, bits, signed=signed, grid=grid,
                                lsq_grad_scale=lsq)
  xb, vjp = jax.vjp(fn, jnp.float32(alpha))
  (got,) = vjp(cot)
  xn, xbn, an = np.asarray(x, np.float64), np.asarray(xb, np.float64), alpha
  per_elem = np.where(xn >= an, 1.0, (xbn - xn) / an)
  per_elem = np.where(xn <= (-an if signed else 0.0),
                      -1.0 if signed else 0.0, per_elem)
  want = np.sum(np.asarray(cot, np.float64) * per_elem)
  if lsq:
    want /= np.sqrt(x.size * float(quant.num_levels(bits, signed=signed,
                                                    grid=grid)))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@given(bits=st.integers(2, 6), alpha=alpha_st, seed=seed_st, sg=sign_grid_st)
def test_grid_step_is_the_level_spacing_and_sets_the_rounding_noise(
    bits, alpha, seed, sg):
  signed, grid = sg
  lo = -alpha if signed else 0.0
  x = jnp.asarray(np.random.default_rng(seed).uniform(lo, alpha, 20000),
                  jnp.float32)
  quantized = np.asarray(quant.quantize(x, alpha, bits, signed=signed,
                                        grid=grid), np.float64)
  step = float(quant.grid_step(alpha, bits, signed=signed, grid=grid))
  np.testing.assert_allclose(np.diff(np.unique(quantized)), step, rtol=1e-3)
  clipped = np.asarray(quant.quantize(x, alpha, None, signed=signed,
                                      grid=grid), np.float64)
  mse = np.mean((quantized - clipped) ** 2)
  ratio = consistency.rounding_noise_ratio([mse], [step])
  # uniform values: the rounding error is uniform on a step, power step²/12
  # (the uniform grid's end levels are half-width bins: a little less)
  assert 0.8 < ratio[0] < 1.1, ratio


@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=4),
       seed=seed_st)
def test_sum_all_equals_float64_sum(shape, seed):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  got = jax.jit(quant.sum_all)(jnp.asarray(x))
  chex.assert_shape(got, ())
  np.testing.assert_allclose(got, np.sum(x, dtype=np.float64), rtol=1e-5,
                             atol=1e-5)


@given(bits=bits_st, alpha=alpha_st, seed=seed_st)
def test_alpha_gradient_of_a_matrix_is_eq11(bits, alpha, seed):
  """[E, C] inputs (the GCN edge features) take the matrix-vector sum."""
  x = _sample(seed, alpha, n=6 * 5).reshape(6, 5)
  cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=x.shape),
                    jnp.float32)
  (got,) = jax.vjp(lambda a: quant.quantize(x, a, bits, signed=True),
                   jnp.float32(alpha))[1](cot)
  (flat,) = jax.vjp(lambda a: quant.quantize(x.reshape(-1), a, bits,
                                             signed=True),
                    jnp.float32(alpha))[1](cot.reshape(-1))
  np.testing.assert_allclose(got, flat, rtol=1e-5, atol=1e-5)


@given(alpha=alpha_st, seed=seed_st, signed=st.booleans())
def test_gradients_match_finite_differences_of_clip_only_map(alpha, seed,
                                                             signed):
  """Where the clip-only map is differentiable the STE must agree with it."""
  x = np.asarray(_sample(seed, alpha, n=64), np.float64)
  lo = -alpha if signed else 0.0
  # stay away from the kinks at lo and alpha
  x = x[(np.abs(x - alpha) > 1e-2 * alpha) & (np.abs(x - lo) > 1e-2 * alpha)]
  delta = 1e-3 * alpha
  clip_map = lambda v, a: a * np.clip(v / a, -1.0 if signed else 0.0, 1.0)
  fd_x = (clip_map(x + delta, alpha) - clip_map(x - delta, alpha)) / (2 * delta)
  fd_a = (clip_map(x, alpha + delta) - clip_map(x, alpha - delta)) / (2 * delta)
  xs = jnp.asarray(x, jnp.float32)
  for bits in (None, 4):  # the STE of the b-bit map equals the clip-only one
    grad_x = jax.vmap(jax.grad(
        lambda v: quant.quantize(v, alpha, bits, signed=signed)))(xs)
    np.testing.assert_allclose(grad_x, fd_x, atol=1e-6)
  grad_a = jax.vmap(jax.grad(
      lambda a, v: quant.quantize(v, a, None, signed=signed)),
                    in_axes=(None, 0))(jnp.float32(alpha), xs)
  np.testing.assert_allclose(grad_a, fd_a, atol=1e-4)


@given(seed=seed_st, shape=st.sampled_from([(3, 3, 4, 8), (16, 10), (5,)]))
def test_standardize_zero_mean_unit_std(seed, shape):
  w = jax.random.normal(jax.random.PRNGKey(seed), shape) * 0.05 + 0.3
  s = quant.standardize(w)
  np.testing.assert_allclose(jnp.mean(s), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(s), 1.0, atol=1e-4)


def test_quantize_weight_is_quantize_of_standardized():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 8)) * 0.1
  np.testing.assert_array_equal(
      quant.quantize_weight(w, 3.0, 4),
      quant.quantize(quant.standardize(w), 3.0, 4, signed=True))


def test_no_recompilation_when_bits_change():
  traces = []

  @jax.jit
  def loss(x, alpha, bits):
    traces.append(1)
    return jnp.sum(quant.quantize(x, alpha, bits, signed=False) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  x = jnp.linspace(-1.0, 8.0, 100)
  values = []
  traces_after_first = None
  for b in [16, 15, 8, 4, 3, 2, 32]:
    values.append(float(loss(x, 6.0, quant.bits_as_array(b))))
    step(x, 6.0, quant.bits_as_array(b))
    if traces_after_first is None:
      traces_after_first = len(traces)
  assert len(traces) == traces_after_first, "changing bits re-traced"
  assert loss._cache_size() == 1 and step._cache_size() == 1
  assert len(set(values)) > 4, "bits really changed the result"


def test_bit_schedule():
  got = [quant.bit_schedule(e, 4, start_bits=16, epochs_per_step=10)
         for e in (0, 9, 10, 55, 119, 120, 400)]
  assert got == [16, 16, 15, 11, 5, 4, 4]
  traced = jax.jit(lambda e: quant.bit_schedule(e, 4))(jnp.arange(0, 200, 10))
  np.testing.assert_array_equal(traced, np.maximum(4, 16 - np.arange(20)))
  assert quant.bit_schedule(3, None) is None


@pytest.mark.parametrize("bits", [0, 1, 33, 2.5, -4])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="bits"):
    quant.quantize(jnp.ones(3), 1.0, bits, signed=False)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_bad_alpha_raises(alpha):
  with pytest.raises(ValueError, match="alpha must be > 0"):
    quant.quantize(jnp.ones(3), alpha, 4, signed=False)


def test_other_bad_arguments_raise():
  with pytest.raises(ValueError, match="alpha must be a scalar"):
    quant.quantize(jnp.ones(3), jnp.ones(3), 4, signed=False)
  with pytest.raises(ValueError, match="grid"):
    quant.quantize(jnp.ones(3), 1.0, 4, signed=True, grid="log")
  with pytest.raises(ValueError, match="midrise"):
    quant.quantize(jnp.ones(3), 1.0, 4, signed=False, grid="midrise")
  with pytest.raises(ValueError, match="floating"):
    quant.quantize(jnp.ones(3, jnp.int32), 1.0, 4, signed=False)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda b: quant.to_integer(jnp.ones(3), 1.0, b, signed=False)[0])(
        jnp.int32(4))
  with pytest.raises(ValueError, match="epochs_per_step"):
    quant.bit_schedule(1, 4, epochs_per_step=0)


def test_integer_dtypes():
  x = jnp.linspace(-2, 8, 50)
  assert quant.to_integer(x, 6.0, 8, signed=True)[0].dtype == jnp.int8
  assert quant.to_integer(x, 6.0, 8, signed=False)[0].dtype == jnp.uint8
  assert quant.to_integer(x, 6.0, 16, signed=True)[0].dtype == jnp.int32
  chex.assert_shape(quant.to_integer(x, 6.0, 4, signed=False)[0], (50,))


def test_layer_dicts_are_ordered_naturally_and_empty_input_raises():
  ref = {f"layer{i}": jnp.full((2, 3), float(i)) for i in (1, 2, 10, 11)}
  quantized = {k: v + 1.0 for k, v in ref.items()}
  stats = consistency.activation_mse(quantized, ref)
  np.testing.assert_allclose(stats["mse"], 1.0)
  # normalised by each layer's own reference power: 1 / i² in layer order
  np.testing.assert_allclose(stats["normalized_mse"],
                             [1.0, 1 / 4, 1 / 100, 1 / 121])
  sums = consistency.squared_error_sums(quantized, ref)
  np.testing.assert_array_equal(sums["sq_ref"], [6.0, 24.0, 600.0, 726.0])
  for empty in ([], {}, jnp.zeros((0, 3))):
    with pytest.raises(ValueError, match="no layers"):
      consistency.activation_mse(empty, empty)
    with pytest.raises(ValueError, match="no layers"):
      consistency.squared_error_sums(empty, empty)


@pytest.mark.parametrize("signed,grid", [(False, "uniform"), (True, "uniform"),
                                         (True, "midrise")])
def test_clip_only_encodings_give_one_alpha_gradient_under_lsq(signed, grid):
  x = _sample(7, 2.0)
  cot = jnp.asarray(np.random.default_rng(8).normal(size=x.shape),
                    jnp.float32)

  def alpha_grad(bits):
    fn = lambda a, b: jnp.vdot(cot, quant.quantize(
        x, a, b, signed=signed, grid=grid, lsq_grad_scale=True))
    return float(jax.jit(jax.grad(fn))(jnp.float32(2.0), bits)
                 if bits is not None and not isinstance(bits, int) else
                 jax.grad(fn)(jnp.float32(2.0), bits))

  # clip only: the Eq. 11 gradient times 1/sqrt(numel) (Q_max = 1)
  xn = np.asarray(x, np.float64)
  lo = -2.0 if signed else 0.0
  per_elem = np.where(xn >= 2.0, 1.0, np.where(xn <= lo, -1.0 if signed
                                                 else 0.0, 0.0))
  want = np.sum(np.asarray(cot, np.float64) * per_elem) / np.sqrt(x.size)
  for encoding in (None, 32, quant.bits_as_array(None),
                   quant.bits_as_array(32)):
    np.testing.assert_allclose(alpha_grad(encoding), want, rtol=1e-5)
  # a traced bit width below 32 still uses its grid's Q_max
  got = alpha_grad(jnp.int32(4))
  assert abs(got - alpha_grad(4)) <= 1e-6 * max(1.0, abs(got))
