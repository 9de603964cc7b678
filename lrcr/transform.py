"""`scale_by_cubic_step`: the CR step length as an optax transformation (sec. 3.1).

CR is a metamethod: a base optimizer proposes a direction g, and CR chooses the
learning rate alpha for it from the cubic model of eq. 8 (`lrcr.cubic`). In
optax terms the direction is the `updates` that reach this transform from
whatever precedes it in an `optax.chain`, and the result is alpha * updates:

    tx = optax.chain(optax.sgd(1.0), lrcr.scale_by_cubic_step(sigma=100.0))
    updates, state = tx.update(grads, state, params,
                               curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))

Because alpha g does not change when g is scaled, the base optimizer's learning
rate (constant or scheduled) cancels out of the CR update: only sigma and the
base optimizer's preconditioning matter. The effective learning rate in the
base optimizer's own units is alpha times its learning rate; that is what the
paper plots.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import cubic
from lrcr.directional import Directional

Array = jax.Array


class CubicStepInfo(NamedTuple):
  """Diagnostics of the last CR step, all scalars."""
  slope: Array
  curvature: Array
  sqnorm: Array
  predicted_decrease: Array


class CubicStepState(NamedTuple):
  """State of `scale_by_cubic_step`: the last alpha and its diagnostics."""
  learning_rate: Array
  info: CubicStepInfo


_MISSING = ("scale_by_cubic_step.update needs the keyword-only extra argument "
            "`curvature_fn`, a callable (params, direction) -> "
            "lrcr.Directional. Build it for the current batch with "
            "lrcr.lowrank_curvature_fn(model, x, labels) for an lrcr.MLP, or "
            "lrcr.autodiff_curvature_fn(loss_fn, *args) for any model, and "
            "call tx.update(grads, state, params, curvature_fn=...).")


def scale_by_cubic_step(
    sigma: float | Array,
) -> optax.GradientTransformationExtraArgs:
  """Multiplies the incoming direction by the Cubic-Regularization step length.

  At each update, with g the incoming updates (the search direction of the
  preceding transforms), it evaluates s = g . grad F, h = g^T H g and ||g||^2
  through `curvature_fn(params, g)`, solves the cubic model of eq. 8 for alpha
  (eq. 37, stable, see `lrcr.cubic`) and returns alpha g (eqs. 42-43).

  Non-descent directions (s >= 0) and g = 0 never produce NaN: alpha is the
  minimizer of the cubic model over alpha >= 0, which is 0 unless negative
  curvature makes a step pay (see `lrcr.cubic`). A non-finite slope or
  curvature gives alpha = 0 (no step), and the info records the raw values.

  Args:
    sigma: the cubic weight, > 0, in the paper's sigma/6 convention (eq. 8).

  Returns:
    An `optax.GradientTransformationExtraArgs`. Its update takes the
    keyword-only extra argument `curvature_fn` and requires `params`. The
    state is `CubicStepState(learning_rate=alpha, info=CubicStepInfo(...))`;
    `optax.tree.get(state, "learning_rate")` reads alpha.

  Raises:
    ValueError: if sigma is a Python number <= 0 or not finite.
    TypeError: at update time, if `curvature_fn` or `params` is missing.
  """
  if isinstance(sigma, (int, float)) and not (0 < sigma < float("inf")):
    raise ValueError(
        f"scale_by_cubic_step(sigma={sigma!r}): sigma must be a finite number "
        f"> 0 (the paper uses 100 and 1000).")

  def init_fn(params: Any) -> CubicStepState:
    dtype = _float_dtype(params)
    zero = jnp.zeros((), dtype)
    return CubicStepState(learning_rate=zero,
                          info=CubicStepInfo(zero, zero, zero, zero))

  def update_fn(updates: Any, state: CubicStepState, params: Any = None, *,
                curvature_fn: Any = None, **extra_args: Any):
    del extra_args
    if curvature_fn is None:
      raise TypeError(_MISSING)
    if params is None:
      raise TypeError("scale_by_cubic_step.update needs `params` (the point "
                      "where the curvature is evaluated): "
                      "tx.update(grads, state, params, curvature_fn=...).")
    d = curvature_fn(params, updates)
    if not isinstance(d, Directional):
      d = Directional(*d)
    dtype = state.learning_rate.dtype
    step = cubic.cubic_step(d.slope, d.curvature, d.sqnorm, sigma)
    alpha = step.alpha.astype(dtype)
    new_updates = jax.tree.map(lambda u: (alpha * u).astype(u.dtype), updates)
    info = CubicStepInfo(*(jnp.asarray(a).astype(dtype) for a in
                           (d.slope, d.curvature, d.sqnorm,
                            step.predicted_decrease)))
    return new_updates, CubicStepState(learning_rate=alpha, info=info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _float_dtype(tree: Any):
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.asarray(leaves[0]).dtype if leaves else jnp.float32


def _with_cubic(base: optax.GradientTransformation,
                sigma) -> optax.GradientTransformationExtraArgs:
  return optax.chain(base, scale_by_cubic_step(sigma))


def cubic_sgd(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
              **kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.sgd` followed by `scale_by_cubic_step` (the paper's Figs. 1-3).

  The learning rate cancels out of the update (see the module docstring); it
  only sets the units of `alpha`.
  """
  return _with_cubic(optax.sgd(learning_rate, **kwargs), sigma)


def cubic_adagrad(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
                  initial_accumulator_value: float = 0.1, eps: float = 1e-7,
                  ) -> optax.GradientTransformationExtraArgs:
  """`optax.adagrad` followed by `scale_by_cubic_step` (the paper's Fig. 4)."""
  return _with_cubic(optax.adagrad(learning_rate, initial_accumulator_value,
                                   eps), sigma)


def cubic_adadelta(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
                   rho: float = 0.95, eps: float = 1e-8,
                   ) -> optax.GradientTransformationExtraArgs:
  """`optax.adadelta` followed by `scale_by_cubic_step` (the paper's Fig. 5)."""
  return _with_cubic(optax.adadelta(learning_rate, rho=rho, eps=eps), sigma)


def cubic_adam(sigma: float, learning_rate: optax.ScalarOrSchedule = 1e-3,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               ) -> optax.GradientTransformationExtraArgs:
  """`optax.adam` followed by `scale_by_cubic_step` (section 4)."""
  return _with_cubic(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), sigma)


def cubic_rmsprop(sigma: float, learning_rate: optax.ScalarOrSchedule = 1e-3,
                  **kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.rmsprop` followed by `scale_by_cubic_step`."""
  return _with_cubic(optax.rmsprop(learning_rate, **kwargs), sigma)
