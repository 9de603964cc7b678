"""One short check of lrcr on an accelerator: exactness, speed, Fig. 2, memory.

    python -m experiments.device_check --out=runs/device_check [--tiny] \
        [--sections=exactness,speed,memory,fig2] [--budget_s=360]

Written for a short session on one GPU: one process, about 3-5 minutes
of work on the 12x128 net, every section guarded (a failure is recorded as
its error string and the next section runs), and DIR/device_check.json and
DIR/device_check.md rewritten after every section, so a run killed at its
time limit still leaves the sections it finished. `--tiny` shrinks every
size for the CPU test (`tests/device_check_test.py`).

Sections, in the order they run:

  exactness  slope and curvature of the batch loss from the engine
             (`lrcr.value_grad_and_curvature`, dense sweep and Gram form)
             and from forward-over-forward (`lrcr.autodiff_directional`),
             in float32 on the default device, traced under JAX's default
             matmul precision (TF32 on recent NVIDIA cards) and under
             `jax.default_matmul_precision("highest")`; each against a
             float64 forward-over-forward reference on the CPU (x64 on, the
             float32 params, batch and direction cast up exactly). Then the
             SGD and CR-SGD steps timed under both precisions.
  speed      the benchmark's core table: SGD, CR-SGD through the public fast
             path (Gram form and dense sweep, each also with
             `stack_layers=True`) and CR-SGD by forward-over-forward,
             medians of interleaved repeats (`experiments.bench`) and paired
             ratios to SGD, at each batch, with each compiled step's number
             of kernels (`bench.count_kernels`); the HLO text of the SGD and CR
             steps at the first batch (DIR/hlo_<step>_b<batch>.txt, the
             device's fusion decisions, to study without a device); and the
             steps/s of a `lax.scan` chunk of the training loop's body (one
             SGD step and one CR-SGD step on the same batch).
  memory     peak bytes of the compiled CR-SGD steps against SGD
             (`compiled.memory_analysis()` via `bench.memory_stats`).
  fig2       the paper's Fig. 2 run (`configs/paper.py:mnist_sgd_plateau`,
             data mnist_5k, one device) through `train_lib` in a temporary
             workdir: wall time against the CPU's.

The goals are judged at the end, in one line: CR-SGD <= 1.5x SGD
at batch 256 and <= 2x at batch 32, and the engine exact to 1e-5 relative
against the float64 CPU reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import lrcr
from experiments import bench

def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program.

  Other entry points (`experiments.benchmark`) define `--out` and
  `--repeats` too; a test that imports both modules must not collide.
  """
  flags.DEFINE_string("out", None, "Directory for device_check.{md,json}.")
  flags.DEFINE_bool(
      "tiny", False, "Tiny sizes (2x16 net, batches 8 and 16, 2 repeats, 20 "
      "Fig. 2 steps): the CPU test of this script, not a measurement.")
  flags.DEFINE_list("sections", None,
                    "Sections to run (default: all), of "
                    "exactness, speed, memory, fig2.")
  flags.DEFINE_float(
      "budget_s", 360.0, "Sections not started within this many seconds of "
      "the start are skipped (recorded as such).")
  flags.DEFINE_integer("repeats", None, "Override: timing repeats.")
  flags.DEFINE_integer("fig2_steps", None,
                       "Override: steps of the Fig. 2 run.")


SECTIONS = ("exactness", "speed", "memory", "fig2")

#: The speed table's steps (`experiments.bench.make_steps` names).
SGD = "sgd"
GRAM = "cr_sgd_engine_gram"      # the public fast path, gradient_direction=True
DENSE = "cr_sgd_engine"          # the public fast path, any direction
FOF = "cr_sgd_autodiff"          # forward-over-forward
GRAM_STACKED = "cr_sgd_engine_gram_stacked"   # stack_layers=True
DENSE_STACKED = "cr_sgd_engine_stacked"
SPEED_STEPS = (SGD, GRAM, DENSE, GRAM_STACKED, DENSE_STACKED, FOF)
#: Compiled programs written out as HLO text (batch of the first speed
#: shape), to study the device's fusion decisions without a device.
HLO_STEPS = (SGD, GRAM, DENSE)
MEMORY_STEPS = (SGD, GRAM, DENSE, GRAM_STACKED)
#: The memory table's column names.
MEMORY_LABELS = {SGD: "sgd", GRAM: "gram", DENSE: "dense",
                 GRAM_STACKED: "gram stacked"}
PRECISIONS = ("default", "highest")

#: The Fig. 2 run (3,000 steps, 12x128, batch 32, mnist_5k, one CPU device)
#: on the 2-core CPU dev machine, 2026-11-28, jax 0.10.2:
#: `JAX_PLATFORMS=cpu python -m experiments.device_check --out=DIR
#: --sections=fig2`. train_lib's numbers: wall (setup, data, compilation, 30
#: chunks of 100 steps, metrics, checkpoints, figure), compilation, and
#: steps/s inside the scan chunks, measured on a quiet machine.
CPU_FIG2 = dict(wall_time_s=15.3, compile_time_s=3.7, steps_per_s=414.5)
CPU_FIG2_SOURCE = ("2-core CPU dev machine, 2026-11-28, jax 0.10.2, same "
                   "section run with JAX_PLATFORMS=cpu --sections=fig2, "
                   "quiet machine")

GOALS = dict(ratio_b256=1.5, ratio_b32=2.0, rel_err=1e-5)


@dataclasses.dataclass(frozen=True)
class Options:
  """Sizes of one check."""
  width: int = 128
  depth: int = 12
  batches: tuple[int, ...] = (32, 256, 1024)
  exact_batch: int = 256          # batch of the exactness problem
  exact_init_scales: tuple[float, ...] = (0.1, 0.2)   # Fig. 2's, Fig. 1's
  precision_batches: tuple[int, ...] = (256, 1024)
  repeats: int = 15
  sample_s: float = 0.02          # seconds per timing sample
  chunk: int = 100                # steps per scanned chunk (the loop's)
  chunk_batch: int = 32
  fig2_steps: int = 3000
  fig2_width: int = 128
  fig2_depth: int = 12
  fig2_chunk: int = 100
  goal_batches: tuple[int, int] = (256, 32)   # judged at <= 1.5x, <= 2x
  tiny: bool = False

  @classmethod
  def tiny_sizes(cls) -> Options:
    return cls(width=16, depth=2, batches=(8,), exact_batch=16,
               precision_batches=(8,), repeats=2, sample_s=0.002, chunk=10,
               chunk_batch=8, fig2_steps=10, fig2_width=16, fig2_depth=2,
               fig2_chunk=10, goal_batches=(8, 8), tiny=True)


# ---------------------------------------------------------------------------
# Helpers.


def _precision(name: str):
  """The matmul precision context for `name` ("default": JAX's own)."""
  if name == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(name)


def _enable_x64():
  """jax.enable_x64(True), or its older home."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def _over_budget(state: dict[str, Any]) -> bool:
  """Past --budget_s: long sections skip what they have not started."""
  return time.perf_counter() > state.get("deadline", math.inf)


def _log(message: str) -> None:
  print(f"[device_check] {message}", flush=True)


def _ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None where a is missing or b is missing or zero."""
  return a / b if a is not None and b else None


def _rel(value: float, ref: float) -> float:
  return abs(value - ref) / abs(ref) if ref else abs(value - ref)


def _finite(x: Any) -> Any:
  """JSON-safe: non-finite floats become None."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _loss_fn(model: lrcr.MLP):
  def loss_fn(params, x, y):
    return lrcr.cross_entropy_loss(model.apply({"params": params}, x), y)
  return loss_fn


def _compile(fn: Callable[..., Any], args: Sequence[Any],
             precision: str = "default", *, cache: dict | None = None,
             key: Any = None):
  """(compiled executable, compile seconds), traced under `precision`.

  With `cache` and `key`, an executable compiled by an earlier section for
  the same (step, batch, precision) is reused (compile seconds 0.0).
  """
  if cache is not None and (key, precision) in cache:
    return cache[(key, precision)], 0.0
  tic = time.perf_counter()
  with _precision(precision):
    compiled = jax.jit(fn).lower(*args).compile()
  if cache is not None:
    cache[(key, precision)] = compiled
  return compiled, time.perf_counter() - tic


def _time_table(entries: dict[str, tuple[Callable[..., Any], Sequence[Any]]],
                opts: Options, base: str, seed: int = 0) -> dict[str, Any]:
  """Median ms per call of each compiled training step, paired ratio to base.

  Each entry is (compiled step, args); calls are chained like a training
  loop (`bench.make_sampler`) and sampled round-robin in random order.
  """
  samplers = {}
  calls = {}
  for name, (fn, args) in entries.items():
    calls[name] = bench.calibrate(fn, args, opts.sample_s)
    samplers[name] = bench.make_sampler(fn, args, calls[name])
  samples = bench.interleaved_samples(samplers, opts.repeats, seed=seed)
  base_s = np.asarray(samples[base])
  out = {}
  for name in entries:
    s = np.asarray(samples[name])
    q1, med, q3 = bench.quartiles(s * 1e3)
    r1, rmed, r3 = bench.quartiles(s / base_s)
    out[name] = dict(ms=med, ms_q1=q1, ms_q3=q3, ratio=rmed, ratio_q1=r1,
                     ratio_q3=r3, calls_per_sample=calls[name])
  return out


# ---------------------------------------------------------------------------
# 1. Exactness.


def _directionals(loss_fn, params, x, y, direction, lr):
  """float32 slope/curvature by the engine and forward-over-forward.

  Along g = -lr grad F (the SGD direction: engine dense, engine Gram form,
  forward-over-forward) and along `direction` (engine dense, f-o-f).
  Returns the numbers and g, so that the reference is taken along the very
  direction used here.
  """
  _, grads, curv = lrcr.value_grad_and_curvature(loss_fn, params, x, y)
  _, grads_g, curv_gram = lrcr.value_grad_and_curvature(
      loss_fn, params, x, y, gradient_direction=True)
  g = jax.tree.map(lambda a: -lr * a, grads)
  g_gram = jax.tree.map(lambda a: -lr * a, grads_g)
  fof = lambda d: lrcr.autodiff_directional(  # noqa: E731
      lambda p: loss_fn(p, x, y), params, d)
  pick = lambda d: jnp.stack([d.slope, d.curvature])  # noqa: E731
  out = {
      "grad/engine": pick(curv(params, g)),
      "grad/engine_gram": pick(curv_gram(params, g_gram)),
      "grad/fof": pick(fof(g)),
      "random/engine": pick(curv(params, direction)),
      "random/fof": pick(fof(direction)),
  }
  return out, g, g_gram


def _reference(loss_fn, params, x, y, direction):
  """float64: [slope, curvature] by f-o-f (the reference) and the engine."""
  fof = lrcr.autodiff_directional(lambda p: loss_fn(p, x, y), params,
                                  direction)
  _, _, curv = lrcr.value_grad_and_curvature(loss_fn, params, x, y)
  eng = curv(params, direction)
  return (jnp.stack([fof.slope, fof.curvature]),
          jnp.stack([eng.slope, eng.curvature]))


def section_exactness(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  executables = state.setdefault("executables", {})
  lr = bench.SGD_LR
  batch = opts.exact_batch
  model = bench.paper_mlp(opts.width, opts.depth)
  loss_fn = _loss_fn(model)
  _, _, x, y = bench.make_problem(opts.width, opts.depth, batch, seed=1)
  cpu = jax.devices("cpu")[0]
  x_np, y_np = np.asarray(x), np.asarray(y)

  # float32 on the default device, one executable per precision.
  problems = []
  for scale in opts.exact_init_scales:
    m = lrcr.MLP((opts.width,) * opts.depth, 10,
                 kernel_init=lrcr.uniform_init(scale))
    params = m.init(jax.random.key(2), jnp.zeros((1, x.shape[1])))["params"]
    direction = jax.tree.map(
        lambda a, k: 0.01 * jax.random.normal(k, a.shape, a.dtype), params,
        _keys_like(params, jax.random.key(3)))
    problems.append((scale, params, direction))
  compiled, compile_s = {}, {}
  args0 = (problems[0][1], x, y, problems[0][2])
  _log("exactness: compiling the float32 directionals")
  for prec in PRECISIONS:
    compiled[prec], compile_s[prec] = _compile(
        lambda p, xx, yy, d: _directionals(loss_fn, p, xx, yy, d, lr),
        args0, prec)

  # float32 results first, outside the float64 context.
  f32_runs = []
  for scale, params, direction in problems:
    for prec in PRECISIONS:
      f32, g, g_gram = jax.device_get(compiled[prec](params, x, y, direction))
      f32_runs.append((scale, prec, jax.device_get(params),
                       jax.device_get(direction), f32, g, g_gram))

  # float64 on the CPU: the reference, along the very same directions.
  _log("exactness: float64 reference on the CPU")
  cases = []
  ref_device = ref_dtype = None
  with _enable_x64(), jax.default_device(cpu):
    to64 = lambda t: jax.device_put(  # noqa: E731
        jax.tree.map(lambda a: np.asarray(a, np.float64), t), cpu)
    x64, y64 = to64(x_np), jax.device_put(y_np, cpu)
    ref_fn = jax.jit(lambda p, xx, yy, d: _reference(loss_fn, p, xx, yy, d))
    for scale, prec, params, direction, f32, g, g_gram in f32_runs:
      p64 = to64(params)
      refs = {}
      for dname, d in (("grad", g), ("grad_gram", g_gram),
                       ("random", direction)):
        fof, eng = ref_fn(p64, x64, y64, to64(d))
        ref_device = str(list(fof.devices())[0])
        ref_dtype = str(fof.dtype)
        refs[dname] = (np.asarray(fof, np.float64), np.asarray(eng, np.float64))
      for key, value in f32.items():
        dname, method = key.split("/")
        ref, eng64 = refs["grad_gram" if method == "engine_gram" else dname]
        value = np.asarray(value, np.float64)
        cases.append(dict(
            init_scale=scale, precision=prec, direction=dname,
            method=method, slope=value[0], curvature=value[1],
            ref_slope=ref[0], ref_curvature=ref[1],
            rel_err_slope=_rel(value[0], ref[0]),
            rel_err_curvature=_rel(value[1], ref[1]),
            f64_engine_vs_fof=max(_rel(eng64[0], ref[0]),
                                  _rel(eng64[1], ref[1]))))

  def worst(prec, methods):
    errs = [max(c["rel_err_slope"], c["rel_err_curvature"]) for c in cases
            if c["precision"] == prec and c["method"] in methods]
    return max(errs) if errs else None

  summary = {prec: dict(engine=worst(prec, ("engine", "engine_gram")),
                        fof=worst(prec, ("fof",))) for prec in PRECISIONS}
  f64_check = max(c["f64_engine_vs_fof"] for c in cases)

  # The CR step's cost under each precision.
  timing = {}
  for b in opts.precision_batches:
    if _over_budget(state):
      timing[f"b{b}"] = dict(skipped="over --budget_s")
      continue
    _log(f"exactness: step timing under both precisions, batch {b}")
    m, params, xb, yb = bench.make_problem(opts.width, opts.depth, b)
    steps = bench.make_steps(m, b, (SGD, GRAM))
    entries = {}
    for prec in PRECISIONS:
      for name, v in steps.items():
        args = (params, v.tx.init(params), xb, yb)
        fn, _ = _compile(v.step, args, prec, cache=executables,
                         key=(name, b))
        entries[f"{name}@{prec}"] = (fn, args)
    table = _time_table(entries, opts, base=f"{SGD}@default")
    table["pin_cost"] = dict(
        cr_highest_over_default=(table[f"{GRAM}@highest"]["ms"] /
                                 table[f"{GRAM}@default"]["ms"]),
        sgd_highest_over_default=(table[f"{SGD}@highest"]["ms"] /
                                  table[f"{SGD}@default"]["ms"]))
    timing[f"b{b}"] = table

  return dict(batch=batch, network=f"{opts.depth}x{opts.width}",
              learning_rate=lr, compile_s=compile_s,
              reference_device=ref_device, reference_dtype=ref_dtype,
              f64_engine_vs_fof_max=f64_check,
              max_rel_err=summary, cases=cases, step_timing=timing)


def _keys_like(tree: Any, key: jax.Array) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


# ---------------------------------------------------------------------------
# 2. Speed (and the executables that 3. memory reads).


def _scanned_pair(sgd_step, cr_step):
  """The loop body over a chunk: one SGD and one CR-SGD step per batch."""
  def chunk(params, states, xs, ys):
    def body(carry, xy):
      (pb, pc), (sb, sc) = carry
      pb, sb, lb = sgd_step(pb, sb, *xy)
      pc, sc, lc = cr_step(pc, sc, *xy)
      return ((pb, pc), (sb, sc)), lb + lc
    (params, states), losses = jax.lax.scan(body, (params, states), (xs, ys))
    return params, states, losses[-1]
  return chunk


def section_speed(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  executables = state.setdefault("executables", {})
  shapes, skipped = {}, []
  for b in opts.batches:
    if _over_budget(state):
      skipped.append(f"b{b}")
      continue
    _log(f"speed: batch {b}")
    model, params, x, y = bench.make_problem(opts.width, opts.depth, b)
    steps = bench.make_steps(model, b, SPEED_STEPS)
    entries, compile_s = {}, {}
    for name, v in steps.items():
      args = (params, v.tx.init(params), x, y)
      fn, compile_s[name] = _compile(v.step, args, cache=executables,
                                     key=(name, b))
      entries[name] = (fn, args)
    table = _time_table(entries, opts, base=SGD, seed=b)
    for name in table:
      table[name]["compile_s"] = compile_s[name]
      hlo = entries[name][0].as_text()
      table[name]["kernels"] = bench.count_kernels(hlo)
      if b == opts.batches[0] and name in HLO_STEPS and state.get("out"):
        path = os.path.join(state["out"], f"hlo_{name}_b{b}.txt")
        with open(path, "w", encoding="utf-8") as f:
          f.write(hlo)
    shapes[f"b{b}"] = dict(batch=b, steps=table)
    state["partial"] = dict(shapes=shapes)

  # The training loop's lax.scan chunk, as steps (iterations) per second.
  result = dict(network=f"{opts.depth}x{opts.width}", shapes=shapes,
                scan_chunk=None, skipped_over_budget=skipped)
  if _over_budget(state):
    skipped.append("scan_chunk")
    return result
  _log("speed: scan chunk")
  b, t = opts.chunk_batch, opts.chunk
  model, params, xs, ys = bench.make_problem(opts.width, opts.depth, b,
                                             steps=t)
  steps = bench.make_steps(model, b, (SGD, GRAM))
  chunk = _scanned_pair(steps[SGD].step, steps[GRAM].step)
  args = ((params, params),
          (steps[SGD].tx.init(params), steps[GRAM].tx.init(params)), xs, ys)
  fn, chunk_compile_s = _compile(chunk, args)
  table = _time_table({"chunk": (fn, args)}, opts, base="chunk")
  sec = table["chunk"]["ms"] / 1e3
  loop = dict(batch=b, chunk=t, ms_per_chunk=table["chunk"]["ms"],
              steps_per_s=t / sec, compile_s=chunk_compile_s,
              note=("one step = one SGD step and one engine Gram-form CR-SGD "
                    "step on the same batch (the training loop's body), "
                    "random data, no data indexing or metrics"))
  result["scan_chunk"] = loop
  return result


# ---------------------------------------------------------------------------
# 3. Memory.


def section_memory(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  executables = state.get("executables", {})
  out = {}
  for b in opts.batches:
    stats = {}
    model = params = x = y = None
    for name in MEMORY_STEPS:
      fn = executables.get(((name, b), "default"))
      if fn is None:     # speed did not run (or failed): compile here
        if model is None:
          model, params, x, y = bench.make_problem(opts.width, opts.depth, b)
        v = bench.make_steps(model, b, (name,))[name]
        fn, _ = _compile(v.step, (params, v.tx.init(params), x, y))
      stats[name] = bench.memory_stats(fn)
    base = stats[SGD]
    row = dict(batch=b, stats=stats)
    for name in MEMORY_STEPS[1:]:
      for key in ("peak_bytes", "xla_peak_bytes", "temp_size_in_bytes"):
        row[f"{name}/{key}_ratio"] = _ratio(stats[name].get(key),
                                            base.get(key))
    out[f"b{b}"] = row
  return dict(network=f"{opts.depth}x{opts.width}", shapes=out,
              note=("peak_bytes = temp + argument + output bytes of "
                    "compiled.memory_analysis(); xla_peak_bytes is XLA's own "
                    "peak estimate where the backend reports one"))


# ---------------------------------------------------------------------------
# 4. Fig. 2.


def section_fig2(opts: Options, state: dict[str, Any]) -> dict[str, Any]:
  del state
  # Imported here, not at the top: the application's extra (ml_collections,
  # mlxtend, orbax) may be missing on a bare accelerator image, and that
  # should fail this section alone.
  from configs import paper  # pylint: disable=g-import-not-at-top
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  config = paper.get_config("mnist_sgd_plateau")
  config.data.source = "mnist_5k"
  config.training.num_steps = opts.fig2_steps
  config.training.chunk_size = opts.fig2_chunk
  config.training.progress = False
  config.training.num_devices = 1
  config.model.width, config.model.depth = opts.fig2_width, opts.fig2_depth
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  try:
    with tempfile.TemporaryDirectory() as tmp:
      tic = time.perf_counter()
      summary = train_lib.train_and_evaluate(config,
                                             os.path.join(tmp, "fig2"))
      outer = time.perf_counter() - tic
  finally:
    logging.set_verbosity(verbosity)
  full = (opts.fig2_steps == 3000 and not opts.tiny and
          (opts.fig2_width, opts.fig2_depth, opts.fig2_chunk) == (128, 12, 100))
  cpu = CPU_FIG2 if full else None
  keep = ("wall_time_s", "compile_time_s", "steps_per_s", "data_source",
          "num_params", "stopped")
  out = {k: summary.get(k) for k in keep}
  out.update(
      config="configs/paper.py:mnist_sgd_plateau", num_steps=opts.fig2_steps,
      network=f"{opts.fig2_depth}x{opts.fig2_width}",
      outer_wall_s=outer, cpu=cpu,
      cpu_source=CPU_FIG2_SOURCE if cpu else None,
      cpu_over_device_wall=_ratio(cpu and cpu["wall_time_s"],
                                  summary.get("wall_time_s")),
      device_over_cpu_steps_per_s=_ratio(summary.get("steps_per_s"),
                                         cpu and cpu["steps_per_s"]),
      summary={k: v for k, v in summary.items()
               if isinstance(v, (int, float, str, bool)) or v is None})
  return out


RUNNERS = dict(exactness=section_exactness, speed=section_speed,
               memory=section_memory, fig2=section_fig2)


# ---------------------------------------------------------------------------
# Goals and report.


def evaluate_goals(report: dict[str, Any]) -> dict[str, Any]:
  """Verdicts of the device goals, and the one-line summary."""
  tiny = report["options"]["tiny"]
  sections = report["sections"]
  goals = []
  speed = sections.get("speed", {}).get("result") or {}
  for b, key in zip(report["options"]["goal_batches"],
                    ("ratio_b256", "ratio_b32")):
    limit = GOALS[key]
    row = (speed.get("shapes") or {}).get(f"b{b}")
    name = f"CR-SGD (Gram) <= {limit}x SGD at batch {b}"
    if row is None:
      goals.append(dict(goal=name, met=None, text=f"b{b}: not measured"))
      continue
    r = row["steps"][GRAM]["ratio"]
    dense = row["steps"][DENSE]["ratio"]
    goals.append(dict(goal=name, met=r <= limit, value=r, limit=limit,
                      text=(f"b{b} CR/SGD {r:.2f}x (dense {dense:.2f}x; "
                            f"<= {limit}x: {'met' if r <= limit else 'NOT met'})")))
  exact = sections.get("exactness", {}).get("result") or {}
  for prec in PRECISIONS:
    err = (exact.get("max_rel_err") or {}).get(prec, {}).get("engine")
    limit = GOALS["rel_err"]
    name = f"engine exact to {limit:g} relative vs float64 CPU, {prec} precision"
    if err is None:
      goals.append(dict(goal=name, met=None, text=f"exact ({prec}): not measured"))
      continue
    fof = exact["max_rel_err"][prec]["fof"]
    goals.append(dict(goal=name, met=err <= limit, value=err, limit=limit,
                      text=(f"exact ({prec}) {err:.1e} (f-o-f {fof:.1e}; "
                            f"<= {limit:g}: {'met' if err <= limit else 'NOT met'})")))
  line = "; ".join(g["text"] for g in goals)
  if tiny:
    line += " [--tiny: not the goals' shapes]"
  return dict(goals=goals, summary=line)


def _environment() -> dict[str, Any]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = getattr(jaxlib, "__version__", None)
  except ImportError:
    jaxlib_version = None
  dev = jax.devices()[0]
  return dict(device_kind=dev.device_kind, device=str(dev),
              backend=jax.default_backend(), device_count=jax.device_count(),
              jax_version=jax.__version__, jaxlib_version=jaxlib_version,
              python=platform.python_version(), platform=platform.platform(),
              cpu_count=os.cpu_count())


def _g(x: Any, spec: str = ".3g") -> str:
  return "n/a" if x is None else format(x, spec)


def to_markdown(report: dict[str, Any]) -> str:
  env = report["environment"]
  lines = [
      "# lrcr device check", "",
      f"- command: `{report['command']}`",
      f"- date: {report['date']}",
      f"- device: **{env['device_kind']}** ({env['backend']}, "
      f"{env['device_count']} device(s)); jax {env['jax_version']}, jaxlib "
      f"{env['jaxlib_version']}; python {env['python']}; {env['cpu_count']} "
      "CPUs",
      f"- total wall time: {_g(report.get('total_wall_s'), '.1f')} s"
      + ("" if report.get("finished") else " (**not finished**)"),
      f"- sizes: `{json.dumps(report['options'])}`", "",
      "| section | status | wall s |", "|---|---|---|"]
  for name in SECTIONS:
    s = report["sections"].get(name)
    if s is None:
      continue
    status = s["status"] + (f": {s['error'].splitlines()[0]}" if s.get("error")
                            else "")
    lines.append(f"| {name} | {status} | {_g(s.get('wall_s'), '.1f')} |")
  goals = report.get("goals")
  if goals:
    lines += ["", f"**Goals:** {goals['summary']}"]

  exact = (report["sections"].get("exactness") or {}).get("result")
  if exact:
    lines += [
        "", "## 1. Exactness (float32 on the device vs float64 on the CPU)", "",
        f"{exact['network']} net, batch {exact['batch']}, random data; "
        f"reference: forward-over-forward in {exact['reference_dtype']} on "
        f"{exact['reference_device']} (the float64 engine agrees with it to "
        f"{_g(exact['f64_engine_vs_fof_max'], '.1e')}). Directions: "
        "-lr grad F (SGD) and a random one.", "",
        "| precision | max rel err, engine | max rel err, f-o-f |",
        "|---|---|---|"]
    for prec in PRECISIONS:
      e = exact["max_rel_err"][prec]
      lines.append(f"| {prec} | {_g(e['engine'], '.2e')} | "
                   f"{_g(e['fof'], '.2e')} |")
    lines += ["", "| init | precision | direction | method | slope | rel err |"
              " curvature | rel err |", "|---|---|---|---|---|---|---|---|"]
    for c in exact["cases"]:
      lines.append(
          f"| U(±{c['init_scale']}) | {c['precision']} | {c['direction']} | "
          f"{c['method']} | {_g(c['slope'], '.6e')} | "
          f"{_g(c['rel_err_slope'], '.1e')} | {_g(c['curvature'], '.6e')} | "
          f"{_g(c['rel_err_curvature'], '.1e')} |")
    lines += ["", "Step time under each precision (ms, median; ratio to SGD "
              "at default precision):", "",
              "| batch | step | ms | ratio |", "|---|---|---|---|"]
    for key, table in exact["step_timing"].items():
      if "skipped" in table:
        lines.append(f"| {key} | skipped: {table['skipped']} | | |")
        continue
      for name, t in table.items():
        if name == "pin_cost":
          continue
        lines.append(f"| {key} | {name} | {_g(t['ms'])} | "
                     f"{_g(t['ratio'], '.2f')} |")
      pin = table["pin_cost"]
      lines.append(f"| {key} | CR highest / default | "
                   f"{_g(pin['cr_highest_over_default'], '.2f')}x | |")

  speed = (report["sections"].get("speed") or {}).get("result")
  if speed:
    lines += ["", "## 2. Speed (ms per step, median of interleaved repeats; "
              "paired ratio to SGD)", "",
              "| batch | " + " | ".join(SPEED_STEPS) + " |",
              "|---|" + "---|" * len(SPEED_STEPS)]
    for row in speed["shapes"].values():
      cells = [f"{_g(row['steps'][n]['ms'])} ({_g(row['steps'][n]['ratio'], '.2f')}x)"
               for n in SPEED_STEPS]
      lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Kernels per compiled step (`bench.count_kernels`: fusions, "
              "library calls and copies in the compiled HLO):", "",
              "| batch | " + " | ".join(SPEED_STEPS) + " |",
              "|---|" + "---|" * len(SPEED_STEPS)]
    for row in speed["shapes"].values():
      lines.append(f"| {row['batch']} | " + " | ".join(
          str(row["steps"][n].get("kernels", "n/a")) for n in SPEED_STEPS)
                   + " |")
    if speed.get("skipped_over_budget"):
      lines += ["", "Skipped (over --budget_s): "
                + ", ".join(speed["skipped_over_budget"]) + "."]
    loop = speed.get("scan_chunk")
    if loop:
      lines += ["", f"Scanned chunk of the loop's body ({loop['chunk']} steps, "
                f"batch {loop['batch']}): {_g(loop['steps_per_s'], '.1f')} "
                f"steps/s ({_g(loop['ms_per_chunk'])} ms per chunk)."]

  memory = (report["sections"].get("memory") or {}).get("result")
  if memory:
    lines += ["", "## 3. Memory (compiled step, MiB)", "",
              f"| batch | {MEMORY_LABELS[SGD]} peak | "
              + "".join(f"{MEMORY_LABELS[n]} peak (ratio) | "
                        for n in MEMORY_STEPS[1:])
              + f"XLA peak ratio {MEMORY_LABELS[GRAM]} |",
              "|---|" + "---|" * (len(MEMORY_STEPS) + 1)]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
    for row in memory["shapes"].values():
      st = row["stats"]
      lines.append(
          f"| {row['batch']} | {mib(st[SGD]['peak_bytes'])} | " + "".join(
              f"{mib(st[n]['peak_bytes'])} "
              f"({_g(row[f'{n}/peak_bytes_ratio'], '.2f')}) | "
              for n in MEMORY_STEPS[1:])
          + f"{_g(row[f'{GRAM}/xla_peak_bytes_ratio'], '.2f')} |")

  fig2 = (report["sections"].get("fig2") or {}).get("result")
  if fig2:
    lines += [
        "", "## 4. Fig. 2 run", "",
        f"{fig2['config']}, {fig2['num_steps']} steps, {fig2['network']}, "
        f"data {fig2['data_source']}: wall {_g(fig2['wall_time_s'], '.1f')} s "
        f"(compile {_g(fig2['compile_time_s'], '.1f')} s, "
        f"{_g(fig2['steps_per_s'], '.1f')} steps/s in the scan chunks)."]
    cpu = fig2.get("cpu")
    if cpu:
      lines += ["", f"CPU ({fig2['cpu_source']}): wall {cpu['wall_time_s']} s, "
                f"compile {cpu['compile_time_s']} s, {cpu['steps_per_s']} "
                f"steps/s. CPU wall / device wall "
                f"{_g(fig2['cpu_over_device_wall'], '.2f')}x; device steps/s "
                f"/ CPU {_g(fig2['device_over_cpu_steps_per_s'], '.2f')}x."]
    else:
      lines += ["", "No CPU comparison: not the full 3,000-step 12x128 run."]
  return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: str) -> None:
  report = _finite(report)
  for name, text in (("device_check.json",
                      json.dumps(report, indent=1, sort_keys=True) + "\n"),
                     ("device_check.md", to_markdown(report))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def run_check(opts: Options, out: str, *, sections: Sequence[str] = SECTIONS,
              budget_s: float = 360.0, command: str = "") -> dict[str, Any]:
  """Runs the sections, rewriting the report after each; returns it."""
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f"--sections: unknown {sorted(unknown)}; expected some "
                     f"of {', '.join(SECTIONS)}.")
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  report = dict(command=command, date=datetime.datetime.now().isoformat(
      timespec="seconds"), environment=_environment(),
                options=dataclasses.asdict(opts), sections={}, finished=False,
                goals=None, total_wall_s=0.0)
  state: dict[str, Any] = dict(deadline=start + budget_s, out=out)
  for name in SECTIONS:
    if name not in sections:
      continue
    entry: dict[str, Any] = dict(status="running", error=None, wall_s=None,
                                 result=None)
    if _over_budget(state):
      elapsed = time.perf_counter() - start
      entry.update(status="skipped",
                   error=f"skipped: {elapsed:.0f} s elapsed > --budget_s="
                         f"{budget_s:.0f}")
      report["sections"][name] = entry
      continue
    report["sections"][name] = entry
    _write(report, out)
    tic = time.perf_counter()
    _log(f"{name} ...")
    try:
      entry["result"] = RUNNERS[name](opts, state)
      entry["status"] = "ok"
    except Exception as err:  # pylint: disable=broad-except
      entry.update(status="error", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=8),
                   result=state.pop("partial", None))
    state.pop("partial", None)
    entry["wall_s"] = time.perf_counter() - tic
    report["total_wall_s"] = time.perf_counter() - start
    report["goals"] = evaluate_goals(report)
    _log(f"{name}: {entry['status']} in {entry['wall_s']:.1f} s"
         + (f" ({entry['error']})" if entry["error"] else ""))
    _write(report, out)
  report["finished"] = True
  report["total_wall_s"] = time.perf_counter() - start
  report["goals"] = evaluate_goals(report)
  _write(report, out)
  _log(f"total {report['total_wall_s']:.1f} s; "
       f"{report['goals']['summary']}")
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  opts = Options.tiny_sizes() if f.tiny else Options()
  if f.repeats is not None:
    opts = dataclasses.replace(opts, repeats=f.repeats)
  if f.fig2_steps is not None:
    opts = dataclasses.replace(opts, fig2_steps=f.fig2_steps)
  run_check(opts, f.out, sections=tuple(f.sections or SECTIONS),
            budget_s=f.budget_s,
            command="python -m experiments.device_check " + " ".join(
                sys.argv[1:]))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
