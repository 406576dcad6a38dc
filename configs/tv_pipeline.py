"""The two-phase post-training pipeline of Sec. 5.2 (Tables 1 and 2).

    --config=configs/tv_pipeline.py:<model>,<dataset>,<precision>[,cpu]

Stages (each a complete ``configs/cifar.py`` trainer config, run in
``<workdir>/<stage>``):

1. ``pretrain``: full precision from scratch (skipped when
   ``config.pretrained`` names a finished full-precision run and the stage
   is removed from ``config.stages``);
2. ``quantize`` (phase 1): quantization-aware training to the target bits,
   starting from the full-precision weights;
3. ``tv_finetune`` (phase 2): TV activations (one learned γ per ReLU, small
   initial γ) inserted into the phase-1 network, fine-tuned at a lower
   learning rate;
4. ``quantize_continued``: the control — phase 1 continued for the same
   epochs and learning rate without TV, so that "with TV" and "without TV"
   have the same total training.

Table 2 rows: ``resnet20,cifar100,2w2a`` / ``3w3a`` / ``4w4a`` (FP 70.35).
Table 1 rows (ImageNet ResNet-50, 3w3a / 4w4a) use ``imagenet2012`` through
tensorflow-datasets and are configured, not run, here.  Phase lengths follow
the paper's Cityscapes description (30 epochs, then 10 at lr 1e-3); the paper
gives none for CIFAR-100 / ImageNet.
"""

import ml_collections

from configs import cifar

PHASE1_EPOCHS = 30
PHASE2_EPOCHS = 10


def get_config(arg=None):
  model, dataset, precision, cpu = cifar.parse_arg(
      arg or "resnet20,cifar10_jpeg,4w4a,cpu")
  base = ",".join([model, dataset])
  suffix = ",cpu" if cpu else ""
  w, a = precision

  pretrain = cifar.get_config(f"{base},fp{suffix}")
  quantize = cifar.get_config(f"{base},{w}w{a}a{suffix}")
  quantize.num_epochs = PHASE1_EPOCHS
  quantize.optim.lr = 0.01
  quantize.quant.start_bits = 8
  quantize.quant.epochs_per_step = 2
  tv_finetune = cifar.get_config(f"{base},{w}w{a}a{suffix}")
  tv_finetune.num_epochs = PHASE2_EPOCHS
  tv_finetune.optim.lr = 1e-3
  tv_finetune.quant.gradual = False
  tv_finetune.model.tv_activation = True
  tv_finetune.model.tv_gamma_init = 0.05
  continued = ml_collections.ConfigDict(tv_finetune.to_dict())
  continued.model.tv_activation = False
  del continued.model["tv_gamma_init"]

  if cpu:
    pretrain.num_epochs = 6
    quantize.num_epochs = 3
    quantize.quant.start_bits = max(w, a) + 2
    quantize.quant.epochs_per_step = 1
    tv_finetune.num_epochs = continued.num_epochs = 2

  config = ml_collections.ConfigDict()
  config.task = "pipeline"
  config.stages = ("pretrain", "quantize", "tv_finetune", "quantize_continued")
  config.stage_inputs = {"quantize": "pretrain", "tv_finetune": "quantize",
                         "quantize_continued": "quantize"}
  config.pretrained = ""  # a finished full-precision run for the first stage
  config.pretrain = pretrain
  config.quantize = quantize
  config.tv_finetune = tv_finetune
  config.quantize_continued = continued
  return config
