"""python -m experiments.train --config=configs/mnist_sgd.py --workdir=runs/mnist_sgd

Fig. 1: CR on SGD off any plateau, little to no benefit.

MNIST, SGD lr 0.01, sigma 100, weights ~ U(-0.2, 0.2).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The Fig. 1 run: sgd vs sgd+CR, lr 0.01, sigma 100."""
  config = base.get_base_config()
  config.name = "mnist_sgd"
  config.figure = "Fig. 1"
  config.claim_kind = "no_plateau"
  config.data.name = "mnist"
  config.model.init_scale = 0.2
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.sigma = 100.0
  return config
