"""The test session's XLA settings: cheap compilation, compiled once.

Most of the suite's time is XLA compiling small programs, so the session
sets two things before any test (or pytest-xdist worker, or a test's
subprocess, all of which inherit the environment) starts JAX:

* XLA's CPU backend compiles without LLVM's expensive optimizations
  (`--xla_backend_optimization_level=0`,
  `--xla_llvm_disable_expensive_passes=true`). The HLO passes, and so the
  kernels, flops and buffers the tests count, are the same; the machine code
  is less tuned, and no test times anything.
* One JAX persistent compilation cache for the session, in a fresh
  directory removed after it, with one subdirectory per pytest-xdist
  worker. Many tests compile the very same program (every
  `train_and_evaluate` of the tiny config compiles the same chunk step; the
  command-line tests compile what the in-process tests did): each is
  compiled once per worker. A worker and the subprocesses its tests start
  (which it waits for) share its subdirectory; two workers never do, since
  JAX writes a cache entry without a lock and a reader could meet it half
  written. The tests still trace and lower everything, and run the
  executable XLA built for that very program.

What the caller set already (its own XLA_FLAGS entries, a cache directory)
is kept as it is.
"""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_ENV = "LRCR_TESTS_XLA_CACHE"      # the session's directory, if made here
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
# Programs that compile faster than this are compiled again: writing and
# reading the cache entry would cost about as much.
_MIN_COMPILE_S = "0.2"
_FAST_COMPILE = ("--xla_backend_optimization_level=0",
                 "--xla_llvm_disable_expensive_passes=true")
_made = []


def pytest_configure(config):
  """Sets the session's environment (in the xdist controller, or alone);
  in an xdist worker, which inherits it, the worker's own cache directory."""
  if hasattr(config, "workerinput"):
    if root := os.environ.get(_OWN_ENV):
      directory = os.path.join(root, config.workerinput["workerid"])
      os.makedirs(directory, exist_ok=True)
      _use_cache(directory)
    return
  flags = os.environ.get("XLA_FLAGS", "").split()
  own = {f.split("=")[0] for f in flags}
  os.environ["XLA_FLAGS"] = " ".join(
      flags + [f for f in _FAST_COMPILE if f.split("=")[0] not in own])
  os.environ.setdefault(_MIN_COMPILE_ENV, _MIN_COMPILE_S)
  if not os.environ.get(_CACHE_ENV):
    directory = tempfile.mkdtemp(prefix="lrcr_tests_xla_cache_")
    _made.append(directory)
    os.environ[_OWN_ENV] = directory       # the workers' subdirectories
    _use_cache(directory)
  else:
    _use_cache(os.environ[_CACHE_ENV])


def _use_cache(directory):
  """JAX's persistent cache in `directory`, for this process and its
  subprocesses."""
  os.environ[_CACHE_ENV] = directory
  if "jax" in sys.modules:     # imported by a plugin: its config read the env
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ[_MIN_COMPILE_ENV]))


def pytest_unconfigure(config):
  """Removes the cache directory made by pytest_configure."""
  del config
  while _made:
    shutil.rmtree(_made.pop(), ignore_errors=True)
