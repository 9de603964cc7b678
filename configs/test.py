"""python -m experiments.train --config=configs/test.py --workdir=/tmp/lrcr_test

A tiny run for the tests: a 2x16 net, 40 steps of batch 8 in chunks of 10,
MNIST (the tests point it at mock or packaged data), no progress bar.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The tiny test run: SGD vs SGD+CR on a plateau-style init."""
  config = base.get_base_config()
  config.name = "test"
  config.figure = "test"
  config.claim_kind = "plateau"
  config.data.name = "mnist"
  config.data.source = "auto"
  config.model.depth = 2
  config.model.width = 16
  config.model.init_scale = 0.1
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.02
  config.optimizer.sigma = 100.0
  config.training.num_steps = 40
  config.training.batch_size = 8
  config.training.chunk_size = 10
  config.training.progress = False
  return config
