"""Paper Fig. 2 on a trained network: TV smoothing before quantization.

    python -m train.fig2_tv --workdir=workdirs/cnn_cpu/resnet20_4w4a/seed0 \
        --output_dir=results/fig2 [--image_index=0 --layer=1 --channel=auto \
        --gamma_sq=0.1 --steps=1,3 --bits=4 --which=best --map=output \
        --num_images=64 --data_dir=...]

Takes one real test image of the run's dataset, runs the trained network with
its weights at their trained bits and *clip-only* activations (no rounding:
the reference network of the consistency report) and records a map of block
``--layer`` (1-based):

* ``--map=output`` (default): the block's output x (after its ReLU; the map
  the next block's input quantizer sees), smoothed as relu(S(x));
* ``--map=preact``: the block's pre-activation z (the block output is
  relu(z); ResNet BasicBlocks only), smoothed as relu(S(z)), which is the
  paper's non-pointwise activation σ(S(·)); 0 steps is then the same map as
  with ``output``.

It applies 0, 1 and 3 (``--steps``) TV steps of Eq. 14,
``S(x) = x - γ² (D_x + D_y) x`` with ``γ = sqrt(gamma_sq)`` and the default ε
of :func:`pdeq_jax.tv.tv_smooth`, to every channel, then the ReLU, and
measures the ``--bits`` unsigned quantization error (Eq. 9) of the whole map:

* ``α = max`` (always): α is the maximum of the map being quantized, so
  outliers that TV removes give a finer grid (the mechanism of Sec. 3.1);
* ``α = trained`` (when the network has one): the learned α of the next
  block's input quantizer (``<next block>/aq_in/alpha``), fixed for all step
  counts.  The last block feeds the float classifier and has none.

``--num_images`` > 0 repeats the measurement on each of the first N test
images (median MSE ratio vs 0 steps, fraction of images improved).

Writes into ``--output_dir``: ``fig2.json`` (everything, including the chosen
channel alone), ``fig2.md`` (tables: steps | α | MSE | relative MSE | unique
codes | code entropy | std | max, and the N-image summary) and ``fig2.png``
(the chosen channel after 0/1/3 steps as in the paper's Fig. 2 (a, b), and
the value histograms of the whole map with α, as in (c, d)).

Measured on a ResNet-20 4W4A on CIFAR-10 (results/fig2/README.md, blocks
1-3, 64 test images): relu(S(z)) of the pre-activation lowers the 4-bit MSE
on 92-100% of the images (median ratio 0.93-0.94 after 1 step, 0.81-0.83
after 3 with α = max; more with the trained α), whereas smoothing the
post-ReLU output
raises it after 1 step on nearly every image (TV lifts the exact zeros next
to active pixels onto the grid).

The pure part is :func:`tv_quantization_effect`; :func:`run` is the program.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import pathlib
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdeq_jax import layers
from pdeq_jax import quant
from pdeq_jax import tv
from pdeq_jax.data import images as image_data
from train import classify
from train import common

# The default ε of pdeq_jax.tv.tv_smooth.
TV_EPS = float(inspect.signature(tv.tv_smooth).parameters["eps"].default)
_BLOCK_NAME = re.compile(r"^stage(\d+)_block(\d+)$")


# ------------------------------------------------------------ pure part ---

def _check_steps(steps: Sequence[int]) -> List[int]:
  try:
    out = [int(s) for s in steps]
  except (TypeError, ValueError):
    raise ValueError(f"steps must be non-negative integers, got {steps!r}")
  if not out or any(s < 0 or s != float(t) for s, t in zip(out, steps)):
    raise ValueError(f"steps must be a non-empty list of integers >= 0, got "
                     f"{list(steps)!r}")
  return sorted(set(out))


@functools.partial(jax.jit, static_argnames=("bits",))
def _quantize_with_codes(x: jax.Array, alpha: jax.Array, bits: int):
  q = quant.quantize(x, alpha, bits, signed=False)
  codes, _ = quant.to_integer(x, alpha, bits, signed=False)
  return q, codes


@jax.jit
def _tv_step(x: jax.Array, gamma: jax.Array, eps: jax.Array) -> jax.Array:
  return tv.tv_smooth(x, gamma, eps=eps)


def quantization_stats(x: Any, alpha: float, bits: int) -> Dict[str, Any]:
  """Unsigned ``bits``-bit quantization error and code statistics of ``x``.

  ``Q(x) = alpha * round((2^b - 1) clip(x / alpha, 0, 1)) / (2^b - 1)``
  (:func:`pdeq_jax.quant.quantize` with ``signed=False``).
  """
  x = np.asarray(x, np.float32)
  q, codes = _quantize_with_codes(jnp.asarray(x), jnp.float32(alpha),
                                  int(bits))
  q = np.asarray(q, np.float64)
  codes = np.asarray(codes).ravel().astype(np.int64)
  counts = np.bincount(codes, minlength=2**bits)
  p = counts[counts > 0] / codes.size
  mse = float(np.mean((x - q) ** 2))
  mean_square = float(np.mean(np.square(x, dtype=np.float64)))
  return {
      "alpha": float(alpha),
      "mse": mse,
      "relative_mse": mse / mean_square if mean_square > 0 else float("nan"),
      "unique_codes": int(np.count_nonzero(counts)),
      "code_entropy_bits": float(-(p * np.log2(p)).sum()),
      "clipped_fraction": float(np.mean(x > alpha)),
  }


def _value_stats(x: np.ndarray) -> Dict[str, float]:
  """Value statistics; total_variation is the anisotropic TV Σ|G_x x| +
  Σ|G_y x| summed over every channel and example (as tv.total_variation)."""
  x = np.asarray(x, np.float64)
  tv_sum = np.abs(np.diff(x, axis=-2)).sum() + np.abs(np.diff(x, axis=-3)).sum()
  return {"mean": float(x.mean()), "std": float(x.std()),
          "min": float(x.min()), "max": float(x.max()),
          "mean_square": float(np.mean(x ** 2)),
          "zero_fraction": float(np.mean(x == 0)),
          "total_variation": float(tv_sum)}


def check_effect_args(gamma_sq: Any, bits: Any, alpha: Any = None,
                      eps: Any = TV_EPS) -> None:
  """ValueError for a bad γ², bit width, α or ε (see tv_quantization_effect)."""
  if not (isinstance(gamma_sq, (int, float, np.floating)) and
          math.isfinite(gamma_sq) and gamma_sq > 0):
    raise ValueError(f"gamma_sq must be a finite number > 0, got {gamma_sq!r}")
  quant.check_bits(bits)
  if bits is None or not 2 <= int(bits) <= 16:
    raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
  if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be > 0 (or None for the map's max), got "
                     f"{alpha!r}")
  if not (math.isfinite(eps) and eps > 0):
    raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def tv_quantization_effect(feature_map: Any,
                           gamma_sq: float,
                           steps: Sequence[int] = (0, 1, 3),
                           bits: int = 4,
                           alpha: Optional[float] = None,
                           *,
                           eps: float = TV_EPS,
                           relu: bool = True,
                           return_maps: bool = False) -> Dict[str, Any]:
  """Quantization error of a feature map after 0, 1, 3, ... TV steps.

  Args:
    feature_map: ``[H, W, C]`` or ``[N, H, W, C]`` (every channel and example
      is smoothed on its own; the statistics pool them all, as one per-tensor
      activation quantizer would).
    gamma_sq: γ² > 0 of Eq. 14.
    steps: the numbers of TV steps to report (applied cumulatively: the map
      after 3 steps is S(S(S(x)))).
    bits: unsigned quantization bits in [2, 16].
    alpha: fixed clipping scale for every step count, or None for the max of
      each (smoothed) map.
    eps: ε of :func:`pdeq_jax.tv.tv_smooth`.
    relu: apply a ReLU after the steps (σ(S(x)), the paper's activation);
      without it the undershoot below 0 counts as clipping error.
    return_maps: also return the maps (``"maps"``: steps -> numpy array of the
      input's shape).

  Returns:
    ``{"gamma_sq", "gamma", "eps", "bits", "relu", "alpha_mode" ("max" or
    "fixed"), "shape", "rows"}``; ``rows`` holds one dict per step count with
    ``steps, alpha, mse, relative_mse, unique_codes, code_entropy_bits,
    clipped_fraction, mean, std, min, max, mean_square, zero_fraction,
    total_variation``.
  """
  x = np.asarray(feature_map, np.float32)
  if x.ndim not in (3, 4):
    raise ValueError(f"feature_map must be [H, W, C] or [N, H, W, C], got "
                     f"shape {tuple(x.shape)}")
  if x.ndim == 3:
    x = x[None]
  if not np.all(np.isfinite(x)):
    raise ValueError("feature_map has non-finite values")
  check_effect_args(gamma_sq, bits, alpha, eps)
  steps = _check_steps(steps)
  gamma = float(np.sqrt(gamma_sq))

  rows, maps = [], {}
  current, done = jnp.asarray(x), 0
  for n in steps:
    while done < n:
      current = _tv_step(current, jnp.float32(gamma), jnp.float32(eps))
      done += 1
    out = np.asarray(current)
    if relu:
      out = np.maximum(out, 0.0)
    a = float(alpha) if alpha is not None else float(out.max())
    if a > 0:
      stats = quantization_stats(out, a, int(bits))
    else:  # α = max of a map with nothing above 0 (a dead ReLU channel)
      mse = float(np.mean(np.square(out, dtype=np.float64)))
      stats = {"alpha": a, "mse": mse,
               "relative_mse": 1.0 if mse > 0 else float("nan"),
               "unique_codes": 1, "code_entropy_bits": 0.0,
               "clipped_fraction": 0.0}
    rows.append({"steps": n, **stats, **_value_stats(out)})
    if return_maps:
      maps[n] = out.reshape(np.shape(feature_map))
  result = {"gamma_sq": float(gamma_sq), "gamma": gamma, "eps": float(eps),
            "bits": int(bits), "relu": bool(relu),
            "alpha_mode": "max" if alpha is None else "fixed",
            "shape": list(np.shape(feature_map)), "rows": rows}
  if return_maps:
    result["maps"] = maps
  return result


# -------------------------------------------------------------- program ---

def _block_names(params: Dict[str, Any]) -> List[str]:
  """``stageS_blockB`` modules of the params in network order (ResNets)."""
  found = [(tuple(int(g) for g in m.groups()), name) for name in params
           for m in [_BLOCK_NAME.match(name)] if m]
  return [name for _, name in sorted(found)]


def trained_next_alpha(params: Dict[str, Any], layer: int,
                       num_hidden: int) -> Optional[Dict[str, Any]]:
  """The learned α of the quantizer that reads block ``layer``'s output.

  Found when the blocks are ``stageS_blockB`` modules, one per hidden map
  (the ResNets), and the next block has an input quantizer ``aq_in``.
  """
  names = _block_names(params)
  if len(names) != num_hidden or layer >= len(names):
    return None
  alpha = params[names[layer]].get("aq_in", {}).get("alpha")
  if alpha is None:
    return None
  return {"alpha": float(layers.positive_alpha(jnp.asarray(alpha))),
          "param": f"{names[layer]}/aq_in/alpha"}


def _load_run(workdir: pathlib.Path, which: str):
  if which not in ("best", "final"):
    raise ValueError(f"which must be 'best' or 'final', got {which!r}")
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: --workdir must be the "
                            "workdir of a classification run")
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir() or not any(p.name.isdigit()
                                      for p in ckpt_dir.iterdir()):
    raise FileNotFoundError(f"no checkpoints under {ckpt_dir}: --workdir must "
                            "be a classification run that saved a checkpoint")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if config.get("task", "image_classification") != "image_classification":
    raise ValueError(f"{workdir} is a {config.task!r} run; fig2_tv needs an "
                     "image classification run")
  variables = classify.load_source_variables(str(workdir), which)
  info = {"which": which,
          "checkpoint_step": max(int(p.name) for p in ckpt_dir.iterdir()
                                 if p.name.isdigit())}
  results_path = workdir / "results.json"
  if results_path.is_file():
    results = json.loads(results_path.read_text())
    info.update(finished=True, best_epoch=results.get("best_epoch"),
                test_acc=results.get("test_acc"),
                test_acc_final=results.get("test_acc_final"))
  else:
    info["finished"] = False
  return config, variables, info


def _pick_channel(feature_map: np.ndarray, channel: Union[str, int]) -> int:
  num = feature_map.shape[-1]
  if str(channel) == "auto":
    return int(np.argmax(feature_map.reshape(-1, num).var(axis=0)))
  try:
    c = int(channel)
  except ValueError:
    raise ValueError(f"channel must be 'auto' or an integer in [0, {num - 1}]"
                     f", got {channel!r}")
  if not 0 <= c < num:
    raise ValueError(f"channel {c} out of range: the map has {num} channels, "
                     f"valid range [0, {num - 1}]")
  return c


def _format_table(result: Dict[str, Any]) -> str:
  return common.markdown_table(
      ["TV steps", "α", "MSE", "relative MSE", "unique codes",
       "code entropy (bits)", "std", "max"],
      [[r["steps"], f"{r['alpha']:.4g}", f"{r['mse']:.4g}",
        f"{r['relative_mse']:.4g}", r["unique_codes"],
        f"{r['code_entropy_bits']:.3f}", f"{r['std']:.4g}",
        f"{r['max']:.4g}"] for r in result["rows"]])


def _plot(path: pathlib.Path, maps: Dict[int, np.ndarray], rows, channel: int,
          title: str, alpha_trained: Optional[float]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = sorted(maps)
  ncol = len(steps)
  fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol, 7.0), squeeze=False)
  vmax = max(float(maps[s][..., channel].max()) for s in steps) or 1.0
  top = max(float(maps[s].max()) for s in steps) or 1.0
  bins = np.linspace(0.0, top, 61)
  for j, s in enumerate(steps):
    r = next(r for r in rows if r["steps"] == s)
    ax = axes[0, j]
    im = ax.imshow(maps[s][..., channel], cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_title(f"{s} TV step{'s' if s != 1 else ''}, channel {channel}",
                 fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[1, j]
    ax.hist(maps[s].ravel(), bins=bins, color="C0", log=True)
    ax.axvline(r["alpha"], color="C3", ls="--", lw=1,
               label=f"α = max = {r['alpha']:.3g}")
    if alpha_trained is not None:
      ax.axvline(alpha_trained, color="C2", ls=":", lw=1.2,
                 label=f"trained α = {alpha_trained:.3g}")
    ax.set_title(f"{s} step{'s' if s != 1 else ''}: MSE {r['mse']:.3g}, rel. {r['relative_mse']:.3g}"
                 f"\nstd {r['std']:.3g}, {r['unique_codes']} codes",
                 fontsize=9)
    ax.set_xlabel("value (all channels)")
    if j == 0:
      ax.set_ylabel("count (log)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


MAP_KINDS = ("output", "preact")
_PREACT_PARTS = ("bn2", "shortcut_bn", "aq_in")


def record_maps(model, variables, images: np.ndarray, bits: layers.QuantBits,
                layer: int, map_kind: str = "output"):
  """``(logits, maps [N, H, W, C], num_blocks)`` of block ``layer`` (1-based).

  ``"output"``: the block's output (``return_hidden``; after the ReLU, the
  map the next block's input quantizer sees).  ``"preact"``: the block's
  pre-activation ``z = shortcut + BN₂(K₂ ...)`` of a ResNet BasicBlock, with
  ``output = relu(z)``; σ(S(z)) is where the paper puts TV.  It is rebuilt
  from the captured outputs of ``bn2`` and ``shortcut_bn`` (or, for an
  identity shortcut, the block's quantized input ``aq_in``) and checked
  against the output.
  """
  if map_kind not in MAP_KINDS:
    raise ValueError(f"map must be one of {MAP_KINDS}, got {map_kind!r}")
  images = jnp.asarray(images)

  def forward(v, x, b):
    return model.apply(v, x, b, return_hidden=True)

  _, hidden_shapes = jax.eval_shape(forward, variables, images, bits)
  num_hidden = len(hidden_shapes)
  if not 1 <= int(layer) <= num_hidden:
    raise ValueError(f"layer {layer} out of range: the model has "
                     f"{num_hidden} blocks, valid range [1, {num_hidden}]")
  if map_kind == "output":
    logits, hidden = jax.jit(forward)(variables, images, bits)
    return np.asarray(logits), np.asarray(hidden[layer - 1]), num_hidden

  names = _block_names(variables["params"])
  if len(names) != num_hidden:
    raise ValueError("map='preact' needs a ResNet of stageS_blockB "
                     f"BasicBlocks, one per hidden map; found {len(names)} "
                     f"such blocks for {num_hidden} hidden maps")
  block = names[layer - 1]

  def capture(v, x, b):
    (logits, hidden), state = model.apply(
        v, x, b, return_hidden=True, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: (
            method == "__call__" and mdl.name in _PREACT_PARTS and
            mdl.parent is not None and mdl.parent.name == block))
    return logits, hidden[layer - 1], state["intermediates"]

  logits, output, captured = jax.jit(capture)(variables, images, bits)
  parts = flax.core.unfreeze(captured).get(block, {})
  residual = parts.get("shortcut_bn", parts.get("aq_in"))
  if "bn2" not in parts or residual is None:
    raise ValueError(f"map='preact': block {block} has no bn2 / shortcut "
                     f"(captured: {sorted(parts)}); only ResNet BasicBlocks")
  preact = np.asarray(parts["bn2"]["__call__"][0] +
                      residual["__call__"][0])
  output = np.asarray(output)
  if not np.allclose(np.maximum(preact, 0.0), output, atol=1e-4, rtol=1e-4):
    raise ValueError(f"map='preact': relu(bn2 + shortcut) of block {block} "
                     "does not reproduce its output (TV activations or "
                     "another block type?)")
  return np.asarray(logits), preact, num_hidden


def per_image_summary(maps: np.ndarray, gamma_sq: float, steps: Sequence[int],
                      bits: int, alpha: Optional[float] = None
                      ) -> Dict[str, Any]:
  """:func:`tv_quantization_effect` of each map of ``maps`` [N, H, W, C] on
  its own: mean MSE per step count, the median ratio MSE(steps) /
  MSE(0 steps) over the maps with MSE(0 steps) > 0, and the fraction of maps
  whose MSE the steps lower."""
  steps = _check_steps([0, *steps])
  mse = np.array([[r["mse"] for r in tv_quantization_effect(
      m, gamma_sq, steps, bits, alpha)["rows"]] for m in maps])
  out = {"num_images": int(len(maps)), "alpha_mode":
         "max" if alpha is None else "fixed", "rows": []}
  with np.errstate(divide="ignore", invalid="ignore"):
    ratios = np.where(mse[:, :1] > 0, mse / mse[:, :1], np.nan)
  for j, n in enumerate(steps):
    valid = ratios[:, j][np.isfinite(ratios[:, j])]
    out["rows"].append({
        "steps": n, "mean_mse": float(mse[:, j].mean()),
        "median_mse_ratio": (float(np.median(valid)) if valid.size
                             else float("nan")),
        "improved_fraction": float(np.mean(mse[:, j] < mse[:, 0]))})
  return out


def run(workdir: str,
        output_dir: str,
        *,
        image_index: int = 0,
        layer: int = 1,
        channel: Union[str, int] = "auto",
        gamma_sq: float = 0.1,
        steps: Sequence[int] = (1, 3),
        bits: int = 4,
        which: str = "best",
        map_kind: str = "output",
        num_images: int = 64,
        data_dir: Optional[str] = None,
        dataset: Optional[image_data.ImageDataset] = None,
        verbose: bool = True) -> Dict[str, Any]:
  """The program: loads the run, records block ``layer``'s map, writes the
  figure and tables into ``output_dir``; returns what ``fig2.json`` holds.

  ``map_kind``: ``"output"`` (the block output) or ``"preact"`` (its
  pre-activation; see :func:`record_maps`).  ``num_images`` > 0 adds a
  summary over the first ``num_images`` test images (each map on its own).

  Raises:
    FileNotFoundError: ``workdir`` has no config.json or no checkpoint.
    ValueError: ``layer``, ``image_index`` or ``channel`` out of range (the
      message names the valid range), bad ``gamma_sq`` / ``bits`` / ``steps``
      / ``map_kind`` / ``num_images``.
  """
  steps = _check_steps([0, *steps])
  check_effect_args(gamma_sq, bits)
  if map_kind not in MAP_KINDS:
    raise ValueError(f"map must be one of {MAP_KINDS}, got {map_kind!r}")
  if int(num_images) < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  layer = int(layer)
  workdir_path = pathlib.Path(workdir)
  config, variables, run_info = _load_run(workdir_path, which)
  if data_dir:
    config.data.data_dir = str(data_dir)
  data = dataset if dataset is not None else classify.load_data(config)
  n_test = len(data.test_labels)
  if not 0 <= int(image_index) < n_test:
    raise ValueError(f"image_index {image_index} out of range: the test set "
                     f"has {n_test} images, valid range [0, {n_test - 1}]")
  num_images = min(int(num_images), n_test)
  model = classify.create_model(config, data.num_classes)
  # Weights at their trained bits, activations clip-only (no rounding).
  run_bits = classify.target_bits(config)
  bits_used = layers.QuantBits(run_bits.weights, quant.bits_as_array(None))
  # One batch: the chosen image, then the summary's images.
  indices = [int(image_index), *range(num_images)]
  images = image_data.normalize(data.test_images[indices], data.mean,
                                data.std)
  logits, maps_all, num_hidden = record_maps(model, variables, images,
                                             bits_used, layer, map_kind)
  fmap = maps_all[0].astype(np.float32)  # [H, W, C]
  if fmap.ndim != 3:
    raise ValueError(f"block {layer} output has shape {fmap.shape}, not a "
                     "[H, W, C] feature map")
  c = _pick_channel(np.maximum(fmap, 0.0), channel)

  whole = tv_quantization_effect(fmap, gamma_sq, steps, bits,
                                 return_maps=True)
  maps = whole.pop("maps")
  one = tv_quantization_effect(fmap[..., c:c + 1], gamma_sq, steps, bits)
  trained = trained_next_alpha(variables["params"], layer, num_hidden)
  alpha_trained = None if trained is None else trained["alpha"]
  fixed = None
  if trained is not None:
    fixed = tv_quantization_effect(fmap, gamma_sq, steps, bits,
                                   alpha=alpha_trained)
  summary = None
  if num_images:
    batch = maps_all[1:]
    summary = {"alpha_max": per_image_summary(batch, gamma_sq, steps, bits)}
    if trained is not None:
      summary["alpha_trained"] = per_image_summary(batch, gamma_sq, steps,
                                                   bits, alpha_trained)
    summary["first_image_index"] = 0

  label = int(data.test_labels[image_index])
  result = {
      "workdir": str(workdir_path), "model": config.model.name,
      "dataset": data.name, "run": run_info,
      "run_bits": {"weight_bits": int(config.quant.weight_bits),
                   "act_bits": int(config.quant.act_bits)},
      "network_bits": ("weights at the run's bits "
                       f"({int(config.quant.weight_bits)}; 32 = float), "
                       "activations clip-only (no rounding)"),
      "image_index": int(image_index), "label": label,
      "class_name": data.class_names[label],
      "predicted": int(np.argmax(logits[0])),
      "layer": layer, "num_layers": num_hidden, "map": map_kind,
      "feature_map_shape": list(fmap.shape), "channel": c,
      "channel_mode": str(channel),
      "gamma_sq": float(gamma_sq), "eps": TV_EPS, "bits": int(bits),
      "whole_map_alpha_max": whole,
      "channel_alpha_max": one,
      "trained_alpha": trained,
      "whole_map_alpha_trained": fixed,
      "summary": summary,
  }
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  common.write_json(out / "fig2.json", result)
  what = "output" if map_kind == "output" else "pre-activation z, relu(S(z))"
  title = (f"{config.model.name} ({run_info['which']}, step "
           f"{run_info['checkpoint_step']}), test image {image_index} "
           f"({data.class_names[label]}), block {layer}/{num_hidden} {what} "
           f"{tuple(fmap.shape)}; TV γ²={gamma_sq}, ε={TV_EPS}, "
           f"{bits}-bit unsigned")
  _plot(out / "fig2.png", maps, whole["rows"], c, title, alpha_trained)
  text = markdown_report(result)
  common.write_text(out / "fig2.md", text)
  if verbose:
    print(text)
  return result


def _map_description(result: Dict[str, Any]) -> str:
  shape = tuple(result["feature_map_shape"])
  if result["map"] == "output":
    return (f"output x of block {result['layer']} of {result['num_layers']} "
            f"(after its ReLU; the input of the next activation quantizer), "
            f"shape {shape} (H, W, C); TV applied to x, then ReLU: "
            "relu(S(x))")
  return (f"pre-activation z of block {result['layer']} of "
          f"{result['num_layers']} (shortcut + BN₂ output; the block output "
          f"is relu(z)), shape {shape} (H, W, C); TV applied to z, then "
          "ReLU: relu(S(z)), the paper's σ(S(·)), so 0 steps = the block "
          "output")


def markdown_report(result: Dict[str, Any]) -> str:
  run_info = result["run"]
  text = (
      f"# Fig. 2: TV smoothing before {result['bits']}-bit quantization\n\n"
      f"Run `{result['workdir']}` ({result['model']}, "
      f"{result['run_bits']['weight_bits']}W{result['run_bits']['act_bits']}A,"
      f" {run_info['which']} model, checkpoint step "
      f"{run_info['checkpoint_step']}, "
      f"{'finished' if run_info['finished'] else 'still training'}); "
      f"{result['network_bits']}. Test image {result['image_index']} of "
      f"{result['dataset']} (class {result['class_name']}, predicted class "
      f"{result['predicted']}). Map: {_map_description(result)}. TV: "
      f"γ² = {result['gamma_sq']}, ε = {result['eps']}, every channel on its "
      f"own. Quantization: {result['bits']}-bit unsigned grid on [0, α], "
      "MSE = mean (x − Q(x))² over the whole map, relative MSE = MSE / "
      "mean x², code entropy = Shannon entropy of the integer codes.\n\n"
      "## Whole map, α = max of each map\n\n" +
      _format_table(result["whole_map_alpha_max"]))
  trained = result["trained_alpha"]
  if result["whole_map_alpha_trained"] is not None:
    text += (f"\n## Whole map, α = trained α of the next quantizer "
             f"(`{trained['param']}` = {trained['alpha']:.4g})\n\n" +
             _format_table(result["whole_map_alpha_trained"]))
  else:
    text += ("\n(No trained α for this block's output: it feeds the float "
             "classifier, or the run has no activation quantizers.)\n")
  how = ("largest variance" if result["channel_mode"] == "auto" else
         "given")
  text += (f"\n## Channel {result['channel']} alone ({how}; the one shown "
           "in fig2.png), α = its max\n\n" +
           _format_table(result["channel_alpha_max"]))
  summary = result.get("summary")
  if summary:
    n = summary["alpha_max"]["num_images"]
    header = ["TV steps", "mean MSE (α = max)",
              "median MSE ratio vs 0 steps (α = max)",
              "images improved (α = max)"]
    keys = ["alpha_max"]
    if "alpha_trained" in summary:
      header += ["mean MSE (trained α)", "median ratio (trained α)",
                 "improved (trained α)"]
      keys.append("alpha_trained")
    rows = []
    for j, step in enumerate(summary["alpha_max"]["rows"]):
      row = [step["steps"]]
      for key in keys:
        r = summary[key]["rows"][j]
        row += [f"{r['mean_mse']:.4g}", f"{r['median_mse_ratio']:.3f}",
                f"{100 * r['improved_fraction']:.0f}%"]
      rows.append(row)
    text += (f"\n## Test images 0..{n - 1}, each map on its own\n\n"
             "Same map and settings for each image; ratio = MSE after the "
             "steps / MSE of the same image's unsmoothed map.\n\n" +
             common.markdown_table(header, rows))
  return text


# ---------------------------------------------------------------- flags ---

def define_flags(flag_values=None) -> None:
  """Command-line flags (defined only when run as a program)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
  flags.DEFINE_string("workdir", None, "A classification run's workdir.", **fv)
  flags.DEFINE_string("output_dir", None, "Where fig2.{json,md,png} go.", **fv)
  flags.DEFINE_integer("image_index", 0, "Index into the run's test set.", **fv)
  flags.DEFINE_integer("layer", 1, "Block whose output is used (1-based).",
                       **fv)
  flags.DEFINE_string("channel", "auto",
                      "Channel shown in the figure: an index or 'auto' "
                      "(largest variance).", **fv)
  flags.DEFINE_float("gamma_sq", 0.1, "γ² of the TV step (Eq. 14).", **fv)
  flags.DEFINE_list("steps", ["1", "3"],
                    "TV step counts (0 is always added).", **fv)
  flags.DEFINE_integer("bits", 4, "Unsigned quantization bits.", **fv)
  flags.DEFINE_enum("which", "best", ["best", "final"],
                    "Which model of the run: best (falls back to the latest "
                    "state while no epoch at the target bits was validated) "
                    "or final (latest checkpoint).", **fv)
  flags.DEFINE_enum("map", "output", list(MAP_KINDS),
                    "output: the block output (after its ReLU); preact: the "
                    "block's pre-activation z, smoothed as relu(S(z)) (ResNet "
                    "BasicBlocks only).", **fv)
  flags.DEFINE_integer("num_images", 64,
                       "Also summarise the first N test images (0: off).", **fv)
  flags.DEFINE_string("data_dir", None, "Overrides the run's data.data_dir.",
                      **fv)


FLAGS = None  # flags.FLAGS when run as a program (tests set their own)


def main(argv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  common.quiet_absl_logging()
  f = FLAGS or flags.FLAGS
  for name in ("workdir", "output_dir"):
    if f[name].value is None:
      raise ValueError(f"--{name} is required")
  try:
    steps = [int(s) for s in f.steps]
  except ValueError:
    raise ValueError(f"--steps must be integers, got {f.steps}") from None
  run(f.workdir, f.output_dir, image_index=f.image_index, layer=f.layer,
      channel=f.channel, gamma_sq=f.gamma_sq, steps=steps, bits=f.bits,
      which=f.which, map_kind=f.map, num_images=f.num_images,
      data_dir=f.data_dir)


if __name__ == "__main__":
  from train import cli  # pylint: disable=ungrouped-imports
  define_flags()
  cli.run(main)
