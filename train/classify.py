"""Image classification trainer (CIFAR ResNets, stable ResNets, MobileNetV2).

    python -m train.main --config=configs/cifar.py:resnet56,cifar10_jpeg,4w4a \
        --workdir=workdirs/r56_4w4a

Layout as in the Flax ImageNet example: :func:`create_train_state`,
:func:`make_train_step`, :func:`make_eval_step`, :func:`evaluate` and
:func:`train_and_evaluate`.

* Data parallel over every device with ``jax.sharding``: a 1-D ``Mesh``
  named ``"data"``; batches are sharded along it, the train state is
  replicated.  BatchNorm statistics are computed over the *global* batch (XLA
  inserts the reductions), so a sharded step equals the single-device step.
  Multi-host: each process feeds its slice of the global batch
  (``jax.make_array_from_process_local_data``) after
  ``jax.distributed.initialize()`` (``config.distributed``).
* SGD with momentum, cosine decay and (coupled, PyTorch-style) weight decay.
* Bits are runtime int32 arrays: the gradual schedule of Sec. 5.3 (16 bits,
  minus one every ``epochs_per_step`` epochs down to the target) never
  recompiles.
* Orbax checkpoints every ``checkpoint_every_steps`` steps and at every epoch
  end.  The batch stream is a pure function of (seed, epoch, batch index), so
  a run killed anywhere and resumed ends bit-identical to an uninterrupted one;
  the checkpoint also holds the grain input iterator's state, from which a
  run killed mid-epoch continues.
* Validation (``data.val_fraction`` of train) selects the reported model;
  test accuracy is given for the selected and for the final model.
* At the end: the consistency report of Tables 4/5 and Fig. 3 (accuracy at b
  bits and with clip-only activations, and the per-layer MSE between the two
  runs' hidden maps), ``results.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from pdeq_jax import consistency
from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import noise
from pdeq_jax import quant
from pdeq_jax import surgery
from pdeq_jax import xla_options
from pdeq_jax.data import images as image_data
from train import common
from train import noise as train_noise
from train import validate

FLOAT_BITS = common.FLOAT_BITS
DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a training step changes (a pytree, checkpointed as is)."""
  step: jax.Array
  params: Any
  model_state: Any  # the non-parameter collections, e.g. batch_stats
  opt_state: Any


# ----------------------------------------------------------------- config ---

def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad values before any work is done."""
  validate.image(config)  # ranges, names, bits, schedule, device count
  train_noise.check_train_config(config)
  if config.init_from:
    path = pathlib.Path(config.init_from)
    if path.suffix in STATE_DICT_SUFFIXES:
      if not path.is_file():
        raise validate.ConfigError(
            "no such state-dict file", "config.init_from", config.init_from,
            "allowed: an existing .pth/.pt/.npz file, or the workdir of a "
            "finished run")
    elif not (path / "checkpoints").is_dir():
      raise validate.ConfigError(
          "no checkpoints directory there", "config.init_from",
          config.init_from, "allowed: the workdir of a finished run, or a "
          ".pth/.pt/.npz state dict")


bits_for_epoch = common.bits_for_epoch


target_bits = common.target_bits


# ------------------------------------------------------------ model/optim ---

def create_model(config: ml_collections.ConfigDict, num_classes: int):
  options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return models.create(
      config.model.name, num_classes,
      quantize_activations=config.quant.act_bits != FLOAT_BITS,
      quantize_weights=config.quant.weight_bits != FLOAT_BITS, **options)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  o = config.optim
  total = int(config.num_epochs) * steps_per_epoch
  warmup = int(o.warmup_epochs * steps_per_epoch)
  if o.schedule == "constant":
    main = optax.constant_schedule(o.lr)
  elif o.schedule == "poly":  # DeepLab's (1 - t/T)^power
    main = optax.polynomial_schedule(o.lr, 0.0, o.get("poly_power", 0.9),
                                     max(total - warmup, 1))
  elif o.schedule == "step":
    main = optax.piecewise_constant_schedule(
        o.lr, {int(e * steps_per_epoch) - warmup: o.step_factor
               for e in o.step_epochs})
  else:
    main = optax.cosine_decay_schedule(o.lr, max(total - warmup, 1))
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, warmup), main], [warmup])
  return main


def _decay_mask(params, on: str):
  if on == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  return flax.traverse_util.path_aware_map(
      lambda path, _: path[-1] == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict, params,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD + momentum with coupled weight decay (as ``torch.optim.SGD``).

  ``config.optim.lr_scales`` ({top-level module name: factor}, e.g.
  ``{"backbone": 0.1}`` for DeepLab's encoder at a tenth of the head's
  learning rate) scales the learning rate of parameter groups.
  """
  o = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  sgd = lambda scale: optax.chain(
      optax.masked(optax.add_decayed_weights(o.weight_decay),
                   _decay_mask(params, o.weight_decay_on)),
      optax.sgd(lambda step: scale * schedule(step), momentum=o.momentum,
                nesterov=o.nesterov))
  scales = dict(o.get("lr_scales", {}) or {})
  if not scales:
    return sgd(1.0)
  unknown = sorted(set(scales) - set(params))
  if unknown:
    raise ValueError(f"config.optim.lr_scales names {unknown}, which are not "
                     f"top-level parameter groups of the model "
                     f"{sorted(params)}")
  labels = {name: jax.tree_util.tree_map(lambda _, n=name: n if n in scales
                                         else "default", sub)
            for name, sub in params.items()}
  return optax.multi_transform(
      {"default": sgd(1.0), **{n: sgd(float(f)) for n, f in scales.items()}},
      labels)


def create_train_state(config: ml_collections.ConfigDict, model,
                       image_shape: Tuple[int, ...], steps_per_epoch: int
                       ) -> Tuple[TrainState, optax.GradientTransformation]:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      key, dummy, layers.FLOAT_BITS)
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  tx = create_optimizer(config, params, steps_per_epoch)
  state = TrainState(step=jnp.int32(0), params=params, model_state=variables,
                     opt_state=tx.init(params))
  return state, tx


def count_params(params) -> Dict[str, int]:
  """Parameters, with the learned quantizer scales (alpha) counted apart."""
  total = alphas = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    if getattr(path[-1], "key", "") == "alpha":
      alphas += n
  return {"num_params": total - alphas, "num_alpha": alphas}


def load_source_variables(source_workdir: str, which: str = "best") -> Dict[str, Any]:
  """The variables of another run (its ``best`` or ``final`` model)."""
  directory = pathlib.Path(source_workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"config.init_from: no checkpoints under "
                            f"{directory}")
  if which not in ("best", "final"):
    raise ValueError(f"config.init_from_model must be 'best' or 'final', got "
                     f"{which!r}")
  ckpt = common.Checkpointer(directory)
  tree = ckpt.restore_raw()
  ckpt.close()
  best = tree["best"]
  if which == "best" and int(np.asarray(best["epoch"])) >= 0:
    return best["variables"]
  state = tree["state"]
  return {"params": state["params"], **state["model_state"]}


STATE_DICT_SUFFIXES = (".pth", ".pt", ".npz")


def import_state_dict(path: str, model_name: str, target: Dict[str, Any]):
  """Pretrained torchvision-format weights (ResNet-50 / DeepLabV3) into
  ``target``; the quantizer α's and TV γ's keep their initialisation."""
  from pdeq_jax import torchvision_import  # pylint: disable=import-outside-toplevel
  state_dict = torchvision_import.load_torch_state_dict(path)
  if model_name == "deeplabv3_resnet50" and any(
      k.startswith("classifier.") for k in state_dict):
    merged = torchvision_import.import_torchvision_deeplabv3(state_dict,
                                                             target)
  elif model_name in ("resnet50", "deeplabv3_resnet50"):
    merged = torchvision_import.import_torchvision_resnet50(state_dict, target)
  else:
    raise ValueError(f"config.init_from={path!r}: state dicts can be imported "
                     f"into resnet50 / deeplabv3_resnet50, not {model_name!r}")
  return merged, {"copied": sorted(state_dict), "new": [], "dropped": []}


def init_from_source(config: ml_collections.ConfigDict, state: TrainState,
                     tx: optax.GradientTransformation,
                     verbose: bool) -> TrainState:
  """Starts from another run's weights (two-phase pipeline, Sec. 5.2).

  Shared arrays are copied bit for bit; new ones (TV γ's, α's of a network
  that was float) keep their initialisation; the optimiser starts afresh.
  """
  target = {"params": state.params, **state.model_state}
  if pathlib.Path(config.init_from).suffix in STATE_DICT_SUFFIXES:
    merged, report = import_state_dict(config.init_from, config.model.name,
                                       target)
  else:
    source = load_source_variables(config.init_from, config.init_from_model)
    merged, report = surgery.transplant_variables(
        source, target, allow_dropped=tuple(config.init_from_allow_dropped))
  if verbose:
    print(f"initialised from {config.init_from} ({config.init_from_model}): "
          f"{len(report['copied'])} arrays copied, new: {report['new']}, "
          f"dropped: {report['dropped']}")
  params = merged.pop("params")
  return TrainState(step=state.step, params=params, model_state=merged,
                    opt_state=tx.init(params))


# ------------------------------------------------------------------ tasks ---

class Task(NamedTuple):
  """What the loop optimises and measures: classification, segmentation...

  Attributes:
    loss: ``(logits, labels) -> (mean loss, {name: mean metric})``.
    eval_sums: ``(logits, labels, mask [B]) -> {name: sum}`` over a batch,
      padded examples masked out (jit-able).
    summarize: host totals of ``eval_sums`` -> ``{name: float}``; must have
      ``"loss"`` and ``"acc"`` and the ``select`` key.
    select: the summary key (higher is better) that selects the model.
  """
  loss: Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]
  eval_sums: Callable[..., Dict[str, jax.Array]]
  summarize: Callable[[Dict[str, Any]], Dict[str, float]]
  select: str = "acc"


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def classification_loss(logits, labels):
  return jnp.mean(cross_entropy(logits, labels)), {
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def classification_sums(logits, labels, mask):
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask),
          "loss": jnp.sum(cross_entropy(logits, labels) * mask),
          "count": jnp.sum(mask)}


def classification_summary(totals) -> Dict[str, float]:
  count = float(totals["count"])
  return {"acc": float(totals["correct"]) / count,
          "loss": float(totals["loss"]) / count, "count": int(count)}


CLASSIFICATION = Task(classification_loss, classification_sums,
                      classification_summary, "acc")
TASK = CLASSIFICATION  # this trainer's task (see train.tasks)


# ------------------------------------------------------------------- data ---

class ArraySource:
  """In-memory image-classification data (:class:`ImageDataset`) as batches.

  The interface every trainer data source has: ``name``, ``num_classes``,
  ``image_shape``, ``num_examples(split)``, ``train_batches(batch_size, seed,
  epoch, start_batch)`` (a pure function of its arguments, for exact
  resume) and ``eval_batches(split, batch_size, max_examples)`` (every
  example once, the last batch padded and masked).  Both are grain
  iterators (:func:`pdeq_jax.data.images.loader`: ``threads`` prefetching
  threads, ``prefetch`` batches ahead, ``workers`` worker processes for
  training); the trainer checkpoints the training iterator's
  ``get_state()``.
  """

  def __init__(self, dataset: image_data.ImageDataset, augment: bool = True,
               prefetch: int = 2, threads: int = image_data.DEFAULT_THREADS,
               workers: int = 0):
    self.dataset, self.augment = dataset, augment
    self.loader = {"prefetch": prefetch, "threads": threads,
                   "workers": workers}
    self.name = dataset.name
    self.num_classes = dataset.num_classes
    self.image_shape = dataset.image_shape

  def _split(self, split: str):
    d = self.dataset
    return {"train": (d.train_images, d.train_labels),
            "val": (d.val_images, d.val_labels),
            "test": (d.test_images, d.test_labels)}[split]

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def train_batches(self, batch_size: int, seed: int, epoch: int,
                    start_batch: int = 0):
    images, labels = self._split("train")
    return image_data.train_batches(
        images, labels, batch_size, seed=seed, epoch=epoch,
        mean=self.dataset.mean, std=self.dataset.std, augment=self.augment,
        start_batch=start_batch, **self.loader)

  def eval_batches(self, split: str, batch_size: int, max_examples: int = 0):
    images, labels = self._split(split)
    if max_examples and max_examples < len(labels):
      # A class-balanced subset: the sets are stored class by class, so a
      # prefix would hold only a few classes.
      idx = np.sort(image_data.balanced_subset(labels, max_examples, 0))
      images, labels = images[idx], labels[idx]
    # Evaluation batches are slices (no per-record work): no processes.
    return image_data.eval_batches(images, labels, batch_size,
                                   mean=self.dataset.mean,
                                   std=self.dataset.std,
                                   **{**self.loader, "workers": 0})


class TfdsStreamSource:
  """A large tfds image-classification set (ImageNet) streamed from disk.

  Needs TensorFlow and a prepared tfds dataset (ImageNet: a manual
  download); configured for Table 1, not run on the CPU-only development
  machines (which have neither).  Train: Inception-style random-resized
  crops + flips at ``image_size``; eval: resize to ``image_size / 0.875`` and
  centre crop.  ``val_examples`` train images are held out for validation;
  the tfds ``validation`` split is the test set.  The order is seeded per
  epoch and ``start_batch`` skips examples, so a resumed run sees the same
  batches (up to tf.data's determinism guarantees).
  """

  MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
  STD = np.asarray([0.229, 0.224, 0.225], np.float32)

  def __init__(self, name: str, data_dir: Optional[str], image_size: int = 224,
               val_examples: int = 10000, augment: bool = True):
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self.builder = tfds.builder(name, data_dir=data_dir or None)
      info = self.builder.info
      total = info.splits["train"].num_examples
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"dataset {name!r} needs TensorFlow and a prepared tensorflow-"
          f"datasets copy (data_dir={data_dir!r}; ImageNet: put the manual "
          f"download in <data_dir>/downloads/manual and run `tfds build "
          f"{name}`): {type(e).__name__}: {e}") from e
    self.tf, self.tfds = tf, tfds
    self.name, self.image_size, self.augment = name, int(image_size), augment
    self.num_classes = info.features["label"].num_classes
    self.image_shape = (self.image_size, self.image_size, 3)
    self.splits = {"train": f"train[:{total - val_examples}]",
                   "val": f"train[{total - val_examples}:]",
                   "test": "validation"}
    self.sizes = {"train": total - val_examples, "val": val_examples,
                  "test": info.splits["validation"].num_examples}

  def num_examples(self, split: str) -> int:
    return self.sizes[split]

  def _decode(self, example, train: bool, seed):
    tf = self.tf
    image = tf.io.decode_jpeg(example["image"], channels=3)
    if train and self.augment:
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
          area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
          min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
      image = tf.slice(image, begin, size)
      image = tf.image.resize(image, self.image_shape[:2])
      image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    else:
      resize = int(round(self.image_size / 0.875))
      image = tf.image.resize(image, (resize, resize))
      image = tf.image.resize_with_crop_or_pad(image, self.image_size,
                                               self.image_size)
    image = (image / 255.0 - self.MEAN) / self.STD
    return image, example["label"]

  def _dataset(self, split: str, shuffle_seed: Optional[int]):
    tfds = self.tfds
    read = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    return self.builder.as_dataset(split=self.splits[split],
                                   shuffle_files=shuffle_seed is not None,
                                   read_config=read,
                                   decoders={"image": tfds.decode.SkipDecoding()})

  def train_batches(self, batch_size: int, seed: int, epoch: int,
                    start_batch: int = 0):
    tf = self.tf
    epoch_seed = seed * 100003 + epoch
    ds = self._dataset("train", epoch_seed).shuffle(
        16 * batch_size, seed=epoch_seed).enumerate()
    ds = ds.skip(start_batch * batch_size).map(
        lambda i, ex: self._decode(ex, True, tf.stack(
            [tf.cast(epoch_seed, tf.int64), i])),
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    for x, y in self.tfds.as_numpy(ds):
      yield x.astype(np.float32), y.astype(np.int32)

  def eval_batches(self, split: str, batch_size: int, max_examples: int = 0):
    ds = self._dataset(split, None)
    if max_examples:
      ds = ds.take(max_examples)
    ds = ds.map(lambda ex: self._decode(ex, False, None)).batch(batch_size)
    for x, y in self.tfds.as_numpy(ds.prefetch(2)):
      yield image_data.pad_batch((x.astype(np.float32), y.astype(np.int32)),
                                 batch_size)


STREAMED_DATASETS = ("imagenet2012", "imagenet2012_subset")


# ------------------------------------------------------------------ steps ---

def make_train_step(model, tx: optax.GradientTransformation,
                    task: Task = CLASSIFICATION, training_noise=None
                    ) -> Callable[..., Tuple[TrainState, Dict[str, jax.Array]]]:
  """``train_step(state, images, labels, bits, rng) -> (state, metrics)``.

  Pure; jit it with shardings via :func:`jit_train_step`.  ``rng`` feeds
  the models' ``dropout`` stream (models without dropout ignore it).
  ``training_noise``: None, or ``(sites, fn)`` from
  ``train.noise.training_noise`` (noise-aware training; sigma and key are
  functions of ``state.step``).
  """
  def train_step(state: TrainState, images, labels, bits, rng):
    mutable = list(state.model_state)

    def loss_fn(params):
      with _noise_context(training_noise, state.step):
        logits, new_model_state = model.apply(
            {"params": params, **state.model_state}, images, bits,
            train=True, mutable=mutable, rngs={"dropout": rng})
      loss, metrics = task.loss(logits, labels)
      return loss, (metrics, new_model_state)

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = TrainState(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       model_state=dict(new_model_state), opt_state=opt_state)
    return state, {"loss": loss, **metrics}
  return train_step


def _noise_context(training_noise, step):
  """``noise.inject`` at ``step`` of the schedule, or no context."""
  if training_noise is None:
    return contextlib.nullcontext()
  sites, fn = training_noise
  sigmas, key = fn(step)
  return noise.inject(sigmas, key, sites)


def make_eval_step(model, task: Task = CLASSIFICATION
                   ) -> Callable[..., Dict[str, jax.Array]]:
  """``eval_step(variables, images, labels, mask, bits)`` -> summed metrics."""
  def eval_step(variables, images, labels, mask, bits):
    logits = model.apply(variables, images, bits, train=False)
    return task.eval_sums(logits, labels, mask)
  return eval_step


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all of them)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def shardings(mesh: Mesh) -> Tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded along the data axis)."""
  return (NamedSharding(mesh, PartitionSpec()),
          NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def jit_train_step(train_step, mesh: Mesh):
  replicated, batch = shardings(mesh)
  return xla_options.jit(train_step,
                         in_shardings=(replicated, batch, batch, replicated,
                                       replicated),
                         out_shardings=(replicated, replicated),
                         donate_argnums=(0,))


def jit_eval_step(eval_step, mesh: Mesh):
  replicated, batch = shardings(mesh)
  return xla_options.jit(eval_step,
                         in_shardings=(replicated, batch, batch, batch,
                                       replicated),
                         out_shardings=replicated)


def to_global(batch: Tuple[np.ndarray, ...], mesh: Mesh) -> Tuple[jax.Array, ...]:
  """Host batch (global, identical on every process) -> sharded jax.Arrays.

  Each process contributes only its own contiguous slice of the global batch.
  """
  _, sharding = shardings(mesh)
  n_proc, index = jax.process_count(), jax.process_index()
  out = []
  for x in batch:
    per_process = x.shape[0] // n_proc
    local = x[index * per_process:(index + 1) * per_process]
    out.append(jax.make_array_from_process_local_data(sharding, local,
                                                      x.shape))
  return tuple(out)


def _sum_batches(step_fn, batches, mesh: Mesh):
  totals = None
  for batch in batches:
    out = step_fn(*to_global(batch, mesh))
    totals = out if totals is None else jax.tree_util.tree_map(
        jnp.add, totals, out)
  return None if totals is None else jax.device_get(totals)


def evaluate(eval_step, variables, batches, *, bits: layers.QuantBits,
             mesh: Mesh, task: Task = CLASSIFICATION) -> Dict[str, float]:
  """``task.summarize`` of the metric sums over every (unmasked) example."""
  common.check_runtime_bits(bits)
  totals = _sum_batches(
      lambda x, y, mask: eval_step(variables, x, y, mask, bits), batches,
      mesh)
  if totals is None:
    return {"acc": float("nan"), "loss": float("nan"), task.select:
            float("nan"), "count": 0}
  return task.summarize(totals)


def evaluate_consistency(model, variables, batches, *,
                         bits: layers.QuantBits, mesh: Mesh,
                         task: Task = CLASSIFICATION) -> Dict[str, Any]:
  """Tables 4/5 and Fig. 3: the same weights run with b-bit activations and
  with clip-only activations (weights at their b bits in both runs).

  Returns both runs' metrics (``test_acc_bits``, ``test_acc_clip_only`` and
  the full summaries) and the per-layer (normalised) MSE between the two
  runs' hidden maps (every block's output), over all the examples.
  """
  common.check_runtime_bits(bits)
  reference_bits = layers.QuantBits(bits.weights,
                                    quant.bits_as_array(None))
  replicated, batch_sharding = shardings(mesh)

  @functools.partial(xla_options.jit,
                     in_shardings=(replicated, batch_sharding, batch_sharding,
                                   batch_sharding, replicated, replicated),
                     out_shardings=replicated)
  def step(variables, x, y, mask, bits_q, bits_ref):
    logits_q, hidden_q = model.apply(variables, x, bits_q, return_hidden=True)
    logits_r, hidden_r = model.apply(variables, x, bits_ref,
                                     return_hidden=True)
    return {"bits": task.eval_sums(logits_q, y, mask),
            "clip_only": task.eval_sums(logits_r, y, mask),
            "examples": jnp.sum(mask),
            "mse": consistency.squared_error_sums(hidden_q, hidden_r, mask)}

  totals = _sum_batches(
      lambda x, y, mask: step(variables, x, y, mask, bits, reference_bits),
      batches, mesh)
  summary_q = task.summarize(totals["bits"])
  summary_r = task.summarize(totals["clip_only"])
  return {"test_acc_bits": summary_q["acc"],
          "test_acc_clip_only": summary_r["acc"],
          "test_metrics_bits": summary_q, "test_metrics_clip_only": summary_r,
          "examples": int(totals["examples"]),
          **consistency.mse_from_sums(totals["mse"])}


# ------------------------------------------------------------------- loop ---

def _host(tree):
  """Host (numpy) copy of ``tree``, on every process.

  The train state is replicated, so each process holds all of it; an array
  sharded across processes (not fully addressable) is gathered first, a
  collective that every process reaches at the same point of the loop.
  """
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                         or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(one, tree)


def load_data(config: ml_collections.ConfigDict) -> image_data.ImageDataset:
  d = config.data
  return image_data.load_image_dataset(
      d.name, d.data_dir or None, val_fraction=d.val_fraction,
      split_seed=d.split_seed, max_train=d.max_train or None,
      max_test=d.max_test or None, cache_dir=d.cache_dir or None)


def make_source(config: ml_collections.ConfigDict,
                dataset: Optional[image_data.ImageDataset] = None
                ) -> ArraySource:
  """The trainer's data source (``dataset`` given: tests)."""
  if dataset is None and config.data.name in STREAMED_DATASETS:
    return TfdsStreamSource(config.data.name, config.data.data_dir,
                            image_size=config.data.get("image_size", 224),
                            augment=config.data.augment)
  data = dataset if dataset is not None else load_data(config)
  return ArraySource(data, augment=config.data.augment,
                     prefetch=int(config.data.prefetch),
                     threads=int(config.data.get(
                         "threads", image_data.DEFAULT_THREADS)),
                     workers=int(config.data.get("workers", 0)))


def encode_data_state(position: Dict[str, Any]) -> np.ndarray:
  """A data iterator's position (``{"step": n, "iterator": its get_state()}``
  or ``{}``) as uint8 bytes, a leaf of the Orbax checkpoint."""
  return np.frombuffer(repr(position).encode(), np.uint8).copy()


def decode_data_state(array: Any) -> Dict[str, Any]:
  """Inverse of :func:`encode_data_state`."""
  import ast  # pylint: disable=import-outside-toplevel
  return ast.literal_eval(np.asarray(array, np.uint8).tobytes().decode())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps_this_call: Optional[int] = None,
                       verbose: bool = True,
                       dataset: Optional[image_data.ImageDataset] = None
                       ) -> Dict[str, Any]:
  """Trains, selects on validation, evaluates; returns the results dict.

  Args:
    config: see ``configs/cifar.py``.
    workdir: checkpoints, metrics, plots and results go here; an existing run
      in it is resumed.
    max_steps_this_call: stop (after a checkpoint) once this many steps ran in
      this call: simulates a crash in tests.
    verbose: print progress.
    dataset: an already-loaded dataset (tests), else ``config.data``.
  """
  check_config(config)
  return run(config, workdir, make_source(config, dataset), CLASSIFICATION,
             max_steps_this_call=max_steps_this_call, verbose=verbose)


def run(config: ml_collections.ConfigDict, workdir: str, source: Any,
        task: Task, *, max_steps_this_call: Optional[int] = None,
        verbose: bool = True) -> Dict[str, Any]:
  """The training loop every image task shares (see the module docstring).

  ``source`` is a data source with the interface of :class:`ArraySource`;
  ``task`` says what is optimised and measured.  Returns the results dict
  (or ``{"interrupted_at_step": n}`` when ``max_steps_this_call`` stopped
  it early).
  """
  workdir = common.prepare_workdir(workdir, config)
  batch_size = int(config.batch_size)
  num_train = source.num_examples("train")
  steps_per_epoch = image_data.steps_per_epoch(num_train, batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size={batch_size} exceeds the "
                     f"{num_train} training examples")
  num_epochs = int(config.num_epochs)
  total_steps = num_epochs * steps_per_epoch

  model = create_model(config, source.num_classes)
  state, tx = create_train_state(config, model, source.image_shape,
                                 steps_per_epoch)
  sizes = count_params(state.params)
  mesh = make_mesh()
  replicated, _ = shardings(mesh)
  train_step = jit_train_step(make_train_step(
      model, tx, task, train_noise.training_noise(config, steps_per_epoch)),
                              mesh)
  eval_step = jit_eval_step(make_eval_step(model, task), mesh)
  dropout_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  select = task.select

  # Host copies: the state's device buffers are donated to the train step.
  best = {"val_score": np.asarray(-np.inf, np.float32),
          "epoch": np.asarray(-1, np.int32),
          "variables": _host({"params": state.params, **state.model_state})}
  ckpt = common.Checkpointer(workdir / "checkpoints")
  writer = common.MetricWriter(workdir)
  if config.init_from and ckpt.latest_step() is None:
    state = init_from_source(config, state, tx, verbose)
    best["variables"] = _host({"params": state.params, **state.model_state})
  # Replicated before a restore, so that Orbax restores every process's
  # shards straight into that sharding (another one could need cross-host
  # transfers, which multi-process CPU runs do not have).
  state = jax.device_put(state, replicated)
  data_state: Dict[str, Any] = {}  # the input iterator's position
  if ckpt.latest_step() is not None:
    target = {"state": state, "best": best}
    saved_data = ckpt.metadata().get("data")
    if saved_data is not None:  # (checkpoints before grain have none)
      target["data"] = np.zeros(saved_data.shape, np.uint8)
    restored = ckpt.restore(target)
    state, best = restored["state"], restored["best"]
    if saved_data is not None:
      data_state = decode_data_state(restored["data"])
    if verbose:
      print(f"resumed from {workdir} at step {int(state.step)}")
  state = jax.device_put(state, replicated)
  start_step = int(state.step)
  writer.truncate_after(start_step)

  saved = {"step": start_step}

  def save(step: int) -> None:
    if step != saved["step"]:
      # Host copies: the next step donates the state's device buffers.
      tree = _host({"state": state, "best": best})
      tree["data"] = encode_data_state(
          {"step": step, "iterator": batches.get_state()}
          if step % steps_per_epoch and hasattr(batches, "get_state") else {})
      stop({"parameters": tree["state"].params}, step)
      # the training metrics of the steps since the last log line, so that
      # a run resumed here logs the same means as an uninterrupted one
      pending[str(step)] = [{k: float(v) for k, v in m.items()}
                            for m in jax.device_get(window)]
      for old in sorted(pending, key=int)[:-3]:  # Orbax keeps the last 2
        del pending[old]
      common.write_json(pending_file, pending)
      ckpt.save(step, tree, force=True)
      saved["step"] = step

  def stop(values, step: int) -> None:
    """Stops on a NaN/Inf in ``values``, keeping the last good checkpoint."""
    common.check_finite(
        values, f"step {step} (epoch {step / steps_per_epoch:.2f})",
        f"step {saved['step']}" if saved["step"] else None,
        on_error=ckpt.close)

  stop_step = total_steps if max_steps_this_call is None else min(
      total_steps, start_step + max_steps_this_call)
  progress = common.Progress(total_steps, start=start_step, unit="step",
                             enabled=verbose, every_s=config.progress_every_s)
  lr_fn = learning_rate_schedule(config, steps_per_epoch)
  eval_batch = int(config.eval_batch_size)
  log_every = int(config.log_every_steps)
  ckpt_every = int(config.checkpoint_every_steps)
  step = start_step
  t_start = time.perf_counter()
  window: list = []
  pending_file = workdir / "pending_metrics.json"
  pending = (json.loads(pending_file.read_text()) if pending_file.exists()
             and start_step else {})
  window = [{k: np.float32(v) for k, v in m.items()}
            for m in pending.get(str(start_step), [])]
  while step < stop_step:
    epoch, start_batch = divmod(step, steps_per_epoch)
    bits = bits_for_epoch(config, epoch)
    common.check_runtime_bits(bits)
    resume = data_state.get("iterator") if start_batch and \
        data_state.get("step") == step else None
    data_state = {}
    batches = source.train_batches(batch_size, int(config.seed), epoch,
                                   0 if resume is not None else start_batch)
    if resume is not None:  # the checkpointed position of the iterator
      batches.set_state(resume)
      if resume.get("next_index", start_batch) != start_batch:
        raise ValueError(f"the checkpointed input iterator is at batch "
                         f"{resume['next_index']} of epoch {epoch + 1}, the "
                         f"train state at batch {start_batch}")
    t_log = time.perf_counter()  # images/s of the training steps only
    for images, labels in batches:
      state, metrics = train_step(state, *to_global((images, labels), mesh),
                                  bits, jax.random.fold_in(dropout_key, step))
      step += 1
      window.append(metrics)
      if step % log_every == 0 or step % steps_per_epoch == 0:
        summary = {k: float(np.mean([m[k] for m in jax.device_get(window)]))
                   for k in window[0]}
        now = time.perf_counter()
        images_per_second = len(window) * batch_size / max(now - t_log, 1e-9)
        window, t_log = [], now
        stop(summary, step)  # every log_every_steps steps and epoch end
        writer.write(step=step, epoch=step / steps_per_epoch,
                     lr=float(lr_fn(step - 1)), weight_bits=int(bits.weights),
                     act_bits=int(bits.activations),
                     images_per_second=images_per_second,
                     **{f"train_{k}": v for k, v in summary.items()},
                     **common.quantizer_stats(state.params))
        shown = " ".join(f"{k} {v:.3f}" for k, v in summary.items())
        progress.update(step, items_per_unit=batch_size, item_name="img",
                        extra=f"epoch {epoch + 1}/{num_epochs} {shown} bits "
                        f"{int(bits.weights)}W{int(bits.activations)}A")
      if step % steps_per_epoch == 0:
        break  # epoch end: evaluate below
      if ckpt_every and step % ckpt_every == 0:
        save(step)
      if step >= stop_step:
        break
    if step % steps_per_epoch == 0:
      variables = {"params": state.params, **state.model_state}
      val = evaluate(eval_step, variables,
                     source.eval_batches("val", eval_batch), bits=bits,
                     mesh=mesh, task=task)
      done_epoch = step // steps_per_epoch - 1
      if val.get("count", 0):
        stop({f"val_{k}": v for k, v in val.items()}, step)
      # Select only among epochs trained at the target bits (the gradual
      # schedule's early epochs are a different, higher-precision model).
      at_target = common.at_target_bits(config, bits)
      if at_target and not np.isnan(val[select]) and \
          val[select] > float(best["val_score"]):
        best = {"val_score": np.asarray(val[select], np.float32),
                "epoch": np.asarray(done_epoch, np.int32),
                "variables": _host(variables)}
      writer.write(step=step, epoch=done_epoch + 1,
                   **{f"val_{k}": v for k, v in val.items()},
                   best_val_score=float(best["val_score"]),
                   weight_bits=int(bits.weights),
                   act_bits=int(bits.activations))
      if verbose:
        shown = " ".join(f"{k} {v:.4f}" for k, v in val.items()
                         if k != "count")
        print(f"epoch {done_epoch + 1}/{num_epochs}: val {shown} (best "
              f"{select} {float(best['val_score']):.4f} @ epoch "
              f"{int(best['epoch']) + 1})", flush=True)
      save(step)
    elif step >= stop_step:
      save(step)  # interrupted mid-epoch (max_steps_this_call)
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  ckpt.close()
  writer.close()
  train_seconds = time.perf_counter() - t_start
  if step < total_steps:
    return {"interrupted_at_step": step}

  final_bits = bits_for_epoch(config, num_epochs - 1)
  final_vars = {"params": state.params, **state.model_state}
  if int(best["epoch"]) < 0:  # no validation split: select the final model
    best = {"val_score": np.asarray(np.nan, np.float32),
            "epoch": np.asarray(num_epochs - 1, np.int32),
            "variables": _host(final_vars)}
  best_vars = jax.device_put(best["variables"], replicated)
  test = lambda v: evaluate(eval_step, v, source.eval_batches("test",
                                                              eval_batch),
                            bits=final_bits, mesh=mesh, task=task)
  test_final, test_best = test(final_vars), test(best_vars)
  results = {
      "model": config.model.name, "dataset": source.name,
      "weight_bits": int(config.quant.weight_bits),
      "act_bits": int(config.quant.act_bits), "seed": int(config.seed),
      "epochs": num_epochs, "steps": total_steps,
      "steps_this_call": step - start_step,
      "best_epoch": int(best["epoch"]) + 1,
      f"val_{select}": float(best["val_score"]),
      **{f"test_{k}": v for k, v in test_best.items() if k != "count"},
      **{f"test_{k}_final": v for k, v in test_final.items()
         if k != "count"},
      "train_examples": num_train,
      "test_examples": test_best["count"], **sizes,
      "devices": jax.device_count(),
      "train_seconds_this_call": train_seconds,
      "images_per_second": ((step - start_step) * batch_size
                            / max(train_seconds, 1e-9)),
  }
  if config.quant.act_bits != FLOAT_BITS and config.consistency.enabled:
    stats = evaluate_consistency(
        model, best_vars, source.eval_batches(
            "test", eval_batch, int(config.consistency.max_examples)),
        bits=final_bits, mesh=mesh, task=task)
    results.update(write_consistency(workdir, config, stats))
  common.write_json(workdir / "results.json", results)
  common.write_text(workdir / "report.md", report_markdown(results))
  if common.is_primary():
    plot_curves(writer.read(), workdir / "curves.png")
  if verbose:
    print(summary_line(results))
  return results


def write_consistency(workdir: pathlib.Path, config, stats: Dict[str, Any]
                      ) -> Dict[str, Any]:
  """Writes ``consistency.json`` and ``layerwise_mse.png`` of a run.

  Returns the entries the run's ``results.json`` carries for them.
  """
  common.write_json(workdir / "consistency.json", stats)
  if common.is_primary():
    consistency.plot_layerwise_mse(
        {config.model.name: stats["normalized_mse"]},
        str(workdir / "layerwise_mse.png"),
        title=f"{config.model.name}: {config.quant.act_bits}-bit vs "
        "clip-only activations")
  return {"consistency": stats, "act_mse": stats["overall_mse"],
          "act_normalized_mse": stats["overall_normalized_mse"]}


def consistency_report(workdir: str, max_examples: int = 0,
                       dataset: Optional[Any] = None,
                       which: str = "best") -> Dict[str, Any]:
  """Recomputes the consistency report of a finished run (Tables 4/5, Fig. 3).

  Loads the run's ``config.json`` and its ``which`` model, evaluates on
  ``max_examples`` test images (0: all; a class-balanced subset otherwise)
  and rewrites ``consistency.json``, ``layerwise_mse.png`` and the
  consistency entries of ``results.json``.
  """
  workdir = pathlib.Path(workdir)
  config = load_run_config(workdir)
  if config.quant.act_bits == FLOAT_BITS:
    raise validate.ConfigError(
        f"{workdir} is a full-precision run: there is no b-bit vs clip-only "
        "comparison to make", "config.quant.act_bits", FLOAT_BITS,
        "allowed: a run with quantized activations, [2, 16] bits")
  from train import tasks  # pylint: disable=import-outside-toplevel
  trainer = tasks.trainer_for(config.task)
  task = trainer.TASK
  source = trainer.make_source(config, dataset)
  model = create_model(config, source.num_classes)
  variables = jax.tree_util.tree_map(
      jnp.asarray, load_source_variables(str(workdir), which))
  bits = bits_for_epoch(config, int(config.num_epochs) - 1)
  stats = evaluate_consistency(
      model, variables, source.eval_batches(
          "test", int(config.eval_batch_size), max_examples),
      bits=bits, mesh=make_mesh(), task=task)
  entries = write_consistency(workdir, config, stats)
  results_file = workdir / "results.json"
  if results_file.exists():
    results = json.loads(results_file.read_text())
    results.update(entries)
    common.write_json(results_file, results)
  return stats


def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The ``config.json`` of a run that has saved a checkpoint (clear errors
  for a directory that is not one)."""
  path = workdir / "config.json"
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir} does not exist: give the workdir of a "
                            "finished run")
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir "
                            "of a run")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError:
    raise ValueError(f"{path} is corrupt (not JSON): rerun the training or "
                     "restore the file") from None
  if not common.workdir_claimed(workdir):
    raise FileNotFoundError(f"no checkpoints under {workdir / 'checkpoints'}:"
                            f" the run at {workdir} never saved a model")
  return config


def summary_line(r: Dict[str, Any]) -> str:
  mse = (f", act MSE {r['act_mse']:.4g} (normalised "
         f"{r['act_normalized_mse']:.4g})" if "act_mse" in r else "")
  tests = " ".join(f"{k[5:]} {100 * v:.2f}%" for k, v in r.items()
                   if k.startswith("test_") and not k.endswith("_final")
                   and k not in ("test_loss", "test_examples")
                   and isinstance(v, float))
  vals = " ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in r.items()
                  if k.startswith("val_") and isinstance(v, float))
  return (f"{r['model']} {r['weight_bits']}W{r['act_bits']}A seed {r['seed']}"
          f": test {tests} at best val {vals} (epoch {r['best_epoch']}), "
          f"final test acc {100 * r['test_acc_final']:.2f}%{mse}, "
          f"{r['images_per_second']:.0f} img/s")


def report_markdown(r: Dict[str, Any]) -> str:
  rows = [[k, f"{v:.4f}" if isinstance(v, float) else v]
          for k, v in r.items() if not isinstance(v, dict)]
  text = f"# {r['model']} on {r['dataset']}\n\n" + common.markdown_table(
      ["metric", "value"], rows)
  if "consistency" in r:
    c = r["consistency"]
    text += "\n## Per-layer activation MSE (b-bit vs clip-only)\n\n"
    text += common.markdown_table(
        ["layer", "MSE", "normalised MSE"],
        [[i + 1, f"{m:.4g}", f"{n:.4g}"] for i, (m, n) in
         enumerate(zip(c["mse"], c["normalized_mse"]))])
  return text


def plot_curves(rows, path) -> None:
  """Train loss and accuracy per logged step, validation metrics per epoch."""
  train = [r for r in rows if "train_loss" in r]
  val = [r for r in rows if "val_loss" in r]
  if not train:
    return
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot([r["epoch"] for r in train], [r["train_loss"] for r in train],
           label="train loss")
  if val:
    ax1.plot([r["epoch"] for r in val], [r["val_loss"] for r in val],
             marker="o", label="val loss")
  ax1.set_xlabel("epoch"); ax1.legend(); ax1.grid(alpha=0.3)
  for key in sorted(k for k in train[0] if k.startswith("train_")
                    and k != "train_loss"):
    ax2.plot([r["epoch"] for r in train], [r[key] for r in train], label=key)
  for key in sorted(k for k in (val[0] if val else {}) if k.startswith("val_")
                    and k not in ("val_loss", "val_count")):
    ax2.plot([r["epoch"] for r in val], [r[key] for r in val], marker="o",
             label=key)
  ax2.set_xlabel("epoch"); ax2.set_ylim(0, 1); ax2.legend(); ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
