"""Summaries of base vs. base+CR runs over seeds, and the paper's claims."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import report
from experiments import stats

_NO_PLATEAU_TOL = 0.20   # no_plateau: final losses within 20%
_ADAM_EXIT_GAIN = 0.10   # adam: an exit earlier by 10% of the steps is a gain,
_ADAM_LOSS_GAIN = 0.05   # and so is a final loss lower by 5%
# A claim holds for a run when it holds on 80% of its seeds: 4 of 5, 3 of 3.
CLAIM_SEED_FRACTION = 0.8
# Summary fields aggregated over seeds (median and interquartile range).
SEED_FIELDS = (
    "initial_loss_base", "initial_loss_cr", "final_loss_base",
    "final_loss_cr", "exit_step_base", "exit_step_cr",
    "peak_learning_rate_cr", "median_learning_rate_cr",
    "plateau_learning_rate_cr", "later_median_learning_rate_cr",
    "plateau_to_later_ratio", "nonfinite_steps_base", "nonfinite_steps_cr")
_EXIT_FIELDS = ("exit_step_base", "exit_step_cr")

_fmt = functools.partial(report.fmt, spec=".4g", missing="—")


def _fmt_exit(x: Any) -> str:
  return "never" if x is None else _fmt(x)


def summarize_run(records: stats.Records, *, num_classes: int = 10,
                  period: int = 100,
                  claim_kind: str | None = None) -> dict[str, Any]:
  """num_steps, `SEED_FIELDS` and the claim of one run's records.

  The plateau threshold is 0.95 ln(num_classes); `period` is the moving
  window and how many first and last steps give the initial and final losses
  (finite medians). Exits are steps (None: never); the plateau learning rate
  is the median before the CR exit, the later one the median from it.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  steps = stats.extract_series(records, "step")
  loss = {k: stats.extract_series(records, f"loss_{k}") for k in ("base",
                                                                   "cr")}
  lr = stats.extract_series(records, "learning_rate_cr")
  exits = {k: stats.plateau_exit_step(v, 0.95 * math.log(num_classes), period)
           for k, v in loss.items()}
  summary: dict[str, Any] = {"num_steps": len(records)}
  for key, part in (("initial", slice(None, period)),
                    ("final", slice(-period, None))):
    summary.update({f"{key}_loss_{k}": stats.finite_median(v[part], math.nan)
                    for k, v in loss.items()})
  summary.update({f"exit_step_{k}": None if e is None else int(steps[e])
                  for k, e in exits.items()})
  finite, e = lr[np.isfinite(lr)], exits["cr"]
  plateau, later = ((None, None) if e is None else
                    (stats.finite_median(lr[:e]), stats.finite_median(lr[e:])))
  summary.update(
      peak_learning_rate_cr=float(finite.max()) if finite.size else math.nan,
      median_learning_rate_cr=stats.finite_median(finite, math.nan),
      plateau_learning_rate_cr=plateau, later_median_learning_rate_cr=later,
      plateau_to_later_ratio=(plateau / later if plateau is not None and
                              (later or 0) > 0 else None))
  for k in loss:  # the steps the loop skipped, else the NaN losses
    key = f"skipped_{k}"
    summary[f"nonfinite_steps_{k}"] = (
        int(sum(int(r.get(key) or 0) for r in records))
        if records and key in records[0]
        else int(np.count_nonzero(~np.isfinite(loss[k]))))
  summary["claim"] = (None if claim_kind is None
                      else qualitative_claim(summary, claim_kind))
  return summary


def _plateau_claim(s: Mapping[str, Any], threshold: float) -> tuple[bool, str]:
  exit_base, exit_cr = s.get("exit_step_base"), s.get("exit_step_cr")
  ratio = s.get("plateau_to_later_ratio")
  earlier = exit_cr is not None and (exit_base is None or exit_cr < exit_base)
  big_lr = ratio is not None and stats.is_number(ratio) and ratio >= threshold
  return bool(earlier and big_lr), (
      f"CR exits the plateau at step {_fmt_exit(exit_cr)} vs base at "
      f"{_fmt_exit(exit_base)} ({'earlier' if earlier else 'not earlier'}), "
      f"and its plateau/later learning-rate ratio is {_fmt(ratio)} "
      f"({'>=' if big_lr else 'not >='} {threshold:g}).")


def _no_plateau_claim(s: Mapping[str, Any]) -> tuple[bool, str]:
  ib, ic, fb, fc = (stats.as_float(s.get(f"{w}_loss_{k}"))
                    for w, k in (("initial", "base"), ("initial", "cr"),
                                 ("final", "base"), ("final", "cr")))
  descend = all(math.isfinite(a) and math.isfinite(b) and a < b
                for a, b in ((fb, ib), (fc, ic)))
  rel = abs(fc - fb) / abs(fb) if math.isfinite(fb) and fb != 0 else math.nan
  close = math.isfinite(rel) and rel <= _NO_PLATEAU_TOL
  trend = "both descend" if descend else "not both descending"
  within = "within" if close else "not within"
  return bool(descend and close), (
      f"Base loss goes {_fmt(ib)} -> {_fmt(fb)} and CR loss {_fmt(ic)} -> "
      f"{_fmt(fc)} ({trend}), final losses differ by {_fmt(100 * rel)}% "
      f"({within} {100 * _NO_PLATEAU_TOL:g}%).")


def _adam_claim(s: Mapping[str, Any]) -> tuple[bool, str]:
  exit_base, exit_cr = s.get("exit_step_base"), s.get("exit_step_cr")
  fb = stats.as_float(s.get("final_loss_base"))
  fc = stats.as_float(s.get("final_loss_cr"))
  n = int(s.get("num_steps") or 0)
  exit_gain = (((n if exit_base is None else exit_base) - exit_cr) / n
               if exit_cr is not None and n > 0 else 0.0)
  # Infinite if only base diverged; none (NaN) if CR diverged or base is 0.
  loss_gain = (math.nan if not math.isfinite(fc) else math.inf
               if not math.isfinite(fb) else (fb - fc) / abs(fb) if fb != 0
               else math.nan)
  holds = not (exit_gain > _ADAM_EXIT_GAIN or loss_gain > _ADAM_LOSS_GAIN)
  return holds, (
      f"CR exits at step {_fmt_exit(exit_cr)} vs base at "
      f"{_fmt_exit(exit_base)} (gain {_fmt(100 * exit_gain)}% of {n} steps, "
      f"threshold {100 * _ADAM_EXIT_GAIN:g}%) and its final loss {_fmt(fc)} "
      f"vs {_fmt(fb)} is {_fmt(100 * loss_gain)}% better (threshold "
      f"{100 * _ADAM_LOSS_GAIN:g}%), so CR "
      f"{'gives no gain' if holds else 'does give a gain'} with Adam.")


def qualitative_claim(summary: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """{"kind", "holds", "reason"} of a claim on a `summarize_run` result.

  "plateau" (Figs. 2-3) and "plateau_adaptive" (Figs. 4-5): CR exits the
  plateau first, its learning rate there a multiple of its later median;
  "no_plateau" (Fig. 1): both descend to close final losses; "adam"
  (section 4): CR gives no gain. The reason quotes the measured numbers.
  """
  if kind not in CLAIM_KINDS:
    raise ValueError(
        f"unknown claim kind {kind!r}; expected one of {CLAIM_KINDS}")
  holds, reason = _CLAIMS[kind](summary)
  return {"kind": kind, "holds": holds, "reason": reason}


# The plateau claims' least plateau/later learning-rate ratio: Fig. 2's "a
# hundred-fold increase" for SGD, "smaller than for SGD" for Figs. 4-5.
_CLAIMS = {"plateau": functools.partial(_plateau_claim, threshold=10.0),
           "plateau_adaptive": functools.partial(_plateau_claim,
                                                 threshold=2.0),
           "no_plateau": _no_plateau_claim, "adam": _adam_claim}
CLAIM_KINDS = tuple(_CLAIMS)


def seeds_required(num_seeds: int) -> int:
  """How many of `num_seeds` seeds a claim must hold on."""
  return max(1, math.ceil(CLAIM_SEED_FRACTION * num_seeds - 1e-9))


def summarize_seeds(records: stats.Records, *, num_classes: int = 10,
                    period: int = 100,
                    claim_kind: str | None = None) -> dict[str, Any]:
  """`summarize_run` per seed, and the median and IQR over seeds.

  "Never" exits count as latest; the medians are also at the top level
  (nonfinite_steps_* summed); the claim must hold on `seeds_required` seeds.
  """
  by_seed = stats.split_by_seed(records)
  per_seed = [{"seed": seed, **summarize_run(
      seed_records, num_classes=num_classes, period=period,
      claim_kind=claim_kind)} for seed, seed_records in by_seed.items()]
  result: dict[str, Any] = {
      "num_steps": max((s["num_steps"] for s in per_seed), default=0),
      "num_seeds": len(per_seed), "seeds": list(by_seed),
      "median": {}, "iqr": {}}
  for key in SEED_FIELDS:
    med, iqr = stats.median_and_iqr([s[key] for s in per_seed],
                                    never_is_inf=key in _EXIT_FIELDS)
    if key in _EXIT_FIELDS and med is not None:
      med = int(round(med)) if float(med).is_integer() else med
    result["median"][key], result["iqr"][key] = med, iqr
    result[key] = med
  for key in ("nonfinite_steps_base", "nonfinite_steps_cr"):
    result[key] = int(sum(s[key] for s in per_seed))
  result["claim"] = None
  if claim_kind is not None and per_seed:
    n, need = len(per_seed), seeds_required(len(per_seed))
    holding = [s["seed"] for s in per_seed if s["claim"]["holds"]]
    shown = next((s for s in per_seed if not s["claim"]["holds"]),
                 per_seed[0])
    result["claim"] = {
        "kind": claim_kind, "holds": len(holding) >= need,
        "holds_on": len(holding), "num_seeds": n, "required": need,
        "rule": f"holds on at least {need} of {n} seeds",
        "reason": f"Holds on {len(holding)} of {n} seeds (rule: at least "
                  f"{need} of {n}). Seed {shown['seed']}: "
                  f"{shown['claim']['reason']}"}
  result["per_seed"] = per_seed
  return result


_TABLE_COLUMNS = (
    ("run", "run"), ("paper figure", "figure"), ("data", "data"),
    ("steps", "num_steps"), ("final loss base", "final_loss_base"),
    ("final loss CR", "final_loss_cr"), ("exit base", "exit_step_base"),
    ("exit CR", "exit_step_cr"), ("peak lr CR", "peak_learning_rate_cr"),
    ("median lr CR", "median_learning_rate_cr"),
    ("plateau/later lr ratio", "plateau_to_later_ratio"),
    ("claim holds", "claim"))


def cell(row: Mapping[str, Any], key: str) -> str:
  """A cell; over several seeds, "median [25th, 75th percentile]"."""
  value = row.get(key)
  if key == "claim":
    if not isinstance(value, Mapping):
      return _fmt(value if isinstance(value, (bool, np.bool_)) else None)
    seeds = (f" ({value['holds_on']}/{value['num_seeds']} seeds)"
             if "holds_on" in value else "")
    return ("yes" if value.get("holds") else "no") + seeds
  fmt = _fmt_exit if key in _EXIT_FIELDS else (
      lambda x: "—" if x == "" else _fmt(x))
  iqr = (row.get("iqr") or {}).get(key, "absent")
  if iqr == "absent" or (row.get("num_seeds") or 1) < 2:
    return fmt(value)
  return report.with_iqr(value, iqr or (None, None), fmt)


def summary_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Run summaries (plus "run", "figure", "data") as a markdown table."""
  return "\n".join(report.table(
      [name for name, _ in _TABLE_COLUMNS],
      [[cell(row, key) for _, key in _TABLE_COLUMNS] for row in rows])) + "\n"
