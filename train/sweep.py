"""Hyperparameter search as an Optuna study, selected on validation accuracy.

    python -m train.sweep --config=configs/pde_gcn.py:cora,sym,4w4a \
        --workdir=DIR --trials=30 [--space=gcn] [--sampler=tpe|random] \
        [--pruner=median] [--seeds_per_trial=3] [--config.num_epochs=200]

The study lives in ``DIR/study.db`` (SQLite; ``train.sweep.load_study(DIR)``
or ``optuna-dashboard sqlite:///DIR/study.db`` to inspect it).  Each trial
trains in ``DIR/trial_NNN`` (its ``overrides.json``, checkpoints and
``results.json``).  A killed sweep started again with the same command loads
the study: finished trials are kept, the trial that was running is marked
failed and enqueued again with the same parameters and directory, so its
training resumes from its last checkpoint.  Every trial is proposed by a
sampler seeded with (``--sweep_seed``, number of finished trials), so a
resumed sweep proposes what an uninterrupted one would.

``--sampler=tpe`` (default) is Optuna's ``TPESampler`` (random for the first
``--tpe_startup_trials``), the sampler of the Optuna sweeps behind the
paper's Table 7; ``--sampler=random`` is its ``RandomSampler``.

The objective is the best validation accuracy of the run (the trainer's
selected epoch); the test accuracy at that epoch is stored as the trial's
user attribute ``test_acc`` and never optimised.  ``--pruner=median`` adds
Optuna's ``MedianPruner``: after every epoch the trial reports its best
validation accuracy so far, and a trial below the median of the earlier
trials at the same epoch is stopped (after ``--pruner_startup_trials``
trials and ``--pruner_warmup_epochs`` epochs).

``--seeds_per_trial=N`` trains every trial with N seeds (``config.seed`` ..
``config.seed + N - 1``, in ``trial_NNN/seedK``) and ranks trials by their
mean validation accuracy: on a 500-node validation set one seed's accuracy
varies by ~1 point, so the best of many single-seed trials is mostly the
luckiest one.

The sweep writes ``DIR/sweep.md`` (trials ranked by validation accuracy,
pruned ones last), ``DIR/sweep.jsonl``, ``DIR/best_config.json`` (the
winner's overrides and numbers) and ``DIR/param_importance.png`` (Optuna's
fANOVA parameter importances).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Dict, Union
import warnings

from absl import flags
from ml_collections import config_flags
import numpy as np
import optuna
from optuna.trial import TrialState

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
  flags.DEFINE_integer("trials", 20, "Trial budget (complete + pruned).", **fv)
  flags.DEFINE_string("space", "gcn", "Search space name.", **fv)
  flags.DEFINE_integer("sweep_seed", 0, "Seed of the sampler.", **fv)
  flags.DEFINE_enum("sampler", "tpe", list(SAMPLERS),
                    "Optuna sampler: TPE or independent random draws.", **fv)
  flags.DEFINE_integer("tpe_startup_trials", 10,
                       "Random trials before TPE takes over.", **fv)
  flags.DEFINE_enum("pruner", "none", list(PRUNERS),
                    "Stop trials whose validation accuracy so far is below "
                    "the median of earlier trials at the same epoch.", **fv)
  flags.DEFINE_integer("pruner_startup_trials", 4,
                       "Trials finished before the pruner acts.", **fv)
  flags.DEFINE_integer("pruner_warmup_epochs", 10,
                       "Epochs of every trial before the pruner acts.", **fv)
  flags.DEFINE_integer("seeds_per_trial", 1,
                       "Training seeds per trial; trials are ranked by the "
                       "mean validation accuracy over them.", **fv)


class _Range:
  """A value drawn uniformly in [lo, hi], or in log space when ``log``."""

  def __init__(self, lo: float, hi: float, log: bool):
    valid = (0 < lo < hi) if log else (lo < hi)
    if not valid:
      raise ValueError(f"bad range [{lo}, {hi}] (log={log})")
    self.lo, self.hi, self.log = float(lo), float(hi), log

  def suggest(self, trial: optuna.Trial, name: str, base: float = None
              ) -> float:
    del base  # absolute ranges ignore the base config
    return float(trial.suggest_float(name, self.lo, self.hi, log=self.log))


def _log_uniform(lo: float, hi: float) -> _Range:
  return _Range(lo, hi, log=True)


def _uniform(lo: float, hi: float) -> _Range:
  return _Range(lo, hi, log=False)


class _Around:
  """The base config's value times a log-uniform factor in [1/f, f]."""

  def __init__(self, factor: float):
    self.factor = factor

  def suggest(self, trial: optuna.Trial, name: str, base: float) -> float:
    base = float(base)
    return float(trial.suggest_float(name, base / self.factor,
                                     base * self.factor, log=True))


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


def suggest_overrides(space: str, trial: optuna.Trial,
                      base_config=None) -> Dict[str, Any]:
  """One trial's overrides, asked of an Optuna trial; spaces relative to a
  base need ``base_config``."""
  bases = _base_values(space, base_config)
  return {key: draw.suggest(trial, key, bases[key])
          for key, draw in SPACES[space].items()}


SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median")
STUDY_NAME = "sweep"
STUDY_FILE = "study.db"


def make_sampler(sampler: str, seed: int,
                 tpe_startup_trials: int = 10) -> optuna.samplers.BaseSampler:
  """Optuna's TPE (after ``tpe_startup_trials`` random trials) or random
  sampler."""
  if sampler == "tpe":
    return optuna.samplers.TPESampler(seed=seed,
                                      n_startup_trials=tpe_startup_trials)
  if sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def make_pruner(pruner: Union[str, optuna.pruners.BasePruner, None],
                startup_trials: int = 4, warmup_epochs: int = 10
                ) -> optuna.pruners.BasePruner:
  """``"median"``: stop a trial whose best validation accuracy so far is
  below the median of the earlier trials' at the same epoch (after
  ``startup_trials`` finished trials and ``warmup_epochs`` epochs)."""
  if isinstance(pruner, optuna.pruners.BasePruner):
    return pruner
  if pruner in (None, "none"):
    return optuna.pruners.NopPruner()
  if pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=warmup_epochs)
  raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")


def apply_overrides(config, overrides: Dict[str, Any]):
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    if key not in config[section]:
      raise ValueError(f"override {dotted!r} names no config key")
    config[section][key] = type(config[section][key])(value)
  return config


def _run_seed(trainer, config, run_dir: pathlib.Path, report) -> Dict[str, Any]:
  """One seed's results (read back when finished); ``report(epoch,
  best_val_acc)`` is called after every epoch and may stop the run (True)."""
  return common.run_or_load(
      trainer, config, run_dir,
      epoch_callback=lambda epoch, m: report(epoch, m["best_val_acc"]))


def _train_trial(trainer, config, trial_dir: pathlib.Path,
                 seeds_per_trial: int, trial: optuna.Trial,
                 warmup_epochs: int = 0) -> Dict[str, Any]:
  """One trial's results; with several seeds, their means.

  Seed k reports its best validation accuracy so far at step
  ``k * num_epochs + epoch``, so the pruner compares a trial with the others
  at the same seed and epoch; no seed is pruned in its first
  ``warmup_epochs`` epochs.  Raises ``optuna.TrialPruned`` when told to.
  """
  num_epochs = int(config.num_epochs)
  per_seed = []
  for k in range(seeds_per_trial):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = config.seed + k
    run_dir = trial_dir if seeds_per_trial == 1 else trial_dir / f"seed{k}"

    def report(epoch, best_val_acc, k=k):
      trial.report(float(best_val_acc), k * num_epochs + int(epoch))
      return int(epoch) >= warmup_epochs and trial.should_prune()

    results = _run_seed(trainer, seed_config, run_dir, report)
    if "stopped_by_callback_at_epoch" in results:
      trial.set_user_attr("pruned_at", {"seed": k, "epoch": results[
          "stopped_by_callback_at_epoch"]})
      raise optuna.TrialPruned()
    per_seed.append(results)
  mean = lambda key: float(np.mean([r[key] for r in per_seed]))
  mses = [r.get("act_mse") for r in per_seed]
  return {"val_acc": mean("val_acc"), "test_acc": mean("test_acc"),
          "best_epoch": int(np.median([r["best_epoch"] for r in per_seed])),
          "act_mse": None if None in mses else float(np.mean(mses)),
          "val_acc_per_seed": [float(r["val_acc"]) for r in per_seed]}


def _study_settings(config, space, sampler, sweep_seed, seeds_per_trial,
                    pruner_name) -> Dict[str, Any]:
  """What a resumed sweep must share with the stored study."""
  return {"space": space, "sampler": sampler, "sweep_seed": sweep_seed,
          "seeds_per_trial": seeds_per_trial, "pruner": pruner_name,
          "config": json.loads(json.dumps(common.config_to_dict(config)))}


def load_study(workdir: os.PathLike) -> optuna.Study:
  """The sweep's Optuna study (for inspection: ``study.trials_dataframe()``)."""
  return optuna.load_study(study_name=STUDY_NAME,
                           storage=_storage_url(pathlib.Path(workdir)))


def _storage_url(workdir: pathlib.Path) -> str:
  return f"sqlite:///{(workdir / STUDY_FILE).absolute()}"


def _open_study(workdir: pathlib.Path, settings: Dict[str, Any],
                sampler: optuna.samplers.BaseSampler,
                pruner: optuna.pruners.BasePruner) -> optuna.Study:
  study = optuna.create_study(study_name=STUDY_NAME,
                              storage=_storage_url(workdir),
                              direction="maximize", sampler=sampler,
                              pruner=pruner, load_if_exists=True)
  stored = study.user_attrs.get("settings")
  if stored is None:
    study.set_user_attr("settings", settings)
  elif stored != settings:
    diff = sorted(k for k in settings if stored.get(k) != settings[k])
    raise ValueError(f"{workdir} holds a sweep with other settings ({diff}); "
                     "use the same flags and config or a new workdir")
  return study


_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def _requeue_killed_trials(study: optuna.Study) -> None:
  """Trials left RUNNING by a killed sweep: marked failed and enqueued again
  with the same parameters and directory, where training resumes from its
  checkpoint."""
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    study.tell(t.number, state=TrialState.FAIL)
    study.enqueue_trial(t.params, user_attrs={
        "trial_dir": t.user_attrs.get("trial_dir", _trial_dir_name(t.number))})


def _trial_dir_name(number: int) -> str:
  return f"trial_{number:03d}"


def run_sweep(config, workdir: str, trials: int, space: str = "gcn",
              sweep_seed: int = 0, verbose: bool = True,
              seeds_per_trial: int = 1, sampler: str = "tpe",
              pruner: Union[str, optuna.pruners.BasePruner, None] = None,
              pruner_startup_trials: int = 4, pruner_warmup_epochs: int = 10,
              tpe_startup_trials: int = 10) -> Dict[str, Any]:
  """Runs (or resumes) the sweep's Optuna study until ``trials`` trials have
  finished (complete or pruned); returns the best trial's row.

  Each trial is proposed by a sampler seeded with (``sweep_seed``, number of
  finished trials), so a resumed sweep proposes the trials an uninterrupted
  one would.  The objective is the validation accuracy (mean over the
  seeds); the test accuracy is stored as a user attribute, never optimised.
  """
  validate.sweep(config, trials=trials, space=space,
                 seeds_per_trial=seeds_per_trial, sampler=sampler,
                 spaces=SPACES, samplers=SAMPLERS)
  pruner_obj = make_pruner(pruner, pruner_startup_trials, pruner_warmup_epochs)
  pruner_name = (pruner if isinstance(pruner, str) or pruner is None
                 else type(pruner).__name__)
  _base_values(space, config)  # validates the space
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  settings = _study_settings(config, space, sampler, sweep_seed,
                             seeds_per_trial, pruner_name or "none")
  study = _open_study(workdir, settings, make_sampler(sampler, sweep_seed),
                      pruner_obj)
  _requeue_killed_trials(study)
  trainer = tasks.trainer_for(config.task)
  while True:
    done = len(study.get_trials(deepcopy=False, states=_DONE))
    if done >= trials:
      break
    seed = int(np.random.SeedSequence([sweep_seed, done]).generate_state(1)[0])
    study.sampler = make_sampler(sampler, seed, tpe_startup_trials)
    trial = study.ask()
    trial_dir_name = trial.user_attrs.get("trial_dir",
                                          _trial_dir_name(trial.number))
    trial.set_user_attr("trial_dir", trial_dir_name)
    overrides = suggest_overrides(space, trial, config)
    trial_dir = workdir / trial_dir_name
    trial_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(trial_dir / "overrides.json", overrides)
    try:
      results = _train_trial(trainer, apply_overrides(config, overrides),
                             trial_dir, seeds_per_trial, trial,
                             pruner_warmup_epochs)
    except optuna.TrialPruned:
      study.tell(trial, state=TrialState.PRUNED)
      if verbose:
        print(f"trial {trial.number}: pruned at "
              f"{trial.user_attrs.get('pruned_at')}", flush=True)
      continue
    except common.NonFiniteError as e:  # ranked last, the sweep goes on
      trial.set_user_attr("diverged", str(e))
      study.tell(trial, 0.0)
      if verbose:
        print(f"trial {trial.number}: diverged ({e})", flush=True)
      continue
    for key in ("test_acc", "best_epoch", "act_mse", "val_acc_per_seed"):
      trial.set_user_attr(key, results[key])
    study.tell(trial, results["val_acc"])
    if verbose:
      print(f"trial {trial.number}: val {100 * results['val_acc']:.2f} test "
            f"{100 * results['test_acc']:.2f} "
            + " ".join(f"{k}={v:.3g}" for k, v in overrides.items()),
            flush=True)
  return write_reports(study, workdir)


def _rows(study: optuna.Study, keys) -> list:
  """Finished trials as rows: complete ones by validation accuracy (ties:
  trial number), then the pruned ones."""
  rows = []
  for t in study.get_trials(deepcopy=False, states=_DONE):
    a = t.user_attrs
    rows.append({"trial": t.number, "trial_dir": a.get("trial_dir"),
                 "state": t.state.name.lower(),
                 **{k: t.params[k] for k in keys},
                 "val_acc": t.value, "test_acc": a.get("test_acc"),
                 "best_epoch": a.get("best_epoch"),
                 "act_mse": a.get("act_mse"), "pruned_at": a.get("pruned_at"),
                 **({"diverged": True} if "diverged" in a else {})})
  complete = sorted((r for r in rows if r["state"] == "complete"),
                    key=lambda r: (-r["val_acc"], r["trial"]))
  return complete + [r for r in rows if r["state"] != "complete"]


def write_reports(study: optuna.Study, workdir: os.PathLike) -> Dict[str, Any]:
  """``sweep.md``, ``sweep.jsonl``, ``best_config.json`` and
  ``param_importance.png`` of a study; returns the best trial's row."""
  workdir = pathlib.Path(workdir)
  settings = study.user_attrs["settings"]
  space, seeds = settings["space"], settings["seeds_per_trial"]
  keys = list(SPACES[space])
  rows = _rows(study, keys)
  complete = [r for r in rows if r["state"] == "complete"]
  if not complete:
    raise ValueError(f"no trial of the sweep in {workdir} completed (all "
                     "pruned); lower the pruner's aggressiveness")
  pct = lambda v: "" if v is None else f"{100 * v:.2f}"
  table = common.markdown_table(
      ["trial", *keys, "val acc", "test acc", "best epoch"],
      [[r["trial"], *(f"{r[k]:.3g}" for k in keys), pct(r["val_acc"]),
        pct(r["test_acc"]),
        r["best_epoch"] if r["state"] == "complete" else
        f"pruned (seed {r['pruned_at']['seed']}, epoch "
        f"{r['pruned_at']['epoch']})"] for r in rows])
  n_pruned = len(rows) - len(complete)
  sampler = {"tpe": "Optuna TPE", "random": "Optuna random"}[
      settings["sampler"]]
  importance = ("Parameter importances (fANOVA): `param_importance.png`."
                if plot_importance(study, workdir / "param_importance.png")
                else "No importance plot: fewer than two complete trials with "
                "different values.")
  common.write_text(workdir / "sweep.md",
      f"{sampler} search, {len(rows)} trials ({space!r} space, sweep seed "
      f"{settings['sweep_seed']}, pruner {settings['pruner']}"
      + (f", {n_pruned} pruned" if n_pruned else "") + "), selected on "
      "validation accuracy"
      + (f" (mean of {seeds} seeds per trial; accuracies and best "
         f"epoch below are means / the median over them)"
         if seeds > 1 else "") + "; test accuracy at the selected epoch "
      "shown, never used to choose.  Study: `" + STUDY_FILE + "`.  "
      + importance + "\n\n" + table)
  common.write_text(workdir / "sweep.jsonl",
                     "".join(json.dumps(r) + "\n" for r in rows))
  best = complete[0]
  common.write_json(workdir / "best_config.json",
                    {"overrides": {k: best[k] for k in keys},
                     "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "trial": best["trial"], "trials": len(rows),
                     "pruned": n_pruned, "seeds_per_trial": seeds,
                     "sampler": settings["sampler"], "space": space,
                     "sweep_seed": settings["sweep_seed"],
                     "pruner": settings["pruner"]})
  return best


def plot_importance(study: optuna.Study, path: pathlib.Path) -> bool:
  """Optuna's parameter-importance plot (fANOVA on the complete trials);
  False (no plot) with fewer than two complete trials or constant values."""
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if len(complete) < 2 or len({t.value for t in complete}) < 2:
    return False
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from optuna.visualization import matplotlib as optuna_mpl  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    ax = optuna_mpl.plot_param_importances(study)
  ax.figure.tight_layout()
  tmp = path.with_name(path.stem + ".tmp.png")
  ax.figure.savefig(tmp, dpi=110)
  plt.close(ax.figure)
  os.replace(tmp, path)
  return True


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  for name in ("config", "workdir"):
    if FLAGS[name].value is None:
      raise ValueError(f"--{name} is required")
  best = run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.trials, FLAGS.space,
                   FLAGS.sweep_seed, seeds_per_trial=FLAGS.seeds_per_trial,
                   sampler=FLAGS.sampler, pruner=FLAGS.pruner,
                   pruner_startup_trials=FLAGS.pruner_startup_trials,
                   pruner_warmup_epochs=FLAGS.pruner_warmup_epochs,
                   tpe_startup_trials=FLAGS.tpe_startup_trials)
  print(f"best trial {best['trial']}: val {100 * best['val_acc']:.2f} "
        f"(test {100 * best['test_acc']:.2f})")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
