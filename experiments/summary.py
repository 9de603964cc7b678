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

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: Loss of a uniform prediction over 10 classes: the height of the plateau.
LN10: float = math.log(10.0)

#: Default plateau-exit threshold: 95 % of ``ln(10)``.
DEFAULT_THRESHOLD: float = 0.95 * LN10

#: Record fields holding floating-point values.
FLOAT_FIELDS: tuple[str, ...] = (
    "loss_base",
    "loss_cr",
    "learning_rate_cr",
    "alpha",
    "slope",
    "curvature",
    "base_learning_rate",
    "sqnorm",
    "predicted_decrease",
    "grad_norm_base",
    "grad_norm_cr",
    "sigma",
    "alpha_cv",
)

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


def _to_float(value: Any) -> float:
  """Converts a record value to float; ``None``/unparsable -> NaN."""
  if value is None:
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


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


def _nanmean(x: np.ndarray) -> float:
  """Mean of the finite entries; NaN if there are none (no warning)."""
  f = _finite(np.asarray(x, dtype=np.float64))
  return float(f.mean()) if f.size else math.nan


def _nanmedian_or_none(x: np.ndarray) -> float | None:
  f = _finite(np.asarray(x, dtype=np.float64))
  return float(np.median(f)) if f.size else None


def _is_num(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(
      float(x))


# --------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------


def moving_average(x: Iterable[float], period: int = 100) -> np.ndarray:
  """Trailing, NaN-aware moving average.

    Entry ``i`` is the mean of the finite values in
    ``x[max(0, i - period + 1): i + 1]``; non-finite values (NaN, ±inf) are
    ignored and a window without any finite value gives NaN.

    Args:
        x: 1-D sequence of values.
        period: Window length (>= 1).

    Returns:
        Float64 array with the same length as ``x``.

    Raises:
        ValueError: If ``period < 1`` or ``x`` is not 1-D.
    """
  if int(period) != period or period < 1:
    raise ValueError(f"period must be a positive integer, got {period!r}")
  period = int(period)
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"x must be 1-D, got shape {arr.shape}")
  mask = np.isfinite(arr)
  vals = np.where(mask, arr, 0.0)
  csum = np.concatenate(([0.0], np.cumsum(vals)))
  ccnt = np.concatenate(([0], np.cumsum(mask.astype(np.int64))))
  hi = np.arange(1, arr.size + 1)
  lo = np.maximum(0, hi - period)
  sums = csum[hi] - csum[lo]
  counts = ccnt[hi] - ccnt[lo]
  out = np.full(arr.size, np.nan)
  ok = counts > 0
  out[ok] = sums[ok] / counts[ok]
  return out


def plateau_exit_step(
    losses: Iterable[float],
    threshold: float = DEFAULT_THRESHOLD,
    period: int = 100,
) -> int | None:
  """First iteration at which the run has left the loss plateau.

    That is the first index ``i >= period - 1`` (a full window) whose trailing
    ``period``-step moving-average loss is strictly below ``threshold``.

    Args:
        losses: Per-iteration losses (non-finite values are ignored).
        threshold: Loss level that counts as off the plateau; by default
            ``0.95 * ln(10)``, ``ln(10)`` being the loss of a uniform 10-class
            prediction.
        period: Moving-average window.

    Returns:
        The 0-based index of that iteration, or ``None`` if it never happens.
    """
  ma = moving_average(losses, period)
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
        ``initial_loss_cr`` (mean of the first ``period`` iterations),
        ``final_loss_base``, ``final_loss_cr`` (mean of the last ``period``
        iterations), ``exit_step_base``, ``exit_step_cr`` (step of plateau
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
      "initial_loss_base": _nanmean(loss_base[:period]),
      "initial_loss_cr": _nanmean(loss_cr[:period]),
      "final_loss_base": _nanmean(loss_base[-period:]),
      "final_loss_cr": _nanmean(loss_cr[-period:]),
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
    elif isinstance(value, (bool, np.bool_)):
      text = "yes" if value else "no"
    else:
      text = "—"
  elif value is None or (isinstance(value, str) and not value):
    text = "—"
  else:
    text = _fmt(value)
  return text.replace("|", "\\|").replace("\n", " ")


def summary_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Renders run summaries as one markdown table.

    Args:
        rows: One dict per run: the keys of :func:`summarize_run` plus
            ``run`` (name), ``figure`` (paper figure) and ``data`` (data set
            description). Missing keys render as "—".

    Returns:
        The table as a string (header, separator, one line per run), ending
        with a newline. Numbers have 4 significant digits, a ``None`` exit
        step renders as "never", the claim column as "yes"/"no"/"—".
    """
  header = "| " + " | ".join(name for name, _ in _TABLE_COLUMNS) + " |"
  sep = "|" + "|".join("---" for _ in _TABLE_COLUMNS) + "|"
  lines = [header, sep]
  for row in rows:
    cells = [_cell(key, row.get(key)) for _, key in _TABLE_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file.

    Blank lines are skipped and an unparsable *last* line (a run killed in the
    middle of writing it) is dropped. ``null`` (or otherwise non-numeric)
    values of the float fields (:data:`FLOAT_FIELDS`) become NaN; ``NaN`` and
    ``Infinity`` literals are parsed as floats.

    Args:
        path: Path of the JSONL file.

    Returns:
        The records, one dict per iteration, in file order.

    Raises:
        ValueError: If a line other than the last one is not valid JSON or a
            line is not a JSON object.
    """
  with open(path, "r", encoding="utf-8") as f:
    lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
  records: list[dict[str, Any]] = []
  for k, (lineno, line) in enumerate(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        break  # truncated final line
      raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
    if not isinstance(rec, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object")
    for key in FLOAT_FIELDS:
      if key in rec:
        rec[key] = _to_float(rec[key])
    records.append(rec)
  return records
