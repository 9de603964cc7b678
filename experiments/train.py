"""Trains a base optimizer and base+CR side by side for one config.

    python -m experiments.train --config=configs/paper.py:mnist_sgd_plateau \
        --workdir=runs/fig2 [--config.num_seeds=5] [--noprogress] \
        [--config.optimizer.sigma=1000 ...] [--allow_new_data]

Kept short: `experiments.train_lib.train_and_evaluate` does the work. The same
command resumes; Ctrl-C stops at once, resumably. A mistake ends in one
message naming the key or file and the fix (`--verbosity=1`: the traceback;
`--verbosity=0`: INFO logs).
"""

from collections.abc import Sequence
import os
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import experiments
from experiments import train_lib
from experiments import workdir as workdir_lib

FLAGS = flags.FLAGS

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for the run's files (resumable).")
_PROGRESS = flags.DEFINE_bool(
    "progress", True, "Show a progress bar (--noprogress: none; the same as "
    "--config.training.progress=false).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host: TPU pod slices, "
    "several GPU hosts), so the data-parallel mesh spans every host.")
_ALLOW_NEW_DATA = flags.DEFINE_bool(
    "allow_new_data", False,
    "Resume a run on data whose fingerprint differs from the one it trained "
    "on (refused by default); summary.json records the change.")
config_flags.DEFINE_config_file(
    "config", None,
    "Run configuration, e.g. configs/paper.py:mnist_sgd_plateau.",
    lock_config=True)

_EXAMPLE = "--config=configs/paper.py:mnist_sgd_plateau"


def _config_flags(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(flag, value) of every --config / --config.<key> on the command line."""
  found = []
  for i, arg in enumerate(argv):
    flag, sep, value = arg[2:].partition("=")
    if arg.startswith("--") and flag.partition(".")[0] == "config":
      found.append((flag, value if sep or i + 1 == len(argv) else
                    argv[i + 1]))
  return found


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with one short message for each mistake."""
  experiments.exit_on_help(argv)
  specs = [v for f, v in _config_flags(argv) if f == "config"]
  if specs:       # the config file as config_flags loads it, for the checks
    path, _, arg = specs[-1].partition(":")
    if not os.path.isfile(path):
      sys.exit(f"--config={specs[-1]}: no such config file {path!r} (from "
               f"{os.getcwd()}); pass e.g. {_EXAMPLE}.")
    try:
      get_config = runpy.run_path(path)["get_config"]
      defaults = get_config(arg) if arg else get_config()
    except Exception as err:  # pylint: disable=broad-except
      sys.exit(f"--config={specs[-1]}: {type(err).__name__}: {err}")
    for flag, _ in _config_flags(argv):
      if flag != "config":
        message = train_lib.config_key_error(defaults, flag[len("config."):])
        if message:
          sys.exit(message)
  try:
    rest = FLAGS(argv)
    FLAGS.config  # pylint: disable=pointless-statement  (loads it)
  except flags.Error as err:
    sys.exit(f"{err}\nPass --helpfull to list the flags.")
  except Exception as err:  # pylint: disable=broad-except
    while err.__cause__ or err.__context__:
      err = err.__cause__ or err.__context__
    sys.exit(f"Bad --config flag: {type(err).__name__}: {err}")
  return rest


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  # The output is the data line, the progress bar and the final line.
  experiments.quiet_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = FLAGS.config
  if not _PROGRESS.value:
    config.training.progress = False
  logging.debug("Config:\n%s", config)
  try:
    train_lib.train_and_evaluate(config, _WORKDIR.value,
                                 allow_new_data=_ALLOW_NEW_DATA.value)
  except KeyboardInterrupt:
    print(f"Interrupted. {_WORKDIR.value} keeps every completed chunk: rerun "
          "the same command to resume.", file=sys.stderr)
    sys.exit(130)
  except (ValueError, FloatingPointError, OSError,
          workdir_lib.WorkdirInUseError) as err:
    # A mistake in the command or the data, `nonfinite=stop`, a workdir in
    # use, a full disk: the message names the key or the file and the fix.
    logging.debug("Traceback:", exc_info=True)
    sys.exit(f"{type(err).__name__}: {err}\n(--verbosity=1 shows the "
             "traceback.)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
