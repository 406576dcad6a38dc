"""Models resolved by registry name: ``create(name, num_classes, **options)``."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, Tuple

from pdeq_jax.models.switches import ModelSwitches

# name -> (module, factory attribute, fixed options)
_CIFAR_WIDTHS = (16, 32, 64)
_WIDE_WIDTHS = (64, 128, 256, 512)
_RESNET = "pdeq_jax.models.resnet"
_STABLE_RESNET = "pdeq_jax.models.stable_resnet"
_MOBILENET = "pdeq_jax.models.mobilenetv2"

_REGISTRY: Dict[str, Tuple[str, str, dict]] = {
    "pde_gcn": ("pdeq_jax.models.pde_gcn", "PDEGCN", {}),
    # CIFAR ResNets, 6n + 2 layers, widths 16/32/64 (option-B shortcuts).
    **{f"resnet{6 * n + 2}": (_RESNET, "ResNet",
                              {"stage_sizes": (n, n, n),
                               "widths": _CIFAR_WIDTHS})
       for n in (1, 3, 5, 7, 9, 18)},
    # Wide CIFAR ResNets (64..512), used for CIFAR-100.
    "resnet18": (_RESNET, "ResNet", {"stage_sizes": (2, 2, 2, 2),
                                     "widths": _WIDE_WIDTHS}),
    "resnet34": (_RESNET, "ResNet", {"stage_sizes": (3, 4, 6, 3),
                                     "widths": _WIDE_WIDTHS}),
    # Stable (symmetric) ResNets of Sec. 4.1.
    "stable_resnet8": (_STABLE_RESNET, "StableResNet",
                       {"stage_sizes": (1, 1, 1), "widths": _CIFAR_WIDTHS}),
    "stable_resnet20": (_STABLE_RESNET, "StableResNet",
                        {"stage_sizes": (3, 3, 3), "widths": _CIFAR_WIDTHS}),
    "stable_resnet56": (_STABLE_RESNET, "StableResNet",
                        {"stage_sizes": (9, 9, 9), "widths": _CIFAR_WIDTHS}),
    "stable_resnet34": (_STABLE_RESNET, "StableResNet",
                        {"stage_sizes": (3, 4, 6, 3),
                         "widths": _WIDE_WIDTHS}),
    # MobileNetV2 (Eq. 21) and its stable variant (Eq. 22).
    "mobilenetv2": (_MOBILENET, "MobileNetV2", {}),
    "stable_mobilenetv2": (_MOBILENET, "MobileNetV2", {"stable": True}),
    # ImageNet ResNet-50 (Bottleneck v1.5) and DeepLabV3 (Sec. 5.2).
    "resnet50": ("pdeq_jax.models.resnet50", "BottleneckResNet", {}),
    "deeplabv3_resnet50": ("pdeq_jax.models.deeplabv3", "DeepLabV3", {}),
    # The small sequential CNN of the embedded-inference PTQ paper (Fashion-
    # MNIST, configs/fashion_mnist.py).
    "small_cnn": ("pdeq_jax.models.small_cnn", "SmallCNN", {}),
}


def register(name: str, module: str, factory: str, **fixed) -> None:
  """Adds a model to the registry (used by the model modules themselves)."""
  _REGISTRY[name] = (module, factory, fixed)


def names() -> list:
  return sorted(_REGISTRY)


def options(name: str) -> Tuple[str, ...]:
  """The dataclass fields (options) of the module registered as ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {names()}")
  module, factory, _ = _REGISTRY[name]
  cls = getattr(importlib.import_module(module), factory)
  return tuple(f.name for f in dataclasses.fields(cls))


def create(name: str, num_classes: int, **options):
  """Builds the Flax module registered as ``name``.

  The CNNs' switches (``quantize_weights``, ``tv_activation``, ... see
  :class:`ModelSwitches`) may be given flat, as in the configs.

  Raises:
    ValueError: unknown name (the message lists the known ones) or a bad
      ``num_classes``.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {names()}")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  module, factory, fixed = _REGISTRY[name]
  cls: Callable = getattr(importlib.import_module(module), factory)
  if "switches" in {f.name for f in dataclasses.fields(cls)}:
    # the configs' flat switch names (tv_activation=...) -> one spec
    switches, options = ModelSwitches.from_options(options)
    options["switches"] = switches
  return cls(num_classes=int(num_classes), **fixed, **options)
