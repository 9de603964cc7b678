"""Numeric summaries of base vs. base+CR training runs.

Each run streams one JSON record per iteration to ``metrics.jsonl``.  This
module reads those records, computes the quantities the paper talks about
(plateau exit, final loss, the CR learning rate on and after the plateau),
checks the paper's qualitative claims against them and renders a markdown
table of all runs.

Non-finite values (JSON ``null``, ``NaN``, ``Infinity``) are treated as NaN
everywhere and ignored by the statistics.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from experiments.metrics import MetricsError  # pylint: disable=unused-import
from experiments.metrics import read_metrics  # pylint: disable=unused-import
from experiments.metrics import to_float as _to_float

#: Loss of a uniform prediction over 10 classes: the height of the plateau.
LN10: float = math.log(10.0)

#: Default plateau-exit threshold: 95 % of ``ln(10)``.
DEFAULT_THRESHOLD: float = 0.95 * LN10

#: Claim kinds understood by :func:`qualitative_claim`.
CLAIM_KINDS: tuple[str,
                   ...] = ("plateau", "plateau_adaptive", "no_plateau", "adam")

# Plateau claim: plateau learning rate must be at least this many times the
# later median. SGD (Fig. 2: "a hundred-fold increase"): 10x. Adagrad and
# Adadelta (Figs. 4-5: "the relative magnitudes of those increases were
# smaller than for SGD"): a clear increase, 2x.
_PLATEAU_RATIO_MIN = {"plateau": 10.0, "plateau_adaptive": 2.0}
# No-plateau claim: final losses within this relative tolerance.
_NO_PLATEAU_TOL = 0.20
# Adam claim: an earlier exit by more than this fraction of the steps, or a
# final loss better by more than this fraction, counts as a gain.
_ADAM_EXIT_GAIN = 0.10
_ADAM_LOSS_GAIN = 0.05

# --------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------


def extract_series(records: Sequence[Mapping[str, Any]],
                   key: str) -> np.ndarray:
  """Extracts one field of all records as a float array.

    Args:
        records: Per-iteration metric records.
        key: Field name, e.g. ``"loss_cr"``.

    Returns:
        1-D float64 array of length ``len(records)``; missing, ``None`` or
        non-numeric values become NaN.
    """
  return np.array([_to_float(r.get(key)) for r in records], dtype=np.float64)


def extract_steps(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """Returns the iteration numbers of the records.

    Uses the ``step`` field where present and falls back to the record's
    position otherwise.

    Args:
        records: Per-iteration metric records.

    Returns:
        1-D float64 array of iteration numbers.
    """
  steps = extract_series(records, "step")
  index = np.arange(len(records), dtype=np.float64)
  return np.where(np.isfinite(steps), steps, index)


def _finite(x: np.ndarray) -> np.ndarray:
  return x[np.isfinite(x)]


def _nanmedian(x: np.ndarray) -> float:
  """Median of the finite entries; NaN if there are none (no warning)."""
  f = _finite(np.asarray(x, dtype=np.float64))
  return float(np.median(f)) if f.size else math.nan


def _nanmedian_or_none(x: np.ndarray) -> float | None:
  f = _finite(np.asarray(x, dtype=np.float64))
  return float(np.median(f)) if f.size else None


def _is_num(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(
      float(x))


# --------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------


def _windows(x: Iterable[float], period: int) -> np.ndarray:
  """[n, period] trailing windows of x, padded with NaN before the start."""
  if int(period) != period or period < 1:
    raise ValueError(f"period must be a positive integer, got {period!r}")
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"x must be 1-D, got shape {arr.shape}")
  arr = np.where(np.isfinite(arr), arr, np.nan)
  padded = np.concatenate([np.full(int(period) - 1, np.nan), arr])
  return np.lib.stride_tricks.sliding_window_view(padded, int(period))


def moving_average(x: Iterable[float], period: int = 100) -> np.ndarray:
  """Trailing, NaN-aware moving average.

    Entry ``i`` is the mean of the finite values in
    ``x[max(0, i - period + 1): i + 1]``; non-finite values (NaN, ±inf) are
    ignored and a window without any finite value gives NaN. Each window is
    summed on its own (no running sum), so one huge value only moves the
    windows that hold it.

    Args:
        x: 1-D sequence of values.
        period: Window length (>= 1).

    Returns:
        Float64 array with the same length as ``x``.

    Raises:
        ValueError: If ``period < 1`` or ``x`` is not 1-D.
    """
  windows = _windows(x, period)
  counts = np.isfinite(windows).sum(axis=1)
  sums = np.nansum(windows, axis=1)
  out = np.full(len(windows), np.nan)
  ok = counts > 0
  out[ok] = sums[ok] / counts[ok]
  return out


def moving_median(x: Iterable[float], period: int = 100) -> np.ndarray:
  """Trailing, NaN-aware moving median (as `moving_average`, with medians).

    One huge value in a window does not move its median, so a single spike
    can neither hide nor invent a plateau exit.
    """
  windows = _windows(x, period)
  out = np.full(len(windows), np.nan)
  ok = np.isfinite(windows).any(axis=1)
  out[ok] = np.nanmedian(windows[ok], axis=1)
  return out


def plateau_exit_step(
    losses: Iterable[float],
    threshold: float = DEFAULT_THRESHOLD,
    period: int = 100,
) -> int | None:
  """First iteration at which the run has left the loss plateau.

    That is the first index ``i >= period - 1`` (a full window) whose trailing
    ``period``-step moving median of the loss is strictly below
    ``threshold``. A median, not a mean: one huge finite loss (a diverging
    step, 4e28) moves a mean window for ``period`` steps, but not a median.

    Args:
        losses: Per-iteration losses (non-finite values are ignored).
        threshold: Loss level that counts as off the plateau; by default
            ``0.95 * ln(10)``, ``ln(10)`` being the loss of a uniform 10-class
            prediction.
        period: Moving-average window.

    Returns:
        The 0-based index of that iteration, or ``None`` if it never happens.
    """
  ma = moving_median(losses, period)
  if ma.size < period:
    return None
  with np.errstate(invalid="ignore"):
    hits = np.nonzero(ma[period - 1:] < threshold)[0]
  if hits.size == 0:
    return None
  return int(hits[0]) + period - 1


# --------------------------------------------------------------------------
# Run summaries and claims
# --------------------------------------------------------------------------


def _skipped(records, key: str, losses: np.ndarray) -> int:
  """Steps the loop skipped (non-finite loss or update), or non-finite losses."""
  if records and key in records[0]:
    return int(sum(int(r.get(key) or 0) for r in records))
  return int(np.count_nonzero(~np.isfinite(losses)))


def summarize_run(
    records: Sequence[Mapping[str, Any]],
    *,
    num_classes: int = 10,
    period: int = 100,
    claim_kind: str | None = None,
) -> dict[str, Any]:
  """Summarizes one base-vs-CR run.

    Args:
        records: Per-iteration metric records (as from :func:`read_metrics`),
            in iteration order.
        num_classes: Number of classes; the plateau threshold is
            ``0.95 * ln(num_classes)``.
        period: Moving-average window, also the number of final iterations
            averaged for the final losses.
        claim_kind: If given, one of ``"plateau"``, ``"no_plateau"``,
            ``"adam"``; the result of :func:`qualitative_claim` is stored under
            ``"claim"``.

    Returns:
        Dict with keys ``num_steps``, ``initial_loss_base``,
        ``initial_loss_cr`` (median of the first ``period`` iterations),
        ``final_loss_base``, ``final_loss_cr`` (median of the last
        ``period`` iterations: one spike does not move it), ``exit_step_base``, ``exit_step_cr`` (step of plateau
        exit or ``None``), ``peak_learning_rate_cr``,
        ``median_learning_rate_cr`` (NaN if no finite rate),
        ``plateau_learning_rate_cr`` (median rate over the iterations before
        the CR run's exit), ``later_median_learning_rate_cr`` (median from the
        exit on), ``plateau_to_later_ratio`` (those three are ``None`` when
        undefined), ``nonfinite_steps_base``, ``nonfinite_steps_cr`` and
        ``claim`` (``None`` unless ``claim_kind`` is given). Losses are
        averaged over finite values only.
    """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  steps = extract_steps(records)
  loss_base = extract_series(records, "loss_base")
  loss_cr = extract_series(records, "loss_cr")
  lr_cr = extract_series(records, "learning_rate_cr")
  threshold = 0.95 * math.log(num_classes)

  def exit_index(losses: np.ndarray) -> int | None:
    return plateau_exit_step(losses, threshold=threshold, period=period)

  def as_step(i: int | None) -> int | None:
    return None if i is None else int(steps[i])

  i_base = exit_index(loss_base)
  i_cr = exit_index(loss_cr)

  finite_lr = _finite(lr_cr)
  peak = float(finite_lr.max()) if finite_lr.size else math.nan
  median = float(np.median(finite_lr)) if finite_lr.size else math.nan
  if i_cr is None:
    plateau_lr = later_lr = None
  else:
    plateau_lr = _nanmedian_or_none(lr_cr[:i_cr])
    later_lr = _nanmedian_or_none(lr_cr[i_cr:])
  ratio = (plateau_lr / later_lr if plateau_lr is not None and
           later_lr is not None and later_lr > 0 else None)

  summary: dict[str, Any] = {
      "num_steps": len(records),
      "initial_loss_base": _nanmedian(loss_base[:period]),
      "initial_loss_cr": _nanmedian(loss_cr[:period]),
      "final_loss_base": _nanmedian(loss_base[-period:]),
      "final_loss_cr": _nanmedian(loss_cr[-period:]),
      "exit_step_base": as_step(i_base),
      "exit_step_cr": as_step(i_cr),
      "peak_learning_rate_cr": peak,
      "median_learning_rate_cr": median,
      "plateau_learning_rate_cr": plateau_lr,
      "later_median_learning_rate_cr": later_lr,
      "plateau_to_later_ratio": ratio,
      "nonfinite_steps_base": _skipped(records, "skipped_base", loss_base),
      "nonfinite_steps_cr": _skipped(records, "skipped_cr", loss_cr),
      "claim": None,
  }
  if claim_kind is not None:
    summary["claim"] = qualitative_claim(summary, claim_kind)
  return summary


def _fmt(x: Any) -> str:
  """Formats a number with 4 significant digits; None -> '—'."""
  if x is None:
    return "—"
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if math.isnan(x):
      return "nan"
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"
  return str(x)


def _fmt_exit(x: Any) -> str:
  return "never" if x is None else _fmt(x)


def qualitative_claim(summary: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """Checks one of the paper's qualitative claims against a run summary.

    Kinds:
        * ``"plateau"`` (Figs 2-3, SGD): the CR run exits the plateau and
          earlier than the base run (which exits later or never), and the CR
          learning rate on the plateau is at least 10x its later median.
        * ``"plateau_adaptive"`` (Figs 4-5, Adagrad and Adadelta): the same,
          with the smaller increase the paper reports for adaptive methods:
          at least 2x.
        * ``"no_plateau"`` (Fig 1): both runs descend (final loss below the
          initial loss) and CR does not hurt: ``|final_cr - final_base| <=
          0.2 * final_base``.
        * ``"adam"`` (§4): CR gives no gain with Adam, i.e. neither a gain in
          plateau exit (CR exiting earlier than base by more than 10% of the
          run's steps; a base run that never exits counts as exiting at the
          end) nor a gain in final loss (CR's final loss lower than base's by
          more than 5%).

    Args:
        summary: Output of :func:`summarize_run` (the ``claim`` key is not
            needed).
        kind: One of ``"plateau"``, ``"no_plateau"``, ``"adam"``.

    Returns:
        ``{"kind": kind, "holds": bool, "reason": str}`` where ``reason`` is a
        one-sentence explanation quoting the measured numbers.

    Raises:
        ValueError: For an unknown ``kind``.
    """
  if kind not in CLAIM_KINDS:
    raise ValueError(
        f"unknown claim kind {kind!r}; expected one of {CLAIM_KINDS}")
  exit_base = summary.get("exit_step_base")
  exit_cr = summary.get("exit_step_cr")
  fb = _to_float(summary.get("final_loss_base"))
  fc = _to_float(summary.get("final_loss_cr"))

  if kind in _PLATEAU_RATIO_MIN:
    ratio = summary.get("plateau_to_later_ratio")
    threshold = _PLATEAU_RATIO_MIN[kind]
    earlier = exit_cr is not None and (exit_base is None or exit_cr < exit_base)
    big_lr = ratio is not None and _is_num(ratio) and ratio >= threshold
    holds = bool(earlier and big_lr)
    reason = (
        f"CR exits the plateau at step {_fmt_exit(exit_cr)} vs base at "
        f"{_fmt_exit(exit_base)} ({'earlier' if earlier else 'not earlier'}), "
        f"and its plateau/later learning-rate ratio is {_fmt(ratio)} "
        f"({'>=' if big_lr else 'not >='} {threshold:g}).")
  elif kind == "no_plateau":
    ib = _to_float(summary.get("initial_loss_base"))
    ic = _to_float(summary.get("initial_loss_cr"))
    descend_b = math.isfinite(fb) and math.isfinite(ib) and fb < ib
    descend_c = math.isfinite(fc) and math.isfinite(ic) and fc < ic
    rel = abs(fc - fb) / abs(fb) if math.isfinite(fb) and fb != 0 else math.nan
    close = math.isfinite(rel) and rel <= _NO_PLATEAU_TOL
    holds = bool(descend_b and descend_c and close)
    reason = (
        f"Base loss goes {_fmt(ib)} -> {_fmt(fb)} and CR loss {_fmt(ic)} -> "
        f"{_fmt(fc)} ({'both descend' if descend_b and descend_c else 'not both descending'}), "
        f"final losses differ by {_fmt(100 * rel)}% "
        f"({'within' if close else 'not within'} {100 * _NO_PLATEAU_TOL:g}%).")
  else:  # adam
    n = int(summary.get("num_steps") or 0)
    if exit_cr is None or n <= 0:
      exit_gain = 0.0
    else:
      eff_base = n if exit_base is None else exit_base
      exit_gain = (eff_base - exit_cr) / n
    exit_better = exit_gain > _ADAM_EXIT_GAIN
    if math.isfinite(fc) and not math.isfinite(fb):
      loss_gain = math.inf  # base diverged, CR did not
    elif math.isfinite(fc) and fb != 0:
      loss_gain = (fb - fc) / abs(fb)
    else:
      loss_gain = math.nan  # CR diverged (or base loss is 0): no gain
    loss_better = loss_gain > _ADAM_LOSS_GAIN
    holds = not (exit_better or loss_better)
    reason = (
        f"CR exits at step {_fmt_exit(exit_cr)} vs base at {_fmt_exit(exit_base)} "
        f"(gain {_fmt(100 * exit_gain)}% of {n} steps, threshold "
        f"{100 * _ADAM_EXIT_GAIN:g}%) and its final loss {_fmt(fc)} vs "
        f"{_fmt(fb)} is {_fmt(100 * loss_gain)}% better (threshold "
        f"{100 * _ADAM_LOSS_GAIN:g}%), so CR "
        f"{'gives no gain' if holds else 'does give a gain'} with Adam.")
  return {"kind": kind, "holds": holds, "reason": reason}


# --------------------------------------------------------------------------
# Seeds: each seed summarized on its own, then the median and IQR over seeds
# --------------------------------------------------------------------------

#: A claim holds for a run when it holds on at least this fraction of its
#: seeds: 4 of 5, 3 of 3, 1 of 1.
CLAIM_SEED_FRACTION: float = 0.8

#: Summary fields aggregated over seeds (median and interquartile range).
SEED_FIELDS: tuple[str, ...] = (
    "initial_loss_base", "initial_loss_cr", "final_loss_base",
    "final_loss_cr", "exit_step_base", "exit_step_cr",
    "peak_learning_rate_cr", "median_learning_rate_cr",
    "plateau_learning_rate_cr", "later_median_learning_rate_cr",
    "plateau_to_later_ratio", "nonfinite_steps_base", "nonfinite_steps_cr")
_EXIT_FIELDS = ("exit_step_base", "exit_step_cr")


def seeds_required(num_seeds: int) -> int:
  """How many of `num_seeds` seeds a claim must hold on (`CLAIM_SEED_FRACTION`)."""
  return max(1, math.ceil(CLAIM_SEED_FRACTION * num_seeds - 1e-9))


def split_by_seed(
    records: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
  """{seed: its records in step order}; records without `seed` are seed 0."""
  by_seed: dict[int, list[Mapping[str, Any]]] = {}
  for record in records:
    by_seed.setdefault(int(record.get("seed", 0) or 0), []).append(record)
  return by_seed


def _quantile(values: Sequence[float], q: float) -> float:
  """Linear-interpolated quantile of sorted finite-or-+inf values."""
  v = sorted(values)
  pos = q * (len(v) - 1)
  lo, frac = int(math.floor(pos)), pos - math.floor(pos)
  if frac == 0 or v[lo] == v[lo + 1]:
    return v[lo]
  if math.isinf(v[lo + 1]):
    return math.inf
  return v[lo] + frac * (v[lo + 1] - v[lo])


def median_and_iqr(values: Sequence[Any], *, never_is_inf: bool = False
                   ) -> tuple[float | None, list[float | None] | None]:
  """(median, [25th, 75th percentile]) of the usable values, or Nones.

  Args:
    values: one number per seed; None or NaN are left out, unless
      `never_is_inf`: then None is an exit that never happened, ordered after
      every step (so a median of "never" is reported as None).
    never_is_inf: see above; for plateau exit steps.
  """
  nums = []
  for v in values:
    if v is None and never_is_inf:
      nums.append(math.inf)
    elif _is_num(v):
      nums.append(float(v))
  if not nums:
    return None, None
  out = [_quantile(nums, q) for q in (0.5, 0.25, 0.75)]
  out = [None if math.isinf(x) else x for x in out]
  return out[0], out[1:]


def summarize_seeds(
    records: Sequence[Mapping[str, Any]],
    *,
    num_classes: int = 10,
    period: int = 100,
    claim_kind: str | None = None,
) -> dict[str, Any]:
  """Summarizes a run over its seeds: each seed alone, then across seeds.

    Args:
        records: Per-(step, seed) records (as from :func:`read_metrics`).
        num_classes, period, claim_kind: as for :func:`summarize_run`.

    Returns:
        Dict with ``num_steps`` and ``num_seeds``; ``seeds`` (the seeds);
        ``per_seed`` (one :func:`summarize_run` per seed, with ``seed``);
        ``median`` and ``iqr`` (``[25th, 75th percentile]``) over seeds of
        every field of :data:`SEED_FIELDS` (an exit that never happens
        counts as later than any step; a median or quartile that is "never"
        is ``None``); the same medians at the top level (``final_loss_cr``,
        ``exit_step_cr``...), with ``nonfinite_steps_*`` summed over seeds
        instead; and ``claim``: ``None``, or :func:`qualitative_claim` judged
        on every seed, ``{"kind", "holds", "holds_on", "num_seeds",
        "required", "rule", "reason"}``, holding when it holds on at least
        :func:`seeds_required` seeds.
    """
  by_seed = split_by_seed(records)
  per_seed = []
  for seed, seed_records in by_seed.items():
    one = summarize_run(seed_records, num_classes=num_classes, period=period,
                        claim_kind=claim_kind)
    per_seed.append({"seed": seed, **one})
  result: dict[str, Any] = {
      "num_steps": max((s["num_steps"] for s in per_seed), default=0),
      "num_seeds": len(per_seed), "seeds": list(by_seed),
      "median": {}, "iqr": {}}
  for key in SEED_FIELDS:
    med, iqr = median_and_iqr([s[key] for s in per_seed],
                              never_is_inf=key in _EXIT_FIELDS)
    if key in _EXIT_FIELDS and med is not None:
      med = int(round(med)) if float(med).is_integer() else med
    result["median"][key], result["iqr"][key] = med, iqr
    result[key] = med
  for key in ("nonfinite_steps_base", "nonfinite_steps_cr"):
    result[key] = int(sum(s[key] for s in per_seed))
  result["claim"] = None
  if claim_kind is not None and per_seed:
    result["claim"] = _claim_over_seeds(per_seed, claim_kind)
  result["per_seed"] = per_seed
  return result


def _claim_over_seeds(per_seed: Sequence[Mapping[str, Any]],
                      kind: str) -> dict[str, Any]:
  n = len(per_seed)
  need = seeds_required(n)
  holding = [s["seed"] for s in per_seed if s["claim"]["holds"]]
  failing = [s for s in per_seed if not s["claim"]["holds"]]
  reason = (f"Holds on {len(holding)} of {n} seeds (rule: at least {need} of "
            f"{n}).")
  if failing:
    first = failing[0]
    reason += f" Seed {first['seed']}: {first['claim']['reason']}"
  else:
    reason += f" Seed {per_seed[0]['seed']}: {per_seed[0]['claim']['reason']}"
  return {"kind": kind, "holds": len(holding) >= need,
          "holds_on": len(holding), "num_seeds": n, "required": need,
          "rule": f"holds on at least {need} of {n} seeds", "reason": reason}


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("paper figure", "figure"),
    ("data", "data"),
    ("steps", "num_steps"),
    ("final loss base", "final_loss_base"),
    ("final loss CR", "final_loss_cr"),
    ("exit base", "exit_step_base"),
    ("exit CR", "exit_step_cr"),
    ("peak lr CR", "peak_learning_rate_cr"),
    ("median lr CR", "median_learning_rate_cr"),
    ("plateau/later lr ratio", "plateau_to_later_ratio"),
    ("claim holds", "claim"),
)


def _cell(key: str, value: Any) -> str:
  if key in ("exit_step_base", "exit_step_cr"):
    text = _fmt_exit(value)
  elif key == "claim":
    if isinstance(value, Mapping):
      text = "yes" if value.get("holds") else "no"
      if "holds_on" in value:
        text += f" ({value['holds_on']}/{value['num_seeds']} seeds)"
    elif isinstance(value, (bool, np.bool_)):
      text = "yes" if value else "no"
    else:
      text = "—"
  elif value is None or (isinstance(value, str) and not value):
    text = "—"
  else:
    text = _fmt(value)
  return text.replace("|", "\\|").replace("\n", " ")


def _row_cell(row: Mapping[str, Any], key: str) -> str:
  """A cell; over several seeds, "median [25th, 75th percentile]"."""
  text = _cell(key, row.get(key))
  iqr = (row.get("iqr") or {}).get(key, "absent")
  if iqr == "absent" or (row.get("num_seeds") or 1) < 2:
    return text
  lo, hi = iqr if iqr is not None else (None, None)
  fmt = _fmt_exit if key in _EXIT_FIELDS else _fmt
  return f"{text} [{fmt(lo)}, {fmt(hi)}]"


def summary_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Renders run summaries as one markdown table.

    Args:
        rows: One dict per run: the keys of :func:`summarize_run` plus
            ``run`` (name), ``figure`` (paper figure) and ``data`` (data set
            description). Missing keys render as "—".

    Returns:
        The table as a string (header, separator, one line per run), ending
        with a newline. Numbers have 4 significant digits, a ``None`` exit
        step renders as "never", the claim column as "yes"/"no"/"—" (with
        "(k/n seeds)" for a claim judged over seeds). A row of
        :func:`summarize_seeds` over several seeds shows "median [25th,
        75th percentile]".
    """
  header = "| " + " | ".join(name for name, _ in _TABLE_COLUMNS) + " |"
  sep = "|" + "|".join("---" for _ in _TABLE_COLUMNS) + "|"
  lines = [header, sep]
  for row in rows:
    cells = [_row_cell(row, key) for _, key in _TABLE_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
