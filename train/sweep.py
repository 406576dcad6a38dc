"""Random hyperparameter search, selected on validation accuracy only.

    python -m train.sweep --config=configs/pde_gcn.py:cora,sym,4w4a \
        --workdir=DIR --trials=30 [--space=gcn] [--config.num_epochs=200]

Each trial trains in ``DIR/trial_NNN`` (resumable; finished trials are read
back, so a killed sweep continues where it stopped).  The sweep writes
``DIR/sweep.md`` (all trials, sorted by validation accuracy),
``DIR/sweep.jsonl`` and ``DIR/best_config.json`` (the winner's overrides and
its numbers).  Test accuracy is shown but never used to choose.

``--sampler=tpe`` replaces random draws, after ``TPE_STARTUP_TRIALS`` random
trials, by a tree-structured Parzen estimator (Bergstra et al. 2011; the
sampler of the Optuna sweeps behind the paper's Table 7): each new trial is
the candidate, drawn around the best tenth of the trials so far, that
maximises the ratio of the densities of the good and the other trials.  It
is deterministic given the finished trials, so a resumed TPE sweep proposes
the same trials again.

``--seeds_per_trial=N`` trains every trial with N seeds (``config.seed`` ..
``config.seed + N - 1``, in ``trial_NNN/seedK``) and ranks trials by their
mean validation accuracy: on a 500-node validation set one seed's accuracy
varies by ~1 point, so the best of many single-seed trials is mostly the
luckiest one.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Dict

from absl import flags
import numpy as np
from ml_collections import config_flags

from train import cli
from train import common
from train import tasks
from train import validate

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Command-line flags (defined only when run as a program)."""
  fv = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", None, "Base config.",
                                  lock_config=True, **fv)
  flags.DEFINE_string("workdir", None, "Sweep directory.", **fv)
  flags.DEFINE_integer("trials", 20, "Trial budget.", **fv)
  flags.DEFINE_string("space", "gcn", "Search space name.", **fv)
  flags.DEFINE_integer("sweep_seed", 0, "Seed of the sampler.", **fv)
  flags.DEFINE_enum("sampler", "random", list(SAMPLERS),
                    "How trials are proposed: independent random draws or "
                    "TPE on the finished trials.", **fv)
  flags.DEFINE_integer("seeds_per_trial", 1,
                       "Training seeds per trial; trials are ranked by the "
                       "mean validation accuracy over them.", **fv)


class _Range:
  """A value drawn uniformly in [lo, hi], or in log space when ``log``.

  ``to_unit`` / ``from_unit`` map it to [0, 1] (linearly in the sampling
  space), where the TPE sampler works.
  """

  def __init__(self, lo: float, hi: float, log: bool):
    valid = (0 < lo < hi) if log else (lo < hi)
    if not valid:
      raise ValueError(f"bad range [{lo}, {hi}] (log={log})")
    self.log = log
    self._lo, self._hi = (math.log(lo), math.log(hi)) if log else (lo, hi)

  def __call__(self, rng: np.random.Generator, base: float = None) -> float:
    del base  # absolute ranges ignore the base config
    value = rng.uniform(self._lo, self._hi)
    return float(math.exp(value) if self.log else value)

  def to_unit(self, value: float, base: float = None) -> float:
    del base
    value = math.log(value) if self.log else value
    return (value - self._lo) / (self._hi - self._lo)

  def from_unit(self, unit: float, base: float = None) -> float:
    del base
    value = self._lo + float(unit) * (self._hi - self._lo)
    return float(math.exp(value) if self.log else value)


def _log_uniform(lo: float, hi: float) -> _Range:
  return _Range(lo, hi, log=True)


def _uniform(lo: float, hi: float) -> _Range:
  return _Range(lo, hi, log=False)


class _Around:
  """The base config's value times a log-uniform factor in [1/f, f]."""

  def __init__(self, factor: float):
    self.factor = factor

  def __call__(self, rng: np.random.Generator, base: float) -> float:
    return float(base) * math.exp(rng.uniform(-math.log(self.factor),
                                              math.log(self.factor)))

  def to_unit(self, value: float, base: float) -> float:
    return (math.log(value / float(base)) / math.log(self.factor) + 1.0) / 2.0

  def from_unit(self, unit: float, base: float) -> float:
    return float(base) * math.exp((2.0 * float(unit) - 1.0)
                                  * math.log(self.factor))


# The ranges of the authors' Optuna sweeps (quantized_semi_optuna.py: h
# 0.1-2.0, lr 1e-3-1e-2, K lr 1e-5-1e-3, alpha lr 1e-5-1e-2, wd 5e-6-1e-3),
# lr widened to include their Cora script's 0.07, plus the initial alpha.
SPACES: Dict[str, Dict[str, Callable[..., Any]]] = {
    "gcn": {
        "model.h": _log_uniform(0.1, 2.0),
        "optim.lr": _log_uniform(1e-3, 7e-2),
        "optim.lr_kernel": _log_uniform(1e-5, 1e-3),
        "optim.lr_alpha": _log_uniform(1e-5, 1e-2),
        "optim.weight_decay": _log_uniform(5e-6, 1e-3),
        # α init matters at 4 bits: α=6 on a 16-level grid is a step of 0.8,
        # coarser than the node states of a row-normalised graph.
        "model.alpha_init": _log_uniform(0.5, 6.0),
    },
    # After a first round on Cora 4W4A with the authors' constant alpha init:
    # most trials collapsed to a constant prediction (val 15-32%) because a
    # constant alpha (0.5-6) makes a 4-bit step larger than the node states
    # (~0.05) and alpha could not shrink in time.  With the data-calibrated
    # init (alpha_init_mode="max") alpha_init is a multiple of the peak.
    "gcn_quant": {
        "model.h": _log_uniform(0.1, 2.0),
        "optim.lr": _log_uniform(3e-3, 7e-2),
        "optim.lr_kernel": _log_uniform(1e-5, 1e-3),
        "optim.lr_alpha": _log_uniform(1e-4, 1e-2),
        "optim.weight_decay": _log_uniform(5e-6, 1e-3),
        # multiple of the data-calibrated alpha (model.alpha_init_mode="max")
        "model.alpha_init": _log_uniform(0.5, 2.0),
    },
    # Only the quantizers' parameters, on top of a float-precision winner
    # given as --config overrides: at 8 bits rounding costs little and the
    # clipping range (alpha at init and how fast it follows the growing
    # states) decides whether the quantized row keeps the float accuracy.
    "alpha": {
        "model.alpha_init": _log_uniform(0.5, 4.0),
        "optim.lr_alpha": _log_uniform(1e-5, 3e-3),
    },
    # The three dropout rates (the authors fix them per dataset: 0.6 on Cora,
    # 0.7 on CiteSeer), on top of a winner given as --config overrides.
    "dropout": {
        "model.dropout_in": _uniform(0.3, 0.8),
        "model.dropout_edges": _uniform(0.2, 0.8),
        "model.dropout_out": _uniform(0.3, 0.8),
    },
    # Float rows: the step and optimiser values of "gcn" (alpha does nothing
    # without quantizers) together with the three dropout rates.
    "gcn_float": {
        "model.h": _log_uniform(0.1, 2.0),
        "optim.lr": _log_uniform(1e-3, 7e-2),
        "optim.lr_kernel": _log_uniform(1e-5, 1e-3),
        "optim.weight_decay": _log_uniform(5e-6, 1e-3),
        "model.dropout_in": _uniform(0.3, 0.8),
        "model.dropout_edges": _uniform(0.2, 0.8),
        "model.dropout_out": _uniform(0.3, 0.8),
    },
    # A local search around the base config (a previous winner): each value
    # times a log-uniform factor, within 2x for h and lr, 3x for the rest.
    "local": {
        "model.h": _Around(2.0),
        "optim.lr": _Around(2.0),
        "optim.lr_kernel": _Around(3.0),
        "optim.weight_decay": _Around(3.0),
    },
}


def _base_values(space: str, base_config) -> Dict[str, Any]:
  """The base config's value of every key (None where the space ignores it)."""
  if space not in SPACES:
    raise ValueError(f"--space must be one of {sorted(SPACES)}, got {space!r}")
  bases = {}
  for key, draw in SPACES[space].items():
    bases[key] = None
    if isinstance(draw, _Around):
      if base_config is None:
        raise ValueError(f"space {space!r} samples around a base config; "
                         "pass base_config")
      section, name = key.split(".")
      bases[key] = base_config[section][name]
  return bases


def sample_overrides(space: str, rng: np.random.Generator,
                     base_config=None) -> Dict[str, Any]:
  """One trial's overrides; spaces relative to a base need ``base_config``."""
  bases = _base_values(space, base_config)
  return {key: draw(rng, bases[key]) for key, draw in SPACES[space].items()}


TPE_STARTUP_TRIALS = 8      # random trials before TPE takes over
TPE_GOOD_FRACTION = 0.1     # the best tenth of the trials (at least one) model "good"
TPE_CANDIDATES = 24         # candidates drawn per proposal (as Optuna)


def _parzen_log_density(points: np.ndarray, bandwidth: np.ndarray,
                        x: np.ndarray) -> np.ndarray:
  """Per-dimension log densities of a Parzen estimator on [0, 1].

  ``points`` [n, d], ``bandwidth`` [d], ``x`` [m, d] -> [m, d]: in each
  dimension a mixture of a Gaussian kernel per point and the uniform prior,
  the prior weighted like one point (a few points never rule a region out).
  """
  z = (x[:, None, :] - points[None, :, :]) / bandwidth          # [m, n, d]
  log_kernels = -0.5 * z * z - np.log(bandwidth * math.sqrt(2 * math.pi))
  prior = np.zeros((x.shape[0], 1, x.shape[1]))
  n = points.shape[0]
  return (np.logaddexp.reduce(np.concatenate([log_kernels, prior], 1), axis=1)
          - math.log(n + 1))


def _bandwidth(points: np.ndarray) -> np.ndarray:
  """Scott's rule per dimension, kept within [0.1, 0.5] of the unit range."""
  n, d = points.shape
  if n < 2:
    return np.full(d, 0.5)
  return np.clip(1.06 * points.std(0) * n ** (-0.2), 0.1, 0.5)


def propose_tpe(space: str, history, rng: np.random.Generator,
                base_config=None) -> Dict[str, Any]:
  """The next trial's overrides from finished ``history`` (TPE).

  ``history``: (overrides, score) pairs, higher score better.  The first
  ``TPE_STARTUP_TRIALS`` proposals are random draws (``sample_overrides``).
  Then the trials are split into the best ``TPE_GOOD_FRACTION`` and the rest,
  each modelled per dimension by a Parzen density on the unit interval of
  the space (independent dimensions, as Optuna's default TPE); of
  ``TPE_CANDIDATES`` draws from the good density the one with the largest
  good/rest density ratio is returned.
  """
  if len(history) < TPE_STARTUP_TRIALS:
    return sample_overrides(space, rng, base_config)
  bases = _base_values(space, base_config)
  dims = SPACES[space]
  keys = list(dims)
  units = np.array([[dims[k].to_unit(overrides[k], bases[k]) for k in keys]
                    for overrides, _ in history])
  scores = np.array([score for _, score in history], np.float64)
  order = np.argsort(-scores, kind="stable")
  n_good = max(1, int(math.ceil(TPE_GOOD_FRACTION * len(history))))
  good, rest = units[order[:n_good]], units[order[n_good:]]
  good_bw, rest_bw = _bandwidth(good), _bandwidth(rest)
  # per dimension: a good point plus kernel noise, or (like the prior's
  # weight in the density) with probability 1 / (n_good + 1) a uniform draw
  shape = (TPE_CANDIDATES, len(keys))
  centres = good[rng.integers(0, n_good, shape), np.arange(len(keys))]
  candidates = centres + good_bw * rng.standard_normal(shape)
  candidates = 1.0 - np.abs(1.0 - np.abs(candidates))   # reflect into [0, 1]
  from_prior = rng.random(shape) < 1.0 / (n_good + 1)
  candidates = np.where(from_prior, rng.random(shape),
                        np.clip(candidates, 0.0, 1.0))
  ratio = np.sum(_parzen_log_density(good, good_bw, candidates)
                 - _parzen_log_density(rest, rest_bw, candidates), axis=1)
  best = candidates[int(np.argmax(ratio))]
  return {k: dims[k].from_unit(u, bases[k]) for k, u in zip(keys, best)}


SAMPLERS = ("random", "tpe")


def apply_overrides(config, overrides: Dict[str, Any]):
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    if key not in config[section]:
      raise ValueError(f"override {dotted!r} names no config key")
    config[section][key] = type(config[section][key])(value)
  return config


def _train_trial(trainer, config, trial_dir: pathlib.Path,
                 seeds_per_trial: int) -> Dict[str, Any]:
  """One trial's results; with several seeds, their means."""
  if seeds_per_trial == 1:
    return common.run_or_load(trainer, config, trial_dir)
  per_seed = []
  for k in range(seeds_per_trial):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = config.seed + k
    per_seed.append(common.run_or_load(trainer, seed_config,
                                       trial_dir / f"seed{k}"))
  mean = lambda key: float(np.mean([r[key] for r in per_seed]))
  mses = [r.get("act_mse") for r in per_seed]
  return {"val_acc": mean("val_acc"), "test_acc": mean("test_acc"),
          "best_epoch": int(np.median([r["best_epoch"] for r in per_seed])),
          "act_mse": None if None in mses else float(np.mean(mses))}


def run_sweep(config, workdir: str, trials: int, space: str = "gcn",
              sweep_seed: int = 0, verbose: bool = True,
              seeds_per_trial: int = 1, sampler: str = "random"
              ) -> Dict[str, Any]:
  validate.sweep(config, trials=trials, space=space,
                 seeds_per_trial=seeds_per_trial, sampler=sampler,
                 spaces=SPACES, samplers=SAMPLERS)
  _base_values(space, config)  # a space that needs a base value has one
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(sweep_seed)
  trainer = tasks.trainer_for(config.task)
  rows = []
  for trial in range(trials):
    if sampler == "tpe":
      history = [({k: r[k] for k in SPACES[space]}, r["val_acc"])
                 for r in rows]
      overrides = propose_tpe(space, history, rng, config)
    else:
      overrides = sample_overrides(space, rng, config)
    trial_dir = workdir / f"trial_{trial:03d}"
    overrides_file = trial_dir / "overrides.json"
    if overrides_file.exists():
      stored = json.loads(overrides_file.read_text())
      if stored != json.loads(json.dumps(overrides)):
        raise ValueError(f"{trial_dir} was run with other overrides ({stored});"
                         " use the same --space/--sweep_seed or a new workdir")
    trial_dir.mkdir(parents=True, exist_ok=True)
    common.write_text(overrides_file, json.dumps(overrides))
    try:
      results = _train_trial(trainer, apply_overrides(config, overrides),
                             trial_dir, seeds_per_trial)
    except common.NonFiniteError as e:  # ranked last, the sweep goes on
      results = {"val_acc": 0.0, "test_acc": 0.0, "best_epoch": -1,
                 "diverged": str(e)}
    row = {"trial": trial, **overrides, "val_acc": results["val_acc"],
           "test_acc": results["test_acc"], "best_epoch": results["best_epoch"],
           "act_mse": results.get("act_mse")}
    if "diverged" in results:
      row["diverged"] = True
    rows.append(row)
    if verbose:
      print(f"trial {trial}: val {100 * row['val_acc']:.2f} test "
            f"{100 * row['test_acc']:.2f} "
            + " ".join(f"{k}={v:.3g}" for k, v in overrides.items()),
            flush=True)
  rows.sort(key=lambda r: -r["val_acc"])
  keys = list(SPACES[space])
  table = common.markdown_table(
      ["trial", *keys, "val acc", "test acc", "best epoch"],
      [[r["trial"], *(f"{r[k]:.3g}" for k in keys), f"{100 * r['val_acc']:.2f}",
        f"{100 * r['test_acc']:.2f}", r["best_epoch"]] for r in rows])
  common.write_text(
      workdir / "sweep.md",
      f"{'TPE' if sampler == 'tpe' else 'Random'} search, {trials} trials"
      f" ({space!r} space, sweep seed {sweep_seed}), selected on validation"
      " accuracy"
      + (f" (mean of {seeds_per_trial} seeds per trial; accuracies and best "
         f"epoch below are means / the median over them)"
         if seeds_per_trial > 1 else "") + ".\n\n"
      + table)
  common.write_text(workdir / "sweep.jsonl",
                    "".join(json.dumps(r) + "\n" for r in rows))
  best = rows[0]
  common.write_json(workdir / "best_config.json",
                    {"overrides": {k: best[k] for k in keys},
                     "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "trial": best["trial"], "trials": trials,
                     "seeds_per_trial": seeds_per_trial,
                     "sampler": sampler, "space": space,
                     "sweep_seed": sweep_seed})
  return best


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  for name in ("config", "workdir"):
    if FLAGS[name].value is None:
      raise ValueError(f"--{name} is required")
  best = run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.trials, FLAGS.space,
                   FLAGS.sweep_seed, seeds_per_trial=FLAGS.seeds_per_trial,
                   sampler=FLAGS.sampler)
  print(f"best trial {best['trial']}: val {100 * best['val_acc']:.2f} "
        f"(test {100 * best['test_acc']:.2f})")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
