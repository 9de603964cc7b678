"""python -m experiments.train --config=configs/test.py --workdir=/tmp/lrcr_test

A tiny run for the tests: Fig. 2's run (`configs/paper.py:mnist_sgd_plateau`)
on a 2x16 net, 40 steps of batch 8 in chunks of 10, no progress bar (the
tests point it at mock or packaged data).
"""

import ml_collections

from configs import paper


def get_config() -> ml_collections.ConfigDict:
  """The tiny test run: SGD vs SGD+CR on a plateau-style init."""
  config = paper.get_config("mnist_sgd_plateau")
  config.name = config.figure = "test"
  config.model.depth, config.model.width = 2, 16
  config.training.num_steps = 40
  config.training.batch_size = 8
  config.training.chunk_size = 10
  config.training.progress = False
  return config
