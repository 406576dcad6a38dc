"""ResNet-50, DeepLabV3, torchvision weight import, segmentation metrics.

Parameter counts and shapes of the full-size models come from
``jax.eval_shape``; real forward passes use reduced variants (one block per
stage, a few channels) on 32x32 inputs.  The comparison against a PyTorch
ResNet (written here with ``torch.nn``) needs ``torch`` (CPU), which the
``test`` extra installs: it fails, rather than skips, without it.
"""
import dataclasses
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import segmentation
from pdeq_jax import torchvision_import as tvi
from pdeq_jax.models import deeplabv3
from pdeq_jax.models import resnet50
from pdeq_jax.models.switches import ModelSwitches

TINY = dict(stage_sizes=(1, 1, 1, 1), widths=(4, 4, 8, 8), stem_features=8)
TINY_DEEPLAB = dict(backbone_stage_sizes=(1, 1, 1, 1),
                    backbone_widths=(4, 4, 8, 8), stem_features=8,
                    aspp_features=8)
NO_QUANT = dict(switches=ModelSwitches(quantize_weights=False,
                                       quantize_activations=False))
_X64 = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)


def _key(seed=0):
  return jax.random.key(seed, impl="unsafe_rbg")


def _images(hw=32, n=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, hw, hw, 3))


def _count(params, skip=("alpha", "rho")):
  return sum(int(np.prod(leaf.shape)) for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(path[-1], "key", None) not in skip)


def _num_leaves_named(params, name):
  return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(path[-1], "key", None) == name)


def _abstract(model, x=_X64):
  return jax.eval_shape(model.init, _key(), x)


# --------------------------------------------------------------------------
# torchvision names and OIHW shapes, written from torchvision's layout.


def _bn_shapes(key, c):
  return {f"{key}.weight": (c,), f"{key}.bias": (c,),
          f"{key}.running_mean": (c,), f"{key}.running_var": (c,),
          f"{key}.num_batches_tracked": ()}


def torchvision_resnet_shapes(stage_sizes=(3, 4, 6, 3),
                              widths=(64, 128, 256, 512), stem=64,
                              num_classes=1000, dilate=(False, False, False),
                              prefix=""):
  shapes = {f"{prefix}conv1.weight": (stem, 3, 7, 7),
            **_bn_shapes(f"{prefix}bn1", stem)}
  inplanes = stem
  for s, (n, planes) in enumerate(zip(stage_sizes, widths)):
    stride = 1 if s == 0 or dilate[s - 1] else 2
    for i in range(n):
      k = f"{prefix}layer{s + 1}.{i}"
      shapes[f"{k}.conv1.weight"] = (planes, inplanes, 1, 1)
      shapes[f"{k}.conv2.weight"] = (planes, planes, 3, 3)
      shapes[f"{k}.conv3.weight"] = (4 * planes, planes, 1, 1)
      for j, c in ((1, planes), (2, planes), (3, 4 * planes)):
        shapes.update(_bn_shapes(f"{k}.bn{j}", c))
      if i == 0 and (stride != 1 or inplanes != 4 * planes):
        shapes[f"{k}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
        shapes.update(_bn_shapes(f"{k}.downsample.1", 4 * planes))
      inplanes = 4 * planes
  if num_classes:
    shapes[f"{prefix}fc.weight"] = (num_classes, inplanes)
    shapes[f"{prefix}fc.bias"] = (num_classes,)
  return shapes


def torchvision_deeplab_head_shapes(in_channels, num_classes, features=256):
  f = features
  shapes = {"classifier.0.convs.0.0.weight": (f, in_channels, 1, 1),
            **_bn_shapes("classifier.0.convs.0.1", f)}
  for j in (1, 2, 3):
    shapes[f"classifier.0.convs.{j}.0.weight"] = (f, in_channels, 3, 3)
    shapes.update(_bn_shapes(f"classifier.0.convs.{j}.1", f))
  shapes["classifier.0.convs.4.1.weight"] = (f, in_channels, 1, 1)
  shapes.update(_bn_shapes("classifier.0.convs.4.2", f))
  shapes["classifier.0.project.0.weight"] = (f, 5 * f, 1, 1)
  shapes.update(_bn_shapes("classifier.0.project.1", f))
  shapes["classifier.1.weight"] = (f, f, 3, 3)
  shapes.update(_bn_shapes("classifier.2", f))
  shapes["classifier.4.weight"] = (num_classes, f, 1, 1)
  shapes["classifier.4.bias"] = (num_classes,)
  return shapes


def random_state_dict(shapes, seed=0, fill=None):
  rng = np.random.RandomState(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith("num_batches_tracked"):
      out[key] = np.array(7, np.int64)
    elif fill is not None:
      out[key] = np.full(shape, fill, np.float32)
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[key] = (0.3 * rng.randn(*shape)).astype(np.float32)
  return out


def _nchw_conv(x_nhwc, w_oihw, stride=1, dilation=1):
  """Reference: PyTorch-layout convolution (NCHW, OIHW, symmetric padding)."""
  k = w_oihw.shape[-1]
  pad = dilation * (k - 1) // 2
  y = jax.lax.conv_general_dilated(
      jnp.transpose(x_nhwc, (0, 3, 1, 2)), jnp.asarray(w_oihw), (stride,) * 2,
      ((pad, pad),) * 2, rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      precision=jax.lax.Precision.HIGHEST)
  return jnp.transpose(y, (0, 2, 3, 1))


# --------------------------------------------------------------------------
# Full-size models: parameter counts and shapes (tracing only).


def test_resnet50_has_torchvisions_parameter_count():
  variables = _abstract(models.create("resnet50", 1000))
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["params"]) == resnet50.TORCHVISION_RESNET50_PARAMS
  assert _count(variables["params"]) == 25_557_032
  # one α per quantizer: 3 activation + 3 weight per block + 4 projections
  assert _num_leaves_named(variables["params"], "alpha") == 16 * 6 + 4
  params = variables["params"]
  assert set(params["stem"]["conv"]) == {"kernel"}  # float first conv
  assert set(params["head"]["dense"]) == {"kernel", "bias"}  # float head
  assert params["stem"]["conv"]["kernel"].shape == (7, 7, 3, 64)
  assert params["stage2_block1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert params["stage4_block1"]["shortcut_conv"]["kernel"].shape == (
      1, 1, 1024, 2048)
  assert "shortcut_conv" not in params["stage1_block2"]


def test_resnet50_logits_and_hidden_shapes():
  model = models.create("resnet50", 1000)
  variables = _abstract(model)
  logits, hidden = jax.eval_shape(
      lambda v, x: model.apply(v, x, layers.QuantBits.make(4, 4),
                               return_hidden=True), variables, _X64)
  assert logits.shape == (2, 1000)
  assert len(hidden) == 16
  # stage ends: output stride 4, 8, 16, 32 ("v1.5": stride in the 3x3)
  assert [hidden[i].shape for i in (2, 6, 12, 15)] == [
      (2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]


@pytest.mark.parametrize("stride,dilate", [(8, (False, True, True)),
                                           (16, (False, False, True)),
                                           (32, (False, False, False))])
def test_dilation_gives_output_stride(stride, dilate):
  assert resnet50.dilation_for_output_stride(stride) == dilate
  assert resnet50.output_stride(dilate) == stride
  model = models.create("resnet50", 1000, replace_stride_with_dilation=dilate,
                        return_features=True)
  variables = _abstract(model)
  assert "head" not in variables["params"]  # no classifier with features
  features = jax.eval_shape(model.apply, variables, _X64)
  assert features["out"].shape == (2, 64 // stride, 64 // stride, 2048)
  assert features["low_level"].shape == (2, 16, 16, 256)
  # dilation does not change the weights
  assert _count(variables["params"]) == 25_557_032 - 2048 * 1000 - 1000


def test_bad_dilation_options():
  with pytest.raises(ValueError, match="one flag per stage"):
    _abstract(models.create("resnet50", 10,
                            replace_stride_with_dilation=(True, True)))
  with pytest.raises(ValueError, match="output stride"):
    resnet50.dilation_for_output_stride(4)
  with pytest.raises(ValueError, match="output_stride"):
    _abstract(models.create("deeplabv3_resnet50", 19, output_stride=32))
  with pytest.raises(ValueError, match="NHWC"):
    _abstract(models.create("resnet50", 10), jnp.zeros((64, 64, 3)))


def test_deeplabv3_parameter_count_and_output_shape():
  model = models.create("deeplabv3_resnet50", 21)
  variables = _abstract(model)
  assert set(variables["params"]) == {"backbone", "head"}
  assert _count(variables["params"]) == 39_638_869
  assert (deeplabv3.TORCHVISION_DEEPLABV3_RESNET50_PARAMS_21 == 39_638_869)
  x = jax.ShapeDtypeStruct((1, 72, 88, 3), jnp.float32)
  logits, hidden = jax.eval_shape(
      lambda v, x: model.apply(v, x, layers.QuantBits.make(5, 5),
                               return_hidden=True), variables, x)
  assert logits.shape == (1, 72, 88, 21)
  assert len(hidden) == 18
  assert hidden[15].shape == (1, 9, 11, 2048)  # output stride 8
  assert hidden[16].shape == (1, 9, 11, 256)  # ASPP
  head = variables["params"]["head"]
  assert set(head["classifier"]) == {"kernel", "bias"}  # float classifier
  assert "wq" in head["aspp"]["branch1_conv"]  # quantized ASPP
  # Cityscapes: 19 classes, output stride 16 (same weights)
  model16 = models.create("deeplabv3_resnet50", 19, output_stride=16)
  variables16 = _abstract(model16)
  assert _count(variables16["params"]) == 39_638_869 - 2 * (256 + 1)
  _, hidden = jax.eval_shape(
      lambda v, x: model16.apply(v, x, return_hidden=True), variables16, x)
  assert hidden[15].shape == (1, 5, 6, 2048)


def test_tv_switch_adds_one_gamma_per_relu():
  params = _abstract(models.create("resnet50", 1000,
                                   tv_activation=True))["params"]
  assert _count(params) == 25_557_032
  assert _num_leaves_named(params, "rho") == 16 * 3  # every block ReLU
  assert set(params["stage3_block4"]["tv2"]) == {"rho"}
  params = _abstract(models.create("resnet50", 1000, tv_activation=True,
                                   tv_stem=True))["params"]
  assert _num_leaves_named(params, "rho") == 16 * 3 + 1
  params = _abstract(models.create("deeplabv3_resnet50", 21,
                                   tv_activation=True))["params"]
  assert _count(params) == 39_638_869
  # + 4 ASPP conv branches, the projection and the 3x3 head conv
  assert _num_leaves_named(params, "rho") == 16 * 3 + 6


# --------------------------------------------------------------------------
# Reduced variants: real forward passes.


def test_conv_matches_pytorch_layout_reference():
  x = _images(9, n=1, seed=3)[..., :3]
  rng = np.random.RandomState(0)
  for k, stride, dilation in [(7, 2, 1), (3, 2, 1), (3, 1, 2), (3, 1, 4),
                              (1, 2, 1)]:
    w = rng.randn(5, 3, k, k).astype(np.float32)
    conv = resnet50.Conv(5, k, strides=stride, dilation=dilation,
                         quantize_weights=False)
    out = conv.apply({"params": {"kernel": jnp.asarray(
        w.transpose(2, 3, 1, 0))}}, x)
    np.testing.assert_allclose(out, _nchw_conv(x, w, stride, dilation),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_resnet():
  """A reduced ResNet with TV activations, its variables, a jitted forward."""
  model = resnet50.BottleneckResNet(
      10, switches=ModelSwitches(tv_activation=True), **TINY)
  x = _images(32)
  variables = jax.jit(model.init)(_key(1), x)
  forward = jax.jit(lambda v, x, bits: model.apply(v, x, bits,
                                                   return_hidden=True))
  return model, variables, x, forward


def test_tiny_resnet_forward_batch_stats_and_bits(tiny_resnet):
  model, variables, x, forward = tiny_resnet
  outs = []
  for w, a in [(4, 4), (8, 8), (None, None)]:
    logits, hidden = forward(variables, x, layers.QuantBits.make(w, a))
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    outs.append(np.asarray(logits))
  assert forward._cache_size() == 1  # bits are data
  assert not np.allclose(outs[0], outs[2])
  assert [h.shape for h in hidden] == [(2, 8, 8, 16), (2, 4, 4, 16),
                                       (2, 2, 2, 32), (2, 1, 1, 32)]
  logits, updates = jax.jit(lambda v, x: model.apply(
      v, x, layers.QuantBits.make(4, 4), train=True,
      mutable=["batch_stats"]))(variables, x)
  chex.assert_shape(logits, (2, 10))
  old = variables["batch_stats"]["stage1_block1"]["bn2"]["mean"]
  assert not np.allclose(old,
                         updates["batch_stats"]["stage1_block1"]["bn2"]["mean"])


def test_tiny_resnet_tv_forms_run(tiny_resnet):
  model, variables, x, forward = tiny_resnet
  assert _num_leaves_named(variables["params"], "rho") == 4 * 3
  sign = jax.jit(model.clone(switches=dataclasses.replace(
      model.switches, tv_sign_form=True)).apply)
  logits = sign(variables, x, layers.QuantBits.make(4, 4))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  # without rounding (which absorbs it at 4 bits) the sign form is a small
  # change of the output
  full = layers.QuantBits.make(None, None)  # clip only, no re-trace
  smooth = forward(variables, x, full)[0]
  gap = float(jnp.abs(smooth - sign(variables, x, full)).max())
  assert 0.0 < gap < 0.05 * float(jnp.abs(smooth).max())
  # γ is a parameter in use: changing one rho changes the output
  changed = jax.tree_util.tree_map(lambda a: a, variables)
  changed["params"]["stage2_block1"]["tv2"]["rho"] = jnp.asarray(0.5)
  assert not np.allclose(smooth, forward(changed, x, full)[0])


@pytest.fixture(scope="module")
def tiny_deeplab():
  """A reduced DeepLabV3 (TV, quantized) and its variables."""
  model = deeplabv3.DeepLabV3(
      5, switches=ModelSwitches(tv_activation=True, tv_gamma_init=0.05),
      **TINY_DEEPLAB)
  variables = jax.jit(model.init)(_key(3), _images(32))
  return model, variables


def test_tiny_deeplab_forward_upsampling_and_train(tiny_deeplab):
  model, variables = tiny_deeplab
  x = _images(32, seed=2)
  bits = layers.QuantBits.make(5, 5)
  logits, hidden = jax.jit(lambda v, x: model.apply(
      v, x, bits, return_hidden=True))(variables, x)
  chex.assert_shape(logits, (2, 32, 32, 5))
  chex.assert_tree_all_finite(logits)
  assert len(hidden) == 4 + 2
  # the float classifier on the head's last map, then bilinear upsampling
  # as F.interpolate(align_corners=False)
  head = variables["params"]["head"]["classifier"]
  coarse = hidden[-1] @ head["kernel"][0, 0] + head["bias"]
  assert coarse.shape == (2, 4, 4, 5)  # output stride 8
  np.testing.assert_allclose(logits, _torch_bilinear(coarse, 32, 32),
                             rtol=1e-5, atol=1e-5)
  logits, updates = jax.jit(lambda v, x, k: model.apply(
      v, x, bits, train=True, mutable=["batch_stats"],
      rngs={"dropout": k}))(variables, x, _key(4))
  chex.assert_shape(logits, (2, 32, 32, 5))
  assert "aspp" in updates["batch_stats"]["head"]
  # tv_gamma_init reaches every TV layer (encoder and head): γ = sigmoid(rho)
  rhos = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables["params"])[0] if path[-1].key == "rho"]
  assert len(rhos) == 4 * 3 + 6
  np.testing.assert_allclose(jax.nn.sigmoid(jnp.stack(rhos)), 0.05,
                             rtol=1e-5)


def _torch_bilinear(x, out_h, out_w):
  """``F.interpolate(mode='bilinear', align_corners=False)`` in numpy (NHWC)."""

  def weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - (src - i0))
    np.add.at(m, (np.arange(n_out), i1), src - i0)
    return m

  x = np.asarray(x, np.float64)
  x = np.einsum("oh,nhwc->nowc", weights(x.shape[1], out_h), x)
  return np.einsum("pw,nowc->nopc", weights(x.shape[2], out_w), x)


# --------------------------------------------------------------------------
# torchvision import.


def test_full_resnet50_state_dict_imports_strictly():
  shapes = torchvision_resnet_shapes()
  assert sum(int(np.prod(s)) for k, s in shapes.items()
             if not k.endswith(("running_mean", "running_var",
                                "num_batches_tracked"))) == 25_557_032
  state = random_state_dict(shapes, fill=0.5)
  model = models.create("resnet50", 1000, tv_activation=True)
  variables = _abstract(model)
  imported = tvi.import_torchvision_resnet50(state, variables)
  leaves = jax.tree_util.tree_flatten_with_path(imported)[0]
  for path, leaf in leaves:
    if path[-1].key in ("alpha", "rho"):  # untouched (still abstract here)
      assert isinstance(leaf, jax.ShapeDtypeStruct)
    else:
      assert isinstance(leaf, jax.Array), jax.tree_util.keystr(path)
  # ImageNet encoder weights into the DeepLabV3 encoder (fc ignored)
  deeplab = _abstract(models.create("deeplabv3_resnet50", 19))
  imported = tvi.import_torchvision_resnet50(state, deeplab)
  assert isinstance(imported["params"]["backbone"]["stage4_block3"]["conv3"][
      "kernel"], jax.Array)
  assert isinstance(imported["params"]["head"]["conv"]["kernel"],
                    jax.ShapeDtypeStruct)  # head excluded


@pytest.fixture(scope="module")
def tiny_import(tiny_resnet):
  """Tiny ResNet variables and a random torchvision-named state dict."""
  model, variables, x, forward = tiny_resnet
  shapes = torchvision_resnet_shapes(TINY["stage_sizes"], TINY["widths"],
                                     TINY["stem_features"], 10)
  return forward, variables, random_state_dict(shapes, seed=1), x


def test_every_array_lands_transposed(tiny_import):
  forward, variables, state, x = tiny_import
  imported = tvi.import_torchvision_resnet50(state, variables)
  p, s = imported["params"], imported["batch_stats"]
  # convolutions: same output as the PyTorch-layout convolution
  for key, ours, stride in [("conv1", p["stem"]["conv"], 2),
                            ("layer2.0.conv2", p["stage2_block1"]["conv2"], 2),
                            ("layer3.0.downsample.0",
                             p["stage3_block1"]["shortcut_conv"], 2),
                            ("layer4.0.conv3", p["stage4_block1"]["conv3"], 1)]:
    w = state[f"{key}.weight"]
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, w.shape[1]))
    conv = resnet50.Conv(w.shape[0], w.shape[-1], strides=stride,
                         quantize_weights=False)
    np.testing.assert_allclose(conv.apply({"params": {"kernel": ours[
        "kernel"]}}, z), _nchw_conv(z, w, stride), rtol=1e-4, atol=1e-4)
  # every conv kernel, BN vector and the Dense layer
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    parts = key.split(".")
    if parts[0] == "fc":
      ours = p["head"]["dense"]
      if parts[1] == "weight":
        z = np.random.RandomState(1).randn(3, value.shape[1]).astype(
            np.float32)
        np.testing.assert_allclose(z @ ours["kernel"], z @ value.T,
                                   rtol=1e-5, atol=1e-5)
      else:
        np.testing.assert_array_equal(ours["bias"], value)
      continue
    if parts[0] in ("conv1", "bn1"):
      block, layer = p["stem"], {"conv1": "conv", "bn1": "bn"}[parts[0]]
      stats = s["stem"]
    else:
      name = f"stage{parts[0][5:]}_block{int(parts[1]) + 1}"
      block, stats = p[name], s[name]
      layer = parts[2] if parts[2] != "downsample" else (
          "shortcut_conv" if parts[3] == "0" else "shortcut_bn")
    field = parts[-1]
    if field == "weight" and value.ndim == 4:
      np.testing.assert_array_equal(block[layer]["kernel"],
                                    value.transpose(2, 3, 1, 0))
    elif field in ("running_mean", "running_var"):
      np.testing.assert_array_equal(
          stats[layer]["mean" if field == "running_mean" else "var"], value)
    else:
      np.testing.assert_array_equal(
          block[layer]["scale" if field == "weight" else "bias"], value)
  # α untouched, input not modified
  for name in ("aq_in", "tv3"):
    chex.assert_trees_all_equal(
        imported["params"]["stage1_block1"][name],
        variables["params"]["stage1_block1"][name])
  assert not np.array_equal(variables["params"]["stem"]["conv"]["kernel"],
                            p["stem"]["conv"]["kernel"])
  # export is the inverse
  exported = tvi.export_torchvision_resnet50(imported)
  expected = {k: v for k, v in state.items()
              if not k.endswith("num_batches_tracked")}
  assert set(exported) == set(expected)
  for key in expected:
    np.testing.assert_array_equal(exported[key], expected[key])
  # the imported model runs
  logits, _ = forward(imported, x, layers.QuantBits.make(4, 4))
  chex.assert_tree_all_finite(logits)


def test_import_errors_list_missing_unexpected_and_mismatched(tiny_import):
  _, variables, state, _ = tiny_import
  broken = dict(state)
  del broken["layer2.0.bn1.running_var"]
  broken["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  broken["layer1.0.conv2.weight"] = np.zeros((4, 4, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    tvi.import_torchvision_resnet50(broken, variables)
  message = str(info.value)
  assert "missing keys (1): layer2.0.bn1.running_var" in message
  assert "unexpected keys (1): layer5.0.conv1.weight" in message
  assert "shape mismatches (1): layer1.0.conv2.weight" in message
  # an ImageNet classifier (1000 classes) into a 10-class model ...
  imagenet_fc = dict(state, **{"fc.weight": np.zeros((1000, 32), np.float32),
                               "fc.bias": np.zeros((1000,), np.float32)})
  with pytest.raises(ValueError, match="fc.weight"):
    tvi.import_torchvision_resnet50(imagenet_fc, variables)
  # ... is fine when the classifier is skipped (fine-tuning)
  imported = tvi.import_torchvision_resnet50(imagenet_fc, variables,
                                             skip_fc=True)
  chex.assert_trees_all_equal(imported["params"]["head"],
                              variables["params"]["head"])
  with pytest.raises(ValueError, match="missing keys"):
    tvi.import_torchvision_deeplabv3(state, _abstract(
        deeplabv3.DeepLabV3(5, **TINY_DEEPLAB), _images(32)))
  with pytest.raises(ValueError, match="DeepLabV3"):
    tvi.import_torchvision_deeplabv3(state, variables)


def test_deeplab_import_backbone_and_head(tiny_deeplab):
  _, variables = tiny_deeplab
  shapes = torchvision_resnet_shapes(TINY["stage_sizes"], TINY["widths"],
                                     TINY["stem_features"], 0,
                                     dilate=(False, True, True),
                                     prefix="backbone.")
  shapes.update(torchvision_deeplab_head_shapes(32, 5, features=8))
  shapes["aux_classifier.0.weight"] = (8, 32, 3, 3)
  state = random_state_dict(shapes, seed=2)
  imported = tvi.import_torchvision_deeplabv3(state, variables)
  head = imported["params"]["head"]
  np.testing.assert_array_equal(
      head["aspp"]["pool_conv"]["kernel"],
      state["classifier.0.convs.4.1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      imported["batch_stats"]["head"]["aspp"]["branch3_bn"]["var"],
      state["classifier.0.convs.3.1.running_var"])
  np.testing.assert_array_equal(head["classifier"]["bias"],
                                state["classifier.4.bias"])
  exported = tvi.export_torchvision_deeplabv3(imported)
  assert set(exported) == {k for k in state if not k.endswith(
      "num_batches_tracked") and not k.startswith("aux_")}
  with pytest.raises(ValueError, match="unexpected keys.*aux_classifier"):
    tvi.import_torchvision_deeplabv3(state, variables, ignore_aux=False)
  # the ResNet importer takes the encoder part (backbone. prefix) only
  encoder_only = tvi.import_torchvision_resnet50(state, variables)
  chex.assert_trees_all_equal(encoder_only["params"]["backbone"],
                              imported["params"]["backbone"])
  chex.assert_trees_all_equal(encoder_only["params"]["head"],
                              variables["params"]["head"])


def test_load_state_dict_files(tmp_path, monkeypatch):
  state = {"conv1.weight": np.ones((2, 3, 7, 7), np.float32),
           "bn1.num_batches_tracked": np.array(3)}
  np.savez(tmp_path / "sd.npz", **state)
  loaded = tvi.load_torch_state_dict(str(tmp_path / "sd.npz"))
  assert set(loaded) == {"conv1.weight"}
  np.testing.assert_array_equal(loaded["conv1.weight"], state["conv1.weight"])
  monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
  with pytest.raises(ImportError, match="needs the 'torch' package"):
    tvi.load_torch_state_dict(str(tmp_path / "weights.pth"))


def _torch_resnet(torch, stage_sizes, widths, stem, num_classes, dilate):
  """A PyTorch Bottleneck ResNet laid out as torchvision's (eval mode)."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, inplanes, planes, stride, dilation, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation,
                             dilation=dilation, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(4 * planes)
      self.downsample = downsample

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.downsample is None else
                             self.downsample(x)))

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(stem)
      inplanes, dilation = stem, 1
      for s, (n, planes) in enumerate(zip(stage_sizes, widths)):
        stride, previous = (1 if s == 0 else 2), dilation
        if s > 0 and dilate[s - 1]:
          dilation, stride = dilation * stride, 1
        blocks = []
        for i in range(n):
          downsample = None
          if i == 0 and (stride != 1 or inplanes != 4 * planes):
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                nn.BatchNorm2d(4 * planes))
          blocks.append(Block(inplanes, planes, stride if i == 0 else 1,
                              previous if i == 0 else dilation, downsample))
          inplanes = 4 * planes
        setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      self.fc = nn.Linear(inplanes, num_classes)
      self.num_stages = len(stage_sizes)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      x = nn.functional.max_pool2d(x, 3, 2, 1)
      for s in range(self.num_stages):
        x = getattr(self, f"layer{s + 1}")(x)
      return self.fc(x.mean(dim=(2, 3)))

  net = Net()
  with torch.no_grad():  # non-trivial BatchNorm statistics
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.mark.parametrize("dilate", [(False, False, False),
                                    (False, True, True)])
def test_matches_a_pytorch_resnet_after_import(dilate):
  import torch  # pylint: disable=import-outside-toplevel  (the test extra)
  torch.manual_seed(0)
  net = _torch_resnet(torch, TINY["stage_sizes"], TINY["widths"],
                      TINY["stem_features"], 10, dilate)
  x = np.random.RandomState(0).randn(2, 3, 30, 34).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  model = resnet50.BottleneckResNet(10, replace_stride_with_dilation=dilate,
                                    **TINY, **NO_QUANT)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  variables = jax.jit(model.init)(_key(8), xj)
  variables = tvi.import_torchvision_resnet50(net.state_dict(), variables)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, xj), expected,
                             rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Segmentation metrics and loss.


def _reference_metrics(pred, label, num_classes, ignore):
  conf = np.zeros((num_classes, num_classes), np.int64)
  for p, l in zip(pred.ravel(), label.ravel()):
    if l != ignore:
      conf[l, p] += 1
  ious = []
  for c in range(num_classes):
    tp = conf[c, c]
    union = conf[c, :].sum() + conf[:, c].sum() - tp
    ious.append(tp / union if union else np.nan)
  present = [v for v in ious if not np.isnan(v)]
  total = conf.sum()
  accuracy = np.trace(conf) / total if total else 0.0
  return conf, accuracy, (np.mean(present) if present else 0.0), ious


_confusion = jax.jit(segmentation.confusion_matrix,
                     static_argnames="num_classes")


@given(st.integers(2, 5), st.integers(1, 5), st.integers(1, 5),
       st.floats(0.0, 0.6), st.integers(0, 2**31 - 1))
def test_confusion_matrix_iou_and_accuracy_match_numpy(num_classes, used_pred,
                                                       used_label,
                                                       ignore_fraction, seed):
  # fixed shape (one compilation per num_classes); only some classes used,
  # so some are absent from labels and/or predictions
  rng = np.random.RandomState(seed)
  pred = rng.randint(0, min(used_pred, num_classes), (2, 5, 7))
  label = rng.randint(0, min(used_label, num_classes), (2, 5, 7))
  label[rng.rand(2, 5, 7) < ignore_fraction] = 255
  conf = _confusion(jnp.asarray(pred), jnp.asarray(label),
                    num_classes=num_classes)
  ref_conf, ref_acc, ref_miou, ref_ious = _reference_metrics(
      pred, label, num_classes, 255)
  np.testing.assert_array_equal(conf, ref_conf)
  np.testing.assert_allclose(segmentation.pixel_accuracy(conf), ref_acc,
                             rtol=1e-6)
  miou, ious = segmentation.mean_iou(conf)
  np.testing.assert_allclose(miou, ref_miou, rtol=1e-6)
  np.testing.assert_allclose(ious, np.asarray(ref_ious, np.float32),
                             rtol=1e-6)


def test_metrics_are_jittable_and_handle_edge_cases():
  fn = jax.jit(lambda p, l: segmentation.mean_iou(
      segmentation.confusion_matrix(p, l, 3)))
  pred = jnp.array([[0, 1, 2, 2]])
  label = jnp.array([[0, 1, 255, 1]])
  miou, ious = fn(pred, label)
  # class 2: predicted once on an ignored pixel (not counted) and once on a 1
  np.testing.assert_allclose(ious, [1.0, 0.5, 0.0])
  np.testing.assert_allclose(miou, 0.5)
  conf = segmentation.confusion_matrix(pred, jnp.full((1, 4), 255), 3)
  assert int(conf.sum()) == 0
  assert float(segmentation.pixel_accuracy(conf)) == 0.0
  miou, ious = segmentation.mean_iou(conf)
  assert float(miou) == 0.0 and bool(jnp.all(jnp.isnan(ious)))
  with pytest.raises(ValueError, match="same shape"):
    segmentation.confusion_matrix(pred, label[:, :3], 3)


def test_cross_entropy_with_ignore():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 4, 3).astype(np.float32)
  labels = rng.randint(0, 3, (2, 5, 4))
  labels[0, :2] = 255
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels != 255
  expected = -np.mean(np.take_along_axis(
      log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep])
  loss_fn = jax.jit(segmentation.softmax_cross_entropy_with_ignore)
  np.testing.assert_allclose(loss_fn(logits, labels), expected, rtol=1e-5)
  grads = jax.grad(segmentation.softmax_cross_entropy_with_ignore)(
      jnp.asarray(logits), jnp.asarray(labels))
  assert float(jnp.abs(grads[0, :2]).max()) == 0.0  # ignored pixels
  assert float(jnp.abs(grads[1]).max()) > 0.0
  all_ignored = jnp.full((2, 5, 4), 255)
  assert float(loss_fn(logits, all_ignored)) == 0.0
  grads = jax.grad(segmentation.softmax_cross_entropy_with_ignore)(
      jnp.asarray(logits), all_ignored)
  assert float(jnp.abs(grads).max()) == 0.0
  with pytest.raises(ValueError, match="logits.shape"):
    segmentation.softmax_cross_entropy_with_ignore(logits, labels[..., :2])
