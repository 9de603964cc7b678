"""python -m experiments.train --config=configs/cifar10_sgd_plateau.py --workdir=runs/cifar10_sgd_plateau

Fig. 3: CR on SGD started on a plateau, on CIFAR-10.

CIFAR-10, SGD lr 0.01, sigma 1000, weights ~ U(-0.1, 0.1).

CIFAR-10 is not packaged: without TFDS data, pass the extracted python
version (cifar-10-python.tar.gz) with
    --config.data.source=files --config.data.path=/path/to/cifar-10-batches-py
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The Fig. 3 run: sgd vs sgd+CR, lr 0.01, sigma 1000."""
  config = base.get_base_config()
  config.name = "cifar10_sgd_plateau"
  config.figure = "Fig. 3"
  config.claim_kind = "plateau"
  config.data.name = "cifar10"
  config.model.init_scale = 0.1
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.sigma = 1000.0
  return config
