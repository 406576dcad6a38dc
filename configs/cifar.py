"""CIFAR image classification: every row of the paper's Tables 4 and 5.

    --config=configs/cifar.py:<model>,<dataset>,<precision>[,cpu]

* model: any registered CNN (``resnet56``, ``stable_resnet56``,
  ``mobilenetv2``, ``stable_mobilenetv2``, ``resnet34``, ``stable_resnet34``,
  ``resnet20``, ...);
* dataset: ``cifar10`` / ``cifar100`` (tensorflow-datasets) or
  ``cifar10_jpeg`` (the offline JPEG copy, ``../shared/data``) or
  ``imagefolder:<root>``;
* precision: ``fp``, or ``<w>w<a>a`` such as ``4w8a``, ``4w4a``, ``2w2a``;
* ``cpu``: a CPU-sized variant (few epochs, a compressed gradual schedule).

Recipe of Sec. 5.3: SGD momentum 0.9, lr 0.1, cosine decay, weight decay
1e-4, batch 128, 400 epochs, 10% of train held out for validation, random
crop (pad 4) + horizontal flip, and gradual quantization from 16 bits, one bit
less every 10 epochs down to the target (weights and activations each).

Examples: Table 4 ``resnet56,cifar10,4w4a`` and ``stable_resnet56,cifar10,4w4a``;
Table 5 ``resnet34,cifar100,4w8a``.
"""

import re

import ml_collections

from pdeq_jax import models

FLOAT = 32
NUM_CLASSES = {"cifar10": 10, "cifar10_jpeg": 10, "cifar100": 100}
IMAGENET = ("imagenet2012", "imagenet2012_subset")


def parse_precision(text: str):
  """``fp`` -> (32, 32); ``4w8a`` -> (4, 8)."""
  if text == "fp":
    return FLOAT, FLOAT
  match = re.fullmatch(r"(\d+)w(\d+)a", text)
  if not match:
    raise ValueError(f"precision must be 'fp' or '<w>w<a>a' (e.g. 4w4a), got "
                     f"{text!r}")
  return int(match.group(1)), int(match.group(2))


def parse_arg(arg):
  parts = [p.strip() for p in (arg or "resnet20,cifar10_jpeg,4w4a").split(",")]
  if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "cpu"):
    raise ValueError("config arg must be '<model>,<dataset>,<precision>[,cpu]',"
                     f" got {arg!r}")
  model, dataset, precision = parts[:3]
  return model, dataset, parse_precision(precision.lower()), len(parts) == 4


def get_config(arg=None):
  model, dataset, (weight_bits, act_bits), cpu = parse_arg(arg)

  config = ml_collections.ConfigDict()
  config.task = "image_classification"
  config.seed = 0
  config.num_epochs = 400
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500   # also at every epoch end
  config.progress_every_s = 30.0
  config.distributed = False            # jax.distributed.initialize()
  # Start from another run's weights (workdir of a finished run); arrays the
  # networks share are copied, new ones (TV γ, α) keep their initialisation.
  config.init_from = ""
  config.init_from_model = "best"       # or "final"
  config.init_from_allow_dropped = ()   # e.g. ("alpha",) to drop quantizers

  config.data = ml_collections.ConfigDict()
  config.data.name = dataset
  config.data.data_dir = ""             # "" -> $PDEQ_DATA_DIR / ../shared/data
  config.data.cache_dir = ""            # "" -> $PDEQ_CACHE_DIR / ~/.cache
  config.data.val_fraction = 0.1
  config.data.split_seed = 0
  config.data.max_train = 0             # 0 = all
  config.data.max_test = 0
  config.data.augment = True
  config.data.prefetch = 2              # batches grain reads ahead
  config.data.threads = 1               # grain prefetch threads (0: inline)
  config.data.workers = 0               # grain worker processes (0: none)

  config.model = ml_collections.ConfigDict()
  config.model.name = model
  if model.startswith("stable_"):
    config.model.h = 0.1
  if model in models.names() and "scan_blocks" in models.options(model):
    # blocks 2..n of a stage under nn.scan: faster compile, stacked layout
    # (pdeq_jax.models.scan_blocks converts checkpoints both ways)
    config.model.scan_blocks = False

  config.quant = ml_collections.ConfigDict()
  config.quant.weight_bits = weight_bits   # 32 = float (no quantizer)
  config.quant.act_bits = act_bits
  config.quant.gradual = (weight_bits, act_bits) != (FLOAT, FLOAT)
  config.quant.start_bits = 16
  config.quant.epochs_per_step = 10

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 1e-4
  config.optim.weight_decay_on = "all"     # as torch.optim.SGD; or "kernels"
  config.optim.schedule = "cosine"         # or "constant", "step"
  config.optim.warmup_epochs = 0.0
  config.optim.step_epochs = (150, 250)    # for schedule="step"
  config.optim.step_factor = 0.1

  # noise-aware training (train.noise, FQ-Conv): Gaussian noise at the
  # train_sites in the final train_epochs epochs, sigma ramped up linearly
  # over ramp_epochs; "" = off
  config.noise = ml_collections.ConfigDict()
  config.noise.train_sites = ""    # comma list of weights, activations, mac
  config.noise.train_sigma = 0.0   # relative, as in python -m train.noise
  config.noise.train_epochs = 0
  config.noise.ramp_epochs = 0

  config.consistency = ml_collections.ConfigDict()
  config.consistency.enabled = True
  config.consistency.max_examples = 0      # 0 = the whole test set

  if dataset in IMAGENET:
    # Streamed through tfds + tf.data (TensorFlow and a prepared copy
    # needed); the standard ImageNet recipe of the ResNet-50 of Table 1.
    config.data.image_size = 224
    config.batch_size = 256
    config.eval_batch_size = 250
    config.num_epochs = 90
    config.optim.lr = 0.1
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.consistency.max_examples = 5000
  if cpu:
    # CPU-sized: the gradual schedule compressed to one bit per epoch from 8.
    config.num_epochs = 8
    config.quant.start_bits = 8
    config.quant.epochs_per_step = 1
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.consistency.max_examples = 2000
  return config
