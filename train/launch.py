"""Runs one training on several local processes (multi-process, one machine).

    python -m train.launch --num_processes=2 -- \\
        --config=configs/cifar.py:resnet20,cifar10_jpeg,4w4a --workdir=/tmp/r20

Everything after ``--`` is passed to ``python -m train.main`` unchanged.  Each
process gets ``PDEQ_COORDINATOR_ADDRESS`` (a free loopback port),
``PDEQ_NUM_PROCESSES`` and ``PDEQ_PROCESS_ID``; ``train.main`` then calls
``jax.distributed.initialize`` with them (CPU collectives over gloo), so the
processes form one JAX run with ``jax.process_count() == N``.  Their output is
streamed line by line with a ``[p<i>]`` prefix.

If a process fails (non-zero exit or killed), the others are terminated
(SIGTERM, then SIGKILL after ``--grace_s``) and the launcher exits with the
failed process's code (1 for a signal); a restart resumes from the last
complete checkpoint.  The same training code runs unchanged under a cluster
launcher (SLURM ``srun``, Cloud TPU ``--worker=all``): see the README.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

# Read by train.common.initialize_distributed (stdlib only here: the launcher
# itself never imports JAX).
ENV_COORDINATOR = "PDEQ_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PDEQ_NUM_PROCESSES"
ENV_PROCESS_ID = "PDEQ_PROCESS_ID"


def free_port() -> int:
  """A TCP port free on the loopback interface (asked of the kernel)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m train.launch",
      description="Run train.main on N local processes (jax.distributed).",
      usage="python -m train.launch --num_processes=N [options] -- "
            "<train.main arguments>")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port on 127.0.0.1 (0: a free one)")
  parser.add_argument("--cpu_devices_per_process", type=int, default=0,
                      help="CPU devices per process (XLA_FLAGS "
                      "--xla_force_host_platform_device_count); 0: leave as is")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when the "
                      "others are stopped")
  parser.add_argument("--module", default="train.main",
                      help=argparse.SUPPRESS)  # tests: another entry point
  if "--" in argv:
    split = list(argv).index("--")
    ours, rest = list(argv[:split]), list(argv[split + 1:])
  else:
    ours, rest = list(argv), []
  args = parser.parse_args(ours)
  if args.num_processes < 1:
    parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
  if not 0 <= args.port < 65536:
    parser.error(f"--port must be in [0, 65535], got {args.port}")
  if args.cpu_devices_per_process < 0:
    parser.error("--cpu_devices_per_process must be >= 0, got "
                 f"{args.cpu_devices_per_process}")
  if not rest:
    parser.error("give the train.main arguments after '--', e.g. -- "
                 "--config=configs/cifar.py:resnet20 --workdir=/tmp/run")
  args.rest = rest
  return args


def _env(args: argparse.Namespace, port: int, index: int) -> dict:
  env = dict(os.environ)
  env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[ENV_NUM_PROCESSES] = str(args.num_processes)
  env[ENV_PROCESS_ID] = str(index)
  env["PYTHONUNBUFFERED"] = "1"
  if args.cpu_devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append("--xla_force_host_platform_device_count="
                 f"{args.cpu_devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def _pump(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in iter(proc.stdout.readline, b""):
    with lock:
      sys.stdout.write(prefix + line.decode(errors="replace"))
      sys.stdout.flush()


def _stop(procs: List[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every running process, SIGKILL to those left after
  ``grace_s``."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(argv: Sequence[str]) -> int:
  """Starts the processes, streams their output; the exit code of the run."""
  args = parse_args(argv)
  port = args.port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  log = lambda msg: (sys.stdout.write(f"[launch] {msg}\n"),
                     sys.stdout.flush())
  log(f"{args.num_processes} processes, coordinator 127.0.0.1:{port}")
  for i in range(args.num_processes):
    proc = subprocess.Popen(
        [sys.executable, "-m", args.module, *args.rest], env=_env(args, port, i),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    procs.append(proc)
    log(f"process {i}: pid {proc.pid}")
    pump = threading.Thread(target=_pump, args=(proc, f"[p{i}] ", lock),
                            daemon=True)
    pump.start()
    pumps.append(pump)

  interrupted: List[int] = []
  def on_signal(signum, _frame):
    interrupted.append(signum)
  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT,
                                                  signal.SIGTERM)}
  failed: Optional[int] = None
  try:
    while True:
      codes = [p.poll() for p in procs]
      bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if bad or interrupted:
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.1)
    if interrupted:
      log(f"signal {interrupted[0]}: stopping all processes")
      failed = -1
    elif bad:
      failed = bad[0]
      code = procs[failed].returncode
      how = (f"was killed by signal {-code}" if code < 0
             else f"exited with code {code}")
      log(f"process {failed} {how}; stopping the others "
          f"(SIGTERM, SIGKILL after {args.grace_s:g} s)")
    _stop(procs, args.grace_s)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    _stop(procs, args.grace_s)
    for pump in pumps:
      pump.join(timeout=5)
  if failed is None:
    log("all processes finished")
    return 0
  if failed < 0:
    return 130
  code = procs[failed].returncode
  log("run failed; rerun the same command to resume from the last complete "
      "checkpoint")
  return code if code > 0 else 1


def main() -> None:
  sys.exit(launch(sys.argv[1:]))


if __name__ == "__main__":
  main()
