"""python -m experiments.train --config=configs/mnist_sgd_plateau.py --workdir=runs/mnist_sgd_plateau

Fig. 2: CR on SGD started on a plateau.

MNIST, SGD lr 0.02, sigma 100, weights ~ U(-0.1, 0.1).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The Fig. 2 run: sgd vs sgd+CR, lr 0.02, sigma 100."""
  config = base.get_base_config()
  config.name = "mnist_sgd_plateau"
  config.figure = "Fig. 2"
  config.claim_kind = "plateau"
  config.data.name = "mnist"
  config.model.init_scale = 0.1
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.02
  config.optimizer.sigma = 100.0
  return config
