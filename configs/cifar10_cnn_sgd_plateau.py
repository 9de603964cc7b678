"""python -m experiments.train --config=configs/cifar10_cnn_sgd_plateau.py --workdir=runs/cifar10_cnn --config.data.source=files --config.data.path=/path/to/cifar-10-batches-py

Beyond the paper (appendix B.2): a small CNN on CIFAR-10, SGD against SGD+CR,
from a plateau initialization. Four 3x3 conv layers (16, 16, 32, 32 channels,
max pooling after the second and the fourth) and two dense layers (64, then
the 10 logits), ReLU, no biases, weights ~ U(-0.05, 0.05)
(`experiments.models.CNN`). SGD lr 0.01, sigma 1000.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The CIFAR-10 CNN run."""
  config = base.get_base_config()
  config.name, config.figure = "cifar10_cnn_sgd_plateau", "B.2 CNN"
  config.data.name = "cifar10"
  config.model.kind = "cnn"
  config.model.conv_features = (16, 16, 32, 32)
  config.model.pool_after = (1, 3)     # a 2x2 max pool after these convs
  config.model.dense_features = (64,)
  config.model.input_shape = (32, 32, 3)
  config.model.init_scale = 0.05
  config.optimizer.sigma = 1000.0
  # XLA on CPUs runs convolutions inside a loop ~15x slower: unroll chunks.
  config.training.chunk_size = 10
  config.training.scan_unroll = True
  return config
