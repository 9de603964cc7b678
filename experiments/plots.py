"""Figures in the paper's layout for base vs. base+CR runs.

Figures are built as :class:`matplotlib.figure.Figure` objects attached to an
Agg canvas, without pyplot, so nothing is registered with (or leaked into)
pyplot's figure manager and the global backend is left untouched; the
figures are released after saving.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.summary import extract_series, extract_steps, moving_average

#: Colours used in the paper.
BASE_COLOR = "blue"
CR_COLOR = "red"
AVERAGE_COLOR = "green"

#: Resolution of saved PNGs.
DPI = 120

Records = Sequence[Mapping[str, Any]]


def _finite_xy(x: np.ndarray, y: np.ndarray, *, positive: bool = False):
  """Drops points with non-finite (or, if ``positive``, non-positive) y."""
  keep = np.isfinite(x) & np.isfinite(y)
  if positive:
    keep &= y > 0
  return x[keep], y[keep]


def _plot_losses(ax: Axes, records: Records, base_name: str, *,
                 legend: bool) -> None:
  steps = extract_steps(records)
  for key, color, label in (
      ("loss_base", BASE_COLOR, base_name),
      ("loss_cr", CR_COLOR, f"{base_name} with CR"),
  ):
    x, y = _finite_xy(steps, extract_series(records, key))
    ax.plot(x, y, color=color, linewidth=0.8, label=label)
  ax.set_xlabel("iteration")
  ax.set_ylabel("error (loss)")
  if legend:
    ax.legend(loc="lower left", fontsize="small")


def _plot_learning_rate(ax: Axes, records: Records, period: int, *,
                        legend: bool) -> None:
  steps = extract_steps(records)
  lr = extract_series(records, "learning_rate_cr")
  x, y = _finite_xy(steps, lr, positive=True)
  ax.plot(x, y, color=CR_COLOR, linewidth=0.6, label="calculated rate")
  x, y = _finite_xy(steps, moving_average(lr, period), positive=True)
  ax.plot(
      x,
      y,
      color=AVERAGE_COLOR,
      linewidth=1.2,
      label=f"period-{period} moving average",
  )
  ax.set_yscale("log")
  ax.set_xlabel("iteration")
  ax.set_ylabel("learning rate")
  if legend:
    ax.legend(loc="upper right", fontsize="small")


def _new_figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    fig.savefig(path, format="png", dpi=DPI)
  finally:
    fig.clear()


def make_run_figure(
    records: Records,
    *,
    title: str,
    base_name: str = "SGD",
    period: int = 100,
) -> Figure:
  """Builds the paper's two-panel figure for one run.

    Panel (a) shows the loss of the base optimizer (blue) and of base+CR
    (red) against the iteration; panel (b) shows the CR learning rate
    (``learning_rate_cr``, red) and its trailing moving average (green) on a
    log scale. Non-finite values are skipped and non-positive learning rates
    are masked, so neither crashes plotting.

    Args:
        records: Per-iteration metric records.
        title: Figure title; should name the configuration and the data used.
        base_name: Name of the base optimizer used in legend and captions.
        period: Moving-average window for panel (b).

    Returns:
        The figure (Agg canvas, not registered with pyplot), with exactly two
        axes.
    """
  fig = _new_figure((13.0, 4.8))
  ax_loss, ax_lr = fig.subplots(1, 2)
  _plot_losses(ax_loss, records, base_name, legend=True)
  ax_loss.set_title(
      f"(a) Error ({base_name} in blue, {base_name} with CR in red)",
      fontsize="small",
  )
  _plot_learning_rate(ax_lr, records, period, legend=True)
  ax_lr.set_title(
      f"(b) Learning rate (calculated rate in red, period-{period} moving "
      "average in green)",
      fontsize="small",
  )
  fig.suptitle(title)
  return fig


def plot_run(
    records: Records,
    path: str | os.PathLike[str],
    *,
    title: str,
    base_name: str = "SGD",
    period: int = 100,
) -> None:
  """Saves the two-panel figure of :func:`make_run_figure` as a PNG.

    Args:
        records: Per-iteration metric records.
        path: Output PNG path; parent directories are created.
        title: Figure title naming the configuration and the data used.
        base_name: Name of the base optimizer.
        period: Moving-average window for the learning-rate panel.
    """
  fig = make_run_figure(records,
                        title=title,
                        base_name=base_name,
                        period=period)
  _save(fig, path)


def make_overview_figure(
    runs: Sequence[tuple[str, Records]],
    *,
    title: str,
    period: int = 100,
) -> Figure:
  """Builds a grid figure of several runs.

    One column per run, titled with the run's name; the top row holds the
    losses (base blue, CR red), the bottom row the CR learning rate (red) and
    its moving average (green) on a log scale.

    Args:
        runs: ``(name, records)`` pairs.
        title: Figure title.
        period: Moving-average window for the learning-rate row.

    Returns:
        The figure, with ``2 * len(runs)`` axes (row-major: all loss axes,
        then all learning-rate axes).

    Raises:
        ValueError: If ``runs`` is empty.
    """
  if not runs:
    raise ValueError("plot_overview needs at least one run")
  n = len(runs)
  fig = _new_figure((max(4.0, 3.4 * n + 0.6), 6.4))
  axes = np.asarray(fig.subplots(2, n, squeeze=False))
  for j, (name, records) in enumerate(runs):
    _plot_losses(axes[0, j], records, "base", legend=(j == 0))
    axes[0, j].set_title(name, fontsize="medium")
    _plot_learning_rate(axes[1, j], records, period, legend=(j == 0))
    if j > 0:
      axes[0, j].set_ylabel("")
      axes[1, j].set_ylabel("")
  fig.suptitle(title)
  return fig


def plot_overview(
    runs: Sequence[tuple[str, Records]],
    path: str | os.PathLike[str],
    *,
    title: str,
    period: int = 100,
) -> None:
  """Saves the all-runs grid of :func:`make_overview_figure` as a PNG.

    Args:
        runs: ``(name, records)`` pairs, one column each.
        path: Output PNG path; parent directories are created.
        title: Figure title.
        period: Moving-average window for the learning-rate row.
    """
  fig = make_overview_figure(runs, title=title, period=period)
  _save(fig, path)
