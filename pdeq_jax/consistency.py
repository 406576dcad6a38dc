"""Consistency of quantized networks (Tables 4, 5, 7 and Fig. 3 of the paper).

The same weights are run twice: activations at b bits and clip-only (no
rounding, the "32-bit" reference).  The per-layer mean squared error between
corresponding hidden maps measures how far quantization noise drives the
network; symmetric (stable) networks keep it bounded across depth.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _as_layer_list(hidden: Any) -> list:
  if isinstance(hidden, (list, tuple)):
    return list(hidden)
  if isinstance(hidden, dict):
    return [hidden[k] for k in sorted(hidden)]
  hidden = jnp.asarray(hidden)
  return [hidden[i] for i in range(hidden.shape[0])]


def activation_mse(hidden_quantized: Any, hidden_reference: Any
                   ) -> Dict[str, np.ndarray]:
  """Per-layer MSE between a b-bit run and the clip-only run of the same weights.

  Args:
    hidden_quantized: per-layer hidden maps of the b-bit run: a list/tuple, a
      dict (sorted by key) or an array whose leading axis is the layer.
    hidden_reference: the same maps from the clip-only run.

  Returns:
    ``mse`` [L]: mean over elements of the squared difference per layer;
    ``normalized_mse`` [L]: ``mse / mean(reference²)`` per layer (Fig. 3);
    ``overall_mse`` and ``overall_normalized_mse``: their means over layers.
  """
  hq, hr = _as_layer_list(hidden_quantized), _as_layer_list(hidden_reference)
  if len(hq) != len(hr):
    raise ValueError(f"hidden_quantized has {len(hq)} layers, hidden_reference "
                     f"{len(hr)}")
  mse, nmse = [], []
  for i, (a, b) in enumerate(zip(hq, hr)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"layer {i}: shapes differ, {jnp.shape(a)} vs "
                       f"{jnp.shape(b)}")
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    err = float(np.mean((a - b) ** 2))
    mse.append(err)
    nmse.append(err / max(float(np.mean(b ** 2)), 1e-12))
  mse, nmse = np.asarray(mse), np.asarray(nmse)
  return {"mse": mse, "normalized_mse": nmse,
          "overall_mse": float(mse.mean()),
          "overall_normalized_mse": float(nmse.mean())}


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
