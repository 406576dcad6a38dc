"""Fault injection: SIGKILL a training run at random moments, restart it, and
check that it ends bit for bit like an uninterrupted run.

    python -m benchmarks.kill_resume --trainer=gcn --kills=20 --seed=0
    python -m benchmarks.kill_resume --trainer=image --kills=20 --seed=0

For each trainer a small run is started as ``python -m train.main`` in a
fresh workdir and killed (SIGKILL) at a random moment (see
:func:`kill_and_restart`; numpy generator seeded by ``--seed``), then
restarted, ``--kills`` times; a last restart runs to the end.  The final
``results.json`` (all but the timing entries), ``metrics.jsonl`` and every
array of the final checkpoint must equal those of an uninterrupted run of the
same command.

``tests/test_kill_resume.py`` runs this with 5 kills per trainer on tiny
configs; this script is the longer version.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("train_seconds_this_call", "epochs_per_second",
               "images_per_second", "steps_this_call", "wall_seconds")


def gcn_command(data_dir: str, epochs: int = 300) -> List[str]:
  """A tiny PDE-GCN run on Cora (4W4A, gradual 6 -> 4 bits)."""
  return ["--config=configs/pde_gcn.py:cora,sym,4w4a",
          f"--config.data.data_dir={data_dir}",
          "--config.model.depth=2", "--config.model.width=8",
          f"--config.num_epochs={epochs}", "--config.patience=0",
          "--config.checkpoint_every=7", "--config.quant.gradual=True",
          "--config.quant.start_bits=6", "--config.quant.epochs_per_step=20"]


def image_command(root: str, cache_dir: str, epochs: int = 4) -> List[str]:
  """A tiny ResNet-8 run on an ImageFolder tree (4W4A, gradual 5 -> 4)."""
  return [f"--config=configs/cifar.py:resnet8,imagefolder:{root},4w4a",
          f"--config.data.cache_dir={cache_dir}",
          f"--config.num_epochs={epochs}", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.log_every_steps=2",
          "--config.checkpoint_every_steps=3", "--config.progress_every_s=1e9",
          "--config.quant.start_bits=5", "--config.quant.epochs_per_step=2",
          "--config.data.augment=True", "--config.data.prefetch=2",
          "--config.consistency.max_examples=0"]


def write_image_folder(root: pathlib.Path, per_class_train: int = 20,
                       per_class_test: int = 6, hw: int = 8,
                       num_classes: int = 2, seed: int = 0) -> pathlib.Path:
  """A small PNG ImageFolder tree whose classes differ in mean colour."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for split, n in (("train", per_class_train), ("test", per_class_test)):
    for c in range(num_classes):
      d = root / split / f"class{c}"
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        pixels = rng.integers(0, 120, (hw, hw, 3)) + 100 * c
        Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i:03d}.png")
  return root


def _env(xla_cache: Optional[str]) -> Dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED="0")
  if xla_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=xla_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _metric_lines(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_bytes().splitlines()) if path.exists() else 0


def run_to_end(args: Sequence[str], workdir: pathlib.Path,
               xla_cache: Optional[str] = None, timeout: float = 600) -> None:
  proc = subprocess.run(
      [sys.executable, "-m", "train.main", *args, f"--workdir={workdir}"],
      cwd=REPO_ROOT, env=_env(xla_cache), capture_output=True, text=True,
      timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"run failed ({proc.returncode}): {proc.stderr[-3000:]}")


def kill_and_restart(args: Sequence[str], workdir: pathlib.Path, *,
                     kills: int, seed: int, max_lines: int,
                     max_jitter: float = 0.05,
                     xla_cache: Optional[str] = None,
                     timeout: float = 600,
                     finish: Optional[Callable[[], None]] = None
                     ) -> Dict[str, Any]:
  """Starts, kills at random moments ``kills`` times, then finishes the run
  (``finish()``, else one more ``python -m train.main``).

  The moment of each kill is drawn from a numpy generator seeded by
  ``seed``: once the attempt has logged ``k`` metrics lines beyond those of
  the previous attempts (``k`` uniform in ``[1, max_lines]``; a point in the
  training progress, whatever the machine's speed), plus a delay uniform in
  ``[0, max_jitter]`` seconds, so that the kill lands anywhere: in a step,
  an evaluation, a checkpoint or a metrics write.

  Returns the kill log: for each attempt the draws, whether the process was
  killed (it may finish first) and the metrics lines before/after.
  """
  rng = np.random.default_rng(seed)
  cmd = [sys.executable, "-m", "train.main", *args, f"--workdir={workdir}"]
  log = []
  killed = 0
  attempts = 0
  while killed < kills and attempts < 3 * kills:
    attempts += 1
    ahead = int(rng.integers(1, max_lines + 1))
    jitter = float(rng.uniform(0.0, max_jitter))
    before = _metric_lines(workdir)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(xla_cache),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while (proc.poll() is None and _metric_lines(workdir) < before + ahead
           and time.monotonic() - t0 < timeout):
      time.sleep(0.002)
    if proc.poll() is None:
      time.sleep(jitter)
    finished = proc.poll() is not None
    if not finished:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
    if finished and proc.returncode != 0:
      raise RuntimeError(f"attempt {attempts} failed with status "
                         f"{proc.returncode}")
    killed += not finished
    log.append({"lines_ahead": ahead, "jitter_s": jitter,
                "killed": not finished, "metric_lines_before": before,
                "metric_lines_after": _metric_lines(workdir)})
    if finished:
      break  # the run ended before the kill: nothing left to interrupt
  if finish is None:
    run_to_end(args, workdir, xla_cache, timeout)
  else:
    finish()
  return {"kills": killed, "attempts": log}


def final_state(workdir: pathlib.Path) -> Dict[str, Any]:
  """results.json and metrics lines without timings, final checkpoint arrays."""
  from train import common  # pylint: disable=import-outside-toplevel
  results = json.loads((workdir / "results.json").read_text())
  for key in TIMING_KEYS:
    results.pop(key, None)
  ckpt = common.Checkpointer(workdir / "checkpoints")
  step = ckpt.latest_step()
  tree = ckpt.restore_raw()
  ckpt.close()
  import jax  # pylint: disable=import-outside-toplevel
  leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}
  metrics = [{k: v for k, v in line.items() if k not in TIMING_KEYS}
             for line in common.MetricWriter(workdir).read()]
  return {"results": results, "metrics": metrics,
          "step": step, "arrays": leaves}


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
  """Differences between two :func:`final_state` (empty: bit for bit)."""
  diffs = []
  if a["results"] != b["results"]:
    keys = sorted(k for k in set(a["results"]) | set(b["results"])
                  if a["results"].get(k) != b["results"].get(k))
    diffs.append(f"results differ in {keys}")
  if a["metrics"] != b["metrics"]:
    diffs.append("metrics.jsonl differs")
  if a["step"] != b["step"]:
    diffs.append(f"final checkpoint step {a['step']} vs {b['step']}")
  if set(a["arrays"]) != set(b["arrays"]):
    diffs.append("checkpoint trees differ")
  else:
    for key, x in a["arrays"].items():
      y = b["arrays"][key]
      if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
        diffs.append(f"checkpoint array {key} differs")
  return diffs


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trainer", choices=("gcn", "image"), default="gcn")
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_lines", type=int, default=None,
                      help="metrics lines of progress before a kill (default:"
                      " a fifth of the run's lines per kill)")
  parser.add_argument("--max_jitter", type=float, default=0.05)
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--data_dir", default=os.environ.get(
      "PDEQ_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data")))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if args.trainer == "gcn":
      epochs = args.epochs or 40 * args.kills
      cmd = gcn_command(str(pathlib.Path(args.data_dir) / "planetoid"),
                        epochs)
      lines = epochs
    else:
      epochs = args.epochs or 4 * args.kills
      root = write_image_folder(tmp / "images")
      cmd = image_command(str(root), str(tmp / "cache"), epochs)
      lines = 3 * epochs  # 2 training logs and 1 validation per epoch
    max_lines = args.max_lines or max(1, lines // (2 * args.kills))
    xla_cache = str(tmp / "xla")
    t0 = time.perf_counter()
    run_to_end(cmd, tmp / "reference", xla_cache)
    log = kill_and_restart(cmd, tmp / "killed", kills=args.kills,
                           seed=args.seed, max_lines=max_lines,
                           max_jitter=args.max_jitter, xla_cache=xla_cache)
    diffs = compare(final_state(tmp / "reference"), final_state(tmp / "killed"))
    print(json.dumps({"trainer": args.trainer, "kills": log["kills"],
                      "attempts": len(log["attempts"]),
                      "identical": not diffs, "differences": diffs,
                      "seconds": round(time.perf_counter() - t0, 1)}))
  return 0 if not diffs else 1


if __name__ == "__main__":
  sys.exit(main())
