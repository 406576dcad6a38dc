"""Fixed-point post-training quantization (PTQ) with per-tensor (BW, F) formats.

The method of the embedded-inference paper (``../shared/seeds/004_*``): a
*pre-trained float* network gets, for each layer, a fixed-point format for
its weights and one for its activations -- a bit width ``BW`` and a
fractional length ``F`` -- searched so that the accuracy loss stays within a
budget, with no retraining.

* Quantizer (:func:`fixed_point`):
  ``clip(round_half_even(x · 2^F), -(2^(BW-1) - 1), 2^(BW-1) - 1) / 2^F``.
  Rounding is round-half-to-even (``jnp.round``), the scale an exact power of
  two (built from the float exponent bits), so ``x · 2^F`` is exact and a
  requantization between layers is an integer shift (:func:`requantize`).
* Initial fractional length (:func:`init_frac`): ``F = BW - 1 - ceil(log2
  max|x|)`` -- the largest ``F`` whose range still covers ``max|x|``
  (up to one step).
* Cost model (:func:`memory_kib`, :func:`mult_cost`): memory
  ``Σ BW · n`` over the weight (and bias) tensors (KiB); multiplication cost
  ``Σ BW_w · BW_a · MACs`` over the multiplying layers, ``BW_a`` the format
  of the activation the layer multiplies with.  Unquantized tensors count
  32 bits.
* Searches over a :class:`Problem` (sites in network order and an
  ``evaluate(bw, f) -> accuracy %`` function): :func:`sequential_search`
  ("dependent": every evaluation runs with all sites fixed so far
  quantized), :func:`independent_search` (every site alone, the paper's
  negative baseline) and :func:`uniform_search` (every tensor at 8 bits, the
  commercial-tool baseline).

Formats are runtime arrays (``bw`` and ``f``, int32, one entry per site, ``bw
= 0`` meaning "leave in float"), so a network jitted once evaluates every
candidate (:class:`FlaxProgram`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax import layers

Array = jax.Array
FLOAT = 0            # bw entry meaning "not quantized" (counted as 32 bits)
FLOAT_COST_BITS = 32
MIN_BITS, MAX_BITS = 2, 16
SEARCHES = ("sequential", "independent", "uniform8")


# ------------------------------------------------------------ quantizer ---

def pow2(n: Array) -> Array:
  """Exact float32 ``2^n`` for integer ``n`` in [-126, 127] (exponent bits)."""
  n = jnp.clip(jnp.asarray(n, jnp.int32), -126, 127)
  return jax.lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def fixed_point(x: Array, bw: Array, f: Array) -> Array:
  """``clip(round_half_even(x · 2^F), -(2^(BW-1)-1), 2^(BW-1)-1) / 2^F``.

  ``bw`` and ``f`` may be traced int32 scalars; ``bw <= 0`` returns ``x``
  unchanged (the site stays in float).  The grid is symmetric (no
  ``-2^(BW-1)`` code), as in the authors' code.
  """
  x = jnp.asarray(x, jnp.float32)
  bw = jnp.asarray(bw, jnp.int32)
  f = jnp.asarray(f, jnp.int32)
  top = pow2(jnp.maximum(bw, 1) - 1) - 1.0
  q = jnp.clip(jnp.round(x * pow2(f)), -top, top)
  return jnp.where(bw > 0, q * pow2(-f), x)


def codes(x: Array, bw: int, f: int) -> np.ndarray:
  """The integer codes ``k`` of :func:`fixed_point` (value ``k · 2^-F``)."""
  check_format(bw, f)
  return np.asarray(jnp.round(fixed_point(x, bw, f) * pow2(f))).astype(
      np.int64)


def encode_format(bw: Array, f: Array) -> Array:
  """``(BW, F)`` as one exact float32 ``256 BW + F + 128`` (``F`` in
  [-64, 64]): a format riding in a scalar slot such as the PDE-GCN's
  per-layer ``alpha`` (grid ``"fixed_point"``)."""
  return (256 * jnp.asarray(bw, jnp.int32) + jnp.asarray(f, jnp.int32)
          + 128).astype(jnp.float32)


def decode_format(code: Array) -> Tuple[Array, Array]:
  """Inverse of :func:`encode_format`: ``(bw, f)`` int32."""
  code = jnp.round(jnp.asarray(code)).astype(jnp.int32)
  bw = code // 256
  return bw, code - 256 * bw - 128


def check_format(bw: Any, f: Any, name: str = "format") -> None:
  """``ValueError`` unless ``bw`` in [2, 32] and ``f`` an int in [-64, 64]."""
  if isinstance(bw, bool) or not isinstance(bw, (int, np.integer)) or \
      not 2 <= bw <= 32:
    raise ValueError(f"{name}: bit width BW must be an integer in [2, 32], "
                     f"got {bw!r}")
  if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or \
      not -64 <= f <= 64:
    raise ValueError(f"{name}: fractional length F must be an integer in "
                     f"[-64, 64], got {f!r}")


def ceil_log2(value: float) -> int:
  """Exact ``ceil(log2(value))`` for ``value > 0`` (via ``frexp``)."""
  mantissa, exponent = math.frexp(float(value))  # value = m · 2^e, m in [.5, 1)
  return exponent - 1 if mantissa == 0.5 else exponent


def init_frac(max_abs: float, bw: int) -> int:
  """``F = BW - 1 - ceil(log2 max|x|)`` (``BW - 1`` for an all-zero tensor)."""
  check_format(bw, 0)
  max_abs = float(max_abs)
  if not math.isfinite(max_abs) or max_abs < 0:
    raise ValueError(f"max_abs must be finite and >= 0, got {max_abs}")
  if max_abs == 0.0:
    return bw - 1
  return int(np.clip(bw - 1 - ceil_log2(max_abs), -64, 64))


def tensor_format(x: Any, bw: int) -> Tuple[int, int]:
  """The initial format ``(BW, F)`` of a tensor at ``bw`` bits."""
  return bw, init_frac(float(np.max(np.abs(np.asarray(x)))), bw)


def round_half_even_shift(acc: np.ndarray, shift: int) -> np.ndarray:
  """``round_half_even(acc / 2^shift)`` in integer arithmetic (``shift >= 0``:
  an arithmetic right shift with round-half-even; ``< 0``: a left shift)."""
  acc = np.asarray(acc, np.int64)
  if shift <= 0:
    return acc << (-shift)
  floor = acc >> shift                       # floor division (arithmetic)
  rest = acc - (floor << shift)              # in [0, 2^shift)
  half = 1 << (shift - 1)
  up = (rest > half) | ((rest == half) & (floor & 1 == 1))
  return floor + up.astype(np.int64)


def requantize(acc: np.ndarray, f_acc: int, bw_out: int, f_out: int
               ) -> np.ndarray:
  """Integer accumulator with ``f_acc`` fractional bits -> codes of the
  ``(bw_out, f_out)`` format: a rounding shift by ``f_acc - f_out`` and a
  clip (no float anywhere)."""
  check_format(bw_out, f_out, "output format")
  top = (1 << (bw_out - 1)) - 1
  return np.clip(round_half_even_shift(acc, f_acc - f_out), -top, top)


def integer_dense(x_codes: np.ndarray, w_codes: np.ndarray, f_x: int,
                  f_w: int, bw_out: int, f_out: int) -> np.ndarray:
  """A fixed-point dense layer on integers: int64 accumulation of the codes,
  then :func:`requantize` (the product has ``f_x + f_w`` fractional bits)."""
  acc = np.asarray(x_codes, np.int64) @ np.asarray(w_codes, np.int64)
  return requantize(acc, f_x + f_w, bw_out, f_out)


# ------------------------------------------------------------ cost model ---

@dataclasses.dataclass(frozen=True)
class Site:
  """A quantization point: a weight tensor or an activation tensor.

  ``size``: elements (per example for activations); ``max_abs``: the
  calibrated peak (weights: the tensor's; activations: over the calibration
  split).
  """
  name: str
  kind: str            # "weight", "bias" or "act"
  size: int
  max_abs: float = 0.0


@dataclasses.dataclass(frozen=True)
class Product:
  """A multiplying operation: weight site x activation site, ``macs`` per
  example."""
  weight: str
  act: str
  macs: int


def _bits(bw: Any) -> np.ndarray:
  bw = np.asarray(bw, np.int64)
  return np.where(bw > 0, bw, FLOAT_COST_BITS)


def memory_kib(sites: Sequence[Site], bw: Sequence[int]) -> float:
  """Parameter memory ``Σ BW · n`` over the weight (and bias) sites, in
  KiB."""
  b = _bits(bw)
  return float(sum(int(b[i]) * s.size for i, s in enumerate(sites)
                   if s.kind in ("weight", "bias"))) / 8 / 1024


def activation_kib(sites: Sequence[Site], bw: Sequence[int]) -> float:
  """``Σ BW · n`` over the activation sites (per example), in KiB."""
  b = _bits(bw)
  return float(sum(int(b[i]) * s.size for i, s in enumerate(sites)
                   if s.kind == "act")) / 8 / 1024


def mult_cost(sites: Sequence[Site], products: Sequence[Product],
              bw: Sequence[int]) -> int:
  """``Σ BW_w · BW_a · MACs`` (bit-products per example)."""
  index = {s.name: i for i, s in enumerate(sites)}
  b = _bits(bw)
  return int(sum(int(b[index[p.weight]]) * int(b[index[p.act]]) * p.macs
                 for p in products))


# --------------------------------------------------------------- search ---

@dataclasses.dataclass
class Problem:
  """What a search needs: the sites (network order), the multiplying
  products, and ``evaluate(bw, f) -> accuracy in %`` on the selection split
  (validation)."""
  sites: List[Site]
  products: List[Product]
  evaluate: Callable[..., float]
  # evaluate(bw, f, at_least=a) may stop early and return any value < a once
  # the accuracy is certain to be below a (a rejected candidate)
  early_exit: bool = False

  def __post_init__(self):
    names = [s.name for s in self.sites]
    if len(set(names)) != len(names):
      raise ValueError(f"site names must be unique, got {names}")
    known = set(names)
    for p in self.products:
      if p.weight not in known or p.act not in known:
        raise ValueError(f"product {p} names an unknown site")


@dataclasses.dataclass
class Result:
  search: str
  bw: np.ndarray
  f: np.ndarray
  float_acc: float
  acc: float
  evaluations: int
  seconds: float
  trace: List[Dict[str, Any]]

  @property
  def drop(self) -> float:
    return self.float_acc - self.acc


def check_budget(budget: Any) -> float:
  try:
    value = float(budget)
  except (TypeError, ValueError):
    value = float("nan")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"budget (allowed accuracy drop, % points) must be > 0, "
                     f"got {budget!r}")
  return value


def _check_bit_range(min_bits: int, max_bits: int) -> None:
  if not (isinstance(min_bits, (int, np.integer)) and
          isinstance(max_bits, (int, np.integer)) and
          2 <= min_bits <= max_bits <= 31):
    raise ValueError(f"need 2 <= min_bits <= max_bits <= 31, got "
                     f"min_bits={min_bits!r}, max_bits={max_bits!r}")


class _Counter:
  def __init__(self, problem: Problem):
    self.problem, self.calls = problem, 0

  def __call__(self, bw, f, at_least: Optional[float] = None) -> float:
    self.calls += 1
    args = (np.asarray(bw, np.int32), np.asarray(f, np.int32))
    if at_least is not None and self.problem.early_exit:
      return float(self.problem.evaluate(*args, at_least=at_least))
    return float(self.problem.evaluate(*args))


def _search_site(ok: Callable[[int, int], bool], max_abs: float,
                 min_bits: int, max_bits: int) -> Optional[Tuple[int, int]]:
  """One site: the smallest accepted format, or None (stays float).

  1. ``(BW, F)`` lowered together (``F = init_frac(max, BW)``: the range
     kept, precision removed), binary search over ``BW``;
  2. ``BW`` alone (``F`` kept: the range clipped), binary search;
  3. local search: ``(BW - 1, F ± 1)`` while one is accepted.
  Binary search assumes accuracy is monotone in the bits (the paper steps
  one bit at a time); only formats that were evaluated and accepted are
  returned.
  """
  frac = lambda b: init_frac(max_abs, b)
  lo, hi = min_bits, max_bits            # hi: accepted, or not yet tried
  while lo < hi:
    mid = (lo + hi) // 2
    if ok(mid, frac(mid)):
      hi = mid
    else:
      lo = mid + 1
  if hi == max_bits and not ok(max_bits, frac(max_bits)):
    return None
  bw, f = hi, frac(hi)
  lo, hi = min_bits, bw                  # stage 2: F fixed
  while lo < hi:
    mid = (lo + hi) // 2
    if ok(mid, f):
      hi = mid
    else:
      lo = mid + 1
  bw = hi
  improved = True
  while improved and bw > min_bits:      # stage 3
    improved = False
    for df in (-1, 1):
      if ok(bw - 1, f + df):
        bw, f, improved = bw - 1, f + df, True
        break
  return bw, f


def sequential_search(problem: Problem, budget: float, *,
                      min_bits: int = MIN_BITS, max_bits: int = MAX_BITS,
                      float_acc: Optional[float] = None) -> Result:
  """Dependent search: sites in network order, each searched with every
  site fixed before it quantized.  Site ``i`` (of ``n``) is accepted only if
  the validation drop stays within ``budget · (i + 1) / n``, so the final
  drop is within ``budget`` (it is the last accepted evaluation)."""
  budget = check_budget(budget)
  _check_bit_range(min_bits, max_bits)
  start, evaluate, n = time.perf_counter(), _Counter(problem), len(problem.sites)
  bw, f = np.zeros(n, np.int32), np.zeros(n, np.int32)
  base = evaluate(bw, f) if float_acc is None else float(float_acc)
  trace = []
  acc = base
  for i, site in enumerate(problem.sites):
    allowed = budget * (i + 1) / n
    seen = {}

    def ok(b, fr, i=i, allowed=allowed, seen=seen):
      trial_bw, trial_f = bw.copy(), f.copy()
      trial_bw[i], trial_f[i] = b, fr
      seen[(b, fr)] = evaluate(trial_bw, trial_f,
                               at_least=base - allowed - 1e-9)
      return base - seen[(b, fr)] <= allowed + 1e-9

    chosen = _search_site(ok, site.max_abs, min_bits, max_bits)
    if chosen is not None:
      bw[i], f[i] = chosen
      acc = seen[chosen]
    trace.append({"site": site.name, "bw": int(bw[i]), "f": int(f[i]),
                  "val_acc": acc, "allowed_drop": allowed})
  return Result("sequential", bw, f, base, acc, evaluate.calls,
                time.perf_counter() - start, trace)


def independent_search(problem: Problem, budget: float, *,
                       min_bits: int = MIN_BITS, max_bits: int = MAX_BITS,
                       float_acc: Optional[float] = None) -> Result:
  """The paper's negative baseline: every site searched alone (all others
  float), each allowed the whole ``budget``; the formats are then combined
  and evaluated together (the combination may exceed the budget)."""
  budget = check_budget(budget)
  _check_bit_range(min_bits, max_bits)
  start, evaluate, n = time.perf_counter(), _Counter(problem), len(problem.sites)
  zeros = np.zeros(n, np.int32)
  base = evaluate(zeros, zeros) if float_acc is None else float(float_acc)
  bw, f = np.zeros(n, np.int32), np.zeros(n, np.int32)
  trace = []
  for i, site in enumerate(problem.sites):
    def ok(b, fr, i=i):
      trial_bw, trial_f = zeros.copy(), zeros.copy()
      trial_bw[i], trial_f[i] = b, fr
      return base - evaluate(trial_bw, trial_f,
                             at_least=base - budget - 1e-9) <= budget + 1e-9

    chosen = _search_site(ok, site.max_abs, min_bits, max_bits)
    if chosen is not None:
      bw[i], f[i] = chosen
    trace.append({"site": site.name, "bw": int(bw[i]), "f": int(f[i])})
  acc = evaluate(bw, f)
  return Result("independent", bw, f, base, acc, evaluate.calls,
                time.perf_counter() - start, trace)


def uniform_formats(sites: Sequence[Site], bits: int = 8
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Every site at ``bits`` with its initial ``F`` (the all-8-bit tools)."""
  bw = np.full(len(sites), bits, np.int32)
  f = np.array([init_frac(s.max_abs, bits) for s in sites], np.int32)
  return bw, f


def uniform_search(problem: Problem, bits: int = 8, *,
                   float_acc: Optional[float] = None) -> Result:
  start, evaluate = time.perf_counter(), _Counter(problem)
  n = len(problem.sites)
  zeros = np.zeros(n, np.int32)
  base = evaluate(zeros, zeros) if float_acc is None else float(float_acc)
  bw, f = uniform_formats(problem.sites, bits)
  acc = evaluate(bw, f)
  return Result(f"uniform{bits}", bw, f, base, acc, evaluate.calls,
                time.perf_counter() - start, [])


def search(problem: Problem, kind: str, budget: float, **kwargs) -> Result:
  """``kind`` one of :data:`SEARCHES`."""
  if kind not in SEARCHES:
    raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got "
                     f"{kind!r}")
  if kind == "sequential":
    return sequential_search(problem, budget, **kwargs)
  if kind == "independent":
    return independent_search(problem, budget, **kwargs)
  check_budget(budget)
  return uniform_search(problem, 8, float_acc=kwargs.get("float_acc"))


def summary(problem: Problem, result: Result) -> Dict[str, Any]:
  """Accuracy and cost of a result against all-8-bit (same sites)."""
  bw8, _ = uniform_formats(problem.sites, 8)
  mem, mem8 = memory_kib(problem.sites, result.bw), memory_kib(
      problem.sites, bw8)
  mult, mult8 = mult_cost(problem.sites, problem.products, result.bw), \
      mult_cost(problem.sites, problem.products, bw8)
  return {"search": result.search, "float_val_acc": result.float_acc,
          "val_acc": result.acc, "val_drop": result.drop,
          "memory_kib": mem, "memory_kib_8bit": mem8,
          "memory_vs_8bit": mem / mem8 - 1.0 if mem8 else float("nan"),
          "mult_cost": mult, "mult_cost_8bit": mult8,
          "mult_vs_8bit": mult / mult8 - 1.0 if mult8 else float("nan"),
          "activation_kib": activation_kib(problem.sites, result.bw),
          "evaluations": result.evaluations, "search_seconds": result.seconds}


def formats_dict(sites: Sequence[Site], bw: Sequence[int],
                 f: Sequence[int]) -> List[Dict[str, Any]]:
  return [{"site": s.name, "kind": s.kind, "size": s.size,
           "max_abs": s.max_abs, "bw": int(b), "f": int(fr)}
          for s, b, fr in zip(sites, bw, f)]


# --------------------------------------------------- Flax networks (CNNs) ---

_MULTIPLYING = (layers.QuantConv, layers.QuantDense)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


class FlaxProgram:
  """A Flax classifier with fixed-point formats applied by interception.

  Quantization sites, found by one discovery pass (model code untouched):

  * weights: the output of every :class:`layers.WeightQuant` (also present,
    disabled, in a float model): ``<layer>/wq``;
  * activations: the output of every :class:`layers.ActQuant` (the points
    where the QAT networks quantize), plus the input of every
    :class:`layers.QuantConv` / :class:`layers.QuantDense` whose input is
    not such an output (the float stem's image, the classifier's pooled
    features): ``<layer>/in``.  So every multiplication has fixed-point
    operands.

  * biases (only with ``biases=True``, the paper quantizes them too): the
    ``bias`` parameter of every QuantConv/QuantDense that has one,
    ``<layer>/bias``, quantized in the parameter tree before the call
    (calibrated from the tensor, as the weights).

  Products (cost model): a QuantConv/QuantDense multiplies its kernel with
  its input's site; a bare kernel (the stable block's ``K``, used as ``K x``
  and ``Kᵀ y``) is counted as a 3x3-type convolution on each activation
  quantized in the same module.  BatchNorm, residual additions and (unless
  ``biases``) biases stay in float (BatchNorm is not folded into the
  kernels).
  """

  def __init__(self, model: nn.Module, variables: Any, example: np.ndarray,
               *, biases: bool = False, **apply_kwargs):
    self.model, self.apply_kwargs = model, apply_kwargs
    self.biases = bool(biases)
    self._discover(variables, jnp.asarray(example[:2]))
    self.index = {s.name: i for i, s in enumerate(self.sites)}
    # bias site -> its path in variables["params"]
    self.bias_paths = {s.name: tuple(s.name.split("/")) for s in self.sites
                       if s.kind == "bias"}

  def _discover(self, variables, x):
    sites: List[Tuple[str, str, int, Tuple[int, ...]]] = []
    act_ids: Dict[int, Tuple[str, Any]] = {}  # the array kept alive: ids
    # of freed arrays are reused
    products: List[Product] = []
    input_sites: List[str] = []
    consumed, act_parent = set(), []
    batch = x.shape[0]

    def icpt(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = _path(module)
      if any(name.startswith("scan") or "_blocks" in name
             for name in module.path):
        raise ValueError(f"PTQ needs the unrolled model layout, got the "
                         f"scanned module {path!r}: set "
                         "config.model.scan_blocks=False")
      if isinstance(module, layers.WeightQuant):
        out = next_fun(*args, **kwargs)
        sites.append((path, "weight", int(np.prod(out.shape)), out.shape))
        return out
      if isinstance(module, layers.ActQuant):
        out = next_fun(*args, **kwargs)
        sites.append((path, "act", int(np.prod(out.shape)) // batch,
                      out.shape))
        act_ids[id(out)] = (path, out)
        act_parent.append(path)
        return out
      if isinstance(module, _MULTIPLYING):
        inp = args[0]
        act = act_ids.get(id(inp), (None, None))[0]
        if act is None:
          act = f"{path}/in"
          sites.append((act, "act", int(np.prod(inp.shape)) // batch,
                        inp.shape))
          input_sites.append(path)
        out = next_fun(*args, **kwargs)
        if self.biases and getattr(module, "use_bias", False):
          sites.append((f"{path}/bias", "bias", int(out.shape[-1]),
                        (int(out.shape[-1]),)))
        wq = f"{path}/wq"
        consumed.add(wq)
        kernel = [s for s in sites if s[0] == wq][-1][3]
        if isinstance(module, layers.QuantConv):
          macs = int(np.prod(out.shape[1:])) * int(np.prod(kernel[:-1]))
        else:
          macs = int(np.prod(out.shape[1:])) * int(kernel[0])
        products.append(Product(wq, act, macs))
        return out
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      self.model.apply(variables, x, **self.apply_kwargs)
    shapes = {name: shape for name, _, _, shape in sites}
    for name, kind, _, shape in sites:
      if kind != "weight" or name in consumed:
        continue
      parent = name.rsplit("/", 1)[0]
      kh, kw, cin, cout = shape
      for act in act_parent:
        if act.rsplit("/", 1)[0] == parent:
          pixels = int(np.prod(shapes[act][1:-1]))
          products.append(Product(name, act, pixels * kh * kw * cin * cout))
    self.input_sites = frozenset(input_sites)
    self._raw_sites = [(n, k, s) for n, k, s, _ in sites]
    self.products = products
    self.sites = [Site(n, k, s) for n, k, s in self._raw_sites]

  def _bias_tensors(self, variables) -> Dict[str, Array]:
    flat = traverse_util.flatten_dict(variables["params"])
    return {name: flat[path] for name, path in self.bias_paths.items()}

  def _with_biases(self, variables, bw: Array, f: Array):
    """``variables`` with every bias site quantized (new dicts; the arrays
    of the other parameters are shared)."""
    if not self.bias_paths:
      return variables
    flat = traverse_util.flatten_dict(variables["params"])
    for name, path in self.bias_paths.items():
      i = self.index[name]
      flat[path] = fixed_point(flat[path], bw[i], f[i])
    return {**variables, "params": traverse_util.unflatten_dict(flat)}

  def apply(self, variables, x, bw: Array, f: Array) -> Array:
    """Logits with every site at ``(bw[i], f[i])`` (traceable; jit it)."""
    index, inputs = self.index, self.input_sites
    variables = self._with_biases(variables, bw, f)

    def icpt(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = _path(module)
      if isinstance(module, (layers.WeightQuant, layers.ActQuant)):
        i = index[path]
        return fixed_point(next_fun(*args, **kwargs), bw[i], f[i])
      if isinstance(module, _MULTIPLYING) and path in inputs:
        i = index[f"{path}/in"]
        args = (fixed_point(args[0], bw[i], f[i]),) + tuple(args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      return self.model.apply(variables, x, **self.apply_kwargs)

  def peaks(self, variables, x) -> Array:
    """Per-site ``max|value|`` on a batch (traceable)."""
    found: Dict[str, Array] = {}
    inputs = self.input_sites

    def icpt(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = _path(module)
      if isinstance(module, _MULTIPLYING) and path in inputs:
        found[f"{path}/in"] = jnp.max(jnp.abs(args[0]))
      out = next_fun(*args, **kwargs)
      if isinstance(module, (layers.WeightQuant, layers.ActQuant)):
        found[path] = jnp.max(jnp.abs(out))
      return out

    with nn.intercept_methods(icpt):
      self.model.apply(variables, x, **self.apply_kwargs)
    for name, b in self._bias_tensors(variables).items():
      found[name] = jnp.max(jnp.abs(b))
    return jnp.stack([found[s.name] for s in self.sites])

  def calibrate(self, variables, batches) -> None:
    """Sets every site's ``max_abs``: activations over ``batches`` (the
    calibration split, never the test set), weights from the tensors."""
    peaks = jax.jit(self.peaks)
    top = None
    for images in batches:
      p = np.asarray(peaks(variables, jnp.asarray(images)))
      top = p if top is None else np.maximum(top, p)
    if top is None:
      raise ValueError("calibration needs at least one batch")
    self.sites = [dataclasses.replace(s, max_abs=float(m))
                  for s, m in zip(self.sites, top)]

  def accuracy_fn(self, variables, batches
                  ) -> Callable[[np.ndarray, np.ndarray], float]:
    """``evaluate(bw, f) -> accuracy %`` over fixed ``batches`` of ``(images,
    labels, mask)``; one jitted function, formats as runtime arrays."""
    data = [tuple(jnp.asarray(a) for a in b) for b in batches]
    total = float(sum(float(np.sum(b[2])) for b in data))
    if not total:
      raise ValueError("the evaluation split is empty")

    @jax.jit
    def correct(variables, images, labels, mask, bw, f):
      logits = self.apply(variables, images, bw, f)
      return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)

    self.correct_fn = correct

    def evaluate(bw, f, at_least: Optional[float] = None):
      """Accuracy in %; with ``at_least``, stops as soon as it cannot be
      reached (then returns a value below it)."""
      bw, f = jnp.asarray(bw, jnp.int32), jnp.asarray(f, jnp.int32)
      hits, left = 0.0, total
      for b in data:
        hits += float(correct(variables, *b, bw, f))
        left -= float(np.sum(b[2]))
        if at_least is not None and 100.0 * (hits + left) / total < at_least:
          return 100.0 * (hits + left) / total
      return 100.0 * hits / total
    return evaluate


# ------------------------------------------------------------- PDE-GCN ---

class GCNProgram:
  """A PDE-GCN (:class:`pdeq_jax.models.pde_gcn.PDEGCN`) with fixed-point
  formats.

  Its diffusion layers are pure functions under ``lax.scan``, so formats
  enter as data: the weights (opening kernel, every ``K_j`` (and ``K₂_j``),
  closing kernel) are quantized in the parameter tree, per layer; the
  activations (every layer's input state and its tanh output) go through the
  model's own quantizer slots, whose ``alpha`` holds the per-layer ``(BW,
  F)`` when the grid is ``"fixed_point"``; the opening layer's input (the
  features) and the closing layer's input (the last state) are quantized by
  interception of the ``open`` / ``close`` modules.

  ``model`` must be created with ``quantize_activations=True,
  quantize_weights=False, grid="fixed_point"``.  Products: ``open`` (one
  multiplication per stored feature value and output channel), ``K x`` and
  ``Kᵀ e`` / ``K₂ e`` (``N C²`` each, the latter paired with the tanh
  format), ``close``.  The graph weights of ``S`` stay in float.
  """

  def __init__(self, model: nn.Module, params: Any, features: Any, graph: Any,
               num_classes: int):
    if model.grid != "fixed_point" or not model.quantize_activations or \
        model.quantize_weights:
      raise ValueError("GCNProgram needs a PDEGCN created with grid="
                       "'fixed_point', quantize_activations=True, "
                       "quantize_weights=False")
    self.model, self.features, self.graph = model, features, graph
    depth, width = params["kernel"].shape[:2]
    nodes = graph.num_nodes
    edges = int(graph.senders.shape[0])
    sparse = hasattr(features, "values")
    n_in = int(features.values.shape[0]) if sparse else int(
        np.prod(features.shape))
    macs_open = n_in * width
    sites = [Site("open/in", "act", n_in),
             Site("open/kernel", "weight", int(np.prod(
                 params["open"]["kernel"].shape)))]
    products = [Product("open/kernel", "open/in", macs_open)]
    self.idx = {"state": [], "K": [], "tanh": [], "K2": []}
    symmetric = params.get("kernel_out") is None
    for j in range(depth):
      names = {"state": (f"layer{j + 1}/state", "act", nodes * width),
               "K": (f"layer{j + 1}/K", "weight", width * width),
               "tanh": (f"layer{j + 1}/tanh", "act", edges * width)}
      if not symmetric:
        names["K2"] = (f"layer{j + 1}/K2", "weight", width * width)
      for key, (name, kind, size) in names.items():
        self.idx[key].append(len(sites))
        sites.append(Site(name, kind, size))
      mac = nodes * width * width
      products.append(Product(f"layer{j + 1}/K", f"layer{j + 1}/state", mac))
      products.append(Product(f"layer{j + 1}/K" if symmetric else
                              f"layer{j + 1}/K2", f"layer{j + 1}/tanh", mac))
    sites += [Site("close/in", "act", nodes * width),
              Site("close/kernel", "weight", width * num_classes)]
    products.append(Product("close/kernel", "close/in",
                            nodes * width * num_classes))
    self.idx = {k: np.asarray(v, np.int32) for k, v in self.idx.items()}
    self.symmetric = symmetric
    self.sites, self.products = sites, products
    self.index = {s.name: i for i, s in enumerate(sites)}

  def _params(self, params, bw, f):
    i = self.index
    q = lambda w, k: fixed_point(w, bw[k], f[k])
    per_layer = lambda w, k: fixed_point(w, bw[k][:, None, None],
                                         f[k][:, None, None])
    pair = lambda k: encode_format(bw[k], f[k])
    p = dict(params)
    p["open"] = {"kernel": q(params["open"]["kernel"], i["open/kernel"])}
    p["close"] = {"kernel": q(params["close"]["kernel"], i["close/kernel"])}
    p["kernel"] = per_layer(params["kernel"], self.idx["K"])
    if not self.symmetric:
      p["kernel_out"] = per_layer(params["kernel_out"], self.idx["K2"])
    p["alpha_state"] = pair(self.idx["state"])
    p["alpha_act"] = pair(self.idx["tanh"])
    return p

  def _run(self, params, bw, f, seen=None, return_hidden=False):
    i = self.index

    def quantize_input(x, k):
      if seen is not None:
        values = x.values if hasattr(x, "values") else x
        seen[k] = values
      if hasattr(x, "values"):
        return x.replace(values=fixed_point(x.values, bw[i[k]], f[i[k]]))
      return fixed_point(x, bw[i[k]], f[i[k]])

    def icpt(next_fun, args, kwargs, context):
      name = context.module.name
      if context.method_name == "__call__" and name in ("open", "close"):
        args = (quantize_input(args[0], f"{name}/in"),) + tuple(args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      return self.model.apply({"params": self._params(params, bw, f)},
                              self.features, self.graph,
                              layers.FLOAT_BITS, return_hidden=return_hidden)

  def apply(self, params, bw, f) -> Array:
    """Log-probabilities [N, classes] at formats ``(bw, f)`` (traceable)."""
    return self._run(params, bw, f)

  def calibrate(self, params, nodes: np.ndarray) -> None:
    """Peaks of the float network on the calibration ``nodes`` (their rows
    of every state, and the edges touching them for the tanh outputs)."""
    nodes = np.asarray(nodes)
    if nodes.size == 0:
      raise ValueError("calibration needs at least one node")
    zeros = jnp.zeros(len(self.sites), jnp.int32)
    seen: Dict[str, Array] = {}
    _, hidden = self._run(params, zeros, zeros, seen, return_hidden=True)
    mask = np.zeros(self.graph.num_nodes, bool)
    mask[nodes] = True
    senders = np.asarray(self.graph.senders)
    receivers = np.asarray(self.graph.receivers)
    edge_mask = jnp.asarray(mask[senders] | mask[receivers])
    rows = jnp.asarray(nodes)
    peak = {}
    features = self.features
    if hasattr(features, "values"):
      keep = mask[np.asarray(features.rows)]
      peak["open/in"] = float(jnp.max(jnp.abs(features.values[keep])))
    else:
      peak["open/in"] = float(jnp.max(jnp.abs(features[rows])))
    peak["open/kernel"] = float(jnp.max(jnp.abs(params["open"]["kernel"])))
    peak["close/kernel"] = float(jnp.max(jnp.abs(params["close"]["kernel"])))
    peak["close/in"] = float(jnp.max(jnp.abs(seen["close/in"][rows])))
    for j in range(params["kernel"].shape[0]):
      kernel = params["kernel"][j]
      tanh = jnp.tanh(self.graph.gradient(hidden[j] @ kernel))
      peak[f"layer{j + 1}/state"] = float(jnp.max(jnp.abs(hidden[j][rows])))
      peak[f"layer{j + 1}/tanh"] = float(jnp.max(jnp.where(
          edge_mask[:, None], jnp.abs(tanh), 0.0)))
      peak[f"layer{j + 1}/K"] = float(jnp.max(jnp.abs(kernel)))
      if not self.symmetric:
        peak[f"layer{j + 1}/K2"] = float(jnp.max(jnp.abs(
            params["kernel_out"][j])))
    self.sites = [dataclasses.replace(s, max_abs=peak[s.name])
                  for s in self.sites]

  def accuracy_fn(self, params, labels, nodes
                  ) -> Callable[[np.ndarray, np.ndarray], float]:
    """``evaluate(bw, f) -> accuracy %`` on ``nodes`` (one compilation)."""
    nodes = jnp.asarray(nodes)
    if nodes.size == 0:
      raise ValueError("the evaluation node set is empty")
    labels = jnp.asarray(labels)

    @jax.jit
    def correct(params, bw, f):
      logits = self.apply(params, bw, f)
      return jnp.mean(jnp.argmax(logits[nodes], -1) == labels[nodes])

    self.correct_fn = correct
    return lambda bw, f: 100.0 * float(correct(
        params, jnp.asarray(bw, jnp.int32), jnp.asarray(f, jnp.int32)))
