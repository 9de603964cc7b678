"""One XLA compilation cache for the whole test session.

Many tests compile the very same program: every `train_and_evaluate` of the
tiny config compiles the same chunk step, the command-line tests compile
what the in-process tests compiled, and the pytest-xdist workers each compile
what the other did. JAX's persistent compilation cache, pointed at one
directory made for this session (and removed after it), compiles each such
program once: the tests still trace and lower everything, and what runs is
the executable XLA built for that very program. The directory reaches the
xdist workers and the tests' subprocesses through the environment, set here
before either starts. A cache directory already set by the caller is used
as it is, and left in place.
"""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Programs that compile faster than this are compiled again: writing and
# reading the cache entry would cost about as much.
_MIN_COMPILE_S = "0.2"
_made = []


def pytest_configure(config):
  """Sets the session's cache directory (in the controller, or alone)."""
  if hasattr(config, "workerinput") or os.environ.get(_CACHE_ENV):
    return       # an xdist worker inherits the controller's environment
  directory = tempfile.mkdtemp(prefix="lrcr_tests_xla_cache_")
  _made.append(directory)
  os.environ[_CACHE_ENV] = directory
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        _MIN_COMPILE_S)
  if "jax" in sys.modules:     # imported already: its config read the env
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ[
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  """Removes the directory made by pytest_configure."""
  del config
  while _made:
    shutil.rmtree(_made.pop(), ignore_errors=True)
