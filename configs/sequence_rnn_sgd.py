"""python -m experiments.train --config=configs/sequence_rnn_sgd.py --workdir=runs/sequence_rnn

Beyond the paper (appendix B.2): a recurrent classifier on sequential MNIST
rows. Each image is a sequence of 28 rows of 28 pixels fed to
v_t = tanh(x_t V + b + v_{t-1} W) (eq. 58, weights shared over time) with 64
units; the logits read the last state (`experiments.models.RNN`). SGD lr
0.05, sigma 100.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The sequential-MNIST RNN run."""
  config = base.get_base_config()
  config.name, config.figure, config.claim_kind = (
      "sequence_rnn_sgd", "B.2 RNN", "")
  config.model.kind = "rnn"
  config.model.width = 64             # units of the recurrent state
  config.model.activation = "tanh"
  config.model.use_bias = True
  config.model.input_shape = (28, 28)
  config.optimizer.learning_rate = 0.05
  return config
