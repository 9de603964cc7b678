"""python -m experiments.train --config=configs/beyond.py:mnist_adam_plateau,layer --workdir=runs/beyond/adam_layer

Beyond the paper (section 4's future work): one of the paper's plateau runs
with another CR variant. The argument is "<run>,<variant>" with run one of
mnist_sgd_plateau (Fig. 2), mnist_adagrad_plateau (Fig. 4),
mnist_adadelta_plateau (Fig. 5), mnist_adam_plateau (section 4), and variant
one of:

- global: the paper's single alpha per step
- layer: one alpha per layer (block-diagonal model)
- variable: one alpha per weight (exact Hessian diagonal, Table 2)
- adaptive: the paper's single alpha with Kohler & Lucchi's adaptive sigma
- sigma<value>: the paper's method with another sigma, e.g. sigma10000
- mean_alpha, mean_alpha_g: section 3.1's per-sample averagings E[alpha] E[g]
  and E[alpha g] (SGD only, i.e. mnist_sgd_plateau)
"""

import ml_collections

from configs import paper

RUNS = ("mnist_sgd_plateau", "mnist_adagrad_plateau", "mnist_adadelta_plateau",
        "mnist_adam_plateau")
VARIANTS = ("global", "layer", "variable", "adaptive")
AVERAGINGS = ("mean_alpha", "mean_alpha_g")


def get_config(arg: str = "mnist_sgd_plateau,layer") -> ml_collections.ConfigDict:
  """The run `arg` = "<run>,<variant>" (see the module docstring)."""
  run, _, variant = arg.partition(",")
  if run not in RUNS:
    raise ValueError(f"configs/beyond.py:{arg}: run must be one of {RUNS}.")
  config = paper.get_config(run)
  if variant in ("layer", "variable"):
    config.optimizer.granularity = variant
  elif variant == "adaptive":
    config.optimizer.adaptive_sigma = True
  elif variant in ("mean_alpha", "mean_alpha_g"):
    config.optimizer.averaging = variant
  elif variant.startswith("sigma"):
    config.optimizer.sigma = float(variant[len("sigma"):])
  elif variant != "global":
    raise ValueError(f"configs/beyond.py:{arg}: variant must be one of "
                     f"{VARIANTS + AVERAGINGS} or sigma<value>.")
  config.name = f"{run}_{variant}"
  config.claim_kind = ""
  return config
