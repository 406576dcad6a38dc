"""Tests of pdeq_jax.data.images: loaders, cache, splits, augmentation, batches.

Small generated ImageFolder trees (and a tar.xz built from one) exercise the
loaders; the real CIFAR-10 JPEG archive is decoded once per test run into a
cache shared by the xdist workers (the loader's lock makes one worker decode
while the other waits).
"""
import os
import pathlib
import sys
import tarfile
import time
import types

import numpy as np
import pytest
from PIL import Image

from pdeq_jax.data import images

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("cat", "ant", "bee")  # sorted: ant, bee, cat
TRAIN_COUNTS = {"ant": 6, "bee": 8, "cat": 10}


def _row_keys(x: np.ndarray) -> list:
  """Hashable identity of each image (the generated images are distinct)."""
  return [row.tobytes() for row in x]


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "tree"
  written = images.make_image_folder(
      root, {"train": TRAIN_COUNTS, "test": 3}, CLASSES, image_size=(6, 5),
      seed=1)
  return root, written


def _load(root, tmp_path, **kwargs):
  kwargs.setdefault("val_fraction", 0.0)
  return images.load_image_dataset(f"imagefolder:{root}",
                                   cache_dir=tmp_path / "cache", **kwargs)


# ------------------------------------------------------------ image folders --

def test_image_folder_png_round_trip(folder, tmp_path):
  root, written = folder
  data = _load(root, tmp_path)
  assert data.class_names == ("ant", "bee", "cat")
  assert data.num_classes == 3 and data.image_shape == (6, 5, 3)
  assert data.name == f"imagefolder:{root}"
  assert data.train_images.dtype == np.uint8
  assert data.train_labels.dtype == np.int32
  assert np.bincount(data.train_labels).tolist() == [6, 8, 10]
  assert np.bincount(data.test_labels).tolist() == [3, 3, 3]
  np.testing.assert_array_equal(data.train_images, written["train"][0])
  np.testing.assert_array_equal(data.train_labels, written["train"][1])
  np.testing.assert_array_equal(data.test_images, written["test"][0])
  np.testing.assert_array_equal(data.test_labels, written["test"][1])
  # pixels as PIL reads the files, independently of the loader
  with Image.open(root / "train" / "bee" / "0002.png") as im:
    np.testing.assert_array_equal(data.train_images[6 + 2], np.asarray(im))
  assert data.val_images.shape == (0, 6, 5, 3)
  assert data.val_labels.shape == (0,) and data.val_labels.dtype == np.int32
  x = data.train_images / 255.0
  np.testing.assert_allclose(data.mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(data.std, x.std(axis=(0, 1, 2)), atol=1e-6)
  assert data.mean.dtype == np.float32 and data.std.dtype == np.float32
  assert "train/val/test 24/0/9" in repr(data)


def test_image_folder_cache_is_reused_and_invalidated(folder, tmp_path,
                                                      monkeypatch):
  root, _ = folder
  first = _load(root, tmp_path)
  entries = list((tmp_path / "cache" / "images").glob("imagefolder-*"))
  assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded again although cached")

  with monkeypatch.context() as m:
    m.setattr(images, "_decode_chunk", no_decoding)
    second = _load(root, tmp_path)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.test_labels, second.test_labels)
  # editing a file changes the key: decoded afresh
  changed = np.full((6, 5, 3), 7, np.uint8)
  Image.fromarray(changed).save(root / "test" / "ant" / "0000.png")
  third = _load(root, tmp_path)
  np.testing.assert_array_equal(third.test_images[0], changed)


def test_jpeg_folder_and_grayscale_are_rgb(tmp_path):
  root = tmp_path / "jpg"
  written = images.make_image_folder(root, 2, ["a", "b"], image_size=(8, 8),
                                     fmt="jpeg")
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(
      root / "train" / "b" / "0009.png")  # grayscale PNG beside the JPEGs
  data = _load(root, tmp_path)
  assert data.train_images.shape == (5, 8, 8, 3)
  # JPEG (chroma subsampled) blurs the noise but keeps each image's colour
  np.testing.assert_allclose(data.train_images[:4].mean(axis=(1, 2)),
                             written["train"][0].mean(axis=(1, 2)), atol=4)
  np.testing.assert_array_equal(data.train_images[4], 200)


def test_class_sets_must_match(tmp_path):
  root = tmp_path / "tree"
  images.make_image_folder(root, {"train": 1}, ["a", "b", "c"])
  images.make_image_folder(root, {"test": 1}, ["a", "b", "d"])
  with pytest.raises(ValueError, match=r"only in train: \['c'\], only in "
                     r"test: \['d'\]"):
    _load(root, tmp_path)


def test_mixed_sizes_and_bad_files_are_named(tmp_path):
  root = tmp_path / "tree"
  images.make_image_folder(root, 2, ["a", "b"], image_size=(4, 4))
  odd = root / "test" / "b" / "0099.png"
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(odd)
  with pytest.raises(ValueError, match=f"{odd}.*same size"):
    _load(root, tmp_path)
  odd.unlink()
  bad = root / "train" / "a" / "0005.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match=f"cannot decode image {bad}"):
    _load(root, tmp_path)


def test_missing_split_directory(tmp_path):
  root = tmp_path / "tree"
  images.make_image_folder(root, {"train": 1}, ["a"])
  with pytest.raises(FileNotFoundError, match="no test/ directory"):
    _load(root, tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    _load(tmp_path / "nowhere", tmp_path)


def test_parallel_decoding_matches_serial(folder, monkeypatch):
  root, written = folder
  paths = sorted(str(p) for p in (root / "train").glob("*/*.png"))
  chunks = [paths[i:i + 5] for i in range(0, len(paths), 5)]
  pools = []
  make_executor = images._make_executor
  monkeypatch.setattr(images, "_make_executor",
                      lambda n: pools.append(make_executor(n)) or pools[-1])
  x, sums = images._decode_chunks(iter(chunks), num_workers=2)
  assert [type(p).__name__ for p in pools] == ["ThreadPoolExecutor"]
  np.testing.assert_array_equal(x, written["train"][0])
  np.testing.assert_array_equal(sums, images._pixel_sums(x))
  bad = root / "train" / "cat" / "0003.png"
  bad.write_bytes(b"broken")
  with pytest.raises(ValueError, match=str(bad)):
    images._decode_chunks(iter(chunks), num_workers=2)


# ----------------------------------------------------------- cifar10_jpeg --

def _make_archive(tmp_path, hw=(8, 8)):
  """A cifar10-jpeg.tar.xz-shaped archive of a small generated tree."""
  tree = tmp_path / "src"
  written = images.make_image_folder(tree / images.CIFAR10_JPEG_DIR,
                                     {"train": 10, "test": 4},
                                     ["frog", "ship"], image_size=hw,
                                     fmt="png")
  archive_dir = tmp_path / "data"
  archive_dir.mkdir()
  archive = archive_dir / images.CIFAR10_JPEG_ARCHIVE
  with tarfile.open(archive, "w:xz") as tf:
    tf.add(tree / images.CIFAR10_JPEG_DIR, arcname=images.CIFAR10_JPEG_DIR)
  return archive_dir, tree, written


def test_cifar10_jpeg_from_archive_and_from_tree(tmp_path, monkeypatch):
  archive_dir, tree, written = _make_archive(tmp_path)
  cache = tmp_path / "cache"
  data = images.load_image_dataset("cifar10_jpeg", archive_dir,
                                   val_fraction=0.0, cache_dir=cache)
  assert data.class_names == ("frog", "ship") and data.name == "cifar10_jpeg"
  np.testing.assert_array_equal(data.train_images, written["train"][0])
  np.testing.assert_array_equal(data.test_labels, written["test"][1])
  with monkeypatch.context() as m:  # second load: from the cache only
    m.setattr(images, "_decode_archive", None)
    again = images.load_image_dataset("cifar10_jpeg", archive_dir,
                                      val_fraction=0.0, cache_dir=cache)
  np.testing.assert_array_equal(again.train_images, data.train_images)
  # an extracted tree is read as an image folder; PDEQ_DATA_DIR is honoured
  monkeypatch.setenv(images.ENV_VAR, str(tree))
  from_tree = images.load_image_dataset("cifar10_jpeg", val_fraction=0.0,
                                        cache_dir=cache)
  np.testing.assert_array_equal(from_tree.train_images, data.train_images)


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
  archive_dir, _, _ = _make_archive(tmp_path, hw=(4, 4))
  cache = tmp_path / "cache"
  real_save = np.save
  calls = []

  def failing_save(path, array, **kwargs):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt  # e.g. the user hits ^C mid-write
    real_save(path, array, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(images.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
      images.load_image_dataset("cifar10_jpeg", archive_dir, cache_dir=cache)
  leftovers = [p.name for p in (cache / "images").iterdir()
               if not p.name.endswith(".lock")]
  assert leftovers == []
  data = images.load_image_dataset("cifar10_jpeg", archive_dir,
                                   cache_dir=cache)
  assert len(data.train_labels) + len(data.val_labels) == 20


def test_corrupt_archive_is_a_clear_error(tmp_path):
  archive_dir, _, _ = _make_archive(tmp_path, hw=(4, 4))
  archive = archive_dir / images.CIFAR10_JPEG_ARCHIVE
  archive.write_bytes(archive.read_bytes()[:300])  # truncated download
  with pytest.raises(ValueError, match=f"cannot read archive {archive}"):
    images.load_image_dataset("cifar10_jpeg", archive_dir,
                              cache_dir=tmp_path / "cache")


def test_missing_archive_names_paths_tried(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError) as info:
    images.load_image_dataset("cifar10_jpeg", tmp_path)
  message = str(info.value)
  assert str(tmp_path / "cifar10-jpeg.tar.xz") in message
  assert str(tmp_path / "cifar10-jpeg") in message
  env_dir = tmp_path / "env"
  monkeypatch.setenv("PDEQ_DATA_DIR", str(env_dir))
  with pytest.raises(FileNotFoundError, match=str(env_dir / "cifar10-jpeg")):
    images.load_image_dataset("cifar10_jpeg")
  monkeypatch.delenv("PDEQ_DATA_DIR")
  monkeypatch.setattr(images, "SIBLING_DATA_DIR", tmp_path / "sibling")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "sibling")):
    images.load_image_dataset("cifar10_jpeg")


def test_default_data_and_cache_locations(monkeypatch, tmp_path):
  assert images.SIBLING_DATA_DIR == REPO_ROOT.parent / "shared" / "data"
  monkeypatch.delenv("PDEQ_DATA_DIR", raising=False)
  assert images.candidate_dirs() == [images.SIBLING_DATA_DIR]
  assert images.candidate_dirs(tmp_path) == [tmp_path]
  monkeypatch.delenv("PDEQ_CACHE_DIR", raising=False)
  assert images.cache_root() == pathlib.Path("~/.cache/pdeq_jax").expanduser()
  monkeypatch.setenv("PDEQ_CACHE_DIR", str(tmp_path))
  assert images.cache_root() == tmp_path


def test_unknown_names():
  with pytest.raises(ValueError, match="known: cifar10_jpeg, fashion_mnist, "
                     "imagefolder:<root>, cifar10, cifar100"):
    images.load_image_dataset("mnist")
  with pytest.raises(ValueError, match="needs a root directory"):
    images.load_image_dataset("imagefolder:")


# ------------------------------------------------------------------- tfds --

def _fake_tfds(load):
  module = types.ModuleType("tensorflow_datasets")
  module.load = load
  module.as_numpy = lambda x: x
  return module


def test_tfds_failure_suggests_offline_datasets(monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("no route to host")

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(offline))
  with pytest.raises(RuntimeError, match=r"(?s)no route to host.*"
                     r"cifar10_jpeg.*imagefolder:"):
    images.load_image_dataset("cifar10")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(RuntimeError, match="cannot be imported.*cifar10_jpeg"):
    images.load_image_dataset("cifar100")


def test_tfds_arrays_are_adapted(monkeypatch):
  rng = np.random.default_rng(0)
  seen = {}

  def load(name, split, batch_size, with_info, data_dir):
    seen.update(name=name, split=split, batch_size=batch_size,
                data_dir=data_dir)
    parts = [{"image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
              "label": np.arange(n, dtype=np.int64) % 10} for n in (40, 20)]
    label = types.SimpleNamespace(names=[f"c{i}" for i in range(10)])
    return parts, types.SimpleNamespace(features={"label": label})

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(load))
  data = images.load_image_dataset("cifar10", "/some/tfds", val_fraction=0.25)
  assert seen == {"name": "cifar10", "split": ["train", "test"],
                  "batch_size": -1, "data_dir": "/some/tfds"}
  assert (len(data.train_labels), len(data.val_labels),
          len(data.test_labels)) == (30, 10, 20)
  assert data.class_names[3] == "c3" and data.train_labels.dtype == np.int32


# ----------------------------------------------------- splits and subsets --

def test_stratified_validation_split(tmp_path):
  root = tmp_path / "tree"
  images.make_image_folder(root, {"train": 20, "test": 2}, ["a", "b", "c"],
                           image_size=(4, 4))
  full = _load(root, tmp_path)
  split = _load(root, tmp_path, val_fraction=0.25, split_seed=3)
  assert np.bincount(split.val_labels).tolist() == [5, 5, 5]
  assert np.bincount(split.train_labels).tolist() == [15, 15, 15]
  train_keys, val_keys = _row_keys(split.train_images), _row_keys(
      split.val_images)
  assert not set(train_keys) & set(val_keys)
  assert sorted(train_keys + val_keys) == sorted(_row_keys(full.train_images))
  # labels stay attached to their images
  label_of = dict(zip(_row_keys(full.train_images), full.train_labels))
  assert [label_of[k] for k in val_keys] == split.val_labels.tolist()
  same = _load(root, tmp_path, val_fraction=0.25, split_seed=3)
  np.testing.assert_array_equal(same.val_images, split.val_images)
  other = _load(root, tmp_path, val_fraction=0.25, split_seed=4)
  assert set(_row_keys(other.val_images)) != set(val_keys)
  # statistics of the final train split
  mean, std = images.channel_mean_std(split.train_images)
  np.testing.assert_array_equal(split.mean, mean)
  np.testing.assert_array_equal(split.std, std)


def test_stratified_split_rounding_and_balanced_subset():
  labels = np.repeat([0, 1, 2], [10, 3, 7])
  kept, held = images.stratified_split(labels, 0.3, seed=0)
  assert np.bincount(labels[held]).tolist() == [3, 1, 2]
  assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(20))
  kept0, held0 = images.stratified_split(labels, 0.0, seed=0)
  assert held0.size == 0 and kept0.tolist() == list(range(20))
  sub = images.balanced_subset(labels, 8, seed=1)
  assert np.bincount(labels[sub]).tolist() == [3, 3, 2]  # round robin
  assert np.all(np.diff(sub) > 0)
  assert np.bincount(labels[images.balanced_subset(labels, 15, 1)]).tolist() \
      == [6, 3, 6]  # class 1 runs out
  assert images.balanced_subset(labels, 99, 1).tolist() == list(range(20))


def test_max_train_and_max_test_are_balanced_subsets(tmp_path):
  root = tmp_path / "tree"
  images.make_image_folder(root, {"train": 20, "test": 6}, ["a", "b", "c"],
                           image_size=(4, 4))
  base = _load(root, tmp_path, val_fraction=0.25)
  small = _load(root, tmp_path, val_fraction=0.25, max_train=10, max_test=7,
                max_val=6)
  assert sorted(np.bincount(small.train_labels).tolist()) == [3, 3, 4]
  assert sorted(np.bincount(small.test_labels).tolist()) == [2, 2, 3]
  assert np.bincount(small.val_labels).tolist() == [2, 2, 2]
  assert set(_row_keys(small.train_images)) <= set(_row_keys(
      base.train_images))  # taken after the validation split
  assert set(_row_keys(small.val_images)) <= set(_row_keys(base.val_images))
  np.testing.assert_array_equal(small.mean,
                                images.channel_mean_std(small.train_images)[0])


def test_normalize_gives_zero_mean_unit_std(folder, tmp_path):
  data = _load(folder[0], tmp_path)
  x = images.normalize(data.train_images, data.mean, data.std)
  assert x.dtype == np.float32 and x.shape == data.train_images.shape
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  ref = (data.train_images / 255.0 - data.mean) / data.std
  np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ augmentation --

def _random_images(n=64, h=5, w=6, c=3, seed=0):
  return np.random.default_rng(seed).integers(1, 256, (n, h, w, c),
                                              dtype=np.uint8)


def test_random_crop_flip_shape_and_identity():
  x = _random_images(n=1)[0]
  rng = np.random.default_rng(0)
  y = images.random_crop_flip(x, rng)
  assert y.shape == x.shape and y.dtype == np.uint8
  same = images.random_crop_flip(x, rng, pad=0, flip=False)
  np.testing.assert_array_equal(same, x)
  assert same is not x
  np.testing.assert_array_equal(
      images.random_crop_flip(x, np.random.default_rng(5)),
      images.random_crop_flip(x, np.random.default_rng(5)))
  gray = _random_images(n=1, c=1)[0]
  assert images.random_crop_flip(gray, rng).shape == gray.shape
  # a padding larger than the image leaves only zeros
  assert not images.random_crop_flip(x, np.random.default_rng(0), pad=40,
                                     flip=False).any()  # P(offset 0) tiny


def _window(x, pad, image):
  """The (dy, dx, flipped) windows of zero-padded ``x`` equal to ``image``
  (an independent reference: np.pad and slicing)."""
  h, w = x.shape[:2]
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  return [(dy, dx, f)
          for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
          for f in (False, True)
          if np.array_equal(image, (lambda win: win[:, ::-1] if f else win)(
              padded[dy:dy + h, dx:dx + w]))]


@pytest.mark.parametrize("pad,flip", [(2, True), (2, False), (0, True),
                                      (7, False)])
def test_random_crop_flip_is_a_shifted_window(pad, flip):
  x = _random_images(n=64)  # pixels >= 1, so padding zeros are recognisable
  rng = np.random.default_rng(1)
  offsets, flipped = set(), []
  for i in range(x.shape[0]):
    y = images.random_crop_flip(x[i], rng, pad=pad, flip=flip)
    matches = _window(x[i], pad, y)
    if pad >= 5:  # windows off the image entirely are all zeros
      assert matches, i
      continue
    assert len(matches) == 1, (i, matches)
    offsets.add(matches[0][:2])
    flipped.append(matches[0][2])
  if flip:
    assert 10 < sum(flipped) < 54  # some flipped, some not
  elif pad < 5:
    assert not any(flipped)
  if 0 < pad < 5:
    assert len(offsets) > 10  # many of the 25 offsets occur


# ----------------------------------------------------------------- batches --

def _id_data(n=50, hw=4):
  """Images whose label is their index (to track examples)."""
  return _random_images(n=n, h=hw, w=hw), np.arange(n, dtype=np.int32)


MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3],
                                                             np.float32)


def _epoch(x, y, **kwargs):
  kwargs = {"seed": 3, "epoch": 0, "mean": MEAN, "std": STD, **kwargs}
  return list(images.train_batches(x, y, 8, **kwargs))


def _same(a, b):
  return len(a) == len(b) and all(
      np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
      for p, q in zip(a, b))


def test_train_batches_order_shapes_and_determinism():
  x, y = _id_data()
  batches = _epoch(x, y, augment=False)
  assert len(batches) == images.steps_per_epoch(50, 8) == 6  # last dropped
  assert len(images.train_dataset(x, y, 8, seed=3, epoch=0, mean=MEAN,
                                  std=STD)) == 6
  for xb, yb in batches:
    assert xb.shape == (8, 4, 4, 3) and xb.dtype == np.float32
    assert yb.shape == (8,) and yb.dtype == np.int32
    np.testing.assert_array_equal(xb, images.normalize(x[yb], MEAN, STD))
  order = np.concatenate([yb for _, yb in batches])
  assert len(set(order.tolist())) == 48  # each example at most once
  assert not np.array_equal(order, np.arange(48))  # shuffled
  assert _same(batches, _epoch(x, y, augment=False))  # same seed: same
  epochs = [np.concatenate([yb for _, yb in _epoch(x, y, epoch=e,
                                                   augment=False)])
            for e in (1, 2)]
  seed4 = np.concatenate([yb for _, yb in _epoch(x, y, seed=4,
                                                 augment=False)])
  for other in epochs + [seed4]:
    assert not np.array_equal(order, other)
  # threads and prefetching do not change the stream
  for threads, prefetch in ((0, 1), (2, 3)):
    assert _same(batches, _epoch(x, y, augment=False, threads=threads,
                                 prefetch=prefetch))


def test_train_batches_augmentation_per_record():
  x, y = _id_data(n=24, hw=6)
  full = _epoch(x, y)
  plain = _epoch(x, y, augment=False)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(full, plain))
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full, plain))
  assert _same(full, _epoch(x, y, threads=2))
  # every augmented record is a 4-pixel shifted (flipped) window of its image
  flips = []
  for xb, yb in full:
    for image, label in zip(xb, yb):
      raw = np.rint((image * STD + MEAN) * 255).astype(np.uint8)
      matches = _window(x[label], 4, raw)
      assert matches, label
      flips.append(matches[0][2])
  assert 0 < sum(flips) < len(flips)
  # a record's augmentation differs between epochs
  e1 = {int(l): i for xb, yb in _epoch(x, y, epoch=1) for i, l in zip(xb, yb)}
  e0 = {int(l): i for xb, yb in full for i, l in zip(xb, yb)}
  assert any(not np.array_equal(e0[k], e1[k]) for k in set(e0) & set(e1))


def test_train_batches_exact_resume_from_batch_or_state():
  x, y = _id_data()
  full = _epoch(x, y)
  for k in (0, 2, 5, 6):
    assert _same(full[k:], _epoch(x, y, start_batch=k))
  with pytest.raises(ValueError, match="start_batch"):
    images.train_batches(x, y, 8, seed=0, epoch=0, mean=MEAN, std=STD,
                         start_batch=7)
  # the iterator state (what the trainer checkpoints) restores the position
  it = images.train_batches(x, y, 8, seed=3, epoch=0, mean=MEAN, std=STD,
                            threads=2, prefetch=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  it.close()
  fresh = images.train_batches(x, y, 8, seed=3, epoch=0, mean=MEAN, std=STD)
  fresh.set_state(state)
  assert _same(full[3:], list(fresh))


def test_eval_batches_cover_each_example_once():
  x, y = _id_data(n=23)
  batches = list(images.eval_batches(x, y, 8, mean=MEAN, std=STD))
  assert len(batches) == 3
  masks = np.concatenate([m for _, _, m in batches])
  assert masks.dtype == np.float32 and masks.tolist() == [1.0] * 23 + [0.0]
  labels = np.concatenate([yb for _, yb, _ in batches])
  np.testing.assert_array_equal(labels[:23], y)
  xs = np.concatenate([xb for xb, _, _ in batches])
  assert xs.shape == (24, 4, 4, 3) and xs.dtype == np.float32
  np.testing.assert_array_equal(xs[:23], images.normalize(x, MEAN, STD))
  np.testing.assert_array_equal(xs[23], 0.0)
  assert list(images.eval_batches(x[:0], y[:0], 8, mean=MEAN, std=STD)) == []


def test_record_source_reads_memory_mapped_arrays(tmp_path):
  x, y = _id_data(n=10)
  np.save(tmp_path / "x.npy", x)
  mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
  source = images.RecordSource(mapped, y)
  assert len(source) == 10
  image, label = source[7]
  np.testing.assert_array_equal(image, x[7])
  assert label == 7 and label.dtype == np.int32
  assert _same(_epoch(mapped, y), _epoch(x, y))


def test_loader_arguments():
  x, y = _id_data()
  ds = images.eval_dataset(x, y, 8, mean=MEAN, std=STD)
  for kw, what in (({"threads": -1}, "threads"), ({"prefetch": 0}, "prefetch"),
                   ({"workers": 1.5}, "workers")):
    with pytest.raises(ValueError, match=what):
      images.loader(ds, **kw)


# -------------------------------------------------------------- validation --

def test_invalid_arguments(folder, tmp_path):
  x, y = _id_data()
  kw = {"seed": 0, "epoch": 0, "mean": MEAN, "std": STD}
  for bad in (0, -1, 2.0):
    with pytest.raises(ValueError, match="batch_size"):
      images.train_batches(x, y, bad, **kw)
    with pytest.raises(ValueError, match="batch_size"):
      images.eval_batches(x, y, bad, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="batch_size"):
      images.steps_per_epoch(10, bad)
  with pytest.raises(ValueError, match="labels has 49 entries"):
    images.train_batches(x, y[:49], 8, **kw)
  with pytest.raises(ValueError, match="uint8"):
    images.eval_batches(x.astype(np.float32), y, 8, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="1 or 3 channels"):
    images.random_crop_flip(x[0, ..., :2], np.random.default_rng(0))
  with pytest.raises(ValueError, match="NHWC"):
    images.train_batches(x[0], y[:4], 2, **kw)
  with pytest.raises(ValueError, match="seed"):
    images.train_batches(x, y, 8, **{**kw, "seed": -1})
  with pytest.raises(ValueError, match="std"):
    images.normalize(x, MEAN, np.zeros(3))
  with pytest.raises(ValueError, match="pad"):
    images.random_crop_flip(x[0], np.random.default_rng(0), pad=-1)
  root = folder[0]
  for fraction in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="val_fraction"):
      _load(root, tmp_path, val_fraction=fraction)
  with pytest.raises(ValueError, match="max_train"):
    _load(root, tmp_path, max_train=0)
  with pytest.raises(ValueError, match="split_seed"):
    _load(root, tmp_path, split_seed=-2)
  with pytest.raises(ValueError, match="mean must have shape"):
    images.ImageDataset(x, y % 3, x[:0], y[:0], x[:0], y[:0], tuple("abc"),
                        MEAN[:2], STD, "bad")
  with pytest.raises(ValueError, match="outside"):
    images.ImageDataset(x, y, x[:0], y[:0], x[:0], y[:0], tuple("abc"),
                        MEAN, STD, "bad")


# ------------------------------------------------- the real CIFAR-10 JPEGs --

@pytest.fixture(scope="session")
def real_cifar(data_dir, tmp_path_factory):
  """The full archive, decoded once per test run into a cache shared by the
  xdist workers of the run (the loader's lock serialises them)."""
  if not (data_dir / images.CIFAR10_JPEG_ARCHIVE).is_file():
    pytest.skip(f"{data_dir / images.CIFAR10_JPEG_ARCHIVE} is absent")
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  cache = base / "pdeq_images_cache"
  start = time.perf_counter()
  data = images.load_image_dataset("cifar10_jpeg", data_dir, val_fraction=0.1,
                                   cache_dir=cache)
  return data, cache, time.perf_counter() - start


def test_real_cifar10_jpeg(real_cifar):
  data, _, seconds = real_cifar
  print(f"first load of cifar10_jpeg: {seconds:.1f} s")
  assert (len(data.train_labels), len(data.val_labels),
          len(data.test_labels)) == (45000, 5000, 10000)
  assert data.num_classes == 10 and data.class_names[0] == "airplane"
  assert data.image_shape == (32, 32, 3)
  assert data.train_images.dtype == np.uint8
  assert data.train_labels.dtype == np.int32
  assert np.bincount(data.train_labels).tolist() == [4500] * 10
  assert np.bincount(data.val_labels).tolist() == [500] * 10
  assert np.bincount(data.test_labels).tolist() == [1000] * 10
  np.testing.assert_allclose(data.mean, [0.4913, 0.4821, 0.4465], atol=0.01)
  assert np.all((data.std > 0.2) & (data.std < 0.3))


def test_real_cifar10_jpeg_cached_load(real_cifar, data_dir, monkeypatch):
  full, cache, _ = real_cifar
  monkeypatch.setattr(images, "_decode_archive", None)  # must not decode
  start = time.perf_counter()
  again = images.load_image_dataset("cifar10_jpeg", data_dir, cache_dir=cache)
  seconds = time.perf_counter() - start
  print(f"cached load of cifar10_jpeg: {seconds:.2f} s")
  assert seconds < 10  # ~0.2 s on an idle machine; generous for shared CPUs
  np.testing.assert_array_equal(again.val_labels, full.val_labels)
  np.testing.assert_array_equal(again.test_images[::997],
                                full.test_images[::997])
  small = images.load_image_dataset("cifar10_jpeg", data_dir, max_train=100,
                                    max_test=50, cache_dir=cache)
  assert np.bincount(small.train_labels).tolist() == [10] * 10
  assert np.bincount(small.test_labels).tolist() == [5] * 10
  idx = images.balanced_subset(full.test_labels, 50, (0, 3))
  np.testing.assert_array_equal(small.test_images, full.test_images[idx])


def test_worker_processes_give_the_same_stream():
  x, y = _id_data(n=24)
  kw = {"seed": 3, "epoch": 1, "mean": MEAN, "std": STD}
  ref = list(images.train_batches(x, y, 8, threads=0, **kw))
  it = images.train_batches(x, y, 8, workers=1, **kw)
  try:
    first = next(it)
    state = it.get_state()
    rest = list(it)
  finally:
    it.close()
  assert _same(ref, [first] + rest)
  again = images.train_batches(x, y, 8, workers=1, **kw)
  try:
    again.set_state(state)
    assert _same(ref[1:], list(again))
  finally:
    again.close()
