"""Tests for experiments.summary."""

import json
import math

import numpy as np
import pytest

from experiments import metrics
from experiments import stats
from experiments import summary as S

LN10 = math.log(10.0)


def _records(loss_base, loss_cr, lr_cr):
  return [{
      "step": i,
      "loss_base": float(b),
      "loss_cr": float(c),
      "learning_rate_cr": float(r),
      "alpha": float(r) / 0.01,
      "slope": -1.0,
      "curvature": 1.0,
      "base_learning_rate": 0.01,
  } for i, (b, c, r) in enumerate(zip(loss_base, loss_cr, lr_cr))]


def _plateau_curve(n, flat, low=0.5, drop=100):
  """ln10 for `flat` steps, then a linear drop over `drop` steps to `low`."""
  x = np.full(n, LN10)
  end = min(n, flat + drop)
  x[flat:end] = np.linspace(LN10, low, drop + 1)[1:end - flat + 1]
  x[end:] = low
  return x


# ----------------------------------------------------------------- moving_average


@pytest.mark.parametrize("period", [1, 3, 10, 100])
def test_moving_average_matches_loop(period):
  rng = np.random.default_rng(0)
  x = rng.normal(size=250)
  x[[5, 6, 7, 50]] = np.nan
  expected = np.array([
      np.nanmean(x[max(0, i - period + 1):i +
                   1]) if np.isfinite(x[max(0, i - period + 1):i +
                                        1]).any() else np.nan
      for i in range(len(x))
  ])
  got = stats.moving_average(x, period)
  assert got.shape == x.shape
  np.testing.assert_allclose(got,
                             expected,
                             rtol=1e-10,
                             atol=1e-12,
                             equal_nan=True)


def test_moving_average_all_nan_window_and_inf():
  x = np.array([np.nan, np.nan, 1.0, np.inf, 3.0])
  got = stats.moving_average(x, 2)
  assert np.isnan(got[0]) and np.isnan(got[1])
  np.testing.assert_allclose(got[2:], [1.0, 1.0, 3.0])


def test_moving_average_bad_period():
  with pytest.raises(ValueError):
    stats.moving_average([1.0, 2.0], 0)


# ---------------------------------------------------------------- plateau exit


def test_plateau_exit_known_by_construction():
  # Flat at ln10 for 500 steps, then drop by 0.01 per step.
  x = np.concatenate([np.full(500, LN10), LN10 - 0.01 * np.arange(1, 301)])
  thr = 0.95 * LN10
  mm = np.array([np.median(x[max(0, i - 99):i + 1]) for i in range(len(x))])
  expected = next(i for i in range(99, len(x)) if mm[i] < thr)
  assert stats.plateau_exit_step(x) == expected
  # The window ending at 499+k (50 <= k < 100) holds the k dropped values;
  # its median is ln10 - 0.01 (k - 49.5), below 0.95 ln10 once
  # 0.01 (k - 49.5) > 0.05 ln10.
  k = next(k for k in range(50, 300) if 0.01 * (k - 49.5) > 0.05 * LN10)
  assert expected == 499 + k


def test_plateau_exit_none_for_flat_and_short():
  assert stats.plateau_exit_step(np.full(1000, LN10)) is None
  assert stats.plateau_exit_step(np.full(50, 0.1)) is None  # no full window


def test_plateau_exit_ignores_partial_windows():
  x = np.full(300, LN10)
  x[:3] = 0.0  # noisy first batches: partial windows average 0
  assert stats.plateau_exit_step(x) is None


def test_plateau_exit_nan_aware():
  x = np.full(200, 0.1)
  x[::3] = np.nan
  assert stats.plateau_exit_step(x) == 99


# --------------------------------------------------------------- summarize_run


def _plateau_run():
  n = 1000
  base = _plateau_curve(n, flat=800)
  cr = _plateau_curve(n, flat=200)
  lr = np.where(np.arange(n) < 250, 1.0, 0.01)
  return _records(base, cr, lr), base, cr, lr


def test_summarize_run_known_answers():
  records, base, cr, lr = _plateau_run()
  s = S.summarize_run(records)
  assert s["num_steps"] == 1000
  assert s["final_loss_base"] == pytest.approx(np.median(base[-100:]))
  assert s["final_loss_cr"] == pytest.approx(0.5)
  assert s["exit_step_cr"] == stats.plateau_exit_step(cr)
  assert 200 < s["exit_step_cr"] < 300
  assert s["exit_step_base"] == stats.plateau_exit_step(base)
  assert s["exit_step_base"] > 800
  assert s["peak_learning_rate_cr"] == pytest.approx(1.0)
  assert s["median_learning_rate_cr"] == pytest.approx(0.01)
  e = s["exit_step_cr"]
  assert s["plateau_learning_rate_cr"] == pytest.approx(np.median(lr[:e]))
  assert s["later_median_learning_rate_cr"] == pytest.approx(np.median(lr[e:]))
  assert s["plateau_to_later_ratio"] == pytest.approx(
      np.median(lr[:e]) / np.median(lr[e:]))
  assert s["nonfinite_steps_base"] == 0 and s["nonfinite_steps_cr"] == 0
  assert s["claim"] is None
  json.dumps(s)  # serializable


def test_summarize_run_plateau_lr_stats_none_without_exit():
  n = 300
  records = _records(np.full(n, LN10), np.full(n, LN10), np.full(n, 0.1))
  s = S.summarize_run(records)
  assert s["exit_step_base"] is None and s["exit_step_cr"] is None
  assert s["plateau_learning_rate_cr"] is None
  assert s["later_median_learning_rate_cr"] is None
  assert s["plateau_to_later_ratio"] is None


def test_summarize_run_nan_handling():
  records, *_ = _plateau_run()
  records[-1]["loss_cr"] = float("nan")
  records[-2]["loss_cr"] = None
  records[-3]["loss_base"] = float("inf")
  records[10]["learning_rate_cr"] = None
  records[11]["learning_rate_cr"] = float("nan")
  records[12]["learning_rate_cr"] = 1e6
  del records[13]["learning_rate_cr"]
  s = S.summarize_run(records)
  assert s["nonfinite_steps_cr"] == 2
  assert s["nonfinite_steps_base"] == 1
  assert s["final_loss_cr"] == pytest.approx(0.5)
  assert math.isfinite(s["final_loss_base"])
  assert s["peak_learning_rate_cr"] == pytest.approx(1e6)


def test_summarize_run_num_classes_and_claim_key():
  n = 400
  loss = np.full(n, math.log(100.0))
  loss[200:] = 0.9 * math.log(100.0)  # below 0.95 ln 100, above ln 10
  s10 = S.summarize_run(_records(loss, loss, np.ones(n)))
  s100 = S.summarize_run(_records(loss, loss, np.ones(n)),
                         num_classes=100,
                         claim_kind="no_plateau")
  assert s10["exit_step_cr"] is None
  assert s100["exit_step_cr"] is not None
  assert s100["claim"]["kind"] == "no_plateau"


# ----------------------------------------------------------- qualitative_claim


def test_claim_plateau_true_and_false():
  records, *_ = _plateau_run()
  c = S.summarize_run(records, claim_kind="plateau")["claim"]
  assert c["kind"] == "plateau" and c["holds"] is True
  assert isinstance(c["reason"], str) and str(
      S.summarize_run(records)["exit_step_cr"]) in c["reason"]

  # Small learning-rate ratio -> false.
  n = 1000
  base = _plateau_curve(n, flat=800)
  cr = _plateau_curve(n, flat=200)
  c = S.summarize_run(_records(base, cr, np.full(n, 0.01)),
                      claim_kind="plateau")["claim"]
  assert c["holds"] is False

  # Base exits first -> false even with a large ratio.
  lr = np.where(np.arange(n) < 850, 1.0, 0.01)
  c = S.summarize_run(_records(cr, base, lr), claim_kind="plateau")["claim"]
  assert c["holds"] is False


def test_claim_plateau_base_never_exits():
  s = {
      "exit_step_base": None,
      "exit_step_cr": 300,
      "plateau_to_later_ratio": 50.0
  }
  assert S.qualitative_claim(s, "plateau")["holds"] is True
  s["exit_step_cr"] = None
  assert S.qualitative_claim(s, "plateau")["holds"] is False


def test_claim_no_plateau():
  n = 500
  base = np.linspace(2.0, 0.5, n)
  cr = np.linspace(2.0, 0.55, n)
  lr = np.full(n, 0.01)
  assert S.summarize_run(_records(base, cr, lr),
                         claim_kind="no_plateau")["claim"]["holds"]
  # CR much worse -> false.
  cr_bad = np.linspace(2.0, 1.2, n)
  assert not S.summarize_run(_records(base, cr_bad, lr),
                             claim_kind="no_plateau")["claim"]["holds"]
  # Not descending -> false.
  flat = np.full(n, 2.0)
  assert not S.summarize_run(_records(flat, flat, lr),
                             claim_kind="no_plateau")["claim"]["holds"]


def test_claim_adam():
  n = 1000
  same = _plateau_curve(n, flat=300)
  lr = np.full(n, 1e-3)
  c = S.summarize_run(_records(same, same, lr), claim_kind="adam")["claim"]
  assert c["kind"] == "adam" and c["holds"] is True
  # CR exits much earlier -> gain -> claim false.
  c = S.summarize_run(_records(same, _plateau_curve(n, flat=100), lr),
                      claim_kind="adam")["claim"]
  assert c["holds"] is False
  # CR final loss clearly better -> claim false.
  c = S.summarize_run(_records(same, _plateau_curve(n, flat=300, low=0.3), lr),
                      claim_kind="adam")["claim"]
  assert c["holds"] is False


def test_claim_unknown_kind():
  with pytest.raises(ValueError):
    S.qualitative_claim({}, "bogus")


# ------------------------------------------------------------------------ table


def test_summary_table_markdown():
  records, *_ = _plateau_run()
  s1 = S.summarize_run(records, claim_kind="plateau")
  n = 300
  s2 = S.summarize_run(
      _records(np.full(n, LN10), np.full(n, LN10), np.full(n, 0.1)))
  rows = [
      {
          **s1, "run": "sgd_cr",
          "figure": "Fig. 2",
          "data": "synthetic"
      },
      {
          **s2, "run": "flat",
          "figure": "Fig. 3",
          "data": "MNIST subset"
      },
  ]
  table = S.summary_table_markdown(rows)
  lines = table.strip().splitlines()
  assert len(lines) == 2 + 2
  assert lines[0].startswith("| run | paper figure | data | steps |")
  assert "claim holds" in lines[0]
  assert set(lines[1].replace("|", "")) == {"-"}
  ncols = lines[0].count("|")
  assert all(line.count("|") == ncols for line in lines)
  assert "sgd_cr" in lines[2] and "yes" in lines[2]
  assert "never" in lines[3] and "—" in lines[3]
  assert f"{s1['final_loss_cr']:.4g}" in lines[2]


# ----------------------------------------------------------------- read_metrics


def test_read_metrics_truncated_and_null(tmp_path):
  path = tmp_path / "metrics.jsonl"
  recs = [
      {
          "step": 0,
          "loss_base": 2.3,
          "loss_cr": None,
          "learning_rate_cr": 0.5
      },
      {
          "step": 1,
          "loss_base": float("nan"),
          "loss_cr": 2.2,
          "learning_rate_cr": None
      },
      {
          "step": 2,
          "loss_base": 2.1,
          "loss_cr": 2.0,
          "learning_rate_cr": 0.4
      },
  ]
  text = "".join(json.dumps(r) + "\n" for r in recs)
  text += '{"step": 3, "loss_base": 2.0, "loss_'  # killed mid-write
  path.write_text(text)
  out = metrics.read_metrics(path)
  assert [r["step"] for r in out] == [0, 1, 2]
  assert math.isnan(out[0]["loss_cr"])
  assert math.isnan(out[1]["loss_base"])
  assert math.isnan(out[1]["learning_rate_cr"])
  assert out[2]["learning_rate_cr"] == pytest.approx(0.4)
  s = S.summarize_run(out)
  assert s["num_steps"] == 3 and s["nonfinite_steps_cr"] == 1


def test_read_metrics_corrupt_middle_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
  with pytest.raises(metrics.MetricsError, match=rf"{path}:2: invalid JSON.*new "
                     "--workdir"):
    metrics.read_metrics(path)


def _seed_lines(steps, seeds):
  return "".join(json.dumps({"step": t, "seed": s, "loss_cr": 1.0}) + "\n"
                 for t in steps for s in seeds)


@pytest.mark.parametrize("steps, what", [
    (list(range(5, 10)), "expected step 0"),                 # truncated head
    ([0, 1, 3, 4], "expected step 2"),                       # a lost line
    ([0, 1, 2, 2, 3], "expected step 3"),                    # repeated
    ([0, 2, 1, 3], "expected step 1"),                       # moved
])
def test_read_metrics_refuses_a_damaged_file(tmp_path, steps, what):
  """Issue 11, item 1: lost, repeated or moved steps are named, not used."""
  path = tmp_path / "metrics.jsonl"
  path.write_text(_seed_lines(steps, [0]))
  with pytest.raises(metrics.MetricsError, match=rf"{path}:\d+: {what}.*new "
                     "--workdir"):
    metrics.read_metrics(path)


def test_read_metrics_checks_every_seed(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(_seed_lines(range(3), [0, 1, 2]))
  assert [(r["step"], r["seed"]) for r in metrics.read_metrics(path)] == [
      (t, s) for t in range(3) for s in range(3)]
  # A kill while a chunk was written: the incomplete last step is left out.
  path.write_text(_seed_lines(range(3), [0, 1, 2]) + _seed_lines([3], [0]))
  assert len(metrics.read_metrics(path)) == 9
  # One complete step of 2 seeds and half of the next: 2 records, not 3.
  path.write_text(_seed_lines([0], [0, 1]) + _seed_lines([1], [0]))
  assert [(r["step"], r["seed"]) for r in metrics.read_metrics(path)] == [
      (0, 0), (0, 1)]
  text = _seed_lines(range(3), [0, 1, 2]).splitlines(keepends=True)
  path.write_text("".join(text[:4] + text[5:]))       # step 1, seed 1 lost
  with pytest.raises(metrics.MetricsError, match="expected step 1, seed 1"):
    metrics.read_metrics(path)


def test_one_huge_loss_neither_hides_nor_invents_an_exit():
  """Issue 11, item 2."""
  assert stats.plateau_exit_step([2.3] * 5 + [4e28] + [2.3] * 300) is None
  x = np.concatenate([np.full(300, LN10), np.full(300, 0.5)])
  x[350] = 4e28
  assert stats.plateau_exit_step(x) == stats.plateau_exit_step(
      np.concatenate([np.full(300, LN10), np.full(300, 0.5)]))
  ma = stats.moving_average([2.3] * 5 + [4e28] + [2.3] * 300, 100)
  np.testing.assert_allclose(ma[-1], 2.3)     # no running sum to cancel


def test_summarize_seeds_median_iqr_and_claim_count():
  """Issue 12: per-seed numbers, the median and IQR, a claim over seeds."""
  n = 600
  records = []
  for seed, flat in enumerate([150, 200, 250, 300, n]):    # seed 4: no exit
    cr = _plateau_curve(n, flat=flat)
    lr = np.where(np.arange(n) < flat + 50, 1.0, 0.01)
    for r in _records(np.full(n, LN10), cr, lr):
      records.append({**r, "seed": seed})
  records.sort(key=lambda r: (r["step"], r["seed"]))
  s = S.summarize_seeds(records, claim_kind="plateau")
  assert s["num_seeds"] == 5 and s["seeds"] == [0, 1, 2, 3, 4]
  exits = [p["exit_step_cr"] for p in s["per_seed"]]
  assert exits[4] is None and exits[:4] == sorted(exits[:4])
  assert s["median"]["exit_step_cr"] == s["exit_step_cr"] == exits[2]
  assert s["iqr"]["exit_step_cr"] == [exits[1], exits[3]]
  assert s["median"]["exit_step_base"] is None          # never, on all seeds
  assert s["claim"]["holds_on"] == 4 and s["claim"]["required"] == 4
  assert s["claim"]["holds"] and "4 of 5" in s["claim"]["reason"]
  table = S.summary_table_markdown([{"run": "r", **s}])
  assert f"{exits[2]} [{exits[1]}, {exits[3]}]" in table
  assert "yes (4/5 seeds)" in table


def test_no_plateau_claim_survives_one_spike():
  """Issue 12: Fig. 1's criterion is the last-100 median, not the mean."""
  n = 400
  base = np.linspace(2.0, 0.05, n)
  cr = base.copy()
  cr[-5] = 3.66                                 # one over-long step
  c = S.summarize_run(_records(base, cr, np.full(n, 0.01)),
                      claim_kind="no_plateau")["claim"]
  assert c["holds"], c["reason"]


def test_claim_plateau_adaptive_threshold_is_2x():
  s = {
      "exit_step_base": 1000,
      "exit_step_cr": 700,
      "plateau_to_later_ratio": 5.0
  }
  assert S.qualitative_claim(s, "plateau_adaptive")["holds"] is True
  assert S.qualitative_claim(s, "plateau")["holds"] is False
  s["plateau_to_later_ratio"] = 1.5
  assert S.qualitative_claim(s, "plateau_adaptive")["holds"] is False
