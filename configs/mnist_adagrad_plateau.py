"""python -m experiments.train --config=configs/mnist_adagrad_plateau.py --workdir=runs/mnist_adagrad_plateau

Fig. 4: CR on Adagrad started on a plateau.

MNIST, Adagrad lr 0.1, sigma 1000, weights ~ U(-0.1, 0.1).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The Fig. 4 run: adagrad vs adagrad+CR, lr 0.1, sigma 1000."""
  config = base.get_base_config()
  config.name = "mnist_adagrad_plateau"
  config.figure = "Fig. 4"
  config.claim_kind = "plateau_adaptive"
  config.data.name = "mnist"
  config.model.init_scale = 0.1
  config.optimizer.name = "adagrad"
  config.optimizer.learning_rate = 0.1
  config.optimizer.sigma = 1000.0
  return config
