"""The paper's runs (section 3.2, appendix A), one argument each.

    python -m experiments.train --config=configs/paper.py:mnist_sgd --workdir=runs/mnist_sgd
    python -m experiments.train --config=configs/paper.py:mnist_sgd_plateau --workdir=runs/fig2
    python -m experiments.train --config=configs/paper.py:cifar10_sgd_plateau --workdir=runs/fig3 \
        --config.data.source=files --config.data.path=/path/to/cifar-10-batches-py
    python -m experiments.train --config=configs/paper.py:mnist_adagrad_plateau --workdir=runs/fig4
    python -m experiments.train --config=configs/paper.py:mnist_adadelta_plateau --workdir=runs/fig5
    python -m experiments.train --config=configs/paper.py:mnist_adam_plateau --workdir=runs/adam

Every run is `configs/base.py` (appendix A) with the row of `RUNS` below:
its figure, the claim checked against it (`experiments.summary`), the data,
the base optimizer, its learning rate, sigma and the init scale of
U(-scale, scale). CIFAR-10 is not packaged: without TFDS data, pass the
extracted python version (cifar-10-python.tar.gz) as shown for Fig. 3.
"""

import ml_collections

from configs import base

#: run: (figure, claim kind, data, optimizer, base lr, sigma, init scale)
RUNS = {
    "mnist_sgd": ("Fig. 1", "no_plateau", "mnist", "sgd", 0.01, 100.0, 0.2),
    "mnist_sgd_plateau": ("Fig. 2", "plateau", "mnist", "sgd", 0.02, 100.0,
                          0.1),
    "cifar10_sgd_plateau": ("Fig. 3", "plateau", "cifar10", "sgd", 0.01,
                            1000.0, 0.1),
    "mnist_adagrad_plateau": ("Fig. 4", "plateau_adaptive", "mnist",
                              "adagrad", 0.1, 1000.0, 0.1),
    "mnist_adadelta_plateau": ("Fig. 5", "plateau_adaptive", "mnist",
                               "adadelta", 1.0, 1000.0, 0.1),
    "mnist_adam_plateau": ("§4", "adam", "mnist", "adam", 0.001, 1000.0, 0.1),
}


def get_config(run: str = "mnist_sgd_plateau") -> ml_collections.ConfigDict:
  """The paper's run `run`, a key of `RUNS`."""
  if run not in RUNS:
    raise ValueError(f"configs/paper.py:{run}: expected one of "
                     f"{', '.join(RUNS)}.")
  figure, claim_kind, data, optimizer, lr, sigma, init_scale = RUNS[run]
  config = base.get_base_config()
  config.name, config.figure, config.claim_kind = run, figure, claim_kind
  config.data.name = data
  config.optimizer.name = optimizer
  config.optimizer.learning_rate = lr
  config.optimizer.sigma = sigma
  config.model.init_scale = init_scale
  return config
