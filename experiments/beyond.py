"""Runs the beyond-the-paper grid and the sigma sweep, and tabulates them.

    python -m experiments.beyond --workdir=runs/beyond [--steps=N] \
        [--num_seeds=5] [--grid=1] [--sweep=1] [--averaging=1]

The grid: Figs. 2, 4, 5 and the Adam run, each with the paper's global alpha,
layer-specific alphas, variable-specific alphas and adaptive sigma
(configs/beyond.py). The sweep: Fig. 2 with sigma in {10, 100, 1000, 10000},
to test section 4's claim that performance is insensitive to sigma within
orders of magnitude and that sigma moves the variability of the learning
rate more than its size. The averaging runs: Fig. 2 with section 3.1's three
ways to average over the batch (the paper's, E[alpha] E[g], E[alpha g]).
Every run trains `--num_seeds` seeds as one vectorized program; each cell of
the tables is the median over seeds [25th, 75th percentile], so a difference
smaller than the spread over seeds shows as such. Writes beyond.md and
beyond.json to the workdir; runs already done resume.
"""

from collections.abc import Sequence
import datetime
import json
import os
import shlex
import sys
import time

from absl import app
from absl import flags
import numpy as np

from configs import beyond
from experiments import metrics
from experiments import summary as summary_lib
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


def _lr_stats(records):
  """Median CR learning rate and its variability (std of log10) after step 100.

  Only steps that were taken count: skipped steps (non-finite) and steps
  rejected by adaptive sigma are left out.
  """
  kept = [r for r in records[100:]
          if not r.get("skipped_cr") and r.get("accepted", 1)]
  lr = np.array([r["learning_rate_cr"] for r in kept], float)
  lr = lr[np.isfinite(lr) & (lr > 0)]
  if not lr.size:
    return float("nan"), float("nan")
  return float(np.median(lr)), float(np.std(np.log10(lr)))


def _run(arg, workdir):
  config = beyond.get_config(arg)
  config.training.progress = False
  config.num_seeds = _NUM_SEEDS.value
  if _STEPS.value:
    config.training.num_steps = _STEPS.value
  result = train.train_and_evaluate(config, os.path.join(workdir, config.name))
  records = summary_lib.read_metrics(
      os.path.join(workdir, config.name, train.METRICS_FILE))
  per_seed = {"median_learning_rate_cr": [], "log10_lr_std": [],
              "median_alpha_cv": []}
  for seed_records in summary_lib.split_by_seed(records).values():
    median_lr, spread = _lr_stats(seed_records)
    cv = np.array([r.get("alpha_cv", 0.0) for r in seed_records
                   if not r.get("skipped_cr")], float)
    per_seed["median_learning_rate_cr"].append(median_lr)
    per_seed["log10_lr_std"].append(spread)
    per_seed["median_alpha_cv"].append(
        float(np.nanmedian(cv)) if cv.size else 0.0)
  row = {"run": arg, "num_seeds": result["num_seeds"],
         "steps_per_s": result["steps_per_s"], "data": result["data"],
         "nonfinite_steps_cr": result["nonfinite_steps_cr"],
         "rejected_steps": int(sum(1 - int(r.get("accepted", 1))
                                   for r in records)),
         "iqr": {}}
  for key in ("final_loss_base", "final_loss_cr", "exit_step_base",
              "exit_step_cr"):
    row[key], row["iqr"][key] = result[key], result["iqr"][key]
  for key, values in per_seed.items():
    row[key], row["iqr"][key] = summary_lib.median_and_iqr(values)
  return row


def _fmt(x):
  if x is None:
    return "never"
  return f"{x:.4g}" if isinstance(x, float) else str(x)


def _cell(row, key):
  """median [25th, 75th percentile] over seeds (the median alone for one)."""
  fmt = _fmt if key.startswith("exit_step") else (
      lambda x: "—" if x is None else _fmt(x))
  iqr = row.get("iqr", {}).get(key)
  if row.get("num_seeds", 1) < 2 or not iqr:
    return fmt(row[key])
  return f"{fmt(row[key])} [{fmt(iqr[0])}, {fmt(iqr[1])}]"


def _table(rows, cv=False):
  head = ("| run, variant | final loss base / CR | exit base / CR | median CR lr "
          "| std log10 CR lr | it/s |" + (" median CV of per-sample alpha |"
                                          if cv else "") + "\n|---|---|---|---|---|---|"
          + ("---|" if cv else ""))
  body = [f"| {r['run']} | {_cell(r, 'final_loss_base')} / "
          f"{_cell(r, 'final_loss_cr')} | {_cell(r, 'exit_step_base')} / "
          f"{_cell(r, 'exit_step_cr')} | {_cell(r, 'median_learning_rate_cr')} "
          f"| {_cell(r, 'log10_lr_std')} | "
          f"{'—' if r['steps_per_s'] is None else _fmt(r['steps_per_s'])} |"
          + (f" {_cell(r, 'median_alpha_cv')} |" if cv else "")
          for r in rows]
  return "\n".join([head] + body)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  variants = _VARIANTS.value or beyond.VARIANTS
  grid = ([_run(f"{run},{variant}", workdir) for run in beyond.RUNS
           for variant in variants] if _GRID.value else [])
  if grid and _VARIANTS.value and os.path.exists(
      os.path.join(workdir, "beyond.json")):
    with open(os.path.join(workdir, "beyond.json"), encoding="utf-8") as f:
      fresh = {r["run"] for r in grid}
      grid = [r for r in json.load(f).get("grid", [])
              if r["run"] not in fresh] + grid
      order = [f"{run},{v}" for run in beyond.RUNS for v in beyond.VARIANTS]
      grid.sort(key=lambda r: order.index(r["run"]) if r["run"] in order
                else len(order))
  sweep = ([_run(f"mnist_sgd_plateau,sigma{s}", workdir) for s in _SIGMAS]
           if _SWEEP.value else [])
  averaging = ([_run("mnist_sgd_plateau,global", workdir)] +
               [_run(f"mnist_sgd_plateau,{a}", workdir)
                for a in beyond.AVERAGINGS] if _AVERAGING.value else [])
  wall = time.perf_counter() - start
  # Parts not run this time keep their rows from an earlier beyond.json.
  previous = {}
  path_json = os.path.join(workdir, "beyond.json")
  if os.path.exists(path_json):
    with open(path_json, encoding="utf-8") as f:
      previous = json.load(f)
  grid = grid or previous.get("grid", [])
  sweep = sweep or previous.get("sweep", [])
  averaging = averaging or previous.get("averaging", [])
  command = " ".join(["python -m experiments.beyond"] +
                     [shlex.quote(a) for a in sys.argv[1:]])
  data = sorted({r["data"] for r in grid + sweep + averaging})
  lines = ["# lrcr beyond the paper", "",
           f"- Command: `{command}`", f"- Data: {'; '.join(data)}",
           f"- Seeds: {_NUM_SEEDS.value} per run; cells are the median over "
           "seeds [25th, 75th percentile]",
           f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
           f"- Total wall time: {wall:.1f} s", ""]
  if grid:
    lines += ["## Granularity and adaptive sigma", "", _table(grid), ""]
  if sweep:
    lines += ["## Sigma sweep on Fig. 2 (SGD, plateau)", "", _table(sweep), ""]
  if averaging:
    lines += ["## Section 3.1's averaging options on Fig. 2", "",
              _table(averaging, cv=True), ""]
  with open(os.path.join(workdir, "beyond.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  with open(os.path.join(workdir, "beyond.json"), "w", encoding="utf-8") as f:
    json.dump(metrics.jsonable({"command": command, "wall_time_s": wall,
                              "grid": grid, "sweep": sweep,
                              "averaging": averaging}), f, indent=2)
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
