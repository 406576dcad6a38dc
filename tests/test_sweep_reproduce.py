"""The sweep and reproduction commands on real Cora, at toy budgets."""
import json

import numpy as np
import optuna
import pytest

from configs import pde_gcn as gcn_configs
from train import node_classify
from train import reproduce
from train import sweep


def _tiny_config(data_dir, arg: str, num_epochs: int):
  """A 2-layer, width-8 PDE-GCN on real Cora for sweep tests."""
  config = gcn_configs.get_config(arg)
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth = 2
  config.model.width = 8
  config.num_epochs = num_epochs
  return config


def _row_dir(tmp_path, row):
  return tmp_path / row["trial_dir"]


def test_sweep_selects_on_validation_and_writes_outputs(data_dir, tmp_path):
  config = _tiny_config(data_dir, "cora,sym,4w4a", num_epochs=5)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="gcn_quant",
                         verbose=False, sampler="random")
  rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").open()]
  assert len(rows) == 2
  assert best["val_acc"] == max(r["val_acc"] for r in rows)
  winner = json.loads((tmp_path / "best_config.json").read_text())
  assert winner["trial"] == best["trial"] and winner["sampler"] == "random"
  assert set(winner["overrides"]) == set(sweep.SPACES["gcn_quant"])
  assert (tmp_path / "sweep.md").read_text().startswith(
      "Optuna random search, 2 trials")
  # the study: objective = validation accuracy, test accuracy an attribute
  study = sweep.load_study(tmp_path)
  for t in study.trials:
    results = json.loads((tmp_path / t.user_attrs["trial_dir"]
                          / "results.json").read_text())
    assert t.value == results["val_acc"]
    assert t.user_attrs["test_acc"] == results["test_acc"]
    overrides = json.loads((tmp_path / t.user_attrs["trial_dir"]
                            / "overrides.json").read_text())
    assert overrides == t.params
  # a resumed sweep reads finished trials back instead of re-training
  mtime = (tmp_path / rows[0]["trial_dir"] / "results.json").stat().st_mtime
  again = sweep.run_sweep(config, str(tmp_path), trials=2, space="gcn_quant",
                          verbose=False, sampler="random")
  assert again == best and len(sweep.load_study(tmp_path).trials) == 2
  assert (tmp_path / rows[0]["trial_dir"] / "results.json").stat(
      ).st_mtime == mtime
  with pytest.raises(ValueError, match=r"other settings \(\['sampler'\]\)"):
    sweep.run_sweep(config, str(tmp_path), trials=2, space="gcn_quant",
                    verbose=False, sampler="tpe")


def test_sweep_with_several_seeds_ranks_trials_by_their_mean(data_dir,
                                                            tmp_path):
  config = _tiny_config(data_dir, "cora,sym,fp", num_epochs=3)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="dropout",
                         verbose=False, seeds_per_trial=2)
  rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").open()]
  for row in rows:
    per_seed = [json.loads((_row_dir(tmp_path, row) / f"seed{k}"
                            / "results.json").read_text()) for k in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert row["val_acc"] == pytest.approx(
        np.mean([r["val_acc"] for r in per_seed]))
  assert best["val_acc"] == max(r["val_acc"] for r in rows)
  winner = json.loads((tmp_path / "best_config.json").read_text())
  assert winner["seeds_per_trial"] == 2 and winner["sampler"] == "tpe"
  assert "mean of 2 seeds" in (tmp_path / "sweep.md").read_text()
  with pytest.raises(ValueError, match="seeds_per_trial must be at least 1"):
    sweep.run_sweep(config, str(tmp_path), trials=1, space="dropout",
                    seeds_per_trial=0)


class _PruneTrial(optuna.pruners.BasePruner):
  """Prunes one trial (by number) once it has reported ``after`` epochs."""

  def __init__(self, number: int, after: int):
    self.number, self.after = number, after

  def prune(self, study, trial) -> bool:
    return trial.number == self.number and len(
        trial.intermediate_values) >= self.after


def test_pruned_trials_stop_early_and_rank_last(data_dir, tmp_path):
  config = _tiny_config(data_dir, "cora,sym,fp", num_epochs=4)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="dropout",
                         verbose=False, pruner=_PruneTrial(0, after=2),
                         pruner_warmup_epochs=1)
  study = sweep.load_study(tmp_path)
  pruned, complete = study.trials
  assert pruned.state.name == "PRUNED" and complete.state.name == "COMPLETE"
  assert pruned.user_attrs["pruned_at"] == {"seed": 0, "epoch": 1}
  assert not (tmp_path / "trial_000" / "results.json").exists()
  assert best["trial"] == 1
  # the trial reports its best validation accuracy so far after each epoch
  epochs = [json.loads(l) for l in
            (tmp_path / "trial_001" / "metrics.jsonl").open()]
  assert complete.intermediate_values == {
      e["epoch"]: max(x["val_acc"] for x in epochs[:i + 1])
      for i, e in enumerate(epochs)}
  assert complete.value == max(e["val_acc"] for e in epochs)
  rows = (tmp_path / "sweep.md").read_text()
  assert "1 pruned" in rows and "pruned (seed 0, epoch 1)" in rows
  assert "No importance plot" in rows  # one complete trial
  assert isinstance(sweep.make_pruner("median"), optuna.pruners.MedianPruner)
  with pytest.raises(ValueError, match="pruner must be one of"):
    sweep.make_pruner("hyperband")
  with pytest.raises(ValueError, match=r"unknown sampler \(--sampler = "):
    sweep.run_sweep(config, str(tmp_path), trials=1, sampler="grid")
  config.task = "image_classification"
  with pytest.raises(ValueError, match=r"PDE-GCN trainer \(config.task = 'image_classification'"):
    sweep.run_sweep(config, str(tmp_path / "img"), trials=1)


def test_killed_sweep_resumes_the_running_trial_and_proposes_the_same(
    data_dir, tmp_path, monkeypatch):
  config = _tiny_config(data_dir, "cora,sym,fp", num_epochs=4)
  kwargs = dict(trials=3, space="dropout", verbose=False, sampler="tpe",
                tpe_startup_trials=1)
  reference = sweep.run_sweep(config, str(tmp_path / "ref"), **kwargs)
  train = node_classify.train_and_evaluate

  def killed_in_trial_1(config, workdir, **kw):
    if workdir.endswith("trial_001"):
      train(config, workdir, max_epochs_this_call=2, **kw)
      raise KeyboardInterrupt
    return train(config, workdir, **kw)

  monkeypatch.setattr(node_classify, "train_and_evaluate", killed_in_trial_1)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(config, str(tmp_path / "killed"), **kwargs)
  monkeypatch.setattr(node_classify, "train_and_evaluate", train)
  resumed = sweep.run_sweep(config, str(tmp_path / "killed"), **kwargs)
  study = sweep.load_study(tmp_path / "killed")
  assert [t.state.name for t in study.trials] == [
      "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
  # the killed trial ran again in its directory, from its checkpoint
  assert study.trials[2].user_attrs["trial_dir"] == "trial_001"
  assert not (tmp_path / "killed" / "trial_002").exists()
  ref_study = sweep.load_study(tmp_path / "ref")
  assert [t.params for t in ref_study.trials] == [
      t.params for t in study.trials if t.state.name == "COMPLETE"]
  assert [t.value for t in ref_study.trials] == [
      t.value for t in study.trials if t.state.name == "COMPLETE"]
  assert resumed["val_acc"] == reference["val_acc"]


def test_reproduce_table7_writes_a_markdown_table(data_dir, tmp_path,
                                                  monkeypatch):
  monkeypatch.setenv("PDEQ_DATA_DIR", str(data_dir))
  out = reproduce.run_table7(["cora"], ["nonsym", "sym"], ["4w4a"], seeds=1,
                             workdir=str(tmp_path), num_epochs=2,
                             verbose=False,
                             config_overrides={"model.depth": 3,
                                               "model.width": 8})
  assert len(out["runs"]) == 2
  table = (tmp_path / "table7.md").read_text()
  assert "| cora | sym | 4W4A | 79.4 |" in table
  assert "| cora | non-sym | 4W4A | 75.7 |" in table
  assert (tmp_path / "layerwise_mse_cora_4w4a.png").exists()
  assert len(out["runs"][0]["consistency"]["mse"]) == 3


def test_every_search_space_names_config_keys_and_stays_in_bounds():
  config = gcn_configs.get_config("cora,sym,4w8a")
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  for space in sweep.SPACES:
    for _ in range(20):
      overrides = sweep.suggest_overrides(space, study.ask(), config)
      assert set(overrides) == set(sweep.SPACES[space])
      assert all(v > 0 for v in overrides.values())
      applied = sweep.apply_overrides(config, overrides)
      for dotted, value in overrides.items():
        section, key = dotted.split(".")
        assert applied[section][key] == pytest.approx(value)
  for _ in range(20):
    local = sweep.suggest_overrides("local", study.ask(), config)
    assert 0.5 <= local["model.h"] / config.model.h <= 2.0
    assert 1 / 3 <= local["optim.weight_decay"] / config.optim.weight_decay <= 3
  for _ in range(20):
    gcn = sweep.suggest_overrides("gcn", study.ask())
    assert 0.1 <= gcn["model.h"] <= 2.0 and 1e-3 <= gcn["optim.lr"] <= 7e-2
  with pytest.raises(ValueError, match="pass base_config"):
    sweep.suggest_overrides("local", study.ask())
  with pytest.raises(ValueError, match="--space must be one of"):
    sweep.suggest_overrides("no_such_space", study.ask())
  with pytest.raises(ValueError, match="names no config key"):
    sweep.apply_overrides(config, {"model.no_such_key": 1.0})


def test_error_bars_are_the_sample_std():
  # ddof = 1: the two values 1 and 3 have sample std sqrt(2), not 1
  assert reproduce._mean_std([1.0, 3.0], digits=3) == "2.000 ± 1.414"
  assert reproduce._mean_std([0.5], 100.0) == "50.0 ± –"
  assert reproduce._mean_std([]) == "–"


def test_run_or_load_reuses_results_only_for_the_same_config(tmp_path):
  import types
  import ml_collections
  from train import common
  calls = []

  def train_and_evaluate(config, workdir, verbose=False):
    common.prepare_workdir(workdir, config)
    calls.append(config.lr)
    return {"acc": config.lr}

  trainer = types.SimpleNamespace(train_and_evaluate=train_and_evaluate)
  config = ml_collections.ConfigDict({"lr": 0.1, "model": {"depth": 2}})
  first = common.run_or_load(trainer, config, tmp_path)
  assert first["acc"] == 0.1 and "wall_seconds" in first
  assert common.run_or_load(trainer, config, tmp_path) == first
  assert calls == [0.1]  # read back, not retrained
  changed = ml_collections.ConfigDict({"lr": 0.2, "model": {"depth": 3}})
  with pytest.raises(ValueError, match=r"different config \(keys "
                     r"\['lr', 'model.depth'\]\)"):
    common.run_or_load(trainer, changed, tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    common.run_or_load(trainer, config, tmp_path)
  assert calls == [0.1]


def test_a_run_recorded_by_an_older_version_resumes(tmp_path, capsys):
  import ml_collections
  from train import common
  (tmp_path / "results.json").write_text("{}")  # the workdir is claimed
  # Recorded before `data.threads` and `noise` existed.
  (tmp_path / "config.json").write_text(json.dumps(
      {"lr": 0.1, "data": {"name": "cifar10_jpeg"}}))
  config = ml_collections.ConfigDict(
      {"lr": 0.1, "data": {"name": "cifar10_jpeg", "threads": 1},
       "noise": {"enabled": False}})
  common.prepare_workdir(tmp_path, config)
  out = capsys.readouterr().out
  assert "data.threads=1" in out and "noise={'enabled': False}" in out
  assert json.loads((tmp_path / "config.json").read_text())["data"] == {
      "name": "cifar10_jpeg", "threads": 1}
  # A key the old run had, changed, is still refused; so is a dropped key.
  (tmp_path / "config.json").write_text(json.dumps(
      {"lr": 0.1, "data": {"name": "cifar10_jpeg"}}))
  config.lr = 0.2
  with pytest.raises(ValueError, match=r"different config \(keys \['lr'\]"):
    common.prepare_workdir(tmp_path, config)
  (tmp_path / "config.json").write_text(json.dumps(
      {"lr": 0.2, "old_key": 1, "data": {"name": "cifar10_jpeg"}}))
  with pytest.raises(ValueError, match=r"keys \['old_key'\]"):
    common.prepare_workdir(tmp_path, config)


def test_importance_plot_of_a_study(tmp_path):
  study = optuna.create_study(direction="maximize",
                              sampler=optuna.samplers.RandomSampler(seed=0))
  study.optimize(lambda t: -np.log(sweep.suggest_overrides("gcn", t)[
      "model.h"] / 0.5) ** 2, n_trials=8)
  assert sweep.plot_importance(study, tmp_path / "importance.png")
  assert (tmp_path / "importance.png").stat().st_size > 1000
  flat = optuna.create_study(direction="maximize")
  flat.optimize(lambda t: 1.0 + 0 * t.suggest_float("x", 0, 1), n_trials=3)
  assert not sweep.plot_importance(flat, tmp_path / "flat.png")
