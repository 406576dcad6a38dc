"""Trained variables of a quantized ResNet / Stable ResNet -> an integer program.

Pure functions of the variables (the model code is not touched).  What is
integer and what is float (see ``docs/deploy.md``):

* input: the normalised float image is quantized per channel to signed
  ``INPUT_BITS``-bit codes (the first layer's input quantization, float);
* stem: its convolution is float in the trained model (never quantized), so
  here its weights get ``STEM_WEIGHT_BITS``-bit per-output-channel codes
  (the input step folded in); BN + ReLU + the first block's input quantizer
  fold into the requantization like every other layer;
* every block: int8 weight codes exactly as :func:`pdeq_jax.quant.to_integer`,
  unsigned (or signed) activation codes, int32 accumulators, BN / residual /
  Eq. 20 concatenation / 2x2 average pooling folded into integer
  requantization (:mod:`pdeq_jax.deploy.program`);
* head: global average pooling is an integer sum; the Dense classifier has
  float weights in the trained model and stays float (the logits'
  dequantization), evaluated in a fixed order of float32 operations.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pdeq_jax import layers
from pdeq_jax import operators
from pdeq_jax import quant
from pdeq_jax.deploy import program as prog
from pdeq_jax.models import mobilenetv2 as mobile_lib
from pdeq_jax.models import resnet as resnet_lib
from pdeq_jax.models import scan_blocks as scan_lib
from pdeq_jax.models import stable_resnet as stable_lib

INPUT_BITS = 22        # signed input codes, |q| < 2^21 (float32 has 24)
STEM_WEIGHT_BITS = 22  # signed per-channel stem weight codes
CLOSING_BITS = 22      # signed codes of MobileNetV2's closing-conv input
BN_EPS = 1e-5          # resnet.batch_norm's epsilon
# The stem accumulates in int64 (2^21 * 2^21 * 27 < 2^47).  Every
# requantization multiplies its (int32) accumulators by int64 multipliers in
# int64 ("wide", as gemmlowp's 32x32->64-bit products): with int32 products
# the multipliers kept only ~17 bits, a relative error of ~1e-5 that flipped
# codes near rounding boundaries, and every later layer inherits a flip.

Grid = Tuple[float, int, int]  # (step, lo, hi) of an activation code grid


class UnsupportedModelError(ValueError):
  """The model (or one of its layers) has no integer conversion."""


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def act_grid(aq: Dict[str, Any], bits: int, signed: bool) -> Grid:
  """Step and code range of an :class:`pdeq_jax.layers.ActQuant`."""
  alpha = float(layers.positive_alpha(jnp.asarray(aq["alpha"], jnp.float32)))
  levels = (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)
  return alpha / levels, (-levels if signed else 0), levels


def weight_codes(kernel, wq: Dict[str, Any], bits: int
                 ) -> Tuple[np.ndarray, float]:
  """The codes of ``quant.to_integer`` for a :class:`layers.WeightQuant`."""
  alpha = layers.positive_alpha(jnp.asarray(wq["alpha"], jnp.float32))
  codes, scale = quant.to_integer(quant.standardize(jnp.asarray(kernel)),
                                  alpha, bits, signed=True)
  return np.asarray(codes).astype(np.int8), float(scale)


def fold_bn(params: Dict[str, Any], stats: Dict[str, Any]
            ) -> Tuple[np.ndarray, np.ndarray]:
  """Eval-mode BatchNorm as ``g * v + d`` (float64, per channel)."""
  g = _np(params["scale"]) / np.sqrt(_np(stats["var"]) + BN_EPS)
  return g, _np(params["bias"]) - g * _np(stats["mean"])


class _Builder:
  """Accumulates the program's weights, ops and tensor metadata."""

  def __init__(self):
    self.weights: Dict[str, np.ndarray] = {}
    self.weight_meta: Dict[str, Dict[str, Any]] = {}
    self.ops: List[Dict[str, Any]] = []
    self.ranges: Dict[str, Tuple[int, int]] = {}  # code tensors
    self.bounds: Dict[str, float] = {}            # max |value| of any tensor
    self.shapes: Dict[str, Tuple[int, int, int]] = {}  # H, W, C

  def add_weight(self, name, codes, scale, bits, qmax):
    self.weights[name] = codes
    self.weight_meta[name] = {"bits": int(bits), "qmax": int(qmax),
                              "scale": np.asarray(scale, np.float64).tolist()}

  def conv(self, name, x, weight, *, stride=1, padding=((1, 1), (1, 1)),
           transpose=False, wide=False, groups=1):
    """``x``: codes, or (stable MobileNetV2) an int32 accumulator."""
    w = self.weights[weight]
    if transpose:
      w = prog.transpose_kernel(w, groups)
    kh, kw, cin, cout = w.shape
    if transpose and stride != 1:
      raise UnsupportedModelError(f"{name}: a strided transposed conv")
    h, wd, c = self.shapes[x]
    if c != cin * groups:
      raise ValueError(f"{name}: input has {c} channels, kernel wants "
                       f"{cin * groups}")
    (p0, p1), (q0, q1) = padding
    self.shapes[name] = ((h + p0 + p1 - kh) // stride + 1,
                         (wd + q0 + q1 - kw) // stride + 1, cout)
    l1 = np.abs(w.astype(np.int64)).sum(axis=(0, 1, 2))
    self.bounds[name] = self.bounds[x] * float(l1.max())
    if x not in self.ranges:  # an accumulator as input: its bound
      self.ranges[x] = (-int(self.bounds[x]), int(self.bounds[x]))
    if not wide and self.bounds[name] > prog.INT32_MAX:
      raise UnsupportedModelError(f"{name}: the accumulator bound "
                                  f"{self.bounds[name]:.3g} exceeds int32")
    op = {"op": "conv", "output": name, "input": x, "weight": weight,
          "stride": stride, "padding": [list(p) for p in padding],
          "transpose": transpose, "wide": wide,
          "input_range": list(self.ranges[x])}
    if groups != 1:
      op["groups"] = groups
    self.ops.append(op)
    return name

  def _parts(self, parts, wide=False):
    bits = prog.WIDE_TERM_BITS if wide else prog.TERM_BITS
    coefs, bounds, biases = [], [], []
    for part in parts:
      for t, _, coef in part["terms"]:
        p = prog.pre_shift(self.bounds[t], bits)
        bounds.append(np.floor(self.bounds[t] / 2.0 ** p + 0.5))
        coefs.append(coef * 2.0 ** p)
      biases.append(part["bias"])
    return coefs, bounds, np.concatenate(biases)

  def _fixed(self, parts, shift, wide=False):
    bits = prog.WIDE_TERM_BITS if wide else prog.TERM_BITS
    out = []
    for part in parts:
      terms = []
      for t, ch, coef in part["terms"]:
        p = prog.pre_shift(self.bounds[t], bits)
        terms.append({"input": t, "channels": list(ch), "pre_shift": p,
                      "m": prog.fixed_point(coef * 2.0 ** p, shift, wide)})
      out.append({"terms": terms,
                  "bias": prog.fixed_point(part["bias"], shift, wide),
                  "relu": bool(part["relu"])})
    return out

  def requant(self, name, parts, grid: Grid, *, pool=False, wide=True):
    """``parts``: ``[{"terms": [(tensor, (c0, c1), coef)], "bias", "relu"}]``
    with coefficients in units of ``grid``'s step; ``wide``: int64."""
    step, lo, hi = grid
    coefs, bounds, bias = self._parts(parts, wide)
    # narrow terms only (no pre-shift): bounded by 2^53, exact in float64
    f64 = wide and all(prog.pre_shift(self.bounds[t], prog.WIDE_TERM_BITS)
                       == 0 and self.bounds[t] < 2 ** prog.TERM_BITS
                       for part in parts for t, _, _ in part["terms"])
    limit = prog.F64_EXACT if f64 else (prog.INT64_MAX if wide
                                        else prog.INT32_MAX)
    shift = prog.choose_shift(bounds, coefs, bias, multiplier=4 if pool else 1,
                              lo=lo, rounding=True,
                              pool_shift=2 if pool else 0, limit=limit)
    h, w, _ = self.shapes[parts[0]["terms"][0][0]]
    c = sum(len(p["bias"]) for p in parts)
    self.shapes[name] = (h // 2, w // 2, c) if pool else (h, w, c)
    self.ranges[name] = (lo, hi)
    self.bounds[name] = float(max(abs(lo), abs(hi)))
    self.ops.append({"op": "requant", "output": name,
                     "parts": self._fixed(parts, shift, wide),
                     "pool": bool(pool), "wide": wide, "f64": bool(f64),
                     "shift": shift, "range": [lo, hi], "step": step})
    return name

  def head(self, parts, dense: Dict[str, Any]):
    """Integer global sum of ``V`` (value units / 2^F), then float Dense."""
    coefs, bounds, bias = self._parts(parts, True)
    h, w, _ = self.shapes[parts[0]["terms"][0][0]]
    shift = prog.choose_shift(bounds, coefs, bias, multiplier=1, lo=0,
                              rounding=False, limit=prog.INT64_MAX)
    fixed = self._fixed(parts, shift, True)
    v_bound = sum(b_ * float(np.abs(t["m"]).max()) for b_, t in
                  zip(bounds, [t for p in fixed for t in p["terms"]]))
    v_bound += max(float(np.abs(p["bias"]).max()) for p in fixed)
    # per pixel rounded to 2^post of V's units, so that the sum fits int32
    post = next(p for p in range(0, 63)
                if h * w * (v_bound / 2.0 ** p + 1.0) <= prog.INT32_MAX)
    kernel = _np(dense["kernel"]) * 2.0 ** post / (2.0 ** shift * h * w)
    self.ops.append({"op": "head", "output": "logits",
                     "parts": fixed, "shift": shift, "post_shift": post,
                     "wide": True,
                     "pixels": h * w,
                     "weight": kernel.astype(np.float32),
                     "bias": np.asarray(dense["bias"], np.float32)})


def _term(name, coef, c0=0, c1=None):
  coef = np.asarray(coef, np.float64)
  return (name, (c0, c0 + coef.size if c1 is None else c1), coef)


def _stem(b: _Builder, variables, grid: Grid, mean, std) -> str:
  params, stats = variables["params"]["stem"], variables["batch_stats"]["stem"]
  kernel = _np(params["conv"]["kernel"])
  qx = 2 ** (INPUT_BITS - 1) - 1
  mean, std = _np(mean), _np(std)
  if mean.shape != (kernel.shape[2],) or std.shape != (kernel.shape[2],):
    raise ValueError(f"input mean/std must have {kernel.shape[2]} entries, got"
                     f" {mean.shape} and {std.shape}")
  x_max = np.maximum(np.abs(-mean / std), np.abs((1.0 - mean) / std))
  in_step = x_max / qx
  folded = kernel * in_step[None, None, :, None]
  qw = 2 ** (STEM_WEIGHT_BITS - 1) - 1
  w_scale = np.abs(folded).max(axis=(0, 1, 2)) / qw
  w_scale = np.where(w_scale > 0, w_scale, 1.0)
  codes = np.round(folded / w_scale).astype(np.int32)
  b.add_weight("stem", codes, w_scale, STEM_WEIGHT_BITS, qw)
  b.input = {"step": in_step.astype(np.float32),
             "inv_step": (1.0 / in_step).astype(np.float32), "qmax": qx,
             "bits": INPUT_BITS}
  b.ranges["input"] = (-qx, qx)
  b.bounds["input"] = float(qx)
  b.conv("stem_acc", "input", "stem", wide=True)
  g, d = fold_bn(params["bn"], stats["bn"])
  step = grid[0]
  return b.requant("stem_out", [{"terms": [_term("stem_acc",
                                                 w_scale * g / step)],
                                 "bias": d / step, "relu": True}], grid,
                   wide=True)


def _resnet_block(b, name, x, gx: Grid, p, s, bits, next_grid, strides):
  wb, ab = bits
  codes1, sw1 = weight_codes(p["conv1"]["kernel"], p["conv1"]["wq"], wb)
  codes2, sw2 = weight_codes(p["conv2"]["kernel"], p["conv2"]["wq"], wb)
  b.add_weight(f"{name}/conv1", codes1, sw1, wb, 2 ** (wb - 1) - 1)
  b.add_weight(f"{name}/conv2", codes2, sw2, wb, 2 ** (wb - 1) - 1)
  gy = act_grid(p["aq_mid"], ab, False)
  acc1 = b.conv(f"{name}/acc1", x, f"{name}/conv1", stride=strides)
  g1, d1 = fold_bn(p["bn1"], s["bn1"])
  y = b.requant(f"{name}/mid", [{"terms": [_term(acc1, gx[0] * sw1 * g1 /
                                                 gy[0])],
                                 "bias": d1 / gy[0], "relu": True}], gy)
  acc2 = b.conv(f"{name}/acc2", y, f"{name}/conv2")
  g2, d2 = fold_bn(p["bn2"], s["bn2"])
  unit = next_grid[0] if next_grid else 1.0
  terms = [_term(acc2, gy[0] * sw2 * g2 / unit)]
  bias = d2 / unit
  if "shortcut_conv" in p:
    codes_s, sws = weight_codes(p["shortcut_conv"]["kernel"],
                                p["shortcut_conv"]["wq"], wb)
    b.add_weight(f"{name}/shortcut", codes_s, sws, wb, 2 ** (wb - 1) - 1)
    accs = b.conv(f"{name}/acc_shortcut", x, f"{name}/shortcut",
                  stride=strides, padding=((0, 0), (0, 0)))
    gs, ds = fold_bn(p["shortcut_bn"], s["shortcut_bn"])
    terms.append(_term(accs, gx[0] * sws * gs / unit))
    bias = bias + ds / unit
  else:
    terms.append(_term(x, np.full(len(g2), gx[0] / unit)))
  parts = [{"terms": terms, "bias": bias, "relu": True}]
  if next_grid is None:
    return parts
  return b.requant(f"{name}/out", parts, next_grid)


def _stable_block(b, name, x, gx: Grid, p, s, bits, next_grid, *, n_out,
                  pool, h, clean, step_fn):
  wb, ab = bits
  codes, sw = weight_codes(p["kernel"], p["wq"], wb)
  b.add_weight(name, codes, sw, wb, 2 ** (wb - 1) - 1)
  n_in = codes.shape[2]
  gy = act_grid(p["aq_mid"], ab, False)
  acc1 = b.conv(f"{name}/acc_k", x, name)
  unit = next_grid[0] if next_grid else 1.0
  if clean:
    hh, ww, _ = b.shapes[x]
    h = float(step_fn(jnp.asarray(codes, jnp.float32) * sw, (1, hh, ww, n_in)))
    g1, d1 = np.ones(n_in), np.zeros(n_in)
    g2, d2 = np.ones(n_in), np.zeros(n_in)
  else:
    g1, d1 = fold_bn(p["bn1"], s["bn1"])
    g2, d2 = fold_bn(p["bn2"], s["bn2"])
  y = b.requant(f"{name}/mid", [{"terms": [_term(acc1, gx[0] * sw * g1 /
                                                 gy[0])],
                                 "bias": d1 / gy[0], "relu": True}], gy)
  acc2 = b.conv(f"{name}/acc_kt", y, name, transpose=True)
  new = {"terms": [_term(x, np.full(n_in, gx[0] / unit)),
                   _term(acc2, -h * gy[0] * sw * g2 / unit)],
         "bias": -h * d2 / unit, "relu": not clean}
  parts = [new]
  if n_out > n_in:
    parts.append({"terms": [_term(x, np.full(n_out - n_in, gx[0] / unit))],
                  "bias": np.zeros(n_out - n_in), "relu": False})
  if next_grid is None:
    return parts
  return b.requant(f"{name}/out", parts, next_grid, pool=pool)


def _qconv_codes(b, name, p, wb):
  """Codes of a QuantConv's kernel, added to the program as ``name``."""
  codes, scale = weight_codes(p["kernel"], p["wq"], wb)
  b.add_weight(name, codes, scale, wb, 2 ** (wb - 1) - 1)
  return scale


def _bn(p, s, key, n, clean=False):
  return (np.ones(n), np.zeros(n)) if clean else fold_bn(p[key], s[key])


def _inverted_residual(b, name, x, gx: Grid, p, s, bits, unit, *, strides):
  """Eq. 21: expand 1x1, depthwise 3x3, project 1x1 (+ x); the parts of
  the block output in units of ``unit``."""
  wb, ab = bits
  n_in = b.shapes[x][2]
  se = _qconv_codes(b, f"{name}/expand", p["conv_expand"], wb)
  sd = _qconv_codes(b, f"{name}/dw", p["conv_dw"], wb)
  sp = _qconv_codes(b, f"{name}/project", p["conv_project"], wb)
  hidden = b.weights[f"{name}/expand"].shape[3]
  one = ((0, 0), (0, 0))
  ge = act_grid(p["aq_expand"], ab, False)
  acc = b.conv(f"{name}/acc_expand", x, f"{name}/expand", padding=one)
  g, d = _bn(p, s, "bn1", hidden)
  y = b.requant(f"{name}/expand_out", [{"terms": [_term(acc, gx[0] * se * g /
                                                      ge[0])],
                                        "bias": d / ge[0], "relu": True}], ge)
  gd = act_grid(p["aq_dw"], ab, False)
  acc = b.conv(f"{name}/acc_dw", y, f"{name}/dw", stride=strides,
               groups=hidden)
  g, d = _bn(p, s, "bn2", hidden)
  y = b.requant(f"{name}/dw_out", [{"terms": [_term(acc, ge[0] * sd * g /
                                                    gd[0])],
                                    "bias": d / gd[0], "relu": True}], gd)
  acc = b.conv(f"{name}/acc_project", y, f"{name}/project", padding=one)
  n_out = b.weights[f"{name}/project"].shape[3]
  g, d = _bn(p, s, "bn3", n_out)
  terms = [_term(acc, gd[0] * sp * g / unit)]
  if strides == 1 and n_in == n_out:
    terms.append(_term(x, np.full(n_in, gx[0] / unit)))
  return [{"terms": terms, "bias": d / unit, "relu": False}]


def _stable_inverted_residual(b, name, x, gx: Grid, p, s, bits, unit, *,
                              n_out, h, clean):
  """Eq. 22 with ``K = K_dw K_1x1``: ``K x`` is the depthwise conv of the
  1x1 conv's int32 accumulator (no quantizer between them), ``Kᵀ y`` the
  1x1ᵀ of the depthwiseᵀ accumulator; K's codes serve both."""
  wb, ab = bits
  n_in = b.shapes[x][2]
  c1, s1 = weight_codes(p["kernel_1x1"], p["wq_1x1"], wb)
  cd, sd = weight_codes(p["kernel_dw"], p["wq_dw"], wb)
  b.add_weight(f"{name}/1x1", c1, s1, wb, 2 ** (wb - 1) - 1)
  b.add_weight(f"{name}/dw", cd, sd, wb, 2 ** (wb - 1) - 1)
  hidden = c1.shape[3]
  one = ((0, 0), (0, 0))
  acc = b.conv(f"{name}/acc_1x1", x, f"{name}/1x1", padding=one)
  acc = b.conv(f"{name}/acc_k", acc, f"{name}/dw", groups=hidden)
  gy = act_grid(p["aq_mid"], ab, False)
  g1, d1 = _bn(p, s, "bn1", hidden, clean)
  y = b.requant(f"{name}/mid", [{"terms": [_term(acc, gx[0] * s1 * sd * g1 /
                                                 gy[0])],
                                 "bias": d1 / gy[0], "relu": True}], gy)
  acc = b.conv(f"{name}/acc_dwt", y, f"{name}/dw", groups=hidden,
               transpose=True)
  acc = b.conv(f"{name}/acc_kt", acc, f"{name}/1x1", padding=one,
               transpose=True)
  g2, d2 = _bn(p, s, "bn2", n_in, clean)
  parts = [{"terms": [_term(x, np.full(n_in, gx[0] / unit)),
                      _term(acc, -h * gy[0] * s1 * sd * g2 / unit)],
            "bias": -h * d2 / unit, "relu": False}]
  if n_out > n_in:
    parts.append({"terms": [_term(x, np.full(n_out - n_in, gx[0] / unit))],
                  "bias": np.zeros(n_out - n_in), "relu": False})
  return parts


def _rescale(parts, k):
  return [{"terms": [(t, ch, c * k) for t, ch, c in part["terms"]],
           "bias": part["bias"] * k, "relu": part["relu"]} for part in parts]


def _value_bound(b, parts) -> float:
  """Worst-case ``|value|`` of ``parts`` (coefficients in value units)."""
  out = 0.0
  for part in parts:
    v = np.abs(part["bias"]).astype(np.float64)
    for t, _, c in part["terms"]:
      v = v + b.bounds[t] * np.abs(c)
    out = max(out, float(v.max()))
  return out


def _mobilenet(b, model, params, stats, bits, mean, std) -> None:
  """MobileNetV2 / stable MobileNetV2 (``b`` gets every op)."""
  blocks = []
  for s_i, (width, num, stride, t) in enumerate(model.stages):
    for k in range(num):
      first = k == 0
      blocks.append((f"stage{s_i + 1}_block{k + 1}", width, stride, t,
                     model.block_input_signed and not (s_i == 0 and first),
                     model.stable and (not first or model.stable_transitions),
                     first))
  for name, *_ in blocks:
    if name not in params:
      raise ValueError(f"variables have no {name!r}: not the variables of "
                       "this MobileNetV2")
  grid = lambda i: act_grid(params[blocks[i][0]]["aq_in"], bits[1],
                            blocks[i][4])
  x = _stem(b, {"params": params, "batch_stats": stats}, grid(0), mean, std)
  for i, (name, width, stride, t, _, stable, first) in enumerate(blocks):
    last = i + 1 == len(blocks)
    unit = 1.0 if last else grid(i + 1)[0]
    p, s = params[name], stats.get(name, {})
    if stable:
      if first and stride == 2 and not model.stable_transitions:
        raise UnsupportedModelError(f"{name}: stride without pooling")
      parts = _stable_inverted_residual(
          b, name, x, grid(i), p, s, bits, unit, n_out=width, h=model.h,
          clean=model.clean_form)
      pool = first and stride == 2
    else:
      parts = _inverted_residual(b, name, x, grid(i), p, s, bits, unit,
                                 strides=stride if first else 1)
      pool = False
    if last:
      if pool:
        raise UnsupportedModelError(f"{name}: a pooling last block")
      break
    x = b.requant(f"{name}/out", parts, grid(i + 1), pool=pool)
  # the closing 1x1 conv is float in the trained model, on the float output
  # of the last block: that output gets CLOSING_BITS-bit signed codes on a
  # step from its worst-case bound, the kernel per-channel STEM_WEIGHT_BITS
  # codes (as the stem), an int64 accumulator
  qc = 2 ** (CLOSING_BITS - 1) - 1
  step = _value_bound(b, parts) / qc
  x = b.requant("closing_in", _rescale(parts, 1.0 / step), (step, -qc, qc))
  kernel = _np(params["closing_conv"]["kernel"])
  qw = 2 ** (STEM_WEIGHT_BITS - 1) - 1
  w_scale = np.abs(kernel).max(axis=(0, 1, 2)) / qw
  w_scale = np.where(w_scale > 0, w_scale, 1.0)
  b.add_weight("closing", np.round(kernel / w_scale).astype(np.int32),
               w_scale, STEM_WEIGHT_BITS, qw)
  acc = b.conv("closing_acc", x, "closing", padding=((0, 0), (0, 0)),
               wide=True)
  g, d = fold_bn(params["closing_bn"], stats["closing_bn"])
  b.head([{"terms": [_term(acc, step * w_scale * g)], "bias": d,
           "relu": True}], params["head"]["dense"])


def _check_switches(model) -> None:
  sw = model.switches
  if not sw.quantize_weights:
    raise UnsupportedModelError(
        "the model has no weight quantizers (switches.quantize_weights=False):"
        " a float run has no integer codes to export")
  if not sw.quantize_activations:
    raise UnsupportedModelError(
        "the model has no activation quantizers "
        "(switches.quantize_activations=False): nothing to requantize to")
  if getattr(sw, "tv_activation", False):
    raise UnsupportedModelError(
        "TV-smoothed activations (switches.tv_activation=True) have no "
        "integer form here; allowed: plain ReLU")


def _check_bits(bits) -> Tuple[int, int]:
  out = []
  for field, value in zip(("weights", "activations"), bits):
    v = None if value is None else int(np.asarray(value))
    if v is None or not 2 <= v <= 8:
      raise UnsupportedModelError(
          f"bits.{field}={v}: integer export needs 2..8 bits (a clip-only or "
          "float run has no integer grid)")
    out.append(v)
  return tuple(out)


def convert(model: nn.Module, variables: Dict[str, Any], bits,
            input_mean, input_std, image_shape=(32, 32, 3)) -> Dict[str, Any]:
  """The integer program of a trained ResNet or StableResNet.

  Args:
    model: the Flax module (``pdeq_jax.models.create(...)``).
    variables: ``{'params': ..., 'batch_stats': ...}`` (eval mode).
    bits: ``(weight_bits, act_bits)`` the run ends with (2..8 each).
    input_mean, input_std: the per-channel normalisation of the inputs
      (fixes the first layer's input range).
    image_shape: ``(H, W, C)`` of the inputs.

  Raises:
    UnsupportedModelError: another architecture, TV activations, no weight
      or activation quantizers, non-ReLU σ, bits outside 2..8.
  """
  is_resnet = isinstance(model, resnet_lib.ResNet)
  is_stable = isinstance(model, stable_lib.StableResNet)
  is_mobile = isinstance(model, mobile_lib.MobileNetV2)
  if not (is_resnet or is_stable or is_mobile):
    raise UnsupportedModelError(
        f"no integer conversion for {type(model).__name__}; supported: ResNet,"
        " StableResNet, MobileNetV2 (PDEGCN: pdeq_jax.deploy.gcn.convert)")
  _check_switches(model)
  if (is_stable or is_mobile and model.stable) and (
      model.act is not nn.relu or model.act_signed):
    raise UnsupportedModelError(f"{type(model).__name__}: only act=relu "
                                "(unsigned) has an integer form here")
  wb, ab = _check_bits(bits)
  if is_mobile:
    b = _Builder()
    b.shapes["input"] = tuple(image_shape)
    _mobilenet(b, model, variables["params"],
               variables.get("batch_stats", {}), (wb, ab), input_mean,
               input_std)
    return _program(b, model, wb, ab, image_shape)
  if model.scan_blocks:
    variables = scan_lib.unstack_blocks(variables)
  params, stats = variables["params"], variables.get("batch_stats", {})
  b = _Builder()
  b.shapes["input"] = tuple(image_shape)
  blocks = []
  for s_i, (num, width) in enumerate(zip(model.stage_sizes, model.widths)):
    for k in range(num):
      blocks.append((f"stage{s_i + 1}_block{k + 1}", s_i, k, width))
  for name, *_ in blocks:
    if name not in params:
      raise ValueError(f"variables have no {name!r}: not the variables of "
                       f"this {type(model).__name__}")

  def in_grid(i):
    first = i == 0
    signed = is_stable and model.clean_form and not first
    return act_grid(params[blocks[i][0]]["aq_in"], ab, signed)

  x = _stem(b, variables, in_grid(0), input_mean, input_std)
  parts = None
  for i, (name, s_i, k, width) in enumerate(blocks):
    nxt = in_grid(i + 1) if i + 1 < len(blocks) else None
    p, s = params[name], stats.get(name, {})
    if is_resnet:
      out = _resnet_block(b, name, x, in_grid(i), p, s, (wb, ab), nxt,
                          2 if s_i > 0 and k == 0 else 1)
    else:
      step_fn = lambda k_q, shape: operators.norm_tied_step(
          lambda v: operators.conv(v, k_q), shape, model.h,
          model.max_h_norm_sq, iters=16) if model.max_h_norm_sq else model.h
      out = _stable_block(b, name, x, in_grid(i), p, s, (wb, ab), nxt,
                          n_out=width, pool=s_i > 0 and k == 0, h=model.h,
                          clean=model.clean_form, step_fn=step_fn)
    if nxt is None:
      parts = out
    else:
      x = out
  b.head(parts, params["head"]["dense"])
  return _program(b, model, wb, ab, image_shape)


def _program(b, model, wb, ab, image_shape):
  name = type(model).__name__
  if getattr(model, "stable", False):
    name = "Stable" + name
  return {"format": "pdeq_jax.deploy/1", "model": name,
          "bits": {"weights": wb, "activations": ab},
          "input": b.input, "weights": b.weights,
          "weight_meta": b.weight_meta, "ops": b.ops,
          "image_shape": list(image_shape)}
