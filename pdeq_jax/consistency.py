"""Consistency of quantized networks (Tables 4, 5, 7 and Fig. 3 of the paper).

The same weights are run twice: activations at b bits and clip-only (no
rounding, the "32-bit" reference).  The per-layer mean squared error between
corresponding hidden maps measures how far quantization noise drives the
network; symmetric (stable) networks keep it bounded across depth.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _natural_key(name: Any) -> tuple:
  """Sort key reading digit runs as numbers: "layer2" before "layer10"."""
  return tuple(int(p) if p.isdigit() else p
               for p in re.split(r"(\d+)", str(name)) if p)


def _as_layer_list(hidden: Any) -> list:
  if isinstance(hidden, (list, tuple)):
    layers = list(hidden)
  elif isinstance(hidden, dict):
    layers = [hidden[k] for k in sorted(hidden, key=_natural_key)]
  else:
    hidden = jnp.asarray(hidden)
    layers = [hidden[i] for i in range(hidden.shape[0])] if hidden.ndim else []
  if not layers:
    raise ValueError("hidden states hold no layers: at least one layer's map "
                     "is needed")
  return layers


def _check_pairs(hq: list, hr: list) -> None:
  if len(hq) != len(hr):
    raise ValueError(f"hidden_quantized has {len(hq)} layers, hidden_reference "
                     f"{len(hr)}")
  for i, (a, b) in enumerate(zip(hq, hr)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"layer {i}: shapes differ, {jnp.shape(a)} vs "
                       f"{jnp.shape(b)}")


def squared_error_sums(hidden_quantized: Any, hidden_reference: Any,
                       example_mask: Optional[Array] = None) -> Dict[str, Array]:
  """Per-layer sums for a streamed MSE over many batches (jit-able).

  Args:
    hidden_quantized / hidden_reference: per-layer maps ``[N, ...]`` of one
      batch (list, dict or stacked array, as for :func:`activation_mse`).
    example_mask: optional ``[N]`` weights (0 for padding examples).

  Returns:
    ``sq_err`` [L] = Σ (q - r)², ``sq_ref`` [L] = Σ r², ``count`` [L] = the
    number of (unmasked) elements; add them over batches and pass the totals
    to :func:`mse_from_sums`.
  """
  hq, hr = _as_layer_list(hidden_quantized), _as_layer_list(hidden_reference)
  _check_pairs(hq, hr)
  sq_err, sq_ref, count = [], [], []
  for a, b in zip(hq, hr):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    per_example = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
    if example_mask is None:
      w = jnp.ones(a.shape[:1], jnp.float32)
    else:
      w = jnp.asarray(example_mask, jnp.float32)
    flat = lambda t: t.reshape(t.shape[0], -1)
    sq_err.append(jnp.sum(w * jnp.sum(flat(a - b) ** 2, axis=1)))
    sq_ref.append(jnp.sum(w * jnp.sum(flat(b) ** 2, axis=1)))
    count.append(jnp.sum(w) * per_example)
  return {"sq_err": jnp.stack(sq_err), "sq_ref": jnp.stack(sq_ref),
          "count": jnp.stack(count)}


def mse_from_sums(sums: Dict[str, Any]) -> Dict[str, Any]:
  """``mse``, ``normalized_mse`` and their layer means from summed totals."""
  sq_err = np.asarray(sums["sq_err"], np.float64)
  sq_ref = np.asarray(sums["sq_ref"], np.float64)
  count = np.maximum(np.asarray(sums["count"], np.float64), 1.0)
  mse = sq_err / count
  nmse = mse / np.maximum(sq_ref / count, 1e-12)
  return {"mse": mse, "normalized_mse": nmse,
          "overall_mse": float(mse.mean()),
          "overall_normalized_mse": float(nmse.mean())}


def activation_mse(hidden_quantized: Any, hidden_reference: Any
                   ) -> Dict[str, np.ndarray]:
  """Per-layer MSE between a b-bit run and the clip-only run of the same weights.

  Args:
    hidden_quantized: per-layer hidden maps of the b-bit run: a list/tuple, a
      dict (keys in natural order: "layer2" before "layer10") or an array
      whose leading axis is the layer; at least one layer.
    hidden_reference: the same maps from the clip-only run.

  Returns:
    ``mse`` [L]: mean over elements of the squared difference per layer;
    ``normalized_mse`` [L]: ``mse / mean(reference²)`` per layer (Fig. 3);
    ``overall_mse`` and ``overall_normalized_mse``: their means over layers.
  """
  hq, hr = _as_layer_list(hidden_quantized), _as_layer_list(hidden_reference)
  _check_pairs(hq, hr)
  mse, nmse = [], []
  for a, b in zip(hq, hr):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    err = float(np.mean((a - b) ** 2))
    mse.append(err)
    nmse.append(err / max(float(np.mean(b ** 2)), 1e-12))
  mse, nmse = np.asarray(mse), np.asarray(nmse)
  return {"mse": mse, "normalized_mse": nmse,
          "overall_mse": float(mse.mean()),
          "overall_normalized_mse": float(nmse.mean())}


def rounding_noise_ratio(mse: Any, step: Any) -> np.ndarray:
  """Per-layer MSE in units of one rounding's noise power ``step² / 12``.

  ``step`` [L] is the grid step of each layer's quantizer
  (:func:`pdeq_jax.quant.grid_step`).  Rounding values spread inside the
  clipping range adds ``step² / 12`` per entry, so a ratio of ~1 means a
  layer's b-bit state differs from the clip-only one by that layer's own
  rounding only, and a ratio growing with depth means the network amplifies
  the earlier layers' errors.  Unlike the MSE itself it does not scale with
  the learned alpha, so networks with different clipping ranges (e.g. the
  symmetric and non-symmetric PDE-GCN, tuned separately) can be compared.
  """
  mse = np.asarray(mse, np.float64)
  step = np.asarray(step, np.float64)
  if mse.shape != step.shape:
    raise ValueError(f"mse has shape {mse.shape} but step {step.shape}: one "
                     "grid step per layer is needed")
  return mse / np.maximum(step ** 2 / 12.0, 1e-30)


def plot_layerwise_mse(curves: Dict[str, Sequence[float]], path: str,
                       title: str = "", normalized: bool = True) -> None:
  """One line per network (e.g. symmetric vs non-symmetric), like Fig. 3."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, values in curves.items():
    ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3,
            label=label)
  ax.set_xlabel("layer")
  ax.set_ylabel("normalised MSE" if normalized else "MSE")
  ax.set_yscale("log")
  ax.set_title(title or "b-bit vs clip-only hidden states")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
