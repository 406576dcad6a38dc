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
  with pytest.raises(ValueError, match="seeds_per_trial must be >= 1"):
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
