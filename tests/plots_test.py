"""Tests for lrcr.plots."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lrcr import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(n=300, seed=0):
  rng = np.random.default_rng(seed)
  loss = np.linspace(math.log(10), 0.3, n) + 0.05 * rng.normal(size=n)
  lr = np.exp(rng.normal(size=n)) * 0.01
  return [{
      "step": i,
      "loss_base": float(loss[i] + 0.1),
      "loss_cr": float(loss[i]),
      "learning_rate_cr": float(lr[i]),
      "alpha": float(lr[i] / 0.01),
      "slope": -1.0,
      "curvature": 1.0,
      "base_learning_rate": 0.01,
  } for i in range(n)]


def _bad_records():
  recs = _records(200)
  recs[3]["loss_base"] = float("nan")
  recs[4]["loss_cr"] = None
  recs[5]["loss_cr"] = float("inf")
  recs[6]["learning_rate_cr"] = 0.0
  recs[7]["learning_rate_cr"] = -1.0
  recs[8]["learning_rate_cr"] = None
  recs[9]["learning_rate_cr"] = float("nan")
  return recs


def _hex(color):
  return mcolors.to_hex(color)


def _assert_png(path):
  data = path.read_bytes()
  assert len(data) > 1000
  assert data[:8] == PNG_SIGNATURE


def test_make_run_figure_layout():
  fig = plots.make_run_figure(_records(),
                              title="SGD+CR, synthetic data",
                              base_name="SGD")
  assert len(fig.axes) == 2
  ax_loss, ax_lr = fig.axes
  colors = [_hex(l.get_color()) for ax in fig.axes for l in ax.get_lines()]
  assert colors == [_hex(c) for c in ("blue", "red", "red", "green")]
  assert ax_lr.get_yscale() == "log"
  assert ax_loss.get_yscale() == "linear"
  labels = [t.get_text() for t in ax_loss.get_legend().get_texts()]
  assert labels == ["SGD", "SGD with CR"]
  assert ax_loss.get_title() == "(a) Error (SGD in blue, SGD with CR in red)"
  assert ax_lr.get_title() == (
      "(b) Learning rate (calculated rate in red, period-100 moving average in green)"
  )
  assert fig.get_suptitle() == "SGD+CR, synthetic data"


def test_make_run_figure_base_name():
  fig = plots.make_run_figure(_records(50), title="t", base_name="Adam")
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert labels == ["Adam", "Adam with CR"]


def test_make_run_figure_masks_bad_values():
  fig = plots.make_run_figure(_bad_records(), title="bad")
  loss_base, loss_cr = fig.axes[0].get_lines()
  lr_line, ma_line = fig.axes[1].get_lines()
  assert np.isfinite(loss_base.get_ydata()).all() and len(
      loss_base.get_ydata()) == 199
  assert np.isfinite(loss_cr.get_ydata()).all() and len(
      loss_cr.get_ydata()) == 198
  lr = np.asarray(lr_line.get_ydata())
  assert len(lr) == 196 and (lr > 0).all()
  assert (np.asarray(ma_line.get_ydata()) > 0).all()


def test_plot_run_writes_png_and_closes(tmp_path):
  before = plt.get_fignums()
  out = tmp_path / "sub" / "run.png"
  plots.plot_run(_bad_records(), out, title="SGD on synthetic data")
  _assert_png(out)
  assert plt.get_fignums() == before


def test_plot_run_all_nonpositive_lr(tmp_path):
  recs = _records(20)
  for r in recs:
    r["learning_rate_cr"] = 0.0
  out = tmp_path / "zero.png"
  plots.plot_run(recs, out, title="zero lr")
  _assert_png(out)


def test_plot_overview(tmp_path):
  runs = [("sgd", _records(120)), ("adagrad", _bad_records()),
          ("adam", _records(80, 1))]
  fig = plots.make_overview_figure(runs, title="all runs")
  assert len(fig.axes) == 6
  assert [ax.get_title() for ax in fig.axes[:3]] == ["sgd", "adagrad", "adam"]
  assert all(ax.get_yscale() == "log" for ax in fig.axes[3:])
  assert all(ax.get_yscale() == "linear" for ax in fig.axes[:3])
  before = plt.get_fignums()
  out = tmp_path / "overview.png"
  plots.plot_overview(runs, out, title="all runs")
  _assert_png(out)
  assert plt.get_fignums() == before


def test_plot_overview_single_and_empty(tmp_path):
  out = tmp_path / "one.png"
  plots.plot_overview([("only", _records(30))], out, title="one")
  _assert_png(out)
  with pytest.raises(ValueError):
    plots.plot_overview([], tmp_path / "none.png", title="none")
