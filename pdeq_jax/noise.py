"""Gaussian noise at the weights, the activations and the MAC outputs.

The noise model of FQ-Conv (``../shared/seeds/003_*``, analog accelerators
whose multiply-accumulate units are noisy), as pure functions plus an
injection mechanism that needs no change to the models:

* ``weights``: every layer's *applied* weight tensor (the output of
  :class:`pdeq_jax.layers.WeightQuant`: the standardised, quantized kernel,
  or the float kernel where the layer is not quantized, e.g. the stem and
  the classifier) gets ``w + sigma * max|w| * n``: sigma is relative to
  the layer's largest applied weight magnitude (for a quantized layer whose
  weights reach the clipping scale that is alpha_w, i.e. ``(2^{b-1} - 1)``
  quantization steps).
* ``activations``: the output of every activation quantizer
  (:class:`pdeq_jax.layers.ActQuant`) gets ``x + sigma * alpha * n``
  (alpha: that quantizer's learned clipping scale).  A float network has no
  quantizers and no alpha: this site then perturbs nothing (the CLI and
  the trainers refuse it).
* ``mac``: every convolution / dense output before its BatchNorm gets
  ``y + sigma * max|y| * n`` with the maximum over the whole output tensor
  (the batch included).  In the CNNs of this project every convolution
  (``QuantConv``, and the symmetric ``K`` and its adjoint ``Kᵀ`` of the
  stable blocks) feeds a BatchNorm, so the MAC site is "the input of every
  ``nn.BatchNorm``" plus "the output of every Dense layer" (``QuantDense``,
  ``nn.Dense``, the GCN's ``SparseDense``: no BatchNorm follows them).  The
  clean form of the stable blocks (no BatchNorm) gets no MAC noise on ``K``.

``n`` is standard normal, drawn independently per element, per site, per
layer and per call from the noise's own PRNG stream: the key of a site is
``fold_in(fold_in(key, crc32(tag)), layer)`` with ``tag`` the module path
and site (stable across processes) and ``layer`` the index of a scanned
layer (PDE-GCN).  Scales are ``stop_gradient``-ed, so in noise-aware
training the noise is an additive perturbation the gradient passes through.

sigma and the key are *runtime values*: the per-site sigmas are a
:class:`Sigmas` pytree of float32 scalars, so one compiled function serves
every sigma.  ``sigma = 0`` returns the input itself (a ``where``, bit for
bit, signed zeros included).  Which sites exist at all is static structure
(``sites``): a site left out adds no operation.

Flax models are perturbed through ``flax.linen.intercept_methods``
(:func:`inject`); code that is not made of modules (the PDE-GCN's scanned
diffusion layers) calls :func:`tap` at its sites, which is the identity
unless an :func:`inject` context is active.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SITES = ("weights", "activations", "mac")


class Sigmas(NamedTuple):
  """Relative noise std per site (float32 scalars; a pytree, jit-safe)."""
  weights: Any = 0.0
  activations: Any = 0.0
  mac: Any = 0.0

  @classmethod
  def make(cls, **sigmas: float) -> "Sigmas":
    """Validated float32 arrays; unnamed sites get 0."""
    for site, value in sigmas.items():
      check_site(site)
      check_sigma(value, f"sigma[{site!r}]")
    return cls(**{s: jnp.asarray(sigmas.get(s, 0.0), jnp.float32)
                  for s in SITES})


def check_site(site: str, field: str = "site") -> str:
  if site not in SITES:
    raise ValueError(f"unknown noise site {site!r} ({field}; allowed: "
                     f"{', '.join(SITES)})")
  return site


def check_sites(sites: Iterable[str], field: str = "sites") -> Tuple[str, ...]:
  """A non-empty tuple of distinct known sites (a comma string also works)."""
  if isinstance(sites, str):
    sites = [s.strip() for s in sites.split(",") if s.strip()]
  sites = tuple(sites)
  if not sites:
    raise ValueError(f"{field} is empty (allowed: a comma list of "
                     f"{', '.join(SITES)})")
  for s in sites:
    check_site(s, field)
  if len(set(sites)) != len(sites):
    raise ValueError(f"{field} names a site twice: {sites}")
  return sites


def check_sigma(value: Any, field: str = "sigma") -> None:
  """A concrete sigma must be a finite number >= 0."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{field} must be a number >= 0, got {value!r}") from None
  if np.ndim(value) != 0 or not math.isfinite(v) or v < 0:
    raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")


def parse_sigmas(text: Any, field: str = "--sigmas") -> Tuple[float, ...]:
  """``"0,0.01,0.05"`` (or a sequence) -> sorted distinct floats >= 0."""
  items = text.split(",") if isinstance(text, str) else list(text)
  values = []
  for item in items:
    item = item.strip() if isinstance(item, str) else item
    if item == "":
      raise ValueError(f"{field}: empty entry in {text!r} (allowed: a comma "
                       "list of finite numbers >= 0, e.g. 0,0.01,0.05)")
    try:
      v = float(item)
    except (TypeError, ValueError):
      raise ValueError(f"{field}: {item!r} is not a number (allowed: a comma "
                       "list of finite numbers >= 0, e.g. 0,0.01,0.05)"
                       ) from None
    if not math.isfinite(v) or v < 0:
      raise ValueError(f"{field}: {item!r} is not a finite number >= 0")
    values.append(v)
  if not values:
    raise ValueError(f"{field} is empty (allowed: a comma list of finite "
                     "numbers >= 0, e.g. 0,0.01,0.05)")
  if len(set(values)) != len(values):
    raise ValueError(f"{field}: repeated value in {text!r}")
  return tuple(sorted(values))


# --------------------------------------------------------- pure functions ---

def perturb(x: Array, sigma: Any, scale: Any, key: Array) -> Array:
  """``x + sigma * scale * n``, ``n ~ N(0, 1)`` of ``x``'s shape.

  ``sigma == 0`` returns ``x`` exactly (signed zeros included).  ``scale``
  (the reference magnitude) gets no gradient.
  """
  x = jnp.asarray(x)
  sigma = jnp.asarray(sigma, x.dtype)
  scale = jax.lax.stop_gradient(jnp.asarray(scale, x.dtype))
  n = jax.random.normal(key, x.shape, x.dtype)
  return jnp.where(sigma > 0, x + (sigma * scale) * n, x)


def max_abs(x: Array) -> Array:
  """``max|x|`` over the whole tensor (no gradient): the weight / MAC scale."""
  return jax.lax.stop_gradient(jnp.max(jnp.abs(x)))


def perturb_relative_to_max(x: Array, sigma: Any, key: Array) -> Array:
  """Weight and MAC noise: ``x + sigma * max|x| * n``."""
  return perturb(x, sigma, max_abs(x), key)


def site_key(key: Array, tag: str, layer: Optional[Any] = None) -> Array:
  """The key of one site: ``fold_in(key, crc32(tag))`` [then the layer]."""
  key = jax.random.fold_in(key, zlib.crc32(tag.encode()) & 0x7FFFFFFF)
  if layer is not None:
    key = jax.random.fold_in(key, jnp.asarray(layer, jnp.uint32))
  return key


# ---------------------------------------------------------------- inject ---

@dataclasses.dataclass
class _Active:
  sigmas: Sigmas
  key: Array
  sites: frozenset
  layer: Optional[Any] = None


_ACTIVE: contextvars.ContextVar[Optional[_Active]] = contextvars.ContextVar(
    "pdeq_noise", default=None)


def active() -> bool:
  """Whether an :func:`inject` context is active (at trace time)."""
  return _ACTIVE.get() is not None


def tap(site: str, x: Array, scale: Any, tag: str) -> Array:
  """Noise at a site of non-module code: identity outside :func:`inject`.

  ``scale`` is the reference magnitude (``alpha`` for activations; for the
  other sites pass :func:`max_abs` of ``x``); ``tag`` names the site within
  the model (distinct per call site).
  """
  state = _ACTIVE.get()
  if state is None or site not in state.sites:
    return x
  key = site_key(state.key, f"{tag}:{site}", state.layer)
  return perturb(x, getattr(state.sigmas, site), scale, key)


@contextlib.contextmanager
def layer_scope(index: Any) -> Iterator[None]:
  """Folds a (traced) layer index into the keys of the taps inside: the body
  of a scan over layers is traced once, the index tells its layers apart."""
  state = _ACTIVE.get()
  if state is None:
    yield
    return
  token = _ACTIVE.set(dataclasses.replace(state, layer=index))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def _is_sparse_dense(module: nn.Module) -> bool:
  return type(module).__name__ == "SparseDense"


def _interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                 context: Any) -> Any:
  from pdeq_jax import layers  # pylint: disable=import-outside-toplevel
  state = _ACTIVE.get()
  module = context.module
  if state is None or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  path = "/".join(str(p) for p in module.path)
  if isinstance(module, nn.BatchNorm) and "mac" in state.sites and args:
    y = args[0]
    key = site_key(state.key, f"{path}:mac", state.layer)
    y = perturb_relative_to_max(y, state.sigmas.mac, key)
    return next_fun(y, *args[1:], **kwargs)
  out = next_fun(*args, **kwargs)
  if isinstance(module, layers.WeightQuant) and "weights" in state.sites:
    key = site_key(state.key, f"{path}:weights", state.layer)
    return perturb_relative_to_max(out, state.sigmas.weights, key)
  if (isinstance(module, layers.ActQuant) and module.enabled
      and "activations" in state.sites):
    alpha = layers.positive_alpha(module.get_variable("params", "alpha"))
    key = site_key(state.key, f"{path}:activations", state.layer)
    return perturb(out, state.sigmas.activations, alpha, key)
  if (isinstance(module, (layers.QuantDense, nn.Dense))
      or _is_sparse_dense(module)) and "mac" in state.sites:
    key = site_key(state.key, f"{path}:mac", state.layer)
    return perturb_relative_to_max(out, state.sigmas.mac, key)
  return out


@contextlib.contextmanager
def inject(sigmas: Sigmas, key: Array,
           sites: Sequence[str] = SITES) -> Iterator[None]:
  """Within this context (entered inside the traced function), every model
  call perturbs the ``sites`` with the runtime ``sigmas`` and ``key``."""
  sites = check_sites(sites)
  if not isinstance(sigmas, Sigmas):
    raise ValueError(f"sigmas must be a noise.Sigmas, got "
                     f"{type(sigmas).__name__}")
  for site in SITES:
    check_sigma(getattr(sigmas, site), f"sigmas.{site}")
  token = _ACTIVE.set(_Active(sigmas, key, frozenset(sites)))
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _ACTIVE.reset(token)


def noisy(fn: Callable[..., Any], sites: Sequence[str] = SITES
          ) -> Callable[..., Any]:
  """``fn(*args, **kw)`` -> ``g(sigmas, key, *args, **kw)`` with the noise
  injected (``fn`` calls a model's ``apply``); jit ``g``: sigmas and key are
  runtime arguments, so one compilation serves every sigma."""
  sites = check_sites(sites)

  def wrapped(sigmas: Sigmas, key: Array, *args, **kwargs):
    with inject(sigmas, key, sites):
      return fn(*args, **kwargs)
  return wrapped


# ------------------------------------------------------------- training ---

def train_sigma(step: Any, *, sigma: float, start_step: int,
                ramp_steps: int) -> Array:
  """Noise-aware training: 0 before ``start_step``, then a linear ramp to
  ``sigma`` over ``ramp_steps`` steps (0: at once), then ``sigma``.
  Works on traced steps."""
  step = jnp.asarray(step, jnp.float32)
  if ramp_steps > 0:
    frac = jnp.clip((step - start_step + 1.0) / float(ramp_steps), 0.0, 1.0)
  else:
    frac = jnp.where(step >= start_step, 1.0, 0.0)
  return jnp.where(step >= start_step, sigma * frac, 0.0).astype(jnp.float32)


def train_sigmas(step: Any, sites: Sequence[str], **kw: Any) -> Sigmas:
  """:func:`train_sigma` on each of ``sites``, 0 elsewhere."""
  s = train_sigma(step, **kw)
  zero = jnp.zeros((), jnp.float32)
  return Sigmas(**{site: (s if site in sites else zero) for site in SITES})
