"""experiments.train as a user runs it: real processes on one workdir.

Issue 21 (a second process during a run, a clean error, a float32 refusal)
and issue 20 (Ctrl-C, --help, quiet logs), through the command line.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from configs import test as test_config
from experiments import train_lib
from tests.input_pipeline_test import random_mnist, write_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, CHUNK = 300, 20       # long enough for a second process to start


def _command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.train",
          "--config=configs/test.py", f"--workdir={workdir}",
          "--config.data.source=files", f"--config.data.path={data_dir}",
          f"--config.training.num_steps={NUM_STEPS}",
          f"--config.training.chunk_size={CHUNK}", *extra]


_ENV = dict(os.environ)


def _start(workdir, data_dir, *extra):
  return subprocess.Popen(_command(workdir, data_dir, *extra), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_ENV)


def _wait_for(predicate, proc, timeout=120):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _metrics(workdir):
  with open(os.path.join(workdir, train_lib.METRICS_FILE),
            encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory):
  """(data dir, workdir) of the run trained alone, in this process."""
  data_dir = tmp_path_factory.mktemp("data")
  write_mnist(data_dir, "train", *random_mnist(64, 7))
  config = test_config.get_config()
  config.update_from_flattened_dict({
      "data.source": "files", "data.path": str(data_dir),
      "training.num_steps": NUM_STEPS, "training.chunk_size": CHUNK})
  workdir = tmp_path_factory.mktemp("lone")
  train_lib.train_and_evaluate(config, str(workdir))
  # The processes share a compilation cache (the session's, from conftest.py,
  # which holds this run's programs): the second compiles nothing.
  if not _ENV.get("JAX_COMPILATION_CACHE_DIR"):
    _ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
  return str(data_dir), str(workdir), config


def test_a_second_process_is_refused_and_the_first_is_untouched(
    lone_run, tmp_path):
  data_dir, lone, _ = lone_run
  workdir = str(tmp_path / "run")
  lock = os.path.join(workdir, ".lock")
  first = _start(workdir, data_dir)
  _wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock), first)
  second = subprocess.run(_command(workdir, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert first.poll() is None, "the first run ended before the check"
  assert second.returncode == 1, second.stderr
  assert (f"WorkdirInUseError: --workdir={workdir} is in use by another run "
          f"(pid {first.pid} on host") in second.stderr
  assert "Traceback" not in second.stderr
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert _metrics(workdir) == _metrics(lone)
  # The output is the data line, the final line, and no logs.
  lines = out.splitlines()
  assert lines[0].startswith("input_pipeline: using files")
  assert lines[-1].startswith(f"test: trained steps 0..{NUM_STEPS - 1} of 1 ")
  assert err == "", err


def test_ctrl_c_stops_at_once_and_the_run_resumes(lone_run, tmp_path):
  data_dir, lone, config = lone_run
  workdir = str(tmp_path / "run")
  proc = _start(workdir, data_dir)
  metrics = os.path.join(workdir, train_lib.METRICS_FILE)
  _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics),
            proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130, err
  assert "Interrupted" in err and "rerun the same command" in err
  assert "Traceback" not in err and "Exception ignored" not in err
  stopped = _metrics(workdir).count("\n")
  assert 0 < stopped < NUM_STEPS
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["resumed_from_step"] == stopped
  assert _metrics(workdir) == _metrics(lone)


def test_mistakes_end_in_one_message_before_anything_is_written(
    lone_run, tmp_path):
  data_dir, lone, _ = lone_run
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      _command(workdir, data_dir, "--config.optimizer.learning_rate=1e-50"),
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert "learning_rate=1e-50: rounds to 0 in float32" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(workdir)
  # A config.json edited by hand: refused by name, without orbax's event
  # loop tracebacks.
  path = os.path.join(lone, train_lib.CONFIG_FILE)
  with open(path, encoding="utf-8") as f:
    saved = f.read()
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write(saved.replace('"batch_size": 8', '"batch_size": 16'))
    proc = subprocess.run(_command(lone, data_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  finally:
    with open(path, "w", encoding="utf-8") as f:
      f.write(saved)
  assert proc.returncode == 1
  assert "config.json: disagrees with the config the checkpoints" in \
      proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr


@pytest.mark.parametrize("command, flag", [
    ("train", "--workdir"), ("reproduce", "--workdir"),
    ("benchmark", "--repeats"), ("device_check", "--sections")])
def test_help_exits_0(command, flag):
  """absl exits 1 after printing the help; every command exits 0."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{command}",
                         "--help"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert flag in proc.stdout + proc.stderr
