"""Multi-process training for real: two JAX processes on this machine.

``python -m train.launch --num_processes=2`` runs ``train.main`` on two
processes of one CPU device each, joined by ``jax.distributed`` (gloo CPU
collectives on a loopback port).  Its run must equal one process with two
CPU devices (``XLA_FLAGS``) of the same config: losses, accuracies and final
parameters.  A process killed mid-run makes the launcher stop the other in
bounded time, and the rerun resumes from the last complete checkpoint.

Small: Stable ResNet-8 on 16x16 synthetic images, 2 epochs of 4 steps,
4W4A with the gradual schedule (5 bits in epoch 1, 4 in epoch 2).
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from pdeq_jax.data import images as image_data
from train import common

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("images_per_second", "train_seconds_this_call",
               "steps_this_call", "wall_seconds")
# float32 reduction order: the two layouts may sum the two shards' partial
# gradients / statistics in another order (measured: bit-identical so far).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  image_data.make_image_folder(root, {"train": 20, "test": 6},
                               ["a", "b", "c", "d"], image_size=(16, 16))
  return root


def _args(model, root, workdir, cache):
  return [f"--config=configs/cifar.py:{model},imagefolder:{root},4w4a",
          f"--workdir={workdir}", "--config.num_epochs=2",
          "--config.batch_size=16", "--config.eval_batch_size=16",
          "--config.log_every_steps=2", "--config.checkpoint_every_steps=3",
          "--config.quant.start_bits=5", "--config.quant.epochs_per_step=1",
          f"--config.data.cache_dir={cache}", "--config.progress_every_s=1e9"]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # the persistent compilation cache of conftest.py: the resumed run reuses
  # the killed run's compiles
  env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _single_process(args):
  proc = subprocess.run([sys.executable, "-m", "train.main", *args],
                        capture_output=True, text=True, env=_env(2),
                        cwd=REPO_ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _launch(args):
  return subprocess.Popen(
      [sys.executable, "-m", "train.launch", "--num_processes=2",
       "--cpu_devices_per_process=1", "--grace_s=5", "--", *args],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(1), cwd=REPO_ROOT)


def _checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and (d / "commit_success.txt").exists())


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _max_diff(a, b, path=""):
  """Max abs difference of two equal-structure results/metrics values."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), path
    return max([_max_diff(a[k], b[k], f"{path}.{k}") for k in a
                if k not in TIMING_KEYS] or [0.0])
  if isinstance(a, (list, tuple)):
    assert len(a) == len(b), path
    return max([_max_diff(x, y, path) for x, y in zip(a, b)] or [0.0])
  if isinstance(a, (str, bool)) or a is None:
    assert a == b, path
    return 0.0
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=path)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(invalid="ignore"):  # -inf - -inf (no best epoch yet)
    return float(np.max(np.where(a == b, 0.0, np.abs(a - b))))


def _compare_runs(one, two):
  """The 1-process and the 2-process run: every metrics line, results.json
  and the final train state.  Returns the max abs differences."""
  rows = [common.MetricWriter(w, tensorboard=False).read() for w in (one, two)]
  assert len(rows[0]) == len(rows[1]) == 6  # 4 log lines + 2 epoch ends
  metrics = _max_diff(rows[0], rows[1])
  results = [json.loads((pathlib.Path(w) / "results.json").read_text())
             for w in (one, two)]
  assert results[0]["devices"] == results[1]["devices"] == 2
  res = _max_diff(results[0], results[1])
  trees = []
  for w in (one, two):
    ckpt = common.Checkpointer(pathlib.Path(w) / "checkpoints")
    assert ckpt.latest_step() == 8
    trees.append(ckpt.restore_raw()["state"])
    ckpt.close()
  leaves = [jax.tree_util.tree_leaves(t) for t in trees]
  assert len(leaves[0]) == len(leaves[1]) > 0
  params = 0.0
  for x, y in zip(*leaves):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL,
                               atol=ATOL)
    if np.size(x):
      params = max(params, float(np.max(np.abs(
          np.asarray(x, np.float64) - np.asarray(y, np.float64)))))
  return {"metrics": metrics, "results": res, "params": params}


def test_two_processes_equal_one_and_survive_a_kill(image_root, tmp_path):
  model = "stable_resnet8"
  cache = tmp_path / "cache"
  one, two = tmp_path / "one", tmp_path / "two"
  _single_process(_args(model, image_root, one, cache))

  # Two processes; kill process 1 once the step-3 checkpoint is complete.
  launcher = _launch(_args(model, image_root, two, cache))
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(launcher.stdout),
                            daemon=True)
  reader.start()
  deadline = time.monotonic() + 300
  killed_at = None
  while launcher.poll() is None and time.monotonic() < deadline:
    if killed_at is None and _checkpoint_steps(two):
      pids = dict(re.findall(r"\[launch\] process (\d+): pid (\d+)",
                             "".join(lines)))
      os.kill(int(pids["1"]), signal.SIGKILL)
      killed_at = time.monotonic()
    time.sleep(0.05)
  if launcher.poll() is None:
    launcher.kill()
  launcher.wait()
  reader.join(timeout=10)
  output = "".join(lines)
  assert killed_at is not None, output[-3000:]
  assert launcher.returncode == 1, output[-3000:]
  # Stopped in bounded time: the launcher's grace (5 s) plus polling.
  assert time.monotonic() - killed_at < 30, output[-3000:]
  assert "[launch] process 1 was killed by signal 9; stopping the others" \
      in output, output[-3000:]
  assert not _alive(int(pids["0"]))
  assert not (two / "results.json").exists()
  steps = _checkpoint_steps(two)
  assert steps and steps[-1] < 8, steps

  # The rerun resumes from the last complete checkpoint and finishes.
  launcher = _launch(_args(model, image_root, two, cache))
  output, _ = launcher.communicate(timeout=600)
  assert launcher.returncode == 0, output[-3000:]
  assert f"[p0] resumed from {two} at step {steps[-1]}" in output, output
  assert f"[p1] resumed from {two} at step {steps[-1]}" in output, output
  assert "[launch] all processes finished" in output

  diffs = _compare_runs(one, two)
  print(f"max abs differences, 2 processes x 1 device vs 1 x 2: {diffs}")
  # process 0 alone wrote the files: one TensorBoard event file per call
  assert len(list(two.glob("events.out.tfevents.*"))) == 2


def test_two_processes_equal_one_resnet8(image_root, tmp_path):
  """The plain ResNet-8 (no kill): 2 processes x 1 device == 1 x 2."""
  cache = tmp_path / "cache"
  one, two = tmp_path / "one", tmp_path / "two"
  _single_process(_args("resnet8", image_root, one, cache))
  launcher = _launch(_args("resnet8", image_root, two, cache))
  output, _ = launcher.communicate(timeout=600)
  assert launcher.returncode == 0, output[-3000:]
  assert "[launch] all processes finished" in output
  diffs = _compare_runs(one, two)
  print(f"max abs differences, 2 processes x 1 device vs 1 x 2: {diffs}")


def _launch_child(*args):
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "train.launch", "--num_processes=2",
       "--grace_s=2", "--module=tests.launch_child", "--", *args],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
  return proc, time.monotonic() - start


def test_launcher_passes_the_process_env_and_prefixes_output():
  proc, _ = _launch_child("ok", "--workdir=/tmp/x")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  port = re.search(r"coordinator 127\.0\.0\.1:(\d+)", proc.stdout).group(1)
  for i in (0, 1):
    assert (f"[p{i}] coordinator 127.0.0.1:{port} processes 2 args "
            "['ok', '--workdir=/tmp/x']") in proc.stdout, proc.stdout
  assert proc.stdout.rstrip().endswith("[launch] all processes finished")


def test_launcher_stops_the_others_when_one_fails():
  proc, seconds = _launch_child("fail_1")
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert ("[launch] process 1 exited with code 3; stopping the others "
          "(SIGTERM, SIGKILL after 2 s)") in proc.stdout, proc.stdout
  assert seconds < 30  # not the 120 s process 0 would sleep


@pytest.mark.parametrize("args, match", [
    (["--num_processes=0", "--", "x"], "--num_processes must be >= 1, got 0"),
    (["--num_processes=2"], "give the train.main arguments after '--'"),
    (["--num_processes=2", "--port=70000", "--", "x"],
     r"--port must be in \[0, 65535\], got 70000"),
])
def test_launcher_bad_arguments(args, match):
  proc = subprocess.run([sys.executable, "-m", "train.launch", *args],
                        capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=60)
  assert proc.returncode == 2
  assert re.search(match, proc.stderr), proc.stderr
