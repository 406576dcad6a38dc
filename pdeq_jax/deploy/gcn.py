"""PDE-GCN (Eq. 23 / 24) with quantized weights -> an integer program.

Per layer ``j`` (node states ``x`` on the layer's signed mid-rise grid,
odd codes ``q`` in ``[-L, L]``, ``L = 2^b - 1``; ``K`` codes ``c`` of
``quant.to_integer`` with ``alpha = max|K|`` as the model's weight quantizer):

    a   = q c                                   int32 [N, C]
    d_e = a[s_e] - a[r_e]                       int32 [E, C]  (S without w_e)
    P_e = d_e W_e                               int64, W_e = round(w_e 2^Fw)
    k   = #{i : P_e >= T_i}                     tanh + mid-rise quantizer as
                                                 integer thresholds (monotone)
    e   = 2k - L_a   (both directions stored: 2 (k(P) - k(-P)))
    Y_i = sum_{s_e = i} W_e e_e - sum_{r_e = i} W_e e_e     int64   (Sᵀ e)
    Z   = Y cᵀ  (symmetric, the same codes as K)  or  Y c₂   int64
    next codes: round(q m_x + r(Z, p) m_z + b) / 2^F), clip, 2k - L

with ``T_i = ceil(atanh(beta_i) 2^Fw / sigma)`` (``beta_i`` the mid-rise
decision levels of the tanh quantizer, ``sigma`` the scale of ``a``),
rounding to nearest, ties to even, as :mod:`pdeq_jax.deploy.program`.

What stays float (``docs/deploy.md``): the opening Dense + ReLU and the first
state quantizer (the input quantization: bag-of-words features and the
opening weights are float in the trained model; :func:`input_codes`), and the
closing Dense (the logits' dequantization, a fixed order of float32
operations).  The graph normalisation ``w_e = 1/sqrt(d_i d_j)`` becomes
fixed-point integers ``W_e`` (31 significant bits), so it is integer here.
``run`` returns the logits before ``log_softmax`` (monotone per node).
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax import layers
from pdeq_jax import quant
from pdeq_jax.deploy import program as prog

EDGE_WEIGHT_BITS = 31  # W_e = round(w_e 2^Fw) < 2^31
_NEVER = 2 ** 62       # a threshold no int64 product of ours reaches


def _alpha(a) -> float:
  return float(layers.positive_alpha(jnp.asarray(a, jnp.float32)))


def _kernel_codes(kernel, bits):
  """Codes and scale of ``pde_gcn._maybe_quantize_weight``."""
  w = jnp.asarray(kernel, jnp.float32)
  alpha = jnp.max(jnp.abs(w)) + 1e-8
  codes, scale = quant.to_integer(w, alpha, bits, signed=True)
  return np.asarray(codes).astype(np.int8), float(scale)


def convert(model, variables: Dict[str, Any], graph, bits) -> Dict[str, Any]:
  """The integer program of a trained :class:`pdeq_jax.models.pde_gcn.PDEGCN`.

  Args:
    model: the PDEGCN module (``quantize_weights=True``, ``quantize_
      activations=True``, ``grid='midrise'``).
    variables: ``{'params': ...}``.
    graph: the :class:`pde_gcn.GraphOperator` the model runs on.
    bits: ``(weight_bits, act_bits)``, 2..8 each.
  """
  from pdeq_jax.deploy import convert as convert_lib  # pylint: disable=import-outside-toplevel
  if not model.quantize_weights:
    raise convert_lib.UnsupportedModelError(
        "PDEGCN has no weight quantizers (quantize_weights=False, the "
        "paper's default): set quant.weight_bits to export it")
  if not model.quantize_activations or model.grid != "midrise":
    raise convert_lib.UnsupportedModelError(
        f"PDEGCN: quantize_activations={model.quantize_activations}, grid="
        f"{model.grid!r}; the integer form needs quantized activations on "
        "the 'midrise' grid")
  wb, ab = convert_lib._check_bits(bits)  # pylint: disable=protected-access
  p = variables["params"]
  levels = 2 ** ab - 1
  depth = p["kernel"].shape[0]
  w = np.asarray(graph.weights, np.float64)
  fw = EDGE_WEIGHT_BITS - 1 - int(np.floor(np.log2(w.max())))
  w_fixed = prog.fixed_point(w, fw, wide=True)
  senders = np.asarray(graph.senders, np.int32)
  receivers = np.asarray(graph.receivers, np.int32)
  fold = graph.direction_factor == 2.0
  n = graph.num_nodes
  # max over nodes of sum |W_e| over its edges (Y's bound per unit code)
  w_node = np.zeros(n)
  np.add.at(w_node, senders, w_fixed.astype(np.float64))
  np.add.at(w_node, receivers, w_fixed.astype(np.float64))
  weights, meta, ops = {}, {}, []
  alpha_state = [_alpha(a) for a in np.asarray(p["alpha_state"])]
  alpha_act = [_alpha(a) for a in np.asarray(p["alpha_act"])]
  for j in range(depth):
    codes, sk = _kernel_codes(p["kernel"][j], wb)
    weights[f"layer{j}/K"], meta[f"layer{j}/K"] = codes, {"scale": sk,
                                                          "bits": wb}
    out_codes, so = codes, sk
    if not model.symmetric:
      out_codes, so = _kernel_codes(p["kernel_out"][j], wb)
      weights[f"layer{j}/K2"] = out_codes
      meta[f"layer{j}/K2"] = {"scale": so, "bits": wb}
    x_unit = alpha_state[j] / levels          # value of one odd-code unit
    sigma = x_unit * sk * 2.0 ** -fw          # value of one unit of P
    la = levels
    beta = alpha_act[j] * ((2.0 * np.arange(1, la + 1) - 1.0) / la - 1.0)
    thresholds = np.where(beta <= -1.0, -_NEVER, _NEVER).astype(np.int64)
    inside = np.abs(beta) < 1.0
    thresholds[inside] = np.ceil(np.arctanh(beta[inside]) / sigma)
    e_max = 2 * la if fold else la
    a_bound = levels * float(np.abs(codes.astype(np.int64)).sum(0).max())
    y_bound = e_max * float(w_node.max())
    kz = out_codes.T if model.symmetric else out_codes  # Z = Y kz
    z_bound = y_bound * float(np.abs(kz.astype(np.int64)).sum(0).max())
    e_unit = alpha_act[j] / la * 2.0 ** -fw   # value of one unit of Y
    z_coef = -model.h * e_unit * (sk if model.symmetric else so)
    op = {"K": f"layer{j}/K", "Z": f"layer{j}/K2" if not model.symmetric
          else f"layer{j}/K", "transpose": bool(model.symmetric),
          "thresholds": thresholds, "a_bound": a_bound, "z_bound": z_bound}
    p_z = prog.pre_shift(z_bound, prog.WIDE_TERM_BITS)
    z_b = np.floor(z_bound / 2.0 ** p_z + 0.5)
    if j + 1 < depth:
      step = 2.0 * alpha_state[j + 1] / levels   # k = round(x / step + L/2)
      coefs = [np.array([x_unit / step]), np.array([z_coef * 2.0 ** p_z /
                                                    step])]
      bias = np.array([levels / 2.0])
      shift = prog.choose_shift([levels, z_b], coefs, bias, multiplier=1,
                                lo=0, rounding=True, limit=prog.INT64_MAX)
      op.update(shift=shift, levels=levels, pre_shift=p_z,
                m_x=prog.fixed_point(coefs[0], shift, True),
                m_z=prog.fixed_point(coefs[1], shift, True),
                bias=prog.fixed_point(bias, shift, True))
    else:
      coefs = [np.array([x_unit]), np.array([z_coef * 2.0 ** p_z])]
      shift = prog.choose_shift([levels, z_b], coefs, np.zeros(1),
                                multiplier=1, lo=0, rounding=False,
                                limit=prog.INT64_MAX)
      m_x = prog.fixed_point(coefs[0], shift, True)
      m_z = prog.fixed_point(coefs[1], shift, True)
      v_bound = levels * float(abs(m_x[0])) + z_b * float(abs(m_z[0]))
      post = next(q for q in range(0, 63)
                  if v_bound / 2.0 ** q + 1.0 <= prog.INT32_MAX)
      kernel = np.asarray(p["close"]["kernel"], np.float64) * 2.0 ** (
          post - shift)
      op.update(shift=shift, pre_shift=p_z, m_x=m_x, m_z=m_z,
                bias=np.zeros(1, np.int64), post_shift=post,
                head_weight=kernel.astype(np.float32))
    ops.append(op)
  return {"format": "pdeq_jax.deploy.gcn/1", "model": "PDEGCN",
          "symmetric": bool(model.symmetric),
          "bits": {"weights": wb, "activations": ab},
          "open_kernel": np.asarray(p["open"]["kernel"], np.float32),
          "input": {"alpha": np.float32(alpha_state[0]), "levels": levels},
          "graph": {"senders": senders, "receivers": receivers,
                    "weights": w_fixed, "weight_shift": fw, "num_nodes": n,
                    "fold": bool(fold)},
          "weights": weights, "weight_meta": meta, "layers": ops}


def input_codes(program, features) -> jax.Array:
  """Float: the opening Dense + ReLU and layer 0's mid-rise state quantizer,
  as the fake-quant model computes them; odd int32 codes in ``[-L, L]``."""
  x = jax.nn.relu(jnp.asarray(features, jnp.float32) @ jnp.asarray(
      program["open_kernel"]))
  spec = program["input"]
  alpha = jnp.float32(spec["alpha"])
  codes, _ = quant.to_integer(x, alpha, int(np.log2(spec["levels"] + 1)),
                              signed=True, grid="midrise")
  return codes.astype(jnp.int32)


def _edge_codes(pe, thresholds, fold, levels):
  count = lambda v: jnp.sum(v[..., None] >= thresholds, axis=-1)
  if fold:
    return 2 * (count(pe) - count(-pe))
  return 2 * count(pe) - levels


def run(program: Dict[str, Any], q: jax.Array, *,
        return_intermediates: bool = False):
  """Logits (before ``log_softmax``) from layer 0's input codes ``q``."""
  with jax.enable_x64(True):
    return _run(program, jnp.asarray(q, jnp.int32), return_intermediates)


def _run(program, q, return_intermediates):
  g = program["graph"]
  s, r = jnp.asarray(g["senders"]), jnp.asarray(g["receivers"])
  w = jnp.asarray(g["weights"], jnp.int64)
  levels = program["input"]["levels"]
  env = {"input": q}
  logits = None
  for j, op in enumerate(program["layers"]):
    k = jnp.asarray(program["weights"][op["K"]], jnp.int32)
    a = jnp.matmul(q, k, preferred_element_type=jnp.int32)
    pe = (a[s] - a[r]).astype(jnp.int64) * w[:, None]
    e = _edge_codes(pe, jnp.asarray(op["thresholds"]), g["fold"], levels)
    we = e.astype(jnp.int64) * w[:, None]
    y = (jax.ops.segment_sum(we, s, g["num_nodes"]) -
         jax.ops.segment_sum(we, r, g["num_nodes"]))
    kz = jnp.asarray(program["weights"][op["Z"]], jnp.int64)
    z = jnp.matmul(y, kz.T if op["transpose"] else kz)
    v = (q.astype(jnp.int64) * op["m_x"][0] +
         prog.round_shift(z, op["pre_shift"]) * op["m_z"][0] + op["bias"][0])
    env.update({f"layer{j}/a": a, f"layer{j}/e": e, f"layer{j}/y": y,
                f"layer{j}/z": z})
    if "head_weight" in op:
      f = prog.round_shift(v, op["post_shift"]).astype(jnp.int32)
      env["features"] = f
      weight = jnp.asarray(op["head_weight"], jnp.float32)
      logits = prog.head_logits(f.astype(jnp.float32), weight,
                                jnp.zeros(weight.shape[1], jnp.float32))
    else:
      kk = jnp.clip(prog.round_shift(v, op["shift"]), 0, op["levels"])
      q = (2 * kk - op["levels"]).astype(jnp.int32)
      env[f"layer{j + 1}/q"] = q
  return (logits, env) if return_intermediates else logits
