"""python -m experiments.train --config=configs/mnist_adam_plateau.py --workdir=runs/mnist_adam_plateau

§4: CR on Adam started on a plateau gives no gain.

MNIST, Adam lr 0.001, sigma 1000, weights ~ U(-0.1, 0.1).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The §4 run: adam vs adam+CR, lr 0.001, sigma 1000."""
  config = base.get_base_config()
  config.name = "mnist_adam_plateau"
  config.figure = "§4"
  config.claim_kind = "adam"
  config.data.name = "mnist"
  config.model.init_scale = 0.1
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.001
  config.optimizer.sigma = 1000.0
  return config
