"""One short check of lrcr on an accelerator: exactness, speed, memory, Fig. 2.

    python -m experiments.device_check --out=runs/device_check [--tiny] \
        [--sections=exactness,speed,memory,fig2] [--budget_s=360]

The sections compose `exactness.float32_errors`, `benchmark.bench_shape` and
`benchmark.train_run`. A failed section is recorded and the next runs;
<out>/device_check.{json,md} are rewritten after each. `--tiny`: CPU test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging

from experiments import bench
from experiments import benchmark
from experiments import exactness
from experiments import report as report_lib
from experiments.report import Goal

SECTIONS = ("exactness", "speed", "memory", "fig2")
#: The steps measured (`bench.VARIANTS` names).
SGD, GRAM, DENSE = "sgd", "cr_sgd_engine_gram", "cr_sgd_engine"
SPEED_STEPS = (SGD, GRAM, DENSE, "cr_sgd_engine_gram_stacked",
               "cr_sgd_engine_stacked", "cr_sgd_autodiff")
HLO_STEPS = (SGD, GRAM, DENSE)           # written out as HLO text
MEMORY_STEPS = SPEED_STEPS[:4]
PRECISIONS = ("default", "highest")

#: The Fig. 2 run on the CPU: `JAX_PLATFORMS=cpu python -m
#: experiments.device_check --out=DIR --sections=fig2` (train_lib's numbers).
CPU_FIG2 = dict(wall_time_s=15.3, compile_time_s=3.7, steps_per_s=414.5)
CPU_FIG2_SOURCE = ("2-core CPU dev machine, 2026-11-28, jax 0.10.2, same "
                   "section run with JAX_PLATFORMS=cpu --sections=fig2, "
                   "quiet machine")


@dataclasses.dataclass(frozen=True)
class Options:
  """Sizes of one check: the width x depth net, its batches (the first also
  that of the scanned chunk and the Fig. 2 run), the goals' two batches."""
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


def _over_budget(state: dict[str, Any]) -> bool:
  """Past --budget_s: long sections skip what they have not started."""
  return time.perf_counter() > state.get("deadline", math.inf)


def _log(message: str) -> None:
  print(f"[device_check] {message}", flush=True)


def _measure(opts: Options, entries: dict[str, Any]) -> dict[str, Any]:
  return bench.measure(entries, repeats=opts.repeats, sample_s=opts.sample_s)


def _precision_timing(opts: Options, b: int, cache: dict) -> dict[str, Any]:
  """SGD and CR-SGD (Gram) under each precision, ratios to SGD at default."""
  model, params, x, y = bench.make_problem(opts.width, opts.depth, b)
  entries = {}
  for prec in PRECISIONS:
    for name, v in bench.make_steps(model, b, (SGD, GRAM)).items():
      args = (params, v.tx.init(params), x, y)
      entries[f"{name}@{prec}"] = dict(base=f"{SGD}@default", args=args,
                                       compiled=bench.compile_step(
                                           v.step, args, prec, cache=cache,
                                           key=(name, b))[0])
  table = _measure(opts, entries)
  ms = lambda n: table[f"{n}@highest"]["ms_per_step"] / table[  # noqa: E731
      f"{n}@default"]["ms_per_step"]
  return dict(steps=table, cr_highest_over_default=ms(GRAM),
              sgd_highest_over_default=ms(SGD))


def section_exactness(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  _log("exactness: float32 on the device, float64 on the CPU")
  out = exactness.float32_errors(opts.width, opts.depth, opts.exact_batch,
                                 init_scales=opts.exact_init_scales,
                                 precisions=PRECISIONS)
  out["step_timing"] = timing = {}
  for b in opts.precision_batches:
    if _over_budget(state):
      timing[f"b{b}"] = dict(skipped="over --budget_s")
    else:
      _log(f"exactness: step timing under both precisions, batch {b}")
      timing[f"b{b}"] = _precision_timing(
          opts, b, state.setdefault("executables", {}))
  return out


def _bench_shape(opts: Options, state: dict[str, Any], b: int,
                 names: Sequence[str], repeats: int) -> dict[str, Any]:
  """`benchmark.bench_shape` at batch `b`, sharing the check's executables."""
  return benchmark.bench_shape(
      opts.width, opts.depth, b, names=names, repeats=repeats,
      sample_s=opts.sample_s, cache=state.setdefault("executables", {}),
      seed=b)


def section_speed(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  skipped, first = [], opts.batches[0]
  result = state["partial"] = dict(network=f"{opts.depth}x{opts.width}",
                                   shapes={}, scan_chunk=None,
                                   skipped_over_budget=skipped)
  for b in opts.batches:
    if _over_budget(state):
      skipped.append(f"b{b}")
      continue
    _log(f"speed: batch {b}")
    result["shapes"][f"b{b}"] = _bench_shape(opts, state, b, SPEED_STEPS,
                                             opts.repeats)
    for name in HLO_STEPS if b == first and state.get("out") else ():
      with open(os.path.join(state["out"], f"hlo_{name}_b{b}.txt"), "w",
                encoding="utf-8") as f:
        f.write(state["executables"][((name, b), "default")].as_text())
  if _over_budget(state):
    skipped.append("scan_chunk")
  else:
    _log("speed: scan chunk")
    chunk, args = bench.loop_iteration(opts.width, opts.depth, first,
                                       steps=opts.chunk)
    compiled, compile_s = bench.compile_step(chunk, args)
    ms = _measure(opts, {"chunk": dict(compiled=compiled, args=args,
                                       base="chunk")})["chunk"]
    result["scan_chunk"] = dict(
        batch=first, chunk=opts.chunk, ms_per_chunk=ms["ms_per_step"],
        steps_per_s=opts.chunk / (ms["ms_per_step"] / 1e3),
        kernels=ms["kernels"], compile_s=compile_s,
        note=("one step = one SGD step and one engine Gram-form CR-SGD step "
              "on the same batch (the training loop's body), random data, "
              "no data indexing or metrics"))
  return result


def section_memory(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  """Memory of the compiled steps, from the speed section's executables."""
  out = {}
  for b in opts.batches:
    shape = _bench_shape(opts, state, b, MEMORY_STEPS, 0)
    out[f"b{b}"] = dict(batch=b, steps={
        name: dict(v["memory"], memory_ratio=v["memory_ratio"],
                   xla_memory_ratio=v["xla_memory_ratio"])
        for name, v in shape["variants"].items()})
  return dict(network=f"{opts.depth}x{opts.width}", shapes=out,
              note=("peak_bytes = temp + argument + output bytes of "
                    "compiled.memory_analysis(); xla_peak_bytes is XLA's own "
                    "peak estimate where the backend reports one"))


def section_fig2(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
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
  full = opts.fig2_steps == 3000 and not opts.tiny and (
      opts.width, opts.depth, opts.chunk) == (128, 12, 100)
  cpu = CPU_FIG2 if full else None
  out.update(
      config="configs/paper.py:mnist_sgd_plateau", num_steps=opts.fig2_steps,
      network=f"{opts.depth}x{opts.width}", cpu=cpu,
      cpu_source=CPU_FIG2_SOURCE if cpu else None,
      cpu_over_device_wall=report_lib.ratio(cpu and cpu["wall_time_s"],
                                            out.get("wall_time_s")),
      device_over_cpu_steps_per_s=report_lib.ratio(
          out.get("steps_per_s"), cpu and cpu["steps_per_s"]))
  return out


RUNNERS = dict(exactness=section_exactness, speed=section_speed,
               memory=section_memory, fig2=section_fig2)


def _result(report: dict[str, Any], name: str) -> dict[str, Any]:
  return (report["sections"].get(name) or {}).get("result") or {}


def _speed_reader(b: int, key: str):
  def read(report):
    row = (_result(report, "speed").get("shapes") or {}).get(f"b{b}")
    v = row and row["variants"]
    return v and (v[GRAM][key], f"b{b}: Gram {v[GRAM][key]:.2f}x, dense "
                  f"{v[DENSE][key]:.2f}x")
  return read


def _exact_reader(prec: str):
  def read(report):
    err = (_result(report, "exactness").get("max_rel_err") or {}).get(
        prec, {})
    return err.get("engine") is not None and (err["engine"], (
        f"engine {err['engine']:.1e} (f-o-f "
        f"{report_lib.fmt(err['fof'], '.1e')})"))
  return read


def goals(opts: Options) -> list[tuple[Goal, Any]]:
  """The device goals at the sizes of `opts`: (goal, reader) pairs."""
  b256, b32 = opts.goal_batches
  return [
      (Goal(f"CR-SGD (Gram form) time / SGD, batch {b256}", "<=", 1.5),
       _speed_reader(b256, "ratio")),
      (Goal(f"CR-SGD (Gram form) time / SGD, batch {b32}", "<=", 2.0),
       _speed_reader(b32, "ratio")),
      *((Goal(f"CR-SGD (Gram form) kernels / SGD's, batch {b} (the CPU "
              "target, on this device)", "<=", 1.6, 1.3, "performance target"),
         _speed_reader(b, "kernel_ratio")) for b in sorted({b256, b32})),
      *((Goal(f"engine max relative error against the float64 CPU "
              f"reference, {prec} precision", "<=", 1e-5), _exact_reader(prec))
        for prec in PRECISIONS)]


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
  """The goal rows of a device report (`report.judge_all`)."""
  opts = Options(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in report["options"].items()})
  return report_lib.judge_all(goals(opts), report,
                              opts.tiny and "--tiny: not the goals' shapes")


def _exactness_lines(exact: dict[str, Any]) -> list[str]:
  g = report_lib.fmt
  lines = [
      "", "## 1. Exactness (float32 on the device vs float64 on the CPU)", "",
      f"{exact['network']} net, batch {exact['batch']}, random data; "
      f"reference: forward-over-forward in {exact['reference_dtype']} on "
      f"{exact['reference_device']} (the float64 engine agrees with it to "
      f"{g(exact['f64_engine_vs_fof_max'], '.1e')}). Directions: -lr grad F "
      "(SGD) and a random one.", ""]
  lines += report_lib.table(
      ["precision", "max rel err, engine", "max rel err, f-o-f"],
      [(p, g(e["engine"], ".2e"), g(e["fof"], ".2e"))
       for p, e in exact["max_rel_err"].items()])
  lines += [""] + report_lib.table(
      ["init", "precision", "direction", "method", "slope", "rel err",
       "curvature", "rel err"],
      [(f"U(±{c['init_scale']})", c["precision"], c["direction"],
        c["method"], g(c["slope"], ".6e"), g(c["rel_err_slope"], ".1e"),
        g(c["curvature"], ".6e"), g(c["rel_err_curvature"], ".1e"))
       for c in exact["cases"]])
  rows = []
  for key, t in exact["step_timing"].items():
    if "skipped" in t:
      rows.append((key, f"skipped: {t['skipped']}", "", ""))
      continue
    rows += [(key, name, g(s["ms_per_step"]), g(s["ratio"], ".2f"))
             for name, s in t["steps"].items()]
    rows.append((key, "CR highest / default",
                 g(t["cr_highest_over_default"], ".2f") + "x", ""))
  return lines + ["", "Step time under each precision (ms, median; ratio to "
                  "SGD at default precision):", ""] + report_lib.table(
                      ["batch", "step", "ms", "ratio"], rows)


def _speed_lines(speed: dict[str, Any]) -> list[str]:
  g = report_lib.fmt
  lines = ["", "## 2. Speed (the benchmark's tables: ms per step, median of "
           "interleaved repeats; paired ratio to SGD; kernels per compiled "
           "step by `bench.count_kernels`)"]
  for s in speed["shapes"].values():
    lines += benchmark.shape_lines(s, "###")
  if speed.get("skipped_over_budget"):
    lines += ["", "Skipped (over --budget_s): "
              + ", ".join(speed["skipped_over_budget"]) + "."]
  loop = speed.get("scan_chunk")
  if loop:
    lines += ["", f"Scanned chunk of the loop's body ({loop['chunk']} steps, "
              f"batch {loop['batch']}): {g(loop['steps_per_s'], '.1f')} "
              f"steps/s ({g(loop['ms_per_chunk'])} ms per chunk, "
              f"{loop['kernels']} kernels)."]
  return lines


def _memory_lines(memory: dict[str, Any]) -> list[str]:
  g = report_lib.fmt
  return ["", "## 3. Memory (compiled step, MiB; ratio to SGD)", ""] + (
      report_lib.table(["batch", *MEMORY_STEPS, f"XLA peak ratio {GRAM}"], [
          (r["batch"], *(f"{report_lib.mib(r['steps'][n]['peak_bytes'])} "
                         f"({g(r['steps'][n]['memory_ratio'], '.2f')})"
                         for n in MEMORY_STEPS),
           g(r["steps"][GRAM]["xla_memory_ratio"], ".2f"))
          for r in memory["shapes"].values()]))


def _fig2_lines(fig2: dict[str, Any]) -> list[str]:
  g = report_lib.fmt
  lines = ["", "## 4. Fig. 2 run", "",
      f"{fig2['config']}, {fig2['num_steps']} steps, {fig2['network']}, "
      f"data {fig2['data_source']}: wall {g(fig2['wall_time_s'], '.1f')} s "
      f"(compile {g(fig2['compile_time_s'], '.1f')} s, "
      f"{g(fig2['steps_per_s'], '.1f')} steps/s in the scan chunks)."]
  cpu = fig2.get("cpu")
  if not cpu:
    return lines + ["", "No CPU comparison: not the full 3,000-step 12x128 "
                    "run."]
  return lines + [
      "", f"CPU ({fig2['cpu_source']}): wall {cpu['wall_time_s']} s, compile "
      f"{cpu['compile_time_s']} s, {cpu['steps_per_s']} steps/s. CPU wall / "
      f"device wall {g(fig2['cpu_over_device_wall'], '.2f')}x; device "
      f"steps/s / CPU {g(fig2['device_over_cpu_steps_per_s'], '.2f')}x."]


_RENDER = dict(exactness=_exactness_lines, speed=_speed_lines,
               memory=_memory_lines, fig2=_fig2_lines)


def to_markdown(report: dict[str, Any]) -> str:
  """The device report as markdown."""
  lines = report_lib.header("lrcr device check", report) + [
      f"- total wall time: {report_lib.fmt(report['total_wall_s'], '.1f')} s"
      + ("" if report["finished"] else " (**not finished**)"),
      f"- sizes: `{report['options']}`", ""]
  lines += report_lib.table(["section", "status", "wall s"], [
      (name, s["status"] + (f": {s['error'].splitlines()[0]}"
                            if s.get("error") else ""),
       report_lib.fmt(s.get("wall_s"), ".1f"))
      for name, s in report["sections"].items()])
  if report.get("goals"):
    lines += ["", "**Goals:**", ""] + report_lib.goals_table(report["goals"])
  for name, render in _RENDER.items():
    if _result(report, name):
      lines += render(_result(report, name))
  return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: str) -> dict[str, Any]:
  report = report_lib.jsonable(report)
  return report_lib.write(out, "device_check", report, to_markdown(report))


def _run_section(name: str, opts: Options, state: dict[str, Any],
                 entry: dict[str, Any]) -> None:
  """Runs one section into `entry`; a failure is recorded, not raised."""
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


def run_check(opts: Options, out: str, *, sections: Sequence[str] = SECTIONS,
              budget_s: float = 360.0, command: str = "") -> dict[str, Any]:
  """Runs the sections, rewriting the report after each; returns it.

  Raises:
    ValueError: for a section name not in `SECTIONS`.
  """
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f"--sections: unknown {sorted(unknown)}; expected some "
                     f"of {', '.join(SECTIONS)}.")
  start = time.perf_counter()
  report = dict(report_lib.stamp(command), options=dataclasses.asdict(opts),
                sections={}, finished=False, goals=None, total_wall_s=0.0)
  state: dict[str, Any] = dict(deadline=start + budget_s, out=out)
  for name in (n for n in SECTIONS if n in sections):
    entry = report["sections"][name] = dict(
        status="running", error=None, wall_s=None, result=None)
    if _over_budget(state):
      entry.update(status="skipped", error=(
          f"skipped: {time.perf_counter() - start:.0f} s elapsed > "
          f"--budget_s={budget_s:.0f}"))
      continue
    _write(report, out)
    _run_section(name, opts, state, entry)
    report["total_wall_s"] = time.perf_counter() - start
    report["goals"] = evaluate_goals(report)
    _write(report, out)
  report.update(finished=True, total_wall_s=time.perf_counter() - start)
  report["goals"] = evaluate_goals(report)
  report = _write(report, out)
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
  app.run(main)
