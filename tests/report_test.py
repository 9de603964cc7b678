"""experiments/report.py: JSON, numbers, paired ratios, tables, goal rows."""

import json
import math

import numpy as np
import pytest

from experiments import report
from experiments.report import Goal


def test_jsonable_makes_numpy_and_non_finite_json_safe():
  x = {1: np.float32(0.5), "a": [np.int64(3), np.bool_(True), math.nan],
       "b": (math.inf, None, "s"), "c": object}
  out = report.jsonable(x)
  assert out == {"1": 0.5, "a": [3, True, None], "b": [None, None, "s"],
                 "c": str(object)}
  assert isinstance(out["a"][0], int) and isinstance(out["a"][1], bool)
  json.dumps(out, allow_nan=False)


def test_numbers_and_ratios():
  assert report.ratio(3.0, 2.0) == 1.5
  assert report.ratio(None, 2.0) is None and report.ratio(1.0, 0) is None
  assert report.rel_err(1.1, 1.0) == pytest.approx(0.1)
  assert report.rel_err(0.5, 0.0) == 0.5
  assert report.fmt(None) == "n/a" and report.fmt(True) == "yes"
  assert report.fmt(np.int32(7)) == "7" and report.fmt(0.123456) == "0.123"
  assert report.fmt(math.nan) == "nan" and report.fmt(-math.inf) == "-inf"
  assert report.mib(3 * 2**20) == "3.00"
  assert report.with_iqr(2.0, [1.0, 3.0]) == "2 [1, 3]"
  assert report.with_iqr(2.0, None) == "2"


def test_paired_ratios_are_per_repeat():
  seconds = [2e-3, 4e-3, 6e-3, 8e-3]
  base = [1e-3, 4e-3, 2e-3, 2e-3]        # per-repeat ratios 2, 1, 3, 4
  out = report.paired(seconds, base)
  assert out["ratio"] == pytest.approx(np.median([2, 1, 3, 4]))
  assert out["ratio_q1"] == pytest.approx(np.percentile([2, 1, 3, 4], 25))
  assert out["ms_per_step"] == pytest.approx(5.0)
  assert out["ratio_of_medians"] == pytest.approx(5.0 / 2.0)
  assert out["samples_ms"] == pytest.approx([2, 4, 6, 8])


def test_table_escapes_and_formats_cells():
  lines = report.table(["a", "b"], [("x|y", 0.5), (None, "line\nbreak")])
  assert lines == ["| a | b |", "|---|---|", "| x\\|y | 0.5 |",
                   "| n/a | line break |"]


@pytest.mark.parametrize("value,verdict,met,goal_met", [
    (1.2, "met (goal)", True, True),
    (1.3, "met (goal)", True, True),
    (1.5, "met (bar; goal <= 1.3 not yet)", True, False),
    (1.6, "met (bar; goal <= 1.3 not yet)", True, False),
    (1.7, "NOT met (gap: 1.7 vs <= 1.6)", False, False),
    (None, "not measured", None, None),
    (math.nan, "not measured", None, None),
])
def test_judge_bar_and_goal(value, verdict, met, goal_met):
  row = report.judge(Goal("kernels", "<=", 1.6, 1.3), value, "words")
  assert (row["verdict"], row["met"], row["goal_met"]) == (
      verdict, met, goal_met)


def test_judge_strict_higher_and_goal_only():
  fewer = Goal("fewer", "<", 1.0)
  assert report.judge(fewer, 1.0)["verdict"] == "NOT met (gap: 1 vs < 1)"
  assert report.judge(fewer, 0.99)["verdict"] == "met"
  faster = Goal("faster", ">=", 1.25)
  assert report.judge(faster, 1.25)["met"] is True
  assert report.judge(faster, 1.2)["met"] is False
  only = Goal("equal", "<=", None, 1.0)
  assert report.judge(only, 0.9)["verdict"] == "met"
  assert report.judge(only, 1.1)["verdict"] == "NOT met (gap: 1.1 vs <= 1)"
  fewer_or_far_fewer = Goal("k", "<", 1.0, 0.6, goal_op="<=")
  assert report.judge(fewer_or_far_fewer, 0.6)["verdict"] == "met (goal)"
  assert report.judge(fewer_or_far_fewer, 0.7)["verdict"] == (
      "met (bar; goal <= 0.6 not yet)")
  with pytest.raises(ValueError, match="op"):
    Goal("x", "<=", 1.0, 0.5, goal_op="==")
  with pytest.raises(ValueError, match="op"):
    Goal("x", "=<", 1.0)
  with pytest.raises(ValueError, match="bar, a goal"):
    Goal("x", "<=", None)


def test_goals_table_and_write(tmp_path):
  rows = [report.judge(Goal("t", "<=", 2.0, 1.0, "issue 19"), 1.5, "m")]
  lines = report.goals_table(rows)
  assert lines[2] == ("| t (bar <= 2, goal <= 1) [issue 19] | m | "
                      "met (bar; goal <= 1 not yet) |")
  saved = report.write(str(tmp_path), "r", {"x": math.nan}, "# r\n")
  assert saved == {"x": None}
  assert json.loads((tmp_path / "r.json").read_text()) == {"x": None}
  assert (tmp_path / "r.md").read_text() == "# r\n"
  assert not list(tmp_path.glob("*.tmp"))
