"""Semantic segmentation trainer (DeepLabV3, Table 3 of the paper).

    python -m train.main --config=configs/deeplab.py:cityscapes,5w5a \
        --workdir=workdirs/deeplab_5w5a

It is the image-classification loop of :mod:`train.classify` (sharding,
gradual bits, checkpoints with exact resume, metrics, consistency report)
with a segmentation :class:`train.classify.Task` — cross-entropy over the
non-ignored pixels, pixel accuracy and mean IoU from a summed confusion
matrix, the model selected on validation mIoU — and segmentation data
sources:

* ``synthetic``: generated images of coloured shapes on a textured
  background with their label maps (a border of ignored pixels), small
  enough for tests and CPU smoke runs;
* ``cityscapes``: tensorflow-datasets ``cityscapes/semantic_segmentation``
  (manual download into ``config.data.data_dir``), the 19 training classes
  (other ids -> ignore label 255), random crops + flips.  The split is held
  in host memory, optionally resized (``config.data.resize_to``; the full
  1024x2048 train split takes ~19 GB).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdeq_jax import segmentation
from pdeq_jax.data import images as image_data
from train import classify

IGNORE_LABEL = 255

# Cityscapes label id -> train id (the 19 evaluated classes), else ignore.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                        21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
                        28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole",
                      "traffic light", "traffic sign", "vegetation", "terrain",
                      "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")


# ------------------------------------------------------------------ task ---

def segmentation_loss(logits, labels):
  loss = segmentation.softmax_cross_entropy_with_ignore(logits, labels,
                                                        IGNORE_LABEL)
  valid = labels != IGNORE_LABEL
  correct = (jnp.argmax(logits, -1) == labels) & valid
  return loss, {"pixel_acc": jnp.sum(correct) / jnp.maximum(jnp.sum(valid),
                                                            1)}


def segmentation_sums(logits, labels, mask):
  num_classes = logits.shape[-1]
  labels = jnp.where(mask[:, None, None] > 0, labels, IGNORE_LABEL)
  valid = labels != IGNORE_LABEL
  log_probs = jax.nn.log_softmax(logits)
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
  return {"confusion": segmentation.confusion_matrix(
              jnp.argmax(logits, -1), labels, num_classes, IGNORE_LABEL),
          "loss": jnp.sum(jnp.where(valid, nll, 0.0)),
          "pixels": jnp.sum(valid), "count": jnp.sum(mask)}


def segmentation_summary(totals) -> Dict[str, float]:
  conf = jnp.asarray(totals["confusion"])
  miou, _ = segmentation.mean_iou(conf)
  pixels = max(float(totals["pixels"]), 1.0)
  return {"acc": float(segmentation.pixel_accuracy(conf)),
          "miou": float(miou), "loss": float(totals["loss"]) / pixels,
          "count": int(totals["count"])}


SEGMENTATION = classify.Task(segmentation_loss, segmentation_sums,
                             segmentation_summary, select="miou")
TASK = SEGMENTATION  # this trainer's task (see train.tasks)


# ------------------------------------------------------------------ data ---

@dataclasses.dataclass(frozen=True)
class SegmentationData:
  """In-memory images (uint8 NHWC) and label maps (uint8 [N, H, W])."""
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: Tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  name: str

  def __post_init__(self):
    for split in ("train", "val", "test"):
      x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if x.ndim != 4 or y.shape != x.shape[:3]:
        raise ValueError(f"{split}: images {x.shape} and label maps "
                         f"{y.shape} must be [N, H, W, C] and [N, H, W]")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def make_synthetic_segmentation(num_train: int = 32, num_val: int = 8,
                                num_test: int = 8, size: int = 32,
                                num_classes: int = 4, seed: int = 0
                                ) -> SegmentationData:
  """Images of random rectangles whose colour encodes their class.

  Class 0 is the background; a 1-pixel border is labelled ``IGNORE_LABEL``.
  The colours are noisy, so the task needs more than one pixel's evidence.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, (num_classes, 3))

  def make(n):
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
      for _ in range(3):
        c = rng.integers(1, num_classes)
        h, w = rng.integers(size // 6, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        labels[i, y:y + h, x:x + w] = c
    images = palette[labels] + rng.normal(0, 25, (n, size, size, 3))
    labels[:, [0, -1], :] = IGNORE_LABEL
    labels[:, :, [0, -1]] = IGNORE_LABEL
    return np.clip(images, 0, 255).astype(np.uint8), labels

  (tr, ytr), (va, yva), (te, yte) = make(num_train), make(num_val), make(
      num_test)
  mean, std = image_data.channel_mean_std(tr)
  return SegmentationData(tr, ytr, va, yva, te, yte,
                          tuple(f"class{i}" for i in range(num_classes)),
                          mean, std, "synthetic")


def random_crop_flip_pairs(images: np.ndarray, labels: np.ndarray,
                           crop: int, rng: np.random.Generator
                           ) -> Tuple[np.ndarray, np.ndarray]:
  """The same random crop (padding with 0 / ignore if needed) and horizontal
  flip for each image and its label map."""
  n, h, w = labels.shape
  ph, pw = max(crop - h, 0), max(crop - w, 0)
  if ph or pw:
    images = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)))
    labels = np.pad(labels, ((0, 0), (0, ph), (0, pw)),
                    constant_values=IGNORE_LABEL)
    h, w = h + ph, w + pw
  ys = rng.integers(0, h - crop + 1, n)
  xs = rng.integers(0, w - crop + 1, n)
  flips = rng.random(n) < 0.5
  out_x = np.empty((n, crop, crop, images.shape[-1]), images.dtype)
  out_y = np.empty((n, crop, crop), labels.dtype)
  for i in range(n):
    xi = images[i, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop]
    yi = labels[i, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop]
    out_x[i], out_y[i] = (xi[:, ::-1], yi[:, ::-1]) if flips[i] else (xi, yi)
  return out_x, out_y


class SegmentationArraySource:
  """In-memory segmentation data with the trainer's data-source interface
  (see :class:`train.classify.ArraySource`)."""

  def __init__(self, data: SegmentationData, crop_size: int = 0,
               augment: bool = True):
    self.data, self.augment = data, augment
    self.crop = int(crop_size) or data.train_images.shape[1]
    self.name = data.name
    self.num_classes = data.num_classes
    self.image_shape = (self.crop, self.crop, data.train_images.shape[-1])

  def _split(self, split):
    return (getattr(self.data, f"{split}_images"),
            getattr(self.data, f"{split}_labels"))

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def train_batches(self, batch_size: int, seed: int, epoch: int,
                    start_batch: int = 0) -> Iterator[Tuple[np.ndarray, ...]]:
    images, labels = self._split("train")
    order = np.random.default_rng((seed, epoch)).permutation(len(labels))
    for b in range(start_batch, len(labels) // batch_size):
      idx = order[b * batch_size:(b + 1) * batch_size]
      x, y = images[idx], labels[idx]
      if self.augment:
        x, y = random_crop_flip_pairs(
            x, y, self.crop, np.random.default_rng((seed, epoch, b)))
      yield (image_data.normalize(x, self.data.mean, self.data.std),
             y.astype(np.int32))

  def eval_batches(self, split: str, batch_size: int, max_examples: int = 0):
    images, labels = self._split(split)
    if max_examples:
      images, labels = images[:max_examples], labels[:max_examples]
    for start in range(0, len(labels), batch_size):
      # Padded label maps are masked (set to the ignore label) by the task.
      yield image_data.pad_batch(
          (image_data.normalize(images[start:start + batch_size],
                                self.data.mean, self.data.std),
           labels[start:start + batch_size].astype(np.int32)), batch_size)


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Cityscapes label ids -> the 19 train ids, every other id -> 255."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
    lut[label_id] = train_id
  return lut[np.asarray(label_ids, np.uint8)]


def resize_pair(image: np.ndarray, label: np.ndarray,
                size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """Bilinear image and nearest-neighbour label map resize to ``(H, W)``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = size
  img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  lab = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
  return img, lab


def load_cityscapes(data_dir: Optional[str], split: str,
                    max_examples: int = 0,
                    resize_to: Tuple[int, ...] = ()
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Images and train-id label maps of a Cityscapes split via tfds.

  Cityscapes needs a manual download (``leftImg8bit_trainvaltest.zip`` and
  ``gtFine_trainvaltest.zip`` into ``<data_dir>/downloads/manual``).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = tfds.builder("cityscapes/semantic_segmentation",
                           data_dir=data_dir or None)
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        "Cityscapes could not be loaded through tensorflow-datasets "
        f"(data_dir={data_dir!r}): {type(e).__name__}: {e}. Download "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
        "cityscapes-dataset.com into <data_dir>/downloads/manual (TensorFlow "
        "is needed to prepare it), or use config.data.name='synthetic'."
    ) from e
  images, labels = [], []
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if max_examples and i >= max_examples:
      break
    image = ex["image_left"]
    label = cityscapes_train_ids(ex["segmentation_label"][..., 0])
    if resize_to:
      image, label = resize_pair(image, label, tuple(resize_to))
    images.append(image)
    labels.append(label)
  return np.stack(images), np.stack(labels)


def load_data(config: ml_collections.ConfigDict) -> SegmentationData:
  d = config.data
  if d.name == "synthetic":
    return make_synthetic_segmentation(d.num_train, d.num_val, d.num_test,
                                       d.image_size, d.num_classes, d.split_seed)
  if d.name == "cityscapes":
    # Cityscapes has no public test labels: its validation split is the
    # test set of the paper; a held-out part of train selects the model.
    x, y = load_cityscapes(d.data_dir, "train", d.max_train, d.resize_to)
    xt, yt = load_cityscapes(d.data_dir, "validation", d.max_test,
                             d.resize_to)
    n_val = int(round(len(y) * d.val_fraction))
    order = np.random.default_rng(d.split_seed).permutation(len(y))
    val, train = order[:n_val], order[n_val:]
    mean, std = image_data.channel_mean_std(x[train])
    return SegmentationData(x[train], y[train], x[val], y[val], xt, yt,
                            CITYSCAPES_CLASSES, mean, std, "cityscapes")
  raise ValueError(f"config.data.name must be 'synthetic' or 'cityscapes', "
                   f"got {d.name!r}")


def make_source(config: ml_collections.ConfigDict,
                dataset: Optional[SegmentationData] = None
                ) -> SegmentationArraySource:
  data = dataset if dataset is not None else load_data(config)
  return SegmentationArraySource(data, crop_size=config.data.crop_size,
                                 augment=config.data.augment)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps_this_call: Optional[int] = None,
                       verbose: bool = True,
                       dataset: Optional[SegmentationData] = None
                       ) -> Dict[str, Any]:
  """Trains DeepLabV3 (or any dense-output model), selects on val mIoU."""
  classify.check_config(config)
  return classify.run(config, workdir, make_source(config, dataset),
                      SEGMENTATION, max_steps_this_call=max_steps_this_call,
                      verbose=verbose)
