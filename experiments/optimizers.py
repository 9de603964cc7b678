"""The base optimizers of the paper's runs, their schedule, and their CR chains.

Appendix A: the base optimizers take "the default TensorFlow values"
(`DEFAULT_HYPERPARAMS`, TF1's), and the learning rate decays as
lr(t) = lr_0 * 0.95 ** (t / 100). The CR optimizer is the base optimizer
followed by the cubic step (sec. 3.1): `optax.chain(base,
lrcr.scale_by_cubic_step(sigma))`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

import lrcr

# TF1 defaults of each base optimizer's extra hyperparameters (appendix A).
# TF1's RMSProp starts its mean square at 1 and puts eps inside the sqrt.
DEFAULT_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "adagrad": {"initial_accumulator_value": 0.1, "eps": 1e-7},
    "adadelta": {"rho": 0.95, "eps": 1e-8},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "rmsprop": {"decay": 0.9, "eps": 1e-10, "initial_scale": 1.0,
                "eps_in_sqrt": True},
}

_FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    "adam": optax.adam,
    "rmsprop": optax.rmsprop,
}

#: The names `make_base_optimizer` accepts.
OPTIMIZERS: tuple[str, ...] = tuple(_FACTORIES)

#: How figures and progress bars name each base optimizer.
DISPLAY_NAMES: dict[str, str] = {
    "sgd": "SGD", "adagrad": "Adagrad", "adadelta": "Adadelta",
    "adam": "Adam", "rmsprop": "RMSProp",
}


def _get(config: Any, key: str, default: Any) -> Any:
  """`config.key` for a ConfigDict, a Mapping or any attribute holder."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default)


def check_name(name: str) -> str:
  """The canonical (lower-case) optimizer name; ValueError if unknown."""
  key = str(name).strip().lower()
  if key not in _FACTORIES:
    raise ValueError(
        f"Unknown optimizer {name!r} (config.optimizer.name): expected one of "
        f"{', '.join(OPTIMIZERS)}.")
  return key


def make_schedule(optimizer_config: Any) -> optax.Schedule:
  """lr(t) = lr_0 * decay_rate ** (t / decay_steps) (appendix A).

  Reads `learning_rate` (lr_0), `decay_steps` (100), `decay_rate` (0.95) and
  `decay_staircase` (False) of `config.optimizer`.
  """
  return optax.exponential_decay(
      init_value=float(optimizer_config.learning_rate),
      transition_steps=int(_get(optimizer_config, "decay_steps", 100)),
      decay_rate=float(_get(optimizer_config, "decay_rate", 0.95)),
      staircase=bool(_get(optimizer_config, "decay_staircase", False)))


def make_base_optimizer(optimizer_config: Any,
                        schedule: optax.ScalarOrSchedule,
                        ) -> optax.GradientTransformation:
  """The optimizer `optimizer_config.name` at `schedule`, with TF1 defaults.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  name = check_name(optimizer_config.name)
  return _FACTORIES[name](schedule, **DEFAULT_HYPERPARAMS[name])


def make_cr_optimizer(optimizer_config: Any,
                      schedule: optax.ScalarOrSchedule,
                      ) -> optax.GradientTransformationExtraArgs:
  """optax.chain(base, lrcr.scale_by_cubic_step(sigma, ...)) (sec. 3.1).

  Reads `name`, `sigma`, `granularity`, `adaptive_sigma` and
  `curvature_every` of `config.optimizer`; the update takes `curvature_fn`.
  """
  base = make_base_optimizer(optimizer_config, schedule)
  return optax.chain(base, lrcr.scale_by_cubic_step(
      float(optimizer_config.sigma),
      granularity=optimizer_config.get("granularity", "global"),
      adaptive_sigma=bool(optimizer_config.get("adaptive_sigma", False)),
      curvature_every=int(optimizer_config.get("curvature_every", 1))))
