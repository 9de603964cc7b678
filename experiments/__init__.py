"""The application around lrcr: data, training, figures, benchmarks."""

import sys

from absl import app
from absl import flags
from absl import logging

_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def exit_on_help(argv) -> None:
  """Where argv asks for help: absl prints it, and the exit status is 0
  (absl's own is 1; asking for help succeeded)."""
  if any(arg in _HELP for arg in argv[1:]):
    try:
      flags.FLAGS(argv)
    finally:
      sys.exit(0)


def quiet_logs() -> None:
  """INFO logs off unless --verbosity is given: orbax writes about 40 lines
  per checkpoint (--verbosity=0 shows them); warnings and errors stay."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_flags(argv):
  """absl's flag parsing, with `exit_on_help`."""
  exit_on_help(argv)
  return app.parse_flags_with_usage(argv)


def run(main) -> None:
  """`absl.app.run(main)` for the application's commands."""
  app.run(main, flags_parser=parse_flags)
