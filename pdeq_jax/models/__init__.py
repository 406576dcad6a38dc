"""Models resolved by registry name: ``create(name, num_classes, **options)``."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

# name -> (module, factory attribute, fixed options)
_REGISTRY: Dict[str, Tuple[str, str, dict]] = {
    "pde_gcn": ("pdeq_jax.models.pde_gcn", "PDEGCN", {}),
}


def register(name: str, module: str, factory: str, **fixed) -> None:
  """Adds a model to the registry (used by the model modules themselves)."""
  _REGISTRY[name] = (module, factory, fixed)


def names() -> list:
  return sorted(_REGISTRY)


def create(name: str, num_classes: int, **options):
  """Builds the Flax module registered as ``name``.

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
  return cls(num_classes=int(num_classes), **fixed, **options)
