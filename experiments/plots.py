"""The paper's figures of base vs. base+CR runs: medians over seeds, IQR bands.

Figures use an Agg canvas, not pyplot, so no global state is touched.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import workdir
from experiments.stats import Records, extract_series, moving_average
from experiments.stats import split_by_seed

DPI = 120


def by_seed(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps [T], values [S, T]): one row per seed, NaN where a seed has none."""
  runs = list(split_by_seed(records).values())
  steps = np.unique(np.concatenate([extract_series(r, "step") for r in runs])) \
      if runs else np.zeros(0)
  values = np.full((len(runs), len(steps)), np.nan)
  for row, run in zip(values, runs):
    row[np.searchsorted(steps, extract_series(run, "step"))] = (
        extract_series(run, key))
  return steps, values


def _band(ax: Axes, steps: np.ndarray, values: np.ndarray, *, color: str,
          label: str, positive: bool = False, linewidth: float = 0.8,
          band: bool = True) -> None:
  """Median over seeds of the finite (if `positive`, > 0) values; IQR band."""
  v = np.where(np.isfinite(values) & ((values > 0) if positive else True),
               values, np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN steps
    median, lo, hi = (np.nanpercentile(v, q, axis=0) for q in (50, 25, 75))
  keep = np.isfinite(median)
  ax.plot(steps[keep], median[keep], color=color, linewidth=linewidth,
          label=label)
  if band and len(values) > 1:
    ax.fill_between(steps[keep], lo[keep], hi[keep], color=color,
                    alpha=0.25, linewidth=0)


def _seeds_label(records: Records) -> str:
  n = len(split_by_seed(records))
  return f"median of {n} seeds, IQR band" if n > 1 else "one seed"


def _plot(ax_loss: Axes, ax_lr: Axes, records: Records, base_name: str,
          period: int, legend: bool) -> None:
  """The losses on `ax_loss`; the rates on `ax_lr`, log scale."""
  for key, color, label in (("loss_base", "blue", base_name),  # the paper's
                            ("loss_cr", "red", f"{base_name} with CR")):
    _band(ax_loss, *by_seed(records, key), color=color, label=label)
  steps, lr = by_seed(records, "learning_rate_cr")
  _band(ax_lr, steps, lr, color="red", label="calculated rate",
        positive=True, linewidth=0.5, band=False)
  # The paper's moving average, per seed (non-positive rates left out).
  average = np.stack([moving_average(np.where(row > 0, row, np.nan), period)
                      for row in lr]) if len(lr) else lr
  _band(ax_lr, steps, average, color="green", positive=True,
        linewidth=1.2, label=f"period-{period} moving average")
  _band(ax_lr, *by_seed(records, "base_learning_rate"), color="black",
        positive=True, linewidth=1.0, band=False,
        label=f"{base_name}'s own learning rate")
  ax_lr.set_yscale("log")
  for ax, ylabel, loc in ((ax_loss, "error (loss)", "lower left"),
                          (ax_lr, "learning rate", "upper right")):
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if legend:
      ax.legend(loc=loc, fontsize="small")


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
  """Writes the PNG atomically: whole or not at all."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  png = io.BytesIO()
  try:
    fig.savefig(png, format="png", dpi=DPI)
  finally:
    fig.clear()
  workdir.atomic_write(str(path), png.getvalue())


def make_run_figure(records: Records, *, title: str, base_name: str = "SGD",
                    period: int = 100) -> Figure:
  """The paper's two-panel figure of one run.

  (a) The losses of base and base+CR; (b), log scale: the CR learning rate,
  its moving average and the base learning rate (rates > 0 only).
  """
  fig = Figure(figsize=(13.0, 4.8), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  ax_loss, ax_lr = fig.subplots(1, 2)
  _plot(ax_loss, ax_lr, records, base_name, period, legend=True)
  ax_loss.set_title(f"(a) Error ({base_name} in blue, {base_name} with CR in "
                    f"red; {_seeds_label(records)})", fontsize="small")
  ax_lr.set_title(
      f"(b) Learning rate (CR's in red, period-{period} moving average in "
      f"green, {base_name}'s own in black)", fontsize="small")
  fig.suptitle(title)
  return fig


def plot_run(records: Records, path: str | os.PathLike[str],
             **kwargs: Any) -> None:
  """Saves `make_run_figure(records, **kwargs)` as a PNG at `path`."""
  _save(make_run_figure(records, **kwargs), path)


def make_overview_figure(runs: Sequence[tuple[str, Records]], *, title: str,
                         period: int = 100) -> Figure:
  """A grid of (name, records) runs: a column each, losses above, rates below.

  Its 2 * len(runs) axes are all loss axes, then all rate axes.
  """
  if not runs:
    raise ValueError("plot_overview needs at least one run")
  n = len(runs)
  fig = Figure(figsize=(max(4.0, 3.4 * n + 0.6), 6.4), dpi=DPI,
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(2, n, squeeze=False))
  for j, (name, records) in enumerate(runs):
    _plot(axes[0, j], axes[1, j], records, "base", period, legend=(j == 0))
    axes[0, j].set_title(f"{name}\n({_seeds_label(records)})",
                         fontsize="medium")
    if j > 0:
      axes[0, j].set_ylabel("")
      axes[1, j].set_ylabel("")
  fig.suptitle(title)
  return fig


def plot_overview(runs: Sequence[tuple[str, Records]],
                  path: str | os.PathLike[str], **kwargs: Any) -> None:
  """Saves `make_overview_figure(runs, **kwargs)` as a PNG at `path`."""
  _save(make_overview_figure(runs, **kwargs), path)