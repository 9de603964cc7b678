"""Times and counts the CR step variants against their base steps, and the loop.

    python -m experiments.benchmark [--quick] [--out=runs/benchmark] \
        [--repeats=15]

Every `bench.VARIANTS` step at every shape goes through `bench.measure`. The
loop measurement compares `train_lib.train_and_evaluate` on
configs/paper.py:mnist_sgd_plateau (mnist_5k) with the bare jitted
`bench.loop_iteration`, from runs of N1 and N2 steps: (N2 - N1) /
((wall2 - compile2) - (wall1 - compile1)). The goals are data (`GOALS`).
Outputs: markdown on stdout, <out>/benchmark.{md,json}.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import jax

import experiments
from experiments import bench
from experiments import report as report_lib
from experiments import stats
from experiments.report import Goal

# (width, depth, batch). The 12x128 net at three batch sizes, then depth.
FULL_SHAPES = ((128, 12, 32), (128, 12, 256), (128, 12, 1024),
               (128, 6, 32), (128, 24, 32), (128, 48, 32))
QUICK_SHAPES = ((16, 2, 8),)

# The exact CR-SGD paths of lrcr (the "best lrcr variant" is the fastest); the
# stacked variants are timed but not judged (CPU noise would move verdicts).
LRCR_SGD = ("cr_sgd_engine_gram", "cr_sgd_engine", "cr_sgd_lowrank")
ENGINE = ("cr_sgd_engine_gram", "cr_sgd_engine")
PRIMARY = "cr_sgd_engine_gram"  # what the training loop uses for SGD
FOF = "cr_sgd_autodiff"         # forward-over-forward


def shape_key(width: int, depth: int, batch: int) -> str:
  return f"{depth}x{width}_b{batch}"


def bench_shape(width: int, depth: int, batch: int, *, repeats: int,
                sample_s: float, names: Sequence[str] | None = None,
                precisions: Sequence[str] = ("default",),
                cache: dict | None = None, seed: int = 0) -> dict[str, Any]:
  """Measures the variants `names` (default: all, plus bases) at one shape
  under each matmul precision; with two or more, named "<variant>@<prec>",
  each against its base at the first precision."""
  model, params, x, y = bench.make_problem(width, depth, batch, seed=seed)
  _, _, xs, ys = bench.make_problem(width, depth, batch, seed=seed,
                                    steps=bench.EVERY)
  names = list(names or bench.VARIANTS)
  names += [bench.VARIANTS[n][3] for n in names
            if bench.VARIANTS[n][3] not in names]
  tag = lambda n, p: n if len(precisions) == 1 else f"{n}@{p}"  # noqa: E731
  entries = {}
  for prec, (name, v) in itertools.product(
      precisions, bench.make_steps(model, batch, names).items()):
    args = (params, v.tx.init(params),
            *((xs, ys) if v.steps_per_call > 1 else (x, y)))
    compiled, compile_s = bench.compile_step(v.step, args, prec, cache=cache,
                                             key=(name, batch))
    entries[tag(name, prec)] = dict(
        compiled=compiled, args=args, base=tag(v.base, precisions[0]),
        kind=v.kind, steps_per_call=v.steps_per_call,
        description=v.description, compile_s=compile_s)
  out = bench.measure(entries, repeats=repeats, sample_s=sample_s, seed=seed)
  derived = None
  if repeats and PRIMARY in out and "cr_sgd_every10" in out:
    derived = dict(
        ratio=(bench.EVERY - 1 + out[PRIMARY]["ratio"]) / bench.EVERY,
        formula=f"({bench.EVERY - 1} * sgd + 1 * {PRIMARY}) / "
                f"{bench.EVERY} / sgd, from the measured medians "
                "(DERIVED, not timed)")
  return dict(width=width, depth=depth, batch=batch, repeats=repeats,
              sub_batch_rows=min(bench.SUB_BATCH, batch), variants=out,
              every10_derived=derived)


def bench_chunk(width: int, depth: int, batch: int, chunk: int, *,
                repeats: int, sample_s: float) -> dict[str, Any]:
  """The loop's body (`bench.loop_iteration`), `chunk` steps under lax.scan:
  its ms per chunk, steps/s and kernels."""
  fn, args = bench.loop_iteration(width, depth, batch, steps=chunk)
  compiled, compile_s = bench.compile_step(fn, args)
  m = bench.measure({"chunk": dict(compiled=compiled, args=args,
                                   base="chunk")},
                    repeats=repeats, sample_s=sample_s)["chunk"]
  ms = m.get("ms_per_step")                  # None when untimed
  return dict(
      batch=batch, chunk=chunk, ms_per_chunk=ms,
      steps_per_s=ms and chunk / (ms / 1e3), kernels=m["kernels"],
      compile_s=compile_s, note=(
          "one step = one SGD step and one engine Gram-form CR-SGD step on "
          "the same batch (the training loop's body), random data, no data "
          "indexing or metrics"))


def bench_transform(width: int, depth: int) -> dict[str, Any]:
  """Kernels of `bench.transform_parts` on the width x depth net's params."""
  _, params, _, _ = bench.make_problem(width, depth, 1)
  return {name: bench.count_kernels(
      jax.jit(fn).lower(params).compile().as_text())
          for name, fn in bench.transform_parts(params).items()}


def fig2_config(width: int, depth: int, batch: int, chunk: int,
                num_steps: int):
  """configs/paper.py:mnist_sgd_plateau on mnist_5k, one device, quiet."""
  # Imported here: a bare accelerator image may lack the application's extra.
  from configs import paper  # pylint: disable=import-outside-toplevel
  config = paper.get_config("mnist_sgd_plateau")
  config.data.source = "mnist_5k"
  config.training.progress = False
  config.training.num_devices = 1
  config.training.chunk_size = chunk
  config.training.batch_size = batch
  config.training.num_steps = num_steps
  config.model.width, config.model.depth = width, depth
  return config


def train_run(config, workdir: str) -> dict[str, Any]:
  """`train_lib.train_and_evaluate`, timed from outside; its summary."""
  from experiments import train_lib  # pylint: disable=import-outside-toplevel
  tic = time.perf_counter()
  summary = train_lib.train_and_evaluate(config, workdir)
  return dict({k: v for k, v in summary.items()
               if isinstance(v, (int, float, str, bool)) or v is None},
              outer_wall_s=time.perf_counter() - tic)


def _warm_up(config) -> None:
  """Loads the data and draws a throwaway figure (font cache, Agg setup), so
  that one-time costs do not land in the first timed run."""
  # pylint: disable=import-outside-toplevel
  import io
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from experiments import input_pipeline
  input_pipeline.load_dataset(config.data.name, config.data.source)
  fig = Figure(figsize=(4, 3))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.semilogy([1, 2, 3], [1, 0.5, 0.2], label="warm-up")
  ax.legend()
  fig.savefig(io.BytesIO(), format="png")


def _loop_runs(config, chunk, n1, n2, trials, warmup, sample, per_block):
  """Bare samples around `trials` N1/N2 run pairs; (bare, runs, error)."""
  bare, runs, error = [], [], None
  timed = lambda seed: bench.interleaved_samples(  # noqa: E731
      {"bare": sample}, per_block, seed=seed)["bare"]
  try:
    _warm_up(config)
    with tempfile.TemporaryDirectory() as tmp:
      if warmup:
        config.training.num_steps = chunk
        train_run(config, os.path.join(tmp, "warmup"))
      for trial in range(trials):
        bare += timed(trial)
        pair = []
        for tag, n in (("n1", n1), ("n2", n2)):
          config.training.num_steps = n
          pair.append(train_run(config, os.path.join(tmp, f"{tag}_{trial}")))
        first, second = pair
        steady = ((second["wall_time_s"] - second["compile_time_s"])
                  - (first["wall_time_s"] - first["compile_time_s"]))
        runs.append(dict(
            n1=first, n2=second, steady_s=steady,
            steps_per_s=(n2 - n1) / steady if steady > 0 else None,
            naive_steps_per_s=n2 / (second["wall_time_s"]
                                    - second["compile_time_s"])))
  except Exception as err:  # pylint: disable=broad-except
    error = f"{type(err).__name__}: {err}"
  return bare + timed(trials), runs, error


def bench_loop(*, quick: bool, repeats: int, sample_s: float,
               loop_steps: int, trials: int,
               warmup: bool = True) -> dict[str, Any]:
  """Training-loop throughput against a bare jitted SGD + CR-SGD step."""
  width, depth, batch, chunk = (16, 2, 8, 20) if quick else (128, 12, 32, 100)
  n1, n2 = 2 * chunk, 2 * chunk + loop_steps
  config = fig2_config(width, depth, batch, chunk, n1)
  fn, args = bench.loop_iteration(width, depth, batch)
  sample, calls = bench.sampler(jax.jit(fn).lower(*args).compile(), args,
                                sample_s)
  bare, runs, error = _loop_runs(config, chunk, n1, n2, trials, warmup,
                                 sample, max(1, repeats // (trials + 1)))
  q1, med, q3 = report_lib.quartiles(bare)
  out = dict(
      network=shape_key(width, depth, batch), chunk_size=chunk,
      config="configs/paper.py:mnist_sgd_plateau", data_source="mnist_5k",
      n1=n1, n2=n2, trials=trials, calls_per_sample=calls,
      bare_ms_per_iteration=med * 1e3, bare_ms_q1=q1 * 1e3,
      bare_ms_q3=q3 * 1e3, bare_steps_per_s=1.0 / med, runs=runs,
      error=error,
      loop_steps_per_s=stats.finite_median([r["steps_per_s"] for r in runs]),
      loop_compute_steps_per_s=stats.finite_median(
          [r["n2"]["steps_per_s"] for r in runs]),
      loop_naive_steps_per_s=stats.finite_median(
          [r["naive_steps_per_s"] for r in runs]))
  for kind in ("", "compute_", "naive_"):
    out[f"loop_{kind}over_bare"] = report_lib.ratio(
        out[f"loop_{kind}steps_per_s"], out["bare_steps_per_s"])
  return out


# Goals: each a `report.Goal` and a reader of its measured value, (value,
# words) from the report or None where it was not measured.


def _at(batch: int, read, depth: int = 12):
  """A reader of the 128-wide net's variants at one shape."""
  def reader(report):
    s = report["shapes"].get(shape_key(128, depth, batch))
    return None if s is None else read(s["variants"])
  return reader


def _best(v, names=LRCR_SGD, key="ratio"):
  name = min(names, key=lambda n: v[n][key])
  return name, v[name][key]


def _time(v):
  name, r = _best(v)
  return r, f"{name}: {r:.2f}x"


def _time_over_flops(v):
  name, r = _best(v, ENGINE)
  f = v[name]["flops_ratio"]
  return report_lib.ratio(r, f), (f"{name}: time {r:.2f}x, flops "
                                  f"{report_lib.fmt(f, '.2f')}x")


def _kernels(v):
  return v[PRIMARY]["kernel_ratio"], (
      f"{v[PRIMARY]['kernels']} / {v['sgd']['kernels']} kernels (dense "
      f"sweep {v['cr_sgd_engine']['kernel_ratio']:.2f}x)")


def _flops(v):
  name, f = _best(v, ENGINE, "flops_ratio")
  return f, f"{name}: {f:.3f}x"


def _worst(parts, text, pick=max):
  """(the worst of the parts' values, the parts in words), or None."""
  parts = [p for p in parts if p]
  return parts and (pick(p[0] for p in parts), "; ".join(map(text, parts)))


def _engine_over_fof(report):
  return _worst(
      [_at(b, lambda v, b=b: (v[PRIMARY]["kernels"] / v[FOF]["kernels"], b,
                              v[PRIMARY]["kernels"], v[FOF]["kernels"]))(
                                  report) for b in (32, 256)],
      lambda p: f"b{p[1]}: {p[2]} vs {p[3]} = {p[0]:.2f}x")


def _depth_growth(report):
  s12, s48 = (report["shapes"].get(shape_key(128, d, 32)) for d in (12, 48))
  if s12 is None or s48 is None:
    return None
  name = _best(s12["variants"])[0]
  r12, r48 = (s["variants"][name]["ratio"] for s in (s12, s48))
  return r48 / r12 - 1, (f"{name}: depth 12 {r12:.2f}x, depth 48 "
                         f"{r48:.2f}x ({100 * (r48 / r12 - 1):+.0f}%)")


def _speedup(which):
  """The worst speed-up over forward-over-forward, every 12x128 batch."""
  def read(report):
    parts = []
    for s in report["shapes"].values():
      v = s["variants"]
      name = _best(v)[0] if which == "best" else which
      if (s["width"], s["depth"]) == (128, 12):
        parts.append((v[FOF]["ms_per_step"] / v[name]["ms_per_step"],
                      s["batch"], name))
    return _worst(parts, lambda p: f"b{p[1]}: {p[0]:.2f}x ({p[2]})", min)
  return read


def _memory(report):
  parts = [(s["variants"][n]["memory_ratio"], n, key)
           for key, s in report["shapes"].items()
           for n in (_best(s["variants"])[0], "cr_adagrad_engine")
           if s["variants"][n]["memory_ratio"] is not None]
  if not parts:
    return None
  r, name, key = max(parts)
  return r, f"worst: {name} {r:.2f}x ({key})"


def _transform(report):
  t = report.get("transform")
  return t and (t["transform"], (
      f"{t['transform']} kernels (the SGD update applied alone: "
      f"{t['apply_only']}); its own: {t.get('transform_own')}, "
      f"{t.get('transform_autoscaled')} with a curvature_fn that picks its "
      f"exponent (optax.sgd's: {t.get('sgd_update')})"))


def _loop(report):
  loop = report.get("loop") or {}
  r = loop.get("loop_over_bare")
  return None if r is None else (r, (
      f"loop {loop['loop_steps_per_s']:.1f} it/s end-to-end vs bare "
      f"{loop['bare_steps_per_s']:.1f} it/s: {r:.2f}x"))


_PERF, _CR = "performance target", "CR-SGD time / SGD, 12x128, batch"
GOALS = (
    (Goal(f"{_CR} 32", "<=", 1.75, 1.6, _PERF), _at(32, _time)),
    (Goal(f"{_CR} 256", "<=", 1.9, None, _PERF), _at(256, _time)),
    (Goal("CR-SGD time ratio / its flop ratio, 12x128, batch 256", "<=",
          None, 1.0, _PERF), _at(256, _time_over_flops)),
    (Goal(f"{_CR} 1024", "<=", 1.8), _at(1024, _time)),
    *((Goal(f"CR-SGD compiled step's kernels / SGD's, 12x128, batch {b}",
            "<=", 1.6, 1.3, _PERF), _at(b, _kernels)) for b in (32, 256)),
    (Goal("engine CR step's kernels / forward-over-forward's, 12x128, "
          "batches 32 and 256 (worst)", "<", 1.0, 0.6, _PERF, "<="),
     _engine_over_fof),
    (Goal("scale_by_cubic_step update with a stub curvature_fn, kernels",
          "<=", 20, 13, _PERF), _transform),
    # The levels before the kernel work, to the digit XLA's count gives.
    *((Goal(f"engine CR step's flops / SGD's, 12x128, batch {b} (no "
            "increase)", "<=", limit, None, _PERF), _at(b, _flops))
      for b, limit in ((32, 1.572), (256, 1.874))),
    (Goal("CR/SGD time ratio at depth 48 over depth 12, minus 1, batch 32",
          "<=", 0.10, 0.03, _PERF), _depth_growth),
    *((Goal(f"speed-up of {name} over forward-over-forward, every 12x128 "
            "batch (worst)", ">=", 1.25), _speedup(which))
      for name, which in (("the best lrcr variant", "best"),
                          ("cr_sgd_lowrank", "cr_sgd_lowrank"))),
    (Goal("memory / the base step's (fastest lrcr CR-SGD variant and "
          "cr_adagrad_engine, every shape)", "<=", 1.5), _memory),
    (Goal("training loop throughput / the bare jitted step's", ">=", 0.9),
     _loop),
)


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
  """The goal rows (`report.judge`) of a benchmark report."""
  return report_lib.judge_all(GOALS, report, report.get("quick") and (
      "--quick: tiny net, not the goal's shapes"))


def shape_lines(s: dict[str, Any], heading: str = "##") -> list[str]:
  """A `bench_shape` result as a titled markdown table ("n/a": not timed)."""
  f = report_lib.fmt
  iqr = lambda v, k, q, spec: report_lib.with_iqr(  # noqa: E731
      v.get(k), k in v and [v[f"{q}_q1"], v[f"{q}_q3"]], lambda x: f(x, spec))
  rows = [(name, v["base"], iqr(v, "ms_per_step", "ms", ".3f"),
           iqr(v, "ratio", "ratio", ".2f"),
           f"{v['kernels']} ({f(v['kernel_ratio'], '.2f')})",
           f(v["flops_ratio"], ".2f"), v.get("calls_per_sample"),
           report_lib.mib(v["peak_bytes"]), f(v["memory_ratio"], ".2f") + (
               f" ({f(v['xla_memory_ratio'], '.2f')})"
               if v["xla_memory_ratio"] is not None else ""))
          for name, v in s["variants"].items()]
  d = s.get("every10_derived")
  if d:
    rows.append(("cr_sgd_every10_derived (DERIVED)", "sgd", "-",
                 f"{d['ratio']:.2f}", "-", "-", "-", "-", "-"))
  return ["", f"{heading} {s['depth']}x{s['width']}, batch {s['batch']}",
          ""] + (
      report_lib.table(["variant", "base", "ms/step [IQR]", "ratio [IQR]",
                        "kernels (ratio)", "flops ratio", "K", "memory MiB",
                        "memory ratio"], rows))


def _loop_lines(loop: dict[str, Any]) -> list[str]:
  f = lambda x: report_lib.fmt(x, ".1f")  # noqa: E731
  vs = lambda k: (f"{f(loop[f'loop_{k}steps_per_s'])} "  # noqa: E731
                  f"({report_lib.fmt(loop[f'loop_{k}over_bare'], '.2f')}x "
                  "bare)")
  return ["", f"## Training loop ({loop['network']}, chunk "
          f"{loop['chunk_size']}, {loop['config']}, {loop['data_source']})",
          "", "One iteration = one SGD step and one engine (Gram form) "
          "CR-SGD step on the same batch, in the loop and in the bare "
          "function.", ""] + report_lib.table(["measure", "iterations/s"], [
              ("bare jitted SGD + CR step, Python loop",
               f"{f(loop['bare_steps_per_s'])} (median "
               f"{loop['bare_ms_per_iteration']:.3f} ms)"),
              (f"train_and_evaluate, end-to-end steady state (N2="
               f"{loop['n2']} - N1={loop['n1']}, median of "
               f"{loop['trials']})", vs("")),
              ("train_and_evaluate, train_lib steps_per_s (compute only)",
               vs("compute_")),
              ("train_and_evaluate, N2 / (wall - compile), fixed costs "
               "included", vs("naive_"))]) + (
                   [f"\nLoop measurement failed: {loop['error']}"]
                   if loop.get("error") else [])


def to_markdown(report: dict[str, Any]) -> str:
  """The benchmark report as markdown."""
  lines = report_lib.header("lrcr benchmark", report) + [
      f"- float32; paper MLP (ReLU, no biases, U(-0.1, 0.1)), input 784, 10 "
      f"classes, random data; SGD lr {bench.SGD_LR}, Adagrad lr "
      f"{bench.ADAGRAD_LR}, sigma {bench.SIGMA}",
      f"- {report['repeats']} repeats, round-robin in random order; a sample "
      f"= mean of K chained calls (~{report['sample_ms']:.0f} ms); ms = median "
      "per training step [IQR]; ratio = median over repeats of the paired "
      "ratio to the base [IQR]; kernels = top-level HLO instructions outside "
      "fusion bodies (`bench.count_kernels`); memory = temp + argument + "
      "output bytes of the compiled step (in parentheses: the ratio of XLA's "
      "own peak estimate, where reported)."]
  if report["quick"]:
    lines.append("- **--quick: smoke run on a tiny net; the numbers mean "
                 "nothing for the goals.**")
  for s in report["shapes"].values():
    lines += shape_lines(s)
  first = next(iter(report["shapes"].values()))
  lines += ["", "Variants:", ""] + [
      f"- `{name}` ({v['kind']}): {v['description']}"
      for name, v in first["variants"].items()]
  if report.get("transform"):
    lines += ["", "Transform alone (`bench.transform_parts`): "
              f"scale_by_cubic_step's update {_transform(report)[1]}."]
  if report.get("loop"):
    lines += _loop_lines(report["loop"])
  lines += ["", "## Goals", ""] + report_lib.goals_table(report["goals"])
  return "\n".join(lines) + "\n"


def run(*, quick: bool = False, out: str = "runs/benchmark",
        repeats: int | None = None, sample_ms: float | None = None,
        loop_steps: int | None = None, loop_trials: int | None = None,
        skip_loop: bool = False,
        command: str = "python -m experiments.benchmark") -> dict[str, Any]:
  """Runs the benchmark; returns the report written to <out>/benchmark.json.

  Args mirror the command's flags (None: the default, smaller with quick).
  """
  repeats = repeats or (3 if quick else 15)
  sample_s = (sample_ms or (5.0 if quick else 30.0)) / 1e3
  shapes = QUICK_SHAPES if quick else FULL_SHAPES
  report: dict[str, Any] = dict(
      report_lib.stamp(command), quick=quick, repeats=repeats,
      sample_ms=sample_s * 1e3, shapes={},
      transform=bench_transform(*shapes[0][:2]), loop=None)
  total = time.perf_counter()
  log = lambda m: print(f"[benchmark] {m}", file=sys.stderr,  # noqa: E731
                        flush=True)
  for width, depth, batch in shapes:
    tic = time.perf_counter()
    log(f"{depth}x{width} batch {batch} ...")
    report["shapes"][shape_key(width, depth, batch)] = bench_shape(
        width, depth, batch, repeats=repeats, sample_s=sample_s)
    log(f"  done in {time.perf_counter() - tic:.0f} s")
  if not skip_loop:
    log("training loop ...")
    report["loop"] = bench_loop(
        quick=quick, repeats=repeats, sample_s=sample_s,
        loop_steps=loop_steps or (40 if quick else 1000),
        trials=loop_trials or (1 if quick else 3), warmup=not quick)
  report["goals"] = evaluate_goals(report)
  report["total_time_s"] = time.perf_counter() - total
  report = report_lib.jsonable(report)
  markdown = to_markdown(report)
  print(markdown)
  return report_lib.write(out, "benchmark", report, markdown)


_FLAGS = ("quick", "out", "repeats", "sample_ms", "loop_steps", "loop_trials",
          "skip_loop")


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program."""
  flags.DEFINE_bool("quick", False,
                    "Smoke run: depth 2, width 16, batch 8, 3 repeats.")
  flags.DEFINE_string("out", "runs/benchmark",
                      "Directory for benchmark.md and benchmark.json.")
  flags.DEFINE_integer("repeats", None,
                       "Round-robin repeats (default 15; 3 with --quick).")
  flags.DEFINE_float("sample_ms", None, "Target ms per timing sample "
                     "(default 30; 5 with --quick).")
  flags.DEFINE_integer("loop_steps", None, "N2 - N1 of the training-loop "
                       "measurement (default 1000; 40 with --quick).")
  flags.DEFINE_integer("loop_trials", None,
                       "N1/N2 run pairs (default 3; 1 with --quick).")
  flags.DEFINE_bool("skip_loop", False, "Skip the training-loop measurement.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  experiments.quiet_logs()
  run(**{name: flags.FLAGS[name].value for name in _FLAGS},
      command=report_lib.command_line("experiments.benchmark"))


if __name__ == "__main__":
  _define_flags()
  experiments.run(main)
