"""Every config trains: its model, optimizers and CR step on its data shape."""

import importlib

import jax
import numpy as np
import pytest

from configs import beyond
from configs import paper
from experiments import models
from experiments import steps
from experiments import train_lib

tfds = pytest.importorskip("tensorflow_datasets")

#: (config module, argument or None) of every run config.
CONFIGS = ([("paper", run) for run in paper.RUNS] +
           [("beyond", f"{run},{variant}")      # each run, each variant once
            for run, variant in zip(beyond.RUNS, beyond.VARIANTS)] +
           [("beyond", "mnist_sgd_plateau,mean_alpha"),
            ("cifar10_cnn_sgd_plateau", None), ("sequence_rnn_sgd", None),
            ("test", None)])

SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def _get(name, arg):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("name, arg", CONFIGS)
def test_config_takes_two_steps(name, arg):
  """The config's own model and CR step, on random data of its shape, shrunk
  to a narrow net so that every config runs in a second or two."""
  config = _get(name, arg)
  train_lib.check_config(config)
  config.model.depth, config.model.width = min(config.model.depth, 2), 8
  if config.model.kind == "cnn":
    config.model.conv_features, config.model.dense_features = (4, 4, 4, 4), (8,)
  shape = tuple(config.model.input_shape) or (int(np.prod(
      SHAPES[config.data.name])),)
  x = jax.random.uniform(jax.random.key(0), (8,) + shape)
  y = np.arange(8) % 10
  model = models.make_model(config.model, 10)
  params = model.init(jax.random.key(1), x[:1])["params"]
  schedule = steps.make_schedule(config.optimizer)
  tx = steps.make_cr_optimizer(config.optimizer, schedule)
  step = jax.jit(steps.applied(steps.make_cr_step(
      model, tx, steps.CROptions.from_config(config.optimizer))))
  state = tx.init(params)
  losses = []
  for _ in range(2):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["cifar10_cnn_sgd_plateau",
                                  "sequence_rnn_sgd"])
def test_conv_and_recurrent_configs_run_the_pipeline(tmp_path, name):
  """The B.2 configs through train_and_evaluate on mock data (tiny layers)."""
  config = _get(name, None)
  config.data.source = "tfds"
  config.training.num_steps = 5
  config.training.chunk_size = 5
  config.training.progress = False
  config.model.width = 8
  if config.model.kind == "cnn":
    config.model.conv_features, config.model.dense_features = (4, 4, 4, 4), (8,)
  with tfds.testing.mock_data(num_examples=64):
    summary = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summary["num_steps"] == 5
  assert np.isfinite(summary["final_loss_cr"])


def test_unknown_runs_are_refused():
  with pytest.raises(ValueError, match="mnist_sgd_plateau"):
    paper.get_config("fig2")
  with pytest.raises(ValueError, match="variant must be one of"):
    beyond.get_config("mnist_sgd_plateau,everything")
