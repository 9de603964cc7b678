"""Runs every run of the paper and tabulates the results against its claims.

    python -m experiments.reproduce --workdir=runs/paper [--steps=N] \
        [--num_seeds=5] [--data_source=auto] [--data_path=DIR] \
        [--cifar10_path=/path/to/cifar-10-batches-py] \
        [--only=mnist_sgd_plateau,...] [--set=model.depth=2 ...]

Each run of `configs/paper.py` trains into `workdir/<name>/` (a rerun
resumes); summary.{md,json} and overview.png hold medians over seeds with
their IQR and the claims. A CIFAR-10 run without data is listed as not run.
"""

import ast
from collections.abc import Sequence
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections

from configs import paper
import experiments
from experiments import input_pipeline as data_lib
from experiments import plots
from experiments import report as report_lib
from experiments import metrics as metrics_lib
from experiments import summary as summary_lib
from experiments import train_lib as train

PAPER_RUNS = tuple(paper.RUNS)  # in figure order

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of all runs.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Iterations per run (default: each config's, 3000).")
_NUM_SEEDS = flags.DEFINE_integer(
    "num_seeds", 5, "Seeds per run (seed i uses config.seed + i), trained "
    "side by side as one vectorized program.", lower_bound=1)
_DATA_SOURCE = flags.DEFINE_enum(
    "data_source", "auto", list(data_lib.SOURCES),
    "Data source of the MNIST runs (experiments.input_pipeline).")
_DATA_PATH = flags.DEFINE_string(
    "data_path", "", "MNIST files directory or TFDS data_dir ('' for none).")
_CIFAR10_PATH = flags.DEFINE_string(
    "cifar10_path", "",
    "cifar-10-batches-py directory (or a TFDS data_dir) for the CIFAR-10 run.")
_ONLY = flags.DEFINE_list(
    "only", list(PAPER_RUNS), f"Runs to do, among {', '.join(PAPER_RUNS)}.")
_SET = flags.DEFINE_multi_string(
    "set", [], "Override for every config, e.g. --set=model.depth=2.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

_NO_CIFAR = ("CIFAR-10 data not available: pass --cifar10_path=/path/to/"
             "cifar-10-batches-py (files source)")


def _load_config(name: str) -> ml_collections.ConfigDict:
  """configs/paper.py:<name> with this command's overrides applied."""
  config = paper.get_config(name)
  config.num_seeds = _NUM_SEEDS.value
  if _STEPS.value is not None:
    config.training.num_steps = _STEPS.value
  config.training.progress = _PROGRESS.value
  cifar = config.data.name == "cifar10"
  config.data.source = ("auto" if cifar and _DATA_SOURCE.value == "mnist_5k"
                        else _DATA_SOURCE.value)
  config.data.path = (_CIFAR10_PATH if cifar else _DATA_PATH).value
  for item in _SET.value:
    key, sep, text = item.partition("=")
    message = (train.config_key_error(config, key.strip()) if sep else
               f"--set={item!r}: expected key=value.")
    if message:
      raise app.UsageError(_as_flags(message))
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      config.update_from_flattened_dict({key.strip(): value})
    except (TypeError, ValueError, KeyError, AttributeError) as err:
      raise app.UsageError(f"--set={item}: {err}") from err
  return config


def _as_flags(message: str) -> str:
  """train_lib's advice in this command's flags (--set=, not --config.)."""
  return message.replace("--config.", "--set=")


def _run_one(name: str, config: ml_collections.ConfigDict,
             workdir: str) -> dict[str, Any]:
  """Trains one run; returns its table row with `status` and `reason`."""
  row = {"run": name, "figure": config.figure, "status": "ok", "reason": ""}
  try:
    return {**row, **train.train_and_evaluate(config,
                                              os.path.join(workdir, name))}
  except data_lib.DataError as err:
    if config.data.name != "cifar10":
      raise
    logging.warning("%s not run: %s", name, err)
    return dict(row, status="not run", data=f"not run: {_NO_CIFAR}",
                reason=f"{_NO_CIFAR}. ({err})")
  except Exception as err:  # pylint: disable=broad-except
    logging.exception("%s failed.", name)
    return dict(row, status="failed", data=f"failed: {type(err).__name__}",
                reason=_as_flags(f"{type(err).__name__}: {err}"))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  experiments.quiet_logs()
  unknown = sorted(set(_ONLY.value) - set(PAPER_RUNS))
  if unknown:
    raise app.UsageError(f"--only: unknown run(s) {', '.join(unknown)}; "
                         f"choose among {', '.join(PAPER_RUNS)}.")
  configs = {name: _load_config(name) for name in PAPER_RUNS
             if name in _ONLY.value}
  for name, config in configs.items():  # every mistake, before any training
    try:
      train.validate_config(config)
    except ValueError as err:
      raise app.UsageError(f"{name}: {_as_flags(str(err))}") from err
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  date = report_lib.now()
  rows = [_run_one(name, config, workdir) for name, config in configs.items()]
  wall_time = time.perf_counter() - start
  command = report_lib.command_line("experiments.reproduce")
  data_used = sorted({row["data"] for row in rows if row["status"] == "ok"})
  env = report_lib.environment()
  lines = [
      "# lrcr: the paper's runs, base vs base+CR", "",
      f"- Command: `{command}`", f"- Data: {'; '.join(data_used) or 'none'}",
      f"- Seeds: {_NUM_SEEDS.value} per run; each number is the median over "
      "seeds [25th, 75th percentile]; a claim holds when it holds on at "
      f"least {summary_lib.seeds_required(_NUM_SEEDS.value)} of "
      f"{_NUM_SEEDS.value} seeds",
      f"- Machine: {report_lib.environment_line(env)}", f"- Date: {date}",
      f"- Total wall time: {wall_time:.1f} s", "",
      summary_lib.summary_table_markdown([  # a run not run: no exits ("—")
          row if row["status"] == "ok" else
          dict(row, exit_step_base="—", exit_step_cr="—") for row in rows]),
  ] + [f"- {r['run']} ({r['figure']}) {r['status']}: {r['reason']}"
        if r["status"] != "ok" else
        f"- {r['run']} ({r['figure']}): {r['claim']['reason']}"
        for r in rows if r["status"] != "ok" or r.get("claim")]
  report_lib.write(workdir, "summary", {
      "command": command, "date": date, "wall_time_s": wall_time,
      "environment": env, "num_seeds": _NUM_SEEDS.value, "data": data_used,
      "runs": rows}, "\n".join(lines))
  if data_used:
    plots.plot_overview([(f"{row['figure']} {row['run']}".strip(),
                          metrics_lib.read_metrics(os.path.join(
                              workdir, row["run"], train.METRICS_FILE)))
                         for row in rows if row["status"] == "ok"],
                        os.path.join(workdir, "overview.png"),
                        title=f"base (blue) vs base+CR (red), median of "
                        f"{_NUM_SEEDS.value} seeds with IQR bands; data: "
                        f"{'; '.join(data_used)}")
  logging.info("Wrote %s/summary.md in %.1f s.", workdir, wall_time)
  print(f"Wrote {os.path.join(workdir, 'summary.md')}", flush=True)
  if any(row["status"] == "failed" for row in rows):
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  experiments.run(main)
