"""Image classification data (CIFAR-10/100, Fashion-MNIST, ImageFolder trees)
as numpy arrays.

:func:`load_image_dataset` returns an :class:`ImageDataset`: uint8 NHWC
train / validation / test images, int32 labels, the class names and the
per-channel mean and std of the (final) training images.  The input pipeline
is `grain <https://github.com/google/grain>`_ over those arrays (no
accelerator needed):

* :class:`RecordSource` -- a grain random-access source of ``(image,
  label)`` records over the (memory-mapped or in-memory) decoded arrays.
* :func:`train_dataset` -- one epoch of shuffled, augmented
  (:class:`CropFlip`), normalised batches as a grain ``MapDataset``, a pure
  function of ``(seed, epoch, batch index)``.
* :func:`eval_dataset` -- every example once, the last batch zero-padded and
  masked.
* :func:`loader` -- iterates a dataset with grain's prefetching threads and
  optional worker processes; the iterator's state (``get_state``) is what
  the trainers checkpoint for an exact mid-epoch resume.
  :func:`train_batches` / :func:`eval_batches` combine the two.

Datasets (the ``name`` argument of :func:`load_image_dataset`):

* ``"cifar10_jpeg"`` -- an offline copy of CIFAR-10 stored as JPEG files,
  ``cifar10-jpeg.tar.xz`` holding ``cifar10-jpeg/{train,test}/<class>/*.jpg``
  (or that tree already extracted).  It is looked for in ``data_dir`` if given,
  else in ``$PDEQ_DATA_DIR`` if set, else in the ``shared/data`` directory
  beside the repository (the development layout).  The first load decodes
  the JPEGs straight out of the archive stream (no extraction to disk: 60k
  small files cost more to write than to decode) in a process pool and stores
  uint8 ``.npy`` files in the cache; later loads read those (well under 2 s
  for the whole of CIFAR-10, memory-mapped so small subsets are faster still).
* ``"fashion_mnist"`` -- Fashion-MNIST (Zalando; 60k training and 10k test
  grayscale 28x28x1 images, 10 classes) from its four IDX files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (each gzipped, ``.gz``,
  or not).  Offline provenance: Debian's package ``dataset-fashion-mnist``
  (version ``0.0~git20200523.55506a9-1``, ``apt-get install -y
  dataset-fashion-mnist``) installs them, gzipped, in
  ``/usr/share/datasets/fashion-mnist``.  Looked for in ``<d>/fashion-mnist``
  and ``<d>`` for each of the :func:`candidate_dirs`, then in that Debian
  directory; a missing file raises ``FileNotFoundError`` naming every path
  tried and the apt command.  Read by :func:`read_idx` on every load (about
  a second; no cache entry).  Class names are the dataset's own.
  Augmentation (crop/flip) is the trainer's choice:
  ``configs/fashion_mnist.py`` turns it off.
* ``"imagefolder:<root>"`` -- any tree ``<root>/{train,test}/<class>/*.png``
  (or ``.jpg`` / ``.jpeg``); class names are the sorted sub-directory names and
  must be the same in both splits; all images must have the same size (they
  are converted to RGB).  Decoded arrays are cached too, under a key made from
  the absolute root and the name, size and mtime of every file, so editing the
  tree invalidates the cache.
* ``"cifar10"`` / ``"cifar100"`` -- through tensorflow-datasets, which
  downloads on first use (needs internet; ``data_dir`` is passed through as
  the tfds data directory).

The cache lives in ``cache_dir`` if given, else ``$PDEQ_CACHE_DIR``, else
``~/.cache/pdeq_jax``, under ``images/``.  Every cache entry is written to a
temporary directory and renamed into place, so an interrupted decoding never
leaves a half-written entry; concurrent loaders of the same
entry serialise on a lock file (where ``fcntl`` exists) so the work is done
once.

The validation split is a class-stratified ``val_fraction`` of the training
set (``round(val_fraction * n_c)`` examples of each class ``c``), drawn with
``split_seed``; ``max_train`` / ``max_val`` / ``max_test`` then take
deterministic class-balanced subsets (for tests and CPU runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import lzma
import os
import pathlib
import shutil
import tarfile
import tempfile
import warnings
from concurrent import futures
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import grain
import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]

# Same variable as ``pdeq_jax.data.planetoid.ENV_VAR``; not imported from there
# because planetoid pulls in jraph (and so JAX), and this module is imported by
# the decoding worker processes, which should start fast.
ENV_VAR = "PDEQ_DATA_DIR"
CACHE_ENV_VAR = "PDEQ_CACHE_DIR"
DEFAULT_CACHE = pathlib.Path("~/.cache/pdeq_jax")
# The development layout keeps the offline datasets beside the repository:
# <parent>/{main (this repository), shared/data}.
SIBLING_DATA_DIR = (pathlib.Path(__file__).resolve().parents[3] / "shared" /
                    "data")

CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.xz"
CIFAR10_JPEG_DIR = "cifar10-jpeg"
TFDS_NAMES = ("cifar10", "cifar100")
FASHION_MNIST_DIR = "fashion-mnist"
# Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KNOWN_NAMES = ("cifar10_jpeg", "fashion_mnist",
               "imagefolder:<root>") + TFDS_NAMES
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")

# Bump when the layout or content of the decoded cache changes.
CACHE_VERSION = 1
_ARRAY_KEYS = ("train_images", "train_labels", "train_sums", "test_images",
               "test_labels", "test_sums")
# Below this many files decoding runs in-process (a pool costs ~0.3 s).
_MIN_PARALLEL_FILES = 2048


# --------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class ImageDataset:
  """An image classification dataset held in memory.

  Attributes:
    train_images, val_images, test_images: uint8 [N, H, W, C] (C is 1 for
      fashion_mnist, 3 for the other loaders).
    train_labels, val_labels, test_labels: int32 [N] class ids.
    class_names: the class names; label ``k`` is ``class_names[k]``.
    mean: float32 [C], per-channel mean of ``train_images / 255``.
    std: float32 [C], per-channel std of ``train_images / 255``.
    name: the dataset name it was loaded under.
  """
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
    shape = None
    for split in ("train", "val", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      _check_images(images, f"{split}_images")
      _check_labels(labels, images, f"{split}_labels")
      if shape is None:
        shape = images.shape[1:]
      elif images.shape[1:] != shape:
        raise ValueError(f"{split}_images have shape {images.shape[1:]} per "
                         f"image, train_images {shape}")
      if labels.size and (labels.min() < 0
                          or labels.max() >= len(self.class_names)):
        raise ValueError(f"{split}_labels outside [0, {len(self.class_names)})")
    for stat in ("mean", "std"):
      if np.shape(getattr(self, stat)) != (shape[-1],):
        raise ValueError(f"{stat} must have shape ({shape[-1]},), got "
                         f"{np.shape(getattr(self, stat))}")

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(int(d) for d in self.train_images.shape[1:])

  def summary(self) -> str:
    """One line: name, split sizes, image shape and classes."""
    h, w, c = self.image_shape
    return (f"{self.name}: train/val/test {len(self.train_labels)}/"
            f"{len(self.val_labels)}/{len(self.test_labels)} images of "
            f"{h}x{w}x{c}, {self.num_classes} classes")

  def __repr__(self) -> str:
    return f"ImageDataset({self.summary()})"


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_images(images: Any, what: str = "images") -> None:
  """Raises ValueError unless ``images`` is a uint8 NHWC array, C in {1, 3}."""
  if not isinstance(images, np.ndarray):
    raise ValueError(f"{what} must be a numpy array, got {type(images)}")
  if images.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8, got {images.dtype}")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{what} must be NHWC with 1 or 3 channels, got shape "
                     f"{images.shape}")


def _check_labels(labels: Any, images: np.ndarray,
                  what: str = "labels") -> None:
  if not isinstance(labels, np.ndarray) or labels.ndim != 1:
    raise ValueError(f"{what} must be a 1-D numpy array, got "
                     f"{getattr(labels, 'shape', type(labels))}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got {labels.dtype}")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(f"{what} has {labels.shape[0]} entries but there are "
                     f"{images.shape[0]} images")


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size,
                                                    (int, np.integer)):
    raise ValueError(f"batch_size must be an int, got {batch_size!r}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return int(batch_size)


def _check_seed(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} must be a non-negative int, got {value!r}")
  if value < 0:
    raise ValueError(f"{what} must be non-negative, got {value}")
  return int(value)


def _check_entropy(value: Any, what: str) -> Union[int, Tuple[int, ...]]:
  """A non-negative int or a tuple of them (``np.random.default_rng`` seed)."""
  if isinstance(value, (tuple, list)):
    return tuple(_check_seed(v, what) for v in value)
  return _check_seed(value, what)


def _check_max(value: Any, what: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} must be None or a positive int, got {value!r}")
  if value < 1:
    raise ValueError(f"{what} must be None or a positive int, got {value}")
  return int(value)


def _stats_vector(value: Any, channels: int, what: str) -> np.ndarray:
  vec = np.asarray(value, np.float32)
  if vec.ndim > 1 or (vec.ndim == 1 and vec.shape[0] not in (1, channels)):
    raise ValueError(f"{what} must be a scalar or have {channels} entries, "
                     f"got shape {vec.shape}")
  return vec


# --------------------------------------------------------------------------
# Normalisation, augmentation and batching
# --------------------------------------------------------------------------


def normalize(images_uint8: np.ndarray, mean: Any, std: Any) -> np.ndarray:
  """``(images / 255 - mean) / std`` in float32.

  Args:
    images_uint8: uint8 array whose last axis is the channel axis.
    mean, std: per-channel statistics of ``images / 255`` (scalars or [C]).

  Returns:
    float32 array of the same shape.
  """
  if not isinstance(images_uint8, np.ndarray) or images_uint8.dtype != np.uint8:
    raise ValueError("normalize expects a uint8 numpy array, got "
                     f"{getattr(images_uint8, 'dtype', type(images_uint8))}")
  if images_uint8.ndim < 1:
    raise ValueError("normalize expects an array with a channel axis")
  channels = images_uint8.shape[-1]
  mean = _stats_vector(mean, channels, "mean")
  std = _stats_vector(std, channels, "std")
  if np.any(std <= 0) or not np.all(np.isfinite(std)):
    raise ValueError(f"std must be positive and finite, got {std}")
  out = images_uint8.astype(np.float32)
  out *= np.float32(1.0 / 255.0)
  out -= mean
  out /= std
  return out


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, *,
                     pad: int = 4, flip: bool = True) -> np.ndarray:
  """Random ``pad``-pixel translation (zero padding) and horizontal flip of
  one image.

  The image is (virtually) zero-padded by ``pad`` on every side and an
  ``H x W`` window at a uniformly random offset in ``[0, 2 pad]^2`` is cut
  out; then, if ``flip``, it is mirrored left-right with probability 1/2.
  Draws from ``rng`` in this order: the row and column offsets (one
  ``integers`` call of size 2), then (if ``flip``) one uniform.

  Args:
    image: uint8 [H, W, C].
    rng: the generator to draw from.
    pad: padding in pixels (0: no translation).
    flip: whether to flip.

  Returns:
    uint8 [H, W, C], a new array.
  """
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or \
      image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError("random_crop_flip expects a uint8 HWC image with 1 or 3 "
                     f"channels, got {getattr(image, 'dtype', type(image))} "
                     f"{getattr(image, 'shape', '')}")
  if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
    raise ValueError(f"pad must be a non-negative int, got {pad!r}")
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy Generator, got {type(rng)}")
  h, w = image.shape[:2]
  if pad == 0 and not flip:
    return image.copy()
  dy, dx = (v - pad for v in rng.integers(0, 2 * pad + 1, size=2).tolist())
  out = np.zeros(image.shape, np.uint8)
  # output pixel (i, j) is input pixel (i + dy, j + dx), zero outside
  out[max(-dy, 0):max(h - dy, 0), max(-dx, 0):max(w - dx, 0)] = \
      image[max(dy, 0):max(h + dy, 0), max(dx, 0):max(w + dx, 0)]
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (:func:`train_dataset` drops the remainder)."""
  batch_size = _check_batch_size(batch_size)
  if isinstance(num_examples, bool) or not isinstance(
      num_examples, (int, np.integer)) or num_examples < 0:
    raise ValueError(f"num_examples must be a non-negative int, got "
                     f"{num_examples!r}")
  return int(num_examples) // batch_size


def pad_batch(arrays: Sequence[np.ndarray], batch_size: int
              ) -> Tuple[np.ndarray, ...]:
  """Zero-pads every array along axis 0 to ``batch_size``; appends the mask.

  Returns ``(*padded arrays, float32 [batch_size] mask)``, the mask 1 for
  the real rows and 0 for the padding (every evaluation source's last
  batch goes through here).
  """
  real = arrays[0].shape[0]
  mask = (np.arange(batch_size) < real).astype(np.float32)
  if real == batch_size:
    return (*arrays, mask)
  return (*(np.concatenate([a, np.zeros((batch_size - real,) + a.shape[1:],
                                        a.dtype)]) for a in arrays), mask)


# --------------------------------------------------------------------------
# The input pipeline (grain)
# --------------------------------------------------------------------------

# Threads that read, augment and collate batches ahead of the consumer.  On a
# 2-core machine one thread hides the input work behind the train step; more
# only help on larger machines (see benchmarks/input_pipeline.py).
DEFAULT_THREADS = 1


class RecordSource(grain.sources.RandomAccessDataSource):
  """grain random-access source: record ``i`` is ``(uint8 [H, W, C] image,
  int32 label)`` of the given arrays (in memory or memory-mapped)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    _check_images(images)
    _check_labels(labels, images)
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index):
    return self.images[index], np.int32(self.labels[index])

  def __repr__(self) -> str:
    return f"RecordSource({self.images.shape[0]} images)"


class CropFlip(grain.transforms.RandomMap):
  """grain transform: :func:`random_crop_flip` on the record's image, with
  the per-record generator grain derives from (seed, record index)."""

  def __init__(self, pad: int = 4, flip: bool = True):
    self.pad, self.flip = pad, flip

  def random_map(self, element, rng: np.random.Generator):
    image, label = element
    return random_crop_flip(image, rng, pad=self.pad, flip=self.flip), label


class Collate:
  """grain batch function: stacks records into ``(float32 [B, H, W, C]
  normalised images, int32 [B] labels)`` (normalisation vectorised over the
  batch); with ``pad_to``, zero-pads to that size and appends the mask (see
  :func:`pad_batch`)."""

  def __init__(self, mean: Any, std: Any, pad_to: Optional[int] = None):
    self.mean, self.std, self.pad_to = mean, std, pad_to

  def __call__(self, records):
    return self.arrays(np.stack([r[0] for r in records]),
                       np.fromiter((r[1] for r in records), np.int32,
                                   len(records)))

  def arrays(self, images: np.ndarray, labels: np.ndarray):
    """The batch of uint8 ``images`` and their ``labels``."""
    x = normalize(np.asarray(images), self.mean, self.std)
    y = np.asarray(labels, np.int32)
    return (x, y) if self.pad_to is None else pad_batch((x, y), self.pad_to)


class _Slice:
  """grain map: batch index ``b`` -> :class:`Collate` of records ``[b B,
  (b + 1) B)`` of ``source``, read as one slice (evaluation needs no
  per-record work)."""

  def __init__(self, source: RecordSource, batch_size: int, collate: Collate):
    self.source, self.batch_size, self.collate = source, batch_size, collate

  def __call__(self, b):
    part = slice(int(b) * self.batch_size, (int(b) + 1) * self.batch_size)
    return self.collate.arrays(self.source.images[part],
                               self.source.labels[part])


def _derived_seed(*entropy: int) -> int:
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def train_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  seed: int, epoch: int, mean: Any, std: Any,
                  augment: bool = True) -> "grain.MapDataset":
  """The batches of one training epoch as a grain ``MapDataset``.

  The records are shuffled by grain's ``MapDataset.shuffle`` seeded from
  ``(seed, epoch)``, and batched with the last incomplete batch dropped.
  With ``augment`` every record gets a random 4-pixel crop and flip
  (:class:`CropFlip`) from a generator grain derives from a seed of ``(seed,
  epoch)`` and the record's position in the epoch, so batch ``b`` of epoch
  ``e`` is a pure function of ``(seed, e, b)``.  Arguments are checked here.

  Returns:
    A ``MapDataset`` of ``steps_per_epoch(N, B)`` batches ``(float32 [B, H,
    W, C] normalised images, int32 [B] labels)``.
  """
  source = RecordSource(images, labels)
  batch_size = _check_batch_size(batch_size)
  seed = _check_seed(seed, "seed")
  epoch = _check_seed(epoch, "epoch")
  mean = _stats_vector(mean, images.shape[-1], "mean")
  std = _stats_vector(std, images.shape[-1], "std")
  ds = grain.MapDataset.source(source).shuffle(
      seed=_derived_seed(seed, epoch, 0))
  if augment:
    ds = ds.random_map(CropFlip(), seed=_derived_seed(seed, epoch, 1))
  return ds.batch(batch_size, drop_remainder=True,
                  batch_fn=Collate(mean, std))


def eval_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 mean: Any, std: Any) -> "grain.MapDataset":
  """Every example once, in order, as a grain ``MapDataset`` of batches
  ``(float32 [B, H, W, C] normalised images, int32 [B] labels, float32 [B]
  mask)``; the last batch is zero-padded to ``batch_size`` and masked."""
  source = RecordSource(images, labels)
  batch_size = _check_batch_size(batch_size)
  mean = _stats_vector(mean, images.shape[-1], "mean")
  std = _stats_vector(std, images.shape[-1], "std")
  return grain.MapDataset.range(-(-len(source) // batch_size)).map(
      _Slice(source, batch_size, Collate(mean, std, pad_to=batch_size)))


def _check_count(value: Any, what: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < low:
    raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
  return int(value)


def loader(dataset: "grain.MapDataset", *, threads: int = DEFAULT_THREADS,
           prefetch: int = 2, workers: int = 0) -> "grain.DatasetIterator":
  """Iterates ``dataset`` with grain: ``threads`` threads compute up to
  ``prefetch`` elements ahead (0 threads: in the consumer's thread, nothing
  ahead); ``workers > 0`` adds that many worker processes
  (``mp_prefetch``), each ``prefetch`` elements ahead.

  The iterator's ``get_state()`` / ``set_state()`` give its position for
  checkpoints; ``close()`` stops its threads and processes.
  """
  threads = _check_count(threads, "threads", 0)
  prefetch = _check_count(prefetch, "prefetch", 1)
  workers = _check_count(workers, "workers", 0)
  ds = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=prefetch if threads else 0))
  if workers:
    # grain reads an absl flag in its workers; programs without absl
    # flag parsing (tests, notebooks) would fail on it.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch))
  return iter(ds)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  seed: int, epoch: int, mean: Any, std: Any,
                  augment: bool = True, start_batch: int = 0,
                  threads: int = DEFAULT_THREADS, prefetch: int = 2,
                  workers: int = 0) -> "grain.DatasetIterator":
  """:func:`train_dataset` through :func:`loader`, from batch ``start_batch``.

  ``start_batch=k`` yields exactly the batches ``k, k+1, ...`` of the full
  epoch (exact resumption mid-epoch); a checkpointed ``get_state()`` of the
  returned iterator restored with ``set_state()`` does the same.
  """
  ds = train_dataset(images, labels, batch_size, seed=seed, epoch=epoch,
                     mean=mean, std=std, augment=augment)
  if isinstance(start_batch, bool) or not isinstance(
      start_batch, (int, np.integer)) or not 0 <= start_batch <= len(ds):
    raise ValueError(f"start_batch must be an int in [0, {len(ds)}], got "
                     f"{start_batch!r}")
  it = loader(ds, threads=threads, prefetch=prefetch, workers=workers)
  if start_batch and not workers:
    it.set_state({"next_index": int(start_batch)})
  else:  # the worker processes' state is theirs to define: skip ahead
    for _ in range(start_batch):
      next(it)
  return it


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 mean: Any, std: Any, threads: int = DEFAULT_THREADS,
                 prefetch: int = 2, workers: int = 0
                 ) -> "grain.DatasetIterator":
  """:func:`eval_dataset` through :func:`loader`."""
  return loader(eval_dataset(images, labels, batch_size, mean=mean, std=std),
                threads=threads, prefetch=prefetch, workers=workers)


# --------------------------------------------------------------------------
# Splits and statistics
# --------------------------------------------------------------------------


def _class_ranks(labels: np.ndarray, rng: np.random.Generator):
  """The example indices in random order grouped by class (``order``), the
  rank of each within its class in that order, its class position (index
  into ``classes``) and the sorted distinct labels ``classes``."""
  perm = rng.permutation(labels.shape[0])
  order = perm[np.argsort(labels[perm], kind="stable")]
  sorted_labels = labels[order]
  classes, starts = np.unique(sorted_labels, return_index=True)
  class_pos = np.searchsorted(classes, sorted_labels)
  rank = np.arange(labels.shape[0]) - starts[class_pos]
  return order, rank, class_pos, classes


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: Union[int, Sequence[int]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Holds out ``round(fraction * n_c)`` random examples of each class c.

  Args:
    labels: integer [N].
    fraction: in [0, 1).
    seed: non-negative int (or tuple of them) seeding
      ``np.random.default_rng``.

  Returns:
    ``(kept, held_out)``: sorted int64 index arrays partitioning ``[0, N)``.
  """
  labels = np.asarray(labels)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")
  seed = _check_entropy(seed, "seed")
  if labels.shape[0] == 0:
    empty = np.zeros(0, np.int64)
    return empty, empty
  order, rank, class_pos, _ = _class_ranks(labels,
                                           np.random.default_rng(seed))
  counts = np.bincount(class_pos)
  take = np.floor(fraction * counts + 0.5).astype(np.int64)
  held = rank < take[class_pos]
  return np.sort(order[~held]), np.sort(order[held])


def balanced_subset(labels: np.ndarray, size: int,
                    seed: Union[int, Sequence[int]]) -> np.ndarray:
  """A class-balanced random subset of ``size`` examples.

  Examples are taken round-robin over the classes (in label order), each
  class in a random order, so class counts differ by at most one unless a
  class runs out.

  Args:
    labels: integer [N].
    size: number of examples wanted (>= 0).
    seed: non-negative int (or tuple of them) seeding
      ``np.random.default_rng``.

  Returns:
    Sorted int64 indices (all of ``[0, N)`` if ``size >= N``).
  """
  labels = np.asarray(labels)
  seed = _check_entropy(seed, "seed")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or \
      size < 0:
    raise ValueError(f"size must be a non-negative int, got {size!r}")
  n = labels.shape[0]
  if size >= n:
    return np.arange(n, dtype=np.int64)
  order, rank, class_pos, classes = _class_ranks(labels,
                                                 np.random.default_rng(seed))
  key = rank * len(classes) + class_pos
  chosen = order[np.argsort(key, kind="stable")[:size]]
  return np.sort(chosen).astype(np.int64)


def _pixel_sums(images: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """int64 [N, C, 2]: per image and channel, the sum of the pixel values and
  of their squares (exact: float64 holds these integers exactly for images
  below ~2e9 pixels; the statistics of a subset are sums of its rows)."""
  n, c = images.shape[0], images.shape[-1]
  pixels = int(np.prod(images.shape[1:-1]))
  out = np.empty((n, c, 2), np.int64)
  for start in range(0, n, chunk):
    x = np.asarray(images[start:start + chunk]).reshape(-1, pixels, c)
    x = x.astype(np.float64)
    out[start:start + x.shape[0], :, 0] = np.einsum("npc->nc", x)
    out[start:start + x.shape[0], :, 1] = np.einsum("npc,npc->nc", x, x)
  return out


def _mean_std_from_sums(sums: np.ndarray, pixels_per_image: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
  count = float(sums.shape[0]) * pixels_per_image
  if count == 0:
    raise ValueError("cannot compute channel statistics of zero images")
  total = sums.sum(axis=0).astype(np.float64)  # [C, 2]
  mean = total[:, 0] / count
  var = np.maximum(total[:, 1] / count - mean * mean, 0.0)
  std = np.sqrt(var) / 255.0
  std = np.where(std > 0, std, 1.0)  # constant channel: leave it unscaled
  return (mean / 255.0).astype(np.float32), std.astype(np.float32)


def channel_mean_std(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``images / 255`` (float32 [C] each).

  Computed exactly from integer sums; a constant channel gets std 1.
  """
  _check_images(images)
  return _mean_std_from_sums(_pixel_sums(images),
                             int(np.prod(images.shape[1:3])))


# --------------------------------------------------------------------------
# Locating data, the cache
# --------------------------------------------------------------------------


def cache_root(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """``cache_dir``, else ``$PDEQ_CACHE_DIR``, else ``~/.cache/pdeq_jax``."""
  if cache_dir is not None and str(cache_dir):
    return pathlib.Path(cache_dir).expanduser()
  if os.environ.get(CACHE_ENV_VAR):
    return pathlib.Path(os.environ[CACHE_ENV_VAR]).expanduser()
  return DEFAULT_CACHE.expanduser()


def candidate_dirs(data_dir: Optional[PathLike] = None) -> List[pathlib.Path]:
  """The directories searched for offline data.

  Only ``data_dir`` when given; else only ``$PDEQ_DATA_DIR`` when set; else
  the ``shared/data`` directory beside the repository.
  """
  if data_dir is not None and str(data_dir):
    return [pathlib.Path(data_dir).expanduser()]
  if os.environ.get(ENV_VAR):
    return [pathlib.Path(os.environ[ENV_VAR]).expanduser()]
  return [SIBLING_DATA_DIR]


def _locate_cifar10_jpeg(data_dir: Optional[PathLike]) -> pathlib.Path:
  """The archive (preferred) or the extracted tree of cifar10_jpeg."""
  tried = []
  for d in candidate_dirs(data_dir):
    archive = d / CIFAR10_JPEG_ARCHIVE
    tree = d / CIFAR10_JPEG_DIR
    if archive.is_file():
      return archive
    if (tree / "train").is_dir():
      return tree
    tried += [archive, tree]
  how = ("data_dir" if data_dir is not None and str(data_dir) else
         f"${ENV_VAR}" if os.environ.get(ENV_VAR) else
         f"the default (data_dir unset, ${ENV_VAR} unset)")
  raise FileNotFoundError(
      f"cifar10_jpeg data not found (searched {how}). Tried:\n"
      + "\n".join(f"  {p}" for p in tried)
      + f"\nTo fix: pass data_dir=<dir holding {CIFAR10_JPEG_ARCHIVE} or an "
      f"extracted {CIFAR10_JPEG_DIR}/{{train,test}}/<class>/*.jpg tree>, or "
      f"set ${ENV_VAR} to that directory.")


def _digest(parts: Sequence[Any]) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(str(p).encode("utf-8", "surrogateescape"))
    h.update(b"\0")
  return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Exclusive advisory lock on ``path``; yields whether it is really held
  (False where fcntl or flock is unavailable, e.g. Windows, some NFS)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield False
    return
  with open(path, "a+b") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except OSError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(parent: pathlib.Path, entry: str) -> None:
  """Removes temporary directories of ``entry`` left by crashed runs (call
  only while holding the entry's lock)."""
  for p in parent.glob(f".{entry}.tmp-*"):
    shutil.rmtree(p, ignore_errors=True)


class _Raw(NamedTuple):
  """Decoded full train/test splits plus per-image pixel sums."""
  train_images: np.ndarray
  train_labels: np.ndarray
  train_sums: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_sums: np.ndarray
  class_names: Tuple[str, ...]


def _write_entry(dest: pathlib.Path, raw: _Raw, source: str) -> None:
  """Writes ``raw`` as ``.npy`` files into a temporary directory, then
  renames it to ``dest`` (another writer winning the race is fine)."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent,
                                      prefix=f".{dest.name}.tmp-"))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    for key in _ARRAY_KEYS:
      np.save(tmp / f"{key}.npy", getattr(raw, key), allow_pickle=False)
    meta = {"version": CACHE_VERSION, "class_names": list(raw.class_names),
            "source": source,
            "image_shape": [int(d) for d in raw.train_images.shape[1:]],
            "num_train": int(raw.train_images.shape[0]),
            "num_test": int(raw.test_images.shape[0])}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      os.rename(tmp, dest)
    except OSError:
      if not (dest / "meta.json").is_file():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # written meanwhile by another
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_entry(dest: pathlib.Path) -> Optional[_Raw]:
  """The cached arrays in ``dest`` (images memory-mapped), or None if the
  entry is absent, of another version or unreadable."""
  meta_path = dest / "meta.json"
  if not meta_path.is_file():
    return None
  try:
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != CACHE_VERSION:
      return None
    arrays = {key: np.load(dest / f"{key}.npy", allow_pickle=False,
                           mmap_mode="r" if key.endswith("images") else None)
              for key in _ARRAY_KEYS}
    for split in SPLITS:
      n = meta[f"num_{split}"]
      if any(arrays[f"{split}_{k}"].shape[0] != n
             for k in ("images", "labels", "sums")):
        raise ValueError(f"{split} arrays do not have {n} rows")
    return _Raw(class_names=tuple(meta["class_names"]), **arrays)
  except (OSError, ValueError, KeyError, TypeError) as e:
    warnings.warn(f"ignoring unreadable image cache {dest} "
                  f"({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
    return None


def _cached(entry: str, cache: pathlib.Path, build, source: str) -> _Raw:
  """Reads cache entry ``images/<entry>``, building it once (under a lock)
  with ``build()`` if missing."""
  parent = cache / "images"
  dest = parent / entry
  raw = _read_entry(dest)
  if raw is not None:
    return raw
  with _file_lock(parent / f".{entry}.lock") as locked:
    raw = _read_entry(dest)  # built meanwhile by another process?
    if raw is not None:
      return raw
    if locked:
      _remove_stale_temporaries(parent, entry)
    if dest.exists():  # unreadable or stale version
      shutil.rmtree(dest, ignore_errors=True)
    raw = build()
    _write_entry(dest, raw, source)
    return raw


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

# An image to decode: a file path, or (name for messages, encoded bytes).
Source = Union[str, Tuple[str, bytes]]


def _source_name(source: Source) -> str:
  return source if isinstance(source, str) else source[0]


def _open_image(source: Source) -> Image.Image:
  if isinstance(source, str):
    return Image.open(source)
  return Image.open(io.BytesIO(source[1]))


def _image_size(source: Source) -> Tuple[int, int]:
  """(W, H) of one image."""
  try:
    with _open_image(source) as im:
      return im.size
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot decode image {_source_name(source)}: "
                     f"{type(e).__name__}: {e}") from None


class _SizeMismatch(Exception):
  pass


def _decode_chunk(sources: Sequence[Source], size: Tuple[int, int]
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes ``sources`` (all of ``size`` = (W, H)) to RGB.

  Returns:
    ``(uint8 [n, H, W, 3] images, int64 [n, 3, 2] pixel sums)`` (see
    :func:`_pixel_sums`).

  Raises:
    ValueError: naming the file that cannot be decoded or has another size.
  """
  w, h = size
  out = np.empty((len(sources), h, w, 3), np.uint8)
  for i, source in enumerate(sources):
    try:
      with _open_image(source) as im:
        if im.size != (w, h):
          raise _SizeMismatch(
              f"image {_source_name(source)} is {im.size[0]}x{im.size[1]} "
              f"(WxH) but the first image is {w}x{h}: all images must have "
              f"the same size")
        if im.mode != "RGB":
          im = im.convert("RGB")
        out[i] = np.asarray(im)
    except _SizeMismatch as e:
      raise ValueError(str(e)) from None
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot decode image {_source_name(source)}: "
                       f"{type(e).__name__}: {e}") from None
  return out, _pixel_sums(out)


def _default_workers() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)


def _make_executor(workers: int) -> futures.Executor:
  """A pool of threads: Pillow decodes JPEG/PNG without holding the GIL.

  (Forked processes are unsafe once JAX, which is multithreaded, has been
  imported, and spawned ones would re-run an unguarded main script.)
  """
  return futures.ThreadPoolExecutor(workers,
                                    thread_name_prefix="pdeq-decode")


def _decode_chunks(chunks: Iterable[Sequence[Source]],
                   size: Optional[Tuple[int, int]] = None,
                   num_workers: Optional[int] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes chunks of images as they arrive, in a pool of workers.

  The pool (``num_workers`` workers, default the usable CPUs; see
  :func:`_make_executor`) is started only once a second chunk arrives, so
  small inputs are decoded in-process; if it cannot start or breaks,
  decoding continues in-process.

  Args:
    chunks: lists of sources; may be a generator (e.g. reading an archive,
      overlapped with decoding).
    size: required (W, H); default that of the first image.
    num_workers: workers; <= 1 decodes in-process.

  Returns:
    ``(uint8 [N, H, W, 3], int64 [N, 3, 2] pixel sums)`` in input order.

  Raises:
    ValueError: a file cannot be decoded or has another size (named).
  """
  workers = _default_workers() if num_workers is None else int(num_workers)
  executor: Optional[futures.Executor] = None
  use_pool = workers > 1
  pending: List[Any] = []  # [chunk, future or None]
  first: Optional[Sequence[Source]] = None

  def fall_back(error: BaseException) -> None:
    nonlocal use_pool
    if use_pool:
      warnings.warn(f"decoding pool failed ({type(error).__name__}: {error}); "
                    f"decoding in-process", stacklevel=4)
    use_pool = False

  def submit(chunk) -> None:
    nonlocal executor
    future = None
    if use_pool:
      try:
        if executor is None:
          executor = _make_executor(workers)
        future = executor.submit(_decode_chunk, chunk, size)
      except (OSError, ValueError, NotImplementedError,
              futures.BrokenExecutor) as e:
        fall_back(e)
    pending.append([chunk, future])

  try:
    for chunk in chunks:
      if not chunk:
        continue
      if size is None:
        size = _image_size(chunk[0])
      if first is None and use_pool and not pending:
        first = chunk  # wait for a second chunk before starting the pool
        continue
      if first is not None:
        submit(first)
        first = None
      submit(chunk)
    if first is not None:
      use_pool = False
      submit(first)
    if not pending:
      w, h = size if size is not None else (0, 0)
      return (np.zeros((0, h, w, 3), np.uint8),
              np.zeros((0, 3, 2), np.int64))
    images, sums = [], []
    for entry in pending:
      chunk, future = entry
      result = None
      if future is not None:
        try:
          result = future.result()
        except futures.BrokenExecutor as e:
          fall_back(e)
      if result is None:
        result = _decode_chunk(chunk, size)
      entry.clear()  # free the encoded bytes early
      images.append(result[0])
      sums.append(result[1])
    return np.concatenate(images), np.concatenate(sums)
  finally:
    if executor is not None:
      executor.shutdown(wait=True, cancel_futures=True)


def _chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


_CHUNK = 1024


def _check_class_sets(train: Sequence[str], test: Sequence[str],
                      where: str) -> None:
  if sorted(train) != sorted(test):
    only_train = sorted(set(train) - set(test))
    only_test = sorted(set(test) - set(train))
    raise ValueError(
        f"{where}: train/ and test/ have different classes; only in train: "
        f"{only_train}, only in test: {only_test}")


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------


class _Scan(NamedTuple):
  class_names: Tuple[str, ...]
  files: Dict[str, List[str]]  # split -> paths, sorted by (class, name)
  labels: Dict[str, np.ndarray]
  signature: str  # hash of every file's relative path, size and mtime


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_image_folder(root: pathlib.Path) -> _Scan:
  """Lists ``root/{train,test}/<class>/<image>``; checks the class sets."""
  if not root.is_dir():
    raise FileNotFoundError(f"image folder root {root} is not a directory")
  classes: Dict[str, List[str]] = {}
  for split in SPLITS:
    split_dir = root / split
    if not split_dir.is_dir():
      raise FileNotFoundError(
          f"image folder {root} has no {split}/ directory (expected "
          f"{root}/{{train,test}}/<class>/*.png|jpg|jpeg; missing {split_dir})")
    with os.scandir(split_dir) as it:
      classes[split] = sorted(e.name for e in it
                              if e.is_dir() and not e.name.startswith("."))
    if not classes[split]:
      raise ValueError(f"{split_dir} has no class sub-directories")
  _check_class_sets(classes["train"], classes["test"], f"image folder {root}")
  class_names = tuple(classes["train"])
  files: Dict[str, List[str]] = {}
  labels: Dict[str, np.ndarray] = {}
  signature = hashlib.sha256(str(root).encode("utf-8", "surrogateescape"))
  for split in SPLITS:
    paths, ids = [], []
    for k, name in enumerate(class_names):
      class_dir = root / split / name
      with os.scandir(class_dir) as it:
        entries = sorted((e for e in it if _is_image(e.name) and e.is_file()),
                         key=lambda e: e.name)
      for e in entries:
        st = e.stat()
        signature.update(f"{split}/{name}/{e.name}\0{st.st_size}\0"
                         f"{st.st_mtime_ns}\n".encode("utf-8",
                                                      "surrogateescape"))
      paths += [os.path.join(class_dir, e.name) for e in entries]
      ids += [k] * len(entries)
    files[split] = paths
    labels[split] = np.asarray(ids, np.int32)
  if not files["train"]:
    raise ValueError(f"image folder {root}: train/ holds no images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")
  return _Scan(class_names, files, labels, signature.hexdigest()[:16])


def _decode_scan(scan: _Scan) -> _Raw:
  train, train_sums = _decode_chunks(_chunked(scan.files["train"], _CHUNK))
  size = (train.shape[2], train.shape[1])
  test, test_sums = _decode_chunks(_chunked(scan.files["test"], _CHUNK), size)
  return _Raw(train, scan.labels["train"], train_sums, test,
              scan.labels["test"], test_sums, scan.class_names)


def _safe_name(text: str) -> str:
  keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
  return keep[:40] or "root"


def _load_image_folder(root: PathLike, cache: pathlib.Path) -> _Raw:
  root = pathlib.Path(root).expanduser().resolve()
  scan = _scan_image_folder(root)
  entry = (f"imagefolder-{_safe_name(root.name)}-"
           f"{_digest([CACHE_VERSION, root, scan.signature])}")
  return _cached(entry, cache, lambda: _decode_scan(scan), str(root))


# --------------------------------------------------------------------------
# The cifar10_jpeg archive
# --------------------------------------------------------------------------


def _archive_member_key(name: str) -> Optional[Tuple[str, str, str]]:
  """(split, class, file) of an image member ``[cifar10-jpeg/]split/class/
  file``, else None."""
  parts = [p for p in pathlib.PurePosixPath(name).parts if p not in (".", "")]
  if len(parts) == 4 and parts[0] == CIFAR10_JPEG_DIR:
    parts = parts[1:]
  if len(parts) != 3 or parts[0] not in SPLITS or \
      parts[1].startswith(".") or not _is_image(parts[2]):
    return None
  return parts[0], parts[1], parts[2]


def _decode_archive(archive: pathlib.Path) -> _Raw:
  """Decodes the images of a tar archive of an ImageFolder tree while
  streaming through it (no extraction to disk)."""
  keys: List[Tuple[str, str, str]] = []

  def chunks() -> Iterator[List[Source]]:
    chunk: List[Source] = []
    with tarfile.open(archive, "r|*") as tf:
      for member in tf:
        key = _archive_member_key(member.name) if member.isfile() else None
        if key is None:
          continue
        f = tf.extractfile(member)
        chunk.append((f"{archive}:{member.name}", f.read()))
        keys.append(key)
        if len(chunk) == _CHUNK:
          yield chunk
          chunk = []
    if chunk:
      yield chunk

  try:
    images, sums = _decode_chunks(chunks())
  except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
    raise ValueError(f"cannot read archive {archive}: {type(e).__name__}: "
                     f"{e}") from e
  classes = {split: sorted({c for s, c, _ in keys if s == split})
             for split in SPLITS}
  where = f"archive {archive}"
  if not classes["train"]:
    raise ValueError(f"{where} holds no train images (expected "
                     f"[{CIFAR10_JPEG_DIR}/]{{train,test}}/<class>/*.jpg)")
  _check_class_sets(classes["train"], classes["test"], where)
  class_names = tuple(classes["train"])
  label_of = {c: k for k, c in enumerate(class_names)}
  out = []
  for split in SPLITS:
    idx = sorted((i for i, k in enumerate(keys) if k[0] == split),
                 key=lambda i: keys[i][1:])
    idx = np.asarray(idx, np.int64)
    labels = np.asarray([label_of[keys[i][1]] for i in idx], np.int32)
    if idx.size and idx[-1] - idx[0] == idx.size - 1 and np.all(
        np.diff(idx) == 1):  # already in order (a sorted archive): no copy
      part = slice(int(idx[0]), int(idx[-1]) + 1)
      out += [images[part], labels, sums[part]]
    else:
      out += [_take(images, idx), labels, sums[idx]]
  return _Raw(*out, class_names=class_names)


def _load_cifar10_jpeg(data_dir: Optional[PathLike],
                       cache: pathlib.Path) -> _Raw:
  source = _locate_cifar10_jpeg(data_dir)
  if source.is_dir():
    return _load_image_folder(source, cache)
  archive = source.resolve()
  st = archive.stat()
  entry = (f"cifar10_jpeg-"
           f"{_digest([CACHE_VERSION, archive, st.st_size, st.st_mtime_ns])}")
  return _cached(entry, cache, lambda: _decode_archive(archive), str(archive))


# --------------------------------------------------------------------------
# IDX files (Fashion-MNIST)
# --------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (the format's six element types).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped or not.

  Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
  0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions ``d``,
  ``d`` big-endian uint32 sizes, then the elements in C order, big-endian.
  A file is taken as gzip when it starts with the gzip magic ``1f 8b``.

  Returns:
    The array in native byte order (uint8 for the image and label files).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a bad magic number, an unknown type byte, or a size that
      does not match the header (the message names the file).
  """
  import gzip  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ValueError(f"IDX file {path}: corrupt gzip stream "
                       f"({type(e).__name__}: {e})") from e
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
    raise ValueError(
        f"IDX file {path}: bad magic number {data[:4].hex() or '(empty)'} "
        f"(expected 0000 then a type byte in "
        f"{{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and the number "
        f"of dimensions)")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"IDX file {path}: header of {ndim} dimensions "
                     f"truncated ({len(data)} bytes)")
  shape = tuple(int(v) for v in np.frombuffer(data, ">u4", ndim, 4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"IDX file {path}: {len(data)} bytes, expected "
                     f"{expected} for shape {shape} of {dtype.name}")
  out = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return out.astype(dtype.newbyteorder("="))


def fashion_mnist_dirs(data_dir: Optional[PathLike] = None
                       ) -> List[pathlib.Path]:
  """The directories searched for the Fashion-MNIST IDX files, in order:
  ``<d>/fashion-mnist`` and ``<d>`` for each of :func:`candidate_dirs`,
  then Debian's ``/usr/share/datasets/fashion-mnist``."""
  dirs = []
  for d in candidate_dirs(data_dir):
    dirs += [d / FASHION_MNIST_DIR, d]
  return dirs + [FASHION_MNIST_SYSTEM_DIR]


def _locate_fashion_mnist(data_dir: Optional[PathLike]
                          ) -> Dict[str, pathlib.Path]:
  """The four IDX files, all from the first directory that has all four
  (each ``.gz`` or plain)."""
  tried = []
  for d in fashion_mnist_dirs(data_dir):
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
      for name in (stem + ".gz", stem):
        tried.append(d / name)
        if (d / name).is_file():
          found[key] = d / name
          break
    if len(found) == len(FASHION_MNIST_FILES):
      return found
  raise FileNotFoundError(
      "fashion_mnist IDX files not found (need all four of "
      f"{', '.join(FASHION_MNIST_FILES.values())}, each .gz or plain, in one "
      "directory). Tried:\n" + "\n".join(f"  {p}" for p in tried)
      + f"\nTo fix: `{FASHION_MNIST_APT}` (Debian/Ubuntu; installs them in "
      f"{FASHION_MNIST_SYSTEM_DIR}), or put the files in <dir>/"
      f"{FASHION_MNIST_DIR} and pass data_dir=<dir> or set ${ENV_VAR}=<dir>.")


def _load_fashion_mnist(data_dir: Optional[PathLike]) -> _Raw:
  files = _locate_fashion_mnist(data_dir)
  arrays = {key: read_idx(path) for key, path in files.items()}
  out = []
  for split in SPLITS:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    where = f"{files[f'{split}_images']}, {files[f'{split}_labels']}"
    if images.dtype != np.uint8 or images.ndim != 3:
      raise ValueError(f"fashion_mnist {split} images must be uint8 [N, H, "
                       f"W], got {images.dtype} {images.shape} ({where})")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
      raise ValueError(f"fashion_mnist {split}: {labels.shape} labels for "
                       f"{images.shape[0]} images ({where})")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
      raise ValueError(f"fashion_mnist {split}: label {int(labels.max())} "
                       f"outside [0, {len(FASHION_MNIST_CLASSES)}) ({where})")
    images = np.ascontiguousarray(images[..., None])  # grayscale: C = 1
    out += [images, labels.astype(np.int32), _pixel_sums(images)]
  return _Raw(*out, class_names=FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------
# tensorflow-datasets
# --------------------------------------------------------------------------


def _load_tfds(name: str, data_dir: Optional[PathLike]) -> _Raw:
  hint = (f"Offline, use load_image_dataset('cifar10_jpeg') (the JPEG copy of "
          f"CIFAR-10 in ${ENV_VAR}) or 'imagefolder:<root>' for images stored "
          f"as <root>/{{train,test}}/<class>/*.png|jpg.")
  try:
    # pylint: disable-next=import-outside-toplevel
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise RuntimeError(f"loading {name!r} needs tensorflow-datasets, which "
                       f"cannot be imported ({e}). {hint}") from e
  try:
    (train, test), info = tfds.load(
        name, split=["train", "test"], batch_size=-1, with_info=True,
        data_dir=None if data_dir is None else str(data_dir))
    train, test = tfds.as_numpy(train), tfds.as_numpy(test)
    class_names = tuple(info.features["label"].names)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"tensorflow-datasets could not load {name!r} (data_dir={data_dir}): "
        f"{type(e).__name__}: {e}\ntfds downloads the data on first use, which "
        f"needs internet access. {hint}") from e
  splits = []
  for part in (train, test):
    images = np.ascontiguousarray(part["image"], dtype=np.uint8)
    splits += [images, np.asarray(part["label"], np.int32),
               _pixel_sums(images)]
  return _Raw(*splits, class_names=class_names)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
  """``array[index]`` as a plain in-memory ndarray (also from a memmap)."""
  out = np.empty((index.shape[0],) + array.shape[1:], array.dtype)
  np.take(array, index, axis=0, out=out)
  return out


def load_image_dataset(name: str, data_dir: Optional[PathLike] = None, *,
                       val_fraction: float = 0.1, split_seed: int = 0,
                       max_train: Optional[int] = None,
                       max_test: Optional[int] = None,
                       cache_dir: Optional[PathLike] = None,
                       max_val: Optional[int] = None) -> ImageDataset:
  """Loads an image classification dataset with a stratified validation split.

  Args:
    name: ``"cifar10_jpeg"``, ``"fashion_mnist"``, ``"imagefolder:<root>"``,
      ``"cifar10"`` or ``"cifar100"`` (see the module docstring).
    data_dir: where ``cifar10_jpeg`` is looked for (see
      :func:`candidate_dirs`; ``fashion_mnist``: :func:`fashion_mnist_dirs`);
      the tfds data directory for the tfds names; unused for
      ``imagefolder:``.
    val_fraction: fraction in [0, 1) of each class of the training set held
      out for validation (0: empty validation arrays).
    split_seed: seeds the validation split and the subsets.
    max_train: keep a class-balanced subset of at most this many of the
      remaining training images (after the validation split).
    max_test: the same for the test set.
    cache_dir: cache root (see :func:`cache_root`).
    max_val: the same for the validation set.  The validation split is
      drawn with ``np.random.default_rng(split_seed)``, the subsets with
      ``(split_seed, 1)``, ``(split_seed, 2)``, ``(split_seed, 3)`` (train,
      val, test; see :func:`stratified_split`, :func:`balanced_subset`).

  Returns:
    The :class:`ImageDataset`; ``mean``/``std`` are those of the final
    training images.

  Raises:
    ValueError: unknown name or invalid argument, malformed image folder
      (different classes in train and test, images of different sizes,
      undecodable files).
    FileNotFoundError: the cifar10_jpeg or fashion_mnist data or the image
      folder is missing (the message names every path tried).
    RuntimeError: tensorflow-datasets cannot load a tfds dataset (offline).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}; known: "
                     f"{', '.join(KNOWN_NAMES)}")
  if isinstance(val_fraction, bool) or not isinstance(
      val_fraction, (int, float, np.floating, np.integer)) or \
      not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  split_seed = _check_seed(split_seed, "split_seed")
  max_train = _check_max(max_train, "max_train")
  max_val = _check_max(max_val, "max_val")
  max_test = _check_max(max_test, "max_test")
  cache = cache_root(cache_dir)

  if name.startswith(IMAGEFOLDER_PREFIX):
    root = name[len(IMAGEFOLDER_PREFIX):]
    if not root:
      raise ValueError("imagefolder: needs a root directory, e.g. "
                       "'imagefolder:/data/my_images'")
    raw = _load_image_folder(root, cache)
  else:
    key = name.lower().replace("-", "_")
    if key == "cifar10_jpeg":
      raw = _load_cifar10_jpeg(data_dir, cache)
    elif key == "fashion_mnist":
      raw = _load_fashion_mnist(data_dir)
    elif key in TFDS_NAMES:
      raw = _load_tfds(key, data_dir)
    else:
      raise ValueError(f"unknown image dataset {name!r}; known: "
                       f"{', '.join(KNOWN_NAMES)}")

  train_labels_all = np.asarray(raw.train_labels, np.int32)
  train_idx, val_idx = stratified_split(train_labels_all, float(val_fraction),
                                        split_seed)
  if max_train is not None:
    train_idx = train_idx[balanced_subset(train_labels_all[train_idx],
                                          max_train, (split_seed, 1))]
  if max_val is not None:
    val_idx = val_idx[balanced_subset(train_labels_all[val_idx], max_val,
                                      (split_seed, 2))]
  test_labels_all = np.asarray(raw.test_labels, np.int32)
  test_idx = np.arange(test_labels_all.shape[0], dtype=np.int64)
  if max_test is not None:
    test_idx = balanced_subset(test_labels_all, max_test, (split_seed, 3))
  if train_idx.shape[0] == 0:
    raise ValueError(f"{name}: no training images left after the validation "
                     f"split (val_fraction={val_fraction})")
  mean, std = _mean_std_from_sums(
      np.asarray(raw.train_sums)[train_idx],
      int(np.prod(raw.train_images.shape[1:3])))
  return ImageDataset(
      train_images=_take(raw.train_images, train_idx),
      train_labels=train_labels_all[train_idx],
      val_images=_take(raw.train_images, val_idx),
      val_labels=train_labels_all[val_idx],
      test_images=_take(raw.test_images, test_idx),
      test_labels=test_labels_all[test_idx],
      class_names=tuple(raw.class_names), mean=mean, std=std, name=name)


# --------------------------------------------------------------------------
# Synthetic image folders (tests, docs)
# --------------------------------------------------------------------------


def make_image_folder(root: PathLike,
                      num_per_class: Union[int, Mapping[str, Any]],
                      class_names: Sequence[str],
                      image_size: Tuple[int, int] = (32, 32), seed: int = 0,
                      fmt: str = "png"
                      ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Writes a small synthetic ImageFolder tree ``root/{train,test}/<class>/``.

  Image ``i`` of a class is ``NNNN.<fmt>`` (zero-padded to at least 4
  digits), random RGB noise around a per-class colour (so the classes are
  learnable), drawn from ``np.random.default_rng(seed)``.

  Args:
    root: the tree's root (created; existing files of the same names are
      overwritten).
    num_per_class: an int (that many images per class in both splits) or a
      mapping from split name ('train', 'test') to an int or to a mapping
      class name -> count; splits absent from the mapping are not written.
    class_names: the class (directory) names.
    image_size: (height, width).
    seed: seeds the pixel values.
    fmt: 'png' (lossless) or 'jpeg' / 'jpg'.

  Returns:
    ``{split: (uint8 [N, H, W, 3] images, int32 [N] labels)}`` for the
    written splits, in the order :func:`load_image_dataset` reads them
    (classes sorted by name, then file name); labels index the sorted class
    names.  For JPEG these are the pixels before compression.
  """
  class_names = [str(c) for c in class_names]
  if not class_names or len(set(class_names)) != len(class_names):
    raise ValueError(f"class_names must be non-empty and unique, got "
                     f"{class_names}")
  for c in class_names:
    if not c or c in (".", "..") or c.startswith(".") or "/" in c or \
        os.sep in c:
      raise ValueError(f"invalid class (directory) name {c!r}")
  fmt = fmt.lower()
  if fmt not in ("png", "jpeg", "jpg"):
    raise ValueError(f"fmt must be 'png', 'jpeg' or 'jpg', got {fmt!r}")
  h, w = (int(d) for d in image_size)
  if h <= 0 or w <= 0:
    raise ValueError(f"image_size must be positive (height, width), got "
                     f"{image_size}")
  if isinstance(num_per_class, Mapping):
    unknown = set(num_per_class) - set(SPLITS)
    if unknown:
      raise ValueError(f"num_per_class keys must be split names {SPLITS}, "
                       f"got {sorted(unknown)}")
    per_split = dict(num_per_class)
  else:
    per_split = {split: num_per_class for split in SPLITS}
  counts: Dict[str, Dict[str, int]] = {}
  for split, spec in per_split.items():
    if isinstance(spec, Mapping):
      extra = set(spec) - set(class_names)
      if extra:
        raise ValueError(f"num_per_class[{split!r}] names unknown classes "
                         f"{sorted(extra)}")
      counts[split] = {c: int(spec.get(c, 0)) for c in class_names}
    else:
      counts[split] = {c: int(spec) for c in class_names}
    if any(v < 0 for v in counts[split].values()):
      raise ValueError(f"negative image count in num_per_class: {spec}")

  rng = np.random.default_rng(seed)
  order = sorted(class_names)
  colours = rng.integers(40, 216, size=(len(order), 3))
  root = pathlib.Path(root)
  ext = "png" if fmt == "png" else "jpg"
  written = {}
  for split in SPLITS:
    if split not in counts:
      continue
    images, labels = [], []
    for k, c in enumerate(order):
      class_dir = root / split / c
      class_dir.mkdir(parents=True, exist_ok=True)
      n = counts[split][c]
      noise = rng.integers(-40, 41, size=(n, h, w, 3))
      pixels = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
      width = max(4, len(str(max(n - 1, 0))))
      for i in range(n):
        Image.fromarray(pixels[i]).save(class_dir / f"{i:0{width}d}.{ext}",
                                        **({"quality": 95} if ext == "jpg"
                                           else {}))
      images.append(pixels)
      labels.append(np.full(n, k, np.int32))
    written[split] = (np.concatenate(images), np.concatenate(labels))
  return written
