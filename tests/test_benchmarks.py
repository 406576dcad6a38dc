"""The benchmark scripts run (JAX side only: torch is not a dependency)."""
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_throughput_runs_without_torch(tmp_path):
  out = tmp_path / "table.md"
  proc = subprocess.run(
      [sys.executable, "benchmarks/train_throughput.py", "--skip_torch",
       "--models", "stable_resnet8", "--batch", "4", "--steps", "1",
       "--rounds", "1", "--warmup", "1", "--check_batch", "0",
       "--skip_memory", "--output", str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = out.read_text()
  assert "| stable_resnet8 | float" in table
  assert "| stable_resnet8 | 4W4A" in table
