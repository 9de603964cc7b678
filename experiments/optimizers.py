"""The base optimizers of the paper's runs, their schedule, and their CR chains.

Appendix A: "for optimization algorithms with other parameters governing the
optimization, we used the default TensorFlow values for those parameters", and
"for the learning rate decay, we used an exponential decay with a decay rate
of 0.95 per 100 iterations". In optax terms (TF1 defaults):

    name      transform                                          defaults
    sgd       optax.sgd(lr)                                      -
    adagrad   optax.adagrad(lr, initial_accumulator_value, eps)  0.1, 1e-7
    adadelta  optax.adadelta(lr, rho, eps)                       0.95, 1e-8
    adam      optax.adam(lr, b1, b2, eps)                        .9, .999, 1e-8
    rmsprop   optax.rmsprop(lr, decay, eps, initial_scale)       0.9, 1e-10, 1.0

with lr the schedule

    lr(t) = lr_0 * 0.95 ** (t / 100)        # staircase: 0.95 ** floor(t / 100)

The CR optimizer is the base optimizer followed by the cubic step (sec. 3.1):
`optax.chain(base, lrcr.scale_by_cubic_step(sigma))`.
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
  """Returns the canonical (lower-case) optimizer name.

  Raises:
    ValueError: for a name not in `OPTIMIZERS`, listing the valid ones.
  """
  key = str(name).strip().lower()
  if key not in _FACTORIES:
    raise ValueError(
        f"Unknown optimizer {name!r} (config.optimizer.name): expected one of "
        f"{', '.join(OPTIMIZERS)}.")
  return key


def make_schedule(optimizer_config: Any) -> optax.Schedule:
  """The base learning-rate schedule of appendix A.

  Args:
    optimizer_config: `config.optimizer`, with `learning_rate` (lr_0) and
      optionally `decay_steps` (default 100), `decay_rate` (default 0.95) and
      `decay_staircase` (default False).

  Returns:
    `optax.exponential_decay(lr_0, decay_steps, decay_rate, staircase)`:
    lr(t) = lr_0 * decay_rate ** (t / decay_steps).
  """
  return optax.exponential_decay(
      init_value=float(optimizer_config.learning_rate),
      transition_steps=int(_get(optimizer_config, "decay_steps", 100)),
      decay_rate=float(_get(optimizer_config, "decay_rate", 0.95)),
      staircase=bool(_get(optimizer_config, "decay_staircase", False)))


def make_base_optimizer(optimizer_config: Any,
                        schedule: optax.ScalarOrSchedule,
                        ) -> optax.GradientTransformation:
  """The base optimizer named by `optimizer_config.name`, with TF1 defaults.

  Args:
    optimizer_config: `config.optimizer`; only `name` is read here.
    schedule: its learning rate, a float or an `optax.Schedule` (see
      `make_schedule`).

  Returns:
    The optax transformation (see the table in the module docstring).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  name = check_name(optimizer_config.name)
  return _FACTORIES[name](schedule, **DEFAULT_HYPERPARAMS[name])


def make_cr_optimizer(optimizer_config: Any,
                      schedule: optax.ScalarOrSchedule,
                      ) -> optax.GradientTransformationExtraArgs:
  """The base optimizer followed by the CR step length (sec. 3.1).

  Its update takes the keyword-only extra argument `curvature_fn` (see
  `lrcr.scale_by_cubic_step`).

  Args:
    optimizer_config: `config.optimizer`, with `name` and `sigma`.
    schedule: the base optimizer's learning rate.

  Returns:
    `optax.chain(base, lrcr.scale_by_cubic_step(sigma, granularity=...,
    adaptive_sigma=...))`, with `optimizer.granularity` ("global" by default)
    and `optimizer.adaptive_sigma` (False by default).
  """
  base = make_base_optimizer(optimizer_config, schedule)
  return optax.chain(base, lrcr.scale_by_cubic_step(
      float(optimizer_config.sigma),
      granularity=optimizer_config.get("granularity", "global"),
      adaptive_sigma=bool(optimizer_config.get("adaptive_sigma", False)),
      curvature_every=int(optimizer_config.get("curvature_every", 1))))
