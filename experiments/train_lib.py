"""Trains a base optimizer and base+CR side by side (sec. 3.2, appendix A).

    summary = train_lib.train_and_evaluate(config, workdir)

Both runs start from the same parameters and see the same batches, so their
curves differ only by the CR step length; the `config.num_seeds` seeds (seed
i from `config.seed + i`) are vmapped in each chunk's jitted `lax.scan`. The
locked workdir receives config.json, data.json (the data's fingerprints),
metrics.jsonl, checkpoints/, figure.png and summary.json/.md, each written
atomically after every check; a killed run loses at most one chunk and
resumes bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import lrcr
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import models
from experiments import plots
from experiments import report
from experiments import stats
from experiments import steps
from experiments import summary as summary_lib
from experiments import workdir as workdir_lib

Array = jax.Array

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FIGURE_FILE = "figure.png"
SUMMARY_FILE = "summary.json"

# Config keys a resume may change: num_steps extends a run, the rest do not
# change the numbers (num_devices only the float rounding).
RESUMABLE_CHANGES = ("training.num_steps", "training.progress",
                     "training.num_devices")

_F32 = np.finfo(np.float32)

#: Numeric config keys: (integer?, low, high, why the range). Reals must be
#: float32 normal numbers; beyond these sanity ranges a float32 step vanishes
#: beside the weights or overflows.
NUMERIC_RANGES: dict[str, tuple[bool, float, float | None, str]] = {
    "optimizer.learning_rate": (False, 1e-10, 1e4, (
        "below it lr * g vanishes beside float32 weights, above it the first "
        "steps overflow; the paper uses 0.001 to 1")),
    "optimizer.sigma": (False, 1e-8, 1e12, (
        "the cubic weight of eq. 8: beyond this range its term either "
        "vanishes or leaves alpha below float32 resolution; the paper uses "
        "100 and 1000")),
    "optimizer.decay_rate": (False, float(_F32.tiny), 1e3, (
        "the factor lr(t) is multiplied by every decay_steps steps")),
    "model.init_scale": (False, 1e-10, 1e3, (
        "weights start ~ U(-init_scale, init_scale)")),
    "optimizer.decay_steps": (True, 1, None, "lr(t) = lr * decay_rate ** "
                              "(t / decay_steps)"),
    "optimizer.curvature_every": (True, 1, None, "1 = every step"),
    "optimizer.curvature_batch_size": (True, 0, None, "0 = the whole batch"),
    "training.num_steps": (True, 1, None, "the steps to train"),
    "training.batch_size": (True, 1, None, "examples per step"),
    "training.chunk_size": (True, 1, None, "steps per checkpoint"),
    "training.num_devices": (True, 0, None, "0 = every local device"),
    "training.inject_nan_at_step": (True, -1, None, "-1 = none"),
    "num_seeds": (True, 1, None, "seeds trained side by side"),
    "seed": (True, 0, 2**31 - 1, "an int32 seed"),
    "model.depth": (True, 0, None, "hidden layers"),
    "model.width": (True, 1, None, "units per hidden layer"),
}

#: Config keys holding tuples of integers, and their elements' lower bound.
INT_TUPLES = {"model.input_shape": 1, "model.conv_features": 1,
              "model.dense_features": 1, "model.pool_after": 0}


def check_number(key: str, value: Any) -> None:
  """Raises ValueError, with the valid range, unless `value` suits `key`."""
  is_int, low, high, why = NUMERIC_RANGES[key]
  kind = "an integer" if is_int else "a number"

  def refuse(problem):
    bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    raise ValueError(
        f"config.{key}={value!r}: {problem}. It must be {kind} {bounds} "
        f"({why}); pass --config.{key}=<a value in that range>.")

  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer) if is_int else (int, float, np.number)):
    refuse(f"not {kind}")
  if not is_int:
    if not math.isfinite(value) or value <= 0:
      refuse("must be a finite number > 0")
    if not float(_F32.tiny) <= value <= float(_F32.max):
      with np.errstate(over="ignore"):
        rounded = float(np.float32(value))
      refuse(f"rounds to {rounded:g} in float32, in which the run computes "
             f"(its normal numbers lie in [{_F32.tiny:.3g}, "
             f"{_F32.max:.3g}])")
  if value < low or (high is not None and value > high):
    refuse("out of range")


def check_config(config: Any) -> None:
  """Raises ValueError, naming the key, why, and the fix, for a bad key."""
  for key in NUMERIC_RANGES:
    section, _, name = key.rpartition(".")
    holder = config[section] if section else config
    if name in holder:
      check_number(key, holder[name])
  for key, low in INT_TUPLES.items():
    section, name = key.split(".")
    value = config[section].get(name, ())
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low
        for v in value):
      raise ValueError(f"config.{key}={value!r}: must be a tuple of integers "
                       f">= {low}; pass e.g. --config.{key}='(16, 32)'.")
  unroll = config.training.get("scan_unroll", 1)
  if not isinstance(unroll, bool) and not (
      isinstance(unroll, int) and unroll >= 1):
    raise ValueError(f"config.training.scan_unroll={unroll!r}: must be an "
                     "integer >= 1, or true for the whole chunk.")
  # lr(num_steps) (appendix A), in logs, must stay in the learning rate's range.
  opt, num_steps = config.optimizer, config.training.num_steps
  rate, decay_steps = opt.get("decay_rate", 0.95), opt.get("decay_steps", 100)
  log_end = math.log10(opt.learning_rate) + (num_steps / decay_steps *
                                             math.log10(rate))
  _, low, high, _ = NUMERIC_RANGES["optimizer.learning_rate"]
  if not math.log10(low) <= log_end <= math.log10(high):
    raise ValueError(
        f"config.optimizer.decay_rate={rate!r}: with decay_steps="
        f"{decay_steps} it takes the learning rate from "
        f"{opt.learning_rate:g} to 1e{log_end:.0f} by step {num_steps}, "
        f"outside [{low:g}, {high:g}] (where float32 steps vanish or "
        "overflow); pass a decay_rate closer to 1 or a larger "
        "--config.optimizer.decay_steps.")
  if config.training.nonfinite not in ("skip", "stop"):
    raise ValueError(
        f"config.training.nonfinite={config.training.nonfinite!r}: expected "
        "one of skip, stop ('skip' leaves a run unchanged at a non-finite "
        "step, 'stop' raises after saving the last finite state).")
  claim_kind = config.get("claim_kind", None)
  if claim_kind and claim_kind not in summary_lib.CLAIM_KINDS:
    raise ValueError(
        f"config.claim_kind={claim_kind!r}: expected one of "
        f"{', '.join(summary_lib.CLAIM_KINDS)}, or '' for no claim check.")


def validate_config(config: Any) -> tuple[Any, Any, Any, steps.CROptions]:
  """(base schedule, base optimizer, CR optimizer, `steps.CROptions`), after
  every refusal (ValueError) a config can get before data or files are read."""
  check_config(config)
  schedule = steps.make_schedule(config.optimizer)
  return (schedule, steps.make_base_optimizer(config.optimizer, schedule),
          steps.make_cr_optimizer(config.optimizer, schedule),
          steps.CROptions.from_config(config.optimizer))


def _flat(config: Any) -> dict[str, Any]:
  """{"section.key": value} of a ConfigDict or of its saved JSON."""
  return traverse_util.flatten_dict(config if isinstance(config, Mapping) else
                                    json.loads(config.to_json_best_effort()),
                                    sep=".")


def config_key_error(config: Any, key: str) -> str | None:
  """None if `key` names a config entry, else a message with close matches."""
  keys = sorted(_flat(config))
  if key in keys:
    return None
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  hint = (f"did you mean {' or '.join(close)}?" if close else
          f"the keys are {', '.join(keys)}.")
  return f"--config.{key}: no such config key; {hint}"


def trained_config(config: Any) -> dict[str, Any]:
  """The flat config as a checkpoint records it: all but RESUMABLE_CHANGES."""
  return {k: v for k, v in sorted(_flat(config).items())
          if k not in RESUMABLE_CHANGES}


def save_checkpoint(ckpt: workdir_lib.Checkpointer,
                    state: steps.TrainState, step: int,
                    data_key: Array) -> None:
  """Both runs' state before step `step`, and the data key(s) [S]."""
  ckpt.save(step, {"state": state,
                   "data_key": jax.random.key_data(data_key)})


def restore_checkpoint(ckpt: workdir_lib.Checkpointer,
                       state: steps.TrainState, data_key: Array
                       ) -> tuple[steps.TrainState, int, Array]:
  """(state, next step, data keys) from the latest verified checkpoint, or
  the inputs and step 0 when there is none (`workdir.CheckpointError` for a
  corrupted one)."""
  step = ckpt.latest_step()
  if step is None:
    return state, 0, data_key
  tree = ckpt.restore(step, {"state": state,
                             "data_key": jax.random.key_data(data_key)})
  key = jax.random.wrap_key_data(jnp.asarray(tree["data_key"]),
                                 impl=jax.random.key_impl(data_key))
  return _as_device_state(tree["state"]), step, key


def _as_device_state(state: Any) -> Any:
  """Strongly typed device arrays, so the compiled chunk's inputs never vary."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(
        f"{path}: cannot read the saved {what} ({err}); the file is damaged. "
        "Use a new --workdir, or write back the file of that run to resume "
        "it.") from err


def _check_saved_run(config: Any, workdir: str) -> bool:
  """Whether `workdir` holds checkpoints, after checking that their config
  matches config.json and `config`."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  manifest = workdir_lib.read_manifest(directory)
  if not manifest["steps"]:
    return False
  config_path = os.path.join(workdir, CONFIG_FILE)
  on_disk = trained_config(_read_json(config_path, "config"))
  trained = (manifest.get("metadata") or {}).get("config", on_disk)
  diffs = lambda new, names: "; ".join(
      f"{key}: {trained.get(key, '<absent>')!r} ({names[0]}) vs "
      f"{new.get(key, '<absent>')!r} ({names[1]})"
      for key in sorted(set(trained) | set(new))
      if trained.get(key) != new.get(key))
  edited = diffs(on_disk, ("checkpoint", CONFIG_FILE))
  if edited:
    raise ValueError(
        f"{config_path}: disagrees with the config the checkpoints in "
        f"{directory} were trained with ({edited}); it was edited. Write back "
        "the checkpoint's values to resume that run, or use a new --workdir.")
  changed = diffs(trained_config(config), ("saved", "now"))
  if changed:
    raise ValueError(
        f"{config_path}: the workdir holds a run with a different config "
        f"({changed}). Use a new --workdir, or the saved values to resume "
        "that run.")
  return True


def _check_data(workdir: str, fingerprint: dict[str, Any], saved: bool,
                allow_new_data: bool) -> list[dict[str, Any]]:
  """Every fingerprint the run trained on, by step; ValueError for a resume
  on other data, unless `allow_new_data`. The new data's `from_step` is
  None, for `_resumed_history` to set once the checkpoint is read."""
  path = os.path.join(workdir, DATA_FILE)
  if not saved:
    return [{"from_step": 0, **fingerprint}]
  history = _read_json(path, "data fingerprint")
  last = history[-1]
  if all(last.get(k) == fingerprint[k] for k in ("sha256", "num_examples")):
    return history
  show = lambda fp: (f"{fp.get('source')} {fp.get('path') or '-'}, "
                     f"{fp.get('num_examples')} examples, sha256 "
                     f"{str(fp.get('sha256'))[:16]}")
  if not allow_new_data:
    raise ValueError(
        f"{path}: the run in {workdir} trained on other data (saved: "
        f"{show(last)}; now: {show(fingerprint)}). Point the config back at "
        "that data, use a new --workdir, or pass --allow_new_data to "
        "continue on this data (the summary then records the change).")
  logging.warning("%s: continuing on new data (saved: %s; now: %s).",
                  workdir, show(last), show(fingerprint))
  return history + [{"from_step": None, **fingerprint, "override": True}]


def _resumed_history(history: list[dict[str, Any]],
                     fingerprint: dict[str, Any],
                     start: int) -> list[dict[str, Any]]:
  """`history` once the run resumes at step `start`, the checkpoint actually
  read (it may precede the manifest's last step); a run that starts over
  (start 0) has only its current data."""
  if start == 0:
    return [{"from_step": 0, **fingerprint}]
  if history[-1]["from_step"] is None:
    history = history[:-1] + [dict(history[-1], from_step=start)]
  return history


def _in_finalizer(frame: Any) -> bool:
  """Whether `frame` runs inside a gc callback or a __del__, where Python
  only prints ("Exception ignored in ...") an exception and goes on."""
  codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


class _Interrupts:
  """Ctrl-C stops the run at once, and is never lost in a finalizer: in the
  loop a SIGINT is held to the end of the chunk in flight (a second one raises
  at once); one landing in a gc callback or __del__, where Python ignores
  exceptions, is delivered again 50 ms later."""

  def __init__(self):
    self.holding = self.pending = False

  def _handler(self, signum, frame):
    if self.holding and not self.pending:
      self.pending = True
      print("\nStopping after this chunk (Ctrl-C again to stop now).",
            file=sys.stderr, flush=True)
    elif _in_finalizer(frame):
      threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    else:
      raise KeyboardInterrupt

  def check(self) -> None:
    """Raises the KeyboardInterrupt held since the last check, if any."""
    if self.pending:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def installed(self) -> Iterator[_Interrupts]:
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = signal.signal(signal.SIGINT, self._handler)
    try:
      yield self
    finally:
      signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class _Run:
  """What the loop and the summary need besides the state."""
  config: Any
  workdir: str
  dataset: input_pipeline.Dataset
  history: list[dict[str, Any]]            # data fingerprints, by step
  seeds: list[int]
  images: Array                              # [N, D]
  labels: Array                              # [N]
  run_chunk: Any
  ckpt: workdir_lib.Checkpointer
  start: int = 0
  num_params: int = 0
  compile_time: float = 0.0
  train_time: float = 0.0


def _nonfinite(run: _Run, metrics: Mapping[str, np.ndarray],
               records: list[dict[str, Any]],
               step: int) -> tuple[list[dict[str, Any]], int, str | None]:
  """(records to keep, next step, failure message or None) of a chunk."""
  hits = [(int(k), name, run.seeds[j]) for name in ("base", "CR")
          for k, j in np.argwhere(metrics[f"skipped_{name.lower()}"])]
  if hits and run.config.training.nonfinite == "stop":
    i = min(k for k, _, _ in hits)
    where = ", ".join(f"the {name} run of seed {seed}"
                      for k, name, seed in hits if k == i)
    return records[:(i + 1) * len(run.seeds)], step + i, (
        f"Non-finite loss, update or curvature at step {step + i} in "
        f"{where} of {run.config.name} (config.training.nonfinite='stop'). "
        f"The metrics up to that step and the last finite state of every "
        f"seed (before step {step + i}) are saved in {run.workdir}. A "
        "workdir keeps its config, so try other settings in a new --workdir: "
        "a smaller --config.optimizer.learning_rate, a larger "
        "--config.optimizer.sigma, or --config.training.nonfinite=skip.")
  if hits:
    logging.warning(
        "%s: skipped %d non-finite step(s) (loss, update or curvature), "
        "left unchanged: %s%s", run.config.name, len(hits),
        ", ".join(f"{step + k} ({name}, seed {seed})"
                  for k, name, seed in hits[:10]),
        " ..." if len(hits) > 10 else "")
  return records, step + len(metrics["step"]), None


def _train(run: _Run, state: steps.TrainState, data_keys: Array, bar: Any,
           interrupts: _Interrupts) -> tuple[int, str | None]:
  """Trains chunk by chunk from `run.start`; (steps done up to, failure)."""
  training, compiled = run.config.training, {}
  failure, step = None, run.start
  interrupts.holding = True
  while step < training.num_steps and not failure:
    interrupts.check()
    length = min(training.chunk_size - step % training.chunk_size,
                 training.num_steps - step)
    args = (state, run.images, run.labels, data_keys, jnp.int32(step))
    if length not in compiled:
      tic = time.perf_counter()
      compiled[length] = run.run_chunk.lower(*args, length=length).compile()
      run.compile_time += time.perf_counter() - tic
    tic = time.perf_counter()
    state, metrics = compiled[length](*args)
    metrics = jax.device_get(metrics)                  # [length, S] each
    run.train_time += time.perf_counter() - tic
    records, next_step, failure = _nonfinite(
        run, metrics, metrics_lib.to_records(metrics, run.seeds), step)
    metrics_lib.append(os.path.join(run.workdir, METRICS_FILE), records)
    save_checkpoint(run.ckpt, state, next_step, data_keys)
    last = records[-len(run.seeds):]
    bar.set_postfix({key: _median_of(last, key) for key in (
        "loss_base", "loss_cr", "alpha")}, refresh=False)
    bar.update(next_step - step)         # draws the readouts of this chunk
    step = next_step
  interrupts.check()
  interrupts.holding = False
  return step, failure


def _median_of(records: list[dict[str, Any]], key: str) -> float | None:
  # NaN stays visible in the progress readout (summary's medians drop it).
  values = [r[key] for r in records if r.get(key) is not None]
  return float(np.median(values)) if values else None


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


def _write_summary(run: _Run, extra: dict[str, Any]) -> dict[str, Any]:
  """summary.json/.md and figure.png from every record so far."""
  config, workdir, dataset, history = (run.config, run.workdir, run.dataset,
                                       run.history)
  records = metrics_lib.read_metrics(os.path.join(workdir, METRICS_FILE))
  result = dict(summary_lib.summarize_seeds(
      records, num_classes=dataset.num_classes,
      claim_kind=config.get("claim_kind", None) or None))
  result.update(run=config.name, figure=config.get("figure", ""),
                data=dataset.description, data_source=dataset.source,
                data_fingerprint=history[-1],
                data_changes=[h for h in history if h.get("override")],
                **extra)
  seeds, base = len(run.seeds), steps.optimizer_entry(config.optimizer)[0]
  plots.plot_run(
      records, os.path.join(workdir, FIGURE_FILE), base_name=base,
      title=(f"{config.get('figure', '')} {config.name}: {base} vs {base}+CR, "
             f"lr {config.optimizer.learning_rate:g}, sigma "
             f"{config.optimizer.sigma:g}, {seeds} seed{'s' * (seeds > 1)}; "
             f"data: {dataset.description}, sha256 "
             f"{history[-1]['sha256'][:12]}"
             + (" (changed during the run)" if result["data_changes"] else "")
             ).strip())
  report.write(workdir, "summary", result,
               summary_lib.summary_table_markdown([result]))
  return result


def _start(config: Any, workdir: str, txs: tuple[Any, ...],
           mesh: jax.sharding.Mesh | None,
           allow_new_data: bool) -> tuple[_Run, steps.TrainState, Array]:
  """Checks the saved run and the data, restores, writes the run's record;
  (run, state [S, ...], data keys [S]), seed i from config.seed + i."""
  schedule, base_tx, cr_tx, options = txs
  saved = _check_saved_run(config, workdir)
  dataset = _load_data(config)
  fingerprint = dataset.fingerprint()
  history = _check_data(workdir, fingerprint, saved, allow_new_data)
  model = models.make_model(config.model, dataset.num_classes)
  images = jnp.asarray(dataset.images, jnp.float32)   # [N, D], on device
  labels = jnp.asarray(dataset.labels, jnp.int32)     # [N]
  seeds = [config.seed + i for i in range(config.get("num_seeds", 1))]
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(
      jnp.asarray(seeds, jnp.int32))                  # [S, 2]
  init_keys, data_keys = keys[:, 0], keys[:, 1]
  shape = tuple(config.model.get("input_shape", ()) or images.shape[1:])
  params = jax.vmap(lambda k: model.init(
      k, images[:1].reshape((1,) + shape))["params"])(init_keys)  # [S, ...]
  state = _as_device_state(steps.TrainState(
      params, jax.vmap(base_tx.init)(params), params,
      jax.vmap(cr_tx.init)(params)))
  ckpt = workdir_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                  metadata={"config": trained_config(config)})
  try:
    state, start, data_keys = restore_checkpoint(ckpt, state, data_keys)
    history = _resumed_history(history, fingerprint, start)
    if start > config.training.num_steps:
      raise ValueError(
          f"{ckpt.directory} is at step {start}, past "
          f"config.training.num_steps={config.training.num_steps}; pass "
          f"--config.training.num_steps>={start} or use a new --workdir.")
    batch_sharding = None
    if mesh is not None:
      batch_sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data"))
      state, images, labels, data_keys = jax.device_put(
          (state, images, labels, data_keys), jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec()))          # replicated
    metrics_lib.truncate(os.path.join(workdir, METRICS_FILE), start, seeds)
    for name, text in (
        (CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True)),
        (DATA_FILE, json.dumps(history, indent=2))):
      workdir_lib.atomic_write(os.path.join(workdir, name),
                               (text + "\n").encode("utf-8"))
  except BaseException:
    ckpt.close()
    raise
  run_chunk = jax.jit(steps.make_chunk_fn(
      config, steps.make_base_step(model, base_tx),
      steps.make_cr_step(model, cr_tx, options), schedule,
      dataset.num_examples, batch_sharding), static_argnames="length")
  run = _Run(config=config, workdir=workdir, dataset=dataset, history=history,
             seeds=seeds, images=images, labels=labels, run_chunk=run_chunk,
             ckpt=ckpt, start=start, num_params=lrcr.num_params(
                 jax.tree.map(lambda a: a[0], state.params_base)))
  return run, state, data_keys


def train_and_evaluate(config: Any, workdir: str, *,
                       allow_new_data: bool = False) -> dict[str, Any]:
  """Trains base and base+CR side by side and writes the run's record.

  Resumes from the last checkpoint of `workdir` when the config (but for a
  longer `training.num_steps`) and the data match.

  Args:
    config: a run config (see `configs/base.py`).
    workdir: the directory of the run; created if needed.
    allow_new_data: resume on data with another fingerprint (recorded in the
      summary's `data_changes`).

  Returns:
    `summary.summarize_seeds` of all records, plus the run's name, data,
    timings and resume (what summary.json holds).

  Raises:
    ValueError: for a bad config, a batch larger than the data, a workdir
      that is a file or holds another run or other data, or a corrupted
      checkpoint (`workdir.CheckpointError`).
    input_pipeline.DataError: when the data cannot be loaded.
    workdir.WorkdirInUseError: when another process holds the workdir.
    OSError: for an I/O error in the workdir, naming the file.
    FloatingPointError: under `training.nonfinite="stop"`, at the first
      non-finite step, after the metrics and the last finite state are saved.
  """
  # What can refuse the config or devices runs before the workdir is touched.
  wall_start = time.perf_counter()
  txs = validate_config(config)
  training = config.training
  workdir = workdir_lib.check_path(workdir)
  mesh = steps.make_data_mesh(training.get("num_devices", 0),
                              training.batch_size)
  base = steps.optimizer_entry(config.optimizer)[0]
  with workdir_lib.lock(workdir), _Interrupts().installed() as interrupts:
    run, state, data_keys = _start(config, workdir, txs, mesh, allow_new_data)
    bar = tqdm.tqdm(total=training.num_steps, initial=run.start,
                    desc=f"{config.name}: {base} vs {base}+CR"
                    + (f", {len(run.seeds)} seeds" if len(run.seeds) > 1
                       else ""), unit="it", file=sys.stderr,
                    dynamic_ncols=True, disable=not training.progress)
    try:
      step, failure = _train(run, state, data_keys, bar, interrupts)
    finally:
      bar.close()
      run.ckpt.close()
    timings = dict(
        compile_time_s=run.compile_time,
        steps_per_s=((step - run.start) / run.train_time
                     if run.train_time > 0 else None),
        wall_time_s=time.perf_counter() - wall_start)
    if step == run.start:   # nothing trained: keep the last training's
      with contextlib.suppress(OSError, ValueError):
        saved = _read_json(os.path.join(workdir, SUMMARY_FILE), "summary")
        timings.update({key: saved[key] for key in timings if key in saved})
    result = _write_summary(run, dict(
        num_params=run.num_params, resumed_from_step=run.start,
        already_finished=run.start >= training.num_steps, stopped=failure,
        **timings))
  print(_final_line(config, workdir, result, step - run.start), flush=True)
  if failure:
    raise FloatingPointError(failure)
  return result


def _final_line(config: Any, workdir: str, result: Mapping[str, Any],
                trained: int) -> str:
  """The one line a run ends with (stdout)."""
  loss = lambda key: stats.as_float(result.get(key))
  losses = (f"final loss {loss('final_loss_base'):.4g} (base), "
            f"{loss('final_loss_cr'):.4g} (CR)")
  if result["already_finished"]:
    return (f"{config.name}: already finished at step "
            f"{result['resumed_from_step']}, nothing to train (a larger "
            f"--config.training.num_steps extends it); {losses}; summary in "
            f"{workdir}")
  return (f"{config.name}: trained steps {result['resumed_from_step']}.."
          f"{result['resumed_from_step'] + trained - 1} of "
          f"{config.get('num_seeds', 1)} seed(s) in "
          f"{result['wall_time_s']:.1f} s ({result['steps_per_s'] or 0:.1f} "
          f"steps/s after {result['compile_time_s']:.1f} s of compilation); "
          f"{losses}; summary in {workdir}")
