"""ONNX export of an integer program (built with the ``onnx`` package).

The graph takes the same normalised float32 NHWC batch as the JAX model and
returns float32 logits.  Inside (NCHW):

* input quantization: ``Mul`` by the per-channel inverse step, ``Round`` (ties to
  even), clip: int32 codes;
* block convolutions: ``ConvInteger`` on uint8 activations (signed codes
  shifted by a zero point, which also pads exactly) and uint8 weights (the
  codes plus a zero point ``2^(b-1)``: onnxruntime's u8 x u8 kernel is
  2-4x faster than its u8 x s8 one), int32 output; ``Kᵀ`` reads K's initializer through ``Transpose`` + reversed
  ``Slice`` (the codes are stored once);
* the stem's 22-bit codes do not fit ``ConvInteger``: im2col (``Slice`` +
  ``Concat``) and an int64 ``MatMul``, requantized in int64;
* requantization: ops bounded by 2^53 (``"f64"``, every block) in float64
  (exact integers; the shift a multiplication by ``2^-S``, ``Round`` ties to
  even), the others (the stem) in int64 ``Mul``/``Add``/``Max`` with the
  rounding shift as ``Mod``/``Sub``/``Div``; the 2x2 pool a ``ReduceSum``;
* head: integer ``ReduceSum``, then the float classifier in the fixed order
  of :func:`pdeq_jax.deploy.program.head_logits`.

``float_mode=True`` writes the same network on float32 tensors (float
``Conv`` with the dequantized weights, float requantization with ``Round``):
the float baseline of the benchmark, not bit-exact.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from pdeq_jax.deploy import program as prog

OPSET = 17


class _Graph:

  def __init__(self):
    import onnx  # pylint: disable=import-outside-toplevel
    self.onnx = onnx
    self.nodes: List[Any] = []
    self.inits: List[Any] = []
    self.count = 0
    self.uint8 = set()  # tensors that hold uint8 codes

  def name(self, hint="t"):
    self.count += 1
    return f"{hint.replace('/', '_')}_{self.count}"

  def const(self, value, dtype=None, hint="c"):
    arr = np.asarray(value, dtype)
    name = self.name(hint)
    self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
    return name

  def op(self, kind, inputs, hint="t", **attrs):
    out = self.name(hint)
    self.nodes.append(self.onnx.helper.make_node(kind, list(inputs), [out],
                                                 **attrs))
    return out


def _round_shift(g: _Graph, v: str, shift: int, dtype=np.int32) -> str:
  if shift == 0:
    return v
  a = g.op("Add", [v, g.const(1 << (shift - 1), dtype)])
  d = g.const(1 << shift, dtype)
  rem = g.op("Mod", [a, d], fmod=0)
  q = g.op("Div", [g.op("Sub", [a, rem]), d])
  tie = g.op("Cast", [g.op("Equal", [rem, g.const(0, dtype)])],
             to=g.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
  odd = g.op("Mod", [q, g.const(2, dtype)], fmod=0)
  return g.op("Sub", [q, g.op("Mul", [tie, odd])])


def _channels(c):
  return np.asarray(c).reshape(1, -1, 1, 1)


def export(program: Dict[str, Any], *, float_mode: bool = False,
           batch_size: Any = "N"):
  """The ``onnx.ModelProto`` of ``program`` (see the module docstring)."""
  g = _Graph()
  tp = g.onnx.TensorProto
  h, w, c = program["image_shape"]
  spec = program["input"]
  x = g.op("Transpose", ["x"], perm=[0, 3, 1, 2])
  q = g.op("Round", [g.op("Mul", [x, g.const(_channels(spec["inv_step"]),
                                             np.float32)])])
  q = g.op("Min", [g.op("Max", [q, g.const(-spec["qmax"], np.float32)]),
                   g.const(spec["qmax"], np.float32)])
  env = {"input": q if float_mode else g.op("Cast", [q], to=tp.INT32)}
  weight_inits: Dict[str, str] = {}
  channels = {"input": c}
  ints = np.float32 if float_mode else np.int32
  for op in program["ops"]:
    kind = op["op"]
    if kind == "conv":
      env[op["output"]] = _conv(g, program, op, env, weight_inits, float_mode)
      codes = program["weights"][op["weight"]]
      channels[op["output"]] = (codes.shape[2] * op.get("groups", 1)
                                if op["transpose"] else codes.shape[3])
    elif kind == "requant" and op.get("f64") and not float_mode:
      env[op["output"]] = _requant_f64(g, op, env, channels)
      channels[op["output"]] = sum(len(p["bias"]) for p in op["parts"])
    elif kind in ("requant", "head"):
      wide = bool(op.get("wide")) and not float_mode
      ints = np.float32 if float_mode else (np.int64 if wide else np.int32)
      parts = []
      for part in op["parts"]:
        v = g.const(_channels(part["bias"]), ints)
        for term in part["terms"]:
          t = env[term["input"]]
          c0, c1 = term["channels"]
          if (c0, c1) != (0, channels[term["input"]]):
            t = g.op("Slice", [t, g.const([c0], np.int64),
                               g.const([c1], np.int64),
                               g.const([1], np.int64)])
          if wide:
            t = g.op("Cast", [t], to=tp.INT64)
          elif t in g.uint8 and not float_mode:
            t = g.op("Cast", [t], to=tp.INT32)
          if float_mode:
            t = _float_shift(g, t, term["pre_shift"])
          else:
            t = _round_shift(g, t, term["pre_shift"], ints)
          v = g.op("Add", [v, g.op("Mul", [t, g.const(_channels(term["m"]),
                                                       ints)])])
        if part["relu"]:
          v = g.op("Max", [v, g.const(0, ints)])
        parts.append(v)
      v = g.op("Concat", parts, axis=1) if len(parts) > 1 else parts[0]
      if kind == "head":
        v = (_float_shift(g, v, op["post_shift"]) if float_mode
             else _round_shift(g, v, op["post_shift"], ints))
        pooled = g.op("ReduceSum", [v, g.const([2, 3], np.int64)],
                      keepdims=0)
        feat = pooled if float_mode else g.op("Cast", [pooled], to=tp.FLOAT)
        weight = np.asarray(op["weight"], np.float32)
        acc = None
        for ch in range(weight.shape[0]):
          col = g.op("Slice", [feat, g.const([ch], np.int64),
                               g.const([ch + 1], np.int64),
                               g.const([1], np.int64)])
          prod = g.op("Mul", [col, g.const(weight[ch:ch + 1], np.float32)])
          acc = prod if acc is None else g.op("Add", [acc, prod])
        g.nodes.append(g.onnx.helper.make_node(
            "Add", [acc, g.const(np.asarray(op["bias"], np.float32)[None])],
            ["logits"]))
        continue
      shift = op["shift"]
      if op["pool"]:
        v = g.op("ReduceSum", [_pool_view(g, v), g.const([3, 5], np.int64)],
                 keepdims=0)
        shift += 2
      lo, hi = op["range"]
      v = (_float_shift(g, v, shift) if float_mode
           else _round_shift(g, v, shift, ints))
      v = g.op("Min", [g.op("Max", [v, g.const(lo, ints)]),
                       g.const(hi, ints)])
      env[op["output"]] = g.op("Cast", [v], to=tp.INT32) if wide else v
      channels[op["output"]] = sum(len(p["bias"]) for p in op["parts"])
    else:
      raise ValueError(f"unknown op {kind!r}")
  graph = g.onnx.helper.make_graph(
      g.nodes, f"pdeq_{program['model']}",
      [g.onnx.helper.make_tensor_value_info("x", tp.FLOAT,
                                            [batch_size, h, w, c])],
      [g.onnx.helper.make_tensor_value_info(
          "logits", tp.FLOAT,
          [batch_size, len(program["ops"][-1]["bias"])])],
      g.inits)
  return _model(g, graph)


def _requant_f64(g: _Graph, op, env, channels) -> str:
  """A requant op bounded by 2^53 (``op["f64"]``) in float64: every value
  is an integer float64 holds exactly.  The shift ``2^-S`` is folded into
  the multipliers and the bias (a power of two: still exact), ``Round``
  rounds half to even, so this is the int64 result.  Without pooling a
  part's ReLU is the clip's lower bound (``round(max(v, 0)) = max(round(v),
  0)``).  Codes in 0..255 come out as uint8 (ready for ``ConvInteger``)."""
  tp = g.onnx.TensorProto
  shift = op["shift"] + (2 if op["pool"] else 0)
  scale = 2.0 ** -shift
  lo, hi = op["range"]
  single = len(op["parts"]) == 1 and not op["pool"]
  parts = []
  for part in op["parts"]:
    v = None
    for term in part["terms"]:
      if term["pre_shift"]:
        raise ValueError(f"{op['output']}: an f64 op with a pre-shift")
      t = env[term["input"]]
      c0, c1 = term["channels"]
      if (c0, c1) != (0, channels[term["input"]]):
        t = g.op("Slice", [t, g.const([c0], np.int64), g.const([c1], np.int64),
                           g.const([1], np.int64)])
      m = np.asarray(term["m"], np.float64) * scale
      t = g.op("Mul", [g.op("Cast", [t], to=tp.DOUBLE),
                       g.const(_channels(m), np.float64)])
      v = t if v is None else g.op("Add", [v, t])
    bias = np.asarray(part["bias"], np.float64) * scale
    if np.any(bias != 0):
      v = g.op("Add", [v, g.const(_channels(bias), np.float64)])
    if part["relu"] and not (single and lo >= 0):
      v = g.op("Max", [v, g.const(0.0, np.float64)])
    parts.append(v)
  v = g.op("Concat", parts, axis=1) if len(parts) > 1 else parts[0]
  if op["pool"]:
    v = g.op("ReduceSum", [_pool_view(g, v), g.const([3, 5], np.int64)],
             keepdims=0)
  v = g.op("Round", [v])
  v = g.op("Min", [g.op("Max", [v, g.const(float(lo), np.float64)]),
                   g.const(float(hi), np.float64)])
  out = tp.UINT8 if 0 <= lo and hi <= 255 else tp.INT32
  name = g.op("Cast", [v], to=out, hint=op["output"])
  if out == tp.UINT8:
    g.uint8.add(name)
  return name


def _float_shift(g: _Graph, v: str, shift: int) -> str:
  if shift == 0:
    return v
  return g.op("Round", [g.op("Mul", [v, g.const(2.0 ** -shift, np.float32)])])


def _pool_view(g: _Graph, v: str) -> str:
  shape = g.op("Shape", [v])
  n_c = g.op("Slice", [shape, g.const([0], np.int64), g.const([2], np.int64)])
  hw = g.op("Slice", [shape, g.const([2], np.int64), g.const([4], np.int64)])
  half = g.op("Div", [hw, g.const([2, 2], np.int64)])
  h2 = g.op("Slice", [half, g.const([0], np.int64), g.const([1], np.int64)])
  w2 = g.op("Slice", [half, g.const([1], np.int64), g.const([2], np.int64)])
  two = g.const([2], np.int64)
  new_shape = g.op("Concat", [n_c, h2, two, w2, two], axis=0)
  return g.op("Reshape", [v, new_shape])


def _conv(g: _Graph, program, op, env, weight_inits, float_mode):
  tp = g.onnx.TensorProto
  codes = np.asarray(program["weights"][op["weight"]])
  lo, hi = op["input_range"]
  x = env[op["input"]]
  pads = prog.conv_padding(op, codes)
  onnx_pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
  stride = [op["stride"]] * 2
  groups = op.get("groups", 1)
  if groups != 1 and float_mode:
    k = prog.transpose_kernel(codes, groups) if op["transpose"] else codes
    return g.op("Conv", [x, g.const(k.transpose(3, 2, 0, 1).astype(
        np.float32), hint="w")], pads=onnx_pads, strides=stride,
                group=groups)
  if float_mode:
    key = op["weight"] + "/float"
    if key not in weight_inits:
      scale = np.asarray(program["weight_meta"][op["weight"]]["scale"])
      weight_inits[key] = g.const(codes.transpose(3, 2, 0, 1).astype(
          np.float32), hint="w")
      del scale  # the requant multipliers carry the scales
    wt = _transposed(g, weight_inits[key]) if op["transpose"] else \
        weight_inits[key]
    return g.op("Conv", [x, wt], pads=onnx_pads, strides=stride)
  if codes.dtype != np.int8 or hi - min(lo, 0) > 255:
    # wide codes (the stem's) or an int32 accumulator as input (the stable
    # MobileNetV2's K_dw K_1x1): exact integer MatMul / multiply-adds
    k = prog.transpose_kernel(codes, groups) if op["transpose"] else codes
    if groups == 1:
      return _im2col_matmul(g, x, k, op, pads, bool(op.get("wide")))
    if k.shape[2] != 1:
      raise ValueError(f"{op['output']}: a grouped conv on wide inputs is "
                       "exported only when depthwise")
    return _depthwise_taps(g, x, k, op, pads)
  # uint8 weights with a zero point: onnxruntime's ConvInteger runs u8 x u8
  # 2-4x faster than u8 x s8 (measured); Σ (x - xz)(w - wz) stays exact
  w_zero = 2 ** (program["weight_meta"][op["weight"]]["bits"] - 1)
  if op["weight"] not in weight_inits:
    weight_inits[op["weight"]] = g.const(
        codes.transpose(3, 2, 0, 1).astype(np.int16) + w_zero, np.uint8,
        hint="w")
  wt = weight_inits[op["weight"]]
  if op["transpose"] and groups != 1:
    if codes.shape[2] != 1 or codes.shape[3] != groups:
      raise ValueError(f"{op['output']}: only a depthwise grouped Kᵀ is "
                       "exported")
    wt = _flipped(g, wt)  # depthwise: the adjoint only flips the kernel
  elif op["transpose"]:
    wt = _transposed(g, wt)
  wz = g.const(w_zero, np.uint8)
  if lo < 0:
    xu = g.op("Cast", [g.op("Add", [x, g.const(-lo, np.int32)])],
              to=tp.UINT8)
    inputs = [xu, wt, g.const(-lo, np.uint8), wz]
  else:
    if hi > 255:
      raise ValueError(f"activation codes up to {hi} do not fit uint8")
    xu = x if x in g.uint8 else g.op("Cast", [x], to=tp.UINT8)
    inputs = [xu, wt, g.const(0, np.uint8), wz]
  return g.op("ConvInteger", inputs, hint=op["output"], pads=onnx_pads,
              strides=stride, group=groups)


def _transposed(g: _Graph, w: str) -> str:
  """OIHW of ``Kᵀ`` from K's initializer: in/out swapped, spatially flipped."""
  return _flipped(g, g.op("Transpose", [w], perm=[1, 0, 2, 3]))


def _flipped(g: _Graph, t: str) -> str:
  return g.op("Slice", [t, g.const([-1, -1], np.int64),
                        g.const([-2 ** 62, -2 ** 62], np.int64),
                        g.const([2, 3], np.int64), g.const([-1, -1], np.int64)])


def _im2col_matmul(g: _Graph, x, codes, op, pads, wide):
  """Exact convolution of wide codes: im2col + int32 (int64) MatMul."""
  kh, kw, cin, cout = codes.shape
  s = op["stride"]
  dtype = np.int64 if wide else np.int32
  if wide:
    x = g.op("Cast", [x], to=g.onnx.TensorProto.INT64)
  xp = g.op("Pad", [x, g.const([0, 0, pads[0][0], pads[1][0], 0, 0,
                                pads[0][1], pads[1][1]], np.int64)])
  shape = g.op("Shape", [xp])
  hw = g.op("Slice", [shape, g.const([2], np.int64), g.const([4], np.int64)])
  cols = []
  for i in range(kh):
    for j in range(kw):
      # rows i, i + s, ... while a full window fits: end = size - (k-1-i)
      ends = g.op("Sub", [hw, g.const([kh - 1 - i, kw - 1 - j], np.int64)])
      cols.append(g.op("Slice", [xp, g.const([i, j], np.int64), ends,
                                 g.const([2, 3], np.int64),
                                 g.const([s, s], np.int64)]))
  patches = g.op("Transpose", [g.op("Concat", cols, axis=1)],
                 perm=[0, 2, 3, 1])
  w = g.const(codes.reshape(kh * kw * cin, cout).astype(dtype), hint="w")
  y = g.op("MatMul", [patches, w])
  return g.op("Transpose", [y], perm=[0, 3, 1, 2], hint=op["output"])


def _depthwise_taps(g: _Graph, x, codes, op, pads):
  """Exact int32 depthwise conv of an int32 input: one Mul + Add per tap."""
  kh, kw, _, c = codes.shape
  s = op["stride"]
  xp = g.op("Pad", [x, g.const([0, 0, pads[0][0], pads[1][0], 0, 0,
                                pads[0][1], pads[1][1]], np.int64)])
  shape = g.op("Shape", [xp])
  hw = g.op("Slice", [shape, g.const([2], np.int64), g.const([4], np.int64)])
  acc = None
  for i in range(kh):
    for j in range(kw):
      ends = g.op("Sub", [hw, g.const([kh - 1 - i, kw - 1 - j], np.int64)])
      tap = g.op("Slice", [xp, g.const([i, j], np.int64), ends,
                           g.const([2, 3], np.int64),
                           g.const([s, s], np.int64)])
      prod = g.op("Mul", [tap, g.const(codes[i, j, 0].reshape(1, c, 1, 1),
                                       np.int32)])
      acc = prod if acc is None else g.op("Add", [acc, prod])
  return g.op("Identity", [acc], hint=op["output"])


def export_gcn(program: Dict[str, Any]):
  """The ``onnx.ModelProto`` of a PDE-GCN program (:mod:`pdeq_jax.deploy.gcn`).

  Input ``q``: layer 0's odd int32 state codes [N, C] (from
  ``gcn.input_codes``: the float opening layer is not part of the graph);
  output: float32 logits [N, classes] before ``log_softmax``.  ``S`` as two
  ``Gather``s, the tanh quantizer as ``GreaterOrEqual`` against the
  thresholds, ``Sᵀ`` as ``ScatterND`` with ``reduction="add"``, int64
  ``MatMul``s; every integer as in ``gcn.run``.
  """
  g = _Graph()
  tp = g.onnx.TensorProto
  gr = program["graph"]
  n, levels = gr["num_nodes"], program["input"]["levels"]
  width = program["weights"][program["layers"][0]["K"]].shape[0]
  i64 = lambda v: g.const(v, np.int64)
  # stored small (int32 indices and edge weights, int8 codes), widened by
  # Cast in the graph: the same integers, a smaller file
  s_idx = g.op("Cast", [g.const(np.asarray(gr["senders"], np.int32))],
               to=tp.INT64)
  r_idx = g.op("Cast", [g.const(np.asarray(gr["receivers"], np.int32))],
               to=tp.INT64)
  s_nd = g.op("Unsqueeze", [s_idx, i64([1])])
  r_nd = g.op("Unsqueeze", [r_idx, i64([1])])
  w = np.asarray(gr["weights"], np.int64)[:, None]
  w = g.op("Cast", [g.const(w, np.int32 if np.abs(w).max() < 2 ** 31
                            else np.int64)], to=tp.INT64)
  zeros = g.op("ConstantOfShape", [i64([n, width])],
               value=g.onnx.numpy_helper.from_array(np.zeros(1, np.int64)))
  q = "q"
  logits = None
  for op in program["layers"]:
    k8 = g.const(np.asarray(program["weights"][op["K"]], np.int8))
    a = g.op("MatMul", [q, g.op("Cast", [k8], to=tp.INT32)])
    d = g.op("Sub", [g.op("Gather", [a, s_idx], axis=0),
                     g.op("Gather", [a, r_idx], axis=0)])
    pe = g.op("Mul", [g.op("Cast", [d], to=tp.INT64), w])
    thr = g.const(np.asarray(op["thresholds"], np.int64))

    def count(v, thr=thr):
      ge = g.op("GreaterOrEqual", [g.op("Unsqueeze", [v, i64([2])]), thr])
      return g.op("ReduceSum", [g.op("Cast", [ge], to=tp.INT64), i64([2])],
                  keepdims=0)
    if gr["fold"]:
      e = g.op("Mul", [g.op("Sub", [count(pe), count(g.op("Neg", [pe]))]),
                       i64(2)])
    else:
      e = g.op("Sub", [g.op("Mul", [count(pe), i64(2)]), i64(levels)])
    we = g.op("Mul", [e, w])
    y = g.op("ScatterND", [zeros, s_nd, we], reduction="add")
    y = g.op("ScatterND", [y, r_nd, g.op("Neg", [we])], reduction="add")
    kz = k8 if op["Z"] == op["K"] else g.const(
        np.asarray(program["weights"][op["Z"]], np.int8))
    kz = g.op("Cast", [kz], to=tp.INT64)
    if op["transpose"]:  # Kᵀ: the same codes as K
      kz = g.op("Transpose", [kz], perm=[1, 0])
    z = g.op("MatMul", [y, kz])
    v = g.op("Add", [g.op("Mul", [g.op("Cast", [q], to=tp.INT64),
                                  i64(op["m_x"][0])]),
                     g.op("Mul", [_round_shift(g, z, op["pre_shift"],
                                               np.int64), i64(op["m_z"][0])])])
    v = g.op("Add", [v, i64(op["bias"][0])])
    if "head_weight" in op:
      f = g.op("Cast", [_round_shift(g, v, op["post_shift"], np.int64)],
               to=tp.INT32)
      feat = g.op("Cast", [f], to=tp.FLOAT)
      weight = np.asarray(op["head_weight"], np.float32)
      acc = None
      for ch in range(weight.shape[0]):
        col = g.op("Slice", [feat, i64([ch]), i64([ch + 1]), i64([1])])
        prod = g.op("Mul", [col, g.const(weight[ch:ch + 1], np.float32)])
        acc = prod if acc is None else g.op("Add", [acc, prod])
      g.nodes.append(g.onnx.helper.make_node(
          "Add", [acc, g.const(np.zeros((1, weight.shape[1]), np.float32))],
          ["logits"]))
      logits = weight.shape[1]
    else:
      kk = _round_shift(g, v, op["shift"], np.int64)
      kk = g.op("Min", [g.op("Max", [kk, i64(0)]), i64(op["levels"])])
      q = g.op("Cast", [g.op("Sub", [g.op("Mul", [kk, i64(2)]),
                                     i64(op["levels"])])], to=tp.INT32)
  graph = g.onnx.helper.make_graph(
      g.nodes, "pdeq_PDEGCN",
      [g.onnx.helper.make_tensor_value_info("q", tp.INT32, [n, width])],
      [g.onnx.helper.make_tensor_value_info("logits", tp.FLOAT, [n, logits])],
      g.inits)
  return _model(g, graph)


def save(program: Dict[str, Any], path: str, **kwargs) -> None:
  """Writes ``export(program)`` (a PDE-GCN program: ``export_gcn``) to
  ``path`` (checked with onnx.checker)."""
  import onnx  # pylint: disable=import-outside-toplevel
  model = (export_gcn(program) if program.get("model") == "PDEGCN"
           else export(program, **kwargs))
  onnx.checker.check_model(model)
  onnx.save(model, path)


def session(program_or_model, *, intra_op_threads: int = 0, **kwargs):
  """An onnxruntime CPU session of a program (or an ONNX model / path).

  ``intra_op_threads=1`` for a PDE-GCN model: onnxruntime's multithreaded
  ``ScatterND`` with ``reduction="add"`` (``Sᵀ``) is not deterministic (on
  Cora a default session gave logits differing from ``gcn.run`` on some
  runs, a one-thread session never did).
  """
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  model = program_or_model
  if isinstance(model, dict):
    model = (export_gcn(model) if model.get("model") == "PDEGCN"
             else export(model, **kwargs))
  data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
  options = ort.SessionOptions()
  options.intra_op_num_threads = intra_op_threads
  return ort.InferenceSession(data, options,
                              providers=["CPUExecutionProvider"])


def _model(g, graph):
  """The ONNX model of ``graph`` at this module's opset (IR version <= 9, which
  onnxruntime reads)."""
  model = g.onnx.helper.make_model(
      graph, opset_imports=[g.onnx.helper.make_opsetid("", OPSET)],
      producer_name="pdeq_jax.deploy")
  model.ir_version = min(model.ir_version, 9)
  return model
