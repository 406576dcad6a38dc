"""Config validation, one function per config family, run before anything is
written.

* :func:`gcn` -- node classification (``configs/pde_gcn.py``);
* :func:`image` -- image classification and segmentation
  (``configs/cifar.py``, ``configs/deeplab.py``);
* :func:`pipeline` -- multi-stage runs (``configs/tv_pipeline.py``): every
  stage with its own family;
* :func:`sweep` -- ``python -m train.sweep`` arguments;
* :func:`reproduce` -- ``python -m train.reproduce`` arguments.

:func:`config` picks the family from ``config.task``.  Every failure is a
:class:`ConfigError` whose message reads
``<what> (<field> = <value>; <what is allowed>)``; the command-line programs
print it as ``error: <message>`` and exit with status 2 (``train/cli.py``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import ml_collections

FLOAT_BITS = 32          # a config bit width of 32 means "no quantizer"
MIN_BITS, MAX_BITS = 2, 16

TASKS = ("node_classification", "image_classification", "segmentation",
         "pipeline")
SCHEDULES = ("cosine", "constant", "step", "poly")
GRIDS = ("uniform", "midrise")


class ConfigError(ValueError):
  """A bad config value: ``<what> (<field> = <value>; <allowed>)``."""

  def __init__(self, what: str, field: str, value: Any, allowed: str):
    self.what, self.field, self.value, self.allowed = (what, field, value,
                                                       allowed)
    super().__init__(f"{what} ({field} = {_show(value)}; {allowed})")


def _show(value: Any) -> str:
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(_show(v) for v in value) + \
        ("," if len(value) == 1 else "") + ")"
  return str(value)


# ------------------------------------------------------------- primitives ---

def _number(value: Any, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError("not a number", field, value, "a number is required")
  if not math.isfinite(value):
    raise ConfigError("not a finite number", field, value,
                      "a finite number is required")
  return float(value)


def positive(value: Any, field: str, what: str = "must be positive") -> None:
  if _number(value, field) <= 0:
    raise ConfigError(what, field, value, "allowed: > 0")


def _name(field: str) -> str:
  return field.split(".")[-1].lstrip("-")


def non_negative(value: Any, field: str, what: Optional[str] = None) -> None:
  what = what or f"{_name(field)} must not be negative"
  if _number(value, field) < 0:
    raise ConfigError(what, field, value, "allowed: >= 0")


def integer_at_least(value: Any, field: str, low: int,
                     what: Optional[str] = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError("not an integer", field, value,
                      f"allowed: an integer >= {low}")
  if value < low:
    raise ConfigError(what or f"{_name(field)} must be at least {low}",
                      field, value,
                      f"allowed: an integer >= {low}")


def in_range(value: Any, field: str, low: float, high: float, *,
             low_open: bool = False, high_open: bool = False,
             what: str = "out of range") -> None:
  v = _number(value, field)
  bad = (v <= low if low_open else v < low) or (v >= high if high_open
                                                else v > high)
  if bad:
    interval = (("(" if low_open else "[") + f"{low:g}, {high:g}" +
                (")" if high_open else "]"))
    raise ConfigError(what, field, value, f"allowed: {interval}")


def one_of(value: Any, field: str, allowed: Iterable[Any],
           what: str = "unknown name") -> None:
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(what, field, value,
                      "allowed: " + ", ".join(_show(a) for a in allowed))


def bits(value: Any, field: str) -> None:
  """A configured bit width: [2, 16], or 32 (no quantizer)."""
  if isinstance(value, bool) or not isinstance(value, int) or (
      value != FLOAT_BITS and not MIN_BITS <= value <= MAX_BITS):
    raise ConfigError("bit width out of range", field, value,
                      f"allowed: an integer in [{MIN_BITS}, {MAX_BITS}], or "
                      f"{FLOAT_BITS} for full precision")


def _get(config, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return default
    node = node[part]
  return node


# ----------------------------------------------------------------- pieces ---

def quant_section(config, prefix: str = "config") -> None:
  """Bit widths, the gradual schedule, and that it reaches the target bits
  within ``num_epochs`` (a run labelled 4W4A must have trained at 4 bits)."""
  q = config.quant
  for key in ("weight_bits", "act_bits"):
    bits(q[key], f"{prefix}.quant.{key}")
  if not q.get("gradual", False):
    return
  bits(q.start_bits, f"{prefix}.quant.start_bits")
  if q.start_bits == FLOAT_BITS:
    raise ConfigError("the gradual schedule cannot start at full precision",
                      f"{prefix}.quant.start_bits", q.start_bits,
                      f"allowed: an integer in [{MIN_BITS}, {MAX_BITS}]")
  integer_at_least(q.epochs_per_step, f"{prefix}.quant.epochs_per_step", 1)
  targets = [b for b in (q.weight_bits, q.act_bits) if b != FLOAT_BITS]
  if not targets:
    return
  lowest = min(targets)
  # bits(epoch) = max(target, start - epoch // epochs_per_step)
  first_epoch_at_target = max(0, q.start_bits - lowest) * q.epochs_per_step
  needed = first_epoch_at_target + 1
  if int(config.num_epochs) < needed:
    raise ConfigError(
        f"the gradual schedule from {q.start_bits} bits, one less every "
        f"{q.epochs_per_step} epochs, never reaches the target {lowest} bits",
        f"{prefix}.num_epochs", config.num_epochs,
        f"allowed: >= {needed}, or a lower quant.start_bits / "
        "quant.epochs_per_step, or quant.gradual=False")


def _model_name(config, prefix: str, family: Callable[[str], bool],
                family_text: str) -> None:
  from pdeq_jax import models  # pylint: disable=import-outside-toplevel
  name = config.model.name
  known = [n for n in models.names() if family(n)]
  if name not in known:
    raise ConfigError(f"unknown {family_text} model", f"{prefix}.model.name",
                      name, "allowed: " + ", ".join(known))


def _common_run(config, prefix: str) -> None:
  integer_at_least(config.num_epochs, f"{prefix}.num_epochs", 1)
  integer_at_least(config.seed, f"{prefix}.seed", 0)


# --------------------------------------------------------------- families ---

def gcn(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Node classification (PDE-GCN on Planetoid)."""
  from pdeq_jax.data import planetoid  # pylint: disable=import-outside-toplevel
  _common_run(config, prefix)
  integer_at_least(config.patience, f"{prefix}.patience", 0)
  integer_at_least(config.checkpoint_every, f"{prefix}.checkpoint_every", 1)
  one_of(str(config.data.name).lower(), f"{prefix}.data.name",
         planetoid.NAMES, "unknown dataset")
  _model_name(config, prefix, lambda n: n == "pde_gcn", "graph")
  m = config.model
  integer_at_least(m.width, f"{prefix}.model.width", 1)
  integer_at_least(m.depth, f"{prefix}.model.depth", 1)
  positive(m.h, f"{prefix}.model.h", "step size h must be positive")
  for key in ("dropout_in", "dropout_out", "dropout_edges"):
    if key in m:
      in_range(m[key], f"{prefix}.model.{key}", 0.0, 1.0, high_open=True,
               what="dropout rate out of range")
  if "grid" in m:
    one_of(m.grid, f"{prefix}.model.grid", GRIDS, "unknown quantization grid")
  if "alpha_init" in m:
    positive(m.alpha_init, f"{prefix}.model.alpha_init",
             "the clipping scale alpha must be positive")
  if "alpha_init_mode" in m:
    one_of(m.alpha_init_mode, f"{prefix}.model.alpha_init_mode",
           ("max", "constant"), "unknown alpha_init_mode")
  if "kernel_noise" in m:
    non_negative(m.kernel_noise, f"{prefix}.model.kernel_noise")
  o = config.optim
  positive(o.lr, f"{prefix}.optim.lr", "learning rate must be positive")
  for key in ("lr_kernel", "lr_alpha"):
    if key in o:
      non_negative(o[key], f"{prefix}.optim.{key}",
                   "learning rate must not be negative (0 freezes the group)")
  for key in ("weight_decay", "weight_decay_kernel"):
    if key in o:
      non_negative(o[key], f"{prefix}.optim.{key}")
  quant_section(config, prefix)


def image(config: ml_collections.ConfigDict, prefix: str = "config",
          num_devices: Optional[int] = None) -> None:
  """Image classification and segmentation (one trainer loop)."""
  from pdeq_jax import layers  # pylint: disable=import-outside-toplevel
  _common_run(config, prefix)
  segmentation = config.task == "segmentation"
  if segmentation:
    one_of(config.data.name, f"{prefix}.data.name",
           ("synthetic", "cityscapes"), "unknown segmentation dataset")
    _model_name(config, prefix, lambda n: n.startswith("deeplab"),
                "segmentation")
  else:
    _image_dataset(config.data.name, f"{prefix}.data.name")
    _model_name(config, prefix,
                lambda n: n != "pde_gcn" and not n.startswith("deeplab"),
                "image classification")
  if num_devices is None:
    import jax  # pylint: disable=import-outside-toplevel
    num_devices = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    integer_at_least(config[key], f"{prefix}.{key}", 1)
    if config[key] % num_devices:
      raise ConfigError("batch size not divisible by the device count",
                        f"{prefix}.{key}", config[key],
                        f"allowed: a multiple of {num_devices}")
  integer_at_least(config.log_every_steps, f"{prefix}.log_every_steps", 1)
  integer_at_least(config.checkpoint_every_steps,
                   f"{prefix}.checkpoint_every_steps", 0)
  non_negative(config.get("progress_every_s", 0.0),
               f"{prefix}.progress_every_s")
  d = config.data
  in_range(d.get("val_fraction", 0.0), f"{prefix}.data.val_fraction", 0.0,
           1.0, high_open=True, what="validation fraction out of range")
  for key in ("max_train", "max_test"):
    if key in d:
      integer_at_least(d[key], f"{prefix}.data.{key}", 0)
  if "prefetch" in d:
    integer_at_least(d.prefetch, f"{prefix}.data.prefetch", 1)
  for key in ("threads", "workers"):  # grain loader threads, processes
    if key in d:
      integer_at_least(d[key], f"{prefix}.data.{key}", 0)
  m = config.model
  if "h" in m:
    positive(m.h, f"{prefix}.model.h", "step size h must be positive")
  if "tv_gamma_init" in m:
    gmax = layers.TVActivation.gamma_max
    in_range(m.tv_gamma_init, f"{prefix}.model.tv_gamma_init", 0.0, gmax,
             low_open=True, high_open=True, what="TV gamma out of range")
  if "scan_blocks" in m:
    one_of(m.scan_blocks, f"{prefix}.model.scan_blocks", (False, True),
           "scan_blocks must be a bool")
    from pdeq_jax import models  # pylint: disable=import-outside-toplevel
    if m.scan_blocks and "scan_blocks" not in models.options(m.name):
      raise ConfigError("model has no scanned-block form",
                        f"{prefix}.model.scan_blocks", m.scan_blocks,
                        f"allowed for {m.name}: False")
  if "dropout" in m:
    in_range(m.dropout, f"{prefix}.model.dropout", 0.0, 1.0, high_open=True,
             what="dropout rate out of range")
  o = config.optim
  positive(o.lr, f"{prefix}.optim.lr", "learning rate must be positive")
  if "momentum" in o:
    in_range(o.momentum, f"{prefix}.optim.momentum", 0.0, 1.0,
             high_open=True, what="momentum out of range")
  non_negative(o.get("weight_decay", 0.0), f"{prefix}.optim.weight_decay")
  one_of(o.get("schedule", "cosine"), f"{prefix}.optim.schedule", SCHEDULES,
         "unknown learning-rate schedule")
  non_negative(o.get("warmup_epochs", 0.0), f"{prefix}.optim.warmup_epochs")
  if "step_factor" in o:
    in_range(o.step_factor, f"{prefix}.optim.step_factor", 0.0, 1.0,
             low_open=True, what="step factor out of range")
  if "weight_decay_on" in o:
    one_of(o.weight_decay_on, f"{prefix}.optim.weight_decay_on",
           ("all", "kernels"), "unknown weight_decay_on")
  if "init_from_model" in config:
    one_of(config.init_from_model, f"{prefix}.init_from_model",
           ("best", "final"), "unknown init_from_model")
  c = config.get("consistency")
  if c is not None and "max_examples" in c:
    integer_at_least(c.max_examples, f"{prefix}.consistency.max_examples", 0)
  quant_section(config, prefix)


def _image_dataset(name: Any, field: str) -> None:
  from pdeq_jax.data import images  # pylint: disable=import-outside-toplevel
  known = ("cifar10_jpeg", "fashion_mnist", *images.TFDS_NAMES,
           "imagenet2012", "imagenet2012_subset")
  if isinstance(name, str) and name.startswith(images.IMAGEFOLDER_PREFIX):
    if not name[len(images.IMAGEFOLDER_PREFIX):]:
      raise ConfigError("imagefolder: needs a root directory", field, name,
                        "allowed: 'imagefolder:<root>'")
    return
  one_of(name, field, (*dict.fromkeys(known), "imagefolder:<root>"),
         "unknown image dataset")


def pipeline(config: ml_collections.ConfigDict) -> None:
  """Multi-stage runs: the stage list and every stage's own config."""
  stages = list(config.get("stages", ()))
  if not stages:
    raise ConfigError("no stages to run", "config.stages", tuple(stages),
                      "allowed: a non-empty list of config sections")
  for i, stage in enumerate(stages):
    if stage not in config or not isinstance(config[stage],
                                             ml_collections.ConfigDict):
      raise ConfigError("config.stages names a stage with no section",
                        "config.stages",
                        tuple(stages), f"config.{stage} must exist")
    source = config.get("stage_inputs", {}).get(stage, "")
    if source and source not in stages[:i]:
      raise ConfigError("a stage must start from a stage that runs before it",
                        f"config.stage_inputs.{stage}", source,
                        "allowed: " + (", ".join(map(repr, stages[:i]))
                                       or "'' (the first stage)"))
    family = FAMILIES.get(config[stage].get("task"))
    if family is None or family is pipeline:
      raise ConfigError("unknown stage task", f"config.{stage}.task",
                        config[stage].get("task"),
                        "allowed: image_classification, segmentation")
    family(config[stage], prefix=f"config.{stage}")


FAMILIES = {"node_classification": gcn, "image_classification": image,
            "segmentation": image, "pipeline": pipeline}


def config(cfg: ml_collections.ConfigDict) -> None:
  """Validates a trainer config of any family (by ``config.task``)."""
  task = cfg.get("task")
  one_of(task, "config.task", TASKS, "unknown task")
  family = FAMILIES[task]
  if family is pipeline:
    pipeline(cfg)
  else:
    family(cfg)


# ------------------------------------------------------------- programs ---

def sweep(base: ml_collections.ConfigDict, *, trials: Any, space: str,
          seeds_per_trial: Any, sampler: str, spaces: Iterable[str],
          samplers: Iterable[str]) -> None:
  """``train.sweep`` arguments and its base config."""
  integer_at_least(trials, "--trials", 1)
  one_of(space, "--space", sorted(spaces), "unknown search space")
  integer_at_least(seeds_per_trial, "--seeds_per_trial", 1)
  one_of(sampler, "--sampler", samplers, "unknown sampler")
  if base.get("task") != "node_classification":
    raise ConfigError("the search spaces tune the PDE-GCN trainer",
                      "config.task", base.get("task"),
                      "allowed: node_classification")
  config(base)


def reproduce(command: str, *, datasets=(), forms=(), precisions=(),
              seeds: Any = 1, num_epochs: Any = None, patience: Any = None,
              pairs=(), dataset: str = "", max_train: Any = None) -> None:
  """``train.reproduce`` arguments (the generated configs are validated with
  their families before any run starts)."""
  from configs import cifar as cifar_configs  # pylint: disable=import-outside-toplevel
  from configs import pde_gcn as gcn_configs  # pylint: disable=import-outside-toplevel
  one_of(command, "command", ("table7", "cnn"), "unknown table")
  integer_at_least(seeds, "--seeds", 1)
  if num_epochs is not None:
    integer_at_least(num_epochs, "--num_epochs", 1)
  if command == "table7":
    if not datasets:
      raise ConfigError("no datasets", "--datasets", "", "allowed: "
                        + ", ".join(gcn_configs.DATASETS))
    for d in datasets:
      one_of(d, "--datasets", gcn_configs.DATASETS, "unknown dataset")
    for f in forms:
      one_of(f, "--forms", ("sym", "nonsym"), "unknown form")
    for p in precisions:
      one_of(p, "--precisions", gcn_configs.PRECISIONS, "unknown precision")
    if patience is not None:
      integer_at_least(patience, "--patience", 0)
    return
  for pair in pairs:
    if len(pair.split(":")) != 2:
      raise ConfigError("a pair must name two models", "--pairs", pair,
                        "allowed: 'standard:stable', e.g. "
                        "resnet56:stable_resnet56")
  for p in precisions:
    try:
      cifar_configs.parse_precision(p)
    except ValueError:
      raise ConfigError("unknown precision", "--precisions", p,
                        "allowed: fp or <w>w<a>a, e.g. 4w4a") from None
  _image_dataset(dataset, "--dataset")
  if max_train is not None:
    integer_at_least(max_train, "--max_train", 1)
