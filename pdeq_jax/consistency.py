"""Consistency of quantized networks (Tables 4, 5, 7 and Fig. 3 of the paper).

The same weights are run twice: activations at b bits and clip-only (no
rounding, the "32-bit" reference).  The per-layer mean squared error between
corresponding hidden maps measures how far quantization noise drives the
network; symmetric (stable) networks keep it bounded across depth.
"""

from __future__ import annotations

import csv
import pathlib
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


# The authors' published per-layer curves (``website/source/*_layerwise_mse_*.csv``
# in BGUCompSci/CNNQuantizationThroughPDEs) hold, per block output, the
# *root* of the mean squared difference between the quantized network and the
# same network with 32-bit activations: ``sqrt(sum ||a - a_q||^2 / numel)``
# (``report_graph_activation_diffs`` in their ``stable_exp.py``).  Ours keep
# the mean square (``mse``); ``rmse`` below converts to their definition.
PUBLISHED_COLUMNS = ("unstable", "stable", "layer")


def rmse(mse: Sequence[float]) -> np.ndarray:
  """Root of the per-layer mean squared error: the published curves' unit."""
  values = np.asarray(mse, np.float64)
  if np.any(values < 0):
    raise ValueError("a mean squared error cannot be negative")
  return np.sqrt(values)


def read_published_layerwise(path: str) -> Dict[str, np.ndarray]:
  """Reads one of the authors' published per-layer CSVs.

  Returns ``{"unstable": [L], "stable": [L], "layer": [L], "commented": [L]}``
  with layers as published, counted from 1.  The published ResNet-56 files
  comment out their last row (block 27, ``# 0.357,0.102,27`` for CIFAR-10),
  so their figure stops at block 26; such rows are read too and flagged in
  ``commented`` so that the depth axis still counts every block.  Errors name
  the file and what is wrong.
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(
        f"published per-layer curve not found: {file} (expected "
        "website/source/resnet56_vs_stablenet56_layerwise_mse_cifar10.csv of "
        "a BGUCompSci/CNNQuantizationThroughPDEs checkout)")
  with file.open(newline="") as handle:
    rows = list(csv.reader(handle))
  if not rows or tuple(c.strip() for c in rows[0]) != PUBLISHED_COLUMNS:
    raise ValueError(f"{file}: header must be {','.join(PUBLISHED_COLUMNS)}, "
                     f"got {','.join(rows[0]) if rows else 'an empty file'}")
  values, commented = [], []
  for row in rows[1:]:
    if not any(c.strip() for c in row):
      continue
    is_comment = row[0].lstrip().startswith("#")
    if is_comment:
      row = [row[0].lstrip()[1:]] + row[1:]
    if len(row) != len(PUBLISHED_COLUMNS):
      raise ValueError(f"{file}: every row needs {len(PUBLISHED_COLUMNS)} "
                       f"values, got {row}")
    try:
      values.append([float(c) for c in row])
    except ValueError as err:
      raise ValueError(f"{file}: a value is not a number ({err})") from None
    commented.append(is_comment)
  if not values or all(commented):
    raise ValueError(f"{file}: no data rows")
  table = np.asarray(values, np.float64)
  out = {name: table[:, i] for i, name in enumerate(PUBLISHED_COLUMNS)}
  out["commented"] = np.asarray(commented, bool)
  return out


def relative_depth(num_layers: int) -> np.ndarray:
  """Block k of L (k = 1..L) at depth k / L, so nets of different depth share
  one axis."""
  return np.arange(1, num_layers + 1, dtype=np.float64) / num_layers


def plot_against_published(runs: Dict[str, Dict[str, Sequence[float]]],
                           published: Dict[str, Dict[str, np.ndarray]],
                           path: str, title: str = "") -> None:
  """Fig. 3 beside the authors' published curves.

  Left panel: per-block RMSE (the published definition) of ``runs`` (label ->
  ``{"mse": [L], ...}``) as solid lines and of ``published`` (label ->
  ``{"rmse": [K]}``, optionally ``"layer": [K]`` and ``"num_layers"`` when
  only some of the net's blocks are plotted) as dashed lines, against
  relative depth.  Right panel:
  the runs' normalised MSE (the published files have none).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for label, stats in runs.items():
    values = rmse(stats["mse"])
    left.plot(relative_depth(len(values)), values, marker="o", markersize=3,
              label=label)
    nmse = np.asarray(stats["normalized_mse"], np.float64)
    right.plot(relative_depth(len(nmse)), nmse, marker="o", markersize=3,
               label=label)
  for label, stats in published.items():
    values = np.asarray(stats["rmse"], np.float64)
    depth = np.asarray(stats.get("layer", np.arange(1, len(values) + 1)),
                       np.float64) / float(stats.get("num_layers", len(values)))
    left.plot(depth, values, linestyle="--", label=label)
  left.set_ylabel("RMSE per block, b-bit vs 32-bit activations")
  right.set_ylabel("normalised MSE per block")
  for ax in (left, right):
    ax.set_xlabel("relative depth (block / number of blocks)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title or "per-block divergence of b-bit from 32-bit "
               "activations")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
