"""The integer inference program: its data layout, requantization constants
and the JAX executor.

A program (a plain dict, see :func:`pdeq_jax.deploy.convert.convert`) is

* ``input``: the first layer's input quantization (float -> signed integer
  codes ``q = clip(round(x * inv_step_c), -qmax, qmax)``, one step per channel);
* ``weights``: name -> integer weight codes (HWIO), each stored once (a
  symmetric step's ``K`` and ``Kᵀ`` read the same array);
* ``ops``: ``conv`` (int32 accumulation), ``requant`` (int32 accumulators ->
  the next layer's activation codes) and, last, ``head`` (integer global
  sum, then the float classifier: the logits' dequantization).

Requantization (FQ-Conv style, BN folded): for every output channel ``o``

    V = sum_k r(t_k, p_k) * m_k[o] + b[o]  (int64; t_k: int32 accumulators
                                            or codes, int64 in the stem)
    V = max(V, 0)                          (if the part has a ReLU)
    V = sum of each 2x2 window             (if ``pool``; then S = F + 2)
    code = clip(r(V, S), lo, hi)

with ``r(v, s) = v / 2^s`` rounded half to even (``r(v, 0) = v``; ``p_k > 0``
only for the stem's wide accumulator, keeping ``TERM_BITS`` of it)

with ``m_k = round(c_k 2^F)`` and ``b = round(d 2^F)`` the float
coefficients of the folded conv/BN/residual in units of the output grid's
step; in int64 (wide) ops both are rounded to ``MANTISSA_BITS`` = 31
significant bits (``m = mant 2^e`` with an int32 ``mant``), a relative error
below 2^-31, so that the compact checkpoint stores them as int32 + a small
shift without changing a single integer the program computes.  Rounding: to nearest, ties to even (as ``jnp.round`` in the float
model: exact ties do occur, e.g. a 2x2 average of codes).  ``F``
is the largest shift whose worst-case ``|V|`` (from the accumulator bounds)
fits the op's integers (int64 for every op the converter writes; the
executor also runs int32 ops), so no intermediate can overflow.  Ops whose
terms are all narrow (codes and int32 accumulators, no pre-shift) are
bounded by ``F64_EXACT`` = 2^53 instead (``"f64": True``): every
intermediate is then an integer that float64 holds exactly, so a runtime
may evaluate them in float64 (the ONNX graph does, with ``Round``, ties to
even) and still get the int64 result bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1
F64_EXACT = 2 ** 53  # |integers| below this are exact in float64
MAX_SHIFT = 30
MIN_SHIFT = 8  # fewer fraction bits than this: the folded layer is refused
TERM_BITS = 16  # a wider int32 term is rounded to this many bits first
WIDE_TERM_BITS = 30  # the same in a wide (int64) op
MANTISSA_BITS = 31  # significant bits of a wide op's constants (int32 mant)


def pre_shift(bound: float, term_bits: int = TERM_BITS) -> int:
  """``p`` with ``bound / 2^p < 2^term_bits``."""
  return max(0, int(np.ceil(np.log2(float(bound) + 1.0))) - term_bits)


def round_shift(v, shift: int):
  """``v / 2^shift`` rounded to the nearest integer, ties to even.

  ``q = floor((v + 2^(shift-1)) / 2^shift)``, minus 1 where that was an
  exact tie and ``q`` is odd: the rule of ``jnp.round`` (the float model's).
  """
  if shift == 0:
    return v
  a = v + (1 << (shift - 1))
  q = jnp.right_shift(a, shift)
  tie = jnp.bitwise_and(a, (1 << shift) - 1) == 0
  return q - jnp.where(tie, jnp.bitwise_and(q, 1), 0)


def choose_shift(term_bounds: Sequence[float], coefs: Sequence[np.ndarray],
                 bias: np.ndarray, *, multiplier: int, lo: int,
                 rounding: bool, pool_shift: int = 0,
                 limit: int = INT32_MAX) -> int:
  """The largest ``F`` with ``multiplier * max|V| + 2^(S-1) + |lo| 2^S`` in int32.

  ``term_bounds[k]``: the largest ``|t_k|``; ``coefs[k]``: its per-channel
  float coefficient; ``multiplier``: how many ``V`` are summed before the
  shift (4 for 2x2 pooling, ``H W`` for the head's global sum).
  """
  wide = limit != INT32_MAX
  for shift in range(MAX_SHIFT if not wide else 60, -1, -1):
    fixed = lambda v: np.abs(_rounded(v, shift, wide).astype(np.float64))
    bound = float(np.max(fixed(bias))) if bias.size else 0.0
    for t, c in zip(term_bounds, coefs):
      bound += float(t) * float(np.max(fixed(c)))
    bound *= multiplier
    if rounding:
      s = shift + pool_shift
      bound += 2.0 ** (s - 1)
    if bound <= limit * (1 - 1e-9):
      if shift < MIN_SHIFT:
        break
      return shift
  raise ValueError(f"requantization cannot keep {MIN_SHIFT} fraction bits in "
                   f"int32 (accumulator bounds {list(term_bounds)}): the layer "
                   "is too wide for this integer scheme")


def _rounded(values, shift: int, wide: bool) -> np.ndarray:
  """``round(values 2^shift)`` (float64); if ``wide``, to ``MANTISSA_BITS``
  significant bits: ``mant 2^e`` with ``|mant| < 2^31`` (ties to even)."""
  v = np.asarray(values, np.float64) * 2.0 ** shift
  out = np.round(v)
  if not wide:
    return out
  # e = (bit length of |round(v)|) - MANTISSA_BITS, at least 0
  mag = np.abs(out)
  e = np.zeros(v.shape, np.int64)
  big = mag >= 2.0 ** MANTISSA_BITS
  e[big] = np.floor(np.log2(mag[big])).astype(np.int64) + 1 - MANTISSA_BITS
  mant = np.round(np.ldexp(v, -e))
  carry = np.abs(mant) >= 2.0 ** MANTISSA_BITS  # rounded up to 2^31
  mant = np.where(carry, mant / 2.0, mant)
  return np.ldexp(mant, e + carry)


def fixed_point(values: np.ndarray, shift: int, wide: bool = False
                ) -> np.ndarray:
  """``round(values * 2^shift)`` as int32; if ``wide``: int64, rounded to
  ``MANTISSA_BITS`` significant bits (an int32 mantissa times ``2^e``)."""
  out = _rounded(values, shift, wide)
  if np.any(np.abs(out) > (INT64_MAX if wide else INT32_MAX)):
    raise ValueError("a requantization constant does not fit its integers")
  return out.astype(np.int64 if wide else np.int32)


def code_dtype(lo: int, hi: int):
  """The narrowest signed integer type that holds codes ``lo..hi``."""
  if -128 <= lo and hi <= 127:
    return np.int8
  return np.int16 if -2 ** 15 <= lo and hi < 2 ** 15 else np.int32


def conv_padding(op: Dict[str, Any], w: np.ndarray):
  """The explicit padding of a conv op (its transpose: the adjoint's)."""
  if not op["transpose"]:
    return tuple(tuple(p) for p in op["padding"])
  kh, kw = w.shape[:2]
  (ph0, ph1), (pw0, pw1) = op["padding"]
  return ((kh - 1 - ph0, kh - 1 - ph1), (kw - 1 - pw0, kw - 1 - pw1))


def transpose_kernel(w, groups: int = 1):
  """HWIO kernel of ``Kᵀ`` (stride 1) from K's: flipped, in/out swapped
  (within each of ``groups`` groups: a depthwise kernel is only flipped)."""
  kh, kw, ci, co = w.shape
  w = w[::-1, ::-1]
  if groups == 1:
    return w.transpose(0, 1, 3, 2)
  w = w.reshape(kh, kw, ci, groups, co // groups).transpose(0, 1, 4, 3, 2)
  return w.reshape(kh, kw, co // groups, groups * ci)


# ---------------------------------------------------------------------------
# JAX executor
# ---------------------------------------------------------------------------

def _quantize_input(program, x):
  spec = program["input"]
  # a multiplication by the stored float32 reciprocal: one IEEE operation in
  # every runtime (XLA may rewrite a division into exactly this, or not).
  q = jnp.round(x * jnp.asarray(spec["inv_step"], jnp.float32))
  return jnp.clip(q, -spec["qmax"], spec["qmax"]).astype(jnp.int32)


def _conv(program, op, env):
  w = program["weights"][op["weight"]]
  x = env[op["input"]]
  if op.get("wide"):  # the stem: int32 codes, int64 accumulation
    dtype = out = jnp.int64
  else:
    dtype = jnp.dtype(np.promote_types(code_dtype(*op["input_range"]),
                                       w.dtype))
    out = jnp.int32
  groups = op.get("groups", 1)
  kernel = jnp.asarray(w)
  if op["transpose"]:
    kernel = transpose_kernel(kernel, groups)
  return jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), (op["stride"],) * 2,
      conv_padding(op, w), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, preferred_element_type=out)


def _fixed_point_sum(op, env):
  """``V`` of a requant/head op: every part, ReLU, channel concatenation."""
  parts = []
  dtype = jnp.int64 if op.get("wide") else jnp.int32
  for part in op["parts"]:
    v = jnp.asarray(part["bias"], dtype)
    for term in part["terms"]:
      t = env[term["input"]][..., term["channels"][0]:term["channels"][1]]
      t = round_shift(t.astype(dtype), term["pre_shift"])
      v = v + t * jnp.asarray(term["m"], dtype)
    if part["relu"]:
      v = jnp.maximum(v, 0)
    parts.append(v)
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _requant(op, env):
  v = _fixed_point_sum(op, env)
  shift = op["shift"]
  if op["pool"]:
    n, h, w, c = v.shape
    v = v.reshape(n, h // 2, 2, w // 2, 2, c).sum(axis=(2, 4))
    shift += 2
  lo, hi = op["range"]
  return jnp.clip(round_shift(v, shift), lo, hi).astype(jnp.int32)


def head_logits(features, weight, bias):
  """``features @ weight + bias`` in one fixed order of float32 operations.

  ``sum_c f[:, c] w[c]`` accumulated channel by channel, then the bias: any
  runtime that follows this order (no fused multiply-add) rounds identically,
  so JAX, numpy and onnxruntime give the same logits bit for bit.
  """
  # the products are materialized first: XLA:CPU would otherwise fuse each
  # multiply with its add into one FMA (one rounding instead of two).
  products = jax.lax.optimization_barrier(features[:, :, None] * weight[None])
  acc = products[:, 0]
  for c in range(1, weight.shape[0]):
    acc = acc + products[:, c]
  return acc + bias


def _head(op, env):
  v = round_shift(_fixed_point_sum(op, env), op["post_shift"])
  pooled = jnp.sum(v, axis=(1, 2), dtype=jnp.int32)
  return pooled, head_logits(pooled.astype(jnp.float32),
                             jnp.asarray(op["weight"], jnp.float32),
                             jnp.asarray(op["bias"], jnp.float32))


def run(program: Dict[str, Any], x: jax.Array, *,
        return_intermediates: bool = False):
  """Logits of the integer program on a normalised NHWC float batch.

  Everything between the input codes and the head's integer sum is integer
  (int8/int16 operands, int32 accumulators).  ``return_intermediates``: also
  the dict of every named integer tensor (``"input"``, accumulators, codes,
  ``"pooled"``).
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be an NHWC image batch (rank 4), got shape "
                     f"{jnp.shape(x)}")
  with jax.enable_x64(True):  # the stem's int64 accumulator (only there)
    return _run(program, jnp.asarray(x, jnp.float32), return_intermediates)


def _run(program, x, return_intermediates):
  env = {"input": _quantize_input(program, x)}
  logits = None
  for op in program["ops"]:
    kind = op["op"]
    if kind == "conv":
      env[op["output"]] = _conv(program, op, env)
    elif kind == "requant":
      env[op["output"]] = _requant(op, env)
    elif kind == "head":
      env["pooled"], logits = _head(op, env)
    else:
      raise ValueError(f"unknown op {kind!r}")
  return (logits, env) if return_intermediates else logits


def jit_run(program: Dict[str, Any], return_intermediates: bool = False):
  """``run`` compiled for this program (its constants baked in)."""
  fn = jax.jit(functools.partial(run, program,
                                 return_intermediates=return_intermediates))

  def call(x):
    with jax.enable_x64(True):
      return fn(x)
  return call


def accumulator_stats(program: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Per conv: fan-in, worst-case ``|acc|`` bounds and the safe width.

  ``bound_codes``: from the code ranges and the fan-in (any weights);
  ``bound_weights``: from this layer's weights (``max|x| max_o sum|w|``).
  ``safe_bits``: the smallest of 16/24/32/64 that holds ``bound_codes``.
  """
  rows = []
  for op in program["ops"]:
    if op["op"] != "conv":
      continue
    w = np.asarray(program["weights"][op["weight"]], np.int64)
    if op["transpose"]:
      w = np.asarray(transpose_kernel(w, op.get("groups", 1)))
    kh, kw, cin, _ = w.shape
    x_max = max(abs(v) for v in op["input_range"])
    w_max = program["weight_meta"][op["weight"]]["qmax"]
    bound_codes = x_max * w_max * kh * kw * cin
    bound_weights = x_max * int(np.abs(w).sum(axis=(0, 1, 2)).max())
    safe = next((b for b in (16, 24, 32, 64)
                 if bound_codes <= 2 ** (b - 1) - 1), None)
    rows.append({"layer": op["output"], "fan_in": kh * kw * cin,
                 "bound_codes": int(bound_codes),
                 "bound_weights": int(bound_weights), "safe_bits": safe,
                 "safe_bits_weights": next(
                     (b for b in (16, 24, 32, 64)
                      if bound_weights <= 2 ** (b - 1) - 1), None)})
  return rows
