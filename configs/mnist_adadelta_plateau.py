"""python -m experiments.train --config=configs/mnist_adadelta_plateau.py --workdir=runs/mnist_adadelta_plateau

Fig. 5: CR on Adadelta started on a plateau.

MNIST, Adadelta lr 1.0, sigma 1000, weights ~ U(-0.1, 0.1).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The Fig. 5 run: adadelta vs adadelta+CR, lr 1, sigma 1000."""
  config = base.get_base_config()
  config.name = "mnist_adadelta_plateau"
  config.figure = "Fig. 5"
  config.claim_kind = "plateau_adaptive"
  config.data.name = "mnist"
  config.model.init_scale = 0.1
  config.optimizer.name = "adadelta"
  config.optimizer.learning_rate = 1.0
  config.optimizer.sigma = 1000.0
  return config
