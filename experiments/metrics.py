"""The metrics of a run: its schema and its file, metrics.jsonl.

One JSON object per (step, seed), step-major; non-finite floats are null.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import workdir as workdir_lib
from experiments.report import jsonable
from experiments.stats import as_float

METRIC_KEYS = (
    "step", "seed", "loss_base", "loss_cr", "alpha", "base_learning_rate",
    "learning_rate_cr", "slope", "curvature", "sqnorm", "predicted_decrease",
    "grad_norm_base", "grad_norm_cr", "skipped_base", "skipped_cr", "sigma",
    "alpha_cv", "accepted")
INT_FIELDS = ("step", "seed", "skipped_base", "skipped_cr", "accepted")
FLOAT_FIELDS = tuple(k for k in METRIC_KEYS if k not in INT_FIELDS)


class MetricsError(ValueError):
  """A damaged metrics file; the message names the file and the way out."""


def _damaged(where: Any, problem: str) -> MetricsError:
  return MetricsError(
      f"{where}: {problem}. The metrics cannot be rebuilt from a checkpoint: "
      "restore the file from a copy, or train again in a new --workdir.")


def to_records(metrics: Mapping[str, np.ndarray],
               seeds: Sequence[int]) -> list[dict[str, Any]]:
  """[length, S] arrays -> one JSON-ready dict per (step, seed), step-major."""
  return [{"step": int(metrics["step"][i, j]), "seed": seed,
           **{key: int(metrics[key][i, j]) if key in INT_FIELDS
              else jsonable(float(metrics[key][i, j]))
              for key in METRIC_KEYS[2:]}}
          for i in range(len(metrics["step"]))
          for j, seed in enumerate(seeds)]


def _lines(records: Sequence[Mapping[str, Any]]) -> str:
  return "".join(json.dumps(jsonable(r), allow_nan=False) + "\n"
                 for r in records)


def append(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Appends records to `path` and fsyncs it (OSError: says to resume)."""
  with workdir_lib.io_errors(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(_lines(records))
      f.flush()
      os.fsync(f.fileno())


def truncate(path: str, step: int, seeds: Sequence[int]) -> None:
  """Keeps the records of steps < `step` (atomically), checking them whole."""
  if not os.path.exists(path) and step:
    raise _damaged(path, f"missing, but the checkpoint is at step {step}")
  lines = [(n, r) for n, r in (_parse(path) if os.path.exists(path) else [])
           if not (isinstance(r.get("step"), int) and r["step"] >= step)]
  _check(lines, path, seeds=seeds, num_steps=step)
  workdir_lib.atomic_write(
      path, _lines([r for _, r in lines]).encode("utf-8"))


def _parse(path: Any) -> list[tuple[int, dict[str, Any]]]:
  """(line number, record) of every line but a torn last one."""
  with open(path, "r", encoding="utf-8") as f:
    lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
  out = []
  for k, (lineno, line) in enumerate(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if k == len(lines) - 1 and not line.endswith("\n"):
        break  # a run killed in the middle of writing its last line
      raise _damaged(f"{path}:{lineno}", f"invalid JSON ({e})") from e
    if not isinstance(rec, dict):
      raise _damaged(f"{path}:{lineno}", "expected a JSON object")
    rec.update({k: as_float(rec[k]) for k in FLOAT_FIELDS if k in rec})
    out.append((lineno, rec))
  return out


def _check(lines: Sequence[tuple[int, Mapping[str, Any]]], path: Any, *,
           seeds: Sequence[int] | None = None,
           num_steps: int | None = None) -> int:
  """How many of the (line, record) pairs make complete steps, checked to be
  steps 0, 1, ... (`num_steps` if given), once per seed (default: step 0's)."""
  if seeds is None:
    seeds = []
    for _, rec in lines:
      if rec.get("step") != 0 or rec.get("seed", 0) in seeds:
        break
      seeds.append(rec.get("seed", 0))
  seeds = list(seeds) or [0]
  for k, (lineno, rec) in enumerate(lines):
    step, seed = divmod(k, len(seeds))
    found = (rec.get("step"), rec.get("seed", 0))
    if found != (step, seeds[seed]):
      raise _damaged(f"{path}:{lineno}", f"expected step {step}, seed "
                     f"{seeds[seed]}, found step {found[0]}, seed {found[1]}: "
                     "the file is damaged (a line lost, repeated, moved or "
                     "edited)")
  complete = len(lines) // len(seeds)
  if num_steps is not None and (complete != num_steps or
                                len(lines) % len(seeds)):
    raise _damaged(path, f"holds {len(lines)} records, {complete} complete "
                   f"steps of {len(seeds)} seed(s), where the checkpoint is "
                   f"at step {num_steps}: the file is damaged or from another "
                   "run")
  return complete * len(seeds)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a metrics file, checked whole (MetricsError otherwise).

  A torn last line and an incomplete last step are dropped.
  """
  lines = _parse(path)
  return [rec for _, rec in lines[:_check(lines, path)]]
