"""experiments.plots on the metrics of a real (tiny) run."""

import numpy as np
import pytest
from matplotlib.image import imread

from configs import test as test_config
from experiments import plots
from experiments import stats
from experiments import metrics
from experiments import train_lib


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """The metrics of 30 steps of the test config, 3 seeds, packaged MNIST."""
  config = test_config.get_config()
  config.data.source = "mnist_5k"
  config.training.num_steps = 30
  config.num_seeds = 3
  workdir = tmp_path_factory.mktemp("run")
  train_lib.train_and_evaluate(config, str(workdir))
  return metrics.read_metrics(workdir / train_lib.METRICS_FILE)


def _one_seed(records):
  return [r for r in records if r["seed"] == 0]


def test_run_figure_shows_both_runs_and_the_cr_learning_rate(records):
  one = _one_seed(records)
  fig = plots.make_run_figure(one, title="t", base_name="Adam")
  ax_loss, ax_lr = fig.axes
  base, cr = ax_loss.get_lines()
  np.testing.assert_allclose(base.get_ydata(), [r["loss_base"] for r in one])
  np.testing.assert_allclose(cr.get_ydata(), [r["loss_cr"] for r in one])
  rate, average, own = ax_lr.get_lines()
  np.testing.assert_allclose(rate.get_ydata(),
                             [r["learning_rate_cr"] for r in one])
  assert len(average.get_ydata()) == len(one)
  rates = np.array([r["learning_rate_cr"] for r in one])
  expected = stats.moving_average(np.where(rates > 0, rates, np.nan), 100)
  np.testing.assert_allclose(average.get_ydata(),
                             expected[np.isfinite(expected)])
  np.testing.assert_allclose(own.get_ydata(),
                             [r["base_learning_rate"] for r in one])
  assert ax_lr.get_yscale() == "log"
  assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == [
      "Adam", "Adam with CR"]
  assert not ax_loss.collections          # one seed: no band


def test_several_seeds_give_the_median_and_an_iqr_band(records):
  """Issue 12: the median over seeds, with the interquartile range."""
  fig = plots.make_run_figure(records, title="t")
  ax_loss, ax_lr = fig.axes
  _, cr = ax_loss.get_lines()
  losses = np.array([[r["loss_cr"] for r in records if r["seed"] == s]
                     for s in range(3)])
  np.testing.assert_allclose(cr.get_ydata(), np.median(losses, axis=0))
  assert len(ax_loss.collections) == 2     # a band for base, one for CR
  band = ax_loss.collections[1].get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose(band.max(), np.percentile(losses, 75, axis=0)
                             .max(), rtol=1e-6)
  # Both edges, step by step: the band spans the 25th to 75th percentile.
  vertices = ax_loss.collections[1].get_paths()[0].vertices
  steps = [r["step"] for r in records if r["seed"] == 0]
  edges = np.array([[vertices[vertices[:, 0] == t, 1].min(),
                     vertices[vertices[:, 0] == t, 1].max()] for t in steps])
  np.testing.assert_allclose(edges[:, 0], np.percentile(losses, 25, axis=0),
                             rtol=1e-6)
  np.testing.assert_allclose(edges[:, 1], np.percentile(losses, 75, axis=0),
                             rtol=1e-6)
  assert len(ax_lr.collections) == 1       # the moving average's band
  assert "median of 3 seeds" in ax_loss.get_title()


def test_bad_values_are_left_out_not_plotted(records):
  bad = [dict(r) for r in _one_seed(records)]
  bad[3]["loss_base"] = None            # a skipped step
  bad[4]["loss_cr"] = float("inf")
  bad[5]["learning_rate_cr"] = 0.0      # cannot go on a log axis
  fig = plots.make_run_figure(bad, title="t")
  (base, cr), (rate, _, _) = (ax.get_lines() for ax in fig.axes)
  assert len(base.get_xdata()) == len(cr.get_xdata()) == len(bad) - 1
  assert 3 not in base.get_xdata() and 4 not in cr.get_xdata()
  assert 5 not in rate.get_xdata()


def test_plot_run_writes_a_png(records, tmp_path):
  out = tmp_path / "sub" / "figure.png"
  plots.plot_run(records, out, title="run")
  height, width, _ = imread(out).shape
  assert width > height > 100


def test_overview_has_two_panels_per_run(records, tmp_path):
  runs = [("a", records), ("b", records[:30]), ("c", _one_seed(records))]
  fig = plots.make_overview_figure(runs, title="all")
  assert len(fig.axes) == 6
  assert [len(ax.get_lines()) > 0 for ax in fig.axes] == [True] * 6
  plots.plot_overview(runs, tmp_path / "overview.png", title="all")
  assert imread(tmp_path / "overview.png").ndim == 3
  with pytest.raises(ValueError):
    plots.plot_overview([], tmp_path / "none.png", title="none")
