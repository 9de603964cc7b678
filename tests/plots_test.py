"""experiments.plots on the metrics of a real (tiny) run."""

import numpy as np
import pytest
from matplotlib.image import imread

from configs import test as test_config
from experiments import plots
from experiments import summary
from experiments import train_lib


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """The metrics of 30 steps of the test config on the packaged MNIST."""
  config = test_config.get_config()
  config.data.source = "mnist_5k"
  config.training.num_steps = 30
  workdir = tmp_path_factory.mktemp("run")
  train_lib.train_and_evaluate(config, str(workdir))
  return summary.read_metrics(workdir / train_lib.METRICS_FILE)


def test_run_figure_shows_both_runs_and_the_cr_learning_rate(records):
  fig = plots.make_run_figure(records, title="t", base_name="Adam")
  ax_loss, ax_lr = fig.axes
  base, cr = ax_loss.get_lines()
  np.testing.assert_allclose(base.get_ydata(),
                             [r["loss_base"] for r in records])
  np.testing.assert_allclose(cr.get_ydata(), [r["loss_cr"] for r in records])
  rate, average = ax_lr.get_lines()
  np.testing.assert_allclose(rate.get_ydata(),
                             [r["learning_rate_cr"] for r in records])
  assert len(average.get_ydata()) == len(records)
  assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == [
      "Adam", "Adam with CR"]


def test_bad_values_are_left_out_not_plotted(records):
  bad = [dict(r) for r in records]
  bad[3]["loss_base"] = None            # a skipped step
  bad[4]["loss_cr"] = float("inf")
  bad[5]["learning_rate_cr"] = 0.0      # cannot go on a log axis
  fig = plots.make_run_figure(bad, title="t")
  (base, cr), (rate, _) = (ax.get_lines() for ax in fig.axes)
  assert len(base.get_xdata()) == len(cr.get_xdata()) == len(records) - 1
  assert 3 not in base.get_xdata() and 4 not in cr.get_xdata()
  assert 5 not in rate.get_xdata()


def test_plot_run_writes_a_png(records, tmp_path):
  out = tmp_path / "sub" / "figure.png"
  plots.plot_run(records, out, title="run")
  height, width, _ = imread(out).shape
  assert width > height > 100


def test_overview_has_two_panels_per_run(records, tmp_path):
  runs = [("a", records), ("b", records[:10]), ("c", records)]
  fig = plots.make_overview_figure(runs, title="all")
  assert len(fig.axes) == 6
  assert [len(ax.get_lines()) > 0 for ax in fig.axes] == [True] * 6
  plots.plot_overview(runs, tmp_path / "overview.png", title="all")
  assert imread(tmp_path / "overview.png").ndim == 3
  with pytest.raises(ValueError):
    plots.plot_overview([], tmp_path / "none.png", title="none")
