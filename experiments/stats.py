"""Statistics of metric records; non-finite values are NaN and ignored."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Records = Sequence[Mapping[str, Any]]


def as_float(value: Any) -> float:
  """A record value as a float; None or anything unparsable is NaN."""
  try:
    return math.nan if value is None else float(value)
  except (TypeError, ValueError):
    return math.nan


def is_number(x: Any) -> bool:
  """A finite Python or numpy number."""
  return (isinstance(x, (int, float, np.integer, np.floating))
          and math.isfinite(float(x)))


def extract_series(records: Records, key: str) -> np.ndarray:
  """One field of every record, float64; missing or non-numeric is NaN."""
  return np.array([as_float(r.get(key)) for r in records], dtype=np.float64)


def finite_median(x: Any, default: Any = None) -> Any:
  """The median of the finite entries of `x`, or `default` if there are none."""
  x = np.asarray(x, dtype=np.float64)
  x = x[np.isfinite(x)]
  return float(np.median(x)) if x.size else default


def _moving(statistic: Any, x: Iterable[float], period: int) -> np.ndarray:
  """`statistic` of each trailing window's finite values, window by window
  (one huge value moves only its own windows); NaN for none."""
  if int(period) != period or period < 1:
    raise ValueError(f"period must be a positive integer, got {period!r}")
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"x must be 1-D, got shape {arr.shape}")
  arr = np.where(np.isfinite(arr), arr, np.nan)
  padded = np.concatenate([np.full(int(period) - 1, np.nan), arr])
  windows = np.lib.stride_tricks.sliding_window_view(padded, int(period))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN windows
    return statistic(windows, axis=1)


def moving_average(x: Iterable[float], period: int = 100) -> np.ndarray:
  """Trailing, NaN-aware moving average (see `_moving`)."""
  return _moving(np.nanmean, x, period)


def plateau_exit_step(losses: Iterable[float],
                      threshold: float = 0.95 * math.log(10.0),
                      period: int = 100) -> int | None:
  """The first index >= period - 1 whose moving median is below threshold.

  A median, so that one diverging step neither hides nor invents an exit;
  None if there is none. The default is 95% of a uniform guess's ln(10).
  """
  median = _moving(np.nanmedian, losses, period)
  if median.size < period:
    return None
  with np.errstate(invalid="ignore"):
    hits = np.nonzero(median[period - 1:] < threshold)[0]
  return int(hits[0]) + period - 1 if hits.size else None


def split_by_seed(records: Records) -> dict[int, list[Mapping[str, Any]]]:
  """{seed: its records in step order}; records without `seed` are seed 0."""
  by_seed: dict[int, list[Mapping[str, Any]]] = {}
  for record in records:
    by_seed.setdefault(int(record.get("seed", 0) or 0), []).append(record)
  return by_seed


def _quantile(values: Sequence[float], q: float) -> float:
  """Linear-interpolated quantile of finite-or-+inf values."""
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
  """(median, [25th, 75th percentile]) of the numbers, or (None, None).

  With `never_is_inf`, None (a "never" exit) sorts last and stays None.
  """
  nums = [math.inf if v is None and never_is_inf else float(v)
          for v in values
          if (v is None and never_is_inf) or is_number(v)]
  if not nums:
    return None, None
  out = [_quantile(nums, q) for q in (0.5, 0.25, 0.75)]
  out = [None if math.isinf(x) else x for x in out]
  return out[0], out[1:]
