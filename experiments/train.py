"""Trains a base optimizer and base+CR side by side for one config.

    python -m experiments.train --config=configs/mnist.py:fig2 \
        --workdir=runs/fig2 [--config.optimizer.sigma=1000 ...]

This file is intentionally kept short. The work happens in
`experiments.train_lib.train_and_evaluate`; the workdir receives config.json,
metrics.jsonl, checkpoints/, figure.png and summary.json. Rerunning the same
command resumes from the last checkpoint.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import train_lib

FLAGS = flags.FLAGS

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for the run's files (resumable).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host: TPU pod slices, "
    "several GPU hosts), so the data-parallel mesh spans every host.")
config_flags.DEFINE_config_file(
    "config", None, "Run configuration, e.g. configs/mnist.py:fig2.",
    lock_config=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("Config:\n%s", FLAGS.config)
  train_lib.train_and_evaluate(FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
