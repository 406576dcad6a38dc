"""CNN models: ResNets, stable ResNets, MobileNetV2 (standard and stable).

Parameter counts of the big models and the output shapes of every registered
CNN come from ``jax.eval_shape`` (tracing only); real forward passes run on
the small nets with a batch of 2 and small images.  Initialisation uses the
``unsafe_rbg`` PRNG, which compiles much faster than threefry on CPU.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import operators
from pdeq_jax import quant
from pdeq_jax.models import mobilenetv2
from pdeq_jax.models import stable_resnet
from pdeq_jax.models.switches import ModelSwitches

NO_QUANT = ModelSwitches(quantize_weights=False, quantize_activations=False)

CNN_NAMES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
             "resnet18", "resnet34", "stable_resnet20", "stable_resnet56",
             "stable_resnet34", "mobilenetv2", "stable_mobilenetv2")

# The authors' code (PyTorch, unquantized: no α scalars) and the paper's tables.
AUTHORS_PARAM_COUNTS = [
    ("resnet56", 10, 855_770),
    ("stable_resnet56", 10, 405_850),
    ("mobilenetv2", 10, 2_236_074),
    ("stable_mobilenetv2", 10, 1_719_306),
    ("resnet34", 100, 21_328_292),
    ("stable_resnet34", 100, 9_061_284),
]

# A MobileNetV2 small enough for a real forward pass in a unit test: one
# stage keeps the width (residual), two grow it, one with stride 2.
TINY_STAGES = ((8, 2, 1, 1), (12, 2, 2, 2), (16, 1, 1, 2))


def _key(seed=0):
  return jax.random.key(seed, impl="unsafe_rbg")


def _images(hw=16, n=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, hw, hw, 3))


def _count(params, include_alpha=False):
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not include_alpha and getattr(path[-1], "key", None) == "alpha":
      continue
    total += int(np.prod(leaf.shape))
  return total


def _abstract_variables(model, x):
  return jax.eval_shape(model.init, _key(), x)


_X32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _registered(name, num_classes=10):
  """Abstract variables and ``(logits, hidden)`` of a registered CNN."""
  model = models.create(name, num_classes)
  variables = jax.eval_shape(model.init, _key(), _X32)
  bits = layers.QuantBits.make(4, 4)
  outputs = jax.eval_shape(
      lambda v, x: model.apply(v, x, bits, return_hidden=True), variables,
      _X32)
  return variables, outputs


@pytest.mark.parametrize("name,num_classes,target", AUTHORS_PARAM_COUNTS)
def test_parameter_counts_match_the_authors_code(name, num_classes, target):
  variables, _ = _registered(name, num_classes)
  count = _count(variables["params"])
  assert count == target, (name, count, target)
  # α scalars (one per quantizer) are a handful on top.
  assert 0 < _count(variables["params"], include_alpha=True) - count < 300


def test_stable_nets_have_about_half_the_parameters():
  counts = {name: _count(_registered(name, num_classes)[0]["params"])
            for name, num_classes, _ in AUTHORS_PARAM_COUNTS}
  assert counts["stable_resnet56"] < 0.5 * counts["resnet56"]
  assert counts["stable_resnet34"] < 0.5 * counts["resnet34"]
  assert counts["stable_mobilenetv2"] < counts["mobilenetv2"]


@pytest.mark.parametrize("name", CNN_NAMES)
def test_every_registered_cnn_gives_logits_and_hidden_states(name):
  num_classes = 100 if name in ("resnet34", "stable_resnet34") else 10
  variables, (logits, hidden) = _registered(name, num_classes)
  assert set(variables) == {"params", "batch_stats"}
  assert logits.shape == (2, num_classes)
  assert len(hidden) >= 8 and all(h.shape[0] == 2 for h in hidden)
  # the classifier sees the last hidden map (after global average pooling)
  assert hidden[-1].shape[-1] == variables["params"]["head"]["dense"][
      "kernel"].shape[0]


def test_hidden_states_are_per_block():
  for name, expected in [("resnet56", 27), ("stable_resnet20", 9),
                         ("resnet18", 8), ("mobilenetv2", 18)]:
    _, (_, hidden) = _registered(name)
    assert len(hidden) == expected, name
  _, (_, hidden) = _registered("stable_resnet20")
  assert [h.shape for h in hidden[2:4]] == [(2, 32, 32, 16), (2, 16, 16, 32)]


def test_first_conv_and_classifier_stay_float():
  for name in ("resnet20", "stable_resnet20", "mobilenetv2"):
    params = _registered(name)[0]["params"]
    assert set(params["stem"]["conv"]) == {"kernel"}
    assert set(params["head"]["dense"]) == {"kernel", "bias"}
    block_paths = [jax.tree_util.keystr(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(
                       params["stage1_block1"])[0]]
    assert any("'wq" in p for p in block_paths)  # blocks are quantized
    if "closing_conv" in params:
      assert set(params["closing_conv"]) == {"kernel"}


def test_quantizers_are_structure():
  x = jnp.zeros((1, 32, 32, 3))
  full = _count(_registered("resnet20")[0]["params"], include_alpha=True)
  for flags in [dict(quantize_weights=False), dict(quantize_activations=False),
                dict(quantize_weights=False, quantize_activations=False)]:
    params = _abstract_variables(models.create("resnet20", 10, **flags),
                                 x)["params"]
    assert _count(params, include_alpha=True) < full
  params = _abstract_variables(
      models.create("stable_resnet20", 10, quantize_weights=False,
                    quantize_activations=False), x)["params"]
  assert _count(params, include_alpha=True) == _count(params)


def test_stable_blocks_hold_one_operator():
  x = jnp.zeros((1, 32, 32, 3))
  params = _registered("stable_resnet20")[0]["params"]
  block = params["stage2_block1"]
  assert set(block) == {"kernel", "wq", "aq_in", "aq_mid", "bn1", "bn2"}
  assert block["kernel"].shape == (3, 3, 16, 16)  # n_in: Eq. 20 growth
  assert block["bn2"]["scale"].shape == (16,)
  kernels = stable_resnet.symmetric_kernels(params)
  assert len(kernels) == 9 and kernels["stage3_block1"].shape == (3, 3, 32, 32)
  params = _registered("stable_mobilenetv2")[0]["params"]
  block = params["stage3_block2"]
  assert {"kernel_1x1", "kernel_dw"} <= set(block)
  assert not any(k.startswith("conv") for k in block)
  assert "conv_project" in params["stage3_block1"]  # authors: first stays
  params = _abstract_variables(
      models.create("stable_mobilenetv2", 10, stable_transitions=True),
      x)["params"]
  assert "kernel_1x1" in params["stage3_block1"]


def test_channel_growth_outside_eq20_raises():
  block = stable_resnet.StableBlock(9)
  with pytest.raises(ValueError, match="n_in <= features <= 2 n_in"):
    jax.eval_shape(block.init, _key(), jnp.zeros((1, 4, 4, 4)))
  with pytest.raises(ValueError, match="n_in <= features <= 2 n_in"):
    jax.eval_shape(stable_resnet.StableBlock(3).init, _key(),
                   jnp.zeros((1, 4, 4, 4)))
  model = stable_resnet.StableResNet(10, widths=(16, 40, 64))
  with pytest.raises(ValueError, match="2 n_in"):
    jax.eval_shape(model.init, _key(), jnp.zeros((1, 32, 32, 3)))
  tiny = mobilenetv2.MobileNetV2(10, stages=((8, 1, 1, 1), (20, 1, 2, 2)),
                                 stem_features=8, stable=True,
                                 stable_transitions=True)
  with pytest.raises(ValueError, match="2 n_in"):
    jax.eval_shape(tiny.init, _key(), jnp.zeros((1, 8, 8, 3)))


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model 'resnet999'"):
    models.create("resnet999", 10)
  assert set(CNN_NAMES) <= set(models.names())


def test_wrong_input_rank():
  model = models.create("resnet20", 10)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(model.init, _key(), jnp.zeros((32, 32, 3)))


def _clean_block(h=0.1, **kw):
  """Plain Eq. 15 with a fixed h (no norm-tied step)."""
  kw.setdefault("max_h_norm_sq", None)
  return stable_resnet.StableBlock(4, h=h, clean_form=True, act=jnp.tanh,
                                   act_signed=True, switches=NO_QUANT, **kw)


def test_clean_stable_block_is_eq6_with_the_transposed_convolution():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 4))
  block = _clean_block(h=0.3)
  variables = block.init(_key(), x)
  kernel = variables["params"]["kernel"]
  out = block.apply(variables, x)
  # Kᵀ of a 'SAME' 3x3 convolution: the flipped kernel, in/out swapped.
  kernel_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  expected = x - 0.3 * operators.conv(jnp.tanh(operators.conv(x, kernel)),
                                      kernel_t)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_stable_block_jacobian_is_symmetric_and_contractive():
  x = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 4))
  block = _clean_block(h=0.1)
  variables = block.init(_key(3), x)
  margin = operators.stability_margin(variables["params"]["kernel"], x.shape,
                                      0.1)
  assert bool(margin.stable)
  fn = lambda z: block.apply(variables, z.reshape(x.shape)).reshape(-1)
  jac = np.asarray(jax.jacfwd(fn)(x.reshape(-1)), np.float64)
  chex.assert_shape(jac, (64, 64))
  np.testing.assert_allclose(jac, jac.T, atol=1e-5)  # I - h Kᵀ σ'(Kx) K
  eig = np.linalg.eigvalsh((jac + jac.T) / 2)
  assert eig.max() <= 1.0 + 1e-5 and eig.min() > -1.0
  assert eig.min() >= 1.0 - float(margin.h_l_norm_sq) - 1e-2
  # an unstable step size breaks contractivity
  big_h = 3.0 * float(margin.h_max)
  block = _clean_block(h=big_h)
  fn = lambda z: block.apply(variables, z.reshape(x.shape)).reshape(-1)
  eig = np.linalg.eigvalsh(np.asarray(jax.jacfwd(fn)(x.reshape(-1))))
  assert eig.min() < -1.0


@pytest.fixture(scope="module")
def resnet20_setup():
  """ResNet-20, its variables and one jitted (logits, hidden) forward."""
  model = models.create("resnet20", 10)
  x = _images(16)
  variables = jax.jit(model.init)(_key(1), x)
  forward = jax.jit(
      lambda v, x, bits: model.apply(v, x, bits, return_hidden=True))
  return model, variables, x, forward


def test_resnet20_forward_and_batch_stats(resnet20_setup):
  model, variables, x, forward = resnet20_setup
  logits, hidden = forward(variables, x, layers.QuantBits.make(4, 4))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert [h.shape for h in hidden[::3]] == [(2, 16, 16, 16), (2, 8, 8, 32),
                                            (2, 4, 4, 64)]
  train_step = jax.jit(lambda v, x, bits: model.apply(
      v, x, bits, train=True, mutable=["batch_stats"]))
  logits, updates = train_step(variables, x, layers.QuantBits.make(4, 4))
  chex.assert_shape(logits, (2, 10))
  old = variables["batch_stats"]["stage1_block1"]["bn1"]["mean"]
  new = updates["batch_stats"]["stage1_block1"]["bn1"]["mean"]
  assert not np.allclose(old, new)


def test_changing_bits_does_not_retrace(resnet20_setup):
  _, variables, x, forward = resnet20_setup
  outs = []
  for w, a in [(8, 8), (4, 4), (4, 8), (None, None)]:
    logits, hidden = forward(variables, x, layers.QuantBits.make(w, a))
    assert len(hidden) == 9
    outs.append(np.asarray(logits))
  assert forward._cache_size() == 1
  assert not np.allclose(outs[0], outs[1])
  assert not np.allclose(outs[1], outs[3])  # 4-bit vs clip-only


def test_stable_resnet20_forward_and_hidden():
  model = models.create("stable_resnet20", 10)
  x = _images(16)
  variables = jax.jit(model.init)(_key(2), x)
  logits, hidden = jax.jit(
      lambda v, x, bits: model.apply(v, x, bits, return_hidden=True))(
          variables, x, layers.QuantBits.make(4, 4))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert [h.shape for h in hidden[::3]] == [(2, 16, 16, 16), (2, 8, 8, 32),
                                            (2, 4, 4, 64)]
  # practical form: a ReLU after the update, so block outputs are >= 0
  assert all(float(h.min()) >= 0.0 for h in hidden)
  # Eq. 20: the grown channels are copies of the (quantized) block input,
  # pooled: the first stage-2 block's last 16 channels are pooled stage-1
  # output channels 0..15 (up to the input quantizer).
  q = variables["params"]["stage2_block1"]["aq_in"]["alpha"]
  pooled = operators.avg_pool2x2(jnp.clip(hidden[2], 0.0, q))
  np.testing.assert_allclose(hidden[3][..., 16:], pooled[..., :16],
                             atol=float(q) / 15 + 1e-6)


# (True, False) has both block kinds: standard stage openers, stable others.
@pytest.mark.parametrize("stable,transitions", [(True, False), (True, True)])
def test_tiny_mobilenetv2_forward(stable, transitions):
  model = mobilenetv2.MobileNetV2(10, stages=TINY_STAGES, stem_features=8,
                                  closing_features=32, stable=stable,
                                  stable_transitions=transitions)
  x = _images(8)
  variables = jax.jit(model.init)(_key(3), x)
  logits, hidden = jax.jit(
      lambda v, x, bits: model.apply(v, x, bits, return_hidden=True))(
          variables, x, layers.QuantBits.make(4, 4))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert [h.shape[1:] for h in hidden] == [
      (8, 8, 8), (8, 8, 8), (4, 4, 12), (4, 4, 12), (4, 4, 16), (4, 4, 32)]


def test_stable_mobilenet_block_is_eq22():
  """Clean form: ``x - h K_1x1ᵀ K_dwᵀ σ(K_dw K_1x1 x)`` with Kᵀ the adjoint."""
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 4, 4, 3))
  block = mobilenetv2.StableInvertedResidual(
      3, expansion=2, h=0.2, clean_form=True, act=jnp.tanh,
      switches=NO_QUANT)
  variables = block.init(_key(4), x)
  p = variables["params"]
  assert p["kernel_1x1"].shape == (1, 1, 3, 6)
  assert p["kernel_dw"].shape == (3, 3, 1, 6)
  out = block.apply(variables, x)
  k = lambda v: operators.separable_operator(v, p["kernel_1x1"],
                                             p["kernel_dw"])
  # adjoint identity <K x, y> = <x, Kᵀ y> through the block's update
  y = jnp.tanh(k(x))
  update = (x - out) / 0.2
  k_matrix = jax.jacfwd(lambda v: k(v.reshape(x.shape)).reshape(-1))(
      x.reshape(-1))
  np.testing.assert_allclose(update.reshape(-1), k_matrix.T @ y.reshape(-1),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("outer", [None, lambda v: v])
def test_symmetric_residual_gradients_flow_through_the_adjoint(outer):
  """Both paths (vjp at x; operators.adjoint) train K through Kᵀ exactly."""
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 4, 3))
  kernel = 0.3 * jax.random.normal(jax.random.PRNGKey(6), (3, 3, 3, 3))

  def loss(kernel, x):
    y = stable_resnet.symmetric_residual(
        x, lambda v: operators.conv(v, kernel), 0.2, jnp.tanh, outer)
    return jnp.sum(jnp.sin(y))

  def reference(kernel, x):
    kernel_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    y = x - 0.2 * operators.conv(jnp.tanh(operators.conv(x, kernel)),
                                 kernel_t)
    return jnp.sum(jnp.sin(y))

  grads = jax.grad(loss, (0, 1))(kernel, x)
  expected = jax.grad(reference, (0, 1))(kernel, x)
  chex.assert_trees_all_close(grads, expected, atol=1e-5, rtol=1e-5)


def test_tv_activation_option():
  model = models.create("resnet20", 10, tv_activation=True)
  params = _abstract_variables(model, _X32)["params"]
  assert set(params["stage1_block1"]["tv1"]) == {"rho"}
  assert set(params["stage3_block3"]["tv2"]) == {"rho"}


def _dense(linear_fn, shape):
  """The matrix of a linear map on arrays of ``shape`` (forward mode)."""
  n = int(np.prod(shape))
  return np.asarray(jax.jacfwd(lambda z: linear_fn(z.reshape(shape)).reshape(
      -1))(jnp.zeros(n)), np.float64)


def _as_net(variables):
  """A lone block's variables as those of a one-block StableResNet."""
  return {c: {"stage1_block1": v} for c, v in variables.items()}


def test_clean_form_step_is_tied_to_the_applied_quantized_kernel():
  x = 0.3 * jax.random.normal(jax.random.PRNGKey(4), (1, 6, 6, 4))
  bits = layers.QuantBits.make(4, None)
  block = lambda **kw: stable_resnet.StableBlock(
      4, clean_form=True, act=lambda v: v, act_signed=True,
      switches=ModelSwitches(quantize_activations=False), **kw)
  variables = block(max_h_norm_sq=None).init(_key(5), x, bits)
  k_q = stable_resnet.applied_kernels(_as_net(variables), 4,
                                      clean_form=True)["stage1_block1"]
  # the applied kernel is the standardised, 4-bit one (Eq. 12), alpha 3
  np.testing.assert_array_equal(k_q, quant.quantize_weight(
      variables["params"]["kernel"], 3.0, 4))
  k_dense = _dense(lambda v: operators.conv(v, k_q), x.shape)
  norm_sq = np.linalg.norm(k_dense, 2) ** 2
  raw_sq = np.linalg.norm(_dense(lambda v: operators.conv(
      v, variables["params"]["kernel"]), x.shape), 2) ** 2
  assert 0.1 * raw_sq < 2 < 0.1 * norm_sq  # "stable" raw, unstable applied
  step = lambda b: _dense(lambda z: b.apply(variables, z, bits) - z, x.shape)
  # fixed h = 0.1 (plain Eq. 15): I - h K_qᵀK_q has an eigenvalue below -1
  np.testing.assert_allclose(step(block(max_h_norm_sq=None, h=0.1)),
                             -0.1 * k_dense.T @ k_dense, rtol=1e-4,
                             atol=1e-4 * norm_sq * 0.1)
  # norm-tied (default): h_eff ||K_q||² ~ 1, the step is non-expansive
  update = -step(block())
  h_eff = np.linalg.eigvalsh((update + update.T) / 2).max() / norm_sq
  np.testing.assert_allclose(update, h_eff * k_dense.T @ k_dense, rtol=1e-4,
                             atol=1e-4)
  assert 0.9 < h_eff * norm_sq <= 1.0 / 0.9
  eig = np.linalg.eigvalsh(np.eye(len(update)) - update)
  assert eig.min() > -1.0 and eig.max() <= 1.0 + 1e-6


def test_practical_form_margin_includes_the_bn_scales():
  x = jnp.zeros((1, 5, 5, 4))
  bits = layers.QuantBits.make(4, None)
  block = stable_resnet.StableBlock(
      4, act=lambda v: v, h=0.05,
      switches=ModelSwitches(quantize_activations=False))
  variables = block.init(_key(6), x, bits)
  rng = np.random.default_rng(0)
  params, stats = variables["params"], variables["batch_stats"]
  for bn in ("bn1", "bn2"):
    params[bn]["scale"] = jnp.asarray(rng.uniform(0.2, 2.0, 4), jnp.float32)
    stats[bn]["var"] = jnp.asarray(rng.uniform(0.5, 3.0, 4), jnp.float32)
    stats[bn]["mean"] = jnp.asarray(rng.normal(size=4), jnp.float32)
  # a very negative bn2 bias keeps x - h BN2(...) > 0: the outer ReLU is the
  # identity and the step is affine, Jacobian I - h S2 K_qᵀ S1 K_q
  params["bn2"]["bias"] = jnp.full((4,), -1e4)
  jac = _dense(lambda z: block.apply(variables, z, bits) - block.apply(
      variables, jnp.zeros_like(z), bits), x.shape)
  eig = np.linalg.eigvals((np.eye(len(jac)) - jac) / 0.05)
  assert np.abs(eig.imag).max() < 1e-3 * np.abs(eig).max()
  net = _as_net(variables)
  m = stable_resnet.applied_kernels(net, 4)["stage1_block1"]
  m_sq = np.linalg.norm(_dense(lambda v: operators.conv(v, m), x.shape),
                        2) ** 2
  np.testing.assert_allclose(eig.real.max(), m_sq, rtol=1e-4)
  k_q = stable_resnet.applied_kernels(net, 4, clean_form=True)[
      "stage1_block1"]
  k_sq = np.linalg.norm(_dense(lambda v: operators.conv(v, k_q), x.shape),
                        2) ** 2
  assert abs(k_sq - m_sq) > 0.05 * m_sq  # the BN factors matter
  rows = stable_resnet.stability_report(net, 4, h=0.05, image_size=5,
                                        iters=300)
  (row,) = rows
  np.testing.assert_allclose(row["h_l_norm_sq"], 0.05 * m_sq, rtol=1e-3)
  raw = operators.stability_margin(params["kernel"], x.shape, 0.05, iters=300)
  np.testing.assert_allclose(row["raw_h_l_norm_sq"], raw.h_l_norm_sq,
                             rtol=1e-5)
  assert row["stable"] == (0.05 * m_sq < 2) and row["bn_scales_positive"]
  params["bn1"]["scale"] = params["bn1"]["scale"].at[0].set(-0.5)
  (row,) = stable_resnet.stability_report(net, 4, h=1e-6, image_size=5,
                                          iters=20)
  assert not row["bn_scales_positive"] and not row["stable"]


def test_block_input_shapes_follow_the_pooling():
  shapes = {name: stable_resnet.block_input_shape(name, 32, 16)[1]
            for name in ("stage1_block1", "stage1_block3", "stage2_block1",
                         "stage2_block2", "stage3_block1", "stage3_block9")}
  assert shapes == {"stage1_block1": 32, "stage1_block3": 32,
                    "stage2_block1": 32, "stage2_block2": 16,
                    "stage3_block1": 16, "stage3_block9": 8}
  with pytest.raises(ValueError, match="stage<s>_block<b>"):
    stable_resnet.block_input_shape("head", 32, 16)
