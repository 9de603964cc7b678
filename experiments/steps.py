"""The training steps: one base step and one CR step (the loop, the benchmarks).

    options = CROptions.from_config(config.optimizer)
    cr_step = make_cr_step(model, cr_tx, options)
    out = cr_step(params, opt_state, x, y)          # a StepOutput
    params = optax.apply_updates(params, out.updates)

Per step, on a batch (X, y) of B rows, with g the direction the base
optimizer proposes from grad F:

    F, grad F, curvature_fn = _value_grad_and_curvature(...)   # one pass
    s = g . grad F,  h = g^T H g,  ||g||^2 = curvature_fn(params, g)
    update = alpha g,  alpha the minimizer of the cubic model (eq. 37)

The first line is the engine seam: every option below only changes how
`_value_grad_and_curvature` builds `curvature_fn`.
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

#: What `config.optimizer.curvature` may be; all exact, for any model.
#: "engine" shares the gradient pass (`lrcr.value_grad_and_curvature`; the
#: Gram form after SGD), "lowrank" is the engine behind its own pass
#: (`lrcr.lowrank_curvature_fn`), "autodiff" is forward-over-forward, "hvp"
#: is g . jvp(grad F)(g) (a baseline).
CURVATURE_PATHS: tuple[str, ...] = ("engine", "lowrank", "autodiff", "hvp")


@dataclasses.dataclass(frozen=True)
class CROptions:
  """How the CR step gets its slope and curvature.

  Attributes:
    curvature: one of `CURVATURE_PATHS`.
    granularity: "global", "layer" or "variable" (`lrcr.scale_by_cubic_step`).
    gradient_direction: the base optimizer is plain SGD, so the engine may
      use its Gram-matrix form.
    curvature_batch_size: if > 0, the curvature on the first that many rows
      of the batch, the slope on all of them (Byrd et al. 2011).
    stack_layers: the engine batches equally shaped layers' products
      (`lrcr.value_grad_and_curvature(stack_layers=...)`); same numbers up
      to float rounding. Read by curvature="engine" without a
      curvature_batch_size only (the other paths have no such option).
    averaging: section 3.1's option for SGD: "batch" (the paper),
      "mean_alpha" or "mean_alpha_g" (`lrcr.averaging`).
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
  """One step's update and what it measured (also when it is not applied).

  Attributes:
    updates: the update to add to the params.
    opt_state: the new optimizer state.
    loss: F at the params, on the batch.
    grads: grad F.
    alphas: per-sample alphas [B] (section 3.1's averagings), else None.
    alpha: their combined alpha along -grad F (averagings), else None.
  """
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

  Returns:
    The pure step function; jit or scan it.
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
  """(F, grad F, curvature_fn) on the batch (x, y): the engine seam.

  The one place that picks how the CR run's slope and curvature are computed.

  Returns:
    loss: F(params; x, y).
    grads: grad F, shaped like params.
    curvature_fn: (params, direction) -> lrcr.Directional for
      `lrcr.scale_by_cubic_step`, at `options.granularity`.
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
  """curvature_fn with its slope replaced by the whole batch's g . grad F.

  Works for every granularity: the slope tree is a prefix of params, and each
  of its leaves gets the inner product of the direction and the gradient
  over the part of params under it (elementwise for "variable").
  """
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
