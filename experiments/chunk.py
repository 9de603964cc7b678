"""The jitted chunk: both runs of every seed for `length` steps, as one program.

    run_chunk = jax.jit(make_chunk_fn(config, base_step, cr_step, schedule, n),
                        static_argnames="length")
    state, metrics = run_chunk(state, images, labels, data_keys, start,
                               length=100)       # metrics: [length, S] arrays

The steps run under `jax.lax.scan`, the seeds as a `jax.vmap` inside its body;
a step that is not finite (loss, update or curvature) leaves its run
unchanged and is flagged in the metrics (`skipped_base`, `skipped_cr`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from experiments import input_pipeline
from experiments import steps

Array = jax.Array


class TrainState(NamedTuple):
  """Parameters and optimizer states of both runs, [S, ...] over seeds."""
  params_base: Any
  opt_base: Any
  params_cr: Any
  opt_cr: Any


def _all_true(tree: Any) -> Array:
  """Whether every element of every leaf is true (True for no leaves)."""
  leaves = [jnp.all(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _all_finite(tree: Any) -> Array:
  return _all_true(jax.tree.map(jnp.isfinite, tree))


def _curvature_finite(cr: steps.StepOutput) -> Array:
  """False where the CR step's slope, curvature or solve was not finite."""
  if cr.alphas is not None:               # section 3.1's averagings
    return jnp.isfinite(cr.alpha)
  return _all_true(optax.tree.get(cr.opt_state, "info").finite)


def _apply_if(ok: Array, params: Any, opt_state: Any, out: steps.StepOutput):
  """(params + updates, new opt_state) where `ok`, else unchanged."""
  select = lambda a, b: jax.tree.map(lambda u, v: jnp.where(ok, u, v), a, b)
  return (select(optax.apply_updates(params, out.updates), params),
          select(out.opt_state, opt_state))


def _step_metrics(t: Array, base: steps.StepOutput, cr: steps.StepOutput,
                  base_lr: Array) -> dict[str, Array]:
  """What step t measured. For per-layer or per-weight alphas, alpha is the
  ||g||^2-weighted mean (the global alpha with the same projection on g) and
  the diagnostics are block sums."""
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
  return TrainState(
      *_apply_if(apply_b, state.params_base, state.opt_base, base),
      *_apply_if(apply_c, state.params_cr, state.opt_cr, cr))


def _make_one_seed(config: Any, base_step, cr_step, schedule: optax.Schedule,
                   num_examples: int,
                   batch_sharding: jax.sharding.Sharding | None):
  """one_seed(state, perms, t, first_epoch, images, labels): both runs' step t
  for one seed (vmapped by the chunk): outputs, ok flags, metrics."""
  batch_size = config.training.batch_size
  input_shape = tuple(config.model.get("input_shape", ()) or ())
  nan_step = config.training.get("inject_nan_at_step", -1)

  def one_seed(state: TrainState, perms: Array, t: Array, first_epoch: Array,
               images: Array, labels: Array):
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
    ok_b = jnp.isfinite(base.loss) & _all_finite(base.updates)
    ok_c = (jnp.isfinite(cr.loss) & _all_finite(cr.updates) &
            _curvature_finite(cr))
    metrics = _step_metrics(t, base, cr,
                            jnp.asarray(schedule(t), jnp.float32))
    metrics.update(skipped_base=(~ok_b).astype(jnp.int32),
                   skipped_cr=(~ok_c).astype(jnp.int32))
    return base, cr, ok_b, ok_c, metrics

  return one_seed


def make_chunk_fn(config: Any, base_step, cr_step, schedule: optax.Schedule,
                  num_examples: int,
                  batch_sharding: jax.sharding.Sharding | None = None):
  """run_chunk(state, images, labels, data_keys, start, *, length).

  Args:
    config: the run config; reads `training.batch_size`, `nonfinite`,
      `inject_nan_at_step` (tests: that step's inputs are NaN), `scan_unroll`
      and `model.input_shape` (one example as the model takes it).
    base_step: `steps.make_base_step(...)`.
    cr_step: `steps.make_cr_step(...)`.
    schedule: the base learning rate, for the metrics.
    num_examples: N.
    batch_sharding: the batch rows split over the mesh's "data" axis.

  Returns:
    The pure function of a `TrainState` with [S, ...] leaves and [S] keys,
    returning (state, metrics of [length, S]). Under `nonfinite="stop"` the
    first non-finite step of any seed freezes every seed.
  """
  training = config.training
  batch_size, stop = training.batch_size, training.nonfinite == "stop"
  one_seed = _make_one_seed(config, base_step, cr_step, schedule,
                            num_examples, batch_sharding)

  def step_fn(carry, t, *, images, labels, perms, first_epoch):
    state, halted = carry
    base, cr, ok_b, ok_c, metrics = _over_seeds(
        one_seed, state, perms, t, first_epoch, images, labels,
        mapped=(True, True, False, False, False, False))          # [S] each
    apply_b, apply_c = ok_b, ok_c
    if stop:
      all_ok = jnp.all(ok_b & ok_c)
      apply_b = apply_c = jnp.broadcast_to(all_ok & ~halted, ok_b.shape)
      halted = halted | ~all_ok
    new_state = _over_seeds(_apply_both, state, base, cr, apply_b, apply_c,
                            mapped=(True,) * 5)
    return (new_state, halted), metrics

  def run_chunk(state: TrainState, images: Array, labels: Array,
                data_keys: Array, start: Array, *, length: int):
    # The permutations of every epoch this chunk touches, drawn once per seed.
    num_epochs = (length - 1) // (num_examples // batch_size) + 2
    first_epoch, _ = input_pipeline.epoch_and_offset(start, num_examples,
                                                     batch_size)
    epochs = first_epoch + jnp.arange(num_epochs, dtype=jnp.int32)
    perms = jax.vmap(lambda key: jax.vmap(lambda e: input_pipeline.permutation(
        key, e, num_examples))(epochs))(data_keys)                # [S, E, N]
    body = functools.partial(step_fn, images=images, labels=labels,
                             perms=perms, first_epoch=first_epoch)
    ts = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    (state, _), metrics = jax.lax.scan(body, (state, jnp.array(False)), ts,
                                       unroll=training.get("scan_unroll", 1))
    return state, metrics

  return run_chunk


def make_data_mesh(num_devices: int,
                   batch_size: int) -> jax.sharding.Mesh | None:
  """A 1-D device mesh with axis "data", or None for one device.

  Args:
    num_devices: devices to use; 0 means every device.
    batch_size: the global batch, which must split evenly over the devices.

  Raises:
    ValueError: for more devices than exist, or a batch that does not split.
  """
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
