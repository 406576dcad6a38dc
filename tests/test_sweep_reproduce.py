"""The sweep and reproduction commands on real Cora, at toy budgets."""
import json

import numpy as np
import pytest

from configs import pde_gcn as gcn_configs
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


def test_sweep_selects_on_validation_and_writes_outputs(data_dir, tmp_path):
  config = _tiny_config(data_dir, "cora,sym,4w4a", num_epochs=5)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="gcn_quant",
                         verbose=False)
  rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").open()]
  assert len(rows) == 2
  assert best["val_acc"] == max(r["val_acc"] for r in rows)
  winner = json.loads((tmp_path / "best_config.json").read_text())
  assert winner["trial"] == best["trial"]
  assert set(winner["overrides"]) == set(sweep.SPACES["gcn_quant"])
  assert "val acc" in (tmp_path / "sweep.md").read_text()
  # a resumed sweep reads finished trials back instead of re-training
  again = sweep.run_sweep(config, str(tmp_path), trials=2, space="gcn_quant",
                          verbose=False)
  assert again == best


def test_sweep_with_several_seeds_ranks_trials_by_their_mean(data_dir,
                                                            tmp_path):
  config = _tiny_config(data_dir, "cora,sym,fp", num_epochs=3)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="dropout",
                         verbose=False, seeds_per_trial=2)
  rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").open()]
  for row in rows:
    trial_dir = tmp_path / f"trial_{row['trial']:03d}"
    per_seed = [json.loads((trial_dir / f"seed{k}" / "results.json")
                           .read_text()) for k in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert row["val_acc"] == pytest.approx(
        np.mean([r["val_acc"] for r in per_seed]))
  assert best["val_acc"] == max(r["val_acc"] for r in rows)
  winner = json.loads((tmp_path / "best_config.json").read_text())
  assert winner["seeds_per_trial"] == 2
  assert "mean of 2 seeds" in (tmp_path / "sweep.md").read_text()
  with pytest.raises(ValueError,
                     match=r"--seeds_per_trial = 0; allowed: an integer >= 1"):
    sweep.run_sweep(config, str(tmp_path), trials=1, space="dropout",
                    seeds_per_trial=0)


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
  rng = np.random.default_rng(0)
  for space in sweep.SPACES:
    for _ in range(20):
      overrides = sweep.sample_overrides(space, rng, config)
      assert set(overrides) == set(sweep.SPACES[space])
      assert all(v > 0 for v in overrides.values())
      applied = sweep.apply_overrides(config, overrides)
      for dotted, value in overrides.items():
        section, key = dotted.split(".")
        assert applied[section][key] == pytest.approx(value)
  for _ in range(20):
    local = sweep.sample_overrides("local", rng, config)
    assert 0.5 <= local["model.h"] / config.model.h <= 2.0
    assert 1 / 3 <= local["optim.weight_decay"] / config.optim.weight_decay <= 3
  with pytest.raises(ValueError, match="pass base_config"):
    sweep.sample_overrides("local", rng)
  with pytest.raises(ValueError, match="--space must be one of"):
    sweep.sample_overrides("no_such_space", rng)
  with pytest.raises(ValueError, match="names no config key"):
    sweep.apply_overrides(config, {"model.no_such_key": 1.0})


def _quadratic_score(overrides):
  """A smooth objective with its peak inside the 'gcn' space."""
  return -(np.log(overrides["model.h"] / 0.5) ** 2
           + np.log(overrides["optim.lr"] / 0.02) ** 2
           + 0.5 * np.log(overrides["optim.weight_decay"] / 1e-4) ** 2)


def _best_of_search(sampler, seed, trials=30):
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(trials):
    if sampler == "tpe":
      overrides = sweep.propose_tpe("gcn", history, rng)
    else:
      overrides = sweep.sample_overrides("gcn", rng)
    history.append((overrides, _quadratic_score(overrides)))
  return max(score for _, score in history), history


def test_tpe_starts_random_stays_in_bounds_and_beats_random_search():
  seeds = range(16)
  tpe = [_best_of_search("tpe", s) for s in seeds]
  random = [_best_of_search("random", s) for s in seeds]
  # the first TPE_STARTUP_TRIALS proposals are exactly the random draws
  startup = sweep.TPE_STARTUP_TRIALS
  assert ([o for o, _ in tpe[0][1][:startup]]
          == [o for o, _ in random[0][1][:startup]])
  for _, history in tpe:
    for overrides, _ in history:
      for key, value in overrides.items():
        unit = sweep.SPACES["gcn"][key].to_unit(value)
        assert -1e-9 <= unit <= 1 + 1e-9, (key, value)
  # same budget, same seeds: TPE's best trial is better on average
  assert np.mean([b for b, _ in tpe]) > np.mean([b for b, _ in random]) + 0.1
  # and it is deterministic given the history (what a resumed sweep relies on)
  again = _best_of_search("tpe", 0)
  assert again[1] == tpe[0][1]


def test_tpe_works_in_spaces_relative_to_the_base_config():
  config = gcn_configs.get_config("cora,sym,fp")
  rng = np.random.default_rng(1)
  history = []
  for i in range(sweep.TPE_STARTUP_TRIALS + 4):
    overrides = sweep.propose_tpe("local", history, rng, config)
    assert 0.5 - 1e-9 <= overrides["model.h"] / config.model.h <= 2 + 1e-9
    history.append((overrides, -abs(np.log(overrides["model.h"]))))
  unit = sweep.SPACES["local"]["model.h"]
  assert unit.from_unit(unit.to_unit(0.3, 0.2), 0.2) == pytest.approx(0.3)


def test_tpe_sweep_on_cora_records_the_sampler(data_dir, tmp_path,
                                               monkeypatch):
  monkeypatch.setattr(sweep, "TPE_STARTUP_TRIALS", 1)
  config = _tiny_config(data_dir, "cora,sym,fp", num_epochs=2)
  best = sweep.run_sweep(config, str(tmp_path), trials=2, space="dropout",
                         verbose=False, sampler="tpe")
  winner = json.loads((tmp_path / "best_config.json").read_text())
  assert winner["sampler"] == "tpe" and winner["trial"] == best["trial"]
  assert (tmp_path / "sweep.md").read_text().startswith("TPE search, 2 trials")
  # resuming proposes the same second trial from the stored first one
  again = sweep.run_sweep(config, str(tmp_path), trials=2, space="dropout",
                          verbose=False, sampler="tpe")
  assert again == best
  with pytest.raises(ValueError, match=r"unknown sampler \(--sampler = "
                     r".grid.; allowed: .random., .tpe.\)"):
    sweep.run_sweep(config, str(tmp_path), trials=1, sampler="grid")
