"""Kill-at-random fault injection (issue 23): a GCN run and an image run are
SIGKILLed 5 times each at random moments (fixed seed) while training, and
restarted; the final results, metrics and checkpoint equal an uninterrupted
run's bit for bit.  The uninterrupted run and the last restart run
in-process through the same command line (``train.cli.invoke``); the killed
attempts are ``python -m train.main`` subprocesses sharing the persistent
XLA cache.  ``python -m benchmarks.kill_resume`` is the longer version.
"""

import pathlib

import jax
import pytest

from benchmarks import kill_resume
from tests.test_bad_inputs import run_program

KILLS = 5


def _in_process(args, workdir: pathlib.Path) -> None:
  status, err = run_program("train.main", [*args, f"--workdir={workdir}"])
  assert status == 0, err


def _kill_test(args, tmp_path, seed: int, max_lines: int):
  xla_cache = jax.config.jax_compilation_cache_dir
  _in_process(args, tmp_path / "reference")
  killed = tmp_path / "killed"
  log = kill_resume.kill_and_restart(
      args, killed, kills=KILLS, seed=seed, max_lines=max_lines,
      xla_cache=xla_cache, finish=lambda: _in_process(args, killed))
  assert log["kills"] == KILLS, log
  diffs = kill_resume.compare(kill_resume.final_state(tmp_path / "reference"),
                              kill_resume.final_state(killed))
  assert not diffs, (diffs, log)
  return log


def test_gcn_survives_random_kills(tmp_path, data_dir):
  # 80 epochs = 80 metrics lines; kills within 5 x 10 lines of progress
  args = kill_resume.gcn_command(str(data_dir / "planetoid"), epochs=80)
  _kill_test(args, tmp_path, seed=0, max_lines=10)


def test_image_trainer_survives_random_kills(tmp_path):
  root = kill_resume.write_image_folder(tmp_path / "images")
  # 12 epochs of 4 steps = 36 metrics lines; kills within 5 x 5 lines
  args = kill_resume.image_command(str(root), str(tmp_path / "cache"),
                                   epochs=12)
  _kill_test(args, tmp_path, seed=1, max_lines=5)


def test_atomic_write_leaves_the_old_or_the_new_file(tmp_path, monkeypatch):
  """results.json, best_config.json, sweep tables and reports go through
  common.write_text: a failure (or kill) before the rename leaves the old
  file whole and no temporary behind."""
  import os  # pylint: disable=import-outside-toplevel
  from train import common  # pylint: disable=import-outside-toplevel
  path = tmp_path / "results.json"
  common.write_json(path, {"test_acc": 0.5})

  def killed(src, dst):
    raise KeyboardInterrupt("killed before the rename")
  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    common.write_json(path, {"test_acc": 0.9})
  monkeypatch.undo()
  assert path.read_text() == '{\n  "test_acc": 0.5\n}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
  common.write_text(tmp_path / "sweep.md", "table\n")
  assert (tmp_path / "sweep.md").read_text() == "table\n"
