"""DeepLabV3-ResNet50 semantic segmentation: the rows of the paper's Table 3.

    --config=configs/deeplab.py:<dataset>,<precision>[,tv][,cpu]

* dataset: ``cityscapes`` (tensorflow-datasets, manual download) or
  ``synthetic`` (generated shapes; tests and CPU smoke runs);
* precision: ``fp`` or ``<w>w<a>a`` (Table 3: ``5w5a``);
* ``tv``: TV-smoothed ReLUs (one learned γ per layer);
* ``cpu``: a reduced backbone and small images.

Recipe of Sec. 5.2: SGD, batch 6, weight decay 1e-4, learning rate 0.01 for
the encoder and 0.1 for the decoder with a polynomial decay, starting from
pretrained weights (``--config.init_from=<run dir, or a torchvision-format
DeepLabV3/ResNet-50 state dict .pth/.npz>``), 30 epochs of quantization-aware
refinement.  The TV phase (``configs/tv_pipeline.py:deeplabv3_resnet50,
cityscapes,5w5a``) then trains 10 epochs at lr 0.001, batch 4.
"""

import ml_collections

from configs import cifar
from pdeq_jax import tv as tv_lib


def parse_arg(arg):
  parts = [p.strip().lower() for p in (arg or "synthetic,5w5a,cpu").split(",")]
  flags = set(parts[2:])
  if len(parts) < 2 or not flags <= {"tv", "cpu"}:
    raise ValueError("config arg must be '<dataset>,<precision>[,tv][,cpu]', "
                     f"got {arg!r}")
  if parts[0] not in ("cityscapes", "synthetic"):
    raise ValueError(f"dataset must be 'cityscapes' or 'synthetic', got "
                     f"{parts[0]!r}")
  return parts[0], cifar.parse_precision(parts[1]), "tv" in flags, \
      "cpu" in flags


def get_config(arg=None):
  dataset, (weight_bits, act_bits), tv, cpu = parse_arg(arg)
  config = cifar.get_config(f"resnet20,cifar10,{weight_bits}w{act_bits}a"
                            if weight_bits != cifar.FLOAT else
                            "resnet20,cifar10,fp")
  config.task = "segmentation"
  config.num_epochs = 30
  config.batch_size = 6
  config.eval_batch_size = 2
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200

  config.data = ml_collections.ConfigDict()
  config.data.name = dataset
  config.data.data_dir = ""        # tfds data_dir (manual download inside)
  config.data.val_fraction = 0.1   # of train; Cityscapes val is the test set
  config.data.split_seed = 0
  config.data.max_train = 0
  config.data.max_test = 0
  config.data.resize_to = (512, 1024) if dataset == "cityscapes" else ()
  config.data.crop_size = 512 if dataset == "cityscapes" else 0  # 0 = full
  config.data.augment = True
  # synthetic only
  config.data.num_train = 48
  config.data.num_val = 8
  config.data.num_test = 8
  config.data.image_size = 32
  config.data.num_classes = 4

  config.model = ml_collections.ConfigDict()
  config.model.name = "deeplabv3_resnet50"
  config.model.output_stride = 8
  config.model.tv_activation = tv
  if tv:  # non-expansive TV steps (γ² <= ε/4)
    config.model.tv_gamma_init = tv_lib.NON_EXPANSIVE_GAMMA

  config.quant.gradual = False   # refinement of a pretrained network

  config.optim.lr = 0.1                      # decoder (ASPP head)
  config.optim.lr_scales = {"backbone": 0.1}  # encoder: 0.01
  config.optim.schedule = "poly"
  config.optim.poly_power = 0.9

  config.consistency.max_examples = 100

  if cpu:
    config.num_epochs = 2
    config.batch_size = 4
    config.eval_batch_size = 4
    config.log_every_steps = 5
    config.checkpoint_every_steps = 50
    config.model.output_stride = 16
    config.model.backbone_stage_sizes = (1, 1, 1, 1)
    config.model.backbone_widths = (8, 16, 32, 64)
    config.model.stem_features = 8
    config.model.aspp_features = 16
    config.consistency.max_examples = 0
  return config
