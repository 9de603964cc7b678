"""The training steps: one base step and one CR step (the loop, the benchmarks).

    options = CROptions.from_config(config.optimizer)
    cr_step = make_cr_step(model, cr_tx, options)
    out = cr_step(params, opt_state, x, y)          # a StepOutput
    params = optax.apply_updates(params, out.updates)

Per step, with g the base optimizer's direction: F, grad F and curvature_fn
come from `_value_grad_and_curvature` (the one seam every option changes);
s = g . grad F, h = g^T H g and ||g||^2 = curvature_fn(params, g); the update
is alpha g, alpha the minimizer of the cubic model (eq. 37).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lrcr
from lrcr import averaging as averaging_lib

Array = jax.Array
LossFn = Callable[[Any, Array, Array], Array]

#: What `config.optimizer.curvature` may be; all exact, for any model:
#: the engine sharing the gradient pass, the engine in its own pass,
#: forward-over-forward, and g . jvp(grad F)(g).
CURVATURE_PATHS: tuple[str, ...] = ("engine", "lowrank", "autodiff", "hvp")


@dataclasses.dataclass(frozen=True)
class CROptions:
  """How the CR step gets its slope and curvature.

  Attributes:
    curvature: one of `CURVATURE_PATHS`.
    granularity: "global", "layer" or "variable" (`lrcr.scale_by_cubic_step`).
    gradient_direction: the base optimizer is plain SGD (the Gram form).
    curvature_batch_size: if > 0, the curvature on the first that many rows
      of the batch, the slope on all of them (Byrd et al. 2011).
    stack_layers: the engine batches equally shaped layers' products
      (curvature="engine" without curvature_batch_size only).
    averaging: section 3.1's option for SGD (`lrcr.averaging`).
    sigma: the cubic weight, read by the non-"batch" averagings.
  """
  curvature: str = "engine"
  granularity: str = "global"
  gradient_direction: bool = False
  curvature_batch_size: int = 0
  stack_layers: bool = False
  averaging: str = "batch"
  sigma: float = 100.0

  def __post_init__(self):
    if self.curvature not in CURVATURE_PATHS:
      raise ValueError(
          f"config.optimizer.curvature={self.curvature!r}: expected one of "
          f"{', '.join(CURVATURE_PATHS)} (all exact; 'engine' is the fastest).")
    if self.averaging not in averaging_lib.AVERAGINGS:
      raise ValueError(
          f"config.optimizer.averaging={self.averaging!r}: expected one of "
          f"{', '.join(averaging_lib.AVERAGINGS)}.")

  @classmethod
  def from_config(cls, optimizer_config: Any) -> CROptions:
    """The options of `config.optimizer`."""
    get = optimizer_config.get
    averaging = get("averaging", "batch")
    if averaging != "batch" and (
        str(optimizer_config.name).lower() != "sgd" or
        get("granularity", "global") != "global" or
        get("adaptive_sigma", False) or get("curvature_batch_size", 0) or
        get("curvature_every", 1) > 1):
      raise ValueError(
          f"config.optimizer.averaging={averaging!r} is section 3.1's option "
          "for plain SGD: it needs optimizer.name='sgd', granularity='global', "
          "adaptive_sigma=False, curvature_batch_size=0 and curvature_every=1.")
    return cls(curvature=get("curvature", "engine"),
               granularity=get("granularity", "global"),
               gradient_direction=str(optimizer_config.name).lower() == "sgd",
               curvature_batch_size=int(get("curvature_batch_size", 0)),
               stack_layers=bool(get("stack_layers", False)),
               averaging=averaging,
               sigma=float(optimizer_config.sigma))


class StepOutput(NamedTuple):
  """One step's update, new state, F and grad F (and averagings' alphas)."""
  updates: Any
  opt_state: Any
  loss: Array
  grads: Any
  alphas: Array | None = None
  alpha: Array | None = None


def cross_entropy_loss_fn(model: Any) -> LossFn:
  """loss_fn(params, x, y): mean softmax cross-entropy of `model` (eq. 16)."""
  def loss_fn(params: Any, x: Array, y: Array) -> Array:
    return lrcr.cross_entropy_loss(model.apply({"params": params}, x), y)
  return loss_fn


def make_base_step(model: Any, tx: optax.GradientTransformation):
  """step(params, opt_state, x, y) -> StepOutput: value_and_grad + tx."""
  loss_fn = cross_entropy_loss_fn(model)

  def step(params, opt_state, x, y) -> StepOutput:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return StepOutput(updates, opt_state, loss, grads)
  return step


def make_cr_step(model: Any, tx: optax.GradientTransformationExtraArgs,
                 options: CROptions):
  """step(params, opt_state, x, y) -> StepOutput for `tx` = base + CR.

  Args:
    model: `lrcr.MLP` or any flax module mapping x to logits.
    tx: `optax.chain(base, lrcr.scale_by_cubic_step(...))`.
    options: see `CROptions`.
  """
  loss_fn = cross_entropy_loss_fn(model)

  def step(params, opt_state, x, y) -> StepOutput:
    if options.averaging != "batch":
      # Section 3.1's alternatives: per-sample alphas, no transform.
      out = averaging_lib.averaged_sgd_update(
          loss_fn, params, x, y, sigma=options.sigma,
          averaging=options.averaging)
      return StepOutput(out.updates, opt_state, out.loss, out.grads,
                        out.alphas, out.alpha)
    loss, grads, curvature_fn = _value_grad_and_curvature(
        loss_fn, params, x, y, options)
    updates, opt_state = tx.update(
        grads, opt_state, params, curvature_fn=curvature_fn,
        value_fn=lambda p: loss_fn(p, x, y), value=loss)
    return StepOutput(updates, opt_state, loss, grads)
  return step


def applied(step):
  """(params, opt_state, x, y) -> (new params, new opt_state, loss)."""
  def train_step(params, opt_state, x, y):
    out = step(params, opt_state, x, y)
    return optax.apply_updates(params, out.updates), out.opt_state, out.loss
  return train_step


def _value_grad_and_curvature(loss_fn: LossFn, params: Any, x: Array,
                              y: Array, options: CROptions):
  """(F, grad F, curvature_fn) on the batch: the one engine seam.

  curvature_fn maps (params, direction) to an `lrcr.Directional` at
  `options.granularity`.
  """
  rows = options.curvature_batch_size or None
  if options.curvature == "engine" and not rows:
    # One forward/backward pass for the loss, the gradient and the adjoints
    # the curvature reads (lrcr.value_grad_and_curvature), for any model.
    return lrcr.value_grad_and_curvature(
        loss_fn, params, x, y, granularity=options.granularity,
        gradient_direction=options.gradient_direction,
        stack_layers=options.stack_layers)
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  xc, yc = x[:rows], y[:rows]
  if options.curvature == "hvp":
    curvature_fn = hvp_curvature_fn(loss_fn, grads, xc, yc)
  elif options.curvature == "autodiff":
    curvature_fn = lrcr.autodiff_curvature_fn(
        loss_fn, xc, yc, granularity=options.granularity)
  else:   # "lowrank", or "engine" on a sub-batch: the engine's own pass
    curvature_fn = lrcr.lowrank_curvature_fn(loss_fn, xc, yc,
                                             granularity=options.granularity)
  if rows:    # the slope stays on the whole batch (exact)
    curvature_fn = _full_batch_slope(curvature_fn, grads)
  return loss, grads, curvature_fn


def hvp_curvature_fn(loss_fn: LossFn, grads: Any, *args: Any):
  """curvature_fn from a Hessian-vector product: h = g . jvp(grad F)(g)."""
  def curvature_fn(params: Any, direction: Any) -> lrcr.Directional:
    hg = jax.jvp(jax.grad(lambda p: loss_fn(p, *args)), (params,),
                 (direction,))[1]
    return lrcr.Directional(optax.tree.vdot(direction, grads),
                            optax.tree.vdot(direction, hg),
                            optax.tree.norm(direction, squared=True))
  return curvature_fn


def _full_batch_slope(curvature_fn, grads):
  """curvature_fn with its slope replaced by the whole batch's g . grad F."""
  def block_slope(s, g, u):
    if (not isinstance(g, (Mapping, list, tuple)) and
        jnp.shape(s) == jnp.shape(g)):
      return g * u
    return optax.tree.vdot(g, u)

  def fn(params, direction):
    d = curvature_fn(params, direction)
    return d._replace(slope=jax.tree.map(block_slope, d.slope, grads,
                                         direction))
  return fn
