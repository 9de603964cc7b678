"""Runs the beyond-the-paper grid and the sigma sweep, and tabulates them.

    python -m experiments.beyond --workdir=runs/beyond [--steps=N] \
        [--num_seeds=5] [--grid=1] [--sweep=1] [--averaging=1]

The grid: Figs. 2, 4, 5 and the Adam run with global, layer and variable
alphas and adaptive sigma (configs/beyond.py). The sweep: Fig. 2 with sigma in
{10, ..., 10000} (section 4: insensitive to sigma). The averagings: Fig. 2
with section 3.1's three ways to average over the batch. Writes
beyond.{md,json}; runs resume.
"""

from collections.abc import Sequence
import functools
import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from configs import beyond
import experiments
from experiments import metrics as metrics_lib
from experiments import report
from experiments import stats
from experiments import summary
from experiments import train_lib as train

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of all runs.")
_STEPS = flags.DEFINE_integer("steps", None, "Iterations per run (3000).")
_GRID = flags.DEFINE_bool("grid", True, "Run the granularity/adaptive grid.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Run the sigma sweep on Fig. 2.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Grid variants to (re)run; default all. The other rows "
    "are kept from an earlier beyond.json.")
_AVERAGING = flags.DEFINE_bool(
    "averaging", True, "Run section 3.1's per-sample averagings on Fig. 2.")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", 5, "Seeds per run.",
                                  lower_bound=1)
_SIGMAS = (10, 100, 1000, 10000)


def _seed_stats(records):
  """(median CR learning rate, std of its log10) over the steps taken after
  the first 100, and the median CV of the per-sample alphas."""
  cv = np.array([r.get("alpha_cv", 0.0) for r in records
                 if not r.get("skipped_cr")], float)
  median_cv = float(np.nanmedian(cv)) if cv.size else 0.0
  lr = np.array([r["learning_rate_cr"] for r in records[100:]
                 if not r.get("skipped_cr") and r.get("accepted", 1)], float)
  lr = lr[np.isfinite(lr) & (lr > 0)]
  if not lr.size:
    return float("nan"), float("nan"), median_cv
  return float(np.median(lr)), float(np.std(np.log10(lr))), median_cv


def _run(arg, workdir):
  config = beyond.get_config(arg)
  config.training.progress = False
  config.num_seeds = _NUM_SEEDS.value
  if _STEPS.value:
    config.training.num_steps = _STEPS.value
  result = train.train_and_evaluate(config, os.path.join(workdir, config.name))
  records = metrics_lib.read_metrics(
      os.path.join(workdir, config.name, train.METRICS_FILE))
  row = {"run": arg, "num_seeds": result["num_seeds"],
         "steps_per_s": result["steps_per_s"], "data": result["data"],
         "nonfinite_steps_cr": result["nonfinite_steps_cr"],
         "rejected_steps": int(sum(1 - int(r.get("accepted", 1))
                                   for r in records)),
         "iqr": {}}
  for key in ("final_loss_base", "final_loss_cr", "exit_step_base",
              "exit_step_cr"):
    row[key], row["iqr"][key] = result[key], result["iqr"][key]
  per_seed = list(zip(*map(_seed_stats, stats.split_by_seed(records).values())))
  for key, values in zip(("median_learning_rate_cr", "log10_lr_std",
                          "median_alpha_cv"), per_seed or [()] * 3):
    row[key], row["iqr"][key] = stats.median_and_iqr(values)
  return row


def _table(rows, cv=False):
  """Cells: median [25th, 75th percentile] over seeds."""
  lines = []
  for r in rows:
    r = dict(r, iqr={k: v for k, v in r.get("iqr", {}).items() if v})
    cell = functools.partial(summary.cell, r)
    lines.append(
        [r["run"], f"{cell('final_loss_base')} / {cell('final_loss_cr')}",
         f"{cell('exit_step_base')} / {cell('exit_step_cr')}",
         cell("median_learning_rate_cr"), cell("log10_lr_std"),
         report.fmt(r["steps_per_s"], ".4g", "—")]
        + [cell("median_alpha_cv")] * cv)
  return "\n".join(report.table(
      ["run, variant", "final loss base / CR", "exit base / CR",
       "median CR lr", "std log10 CR lr", "it/s"]
      + ["median CV of per-sample alpha"] * cv, lines))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  experiments.quiet_logs()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  previous = {}   # an earlier beyond.json: rows of the parts not run now
  if os.path.exists(os.path.join(workdir, "beyond.json")):
    with open(os.path.join(workdir, "beyond.json"), encoding="utf-8") as f:
      previous = json.load(f)
  start = time.perf_counter()
  variants = _VARIANTS.value or beyond.VARIANTS
  grid = ([_run(f"{run},{variant}", workdir) for run in beyond.RUNS
           for variant in variants] if _GRID.value else [])
  if grid and _VARIANTS.value:   # with the earlier rows of other variants
    order = [f"{run},{v}" for run in beyond.RUNS for v in beyond.VARIANTS]
    grid = sorted([r for r in previous.get("grid", []) if r["run"] not in
                   {g["run"] for g in grid}] + grid,
                  key=lambda r: order.index(r["run"]) if r["run"] in order
                  else len(order))
  sweep = ([_run(f"mnist_sgd_plateau,sigma{s}", workdir) for s in _SIGMAS]
           if _SWEEP.value else [])
  averaging = ([_run("mnist_sgd_plateau,global", workdir)] +
               [_run(f"mnist_sgd_plateau,{a}", workdir)
                for a in beyond.AVERAGINGS] if _AVERAGING.value else [])
  wall = time.perf_counter() - start
  parts = {k: rows or previous.get(k, []) for k, rows in (
      ("grid", grid), ("sweep", sweep), ("averaging", averaging))}
  command = report.command_line("experiments.beyond")
  data = sorted({r["data"] for rows in parts.values() for r in rows})
  lines = ["# lrcr beyond the paper", "",
           f"- Command: `{command}`", f"- Data: {'; '.join(data)}",
           f"- Seeds: {_NUM_SEEDS.value} per run; cells are the median over "
           "seeds [25th, 75th percentile]", f"- Date: {report.now()}",
           f"- Total wall time: {wall:.1f} s", ""]
  for title, rows, cv in zip(
      ("Granularity and adaptive sigma", "Sigma sweep on Fig. 2 (SGD, "
       "plateau)", "Section 3.1's averaging options on Fig. 2"),
      parts.values(), (False, False, True)):
    if rows:
      lines += [f"## {title}", "", _table(rows, cv=cv), ""]
  report.write(workdir, "beyond", {"command": command, "wall_time_s": wall,
                                   **parts}, "\n".join(lines))
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  experiments.run(main)
