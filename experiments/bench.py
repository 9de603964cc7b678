"""Benchmark steps, and how a compiled program is counted and timed.

A step is pure, `step(params, opt_state, x, y) -> (params, opt_state,
loss)`; `make_steps` builds the variants from the training loop's own steps
(`experiments.steps`), and `measure` counts and times their executables.
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrcr
from experiments import report
from experiments import steps as steps_lib

Array = jax.Array
Step = Callable[[Any, Any, Array, Array], tuple[Any, Any, Array]]

SGD_LR = 0.02          # the paper's Fig. 2 learning rate
ADAGRAD_LR = 0.1
ADAGRAD_INIT = 0.1
SIGMA = 100.0
SUB_BATCH = 8          # rows of the sub-batch curvature option
EVERY = 10             # alpha refreshed every EVERY steps


class Variant(NamedTuple):
  """A step to time: `step`, its optimizer `tx` (for `tx.init`), the variant
  whose time is its denominator (`base`), the training steps one call
  performs, its kind ("base", "exact" for an exact CR step, "baseline" for
  one by generic autodiff, "option" for an approximation) and one line for
  the report."""
  name: str
  step: Step
  tx: optax.GradientTransformation
  base: str
  steps_per_call: int
  kind: str
  description: str


def paper_mlp(width: int, depth: int) -> lrcr.MLP:
  """The paper's ReLU MLP, 10 classes, no biases, weights ~ U(-0.1, 0.1)."""
  return lrcr.MLP((width,) * depth, 10, kernel_init=lrcr.uniform_init(0.1))


def make_problem(width: int, depth: int, batch: int, *, seed: int = 0,
                 steps: int = 1):
  """(model, params, x [B, 784], y [B]), random float32 (x [steps, B, 784]
  and y [steps, B] with steps > 1)."""
  model = paper_mlp(width, depth)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  lead = (batch,) if steps == 1 else (steps, batch)
  x = jax.random.normal(kx, lead + (784,), jnp.float32)
  y = jax.random.randint(ky, lead, 0, 10, jnp.int32)
  params = model.init(kp, jnp.zeros((1, 784), jnp.float32))["params"]
  return model, params, x, y


def scanned(step: Step) -> Step:
  """`step` over xs [T, B, D], ys [T, B] under lax.scan; the last loss."""
  def scan_step(params, state, xs, ys):
    def body(carry, xy):
      p, s, loss = step(*carry, *xy)
      return (p, s), loss
    (params, state), losses = jax.lax.scan(body, (params, state), (xs, ys))
    return params, state, losses[-1]
  return scan_step


def loop_iteration(width: int, depth: int, batch: int,
                   steps: int = 1) -> tuple[Step, tuple[Any, ...]]:
  """One iteration of the training loop, and its arguments.

  One SGD and one CR-SGD step (engine, Gram form) on the same batch of the
  paper MLP, on params (p1, p2) and states (s1, s2), the loss their sum;
  with steps > 1, `steps` such iterations under lax.scan, as a chunk.
  """
  model, params, x, y = make_problem(width, depth, batch, steps=steps)
  v = make_steps(model, batch, ("sgd", "cr_sgd_engine_gram"))
  sgd, cr = v["sgd"], v["cr_sgd_engine_gram"]

  def step(params, states, x, y):
    p1, s1, l1 = sgd.step(params[0], states[0], x, y)
    p2, s2, l2 = cr.step(params[1], states[1], x, y)
    return (p1, p2), (s1, s2), l1 + l2
  return (scanned(step) if steps > 1 else step), (
      (params, params), (sgd.tx.init(params), cr.tx.init(params)), x, y)


def transform_parts(params: Any) -> dict[str, Callable[[Any], Any]]:
  """The transform alone, as functions of params, for kernel counts.

  Returns:
    "transform": `scale_by_cubic_step`'s update after SGD, with a stub
    `curvature_fn` (one tree norm), applied; "apply_only": the SGD update
    -0.1 params applied alone; "transform_own": `scale_by_cubic_step`'s
    update alone, on the gradient as given (params stand for it), with a
    stub that reads one entry (the transform's own kernels);
    "transform_autoscaled": the same with a stub that also picks the
    power-of-two exponent (as `value_grad_and_curvature(...,
    gradient_direction=True)`'s does); "sgd_update": `optax.sgd`'s update
    applied, its counterpart.
  """
  tx = optax.chain(optax.sgd(SGD_LR), lrcr.scale_by_cubic_step(SIGMA))
  state = tx.init(params)

  def stub(p, d):
    del p
    n = optax.tree.norm(d, squared=True)
    return lrcr.Directional(-n, 2.0 * n, n)

  def transform(p):
    updates, _ = tx.update(p, state, p, curvature_fn=stub)
    return optax.apply_updates(p, updates)

  def apply_only(p):
    return optax.apply_updates(p, jax.tree.map(lambda a: -0.1 * a, p))

  cubic = lrcr.scale_by_cubic_step(SIGMA)
  cubic_state = cubic.init(params)
  sgd = optax.sgd(SGD_LR)
  sgd_state = sgd.init(params)

  first = lambda d: jax.tree.leaves(d)[0].ravel()[0]

  def one_entry(p, d):
    del p
    n = 1.0 + jnp.square(first(d))
    return lrcr.Directional(-n, 2.0 * n, n)

  auto = lrcr.types.ScalableCurvatureFn(
      lambda p, d, e: one_entry(p, d),
      lambda p, d: (one_entry(p, d), lrcr.cubic.exponent(first(d))),
      gradient_direction=True)

  def own(curvature_fn):       # the transform's update alone, applied
    def part(p):
      updates, _ = cubic.update(p, cubic_state, p, curvature_fn=curvature_fn)
      return optax.apply_updates(p, updates)
    return part

  def sgd_update(p):
    return optax.apply_updates(p, sgd.update(p, sgd_state, p)[0])
  return dict(transform=transform, apply_only=apply_only,
              transform_own=own(one_entry), transform_autoscaled=own(auto),
              sgd_update=sgd_update)


_GRAM, _STACK = dict(gradient_direction=True), dict(stack_layers=True)
#: The variants: name -> (optimizer, curvature path (None: no CR step),
#: `steps.CROptions` fields, base, kind, description). "sgd_scan10" and the
#: variants based on it run EVERY steps under lax.scan per call.
VARIANTS = {
    "sgd": ("sgd", None, {}, "sgd", "base", "value_and_grad + optax.sgd"),
    "adagrad": ("adagrad", None, {}, "adagrad", "base",
                "value_and_grad + optax.adagrad"),
    "cr_sgd_engine_gram": (
        "cr_sgd", "engine", _GRAM, "sgd", "exact", "lrcr.cubic_sgd + lrcr."
        "value_grad_and_curvature, gradient_direction=True: the sweep along "
        "grad F (Gram matrices where they pay), its multiple known"),
    "cr_sgd_chain_gram": (
        "cr_sgd_chain", "engine", _GRAM, "sgd", "exact",
        "optax.chain(optax.sgd, scale_by_cubic_step), gradient_direction="
        "True: the same sweep, and a pass over g for its multiple"),
    "cr_sgd_engine": ("cr_sgd_chain", "engine", {}, "sgd", "exact",
                      "optax.chain(optax.sgd, scale_by_cubic_step): the "
                      "sweep along g itself, as after any optimizer"),
    "cr_sgd_engine_gram_stacked": (
        "cr_sgd", "engine", dict(**_GRAM, **_STACK), "sgd", "exact",
        "the Gram-form engine with stack_layers=True (equally shaped layers "
        "batched)"),
    "cr_sgd_engine_stacked": ("cr_sgd_chain", "engine", _STACK, "sgd",
                              "exact", "the sweep along g with "
                              "stack_layers=True"),
    "cr_sgd_lowrank": (
        "cr_sgd", "lowrank", {}, "sgd", "exact",
        "value_and_grad + lrcr.lowrank_curvature_fn (self-contained)"),
    "cr_sgd_autodiff": (
        "cr_sgd", "autodiff", {}, "sgd", "baseline",
        "value_and_grad + forward-over-forward (autodiff_curvature_fn)"),
    "cr_sgd_hvp": ("cr_sgd", "hvp", {}, "sgd", "baseline",
                   "value_and_grad + g.(H g), H g by jvp of grad"),
    "cr_adagrad_engine": ("cr_adagrad", "engine", {}, "adagrad", "exact",
                          "lrcr.value_grad_and_curvature after adagrad"),
    "cr_sgd_engine_sub8": (
        "cr_sgd", "engine", dict(curvature_batch_size=SUB_BATCH), "sgd",
        "option", "value_and_grad; slope on all rows, curvature by the "
        "engine on the first {sub}"),
    "sgd_scan10": ("sgd", None, {}, "sgd_scan10", "base",
                   f"{EVERY} SGD steps under lax.scan"),
    "cr_sgd_every10": (
        "cr_every", "engine", _GRAM, "sgd_scan10", "option",
        f"{EVERY} lrcr.cubic_sgd steps under lax.scan, alpha refreshed "
        f"(engine) on 1 of {EVERY} (curvature_every={EVERY})"),
}


def make_steps(model: lrcr.MLP, batch: int,
               names: Sequence[str] | None = None) -> dict[str, Variant]:
  """The `VARIANTS` `names` (default: all) for `model` at batch `batch`."""
  sub = min(SUB_BATCH, batch)
  sgd = optax.sgd(SGD_LR)
  adagrad = optax.adagrad(ADAGRAD_LR, initial_accumulator_value=ADAGRAD_INIT)
  cubic = lrcr.scale_by_cubic_step(SIGMA)
  txs = dict(sgd=sgd, adagrad=adagrad, cr_sgd=lrcr.cubic_sgd(SIGMA, SGD_LR),
             cr_sgd_chain=optax.chain(sgd, cubic),
             cr_adagrad=optax.chain(adagrad, cubic),
             cr_every=lrcr.cubic_sgd(SIGMA, SGD_LR, curvature_every=EVERY))
  out = {}
  for name in names or VARIANTS:
    opt, curvature, options, base, kind, text = VARIANTS[name]
    tx = txs[opt]
    if curvature is None:
      step = steps_lib.make_base_step(model, tx)
    else:
      if "curvature_batch_size" in options:
        options = dict(options, curvature_batch_size=sub)
      step = steps_lib.make_cr_step(model, tx, steps_lib.CROptions(
          curvature=curvature, sigma=SIGMA, **options))
    step, per_call = steps_lib.applied(step), 1
    if base == "sgd_scan10":
      step, per_call = scanned(step), EVERY
    out[name] = Variant(name, step, tx, base, per_call, kind,
                        text.format(sub=sub))
  return out


#: HLO operations that launch no work of their own (an async pair's `-done`
#: half is not counted either: its `-start` is).
_NO_KERNEL = frozenset((
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "call",
    "while", "conditional", "after-all", "opt-barrier", "partition-id",
    "replica-id", "add-dependency", "domain"))


def count_kernels(hlo_text: str) -> int:
  """Operations that launch a kernel in a compiled module's HLO text.

  Counts the instructions of every computation that is not the body of a
  fusion or an async operation (`calls=`), nor the scalar function of a
  reduction, scatter or sort (`to_apply=`, `select=`, `scatter=`), nor a
  library call's (`called_computations=`), other than those in `_NO_KERNEL`
  and the `-done` half of an async pair: on a GPU each is a kernel or a
  library call (cuBLAS), also inside command buffers (`call`) and loops;
  on the CPU each is a thunk. A loop's body counts once, and every branch of
  a conditional counts.
  """
  bodies = set(re.findall(r"\bcalls=%?([\w.\-]+)", hlo_text))
  bodies |= set(re.findall(r"\b(?:select|scatter)=%?([\w.\-]+)", hlo_text))
  bodies |= set(re.findall(r"called_computations=\{%?([\w.\-]+)", hlo_text))
  # A `call` (a command buffer on GPUs) holds kernels; other to_apply
  # functions are scalar code.
  bodies |= {m.group(2) for m in re.finditer(
      r"\s([a-z][\w\-]*)\(.*?to_apply=%?([\w.\-]+)", hlo_text)
             if m.group(1) != "call"}
  count, current = 0, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      continue
    op = re.match(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.+?\s([a-z][\w\-]*)\(",
                  line)
    if (op and current not in bodies and op.group(1) not in _NO_KERNEL
        and not op.group(1).endswith("-done")):
      count += 1
  return count


def flops(compiled: Any) -> float:
  """XLA's flop count of a compiled executable (`cost_analysis()`), or nan."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def memory_stats(compiled: Any) -> dict[str, int | None]:
  """Byte counts of a compiled executable's memory analysis (None: missing).

  `peak_bytes` is temp + argument + output (an upper bound on the live
  buffers); `xla_peak_bytes` is XLA's own peak estimate where reported.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  names = ("temp_size_in_bytes", "argument_size_in_bytes",
           "output_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")
  out = {n: int(v) if isinstance(v := getattr(stats, n, None),
                                 (int, np.integer)) else None for n in names}
  parts = [out[n] for n in names[:3]]
  out["peak_bytes"] = None if None in parts else sum(parts)
  peak = out.pop("peak_memory_in_bytes")
  out["xla_peak_bytes"] = peak if peak else None
  return out


def compile_step(fn: Callable[..., Any], args: Sequence[Any],
                 prec: str = "default", *, cache: dict | None = None,
                 key: Any = None) -> tuple[Any, float]:
  """(executable, compile seconds) under matmul precision `prec` ("default":
  JAX's own); reused from `cache[(key, prec)]`."""
  if cache is not None and (key, prec) in cache:
    return cache[(key, prec)], 0.0
  tic = time.perf_counter()
  with (contextlib.nullcontext() if prec == "default"
        else jax.default_matmul_precision(prec)):
    compiled = jax.jit(fn).lower(*args).compile()
  if cache is not None:
    cache[(key, prec)] = compiled
  return compiled, time.perf_counter() - tic


def sampler(fn: Callable[..., Any], args: Sequence[Any], target_s: float,
            chained: bool = True) -> tuple[Callable[[], float], int]:
  """(sample() -> seconds per call, calls per sample), a sample ~`target_s`.

  A sample is the mean of calls from `args`, each feeding its new (params,
  opt_state) into the next on a fixed batch, like a training loop (or, not
  `chained`, each on `args`); the clock stops when the last result is ready.
  """
  max_calls = 100_000
  def run(calls: int) -> float:
    a, tic = tuple(args), time.perf_counter()
    for _ in range(calls):
      out = fn(*a)
      a = (*out[:2], *args[2:]) if chained else a
    jax.block_until_ready(out)
    return (time.perf_counter() - tic) / calls

  run(1)                                           # warm-up
  calls = 1
  while True:
    per_call = min(run(calls) for _ in range(2))
    if calls * per_call >= target_s / 4 or calls >= max_calls:
      break
    calls = min(max_calls, calls * 4)
  calls = int(min(max_calls, max(1, round(target_s / max(per_call, 1e-9)))))
  return (lambda: run(calls)), calls


def interleaved_samples(samplers: dict[str, Callable[[], float]],
                        repeats: int, seed: int = 0) -> dict[str, list[float]]:
  """Round-robin timing, garbage collection off: each repeat samples every
  entry once, in a fresh random order."""
  rng = np.random.default_rng(seed)
  names = list(samplers)
  out: dict[str, list[float]] = {n: [] for n in names}
  enabled = gc.isenabled()
  gc.disable()
  try:
    for _ in range(repeats):
      for i in rng.permutation(len(names)):
        out[names[i]].append(samplers[names[i]]())
  finally:
    if enabled:
      gc.enable()
  return out


def measure(entries: dict[str, dict[str, Any]], *, repeats: int,
            sample_s: float, seed: int = 0) -> dict[str, dict[str, Any]]:
  """Counts and (with repeats > 0) times compiled steps against their bases.

  Args:
    entries: name -> dict with `compiled`, `args`, `base` (an entry's name),
      optionally `steps_per_call` (1) and `chained` (`sampler`'s, True);
      other keys are kept.
    repeats: round-robin repeats (`interleaved_samples`); 0: no timing.

  Returns:
    name -> the entry's keys (less `compiled`, `args`), kernels
    (`count_kernels`), flops, memory (`memory_stats`),
    ratios to its base and, when timed, `report.paired` per-step times.
  """
  out = {}
  for name, e in entries.items():
    c = e["compiled"]
    out[name] = dict({k: v for k, v in e.items()
                      if k not in ("compiled", "args")},
                     kernels=count_kernels(c.as_text()), flops=flops(c),
                     memory=memory_stats(c))
  for name, e in out.items():
    base, mem = out[e["base"]], e["memory"]
    e.update(kernel_ratio=report.ratio(e["kernels"], base["kernels"]),
             flops_ratio=report.ratio(e["flops"], base["flops"]),
             peak_bytes=mem["peak_bytes"], xla_peak_bytes=mem["xla_peak_bytes"],
             memory_ratio=report.ratio(mem["peak_bytes"],
                                       base["memory"]["peak_bytes"]),
             xla_memory_ratio=report.ratio(mem["xla_peak_bytes"],
                                           base["memory"]["xla_peak_bytes"]))
  if not repeats:
    return out
  samplers = {}
  for name, e in entries.items():
    samplers[name], out[name]["calls_per_sample"] = sampler(
        e["compiled"], e["args"], sample_s, e.get("chained", True))
  samples = interleaved_samples(samplers, repeats, seed=seed)
  per_step = {n: np.asarray(samples[n]) / e.get("steps_per_call", 1)
              for n, e in entries.items()}
  for name, e in entries.items():
    out[name].update(report.paired(per_step[name], per_step[e["base"]]))
  return out
