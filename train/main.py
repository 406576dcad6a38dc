"""Command-line entry point of every pdeq-jax training program.

    python -m train.main --config=configs/pde_gcn.py:cora,sym,4w4a \
        --workdir=/tmp/run --config.num_epochs=300

``--config`` names a ``get_config(arg)`` file (the text after ':' is passed as
``arg``); ``--config.a.b=v`` overrides a field, and a key the config does not
define fails with an error naming it.  The config's ``task`` picks the trainer.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pdeq_jax import xla_options
from train import cli
from train import common
from train import tasks
from train import validate

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a get_config() file, optionally ':arg'.",
      lock_config=True, flag_values=flag_values)
  flags.DEFINE_string("workdir", None,
                      "Directory for checkpoints, metrics and plots.",
                      flag_values=flag_values)


def main(argv):
  # before any JAX computation; only with PDEQ_JAX_KEEP_HOST_MEMORY=1: the
  # step's freed buffers are reused, not unmapped and faulted in every step
  xla_options.keep_freed_host_memory()
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  for name in ("config", "workdir"):
    if FLAGS[name].value is None:
      raise ValueError(f"--{name} is required")
  config = FLAGS.config
  if config.get("distributed", False) or common.ENV_COORDINATOR in os.environ:
    # before any JAX call (validation counts the devices of all processes)
    common.initialize_distributed()
  validate.config(config)  # before anything is written
  logging.info("devices: %s", jax.devices())
  tasks.trainer_for(config.task).train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
