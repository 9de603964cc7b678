"""Trains a base optimizer and base+CR side by side (sec. 3.2, appendix A).

    summary = train_lib.train_and_evaluate(config, workdir)

Both runs start from the same parameters and see the same batches, so their
curves differ only by the CR step length. Each of `config.num_seeds` seeds
(seed i draws its initialization and its batch order from `config.seed + i`)
is one more pair of runs; the seeds are vectorized (`jax.vmap`) inside the
jitted `lax.scan` of each chunk, so they train as one program.

Per iteration t, for each run with parameters x_t and batch (X_t, y_t):

    F_t = F(x_t; X_t, y_t),  grad_t = dF/dx        # eq. 16, by backprop
    g_t = base update of grad_t                    # e.g. -lr(t) grad_t (SGD)
    base:  x_{t+1} = x_t + g_t
    CR:    x_{t+1} = x_t + alpha_t g_t             # alpha_t of eq. 37

with lr(t) = lr_0 * 0.95 ** (t / 100) (appendix A) and alpha_t from the cubic
model of eq. 8 along g_t (`experiments.steps.make_cr_step`). The paper plots
the CR learning rate in the base optimizer's units, alpha_t * lr(t)
(`learning_rate_cr`).

The workdir receives
  config.json         the config (a resumed run must match it),
  metrics.jsonl       one JSON object per iteration and seed, streamed per
                      chunk (checked whole on resume:
                      `summary.check_metrics`),
  checkpoints/        both runs' params and optimizer states (orbax), after
                      every chunk, with checkpoints.sha256.json beside it,
  figure.png          the paper's two-panel figure (`plots.plot_run`),
  summary.json        `summary.summarize_seeds` (each seed, the median and
                      the interquartile range over seeds, claim counts)
                      plus data and timings.

Steps run in chunks of `config.training.chunk_size` under `jax.lax.scan`
inside one jitted function; a killed run loses at most one chunk, and a
resumed run is bit-identical to an uninterrupted one. Batches come from the
stateless sampler of `input_pipeline.batch_indices`.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import lrcr
from experiments import checkpoints
from experiments import input_pipeline
from experiments import models
from experiments import optimizers
from experiments import plots
from experiments import steps
from experiments import summary as summary_lib

Array = jax.Array

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FIGURE_FILE = "figure.png"
SUMMARY_FILE = "summary.json"

#: What `config.training.nonfinite` may be.
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "stop")

#: The keys of every metrics record, in file order.
METRIC_KEYS: tuple[str, ...] = (
    "step", "seed", "loss_base", "loss_cr", "alpha", "base_learning_rate",
    "learning_rate_cr", "slope", "curvature", "sqnorm", "predicted_decrease",
    "grad_norm_base", "grad_norm_cr", "skipped_base", "skipped_cr", "sigma",
    "alpha_cv", "accepted")
_INT_METRICS = frozenset({"step", "seed", "skipped_base", "skipped_cr",
                          "accepted"})

# Config keys that may change between a run and its resumption: a longer
# num_steps extends a finished run, and the rest do not change the numbers.
# num_devices only changes float rounding, so a run may move to another host.
RESUMABLE_CHANGES: tuple[str, ...] = ("training.num_steps",
                                      "training.progress",
                                      "training.num_devices")


class TrainState(NamedTuple):
  """Parameters and optimizer states of both runs, [S, ...] over seeds."""
  params_base: Any
  opt_base: Any
  params_cr: Any
  opt_cr: Any


# ---------------------------------------------------------------------------
# Config checks that nothing downstream makes (the optimizers, the transform
# and `steps.CROptions` check their own keys).


def check_config(config: Any) -> None:
  """Raises ValueError, naming the key and the fix, for a bad training key."""
  for key in ("optimizer.learning_rate", "optimizer.sigma", "model.init_scale",
              "training.num_steps", "training.batch_size",
              "training.chunk_size"):
    section, name = key.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0):
      raise ValueError(f"config.{key}={value!r}: must be a finite number > 0; "
                       f"pass e.g. --config.{key}=<value>.")
  num_seeds = config.get("num_seeds", 1)
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or \
      num_seeds < 1:
    raise ValueError(f"config.num_seeds={num_seeds!r}: must be an integer >= "
                     "1; pass e.g. --config.num_seeds=5.")
  if config.training.nonfinite not in NONFINITE_POLICIES:
    raise ValueError(
        f"config.training.nonfinite={config.training.nonfinite!r}: expected "
        f"one of {', '.join(NONFINITE_POLICIES)} ('skip' leaves a run "
        "unchanged at a non-finite step, 'stop' raises after saving the last "
        "finite state).")
  claim_kind = config.get("claim_kind", None)
  if claim_kind and claim_kind not in summary_lib.CLAIM_KINDS:
    raise ValueError(
        f"config.claim_kind={claim_kind!r}: expected one of "
        f"{', '.join(summary_lib.CLAIM_KINDS)}, or '' for no claim check.")


def validate_config(config: Any) -> tuple[
    optax.Schedule, optax.GradientTransformation,
    optax.GradientTransformationExtraArgs, steps.CROptions]:
  """Every refusal a config can get before data or files are touched.

  Returns:
    What the checks build: the base learning-rate schedule, the base and the
    CR optimizer, and the CR step's `steps.CROptions`.

  Raises:
    ValueError: naming the key and the fix (`check_config`, the optimizers,
      the transform and `steps.CROptions`).
  """
  check_config(config)
  schedule = optimizers.make_schedule(config.optimizer)
  return (schedule, optimizers.make_base_optimizer(config.optimizer, schedule),
          optimizers.make_cr_optimizer(config.optimizer, schedule),
          steps.CROptions.from_config(config.optimizer))


def config_key_error(config: Any, key: str) -> str | None:
  """None if `key` ("optimizer.sigma") names a config entry, else the message.

  The message names the key, the closest existing ones and the flag to use,
  e.g. "--config.optimizer.sigm: no such config key; did you mean
  optimizer.sigma?".
  """
  keys = sorted(_flatten(json.loads(config.to_json_best_effort())))
  if key in keys:
    return None
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  hint = (f"did you mean {' or '.join(close)}?" if close else
          f"the keys are {', '.join(keys)}.")
  return f"--config.{key}: no such config key; {hint}"


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
  old = _flatten(saved)
  new = _flatten(json.loads(config.to_json_best_effort(sort_keys=True)))
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
# The jitted chunk of steps.


def _all_true(tree: Any) -> Array:
  """Whether every element of every leaf is true (True for no leaves)."""
  leaves = [jnp.all(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _all_finite(tree: Any) -> Array:
  return _all_true(jax.tree.map(jnp.isfinite, tree))


def _curvature_finite(cr: steps.StepOutput) -> Array:
  """False where the CR step's slope, curvature or solve was not finite.

  The transform then takes alpha = 0 (`info.finite`): a frozen run, not a
  finite one, so the loop counts it as a non-finite step.
  """
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


def make_chunk_fn(config: Any, base_step, cr_step, schedule: optax.Schedule,
                  num_examples: int,
                  batch_sharding: jax.sharding.Sharding | None = None):
  """run_chunk(state, images, labels, data_keys, start, *, length).

  Runs steps start, ..., start + length - 1 of both runs of every seed under
  `lax.scan`; the seeds are a `jax.vmap` inside the scan body, so S seeds
  are one program.

  Args:
    config: the run config; reads `training.batch_size`, `nonfinite`,
      `inject_nan_at_step` (tests only: that step's inputs are NaN) and
      `scan_unroll` (XLA on CPUs runs convolutions inside a loop body ~15x
      slower, so convolutional configs unroll their chunks), and
      `model.input_shape` (one example as the model takes it; () = flat).
    base_step: `steps.make_base_step(...)`.
    cr_step: `steps.make_cr_step(...)`.
    schedule: the base learning rate, for the metrics.
    num_examples: N.
    batch_sharding: data parallelism: the batch rows split over the mesh's
      "data" axis; parameters stay replicated and XLA reduces the per-sample
      sums across devices.

  Returns:
    The pure function. `state` is a `TrainState` whose leaves are [S, ...]
    and `data_keys` [S] keys; it returns (state, metrics of [length, S]
    arrays). Under `nonfinite="stop"` the first step at which any seed is
    not finite freezes every seed, so that the checkpoint before it holds
    one step for all of them.
  """
  training = config.training
  batch_size, stop = training.batch_size, training.nonfinite == "stop"
  input_shape = tuple(config.model.get("input_shape", ()) or ())
  nan_step = training.get("inject_nan_at_step", -1)

  def one_seed(state: TrainState, perms: Array, t: Array, first_epoch: Array,
               images: Array, labels: Array):
    """Both runs' step t for one seed (vmapped): outputs, ok flags, metrics."""
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

  def apply(state: TrainState, base, cr, apply_b, apply_c) -> TrainState:
    return TrainState(
        *_apply_if(apply_b, state.params_base, state.opt_base, base),
        *_apply_if(apply_c, state.params_cr, state.opt_cr, cr))

  def over_seeds(fn, *args, mapped):
    """jax.vmap of fn over the seed axis; a single seed runs unbatched.

    One seed is the common case, and a vmapped axis of size 1 still costs
    XLA batched kernels (Fig. 2 config, 2-core CPU: 297 against 386
    steps/s unbatched).
    """
    if jax.tree.leaves(args[0])[0].shape[0] > 1:
      return jax.vmap(fn, in_axes=tuple(0 if m else None for m in mapped))(
          *args)
    squeeze = lambda a: jax.tree.map(lambda x: x[0], a)
    out = fn(*[squeeze(a) if m else a for a, m in zip(args, mapped)])
    return jax.tree.map(lambda x: jnp.asarray(x)[None], out)

  def step_fn(carry, t, *, images, labels, perms, first_epoch):
    state, halted = carry
    base, cr, ok_b, ok_c, metrics = over_seeds(
        one_seed, state, perms, t, first_epoch, images, labels,
        mapped=(True, True, False, False, False, False))          # [S] each
    apply_b, apply_c = ok_b, ok_c
    if stop:
      all_ok = jnp.all(ok_b & ok_c)
      apply_b = apply_c = jnp.broadcast_to(all_ok & ~halted, ok_b.shape)
      halted = halted | ~all_ok
    new_state = over_seeds(apply, state, base, cr, apply_b, apply_c,
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


def save_checkpoint(ckpt: checkpoints.Checkpointer, state: TrainState,
                    step: int, data_key: Array) -> None:
  """Both runs' state before step `step`, and the data key(s) [S]."""
  ckpt.save(step, {"state": state,
                   "data_key": jax.random.key_data(data_key)})


def restore_checkpoint(ckpt: checkpoints.Checkpointer, state: TrainState,
                       data_key: Array) -> tuple[TrainState, int, Array]:
  """(state, next step, data key(s)) from the latest verified checkpoint.

  Returns the inputs and step 0 when there is none.

  Raises:
    checkpoints.CheckpointError: for a corrupted checkpoint (naming the file).
  """
  step = ckpt.latest_step()
  if step is None:
    return state, 0, data_key
  ckpt.discard_after(step)    # steps saved but never verified
  tree = ckpt.restore(step, {"state": state,
                             "data_key": jax.random.key_data(data_key)})
  key = jax.random.wrap_key_data(jnp.asarray(tree["data_key"]),
                                 impl=jax.random.key_impl(data_key))
  return _as_device_state(tree["state"]), step, key


def _as_device_state(state: Any) -> Any:
  """Strongly typed device arrays, so the compiled chunk's inputs never vary."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)


def resume_metrics(path: str, step: int, seeds: list[int]) -> None:
  """Keeps the records of steps < `step`, after checking they are all there.

  The file must hold steps 0, ..., step - 1, once each, in order, one record
  per seed in `seeds` (`summary.check_metrics`, the check of
  `summary.read_metrics`); records of later steps (written before a kill,
  never checkpointed) and a torn last line are dropped.

  Raises:
    summary.MetricsError: naming the file, the problem and the way out.
  """
  if not os.path.exists(path):
    if step:
      raise summary_lib.MetricsError(
          f"{path} is missing, but the checkpoint is at step {step}. "
          f"{summary_lib.RECOVER_METRICS}")
    lines = []
  else:
    lines = [(n, r) for n, r in summary_lib.parse_lines(path)
             if not (isinstance(r.get("step"), int) and r["step"] >= step)]
    summary_lib.check_metrics(lines, path, seeds=seeds, num_steps=step)
  kept = [json.dumps(jsonable(r), allow_nan=False) + "\n" for _, r in lines]
  _atomic_write(path, "".join(kept).encode("utf-8"))


def _records(metrics: Mapping[str, np.ndarray],
             seeds: list[int]) -> list[dict[str, Any]]:
  """[length, S] arrays -> one JSON-ready dict per (step, seed), step-major."""
  def value(key, x):
    return int(x) if key in _INT_METRICS else jsonable(float(x))
  return [{"step": int(metrics["step"][i, j]), "seed": seed,
           **{key: value(key, metrics[key][i, j])
              for key in METRIC_KEYS[2:]}}
          for i in range(len(metrics["step"]))
          for j, seed in enumerate(seeds)]


def _append_metrics(path: str, records: list[dict[str, Any]]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def jsonable(x: Any) -> Any:
  """x with numpy scalars as Python numbers and non-finite floats as None."""
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


def _check_workdir(config: Any, workdir: str) -> str:
  """The absolute workdir; refuses one holding another run. Creates nothing."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config_path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(config_path):
    try:
      with open(config_path, "r", encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError) as err:
      raise ValueError(
          f"{config_path}: cannot read the saved config ({err}); the file is "
          "damaged. Use a new --workdir, or write back the config of that "
          "run to resume it.") from err
    check_resumable(saved, config, workdir)
  elif os.path.exists(os.path.join(workdir, CHECKPOINT_DIR)):
    raise ValueError(
        f"{os.path.join(workdir, CHECKPOINT_DIR)} exists but {config_path} "
        "does not, so the run cannot be checked against the config. Use a "
        "new --workdir.")
  return workdir


def _load_data(config: Any) -> input_pipeline.Dataset:
  dataset = input_pipeline.load_dataset(
      config.data.name, config.data.source, config.data.path or None,
      split=config.data.get("split", "train"))
  try:
    input_pipeline.validate_batch_size(dataset, config.training.batch_size)
  except input_pipeline.DataError as err:
    raise input_pipeline.DataError(
        f"config.training.batch_size: {err} Pass e.g. "
        f"--config.training.batch_size={min(32, dataset.num_examples)}."
    ) from err
  shape = tuple(config.model.get("input_shape", ()) or ())
  if shape and math.prod(shape) != dataset.images.shape[1]:
    raise ValueError(
        f"config.model.input_shape={shape} holds {math.prod(shape)} values, "
        f"but the {dataset.name} examples have {dataset.images.shape[1]}; use "
        "e.g. (28, 28) or (28, 28, 1) for MNIST and (32, 32, 3) for CIFAR-10.")
  return dataset


#: summary.json fields about the last training; a resume with nothing to
#: train keeps those of the run that trained.
_TIMING_FIELDS = ("wall_time_s", "compile_time_s", "steps_per_s")


def _write_summary(config: Any, workdir: str, dataset, extra: dict[str, Any],
                   base_name: str) -> dict[str, Any]:
  """summary.json and figure.png from every record so far."""
  records = summary_lib.read_metrics(os.path.join(workdir, METRICS_FILE))
  result = dict(summary_lib.summarize_seeds(
      records, num_classes=dataset.num_classes,
      claim_kind=config.get("claim_kind", None) or None))
  result.update(run=config.name, figure=config.get("figure", ""),
                data=dataset.description, data_source=dataset.source, **extra)
  seeds = config.get("num_seeds", 1)
  plots.plot_run(
      records, os.path.join(workdir, FIGURE_FILE),
      title=(f"{config.get('figure', '')} {config.name}: {base_name} vs "
             f"{base_name}+CR, lr {config.optimizer.learning_rate:g}, sigma "
             f"{config.optimizer.sigma:g}, {seeds} seed{'s' * (seeds > 1)}; "
             f"data: {dataset.description}").strip(), base_name=base_name)
  _atomic_write(os.path.join(workdir, SUMMARY_FILE),
                (json.dumps(jsonable(result), indent=2, allow_nan=False)
                 + "\n").encode("utf-8"))
  return result


def _previous_timings(workdir: str) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, SUMMARY_FILE), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return {}
  return {key: saved[key] for key in _TIMING_FIELDS if key in saved}


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains base and base+CR side by side and writes the run's record.

  Resumes from the last checkpoint of `workdir` when the config matches
  `workdir/config.json` (a longer `training.num_steps` extends the run).

  Args:
    config: a run config (see `configs/base.py`).
    workdir: the directory of the run; created if needed.

  Returns:
    The summary: `summary.summarize_seeds` of all records so far (each
    seed's numbers under `per_seed`, medians over seeds at the top level and
    under `median`, quartiles under `iqr`), plus `run`,
    `figure`, `data`, `data_source`, `num_params`, `wall_time_s`,
    `compile_time_s`, `steps_per_s`, `resumed_from_step` and `stopped`.

  Raises:
    ValueError: for a bad config (naming the key), a batch larger than the
      data, a workdir holding a run with another config, or a corrupted
      checkpoint (`checkpoints.CheckpointError`, naming the file).
    input_pipeline.DataError: when the data cannot be loaded.
    FloatingPointError: under `training.nonfinite="stop"`, at the first
      non-finite step, after the metrics and the last finite state are saved.
  """
  # Set up: everything that can refuse the config or the data runs before
  # any file is written.
  wall_start = time.perf_counter()
  schedule, base_tx, cr_tx, options = validate_config(config)
  training = config.training
  workdir = _check_workdir(config, workdir)
  dataset = _load_data(config)
  os.makedirs(workdir, exist_ok=True)
  model = models.make_model(config.model, dataset.num_classes)
  images = jnp.asarray(dataset.images, jnp.float32)   # [N, D], on device
  labels = jnp.asarray(dataset.labels, jnp.int32)     # [N]
  # Seed i: its own initialization and batch order, from config.seed + i.
  seeds = [config.seed + i for i in range(config.get("num_seeds", 1))]
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(
      jnp.asarray(seeds, jnp.int32))                  # [S, 2]
  init_keys, data_keys = keys[:, 0], keys[:, 1]
  shape = tuple(config.model.get("input_shape", ()) or images.shape[1:])
  params = jax.vmap(lambda k: model.init(
      k, images[:1].reshape((1,) + shape))["params"])(init_keys)  # [S, ...]
  state = _as_device_state(TrainState(
      params, jax.vmap(base_tx.init)(params), params,
      jax.vmap(cr_tx.init)(params)))

  # Restore.
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  state, start, data_keys = restore_checkpoint(ckpt, state, data_keys)
  if start > training.num_steps:
    raise ValueError(
        f"{ckpt.directory} is at step {start}, past "
        f"config.training.num_steps={training.num_steps}; pass "
        f"--config.training.num_steps>={start} or use a new --workdir.")
  if start:
    logging.info("Resuming %s from step %d.", workdir, start)
  mesh = make_data_mesh(training.get("num_devices", 0), training.batch_size)
  batch_sharding = None
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data"))
    state, images, labels, data_keys = jax.device_put(
        (state, images, labels, data_keys), replicated)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  resume_metrics(metrics_path, start, seeds)
  _atomic_write(os.path.join(workdir, CONFIG_FILE), (config.to_json_best_effort(
      indent=2, sort_keys=True) + "\n").encode("utf-8"))

  # Loop: one jitted lax.scan per chunk, then write metrics and checkpoint.
  run_chunk = jax.jit(make_chunk_fn(
      config, steps.make_base_step(model, base_tx),
      steps.make_cr_step(model, cr_tx, options), schedule,
      dataset.num_examples, batch_sharding), static_argnames="length")
  compiled: dict[int, Any] = {}
  compile_time = train_time = 0.0
  base_name = optimizers.DISPLAY_NAMES[optimizers.check_name(
      config.optimizer.name)]
  bar = tqdm.tqdm(total=training.num_steps, initial=start,
                  desc=f"{config.name}: {base_name} vs {base_name}+CR"
                  + (f", {len(seeds)} seeds" if len(seeds) > 1 else ""),
                  unit="it", file=sys.stderr, dynamic_ncols=True,
                  disable=not training.progress)
  failure, step = None, start
  try:
    while step < training.num_steps and not failure:
      length = min(training.chunk_size - step % training.chunk_size,
                   training.num_steps - step)
      args = (state, images, labels, data_keys, jnp.int32(step))
      if length not in compiled:
        tic = time.perf_counter()
        compiled[length] = run_chunk.lower(*args, length=length).compile()
        compile_time += time.perf_counter() - tic
      tic = time.perf_counter()
      state, metrics = compiled[length](*args)
      metrics = jax.device_get(metrics)                  # [length, S] each
      train_time += time.perf_counter() - tic
      records, next_step = _records(metrics, seeds), step + length
      skipped = {name: np.argwhere(metrics[key]) for name, key in (
          ("base", "skipped_base"), ("CR", "skipped_cr"))}
      bad_steps = np.flatnonzero(
          (metrics["skipped_base"] | metrics["skipped_cr"]).any(axis=1))
      if training.nonfinite == "stop" and bad_steps.size:
        i = int(bad_steps[0])
        records, next_step = records[:(i + 1) * len(seeds)], step + i
        where = [f"the {name} run of seed {seeds[j]}"
                 for name, hits in skipped.items() for k, j in hits if k == i]
        failure = (
            f"Non-finite loss, update or curvature at step {step + i} in "
            f"{', '.join(where)} of {config.name} "
            "(config.training.nonfinite='stop'). "
            f"The metrics up to that step and the last finite state of every "
            f"seed (before step {step + i}) are saved in {workdir}. A workdir "
            "keeps its config, so try other settings in a new --workdir: a "
            "smaller --config.optimizer.learning_rate, a larger "
            "--config.optimizer.sigma, or --config.training.nonfinite=skip.")
      elif bad_steps.size:
        hits = [f"{step + k} ({name}, seed {seeds[j]})"
                for name, found in skipped.items() for k, j in found]
        logging.warning(
            "%s: skipped %d non-finite step(s) (loss, update or curvature), "
            "left unchanged: %s%s", config.name, len(hits),
            ", ".join(hits[:10]), " ..." if len(hits) > 10 else "")
      _append_metrics(metrics_path, records)
      save_checkpoint(ckpt, state, next_step, data_keys)
      last = records[-len(seeds):]
      bar.set_postfix(
          {key: _median_of(last, key) for key in ("loss_base", "loss_cr",
                                                  "alpha")}, refresh=False)
      bar.update(next_step - step)         # draws the readouts of this chunk
      step = next_step
  finally:
    bar.close()
    ckpt.finish()

  # Summarise.
  timings = dict(
      compile_time_s=compile_time,
      steps_per_s=(step - start) / train_time if train_time > 0 else None,
      wall_time_s=time.perf_counter() - wall_start)
  if step == start:
    timings.update(_previous_timings(workdir))
  result = _write_summary(config, workdir, dataset, dict(
      num_params=lrcr.num_params(jax.tree.map(lambda a: a[0], params)),
      resumed_from_step=start, stopped=failure, **timings), base_name)
  logging.info("%s: %d steps of %d seed(s) in %.1f s (%.1f steps/s after "
               "%.1f s of compilation); summary in %s", config.name,
               step - start, len(seeds), timings["wall_time_s"],
               timings["steps_per_s"] or 0.0, compile_time, workdir)
  if failure:
    raise FloatingPointError(failure)
  return result


def _median_of(records: list[dict[str, Any]], key: str) -> float | None:
  # NaN stays visible in the progress readout (summary's medians drop it).
  values = [r[key] for r in records if r.get(key) is not None]
  return float(np.median(values)) if values else None
