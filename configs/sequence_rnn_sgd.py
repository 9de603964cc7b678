"""python -m experiments.train --config=configs/sequence_rnn_sgd.py --workdir=runs/sequence_rnn

Beyond the paper (appendix B.2): a recurrent classifier on sequential MNIST
rows. Each image is a sequence of 28 rows of 28 pixels fed to
v_t = tanh(v_{t-1} W + x_t V + b) (eq. 58, weights shared over time) with 64
units; the logits read the last state. SGD against SGD+CR; the curvature goes
through the exact low-rank engine for recurrent layers (lrcr.nets).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The sequential-MNIST RNN run: sgd vs sgd+CR, lr 0.05, sigma 100."""
  config = base.get_base_config()
  config.name = "sequence_rnn_sgd"
  config.figure = "B.2 RNN"
  config.claim_kind = ""
  config.data.name = "mnist"
  config.model.kind = "sequential"
  config.model.layers = "recurrent:64"
  config.model.activation = "tanh"
  config.model.use_bias = True
  config.model.input_shape = (28, 28)
  config.model.init_scale = 0.1
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.sigma = 100.0
  return config
