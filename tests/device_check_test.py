"""experiments/device_check.py on the CPU with tiny sizes (no timing asserted).

The check is meant for a lent accelerator with a short lease; this runs the
very command (`python -m experiments.device_check --tiny`) in a subprocess on
the CPU, so that it is known to work before device time is spent on it.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from experiments import device_check
from experiments import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  # One CPU device, as on a one-GPU machine (no forced host device count),
  # and XLA's cheap CPU compilation: no timing is asserted here, and the
  # dozen compilations are most of this test's time.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.device_check", f"--out={out}",
       "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  md, js = out / "device_check.md", out / "device_check.json"
  assert md.exists() and js.exists()
  with open(js, encoding="utf-8") as f:
    saved = json.load(f)
  for name in device_check.HLO_STEPS:        # the compiled programs, as text
    hlo = (out / f"hlo_{name}_b8.txt").read_text(encoding="utf-8")
    assert "ENTRY" in hlo, name
  return saved, md.read_text(encoding="utf-8")


def test_every_section_ran_without_error(report):
  saved, markdown = report
  assert saved["finished"]
  assert set(saved["sections"]) == set(device_check.SECTIONS)
  for name, section in saved["sections"].items():
    assert section["status"] == "ok", (name, section.get("error"),
                                       section.get("traceback"))
    assert section["error"] is None
    assert _positive(section["wall_s"]), name
  assert _positive(saved["total_wall_s"])
  env = saved["environment"]
  assert env["backend"] == "cpu" and env["device_kind"]
  assert env["jax_version"] and env["jaxlib_version"]
  for title in ("# lrcr device check", "## 1. Exactness", "## 2. Speed",
                "## 3. Memory", "## 4. Fig. 2 run", "**Goals:**",
                "| target | measured | verdict |"):
    assert title in markdown, title


def test_exactness_numbers_are_sane(report):
  exact = report[0]["sections"]["exactness"]["result"]
  assert exact["reference_dtype"] == "float64"
  assert exact["reference_device"].lower().startswith("cpu")
  assert exact["f64_engine_vs_fof_max"] < 1e-10
  methods = {(c["direction"], c["method"]) for c in exact["cases"]}
  assert methods == {("grad", "engine"), ("grad", "engine_gram"),
                     ("grad", "fof"), ("random", "engine"), ("random", "fof")}
  for c in exact["cases"]:
    for key in ("slope", "curvature", "ref_slope", "ref_curvature"):
      assert math.isfinite(c[key]) and c[key] != 0.0, (key, c)
    assert c["rel_err_slope"] < 1e-3 and c["rel_err_curvature"] < 1e-3, c
    if c["direction"] == "grad":
      assert c["slope"] < 0      # -lr grad F is a descent direction
  for prec in device_check.PRECISIONS:
    assert exact["max_rel_err"][prec]["engine"] < 1e-3
  for table in exact["step_timing"].values():
    assert set(table["steps"]) == {
        f"{n}@{p}" for n in (device_check.SGD, device_check.GRAM)
        for p in device_check.PRECISIONS}
    for name, t in table["steps"].items():
      assert _positive(t["ms_per_step"]) and _positive(t["ratio"]), name
    assert _positive(table["cr_highest_over_default"])


def test_speed_memory_and_fig2_numbers_are_sane(report):
  saved = report[0]
  speed = saved["sections"]["speed"]["result"]
  assert speed["shapes"]
  for row in speed["shapes"].values():
    assert set(row["variants"]) == set(device_check.SPEED_STEPS)
    for name, t in row["variants"].items():
      assert _positive(t["ms_per_step"]) and _positive(t["ratio"]), name
      assert isinstance(t["kernels"], int) and t["kernels"] > 0, name
      assert t["kernel_ratio"] == pytest.approx(
          t["kernels"] / row["variants"][device_check.SGD]["kernels"])
    kernels = {n: t["kernels"] for n, t in row["variants"].items()}
    assert kernels[device_check.GRAM] > kernels[device_check.SGD], kernels
  assert _positive(speed["scan_chunk"]["steps_per_s"])

  memory = saved["sections"]["memory"]["result"]
  for row in memory["shapes"].values():
    for name in device_check.MEMORY_STEPS:
      assert _positive(row["steps"][name]["peak_bytes"]), name
      assert _positive(row["steps"][name]["memory_ratio"]), name

  fig2 = saved["sections"]["fig2"]["result"]
  assert fig2["num_steps"] == device_check.Options.tiny_sizes().fig2_steps
  assert fig2["data_source"] == "mnist_5k"
  assert _positive(fig2["wall_time_s"]) and _positive(fig2["steps_per_s"])
  assert fig2["stopped"] is None

  goals = saved["goals"]
  assert len(goals) == len(device_check.goals(
      device_check.Options.tiny_sizes()))
  assert all(g["met"] in (True, False) for g in goals), goals
  assert all("--tiny" in g["verdict"] for g in goals)


def test_sections_past_the_budget_are_skipped_and_recorded(tmp_path):
  saved = device_check.run_check(device_check.Options.tiny_sizes(),
                                 str(tmp_path), sections=("memory", "fig2"),
                                 budget_s=-1.0)
  with open(tmp_path / "device_check.json", encoding="utf-8") as f:
    assert json.load(f)["finished"]
  assert set(saved["sections"]) == {"memory", "fig2"}
  for section in saved["sections"].values():
    assert section["status"] == "skipped" and "budget_s" in section["error"]
  assert all(g["met"] is None for g in saved["goals"])
  assert "| fig2 | skipped" in (tmp_path / "device_check.md").read_text()


def test_steps_past_the_budget_are_skipped_and_recorded():
  """Inside a section: what starts after the deadline is skipped, and shown."""
  opts = device_check.Options.tiny_sizes()
  past = dict(deadline=-math.inf)
  speed = device_check.section_speed(opts, dict(past))
  assert speed["shapes"] == {} and speed["scan_chunk"] is None
  assert speed["skipped_over_budget"] == (
      [f"b{b}" for b in opts.batches] + ["scan_chunk"])
  exact = device_check.section_exactness(opts, dict(past))
  assert exact["step_timing"] == {
      f"b{b}": dict(skipped="over --budget_s") for b in opts.precision_batches}
  assert exact["cases"]                     # the directionals still ran
  report = dict(
      command="", date="", environment=report_lib.environment(),
      options=dataclasses.asdict(opts), finished=True, total_wall_s=0.0,
      sections={name: dict(status="ok", error=None, wall_s=0.0, result=r)
                for name, r in (("exactness", exact), ("speed", speed))})
  report["goals"] = device_check.evaluate_goals(report)
  speed_goals = [g for g in report["goals"] if "CR-SGD" in g["target"]]
  assert len(speed_goals) == 3 and all(g["met"] is None for g in speed_goals)
  assert all(g["verdict"].startswith("not measured") for g in speed_goals)
  markdown = device_check.to_markdown(report)
  for skipped in (opts.precision_batches, (*opts.batches, "scan_chunk")):
    skipped = ", ".join(f"b{b}" if isinstance(b, int) else b for b in skipped)
    assert f"Skipped (over --budget_s): {skipped}." in markdown
  assert "Scanned chunk" not in markdown


def test_unknown_section_is_refused(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    device_check.run_check(device_check.Options.tiny_sizes(), str(tmp_path),
                           sections=("speedy",))

