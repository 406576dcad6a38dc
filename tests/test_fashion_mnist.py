"""Fashion-MNIST (IDX loader), the small sequential CNN and its PTQ."""

import gzip
import json
import struct

import jax
import numpy as np
import pytest

from configs import fashion_mnist as fmnist_configs
from pdeq_jax import models
from pdeq_jax import ptq
from pdeq_jax.data import images as image_data
from train import classify
from train import ptq as ptq_cli


def _idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
  """IDX by hand: 0, 0, type, ndim, big-endian uint32 sizes, the data."""
  header = bytes([0, 0, type_byte, array.ndim])
  header += b"".join(struct.pack(">I", d) for d in array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_fmnist(root, n_train=40, n_test=10, hw=(4, 3), gz=True, seed=0):
  """Writes the four IDX files into ``root``; returns the arrays."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  out = {}
  for split, n, prefix in (("train", n_train, "train"),
                           ("test", n_test, "t10k")):
    images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    for kind, arr, dims in (("images", images, 3), ("labels", labels, 1)):
      data = _idx_bytes(arr)
      name = f"{prefix}-{kind}-idx{dims}-ubyte"
      if gz:
        (root / (name + ".gz")).write_bytes(gzip.compress(data))
      else:
        (root / name).write_bytes(data)
    out[split] = (images, labels)
  return out


# ------------------------------------------------------------ IDX reader ---

def test_read_idx_exact_plain_gzip_and_types(tmp_path):
  x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
  (tmp_path / "a").write_bytes(_idx_bytes(x))
  (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(x)))
  for name in ("a", "a.gz"):
    got = image_data.read_idx(tmp_path / name)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, x)
  # a big-endian int16 file: 0x0B, values -2, 300
  (tmp_path / "b").write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2,
                                      0xFF, 0xFE, 0x01, 0x2C]))
  got = image_data.read_idx(tmp_path / "b")
  assert got.dtype == np.int16 and got.tolist() == [-2, 300]


def test_read_idx_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    image_data.read_idx(tmp_path / "missing")
  (tmp_path / "bad").write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]))
  with pytest.raises(ValueError, match=r"bad magic number 01000801"):
    image_data.read_idx(tmp_path / "bad")
  (tmp_path / "type").write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
  with pytest.raises(ValueError, match="bad magic"):
    image_data.read_idx(tmp_path / "type")
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 7]))
  with pytest.raises(ValueError, match=r"10 bytes, expected 11"):
    image_data.read_idx(tmp_path / "short")


def test_fashion_mnist_loader_exact(tmp_path):
  written = _write_fmnist(tmp_path / "fashion-mnist", gz=True)
  data = image_data.load_image_dataset("fashion_mnist", tmp_path,
                                       val_fraction=0.25, split_seed=3)
  assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
  assert data.image_shape == (4, 3, 1)
  np.testing.assert_array_equal(data.test_images[..., 0], written["test"][0])
  np.testing.assert_array_equal(data.test_labels, written["test"][1])
  # train + val is the training file, split stratified (1 of 4 per class)
  images, labels = written["train"]
  got = np.concatenate([data.train_images, data.val_images])[..., 0]
  got_labels = np.concatenate([data.train_labels, data.val_labels])
  order = {tuple(im.ravel()): i for i, im in enumerate(images)}
  idx = [order[tuple(im.ravel())] for im in got]
  assert sorted(idx) == list(range(len(images)))
  np.testing.assert_array_equal(got_labels, labels[idx])
  np.testing.assert_array_equal(np.bincount(data.val_labels), [1] * 10)
  # normalisation from the training split only
  assert data.mean[0] == pytest.approx(data.train_images.mean() / 255, 1e-6)
  assert data.std[0] == pytest.approx(data.train_images.std() / 255, 1e-5)
  # plain (not gzipped) files in the data directory itself
  plain = tmp_path / "plain"
  written = _write_fmnist(plain, gz=False, seed=1)
  data = image_data.load_image_dataset("fashion_mnist", plain)
  np.testing.assert_array_equal(data.test_images[..., 0], written["test"][0])


def test_fashion_mnist_missing_names_paths_and_apt(tmp_path, monkeypatch):
  system = tmp_path / "no_system"
  monkeypatch.setattr(image_data, "FASHION_MNIST_SYSTEM_DIR", system)
  _write_fmnist(tmp_path / "d" / "fashion-mnist")
  (tmp_path / "d" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError) as e:
    image_data.load_image_dataset("fashion_mnist", tmp_path / "d")
  msg = str(e.value)
  for path in (tmp_path / "d" / "fashion-mnist" / "t10k-labels-idx1-ubyte",
               tmp_path / "d" / "train-images-idx3-ubyte.gz",
               system / "train-labels-idx1-ubyte"):
    assert f"  {path}\n" in msg
  assert "apt-get install -y dataset-fashion-mnist" in msg


def test_config_no_augmentation_and_bad_arg():
  config = fmnist_configs.get_config("small_cnn,fp")
  assert config.data.name == "fashion_mnist" and not config.data.augment
  assert config.model.name == "small_cnn"
  assert (config.quant.weight_bits, config.quant.act_bits) == (32, 32)
  assert fmnist_configs.get_config("small_cnn,4w4a,cpu").quant.gradual
  with pytest.raises(ValueError, match="<model>,<precision>"):
    fmnist_configs.get_config("small_cnn,fashion_mnist,fp")


# -------------------------------------------------------- the small CNN ---

def test_small_cnn_parameter_count_and_sites():
  x = np.zeros((2, 28, 28, 1), np.float32)
  model = models.create("small_cnn", 10, quantize_weights=False,
                        quantize_activations=False)
  variables = model.init(jax.random.PRNGKey(0), x)
  count = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(variables))
  # conv1 3·3·1·32 + 32 = 320; conv2 3·3·32·64 + 64 = 18,496;
  # dense1 (7·7·64 = 3136)·128 + 128 = 401,536; dense2 128·10 + 10 = 1,290
  assert count == 320 + 18_496 + 401_536 + 1_290 == 421_642
  qat = models.create("small_cnn", 10).init(jax.random.PRNGKey(0), x)
  # + one alpha per weight quantizer (4) and activation quantizer (3)
  assert sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(qat)) == \
      421_642 + 7

  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
  program = ptq.FlaxProgram(model, variables, x, train=False)
  assert [(s.name, s.kind, s.size) for s in program.sites] == [
      ("conv1/in", "act", 784), ("conv1/wq", "weight", 288),
      ("aq1", "act", 14 * 14 * 32), ("conv2/wq", "weight", 18_432),
      ("aq2", "act", 3136), ("dense1/wq", "weight", 401_408),
      ("aq3", "act", 128), ("dense2/wq", "weight", 1280)]
  assert [(p.weight, p.act, p.macs) for p in program.products] == [
      ("conv1/wq", "conv1/in", 28 * 28 * 32 * 9),
      ("conv2/wq", "aq1", 14 * 14 * 64 * 9 * 32),
      ("dense1/wq", "aq2", 3136 * 128), ("dense2/wq", "aq3", 128 * 10)]
  program.calibrate(variables, [x])
  evaluate = program.accuracy_fn(
      variables, [(x, np.arange(8) % 10, np.ones(8, np.float32))])
  zeros = np.zeros(len(program.sites), np.int32)
  for bits in (8, 5, 3):
    evaluate(*ptq.uniform_formats(program.sites, bits))
  evaluate(zeros, zeros)
  assert program.correct_fn._cache_size() == 1  # formats are runtime values
  np.testing.assert_array_equal(program.apply(variables, x, zeros, zeros),
                                model.apply(variables, x))


def test_small_cnn_bias_sites():
  """``biases=True``: a format per bias, applied in the parameter tree."""
  x = np.random.default_rng(1).normal(size=(2, 28, 28, 1)).astype(np.float32)
  model = models.create("small_cnn", 10, quantize_weights=False,
                        quantize_activations=False)
  variables = model.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  params["conv2"]["bias"] = np.linspace(-1, 1, 64).astype(np.float32)
  variables = {"params": params}
  program = ptq.FlaxProgram(model, variables, x, biases=True, train=False)
  names = [s.name for s in program.sites]
  assert names == ["conv1/in", "conv1/wq", "conv1/bias", "aq1", "conv2/wq",
                   "conv2/bias", "aq2", "dense1/wq", "dense1/bias", "aq3",
                   "dense2/wq", "dense2/bias"]
  assert [s.size for s in program.sites if s.kind == "bias"] == [32, 64,
                                                                 128, 10]
  program.calibrate(variables, [x])
  assert program.sites[names.index("conv2/bias")].max_abs == 1.0
  bw = np.zeros(len(names), np.int32)
  f = np.zeros(len(names), np.int32)
  i = names.index("conv2/bias")
  bw[i], f[i] = 3, 1   # steps of 0.5, codes in [-3, 3]
  params_q = jax.tree_util.tree_map(lambda a: a, params)
  params_q["conv2"]["bias"] = np.round(params["conv2"]["bias"] * 2) / 2
  np.testing.assert_allclose(program.apply(variables, x, bw, f),
                             model.apply({"params": params_q}, x),
                             rtol=1e-6, atol=1e-6)
  # biases count in the memory: Σ BW·n over weights and biases
  bits = np.full(len(names), 8)
  assert ptq.memory_kib(program.sites, bits) == 8 * 421_642 / 8 / 1024


# ------------------------------------- real Fashion-MNIST (when installed) ---

def _real_fashion_mnist():
  try:
    return image_data.load_image_dataset("fashion_mnist", max_train=1024,
                                         max_val=300, max_test=300)
  except FileNotFoundError as e:
    pytest.skip("Fashion-MNIST IDX files not installed (`apt-get install -y "
                f"dataset-fashion-mnist`): {str(e).splitlines()[0]}")


def test_ptq_budget_holds_on_real_fashion_mnist(tmp_path):
  data = _real_fashion_mnist()
  config = fmnist_configs.get_config("small_cnn,fp")
  config.num_epochs = 1
  config.batch_size = 32
  config.eval_batch_size = 150
  config.progress_every_s = 1e9
  workdir = tmp_path / "run"
  classify.train_and_evaluate(config, str(workdir), verbose=False,
                              dataset=data)
  out = tmp_path / "ptq"
  row = ptq_cli.run_ptq(str(workdir), budget=1.0, search="sequential",
                        outdir=str(out), val_examples=300,
                        calib_examples=64, max_bits=8, dataset=data)
  assert row["float_val_acc"] > 50  # learned something in one epoch
  assert row["val_drop"] <= 1.0 + 1e-9
  assert row["memory_kib"] < row["memory_kib_8bit"]
  saved = json.loads((out / "formats.json").read_text())
  bw = np.array([f["bw"] for f in saved["formats"]])
  fr = np.array([f["f"] for f in saved["formats"]])
  # an independent re-evaluation of the saved formats keeps the budget
  _, problem, _ = ptq_cli.image_problem(
      classify.load_run_config(workdir),
      classify.load_source_variables(str(workdir)), val_examples=300,
      calib_examples=64, dataset=data)
  zeros = np.zeros_like(bw)
  drop = problem.evaluate(zeros, zeros) - problem.evaluate(bw, fr)
  assert drop == pytest.approx(row["val_drop"]) and drop <= 1.0 + 1e-9
  assert "| aq2 | act | 3136 |" in (out / "ptq.md").read_text()


def test_biases_flag_refused_for_node_classification(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"task": "node_classification",
       "quant": {"weight_bits": 32, "act_bits": 32}}))
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(ValueError, match="--biases applies to image "
                     "classification"):
    ptq_cli.run_ptq(str(tmp_path), biases=True)
