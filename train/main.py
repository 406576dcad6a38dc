"""Command-line entry point of every pdeq-jax training program.

    python -m train.main --config=configs/pde_gcn.py:cora,sym,4w4a \
        --workdir=/tmp/run --config.num_epochs=300

``--config`` names a ``get_config(arg)`` file (the text after ':' is passed as
``arg``); ``--config.a.b=v`` overrides a field, and a key the config does not
define fails with an error naming it.  The config's ``task`` picks the trainer.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from train import common
from train import tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file, optionally ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, metrics and plots.")

def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  flags.mark_flags_as_required(["config", "workdir"])
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  if config.get("distributed", False):
    jax.distributed.initialize()
  logging.info("devices: %s", jax.devices())
  tasks.trainer_for(config.task).train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
