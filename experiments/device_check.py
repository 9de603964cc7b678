"""One short check of lrcr on an accelerator: exactness, speed, memory, Fig. 2.

    python -m experiments.device_check --out=runs/device_check [--tiny] \
        [--sections=exactness,speed,memory,fig2] [--budget_s=360]

Composes `exactness.float32_errors`, `benchmark.bench_shape`/`bench_chunk`
and `benchmark.train_run`, with their markdown. A failed section is recorded
and the next runs; <out>/device_check.{json,md} are rewritten after each.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging

import experiments
from experiments import benchmark
from experiments import exactness
from experiments import report as report_lib

SECTIONS = ("exactness", "speed", "memory", "fig2")
#: The steps measured (`bench.VARIANTS` names).
SGD, GRAM, DENSE = "sgd", "cr_sgd_engine_gram", "cr_sgd_engine"
SPEED_STEPS = (SGD, GRAM, DENSE, "cr_sgd_engine_gram_stacked",
               "cr_sgd_engine_stacked", "cr_sgd_autodiff")
HLO_STEPS = (SGD, GRAM, DENSE)           # written out as HLO text
MEMORY_STEPS = SPEED_STEPS[:4]
PRECISIONS = ("default", "highest")
SKIPPED = "over --budget_s"

#: The Fig. 2 run on the CPU: `JAX_PLATFORMS=cpu python -m
#: experiments.device_check --out=DIR --sections=fig2` (train_lib's numbers).
CPU_FIG2 = dict(wall_time_s=15.3, compile_time_s=3.7, steps_per_s=414.5)
CPU_FIG2_SOURCE = ("2-core CPU dev machine, 2026-11-28, jax 0.10.2, same "
                   "section run with JAX_PLATFORMS=cpu --sections=fig2, "
                   "quiet machine")


@dataclasses.dataclass(frozen=True)
class Options:
  """Sizes of one check: the width x depth net, its batches (the first also
  that of the scanned chunk; the Fig. 2 run's is the paper's 32), the goals'
  two batches."""
  width: int = 128
  depth: int = 12
  batches: tuple[int, ...] = (32, 256, 1024)
  exact_batch: int = 256          # batch of the exactness problem
  exact_init_scales: tuple[float, ...] = (0.1, 0.2)   # Fig. 2's, Fig. 1's
  precision_batches: tuple[int, ...] = (256, 1024)
  repeats: int = 15
  sample_s: float = 0.02          # seconds per timing sample
  chunk: int = 100                # steps per scanned chunk (the loop's)
  fig2_steps: int = 3000
  goal_batches: tuple[int, int] = (256, 32)   # judged at <= 1.5x, <= 2x
  tiny: bool = False

  @classmethod
  def tiny_sizes(cls) -> Options:
    return cls(width=16, depth=2, batches=(8,), exact_batch=16,
               precision_batches=(8,), repeats=2, sample_s=0.002, chunk=10,
               fig2_steps=10, goal_batches=(8, 8), tiny=True)


_log = functools.partial(print, "[device_check]", flush=True)


def _shape(opts: Options, state: dict[str, Any], b: int, names: Sequence[str],
           key: str = "variants", repeats: int | None = None,
           precisions: Sequence[str] = ("default",)) -> dict[str, Any]:
  """`benchmark.bench_shape` at batch `b` (its variants under `key`),
  sharing the check's executables."""
  s = benchmark.bench_shape(
      opts.width, opts.depth, b, names=names, precisions=precisions,
      repeats=opts.repeats if repeats is None else repeats,
      sample_s=opts.sample_s, cache=state.setdefault("executables", {}),
      seed=b)
  s[key] = s.pop("variants")
  return s


def section_exactness(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  """`exactness.float32_errors`; SGD and CR-SGD timed under each precision."""
  out = exactness.float32_errors(opts.width, opts.depth, opts.exact_batch,
                                 init_scales=opts.exact_init_scales,
                                 precisions=PRECISIONS)
  out["step_timing"] = timing = {}
  for b in opts.precision_batches:
    over = time.perf_counter() > state["deadline"]
    timing[f"b{b}"] = t = dict(skipped=SKIPPED) if over else _shape(
        opts, state, b, (SGD, GRAM), "steps", precisions=PRECISIONS)
    for key, n in () if "skipped" in t else (("cr", GRAM), ("sgd", SGD)):
      ms = {p: t["steps"][f"{n}@{p}"].get("ms_per_step") for p in PRECISIONS}
      t[f"{key}_highest_over_default"] = report_lib.ratio(ms["highest"],
                                                          ms["default"])
  return out


def section_speed(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  """`benchmark.bench_shape` per batch (HLO text of the first written out),
  then `benchmark.bench_chunk`."""
  skipped, first = [], opts.batches[0]
  result = state["partial"] = dict(network=f"{opts.depth}x{opts.width}",
                                   shapes={}, scan_chunk=None,
                                   skipped_over_budget=skipped)
  for b in opts.batches:
    if time.perf_counter() > state["deadline"]:
      skipped.append(f"b{b}")
      continue
    _log(f"speed: batch {b}")
    result["shapes"][f"b{b}"] = _shape(opts, state, b, SPEED_STEPS)
    for name in HLO_STEPS if b == first and state.get("out") else ():
      with open(os.path.join(state["out"], f"hlo_{name}_b{b}.txt"), "w",
                encoding="utf-8") as f:
        f.write(state["executables"][((name, b), "default")].as_text())
  if time.perf_counter() > state["deadline"]:
    skipped.append("scan_chunk")
  else:
    result["scan_chunk"] = benchmark.bench_chunk(
        opts.width, opts.depth, first, opts.chunk, repeats=opts.repeats,
        sample_s=opts.sample_s)
  return result


def section_memory(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  """Memory of the compiled steps, from the speed section's executables."""
  return dict(network=f"{opts.depth}x{opts.width}", shapes={
      f"b{b}": _shape(opts, state, b, MEMORY_STEPS, "steps", repeats=0)
      for b in opts.batches}, note=(
          "peak_bytes = temp + argument + output bytes of "
          "compiled.memory_analysis(); xla_peak_bytes is XLA's own peak "
          "estimate where the backend reports one"))


def section_fig2(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  """One Fig. 2 training run, against `CPU_FIG2` at the full sizes."""
  del state
  config = benchmark.fig2_config(opts.width, opts.depth, 32, opts.chunk,
                                 opts.fig2_steps)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  try:
    with tempfile.TemporaryDirectory() as tmp:
      out = benchmark.train_run(config, os.path.join(tmp, "fig2"))
  finally:
    logging.set_verbosity(verbosity)
  cpu = CPU_FIG2 if (opts.fig2_steps, opts.width, opts.depth, opts.chunk,
                     opts.tiny) == (3000, 128, 12, 100, False) else None
  return dict(
      out, config="configs/paper.py:mnist_sgd_plateau",
      num_steps=opts.fig2_steps, network=f"{opts.depth}x{opts.width}",
      cpu=cpu, cpu_source=CPU_FIG2_SOURCE if cpu else None,
      cpu_over_device_wall=report_lib.ratio(cpu and cpu["wall_time_s"],
                                            out.get("wall_time_s")),
      device_over_cpu_steps_per_s=report_lib.ratio(
          out.get("steps_per_s"), cpu and cpu["steps_per_s"]))


RUNNERS = dict(exactness=section_exactness, speed=section_speed,
               memory=section_memory, fig2=section_fig2)


def _result(report: dict[str, Any], name: str) -> dict[str, Any]:
  return (report["sections"].get(name) or {}).get("result") or {}


def _speed(b: int, key: str, report: dict[str, Any]):
  v = (_result(report, "speed").get("shapes") or {}).get(f"b{b}")
  v = v and v["variants"]
  if not v or v[GRAM].get(key) is None:      # untimed (--repeats=0)
    return None
  return v[GRAM][key], (f"b{b}: Gram {v[GRAM][key]:.2f}x, dense "
                        f"{report_lib.fmt(v[DENSE].get(key), '.2f')}x")


def _exact(prec: str, report: dict[str, Any]):
  e = (_result(report, "exactness").get("max_rel_err") or {}).get(prec, {})
  return e.get("engine") is not None and (e["engine"], (
      f"engine {e['engine']:.1e} (f-o-f {report_lib.fmt(e['fof'], '.1e')})"))


def goals(opts: Options) -> list[tuple[report_lib.Goal, Any]]:
  """The device goals at the sizes of `opts`: (goal, reader) pairs."""
  goal, part = report_lib.Goal, functools.partial
  b256, b32 = opts.goal_batches
  return [
      *((goal(f"CR-SGD (Gram form) time / SGD, batch {b}", "<=", bar),
         part(_speed, b, "ratio")) for b, bar in ((b256, 1.5), (b32, 2.0))),
      *((goal(f"CR-SGD (Gram form) kernels / SGD's, batch {b} (the CPU "
              "target, on this device)", "<=", 1.6, 1.3, "performance target"),
         part(_speed, b, "kernel_ratio")) for b in sorted({b256, b32})),
      *((goal(f"engine max relative error against the float64 CPU "
              f"reference, {prec} precision", "<=", 1e-5), part(_exact, prec))
        for prec in PRECISIONS)]


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
  """The goal rows of a device report (`report.judge_all`)."""
  o = report["options"]
  return report_lib.judge_all(
      goals(Options(goal_batches=tuple(o["goal_batches"]))), report,
      o["tiny"] and "--tiny: not the goals' shapes")


def _shapes_lines(shapes: dict[str, Any], skipped=()) -> list[str]:
  """`benchmark.shape_lines` of each measured shape; the skipped named."""
  lines = [line for s in shapes.values() if "skipped" not in s
           for line in benchmark.shape_lines(
               dict(s, variants=s.get("steps", s.get("variants"))), "###")]
  skipped = [*(k for k, s in shapes.items() if "skipped" in s), *skipped]
  return lines + (["", f"Skipped ({SKIPPED}): {', '.join(skipped)}."]
                  if skipped else [])


def to_markdown(report: dict[str, Any]) -> str:
  """The device report as markdown."""
  g = report_lib.fmt
  exact, speed, memory, fig2 = (_result(report, n) for n in SECTIONS)
  lines = report_lib.header("lrcr device check", report) + [
      f"- total wall time: {g(report['total_wall_s'], '.1f')} s"
      + ("" if report["finished"] else " (**not finished**)"),
      f"- sizes: `{report['options']}`", ""] + report_lib.table(
          ["section", "status", "wall s"],
          [(name, s["status"] + (f": {s['error'].splitlines()[0]}"
                                 if s.get("error") else ""),
            g(s.get("wall_s"), ".1f"))
           for name, s in report["sections"].items()])
  if report.get("goals"):
    lines += ["", "**Goals:**", ""] + report_lib.goals_table(report["goals"])
  if exact:
    lines += ["", "## 1. Exactness (float32 on the device vs float64 on the "
              "CPU)", *exactness.float32_lines(exact), "", "Step time under "
              "each precision (ratio to SGD at default precision); time at "
              "highest over time at default:", ""] + [
                  f"- {k}: CR-SGD {g(t['cr_highest_over_default'], '.2f')}, "
                  f"SGD {g(t['sgd_highest_over_default'], '.2f')}"
                  for k, t in exact["step_timing"].items()
                  if "skipped" not in t]
    lines += _shapes_lines(exact["step_timing"])
  if speed:
    lines += ["", "## 2. Speed (ms per step, median of interleaved repeats; "
              "paired ratio to SGD; kernels by `bench.count_kernels`)",
              *_shapes_lines(speed["shapes"], speed["skipped_over_budget"])]
  loop = speed.get("scan_chunk")
  if loop:
    lines += ["", f"Scanned chunk of the loop's body ({loop['chunk']} steps, "
              f"batch {loop['batch']}): {g(loop['steps_per_s'], '.1f')} "
              f"steps/s ({g(loop['ms_per_chunk'])} ms per chunk, "
              f"{loop['kernels']} kernels)."]
  if memory:
    lines += ["", "## 3. Memory (compiled step, MiB; ratio to SGD)",
              *_shapes_lines(memory["shapes"])]
  if fig2:
    cpu = fig2["cpu_source"] or "none, not the full 3,000-step 12x128 run"
    lines += ["", "## 4. Fig. 2 run", "", f"{fig2['config']}, "
              f"{fig2['num_steps']} steps, {fig2['network']}, data "
              f"{fig2['data_source']}; CPU: {cpu}. CPU wall / device wall: "
              f"{g(fig2['cpu_over_device_wall'], '.2f')}; device steps/s / "
              f"CPU: {g(fig2['device_over_cpu_steps_per_s'], '.2f')}.", ""]
    lines += report_lib.table(
        ["", "wall s", "compile s", "steps/s (scan chunks)"],
        [(where, *(g((r or {}).get(k), ".1f") for k in CPU_FIG2))
         for where, r in (("device", fig2), ("CPU", fig2["cpu"]))])
  return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: str, start: float) -> dict[str, Any]:
  report.update(total_wall_s=time.perf_counter() - start,
                goals=evaluate_goals(report))
  return report_lib.write(out, "device_check", report,
                          to_markdown(report_lib.jsonable(report)))


def run_check(opts: Options, out: str, *, sections: Sequence[str] = SECTIONS,
              budget_s: float = 360.0, command: str = "") -> dict[str, Any]:
  """Runs the sections, rewriting the report after each; returns it. A
  failed section is recorded, not raised.

  Raises:
    ValueError: for a section name not in `SECTIONS`.
  """
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f"--sections: unknown {sorted(unknown)}; expected some "
                     f"of {', '.join(SECTIONS)}.")
  start = time.perf_counter()
  report = dict(report_lib.stamp(command), options=dataclasses.asdict(opts),
                sections={}, finished=False)
  # Past the deadline, sections skip what they have not started.
  state: dict[str, Any] = dict(deadline=start + budget_s, out=out)
  for name in (n for n in SECTIONS if n in sections):
    entry = report["sections"][name] = dict(
        status="skipped", wall_s=None, result=None, error=(
            f"skipped: {time.perf_counter() - start:.0f} s elapsed > "
            f"--budget_s={budget_s:.0f}"))
    if time.perf_counter() > state["deadline"]:
      continue
    entry.update(status="running", error=None)
    _write(report, out, start)
    tic = time.perf_counter()
    _log(f"{name} ...")
    try:
      entry.update(result=RUNNERS[name](opts, state), status="ok")
    except Exception as err:  # pylint: disable=broad-except
      entry.update(status="error", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=8),
                   result=state.get("partial"))
    state.pop("partial", None)
    entry["wall_s"] = time.perf_counter() - tic
    _log(f"{name}: {entry['status']} in {entry['wall_s']:.1f} s"
         + (f" ({entry['error']})" if entry["error"] else ""))
  report["finished"] = True
  report = _write(report, out, start)
  _log(f"total {report['total_wall_s']:.1f} s; " + "; ".join(
      f"{g['target']}: {g['verdict']}" for g in report["goals"]))
  return report


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program."""
  flags.DEFINE_string("out", None, "Directory for device_check.{md,json}.")
  flags.DEFINE_bool("tiny", False, "Tiny sizes (2x16 net, batch 8, 2 repeats, "
                    "10 Fig. 2 steps): the CPU test, not a measurement.")
  flags.DEFINE_list("sections", None, "Sections to run (default: all), of "
                    "exactness, speed, memory, fig2.")
  flags.DEFINE_float("budget_s", 360.0, "Sections not started within this "
                     "many seconds are skipped (recorded as such).")
  flags.DEFINE_integer("repeats", None, "Override: timing repeats.")
  flags.DEFINE_integer("fig2_steps", None, "Override: Fig. 2 run's steps.")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  opts = Options.tiny_sizes() if f.tiny else Options()
  opts = dataclasses.replace(opts, **{k: f[k].value for k in (
      "repeats", "fig2_steps") if f[k].value is not None})
  run_check(opts, f.out, sections=tuple(f.sections or SECTIONS),
            budget_s=f.budget_s,
            command=report_lib.command_line("experiments.device_check"))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  experiments.run(main)
