"""Semantic-segmentation metrics and loss (Table 3: pixel accuracy, mIoU).

Pure, jit-able functions.  Labels equal to ``ignore_label`` (255 in
Cityscapes' train ids) are excluded everywhere; so are labels (and
predictions) outside ``[0, num_classes)``, which cannot be reported from
inside ``jit``.

The confusion matrix is ``conf[true, pred]`` (rows: labels, columns:
predictions).  Accumulate it over a dataset (on the host in int64 for very
large sets: one int32 matrix holds up to 2^31 - 1 pixels per entry) and
compute the metrics once at the end, as the Cityscapes protocol does — the
mean of per-image mIoUs is a different number.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def confusion_matrix(pred: Array, label: Array, num_classes: int,
                     ignore_label: int = 255, dtype=jnp.int32) -> Array:
  """``[num_classes, num_classes]`` counts of (label, prediction) pairs.

  Args:
    pred: predicted class ids, any shape (e.g. ``argmax`` of the logits).
    label: ground-truth ids, the same shape as ``pred``.
    num_classes: number of classes (static).
    ignore_label: label value excluded from the counts.
    dtype: integer dtype of the counts.
  """
  if jnp.shape(pred) != jnp.shape(label):
    raise ValueError(f"pred and label must have the same shape, got "
                     f"{jnp.shape(pred)} and {jnp.shape(label)}")
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
  label = jnp.asarray(label).reshape(-1).astype(jnp.int32)
  valid = ((label != ignore_label) & (label >= 0) & (label < num_classes) &
           (pred >= 0) & (pred < num_classes))
  index = jnp.where(valid, label * num_classes + pred, 0)
  counts = jax.ops.segment_sum(valid.astype(dtype), index,
                               num_segments=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def pixel_accuracy(conf: Array) -> Array:
  """Correct pixels / counted pixels (0 when nothing was counted)."""
  conf = jnp.asarray(conf, jnp.float32)
  total = jnp.sum(conf)
  return jnp.where(total > 0, jnp.trace(conf) / jnp.maximum(total, 1.0), 0.0)


def mean_iou(conf: Array) -> Tuple[Array, Array]:
  """``(mIoU, per-class IoU)`` from a confusion matrix.

  ``IoU_c = TP / (TP + FP + FN)``.  A class absent from both labels and
  predictions (``TP + FP + FN = 0``) has IoU ``nan`` and is left out of the
  mean; the mean is 0 when every class is absent.
  """
  conf = jnp.asarray(conf, jnp.float32)
  tp = jnp.diag(conf)
  union = jnp.sum(conf, axis=0) + jnp.sum(conf, axis=1) - tp
  present = union > 0
  iou = jnp.where(present, tp / jnp.where(present, union, 1.0), jnp.nan)
  count = jnp.sum(present)
  total = jnp.sum(jnp.where(present, iou, 0.0))
  miou = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
  return miou, iou


def softmax_cross_entropy_with_ignore(logits: Array, labels: Array,
                                      ignore_label: int = 255) -> Array:
  """Mean softmax cross-entropy over the pixels whose label is not ignored.

  Args:
    logits: ``[..., num_classes]`` (e.g. ``[N, H, W, C]``).
    labels: integer ids, ``logits.shape[:-1]``.
    ignore_label: label value excluded (also any id outside ``[0, C)``).

  Returns:
    A scalar; 0 (with zero gradient) when every pixel is ignored.
  """
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(f"labels must have shape logits.shape[:-1] = "
                     f"{jnp.shape(logits)[:-1]}, got {jnp.shape(labels)}")
  num_classes = logits.shape[-1]
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1)
