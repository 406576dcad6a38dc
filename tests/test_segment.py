"""Segmentation trainer: metrics with padding/ignore, data, optimiser groups,
and a short end-to-end DeepLabV3 run on generated label maps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import deeplab as deeplab_configs
from configs import tv_pipeline
from train import classify
from train import pipeline
from train import segment


def brute_force_miou(pred, label, num_classes, ignore=255):
  ious = []
  for c in range(num_classes):
    valid = label != ignore
    p, l = (pred == c) & valid, (label == c) & valid
    union = np.sum(p | l)
    if union:
      ious.append(np.sum(p & l) / union)
  return float(np.mean(ious))


def test_sums_and_summary_match_brute_force_with_padding():
  rng = np.random.default_rng(0)
  num_classes = 5
  logits = rng.normal(size=(4, 6, 7, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, (4, 6, 7))
  labels[rng.random((4, 6, 7)) < 0.2] = 255
  mask = np.array([1, 1, 1, 0], np.float32)  # the last example is padding
  totals = jax.device_get(segment.segmentation_sums(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
  summary = segment.segmentation_summary(totals)
  pred = logits.argmax(-1)[:3]
  lab = labels[:3]
  valid = lab != 255
  assert summary["count"] == 3
  np.testing.assert_allclose(summary["acc"],
                             np.sum((pred == lab) & valid) / np.sum(valid),
                             rtol=1e-6)
  np.testing.assert_allclose(summary["miou"],
                             brute_force_miou(pred, lab, num_classes),
                             rtol=1e-6)
  log_p = jax.nn.log_softmax(logits[:3])
  nll = -np.take_along_axis(np.asarray(log_p), np.where(valid, lab, 0)[..., None],
                            -1)[..., 0]
  np.testing.assert_allclose(summary["loss"], nll[valid].mean(), rtol=1e-5)


def test_synthetic_data_and_paired_augmentation():
  data = segment.make_synthetic_segmentation(8, 2, 2, size=16, num_classes=3)
  assert data.train_images.shape == (8, 16, 16, 3)
  assert data.train_labels.shape == (8, 16, 16)
  assert set(np.unique(data.train_labels)) <= {0, 1, 2, 255}
  assert np.all(data.train_labels[:, 0, :] == 255)
  # The label map follows its image through the crop and flip: encode the
  # pixel position in the image and check it against the label map.
  n, size = 4, 12
  pos = np.arange(size * size).reshape(size, size)
  images = np.repeat(np.stack([pos % 256] * 3, -1)[None], n, 0).astype(
      np.uint8)
  labels = np.repeat((pos % 256)[None], n, 0).astype(np.uint8)
  x, y = segment.random_crop_flip_pairs(images, labels, 8,
                                        np.random.default_rng(1))
  assert x.shape == (n, 8, 8, 3) and y.shape == (n, 8, 8)
  np.testing.assert_array_equal(x[..., 0], y)
  # Crops larger than the image pad with the ignore label.
  _, y_big = segment.random_crop_flip_pairs(images, labels, 14,
                                            np.random.default_rng(2))
  assert np.sum(y_big == 255) >= n * (14 * 14 - 12 * 12)


def test_cityscapes_train_ids_and_missing_data_error():
  ids = np.array([[7, 8, 0], [26, 33, 255]], np.uint8)
  np.testing.assert_array_equal(segment.cityscapes_train_ids(ids),
                                [[0, 1, 255], [13, 18, 255]])
  with pytest.raises(RuntimeError, match="manual"):
    segment.load_cityscapes("/nonexistent/tfds", "train", max_examples=1)


def test_lr_scales_give_the_encoder_a_smaller_step():
  config = deeplab_configs.get_config("synthetic,5w5a,cpu")
  config.optim.weight_decay = 0.0
  config.optim.momentum = 0.0
  params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
  tx = classify.create_optimizer(config, params, steps_per_epoch=10)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.01, rtol=1e-6)
  config.optim.lr_scales = {"encoder": 0.1}
  with pytest.raises(ValueError, match="encoder"):
    classify.create_optimizer(config, params, steps_per_epoch=10)


def test_deeplab_trains_on_generated_label_maps(tmp_path):
  config = deeplab_configs.get_config("synthetic,5w5a,cpu")
  config.num_epochs = 2
  config.data.num_train = 12  # 3 steps per epoch
  config.data.num_val = 4
  config.data.num_test = 4
  config.log_every_steps = 1
  config.progress_every_s = 1e9
  results = segment.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert 0 <= results["test_miou"] <= 1 and 0 <= results["test_acc"] <= 1
  assert results["val_miou"] >= 0
  c = results["consistency"]
  assert len(c["mse"]) > 4 and np.all(np.isfinite(c["mse"]))
  rows = [r for r in classify.common.MetricWriter(tmp_path).read()
          if "train_loss" in r]
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  for name in ("results.json", "report.md", "curves.png", "layerwise_mse.png"):
    assert (tmp_path / name).exists()


def test_table3_pipeline_configs():
  config = tv_pipeline.get_config("deeplabv3_resnet50,cityscapes,5w5a")
  pipeline.check_pipeline_config(config)
  assert config.stages == ("quantize", "tv_finetune", "quantize_continued")
  q, t = config.quantize, config.tv_finetune
  assert (q.batch_size, q.num_epochs, q.optim.lr, q.optim.schedule) == (
      6, 30, 0.1, "poly")
  assert dict(q.optim.lr_scales) == {"backbone": 0.1}
  assert (t.batch_size, t.num_epochs, t.optim.lr) == (4, 10, 1e-3)
  assert t.model.tv_activation and not config.quantize_continued.model.get(
      "tv_activation")
  assert (q.quant.weight_bits, q.quant.act_bits) == (5, 5)
