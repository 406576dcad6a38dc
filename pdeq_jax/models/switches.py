"""The structure switches shared by the CNNs: one frozen spec.

ResNet, StableResNet, MobileNetV2, BottleneckResNet (ResNet-50) and
DeepLabV3, and their blocks, take ``switches: ModelSwitches``; a new switch
is added here only.  Configs keep the flat names (``config.model.
tv_activation``, the trainers' ``quantize_weights`` ...):
``pdeq_jax.models.create`` folds them into the spec.  The switches change
which quantizers and TV layers exist, never the names of the parameters
that exist in both settings, so checkpoints are unaffected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Tuple

from pdeq_jax import tv


@dataclasses.dataclass(frozen=True)
class ModelSwitches:
  """Quantization and TV switches of a CNN.

  Attributes:
    quantize_weights / quantize_activations: weight and activation
      quantizers exist (the bit widths themselves are runtime values).
    tv_activation: TV-smoothed ReLUs ``relu(S(x))`` (Eq. 14) in the blocks.
    tv_sign_form: the TV activations' sign-only inference form.
    tv_gamma_init: initial γ of every TV activation, in (0, 1) (small when
      TV layers are inserted into a trained network).
    tv_stem: a TV-smoothed ReLU in the stem too (ImageNet ResNets).
  """
  quantize_weights: bool = True
  quantize_activations: bool = True
  tv_activation: bool = False
  tv_sign_form: bool = False
  tv_gamma_init: float = tv.NON_EXPANSIVE_GAMMA
  tv_stem: bool = False

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type in ("bool", bool):
        if type(value).__name__ not in ("bool", "bool_"):  # numpy bools too
          raise ValueError(f"switch {field.name} must be True or False, got "
                           f"{value!r}")
        object.__setattr__(self, field.name, bool(value))
    gamma = self.tv_gamma_init
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or \
        not 0 < gamma < 1:
      raise ValueError(f"switch tv_gamma_init must lie in (0, 1), got "
                       f"{gamma!r}")

  @classmethod
  def names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_options(cls, options: Dict[str, Any]
                   ) -> Tuple["ModelSwitches", Dict[str, Any]]:
    """Splits flat switch options (config names) from the other options."""
    flat = {k: v for k, v in options.items() if k in cls.names()}
    rest = {k: v for k, v in options.items() if k not in cls.names()}
    if "switches" in rest:
      if flat:
        raise ValueError(f"pass the switches either as switches= or as "
                         f"{sorted(flat)}, not both")
      return rest.pop("switches"), rest
    return cls(**flat), rest

  def check_supported(self, model: str, supported: Iterable[str]) -> None:
    """Raises ValueError if a switch that ``model`` lacks is set."""
    supported = set(supported)
    default = ModelSwitches()
    for name in self.names():
      if name not in supported and getattr(self, name) != getattr(default,
                                                                  name):
        raise ValueError(
            f"{model} has no switch {name} (set to {getattr(self, name)!r});"
            f" its switches: {sorted(supported)}")


QUANT_ONLY = ("quantize_weights", "quantize_activations")
QUANT_AND_TV = QUANT_ONLY + ("tv_activation", "tv_sign_form", "tv_gamma_init")
