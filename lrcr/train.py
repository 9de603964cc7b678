"""Trains a base optimizer and base+CR side by side (sec. 3.2, appendix A).

    summary = lrcr.train.train_and_evaluate(config, workdir)

Both runs start from the same parameters and see the same batches, so their
curves differ only by the CR step length. Per iteration t, for each run with
parameters x_t and batch (X_t, y_t):

    F_t = F(x_t; X_t, y_t),  grad_t = dF/dx        # eq. 16, by backprop
    g_t = base update of grad_t                    # e.g. -lr(t) grad_t (SGD)
    base:  x_{t+1} = x_t + g_t
    CR:    x_{t+1} = x_t + alpha_t g_t             # alpha_t of eq. 37

with lr(t) = lr_0 * 0.95 ** (t / 100) (appendix A) and alpha_t from the cubic
model of eq. 8 along g_t, whose slope and curvature come from the low-rank
engine (`lrcr.lowrank_curvature_fn`). The paper plots the CR learning rate in
the base optimizer's units, alpha_t * lr(t) (`learning_rate_cr`).

The workdir receives
  config.json         the config (a resumed run must match it),
  metrics.jsonl       one JSON object per iteration, streamed per chunk,
  checkpoint.msgpack  both runs' params and optimizer states, written
                      atomically after every chunk,
  figure.png          the paper's two-panel figure (`lrcr.plots.plot_run`),
  summary.json        `lrcr.summary.summarize_run` plus data and timings.

Steps run in chunks of `config.training.chunk_size` under `jax.lax.scan`
inside one jitted function; a killed run loses at most one chunk, and a
resumed run is bit-identical to an uninterrupted one.

Batches come from a stateless sampler: epoch e is the permutation of the
N example indices drawn from (seed, e), cut into N // B batches of B (the last
N mod B indices of each permutation are left out that epoch). The batch of
step t is therefore a function of t alone: slice t mod (N // B) of epoch
t // (N // B).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from lrcr import averaging as averaging_lib
from lrcr import data as data_lib
from lrcr import fused
from lrcr import mlp
from lrcr import nets
from lrcr import optimizers
from lrcr import plots
from lrcr import summary as summary_lib
from lrcr import transform
from lrcr.directional import autodiff_curvature_fn, lowrank_curvature_fn

Array = jax.Array

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.msgpack"
FIGURE_FILE = "figure.png"
SUMMARY_FILE = "summary.json"

#: What `config.optimizer.curvature` may be: all exact, "fused" the fastest.
CURVATURE_PATHS: tuple[str, ...] = ("fused", "lowrank", "autodiff")

#: What `config.training.nonfinite` may be.
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "stop")

#: The keys of every metrics record, in file order.
METRIC_KEYS: tuple[str, ...] = (
    "step", "loss_base", "loss_cr", "alpha", "base_learning_rate",
    "learning_rate_cr", "slope", "curvature", "sqnorm", "predicted_decrease",
    "grad_norm_base", "grad_norm_cr", "skipped_base", "skipped_cr", "sigma",
    "alpha_cv", "accepted")
_INT_METRICS = frozenset({"step", "skipped_base", "skipped_cr", "accepted"})

# Config keys that may change between a run and its resumption: a longer
# num_steps extends a finished run, and the rest do not change the numbers.
# num_devices only changes float rounding, so a run may move to another host.
RESUMABLE_CHANGES: tuple[str, ...] = ("training.num_steps",
                                      "training.progress",
                                      "training.num_devices")


class TrainState(NamedTuple):
  """Parameters and optimizer states of the base run and of the CR run."""
  params_base: Any
  opt_base: Any
  params_cr: Any
  opt_cr: Any


# ---------------------------------------------------------------------------
# Config checks.


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_positive_number(x: Any) -> bool:
  return (isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
          and math.isfinite(float(x)) and float(x) > 0)


def validate_config(config: Any) -> None:
  """Checks a run config before anything expensive happens.

  The batch size is checked against the data later, once it is loaded.

  Args:
    config: the `ml_collections.ConfigDict` of a run (see `configs/base.py`).

  Raises:
    ValueError: naming the offending key and how to fix it.
  """
  opt, model, training = config.optimizer, config.model, config.training
  optimizers.check_name(opt.name)
  if not _is_positive_number(opt.sigma):
    raise ValueError(
        f"config.optimizer.sigma={opt.sigma!r}: sigma must be a finite number "
        "> 0 (the paper uses 100 or 1000); pass e.g. "
        "--config.optimizer.sigma=100.")
  if not _is_positive_number(opt.learning_rate):
    raise ValueError(
        f"config.optimizer.learning_rate={opt.learning_rate!r}: must be a "
        "finite number > 0; pass e.g. --config.optimizer.learning_rate=0.01.")
  if not (_is_int(opt.get("decay_steps", 100)) and
          opt.get("decay_steps", 100) >= 1):
    raise ValueError(
        f"config.optimizer.decay_steps={opt.decay_steps!r}: must be an "
        "integer >= 1 (appendix A: 100).")
  if not _is_positive_number(opt.get("decay_rate", 0.95)):
    raise ValueError(
        f"config.optimizer.decay_rate={opt.decay_rate!r}: must be a number "
        "> 0 (appendix A: 0.95; 1 for no decay).")
  if not _is_positive_number(model.init_scale):
    raise ValueError(
        f"config.model.init_scale={model.init_scale!r}: the weights are drawn "
        "from U(-init_scale, init_scale), so it must be > 0 (the paper uses "
        "0.1 for a plateau start and 0.2 otherwise).")
  if not (_is_int(model.depth) and model.depth >= 0):
    raise ValueError(f"config.model.depth={model.depth!r}: the number of "
                     "hidden layers must be an integer >= 0 (the paper: 12).")
  if not (_is_int(model.width) and model.width >= 1):
    raise ValueError(f"config.model.width={model.width!r}: the hidden width "
                     "must be an integer >= 1 (the paper: 128).")
  if not (_is_int(training.num_steps) and training.num_steps >= 1):
    raise ValueError(
        f"config.training.num_steps={training.num_steps!r}: must be an "
        "integer >= 1; pass e.g. --config.training.num_steps=3000.")
  if not (_is_int(training.batch_size) and training.batch_size >= 1):
    raise ValueError(
        f"config.training.batch_size={training.batch_size!r}: must be an "
        "integer >= 1 (the paper: 32).")
  if not (_is_int(training.chunk_size) and training.chunk_size >= 1):
    raise ValueError(
        f"config.training.chunk_size={training.chunk_size!r}: the number of "
        "steps per jitted chunk and checkpoint must be an integer >= 1; pass "
        "e.g. --config.training.chunk_size=100.")
  if training.nonfinite not in NONFINITE_POLICIES:
    raise ValueError(
        f"config.training.nonfinite={training.nonfinite!r}: expected one of "
        f"{', '.join(NONFINITE_POLICIES)} ('skip' leaves a run unchanged at a "
        "non-finite step, 'stop' raises after saving the last finite state).")
  curvature = config.optimizer.get("curvature", "fused")
  if curvature not in CURVATURE_PATHS:
    raise ValueError(
        f"config.optimizer.curvature={curvature!r}: expected one of "
        f"{', '.join(CURVATURE_PATHS)} (all exact; 'fused' is the fastest).")
  rows = config.optimizer.get("curvature_batch_size", 0)
  if not (_is_int(rows) and 0 <= rows):
    raise ValueError(
        f"config.optimizer.curvature_batch_size={rows!r}: the rows of each "
        "batch the curvature is taken on; an integer >= 1, or 0 for all.")
  every = config.optimizer.get("curvature_every", 1)
  if not (_is_int(every) and every >= 1):
    raise ValueError(
        f"config.optimizer.curvature_every={every!r}: refresh alpha every "
        "that many steps; an integer >= 1 (1 = every step, the paper).")
  granularity = config.optimizer.get("granularity", "global")
  if granularity not in transform.GRANULARITIES:
    raise ValueError(
        f"config.optimizer.granularity={granularity!r}: expected one of "
        f"{', '.join(transform.GRANULARITIES)}.")
  averaging = config.optimizer.get("averaging", "batch")
  if averaging not in averaging_lib.AVERAGINGS:
    raise ValueError(
        f"config.optimizer.averaging={averaging!r}: expected one of "
        f"{', '.join(averaging_lib.AVERAGINGS)}.")
  if averaging != "batch" and (
      optimizers.check_name(config.optimizer.name) != "sgd" or
      granularity != "global" or
      config.optimizer.get("adaptive_sigma", False) or rows or every > 1):
    raise ValueError(
        f"config.optimizer.averaging={averaging!r} is section 3.1's option "
        "for plain SGD: it needs optimizer.name='sgd', granularity='global', "
        "adaptive_sigma=False, curvature_batch_size=0 and curvature_every=1.")
  claim_kind = config.get("claim_kind", None)
  if claim_kind and claim_kind not in summary_lib.CLAIM_KINDS:
    raise ValueError(
        f"config.claim_kind={claim_kind!r}: expected one of "
        f"{', '.join(summary_lib.CLAIM_KINDS)}, or '' for no claim check.")


def _config_dict(config: Any) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resumable(saved: Mapping[str, Any], config: Any,
                    workdir: str) -> None:
  """Raises ValueError if `config` differs from the saved one of `workdir`.

  Keys in `RESUMABLE_CHANGES` may differ.
  """
  old, new = _flatten(saved), _flatten(_config_dict(config))
  diffs = [
      f"{key}: {old.get(key, '<absent>')!r} (saved) vs "
      f"{new.get(key, '<absent>')!r} (now)"
      for key in sorted(set(old) | set(new))
      if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]
  if diffs:
    raise ValueError(
        f"{os.path.join(workdir, CONFIG_FILE)}: the workdir holds a run with "
        f"a different config ({'; '.join(diffs)}). Use a new --workdir, or "
        "the saved values to resume that run.")


# ---------------------------------------------------------------------------
# Batches.


def batch_indices(data_key: Array, step: Any, num_examples: int,
                  batch_size: int) -> Array:
  """The example indices [B] of the batch of `step` (see the module doc).

  Args:
    data_key: the data RNG key.
    step: the iteration t (a Python or traced integer).
    num_examples: N.
    batch_size: B, at most N.

  Returns:
    int32 indices [B]: slice t mod (N // B) of the permutation of epoch
    t // (N // B), drawn from fold_in(data_key, epoch).
  """
  epoch, offset = _epoch_and_offset(step, num_examples, batch_size)
  perm = _permutation(data_key, epoch, num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)


def _epoch_and_offset(step: Any, num_examples: int,
                      batch_size: int) -> tuple[Array, Array]:
  steps_per_epoch = num_examples // batch_size
  step = jnp.asarray(step, jnp.int32)
  return step // steps_per_epoch, (step % steps_per_epoch) * batch_size


def _permutation(data_key: Array, epoch: Any, num_examples: int) -> Array:
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The jitted chunk of steps.


def _all_finite(tree: Any) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(pred: Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_chunk_fn(
    model: mlp.MLP,
    base_tx: optax.GradientTransformation,
    cr_tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    *,
    num_examples: int,
    batch_size: int,
    nonfinite: str = "skip",
    inject_nan_at_step: int = -1,
    curvature: str = "fused",
    gradient_direction: bool = False,
    batch_sharding: jax.sharding.Sharding | None = None,
    input_shape: tuple[int, ...] = (),
    unroll: int | bool = 1,
    granularity: str = "global",
    curvature_batch_size: int = 0,
    averaging: str = "batch",
    sigma: float = 100.0,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
  """Builds `run_chunk(state, images, labels, data_key, start, *, length)`.

  `run_chunk` runs steps start .. start + length - 1 of both runs under
  `jax.lax.scan` and returns the new `TrainState` and the metrics of every
  step, a dict of [length] arrays keyed by `METRIC_KEYS`. It is pure: jit it
  with `length` static.

  A step whose loss or update is non-finite leaves that run's parameters and
  optimizer state unchanged and sets `skipped_base` / `skipped_cr` to 1.
  Under `nonfinite="stop"` the first such step also freezes both runs for the
  rest of the chunk, so the returned state is the last finite one.

  Args:
    model: the network.
    base_tx: the base optimizer.
    cr_tx: the base optimizer chained with `lrcr.scale_by_cubic_step`.
    schedule: the base learning rate lr(t), recorded per step.
    num_examples: N, the rows of `images`.
    batch_size: B.
    nonfinite: "skip" or "stop".
    inject_nan_at_step: for tests only: the inputs of this step are NaN.
    curvature: "fused" (reuse the gradient pass, `lrcr.fused`), "lowrank"
      (`lrcr.lowrank_curvature_fn`) or "autodiff" (`autodiff_curvature_fn`).
    gradient_direction: the base optimizer is plain SGD, so the fused path
      may use its Gram-matrix form.
    unroll: `lax.scan`'s unroll. XLA on CPUs runs convolutions inside a
      loop body about 15x slower than outside (measured on the CNN config),
      so convolutional configs unroll their chunks (`training.scan_unroll`).
    input_shape: the shape of one example as the model takes it (empty:
      the flat vector), e.g. (32, 32, 3) for a CNN, (28, 28) for an RNN.
    granularity: the CR step's granularity ("global", "layer", "variable");
      the fused path covers "global", the others use `lowrank_curvature_fn`.
    curvature_batch_size: if > 0, the curvature is taken on the first that
      many rows of each batch (the slope on all of them).
    averaging: section 3.1's option for SGD: "batch" (the paper),
      "mean_alpha" or "mean_alpha_g" (`lrcr.averaging`).
    sigma: the cubic weight, used by the non-"batch" averagings.
    batch_sharding: data parallelism: how each step's batch is laid out over
      the devices (rows split over the mesh's "data" axis). The parameters
      stay replicated and XLA reduces the per-sample sums across devices.

  Returns:
    The pure function `run_chunk`.
  """

  def loss_fn(params: Any, x: Array, y: Array) -> Array:
    return mlp.cross_entropy_loss(model.apply({"params": params}, x), y)

  def step_fn(carry: tuple[TrainState, Array], inputs, *, images, labels,
              perms, first_epoch):
    state, halted = carry
    t = inputs
    epoch, offset = _epoch_and_offset(t, num_examples, batch_size)
    idx = jax.lax.dynamic_slice_in_dim(perms[epoch - first_epoch], offset,
                                       batch_size)                 # [B]
    x, y = images[idx], labels[idx]                                # [B, D], [B]
    if input_shape:                                  # [B, H, W, C] or [B, T, d]
      x = x.reshape((batch_size,) + tuple(input_shape))
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    if inject_nan_at_step >= 0:
      x = jnp.where(t == inject_nan_at_step, jnp.nan, x)

    # Base run: x_{t+1} = x_t + g_t.
    loss_b, grads_b = jax.value_and_grad(loss_fn)(state.params_base, x, y)
    updates_b, opt_b = base_tx.update(grads_b, state.opt_base,
                                      state.params_base)
    # CR run: x_{t+1} = x_t + alpha_t g_t, alpha_t of eq. 37 from the exact
    # slope (eq. 38) and curvature (eq. 39) of F along g_t at x_t.
    rows = curvature_batch_size or None
    if averaging != "batch":
      # Section 3.1's alternatives: per-sample alphas (lrcr.averaging).
      averaged = averaging_lib.averaged_sgd_update(
          model, state.params_cr, x, y, sigma, averaging)
      loss_c, grads_c = averaged.loss, averaged.grads
      updates_c, opt_c = averaged.updates, state.opt_cr
    elif (curvature == "fused" and granularity == "global" and
          isinstance(model, mlp.MLP)):
      loss_c, grads_c, cache = fused.value_grad_and_cache(
          model, state.params_cr, x, y)
      curvature_fn = fused.cached_curvature_fn(model, cache,
                                               gradient_direction, rows)
    else:
      loss_c, grads_c = jax.value_and_grad(loss_fn)(state.params_cr, x, y)
      xc, yc = x[:rows], y[:rows]
      curvature_fn = (
          autodiff_curvature_fn(loss_fn, xc, yc, granularity=granularity)
          if curvature == "autodiff"
          else lowrank_curvature_fn(model, xc, yc, granularity=granularity))
      if rows:    # the slope stays on the whole batch (exact)
        curvature_fn = _full_batch_slope(curvature_fn, grads_c)
    if averaging == "batch":
      updates_c, opt_c = cr_tx.update(
          grads_c, state.opt_cr, state.params_cr, curvature_fn=curvature_fn,
          value_fn=lambda p: loss_fn(p, x, y), value=loss_c)

    ok_b = jnp.isfinite(loss_b) & _all_finite(updates_b)
    ok_c = jnp.isfinite(loss_c) & _all_finite(updates_c)
    if nonfinite == "stop":
      apply_b = apply_c = ok_b & ok_c & ~halted
      halted = halted | ~(ok_b & ok_c)
    else:
      apply_b, apply_c = ok_b, ok_c
    new_state = TrainState(
        params_base=_select(
            apply_b, optax.apply_updates(state.params_base, updates_b),
            state.params_base),
        opt_base=_select(apply_b, opt_b, state.opt_base),
        params_cr=_select(
            apply_c, optax.apply_updates(state.params_cr, updates_c),
            state.params_cr),
        opt_cr=_select(apply_c, opt_c, state.opt_cr))

    # What this step computed (also when it was skipped).
    # For per-layer or per-weight alphas: the ||g_b||^2-weighted mean alpha
    # (the global alpha with the same projection on g), and block sums.
    info = optax.tree.get(opt_c, "info")
    total = lambda tree: sum(jnp.sum(a) for a in jax.tree.leaves(tree))
    sqnorm = total(info.sqnorm)
    alpha_tree = optax.tree.get(opt_c, "learning_rate")
    alpha = total(jax.tree.map(jnp.multiply, alpha_tree, info.sqnorm)) / \
        jnp.where(sqnorm > 0, sqnorm, 1.0)
    if not jax.tree.leaves(alpha_tree)[0].shape and len(
        jax.tree.leaves(alpha_tree)) == 1:
      alpha = jax.tree.leaves(alpha_tree)[0]      # the paper's single alpha
    base_lr = jnp.asarray(schedule(t), jnp.float32)
    alpha_cv = jnp.zeros((), jnp.float32)
    if averaging != "batch":
      # alpha in the units of the SGD direction -lr grad F, and the spread of
      # the per-sample alphas (coefficient of variation): the noise of 3.1.
      alpha = averaged.alpha / base_lr
      alpha_cv = averaged.alphas.std() / jnp.maximum(averaged.alphas.mean(),
                                                     1e-30)
      alpha_cv = jnp.where(jnp.isfinite(loss_c), alpha_cv, jnp.nan)
      nan = jnp.full((), jnp.nan, jnp.float32)
      info = info._replace(slope=nan, curvature=nan, sqnorm=nan,
                           predicted_decrease=nan)
      sqnorm = nan
    metrics = {
        "step": t,
        "loss_base": loss_b,
        "loss_cr": loss_c,
        "alpha": alpha,
        "base_learning_rate": base_lr,
        "learning_rate_cr": alpha * base_lr,  # in the base optimizer's units
        "slope": total(info.slope),
        "curvature": total(info.curvature),
        "sqnorm": sqnorm,
        "predicted_decrease": total(info.predicted_decrease),
        "sigma": optax.tree.get(opt_c, "sigma"),
        "accepted": jnp.asarray(optax.tree.get(opt_c, "accepted"),
                                jnp.int32),
        "alpha_cv": alpha_cv,
        "grad_norm_base": optax.tree.norm(grads_b),
        "grad_norm_cr": optax.tree.norm(grads_c),
        "skipped_base": (~ok_b).astype(jnp.int32),
        "skipped_cr": (~ok_c).astype(jnp.int32),
    }
    return (new_state, halted), metrics

  def run_chunk(state: TrainState, images: Array, labels: Array,
                data_key: Array, start: Array, *, length: int):
    # The permutations of every epoch this chunk touches, drawn once.
    steps_per_epoch = num_examples // batch_size
    num_epochs = (length - 1) // steps_per_epoch + 2
    first_epoch, _ = _epoch_and_offset(start, num_examples, batch_size)
    perms = jax.vmap(lambda e: _permutation(data_key, e, num_examples))(
        first_epoch + jnp.arange(num_epochs, dtype=jnp.int32))    # [E, N]
    body = functools.partial(step_fn, images=images, labels=labels,
                             perms=perms, first_epoch=first_epoch)
    steps = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    (state, _), metrics = jax.lax.scan(body, (state, jnp.array(False)), steps,
                                       unroll=unroll)
    return state, metrics

  return run_chunk


def _full_batch_slope(curvature_fn, grads):
  """curvature_fn with its slope replaced by the whole batch's g . grad F.

  Works for every granularity: the slope tree is a prefix of params, and each
  of its leaves gets the inner product of the direction and the gradient
  over the part of params under it (elementwise for "variable").
  """
  def block_slope(s, g, u):
    if not isinstance(g, (Mapping, list, tuple)) and jnp.shape(s) == jnp.shape(g):
      return g * u
    return optax.tree.vdot(g, u)

  def fn(params, direction):
    d = curvature_fn(params, direction)
    return d._replace(slope=jax.tree.map(block_slope, d.slope, grads,
                                         direction))
  return fn


#: The layer specs of `config.model.layers` strings (lrcr.nets).
_LAYER_SPECS = {"dense": nets.Dense, "conv": nets.Conv,
                "activation": nets.Activation, "avgpool": nets.AvgPool,
                "maxpool": nets.MaxPool, "flatten": nets.Flatten,
                "recurrent": nets.Recurrent}


def make_model(model_config: Any, num_classes: int):
  """`lrcr.MLP` (the paper's net) or an `lrcr.Sequential` from `config.model`.

  `model.kind` "mlp" uses depth, width, init_scale and use_bias.
  `model.kind` "sequential" reads `model.layers`, a string such as
  "conv:16:3:1,activation,maxpool,flatten,dense:64,activation" (conv:
  features:kernel:stride[:padding]; maxpool/avgpool[:window:stride];
  recurrent:features; dense:features), see configs/cifar10_cnn_sgd_plateau.py.
  """
  init = mlp.uniform_init(model_config.init_scale)
  kind = model_config.get("kind", "mlp")
  if kind == "mlp":
    return mlp.MLP(hidden_sizes=(model_config.width,) * model_config.depth,
                   num_classes=num_classes, kernel_init=init,
                   use_bias=model_config.use_bias)
  if kind != "sequential":
    raise ValueError(f"config.model.kind={kind!r}: expected 'mlp' or "
                     "'sequential'.")
  specs = []
  for item in str(model_config.layers).split(","):
    name, *args = item.strip().split(":")
    if name not in _LAYER_SPECS:
      raise ValueError(
          f"config.model.layers: unknown layer {name!r} in {item!r}; expected "
          f"one of {', '.join(_LAYER_SPECS)}.")
    if name == "conv":
      features, size, stride = (int(a) for a in args[:3])
      padding = args[3].upper() if len(args) > 3 else "SAME"
      specs.append(nets.Conv(features, (size, size), (stride, stride),
                             padding))
    elif name in ("maxpool", "avgpool"):
      window, stride = (int(a) for a in args) if args else (2, 2)
      specs.append(_LAYER_SPECS[name]((window, window), (stride, stride)))
    elif name in ("dense", "recurrent"):
      specs.append(_LAYER_SPECS[name](int(args[0])))
    else:
      specs.append(_LAYER_SPECS[name]())
  activation = {"relu": jax.nn.relu, "tanh": jnp.tanh}[
      model_config.get("activation", "relu")]
  return nets.Sequential(tuple(specs), num_classes, activation=activation,
                         use_bias=model_config.use_bias, kernel_init=init)


def make_data_mesh(num_devices: int, batch_size: int) -> jax.sharding.Mesh | None:
  """A 1-D device mesh with axis "data" for data-parallel training, or None.

  Args:
    num_devices: devices to use; 0 means every local device (all devices of
      the process, or of the whole slice after `jax.distributed.initialize`).
    batch_size: the global batch, which must split evenly over the devices.

  Returns:
    None when one device is used (no sharding needed), else the mesh.

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


# ---------------------------------------------------------------------------
# Files.


def _atomic_write(path: str, payload: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_checkpoint(path: str, state: TrainState, step: int,
                    data_key: Array) -> None:
  """Atomically writes both runs' state, the next step and the data key.

  Args:
    path: the checkpoint file (msgpack).
    state: the state before step `step`.
    step: the next step to run.
    data_key: the data RNG key.
  """
  tree = {"step": np.int64(step),
          "data_key": np.asarray(jax.random.key_data(data_key)),
          "state": jax.device_get(state)}
  _atomic_write(path, flax.serialization.to_bytes(tree))


def restore_checkpoint(path: str, target: TrainState,
                       data_key: Array) -> tuple[TrainState, int, Array]:
  """Reads a checkpoint written by `save_checkpoint`.

  Args:
    path: the checkpoint file.
    target: a state with the same structure, shapes and dtypes (a fresh one).
    data_key: a key of the same kind as the saved one.

  Returns:
    (state, step, data_key).

  Raises:
    ValueError: if the file does not match `target`.
  """
  template = {"step": np.int64(0),
              "data_key": np.asarray(jax.random.key_data(data_key)),
              "state": jax.device_get(target)}
  with open(path, "rb") as f:
    payload = f.read()
  try:
    tree = flax.serialization.from_bytes(template, payload)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f"{path}: cannot restore the checkpoint ({type(err).__name__}: "
        f"{err}). Use a new --workdir, or delete the file to start over."
    ) from err
  for new, old in zip(jax.tree.leaves(tree["state"]),
                      jax.tree.leaves(template["state"])):
    if np.shape(new) != np.shape(old) or np.asarray(new).dtype != old.dtype:
      raise ValueError(
          f"{path}: the checkpoint holds a {np.asarray(new).dtype} array of "
          f"shape {np.shape(new)} where the model has {old.dtype} "
          f"{np.shape(old)}. Use a new --workdir.")
  key = jax.random.wrap_key_data(jnp.asarray(tree["data_key"]),
                                 impl=jax.random.key_impl(data_key))
  return _as_device_state(tree["state"]), int(tree["step"]), key


def _as_device_state(state: Any) -> Any:
  """Strongly typed device arrays, so the compiled chunk's inputs never vary."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)


def _truncate_metrics(path: str, step: int) -> None:
  """Keeps the records of steps < `step` (and drops a torn last line)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, "r", encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get("step", step) < step:
        kept.append(json.dumps(record) + "\n")
  _atomic_write(path, "".join(kept).encode("utf-8"))


def _records(metrics: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """[length] arrays -> one JSON-ready dict per step (non-finite -> None)."""
  length = len(metrics["step"])
  records = []
  for i in range(length):
    record = {}
    for key in METRIC_KEYS:
      value = metrics[key][i]
      if key in _INT_METRICS:
        record[key] = int(value)
      else:
        value = float(value)
        record[key] = value if math.isfinite(value) else None
    records.append(record)
  return records


def _append_metrics(path: str, records: list[dict[str, Any]]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


# ---------------------------------------------------------------------------
# The entry point.


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains base and base+CR side by side and writes the run's record.

  Resumes from `workdir/checkpoint.msgpack` when it exists and the config
  matches `workdir/config.json` (a longer `training.num_steps` extends the
  run). See the module docstring for what is written.

  Args:
    config: a run config (see `configs/base.py`).
    workdir: the directory of the run; created if needed.

  Returns:
    The summary: `lrcr.summary.summarize_run` of all records so far, plus
    `run`, `figure`, `data` (the data actually used), `data_source`,
    `num_params`, `wall_time_s`, `compile_time_s`, `steps_per_s` and
    `resumed_from_step` (this invocation's).

  Raises:
    ValueError: for a bad config (naming the key), a batch larger than the
      data, or a workdir holding a run with another config.
    lrcr.data.DataError: when the data cannot be loaded.
    FloatingPointError: under `training.nonfinite="stop"`, at the first
      non-finite step, after the metrics and the last finite state are saved.
  """
  wall_start = time.perf_counter()
  validate_config(config)
  training = config.training
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, CONFIG_FILE)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  checkpoint_path = os.path.join(workdir, CHECKPOINT_FILE)
  if os.path.exists(config_path):
    with open(config_path, "r", encoding="utf-8") as f:
      check_resumable(json.load(f), config, workdir)
  elif os.path.exists(checkpoint_path):
    raise ValueError(
        f"{checkpoint_path} exists but {config_path} does not, so the run "
        "cannot be checked against the config. Use a new --workdir.")

  dataset = data_lib.load_dataset(config.data.name, config.data.source,
                                  config.data.path or None,
                                  split=config.data.get("split", "train"))
  try:
    data_lib.validate_batch_size(dataset, training.batch_size)
  except data_lib.DataError as err:
    raise data_lib.DataError(
        f"config.training.batch_size: {err} Pass e.g. "
        f"--config.training.batch_size={min(32, dataset.num_examples)}."
    ) from err

  # Model, optimizers, and the shared initialization (appendix A).
  model = make_model(config.model, dataset.num_classes)
  input_shape = tuple(config.model.get("input_shape", ()) or ())
  if input_shape and math.prod(input_shape) != dataset.images.shape[1]:
    raise ValueError(
        f"config.model.input_shape={input_shape} holds "
        f"{math.prod(input_shape)} values, but the {dataset.name} examples "
        f"have {dataset.images.shape[1]}; use e.g. (28, 28) or (28, 28, 1) "
        "for MNIST and (32, 32, 3) for CIFAR-10.")
  schedule = optimizers.make_schedule(config.optimizer)
  base_tx = optimizers.make_base_optimizer(config.optimizer, schedule)
  cr_tx = optimizers.make_cr_optimizer(config.optimizer, schedule)
  images = jnp.asarray(dataset.images, jnp.float32)   # [N, D], on device
  labels = jnp.asarray(dataset.labels, jnp.int32)     # [N]
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  params = model.init(init_key, images[:1].reshape(
      (1,) + (input_shape or images.shape[1:])))["params"]
  state = _as_device_state(TrainState(
      params_base=params, opt_base=base_tx.init(params),
      params_cr=params, opt_cr=cr_tx.init(params)))

  start = 0
  if os.path.exists(checkpoint_path):
    state, start, data_key = restore_checkpoint(checkpoint_path, state,
                                                data_key)
    if start > training.num_steps:
      raise ValueError(
          f"{checkpoint_path} is at step {start}, past "
          f"config.training.num_steps={training.num_steps}; pass "
          f"--config.training.num_steps>={start} or use a new --workdir.")
    logging.info("Resuming %s from step %d.", workdir, start)
  mesh = make_data_mesh(training.get("num_devices", 0), training.batch_size)
  batch_sharding = None
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data"))
    state, images, labels, data_key = jax.device_put(
        (state, images, labels, data_key), replicated)
    logging.info("Data parallel over %d devices: batch %d split %d per device.",
                 mesh.size, training.batch_size,
                 training.batch_size // mesh.size)
  _atomic_write(config_path, (config.to_json_best_effort(
      indent=2, sort_keys=True) + "\n").encode("utf-8"))
  _truncate_metrics(metrics_path, start)
  open(metrics_path, "a", encoding="utf-8").close()

  run_chunk = make_chunk_fn(
      model, base_tx, cr_tx, schedule, num_examples=dataset.num_examples,
      batch_size=training.batch_size, nonfinite=training.nonfinite,
      inject_nan_at_step=training.get("inject_nan_at_step", -1),
      curvature=config.optimizer.get("curvature", "fused"),
      gradient_direction=optimizers.check_name(config.optimizer.name) == "sgd",
      batch_sharding=batch_sharding, input_shape=input_shape,
      unroll=training.get("scan_unroll", 1),
      granularity=config.optimizer.get("granularity", "global"),
      curvature_batch_size=config.optimizer.get("curvature_batch_size", 0),
      averaging=config.optimizer.get("averaging", "batch"),
      sigma=float(config.optimizer.sigma))
  jitted = jax.jit(run_chunk, static_argnames="length")
  compiled: dict[int, Any] = {}
  compile_time = train_time = 0.0

  base_name = optimizers.DISPLAY_NAMES[optimizers.check_name(
      config.optimizer.name)]
  bar = tqdm.tqdm(total=training.num_steps, initial=start,
                  desc=f"{config.name}: {base_name} vs {base_name}+CR",
                  unit="it", file=sys.stderr, dynamic_ncols=True,
                  disable=not training.progress)
  failure = None
  step = start
  try:
    while step < training.num_steps:
      chunk = training.chunk_size
      length = min(chunk - step % chunk, training.num_steps - step)
      if length not in compiled:
        tic = time.perf_counter()
        compiled[length] = jitted.lower(
            state, images, labels, data_key, jnp.int32(step),
            length=length).compile()
        compile_time += time.perf_counter() - tic
      tic = time.perf_counter()
      state, metrics = compiled[length](state, images, labels, data_key,
                                        jnp.int32(step))
      metrics = jax.device_get(metrics)
      train_time += time.perf_counter() - tic

      records = _records(metrics)
      next_step = step + length
      bad = np.flatnonzero(metrics["skipped_base"] | metrics["skipped_cr"])
      if training.nonfinite == "stop" and bad.size:
        i = int(bad[0])
        records, next_step = records[:i + 1], step + i
        runs = [name for name, key in (("base", "skipped_base"),
                                       ("CR", "skipped_cr"))
                if metrics[key][i]]
        failure = (
            f"Non-finite loss or update at step {step + i} in the "
            f"{' and '.join(runs)} run(s) of {config.name} "
            "(config.training.nonfinite='stop'). The metrics up to that step "
            f"and the last finite state (before step {step + i}) are saved in "
            f"{workdir}. Lower config.optimizer.learning_rate or raise "
            "config.optimizer.sigma, or pass --config.training.nonfinite=skip.")
      _append_metrics(metrics_path, records)
      save_checkpoint(checkpoint_path, state, next_step, data_key)
      bar.update(next_step - step)
      last = records[-1]
      bar.set_postfix(loss_base=last["loss_base"], loss_cr=last["loss_cr"],
                      alpha=last["alpha"], refresh=False)
      step = next_step
      if failure:
        break
  finally:
    bar.close()

  records = summary_lib.read_metrics(metrics_path)
  result = dict(summary_lib.summarize_run(
      records, num_classes=dataset.num_classes,
      claim_kind=config.get("claim_kind", None) or None))
  steps_run = step - start
  result.update(
      run=config.name,
      figure=config.get("figure", ""),
      data=dataset.description,
      data_source=dataset.source,
      num_params=mlp.num_params(params),
      resumed_from_step=start,
      wall_time_s=time.perf_counter() - wall_start,
      compile_time_s=compile_time,
      steps_per_s=steps_run / train_time if train_time > 0 else None,
      stopped=failure)
  plots.plot_run(
      records, os.path.join(workdir, FIGURE_FILE),
      title=(f"{config.get('figure', '')} {config.name}: {base_name} vs "
             f"{base_name}+CR, lr {config.optimizer.learning_rate:g}, sigma "
             f"{config.optimizer.sigma:g}; data: {dataset.description}"
             ).strip(),
      base_name=base_name)
  result["wall_time_s"] = time.perf_counter() - wall_start
  _atomic_write(os.path.join(workdir, SUMMARY_FILE),
                (json.dumps(jsonable(result), indent=2, allow_nan=False)
                 + "\n").encode("utf-8"))
  logging.info("%s: %d steps in %.1f s (%.1f steps/s after %.1f s of "
               "compilation); summary in %s", config.name, steps_run,
               result["wall_time_s"], result["steps_per_s"] or 0.0,
               compile_time, workdir)
  if failure:
    raise FloatingPointError(failure)
  return result
