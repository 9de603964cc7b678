"""Every config loads, passes the checks, and has the paper's values."""

import importlib

import pytest

from configs import base
from lrcr import train

# name: (figure, data, optimizer, init scale, base lr, sigma, claim kind)
PAPER = {
    "mnist_sgd": ("Fig. 1", "mnist", "sgd", 0.2, 0.01, 100.0, "no_plateau"),
    "mnist_sgd_plateau": ("Fig. 2", "mnist", "sgd", 0.1, 0.02, 100.0,
                          "plateau"),
    "cifar10_sgd_plateau": ("Fig. 3", "cifar10", "sgd", 0.1, 0.01, 1000.0,
                            "plateau"),
    "mnist_adagrad_plateau": ("Fig. 4", "mnist", "adagrad", 0.1, 0.1, 1000.0,
                              "plateau_adaptive"),
    "mnist_adadelta_plateau": ("Fig. 5", "mnist", "adadelta", 0.1, 1.0,
                               1000.0, "plateau_adaptive"),
    "mnist_adam_plateau": ("§4", "mnist", "adam", 0.1, 0.001, 1000.0,
                           "adam"),
}

INTERFACE_KEYS = (
    "data.source", "data.path", "data.name", "training.num_steps",
    "training.batch_size", "training.chunk_size", "training.nonfinite",
    "training.progress", "optimizer.name", "optimizer.learning_rate",
    "optimizer.sigma", "model.init_scale", "model.depth", "model.width",
    "seed", "name", "figure", "claim_kind")


def _load(name):
  return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("name", [*PAPER, "test"])
def test_config_loads_and_passes_the_checks(name):
  module = _load(name)
  config = module.get_config()
  for key in INTERFACE_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]
  train.validate_config(config)
  assert config.name == name
  assert module.__doc__.startswith(
      f"python -m experiments.train --config=configs/{name}.py --workdir=")


@pytest.mark.parametrize("name", PAPER)
def test_paper_values(name):
  config = _load(name).get_config()
  figure, data, optimizer, init, lr, sigma, claim = PAPER[name]
  assert (config.figure, config.data.name, config.optimizer.name,
          config.model.init_scale, config.optimizer.learning_rate,
          config.optimizer.sigma, config.claim_kind) == (
              figure, data, optimizer, init, lr, sigma, claim)


@pytest.mark.parametrize("name", PAPER)
def test_appendix_a_settings(name):
  config = _load(name).get_config()
  assert (config.model.depth, config.model.width) == (12, 128)
  assert config.model.use_bias is False
  assert config.training.batch_size == 32
  assert config.training.num_steps == 3000
  assert (config.optimizer.decay_steps, config.optimizer.decay_rate,
          config.optimizer.decay_staircase) == (100, 0.95, False)
  assert config.data.source == "auto"
  assert config.training.nonfinite in train.NONFINITE_POLICIES
  assert config.training.progress is True


def test_test_config_is_tiny():
  config = _load("test").get_config()
  assert (config.model.depth, config.model.width) == (2, 16)
  assert (config.training.num_steps, config.training.batch_size,
          config.training.chunk_size) == (40, 8, 10)
  assert config.training.progress is False


def test_base_config_is_appendix_a():
  config = base.get_base_config()
  assert config.training.inject_nan_at_step == -1
  assert config.data.path == ""
