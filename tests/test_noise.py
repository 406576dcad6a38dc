"""Noise injection (pdeq_jax.noise): identity at sigma = 0, calibrated std per
site, own deterministic PRNG stream, one compilation for every sigma, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import noise


def _bits(x):
  return np.asarray(x).view(np.uint32)


class Toy(nn.Module):
  """Every site once: weight quantizer, activation quantizer, BN, Dense."""

  @nn.compact
  def __call__(self, x, bits):
    w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 64))
    w = layers.WeightQuant(name="wq")(w, bits.weights)
    y = x @ w
    y = nn.BatchNorm(use_running_average=True, name="bn")(y)
    y = layers.ActQuant(signed=True, name="aq")(y, bits.activations)
    return layers.QuantDense(8, name="dense")(y, bits.weights)


def test_perturb_zero_sigma_is_the_identity_bit_for_bit():
  x = jnp.asarray([-0.0, 0.0, 1.5, -3.25e-30, 7e30], jnp.float32)
  y = noise.perturb(x, 0.0, 2.0, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(_bits(y), _bits(x))  # -0.0 stays -0.0
  y = jax.jit(noise.perturb)(x, jnp.float32(0.0), 2.0, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(_bits(y), _bits(x))


def test_model_zero_sigma_is_bit_identical_to_the_plain_model():
  # the stable net: convolutions, BN after K and after its adjoint, Dense
  model = models.create("stable_resnet8", 10, quantize_activations=True,
                        quantize_weights=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), x, layers.FLOAT_BITS)
  bits = layers.QuantBits.make(4, 4)
  plain = jax.jit(model.apply)(variables, x, bits)
  noisy_apply = jax.jit(noise.noisy(model.apply))
  noisy = noisy_apply(noise.Sigmas.make(), jax.random.PRNGKey(2), variables,
                      x, bits)
  np.testing.assert_array_equal(_bits(noisy), _bits(plain))
  # and a positive sigma at any one site does change it
  for site in noise.SITES:
    moved = noisy_apply(noise.Sigmas.make(**{site: 0.05}),
                        jax.random.PRNGKey(2), variables, x, bits)
    assert not np.allclose(np.asarray(moved), np.asarray(plain)), site


def test_perturb_std_matches_sigma_relative_to_max():
  x = jax.random.uniform(jax.random.PRNGKey(0), (1000, 1000), minval=-2.0,
                         maxval=0.5)
  sigma = 0.03
  y = noise.perturb_relative_to_max(x, sigma, jax.random.PRNGKey(1))
  rel = np.asarray(y - x, np.float64) / 2.0  # max|x| = 2 (up to 1e-6)
  assert abs(rel.std() / sigma - 1.0) < 0.01
  assert abs(rel.mean()) < 3 * sigma / 1000


@pytest.mark.parametrize("site", noise.SITES + ("bn",))
def test_each_site_std_matches_sigma_on_a_large_tensor(site):
  model = Toy()
  x = jax.random.normal(jax.random.PRNGKey(0), (1024, 32))
  variables = model.init(jax.random.PRNGKey(1), x, layers.FLOAT_BITS)
  bits = layers.QuantBits.make(4, 4)
  sigma = 0.02
  captured = {}

  def grab(next_fun, args, kwargs, context):  # the outputs, after the noise
    out = next_fun(*args, **kwargs)
    captured["/".join(context.module.path)] = out
    return out

  def run(sigmas):
    with nn.intercept_methods(grab):  # outer: sees the perturbed outputs
      with noise.inject(sigmas, jax.random.PRNGKey(5)):
        model.apply(variables, x, bits)
    return dict(captured)

  clean = run(noise.Sigmas.make())
  noisy = run(noise.Sigmas.make(**{("mac" if site == "bn" else site): sigma}))
  name = {"weights": "wq", "activations": "aq", "mac": "dense",
          "bn": "bn"}[site]  # module paths
  diff = np.asarray(noisy[name], np.float64) - np.asarray(clean[name])
  if site == "weights":
    ref = np.abs(clean["wq"]).max()
  elif site == "activations":
    ref = float(variables["params"]["aq"]["alpha"])
  elif site == "bn":
    # the BN input is perturbed: its eval-mode output (var 1, scale 1) moves
    # by the same noise / sqrt(1 + eps)
    ref = np.abs(np.asarray(x @ clean["wq"])).max() / np.sqrt(1 + 1e-5)
  else:
    # the Dense output's own noise: against the Dense of its (already noisy,
    # through the BN input) actual input
    k = variables["params"]["dense"]
    expected = (np.asarray(noisy["aq"], np.float64)
                @ np.asarray(noisy["dense/wq"], np.float64)
                + np.asarray(k["bias"]))
    diff = np.asarray(noisy["dense"], np.float64) - expected
    ref = np.abs(expected).max()
  assert diff.size >= 2048
  assert abs(diff.std() / (sigma * ref) - 1.0) < 0.05, (diff.std(), sigma * ref)


def test_tap_std_and_layers_draw_independently():
  x = jnp.zeros((400, 500))
  with noise.inject(noise.Sigmas.make(activations=0.1),
                    jax.random.PRNGKey(0)):
    with noise.layer_scope(jnp.int32(0)):
      a = noise.tap("activations", x, 3.0, "t")
    with noise.layer_scope(jnp.int32(1)):
      b = noise.tap("activations", x, 3.0, "t")
    w = noise.tap("weights", x, 3.0, "t")  # sigma 0 there
  assert abs(float(jnp.std(a)) / 0.3 - 1) < 0.01
  assert abs(float(jnp.corrcoef(a.ravel(), b.ravel())[0, 1])) < 0.01
  np.testing.assert_array_equal(np.asarray(w), np.asarray(x))
  # outside inject: the identity, no operation
  assert noise.tap("activations", x, 3.0, "t") is x


def test_same_seed_same_draws_different_seed_different():
  model = Toy()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
  variables = model.init(jax.random.PRNGKey(1), x, layers.FLOAT_BITS)
  bits = layers.QuantBits.make(4, 4)
  f = jax.jit(noise.noisy(model.apply))
  s = noise.Sigmas.make(weights=0.05, activations=0.05, mac=0.05)
  a = f(s, jax.random.PRNGKey(7), variables, x, bits)
  b = f(s, jax.random.PRNGKey(7), variables, x, bits)
  c = f(s, jax.random.PRNGKey(8), variables, x, bits)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_one_compilation_serves_every_sigma_and_mix():
  model = Toy()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
  variables = model.init(jax.random.PRNGKey(1), x, layers.FLOAT_BITS)
  bits = layers.QuantBits.make(4, 4)
  traces = []

  def apply(v, x, b):
    traces.append(1)
    return model.apply(v, x, b)
  f = jax.jit(noise.noisy(apply))
  outs = []
  for sig in ({}, {"weights": 0.1}, {"activations": 0.2, "mac": 0.01},
              {"weights": 0.3, "activations": 0.1, "mac": 0.1}):
    outs.append(f(noise.Sigmas.make(**sig), jax.random.PRNGKey(0), variables,
                  x, bits))
  assert len(traces) == 1
  assert f._cache_size() == 1  # pylint: disable=protected-access
  assert len({np.asarray(o).tobytes() for o in outs}) == 4


def test_train_sigma_ramp():
  f = lambda step: float(noise.train_sigma(step, sigma=0.1, start_step=10,
                                           ramp_steps=4))
  assert [f(s) for s in (0, 9, 10, 11, 12, 13, 20)] == pytest.approx(
      [0, 0, 0.025, 0.05, 0.075, 0.1, 0.1])
  assert float(noise.train_sigma(3, sigma=0.2, start_step=3,
                                 ramp_steps=0)) == pytest.approx(0.2)
  s = noise.train_sigmas(jnp.int32(12), ("weights",), sigma=0.1,
                         start_step=10, ramp_steps=4)
  assert float(s.weights) == pytest.approx(0.075) and float(s.mac) == 0.0


@pytest.mark.parametrize("text,match", [
    ("0,a", "'a' is not a number"), ("", "empty"), ("0,,1", "empty entry"),
    ("0,-0.1", "finite number >= 0"), ("0,nan", "finite number >= 0"),
    ("0.1,0.1", "repeated"),
])
def test_bad_sigma_lists(text, match):
  with pytest.raises(ValueError, match=match):
    noise.parse_sigmas(text)


def test_sigma_list_parses_sorted():
  assert noise.parse_sigmas("0.1, 0,0.01") == (0.0, 0.01, 0.1)


def test_bad_sites_and_sigmas():
  with pytest.raises(ValueError, match="unknown noise site 'macs'"):
    noise.check_sites("weights,macs")
  with pytest.raises(ValueError, match="empty"):
    noise.check_sites("")
  with pytest.raises(ValueError, match="twice"):
    noise.check_sites(["mac", "mac"])
  with pytest.raises(ValueError, match="unknown noise site 'bias'"):
    noise.Sigmas.make(bias=0.1)
  with pytest.raises(ValueError, match=r"sigma\['mac'\] must be a finite"):
    noise.Sigmas.make(mac=-1.0)
  with pytest.raises(ValueError, match="noise.Sigmas"):
    with noise.inject({"mac": 0.1}, jax.random.PRNGKey(0)):
      pass


def test_two_bit_signed_weights_are_ternary():
  """FQ-Conv's ternary weights are the 2-bit signed grid: {-1, 0, 1} * alpha
  (configs/cifar.py precision '2w4a', '2w2a', ...)."""
  from configs import cifar as cifar_configs  # pylint: disable=import-outside-toplevel
  from pdeq_jax import quant  # pylint: disable=import-outside-toplevel
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 16))
  codes = np.unique(np.asarray(quant.quantize_weight(w, 1.5, 2)) / 1.5)
  np.testing.assert_array_equal(codes, [-1.0, 0.0, 1.0])
  config = cifar_configs.get_config("stable_resnet20,cifar10_jpeg,2w2a,cpu")
  assert (config.quant.weight_bits, config.quant.act_bits) == (2, 2)
