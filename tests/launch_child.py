"""A stand-in for train.main under train.launch (tests/test_multiprocess.py):
prints what the launcher passed, then behaves as its arguments say."""
import os
import sys
import time

from train import launch as common  # stdlib only: a fast start

index = int(os.environ[common.ENV_PROCESS_ID])
print(f"coordinator {os.environ[common.ENV_COORDINATOR]} processes "
      f"{os.environ[common.ENV_NUM_PROCESSES]} args {sys.argv[1:]}",
      flush=True)
if sys.argv[1] == "fail_1" and index == 1:
  sys.exit(3)
if sys.argv[1] == "fail_1":
  time.sleep(120)  # a process stuck in a collective with a dead peer
