"""Trains a model: `python -m attnres_jax.main --config=configs/block.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.model.block_size=4`.
Rerunning the same command on the same workdir resumes from its latest checkpoint.
Multi-host: run the same command on every host with `--config.distributed.initialize`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from attnres_jax import cli
from attnres_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(distributed) -> None:
  """`jax.distributed.initialize` from the config; empty fields come from the environment (TPU, SLURM)."""
  jax.distributed.initialize(
      coordinator_address=distributed.coordinator_address or None,
      num_processes=distributed.num_processes or None,
      process_id=distributed.process_id if distributed.process_id >= 0 else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  if config.distributed.initialize:
    initialize_distributed(config.distributed)
  print(f"process {jax.process_index()} of {jax.process_count()}, devices: {jax.devices()}", flush=True)
  train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
