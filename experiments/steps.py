"""The training program: the optimizers, their steps and the jitted chunk.

Appendix A: base optimizers with TF1's defaults, lr(t) = lr_0 * 0.95 **
(t / 100); the CR optimizer chains `lrcr.scale_by_cubic_step` after the base
(sec. 3.1): along the base direction g, the update alpha g minimizes the cubic
model (eq. 37). A chunk is a `lax.scan` of steps with the seeds vmapped
inside; a non-finite step leaves its run unchanged and is flagged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lrcr
from experiments import input_pipeline
from lrcr import averaging as averaging_lib

Array = jax.Array
LossFn = Callable[[Any, Array, Array], Array]

# name: (display name, optax factory, TF1 defaults of its hyperparameters).
# TF1's RMSProp starts its mean square at 1 and puts eps inside the sqrt.
_OPTIMIZERS: dict[str, tuple[str, Callable[..., Any], dict[str, Any]]] = {
    "sgd": ("SGD", optax.sgd, {}),
    "adagrad": ("Adagrad", optax.adagrad,
                {"initial_accumulator_value": 0.1, "eps": 1e-7}),
    "adadelta": ("Adadelta", optax.adadelta, {"rho": 0.95, "eps": 1e-8}),
    "adam": ("Adam", optax.adam, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    "rmsprop": ("RMSProp", optax.rmsprop, {
        "decay": 0.9, "eps": 1e-10, "initial_scale": 1.0,
        "eps_in_sqrt": True}),
}

#: What `config.optimizer.curvature` may be; all exact, for any model: the
#: engine sharing the gradient pass, the engine in its own pass,
#: forward-over-forward, and g . jvp(grad F)(g).
CURVATURE_PATHS: tuple[str, ...] = ("engine", "lowrank", "autodiff", "hvp")


def optimizer_entry(optimizer_config: Any) -> tuple[str, Callable, dict]:
  """(display name, optax factory, TF1 defaults) of `config.optimizer.name`;
  ValueError, listing the valid names, for an unknown one."""
  name = str(optimizer_config.name).strip().lower()
  if name not in _OPTIMIZERS:
    raise ValueError(
        f"Unknown optimizer {optimizer_config.name!r} (config.optimizer."
        f"name): expected one of {', '.join(_OPTIMIZERS)}.")
  return _OPTIMIZERS[name]


def make_schedule(optimizer_config: Any) -> optax.Schedule:
  """lr(t) = lr_0 * decay_rate ** (t / decay_steps) (appendix A)."""
  return optax.exponential_decay(
      init_value=float(optimizer_config.learning_rate),
      transition_steps=int(optimizer_config.get("decay_steps", 100)),
      decay_rate=float(optimizer_config.get("decay_rate", 0.95)),
      staircase=bool(optimizer_config.get("decay_staircase", False)))


def make_base_optimizer(optimizer_config: Any,
                        schedule: optax.ScalarOrSchedule,
                        ) -> optax.GradientTransformation:
  """The optimizer `optimizer_config.name` at `schedule`, with TF1 defaults."""
  _, factory, defaults = optimizer_entry(optimizer_config)
  return factory(schedule, **defaults)


def make_cr_optimizer(optimizer_config: Any,
                      schedule: optax.ScalarOrSchedule,
                      ) -> optax.GradientTransformationExtraArgs:
  """optax.chain(base, lrcr.scale_by_cubic_step(sigma, ...)) (sec. 3.1);
  for SGD `lrcr.cubic_sgd`, the same chain that knows its direction."""
  cubic = dict(
      granularity=optimizer_config.get("granularity", "global"),
      adaptive_sigma=bool(optimizer_config.get("adaptive_sigma", False)),
      curvature_every=int(optimizer_config.get("curvature_every", 1)))
  sigma = float(optimizer_config.sigma)
  _, factory, defaults = optimizer_entry(optimizer_config)
  if factory is optax.sgd and not defaults:      # plain SGD, as cubic_sgd's
    return lrcr.cubic_sgd(sigma, schedule, **cubic)
  return optax.chain(make_base_optimizer(optimizer_config, schedule),
                     lrcr.scale_by_cubic_step(sigma, **cubic))


@dataclasses.dataclass(frozen=True)
class CROptions:
  """How the CR step gets its slope and curvature (see configs/base.py).

  `gradient_direction`: the base optimizer is plain SGD (the Gram form);
  `curvature_batch_size` > 0: the curvature on that many rows of the batch,
  the slope on all of them (Byrd et al. 2011).
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
    sgd = str(optimizer_config.name).lower() == "sgd"
    if averaging != "batch" and (
        not sgd or get("granularity", "global") != "global" or
        get("adaptive_sigma", False) or get("curvature_batch_size", 0) or
        get("curvature_every", 1) > 1):
      raise ValueError(
          f"config.optimizer.averaging={averaging!r} is section 3.1's option "
          "for plain SGD: it needs optimizer.name='sgd', granularity='global', "
          "adaptive_sigma=False, curvature_batch_size=0 and curvature_every=1.")
    return cls(get("curvature", "engine"), get("granularity", "global"), sgd,
               int(get("curvature_batch_size", 0)),
               bool(get("stack_layers", False)), averaging,
               float(optimizer_config.sigma))


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
  """step(params, opt_state, x, y) -> StepOutput for `tx` = base + CR."""
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
  """(F, grad F, curvature_fn) on the batch: the one seam every option changes;
  curvature_fn(params, direction) is an `lrcr.Directional`."""
  rows = options.curvature_batch_size or None
  if options.curvature == "engine" and not rows:
    return lrcr.value_grad_and_curvature(
        loss_fn, params, x, y, granularity=options.granularity,
        gradient_direction=options.gradient_direction,
        stack_layers=options.stack_layers)
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  xc, yc = x[:rows], y[:rows]
  if options.curvature == "hvp":      # h = g . jvp(grad F)(g)
    def curvature_fn(params: Any, direction: Any) -> lrcr.Directional:
      hg = jax.jvp(jax.grad(lambda p: loss_fn(p, xc, yc)), (params,),
                   (direction,))[1]
      return lrcr.Directional(optax.tree.vdot(direction, grads),
                              optax.tree.vdot(direction, hg),
                              optax.tree.norm(direction, squared=True))
  elif options.curvature == "autodiff":
    curvature_fn = lrcr.autodiff_curvature_fn(
        loss_fn, xc, yc, granularity=options.granularity)
  else:   # "lowrank", or "engine" on a sub-batch: the engine's own pass
    curvature_fn = lrcr.lowrank_curvature_fn(loss_fn, xc, yc,
                                             granularity=options.granularity)
  if not rows:
    return loss, grads, curvature_fn

  def block_slope(s, g, u):
    if (not isinstance(g, (Mapping, list, tuple)) and
        jnp.shape(s) == jnp.shape(g)):
      return g * u
    return optax.tree.vdot(g, u)

  def full_batch_slope(params, direction):    # the whole batch's g . grad F
    d = curvature_fn(params, direction)
    return d._replace(slope=jax.tree.map(block_slope, d.slope, grads,
                                         direction))
  return loss, grads, full_batch_slope


class TrainState(NamedTuple):
  """Parameters and optimizer states of both runs, [S, ...] over seeds."""
  params_base: Any
  opt_base: Any
  params_cr: Any
  opt_cr: Any


def _all_true(tree: Any) -> Array:
  leaves = [jnp.all(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _ok(out: StepOutput, curvature: bool = False) -> Array:
  """Whether a step's loss, update (and slope, curvature, solve) are finite."""
  ok = jnp.isfinite(out.loss) & _all_true(jax.tree.map(jnp.isfinite,
                                                       out.updates))
  if not curvature:
    return ok
  if out.alphas is not None:               # section 3.1's averagings
    return ok & jnp.isfinite(out.alpha)
  return ok & _all_true(optax.tree.get(out.opt_state, "info").finite)


def _step_metrics(t: Array, base: StepOutput, cr: StepOutput,
                  base_lr: Array) -> dict[str, Array]:
  """What step t measured. Per-layer or per-weight alphas give their
  ||g||^2-weighted mean (the global alpha with the same projection on g)
  and the diagnostics are block sums."""
  info = optax.tree.get(cr.opt_state, "info")
  total = lambda tree: sum(jnp.sum(a) for a in jax.tree.leaves(tree))
  alpha_tree = optax.tree.get(cr.opt_state, "learning_rate")
  sqnorm = total(info.sqnorm)
  alpha = total(jax.tree.map(jnp.multiply, alpha_tree, info.sqnorm)) / \
      jnp.where(sqnorm > 0, sqnorm, 1.0)
  if len(jax.tree.leaves(alpha_tree)) == 1 and not jnp.shape(
      jax.tree.leaves(alpha_tree)[0]):
    alpha = jax.tree.leaves(alpha_tree)[0]        # the paper's single alpha
  slope, curvature = total(info.slope), total(info.curvature)
  decrease, alpha_cv = total(info.predicted_decrease), jnp.zeros(())
  if cr.alphas is not None:
    # Section 3.1's averagings: alpha in the units of the SGD direction
    # -lr grad F, and the spread (coefficient of variation) of the per-sample
    # alphas, the noise of section 3.1. The transform did not run.
    alpha = cr.alpha / base_lr
    alpha_cv = cr.alphas.std() / jnp.maximum(cr.alphas.mean(), 1e-30)
    alpha_cv = jnp.where(jnp.isfinite(cr.loss), alpha_cv, jnp.nan)
    slope = curvature = sqnorm = decrease = jnp.full((), jnp.nan)
  return {
      "step": t, "loss_base": base.loss, "loss_cr": cr.loss, "alpha": alpha,
      "base_learning_rate": base_lr,
      "learning_rate_cr": alpha * base_lr,  # in the base optimizer's units
      "slope": slope, "curvature": curvature, "sqnorm": sqnorm,
      "predicted_decrease": decrease,
      "sigma": optax.tree.get(cr.opt_state, "sigma"),
      "accepted": jnp.asarray(optax.tree.get(cr.opt_state, "accepted"),
                              jnp.int32),
      "alpha_cv": alpha_cv,
      "grad_norm_base": optax.tree.norm(base.grads),
      "grad_norm_cr": optax.tree.norm(cr.grads)}


def _over_seeds(fn, *args, mapped):
  """jax.vmap of fn over the seed axis; a single seed runs unbatched."""
  if jax.tree.leaves(args[0])[0].shape[0] > 1:
    return jax.vmap(fn, in_axes=tuple(0 if m else None for m in mapped))(
        *args)
  squeeze = lambda a: jax.tree.map(lambda x: x[0], a)
  out = fn(*[squeeze(a) if m else a for a, m in zip(args, mapped)])
  return jax.tree.map(lambda x: jnp.asarray(x)[None], out)


def _apply_both(state: TrainState, base, cr, apply_b, apply_c) -> TrainState:
  """Each run's params + updates and new opt_state where apply_*."""
  def apply_if(ok, params, opt_state, out):
    select = lambda a, b: jax.tree.map(lambda u, v: jnp.where(ok, u, v), a, b)
    return (select(optax.apply_updates(params, out.updates), params),
            select(out.opt_state, opt_state))
  return TrainState(*apply_if(apply_b, state.params_base, state.opt_base, base),
                    *apply_if(apply_c, state.params_cr, state.opt_cr, cr))


def make_chunk_fn(config: Any, base_step, cr_step, schedule: optax.Schedule,
                  num_examples: int,
                  batch_sharding: jax.sharding.Sharding | None = None):
  """run_chunk(state [S, ...], images, labels, data_keys [S], start, *,
  length) -> (state, metrics [length, S]): `length` steps of both runs.

  `schedule` gives the metrics' base learning rate; under `nonfinite="stop"`
  the first non-finite step of any seed freezes every seed.
  """
  training = config.training
  batch_size, stop = training.batch_size, training.nonfinite == "stop"
  input_shape = tuple(config.model.get("input_shape", ()) or ())
  nan_step = training.get("inject_nan_at_step", -1)

  def one_seed(state, perms, t, first_epoch, images, labels):
    epoch, offset = input_pipeline.epoch_and_offset(t, num_examples,
                                                    batch_size)
    idx = jax.lax.dynamic_slice_in_dim(perms[epoch - first_epoch], offset,
                                       batch_size)                 # [B]
    x, y = images[idx], labels[idx]                                # [B, D], [B]
    if input_shape:                                  # [B, H, W, C] or [B, T, d]
      x = x.reshape((batch_size,) + input_shape)
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    if nan_step >= 0:
      x = jnp.where(t == nan_step, jnp.nan, x)
    base = base_step(state.params_base, state.opt_base, x, y)
    cr = cr_step(state.params_cr, state.opt_cr, x, y)
    ok_b, ok_c = _ok(base), _ok(cr, curvature=True)
    metrics = _step_metrics(t, base, cr,
                            jnp.asarray(schedule(t), jnp.float32))
    metrics.update(skipped_base=(~ok_b).astype(jnp.int32),
                   skipped_cr=(~ok_c).astype(jnp.int32))
    return base, cr, ok_b, ok_c, metrics

  def run_chunk(state: TrainState, images: Array, labels: Array,
                data_keys: Array, start: Array, *, length: int):
    # The permutations of every epoch this chunk touches, drawn once per seed.
    num_epochs = (length - 1) // (num_examples // batch_size) + 2
    first_epoch, _ = input_pipeline.epoch_and_offset(start, num_examples,
                                                     batch_size)
    epochs = first_epoch + jnp.arange(num_epochs, dtype=jnp.int32)
    perms = jax.vmap(lambda key: jax.vmap(lambda e: input_pipeline.permutation(
        key, e, num_examples))(epochs))(data_keys)                # [S, E, N]

    def step_fn(carry, t):
      state, halted = carry
      base, cr, ok_b, ok_c, metrics = _over_seeds(
          one_seed, state, perms, t, first_epoch, images, labels,
          mapped=(True, True, False, False, False, False))        # [S] each
      apply_b, apply_c = ok_b, ok_c
      if stop:
        all_ok = jnp.all(ok_b & ok_c)
        apply_b = apply_c = jnp.broadcast_to(all_ok & ~halted, ok_b.shape)
        halted = halted | ~all_ok
      new_state = _over_seeds(_apply_both, state, base, cr, apply_b, apply_c,
                              mapped=(True,) * 5)
      return (new_state, halted), metrics

    ts = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    (state, _), metrics = jax.lax.scan(step_fn, (state, jnp.array(False)), ts,
                                       unroll=training.get("scan_unroll", 1))
    return state, metrics

  return run_chunk


def make_data_mesh(num_devices: int,
                   batch_size: int) -> jax.sharding.Mesh | None:
  """A 1-D device mesh with axis "data" (num_devices 0: all), or None for
  one; ValueError for too many devices or a batch that does not split."""
  available = jax.device_count()
  n = available if num_devices == 0 else num_devices
  if not 1 <= n <= available:
    raise ValueError(
        f"config.training.num_devices={num_devices}: {available} device(s) "
        "are available; pass 0 for all of them or 1 for one.")
  if n == 1:
    return None
  if batch_size % n:
    raise ValueError(
        f"config.training.batch_size={batch_size} does not split over {n} "
        f"devices; pass a multiple of {n}, or "
        f"--config.training.num_devices=1.")
  return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))
