"""Fashion-MNIST with the small sequential CNN (the embedded-inference PTQ paper).

    --config=configs/fashion_mnist.py[:<model>,<precision>[,cpu]]

* model: ``small_cnn`` (default) or any registered CNN that takes 28x28x1
  images;
* precision: ``fp`` (default; the float network that ``python -m
  train.ptq`` quantizes after training), or ``<w>w<a>a`` for QAT;
* ``cpu``: fewer epochs.

Data: ``fashion_mnist`` (:mod:`pdeq_jax.data.images`; offline from Debian's
``dataset-fashion-mnist``), 10 % of the training set held out for
validation (6,000 images), normalised with the training split's mean/std,
**no augmentation** (``data.augment = False``: random crops and horizontal
flips are a CIFAR recipe, not the paper's).  The rest is the CIFAR recipe of
``configs/cifar.py`` with a smaller learning rate: SGD momentum 0.9, lr
0.05, cosine decay, weight decay 1e-4, batch 128.
"""

from configs import cifar

DATASET = "fashion_mnist"


def parse_arg(arg):
  parts = [p.strip() for p in (arg or "small_cnn,fp").split(",")]
  if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "cpu"):
    raise ValueError("config arg must be '<model>,<precision>[,cpu]' (e.g. "
                     f"'small_cnn,fp'), got {arg!r}")
  return parts[0], parts[1], len(parts) == 3


def get_config(arg=None):
  model, precision, cpu = parse_arg(arg)
  config = cifar.get_config(f"{model},{DATASET},{precision}")
  config.num_epochs = 5 if cpu else 10
  config.data.augment = False
  config.optim.lr = 0.05
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.consistency.max_examples = 2000
  if config.quant.gradual:  # QAT: one bit less per epoch from 8
    config.quant.start_bits = 8
    config.quant.epochs_per_step = 1
  return config
