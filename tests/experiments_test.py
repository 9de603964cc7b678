"""Smoke tests of the command-line entry points, run as subprocesses."""

import json
import os
import subprocess
import sys

import pytest

from experiments import summary as summary_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_train_cli_with_overrides(tmp_path):
  workdir = tmp_path / "run"
  _run("experiments.train", "--config=configs/test.py",
       f"--workdir={workdir}", "--config.optimizer.sigma=1000",
       "--config.training.num_steps=20", "--config.data.source=mnist_5k")
  records = summary_lib.read_metrics(workdir / "metrics.jsonl")
  assert len(records) == 20
  with open(workdir / "config.json", encoding="utf-8") as f:
    config = json.load(f)
  assert config["optimizer"]["sigma"] == 1000.0
  assert config["training"]["num_steps"] == 20
  for name in ("figure.png", "summary.json", "checkpoints"):
    assert (workdir / name).exists(), name


def test_train_cli_requires_a_workdir():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/test.py"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0 and "workdir" in proc.stderr


def test_reproduce_cli(tmp_path):
  _run("experiments.reproduce", f"--workdir={tmp_path}", "--steps=20",
       "--only=mnist_sgd_plateau,cifar10_sgd_plateau",
       "--data_source=mnist_5k", "--progress=false",
       f"--cifar10_path={tmp_path / 'no_cifar_here'}")
  summary_md = (tmp_path / "summary.md").read_text(encoding="utf-8")
  assert "python -m experiments.reproduce" in summary_md
  assert "Total wall time" in summary_md and "Date:" in summary_md
  assert "| mnist_sgd_plateau | Fig. 2 | mnist_5k" in summary_md
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    report = json.load(f)
  rows = {row["run"]: row for row in report["runs"]}
  assert rows["mnist_sgd_plateau"]["status"] == "ok"
  assert rows["mnist_sgd_plateau"]["num_steps"] == 20
  assert (tmp_path / "overview.png").exists()
  assert (tmp_path / "mnist_sgd_plateau" / "figure.png").exists()
  # CIFAR-10 is not packaged: without TFDS data it is listed as not run, and
  # never replaced by MNIST.
  # (--cifar10_path points at an empty place, so this holds with a network.)
  cifar = rows["cifar10_sgd_plateau"]
  assert cifar["status"] == "not run"
  assert "CIFAR-10 data not available: pass --cifar10_path=" in summary_md
  assert not (tmp_path / "cifar10_sgd_plateau" / "metrics.jsonl").exists()


def test_benchmark_cli_uses_absl_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", "--nosuch_flag"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0 and "Unknown command line flag" in proc.stderr


@pytest.mark.parametrize("flag", ["--only=mnist_nope", "--set=model.depth"])
def test_reproduce_rejects_bad_flags(tmp_path, flag):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--workdir={tmp_path}",
       flag, "--steps=1"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
