"""Integer deployment (pdeq_jax.deploy): exactness against an independent
numpy int64 reference, BN folding, accumulator bounds, packing, ONNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax.data import images as image_data
from pdeq_jax.deploy import convert as convert_lib
from pdeq_jax.deploy import pack
from pdeq_jax.deploy import program as prog

MEAN = np.array([0.49, 0.48, 0.45])
STD = np.array([0.25, 0.24, 0.26])
BITS = layers.QuantBits.make(4, 4)


def _trained_like(name, seed=0, **options):
  """Random weights and BatchNorm statistics of one training-mode batch."""
  model = models.create(name, 10, **options)
  x = jnp.clip(jax.random.normal(jax.random.PRNGKey(seed + 1),
                                 (8, 32, 32, 3)), -1.9, 1.9)
  variables = model.init(jax.random.PRNGKey(seed), x)
  _, upd = model.apply(variables, x, BITS, train=True,
                       mutable=["batch_stats"])
  return model, {"params": variables["params"], **upd}


TINY_MOBILE = {"stages": ((8, 1, 1, 1), (12, 2, 2, 2)), "stem_features": 8,
               "closing_features": 24}
NETS = {
    "resnet8": {},
    "stable_resnet8": {},
    "stable_resnet8_clean": {"clean_form": True},
    # a stride-2 inverted residual, then one with the identity residual
    "mobilenetv2": TINY_MOBILE,
    # the symmetric separable step (K = K_dw K_1x1) after a standard block
    "stable_mobilenetv2": TINY_MOBILE,
    # every block symmetric: Eq. 20 growth 8 -> 12 and 2x2 pooling
    "stable_mobilenetv2_transitions": {**TINY_MOBILE,
                                       "stable_transitions": True},
}


SLOW_TO_REPEAT = ("mobilenetv2", "stable_mobilenetv2")


def _not_repeated(request):
  """Format tests run on one MobileNetV2 (the others add nothing new)."""
  if request.node.callspec.params["converted"] in SLOW_TO_REPEAT:
    pytest.skip("covered by stable_mobilenetv2_transitions")


@pytest.fixture(scope="module", params=sorted(NETS))
def converted(request):
  name = request.param.replace("_clean", "").replace("_transitions", "")
  model, variables = _trained_like(name, **NETS[request.param])
  program = convert_lib.convert(model, variables, (4, 4), MEAN, STD)
  return model, variables, program


# ---------------------------------------------------------------------------
# independent numpy int64 reference (own loops / einsum; not the JAX code)
# ---------------------------------------------------------------------------

def _round_half_even_div(v, shift):
  """Exact integer rounding of v / 2^shift, ties to even (int64)."""
  v = np.asarray(v, np.int64)
  if shift == 0:
    return v
  q, r = np.divmod(v, np.int64(2) ** shift)
  twice = 2 * r
  up = (twice > 2 ** shift) | ((twice == 2 ** shift) & (q % 2 == 1))
  return q + up


def _ref_conv(x, w, stride, padding, groups=1):
  """Grouped convolution: group ``k`` maps input channels ``k ci..`` to
  output channels ``k co/groups..``."""
  (p0, p1), (q0, q1) = padding
  xp = np.pad(x, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
  kh, kw, ci, co = w.shape
  go = co // groups
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, co), np.int64)
  for k in range(groups):
    for i in range(kh):
      for j in range(kw):
        patch = xp[:, i:i + stride * (ho - 1) + 1:stride,
                   j:j + stride * (wo - 1) + 1:stride, k * ci:(k + 1) * ci]
        out[..., k * go:(k + 1) * go] += np.einsum(
            "nhwc,co->nhwo", patch, w[i, j, :, k * go:(k + 1) * go])
  return out


def _ref_conv_adjoint(y, w, padding, groups=1):
  """Kᵀ y of the stride-1 conv K (scatter form: the definition of Kᵀ)."""
  (p0, p1), (q0, q1) = padding
  kh, kw, ci, co = w.shape
  go = co // groups
  n, ho, wo, _ = y.shape
  hp, wp = ho + kh - 1, wo + kw - 1
  out = np.zeros((n, hp, wp, ci * groups), np.int64)
  for k in range(groups):
    for i in range(kh):
      for j in range(kw):
        out[:, i:i + ho, j:j + wo, k * ci:(k + 1) * ci] += np.einsum(
            "nhwo,co->nhwc", y[..., k * go:(k + 1) * go],
            w[i, j, :, k * go:(k + 1) * go])
  return out[:, p0:hp - p1, q0:wp - q1]


def _ref_sum(op, env):
  limit = 2 ** 62 if op.get("wide") else prog.INT32_MAX
  parts = []
  for part in op["parts"]:
    v = np.asarray(part["bias"], np.int64)
    for term in part["terms"]:
      c0, c1 = term["channels"]
      t = _round_half_even_div(env[term["input"]][..., c0:c1],
                               term["pre_shift"])
      v = v + t * np.asarray(term["m"], np.int64)
      assert np.abs(v).max() <= limit, "overflow"
    if part["relu"]:
      v = np.maximum(v, 0)
    parts.append(v)
  return np.concatenate(parts, axis=-1)


def reference(program, x):
  spec = program["input"]
  x = np.asarray(x, np.float32)
  env = {"input": np.clip(np.round(x * spec["inv_step"].astype(np.float32)),
                          -spec["qmax"], spec["qmax"]).astype(np.int64)}
  for op in program["ops"]:
    if op["op"] == "conv":
      w = np.asarray(program["weights"][op["weight"]], np.int64)
      x_in = env[op["input"]]
      groups = op.get("groups", 1)
      if op["transpose"]:
        acc = _ref_conv_adjoint(x_in, w, op["padding"], groups)
      else:
        acc = _ref_conv(x_in, w, op["stride"], op["padding"], groups)
      assert np.abs(acc).max() <= (2 ** 62 if op["wide"] else prog.INT32_MAX)
      env[op["output"]] = acc
    elif op["op"] == "requant":
      v = _ref_sum(op, env)
      shift = op["shift"]
      if op["pool"]:
        n, h, w_, c = v.shape
        v = v.reshape(n, h // 2, 2, w_ // 2, 2, c).sum(axis=(2, 4))
        shift += 2
      assert np.abs(v).max() + 2 ** shift <= (
          2 ** 62 if op["wide"] else prog.INT32_MAX)
      env[op["output"]] = np.clip(_round_half_even_div(v, shift),
                                  *op["range"])
    else:
      v = _round_half_even_div(_ref_sum(op, env), op["post_shift"])
      pooled = v.sum(axis=(1, 2))
      assert np.abs(pooled).max() <= prog.INT32_MAX
      env["pooled"] = pooled
      f = pooled.astype(np.float32)
      weight = np.asarray(op["weight"], np.float32)
      acc = f[:, 0:1] * weight[0]
      for c in range(1, weight.shape[0]):
        acc = acc + f[:, c:c + 1] * weight[c]
      env["logits"] = acc + np.asarray(op["bias"], np.float32)
  return env


def _inputs(n=4, seed=3):
  return np.asarray(jnp.clip(jax.random.normal(jax.random.PRNGKey(seed),
                                               (n, 32, 32, 3)), -1.9, 1.9))


def test_bit_exact_against_numpy_reference(converted):
  _, _, program = converted
  x = _inputs()
  logits, env = prog.run(program, jnp.asarray(x), return_intermediates=True)
  ref = reference(program, x)
  assert set(ref) <= set(env) | {"logits"}
  for name, value in ref.items():
    got = logits if name == "logits" else env[name]
    np.testing.assert_array_equal(np.asarray(got), value, err_msg=name)
  # every accumulator is int32 and every activation fits its code range
  for op in program["ops"]:
    if op["op"] == "conv":
      assert env[op["output"]].dtype == (jnp.int64 if op["wide"]
                                         else jnp.int32)
    if op["op"] == "requant":
      lo, hi = op["range"]
      assert lo <= int(env[op["output"]].min()) <= int(
          env[op["output"]].max()) <= hi


def test_weight_codes_are_quant_to_integer(converted):
  from pdeq_jax import quant
  model, variables, program = converted
  name = "stage1_block1"
  if "MobileNetV2" in program["model"]:  # the last block: stable if any
    name = sorted(variables["params"])[-3]
  p = variables["params"][name]
  if "conv1" in p:
    kernel, wq, key = p["conv1"]["kernel"], p["conv1"]["wq"], f"{name}/conv1"
  elif "conv_dw" in p:
    kernel, wq, key = p["conv_dw"]["kernel"], p["conv_dw"]["wq"], \
        f"{name}/dw"
  elif "kernel_dw" in p:
    kernel, wq, key = p["kernel_dw"], p["wq_dw"], f"{name}/dw"
  else:
    kernel, wq, key = p["kernel"], p["wq"], name
  codes, scale = quant.to_integer(quant.standardize(kernel),
                                  jnp.maximum(wq["alpha"], 1e-4), 4,
                                  signed=True)
  np.testing.assert_array_equal(program["weights"][key], np.asarray(codes))
  assert program["weight_meta"][key]["scale"] == pytest.approx(float(scale))
  # a symmetric step's Kᵀ reads the same codes as K
  convs = [op for op in program["ops"] if op["op"] == "conv"
           and op["weight"] == key]
  assert len(convs) == (2 if "kernel" in p or "kernel_dw" in p else 1)


def test_bn_folding_within_one_code():
  """conv -> BN -> ReLU -> quantizer (float) vs the folded integer layer."""
  model, variables = _trained_like("resnet8", seed=5)
  program = convert_lib.convert(model, variables, (4, 4), MEAN, STD)
  p = variables["params"]["stage1_block1"]
  s = variables["batch_stats"]["stage1_block1"]
  stem_out = next(op for op in program["ops"] if op["output"] == "stem_out")
  mid = next(op for op in program["ops"]
             if op["output"] == "stage1_block1/mid")
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (4, 32, 32, 16)).astype(np.int32)
  kernel = layers.WeightQuant().apply({"params": p["conv1"]["wq"]},
                                      p["conv1"]["kernel"], 4)
  y = jax.lax.conv_general_dilated(
      jnp.asarray(codes * stem_out["step"], jnp.float32), kernel, (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  import flax.linen as nn
  y = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
      {"params": p["bn1"], "batch_stats": s["bn1"]}, y)
  alpha = jnp.maximum(p["aq_mid"]["alpha"], 1e-4)
  expected = np.asarray(jnp.round(jnp.clip(y / alpha, 0, 1) * 15))
  env = {"stage1_block1/acc1": jax.lax.conv_general_dilated(
      jnp.asarray(codes, jnp.int8), jnp.asarray(program["weights"][
          "stage1_block1/conv1"]), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.int32)}
  with jax.enable_x64(True):  # int64 requantization
    got = np.asarray(prog._requant(mid, env))  # pylint: disable=protected-access
  diff = np.abs(got - expected)
  assert diff.max() <= 1
  assert (diff > 0).mean() < 1e-3


def test_agrees_with_fake_quant_model(converted):
  model, variables, program = converted
  x = jnp.asarray(_inputs(16, seed=7))
  ref = model.apply(variables, x, BITS)
  got = prog.jit_run(program)(x)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(ref, -1))
  scale = float(jnp.max(jnp.abs(ref)))
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * scale


def test_accumulator_bound_at_least_observed(converted):
  _, _, program = converted
  _, env = prog.run(program, jnp.asarray(_inputs()),
                    return_intermediates=True)
  rows = prog.accumulator_stats(program)
  assert rows
  for row in rows:
    observed = int(np.abs(np.asarray(env[row["layer"]])).max())
    assert row["bound_codes"] >= row["bound_weights"] >= observed
    assert row["safe_bits"] == (
        64 if row["layer"] in ("stem_acc", "closing_acc") else
        row["safe_bits"]) in (16, 24, 32, 64)
  # 4-bit codes, fan-in 3x3x16: 15 * 7 * 144 fits 16 bits; 64 channels not
  first = next(r for r in rows if r["layer"].startswith("stage1"))
  if "ResNet" in program["model"]:
    assert first["bound_codes"] == 15 * 7 * 9 * 16
  else:  # the 1x1 expansion of the 8 stem channels
    assert first["bound_codes"] == 15 * 7 * 8
  assert first["safe_bits"] == 16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 14, 22, 24])
def test_pack_round_trip(bits):
  rng = np.random.default_rng(bits)
  q = 2 ** (bits - 1) - 1
  codes = rng.integers(-q, q + 1, (3, 3, 5, 7)).astype(
      np.int8 if bits <= 8 else np.int32)
  data = pack.pack_codes(codes, bits)
  assert len(data) == -(-codes.size * pack.container_bits(bits) // 8)
  np.testing.assert_array_equal(
      pack.unpack_codes(data, bits, codes.shape, codes.dtype), codes)
  with pytest.raises(ValueError, match="do not fit"):
    pack.pack_codes(np.array([q + 1]), bits)


def test_compact_checkpoint_round_trip(request, converted, tmp_path):
  _not_repeated(request)
  _, variables, program = converted
  size = pack.save(program, tmp_path / "model.pdeq")
  loaded = pack.load(tmp_path / "model.pdeq")
  x = jnp.asarray(_inputs(2))
  np.testing.assert_array_equal(prog.run(loaded, x), prog.run(program, x))
  for name, codes in program["weights"].items():
    np.testing.assert_array_equal(loaded["weights"][name], codes)
  # (tiny nets: the header weighs; ResNet-20 is reported in results/; the
  # tiny MobileNetV2s are dominated by their 22-bit closing convolution)
  if "ResNet" in program["model"]:
    assert size < pack.float_checkpoint_bytes(variables) / 2.5
  with pytest.raises(ValueError, match="not a pdeq_jax compact"):
    (tmp_path / "bad").write_bytes(b"nonsense")
    pack.load(tmp_path / "bad")


def test_wide_constants_have_int32_mantissas(request, converted):
  _not_repeated(request)
  _, _, program = converted
  count = 0
  for op in program["ops"]:
    for part in op.get("parts", []):
      for arr in [t["m"] for t in part["terms"]] + [part["bias"]]:
        assert op["wide"] and arr.dtype == np.int64
        for v in arr.tolist():  # |v| = mant 2^e with |mant| < 2^31
          mant = abs(v) >> ((abs(v) & -abs(v)).bit_length() - 1) if v else 0
          assert mant < 2 ** prog.MANTISSA_BITS
          count += 1
  assert count > 100
  # hand values: 2^40 + 1 keeps 31 significant bits (ties to even)
  assert prog.fixed_point(np.array([2.0 ** 40 + 2 ** 9 + 1.0, 3.0]), 0,
                          True).tolist() == [2 ** 40 + 2 ** 10, 3]
  assert prog.fixed_point(np.array([2.0 ** 31 - 0.5]), 0, True).tolist() == [
      2 ** 31]  # the mantissa's carry


@pytest.mark.parametrize("deflate", [True, False])
def test_compact_integer_encodings_round_trip(tmp_path, deflate):
  big = np.array([3 * 2 ** 40, -(2 ** 31 - 1) * 2 ** 20, 5, 0], np.int64)
  arrays = {"const": np.full((4,), 2 ** 50, np.int64),
            "i8": np.array([-128, 127, 0], np.int64),
            "i16": np.array([-3000, 7], np.int64),
            "i32": np.array([2 ** 31 - 1, -2 ** 31], np.int64),
            "mant": big, "mant_one_exp": np.array([3, -5], np.int64) << 33,
            "i64": np.array([2 ** 62 + 1, 1], np.int64),
            "i32_kept": np.array([1, 2], np.int32),
            "float": np.array([0.1, -2.5], np.float32)}
  program = {"ops": [], "weights": {}, "weight_meta": {}, "extra": arrays}
  pack.save(program, tmp_path / "c.pdeq", deflate=deflate)
  loaded = pack.load(tmp_path / "c.pdeq")["extra"]
  for k, v in arrays.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
    np.testing.assert_array_equal(loaded[k], v)


def test_unsupported_models_and_float_runs():
  model, variables = _trained_like("resnet8")
  with pytest.raises(convert_lib.UnsupportedModelError, match="2..8 bits"):
    convert_lib.convert(model, variables, (None, 4), MEAN, STD)
  fp = models.create("resnet8", 10, quantize_weights=False)
  with pytest.raises(convert_lib.UnsupportedModelError,
                     match="no weight quantizers"):
    convert_lib.convert(fp, variables, (4, 4), MEAN, STD)
  tv = models.create("resnet8", 10, tv_activation=True)
  with pytest.raises(convert_lib.UnsupportedModelError, match="TV-smoothed"):
    convert_lib.convert(tv, variables, (4, 4), MEAN, STD)
  other = models.create("resnet50", 10)
  with pytest.raises(convert_lib.UnsupportedModelError,
                     match="no integer conversion for BottleneckResNet"):
    convert_lib.convert(other, {}, (4, 4), MEAN, STD)


@pytest.fixture(scope="module")
def cifar_images(data_dir):
  data = image_data.load_image_dataset("cifar10_jpeg", str(data_dir),
                                       max_train=100, max_test=20)
  x = image_data.normalize(data.test_images[:8], data.mean, data.std)
  return x, data.mean, data.std


@pytest.mark.parametrize("name,options", [
    ("resnet8", {}), ("stable_resnet8", {}),
    ("stable_resnet8", {"clean_form": True}),
    ("mobilenetv2", TINY_MOBILE),
    ("stable_mobilenetv2", {**TINY_MOBILE, "stable_transitions": True})])
def test_onnxruntime_equals_jax_on_cifar_jpeg(name, options, cifar_images):
  from pdeq_jax.deploy import onnx_export
  x, mean, std = cifar_images
  model, variables = _trained_like(name, **options)
  program = convert_lib.convert(model, variables, (4, 4), mean, std)
  want = np.asarray(prog.jit_run(program)(jnp.asarray(x)))
  got = onnx_export.session(program).run(None, {"x": x})[0]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  ref = reference(program, x)["logits"]
  np.testing.assert_array_equal(ref, want)


def test_stablehlo_round_trip(request, converted, tmp_path):
  _not_repeated(request)
  from pdeq_jax.deploy import stablehlo
  _, _, program = converted
  stablehlo.save(program, tmp_path / "model.stablehlo")
  fn = stablehlo.load(tmp_path / "model.stablehlo")
  for n in (1, 3):  # symbolic batch size
    x = jnp.asarray(_inputs(n, seed=n))
    np.testing.assert_array_equal(np.asarray(fn(x)),
                                  np.asarray(prog.jit_run(program)(x)))


def _fake_run(path, precision, finished):
  from configs import cifar
  config = cifar.get_config(f"resnet8,cifar10_jpeg,{precision},cpu")
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  (path / "checkpoints").mkdir()
  (path / "checkpoints" / "1").mkdir()
  if finished:
    (path / "results.json").write_text("{}")
  return str(path)


def test_export_cli_errors(tmp_path):
  from train import export
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load_run(str(tmp_path / "missing"))
  with pytest.raises(export.ExportError, match="unfinished run"):
    export.load_run(_fake_run(tmp_path / "a", "4w4a", finished=False))
  with pytest.raises(export.ExportError, match="float run"):
    export.load_run(_fake_run(tmp_path / "b", "fp", finished=True))
  with pytest.raises(export.ExportError, match="--format='tflite'"):
    export.export(str(tmp_path / "b"), "tflite", str(tmp_path / "out"))
