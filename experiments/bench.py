"""Step functions, kernel and memory counts, and timing helpers.

Every step function has the signature

    step(params, opt_state, x, y) -> (new_params, new_opt_state, loss)

and is pure, so `jax.jit(step).lower(...).compile()` gives both the executable
that is timed and its kernels, flops and memory (`static_costs`).
`make_steps` builds the benchmark's variants for one network and batch shape
from the training loop's own steps (`experiments.steps.make_base_step` and
`make_cr_step`), so the benchmarks time exactly what the loop runs; each
`Variant` says what it is in one line. The sub-batch option takes the slope
from the full batch and the curvature from its first rows (Byrd et al.
2011); the 10-step variants take xs [10, B, D], ys [10, B].
"""

from __future__ import annotations

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
  """A timed step: its function, its base, and what one call covers.

  Attributes:
    name: the variant's name.
    step: `step(params, opt_state, x, y) -> (params, opt_state, loss)`.
    tx: its optimizer (for `tx.init(params)`).
    base: the variant whose time is its denominator.
    steps_per_call: training steps one call performs (10 for the scans).
    kind: "base", "exact" (an exact CR step), "baseline" (an exact CR step
      by generic autodiff) or "option" (an approximation).
    description: one line for the report.
  """
  name: str
  step: Step
  tx: optax.GradientTransformation
  base: str
  steps_per_call: int
  kind: str
  description: str


def paper_mlp(width: int, depth: int, num_classes: int = 10) -> lrcr.MLP:
  """The paper's ReLU MLP, no biases, weights ~ U(-0.1, 0.1)."""
  return lrcr.MLP((width,) * depth, num_classes,
                  kernel_init=lrcr.uniform_init(0.1))


def make_problem(width: int, depth: int, batch: int, *, input_dim: int = 784,
                 num_classes: int = 10, seed: int = 0, steps: int = 1):
  """Random float32 inputs and labels and initial params.

  Returns:
    (model, params, x, y) with x [B, D] and y [B], or x [steps, B, D] and
    y [steps, B] when steps > 1.
  """
  model = paper_mlp(width, depth, num_classes)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  lead = (batch,) if steps == 1 else (steps, batch)
  x = jax.random.normal(kx, lead + (input_dim,), jnp.float32)
  y = jax.random.randint(ky, lead, 0, num_classes, jnp.int32)
  params = model.init(kp, jnp.zeros((1, input_dim), jnp.float32))["params"]
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


def pair_step(first: Step, second: Step) -> Step:
  """Both steps on the same batch, as one iteration of the training loop.

  The pair takes params (p1, p2) and states (s1, s2); its loss is the sum.
  """
  def pair(params, states, x, y):
    p1, s1, l1 = first(params[0], states[0], x, y)
    p2, s2, l2 = second(params[1], states[1], x, y)
    return (p1, p2), (s1, s2), l1 + l2
  return pair


def loop_iteration(width: int, depth: int, batch: int,
                   steps: int = 1) -> tuple[Step, tuple[Any, ...]]:
  """What one iteration of the training loop does, and its arguments.

  One SGD step and one CR-SGD step (engine, Gram form) on the same batch of
  the width x depth paper MLP (`pair_step`); with steps > 1, `steps` such
  iterations under lax.scan, as a chunk of the loop.

  Returns:
    (step, (params pair, states pair, x, y)).
  """
  model, params, x, y = make_problem(width, depth, batch, steps=steps)
  v = make_steps(model, batch, ("sgd", "cr_sgd_engine_gram"))
  sgd, cr = v["sgd"], v["cr_sgd_engine_gram"]
  step = pair_step(sgd.step, cr.step)
  return (scanned(step) if steps > 1 else step), (
      (params, params), (sgd.tx.init(params), cr.tx.init(params)), x, y)


def transform_parts(params: Any) -> dict[str, Callable[[Any], Any]]:
  """The transform alone, as functions of params, for kernel counts.

  Returns:
    "transform": `scale_by_cubic_step`'s update after SGD, with a stub
    `curvature_fn` (one tree norm), applied; "apply_only": the SGD update
    -0.1 params applied alone; "transform_own": `scale_by_cubic_step`'s
    update alone, on the gradient as given (params stand for it), with a
    stub that reads one entry (the transform's own kernels); "sgd_update":
    `optax.sgd`'s update applied, its counterpart.
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

  def one_entry(p, d):
    del p
    n = 1.0 + jnp.square(jax.tree.leaves(d)[0].ravel()[0])
    return lrcr.Directional(-n, 2.0 * n, n)

  def transform_own(p):
    updates, _ = cubic.update(p, cubic_state, p, curvature_fn=one_entry)
    return optax.apply_updates(p, updates)

  def sgd_update(p):
    return optax.apply_updates(p, sgd.update(p, sgd_state, p)[0])
  return dict(transform=transform, apply_only=apply_only,
              transform_own=transform_own, sgd_update=sgd_update)


def make_steps(model: lrcr.MLP, batch: int,
               names: Sequence[str] | None = None) -> dict[str, Variant]:
  """The benchmark's variants for `model` at batch size `batch`."""
  sgd = optax.sgd(SGD_LR)
  adagrad = optax.adagrad(ADAGRAD_LR, initial_accumulator_value=ADAGRAD_INIT)
  cr_sgd = optax.chain(optax.sgd(SGD_LR), lrcr.scale_by_cubic_step(SIGMA))
  cr_adagrad = optax.chain(
      optax.adagrad(ADAGRAD_LR, initial_accumulator_value=ADAGRAD_INIT),
      lrcr.scale_by_cubic_step(SIGMA))
  cr_every = optax.chain(optax.sgd(SGD_LR), lrcr.scale_by_cubic_step(
      SIGMA, curvature_every=EVERY))
  sub = min(SUB_BATCH, batch)

  def base(tx):
    return steps_lib.applied(steps_lib.make_base_step(model, tx))

  def cr(tx, curvature, **options):
    return steps_lib.applied(steps_lib.make_cr_step(
        model, tx, steps_lib.CROptions(curvature=curvature, sigma=SIGMA,
                                       **options)))

  gram = dict(gradient_direction=True)
  variants = [
      Variant("sgd", base(sgd), sgd, "sgd", 1, "base",
              "value_and_grad + optax.sgd"),
      Variant("adagrad", base(adagrad), adagrad, "adagrad", 1, "base",
              "value_and_grad + optax.adagrad"),
      Variant("cr_sgd_engine_gram", cr(cr_sgd, "engine", **gram), cr_sgd,
              "sgd", 1, "exact",
              "lrcr.value_grad_and_curvature, gradient_direction=True "
              "(Gram matrices)"),
      Variant("cr_sgd_engine", cr(cr_sgd, "engine"), cr_sgd, "sgd", 1,
              "exact", "lrcr.value_grad_and_curvature, dense direction sweep"),
      Variant("cr_sgd_engine_gram_stacked",
              cr(cr_sgd, "engine", stack_layers=True, **gram), cr_sgd, "sgd",
              1, "exact", "the Gram-form engine with stack_layers=True "
              "(equally shaped layers batched)"),
      Variant("cr_sgd_engine_stacked", cr(cr_sgd, "engine", stack_layers=True),
              cr_sgd, "sgd", 1, "exact",
              "the dense-sweep engine with stack_layers=True"),
      Variant("cr_sgd_lowrank", cr(cr_sgd, "lowrank"), cr_sgd, "sgd", 1,
              "exact",
              "value_and_grad + lrcr.lowrank_curvature_fn (self-contained)"),
      Variant("cr_sgd_autodiff", cr(cr_sgd, "autodiff"), cr_sgd, "sgd", 1,
              "baseline",
              "value_and_grad + forward-over-forward (autodiff_curvature_fn)"),
      Variant("cr_sgd_hvp", cr(cr_sgd, "hvp"), cr_sgd, "sgd", 1, "baseline",
              "value_and_grad + g.(H g), H g by jvp of grad"),
      Variant("cr_adagrad_engine", cr(cr_adagrad, "engine"), cr_adagrad,
              "adagrad", 1, "exact",
              "lrcr.value_grad_and_curvature after adagrad"),
      Variant("cr_sgd_engine_sub8",
              cr(cr_sgd, "engine", curvature_batch_size=sub), cr_sgd, "sgd", 1,
              "option", f"value_and_grad; slope on all rows, curvature by "
              f"the engine on the first {sub}"),
      Variant("sgd_scan10", scanned(base(sgd)), sgd, "sgd_scan10", EVERY,
              "base", f"{EVERY} SGD steps under lax.scan"),
      Variant("cr_sgd_every10", scanned(cr(cr_every, "engine", **gram)),
              cr_every, "sgd_scan10", EVERY, "option",
              f"{EVERY} CR-SGD steps under lax.scan, alpha refreshed (engine "
              f"Gram) on 1 of {EVERY} (curvature_every={EVERY})"),
  ]
  out = {v.name: v for v in variants}
  if names is not None:
    out = {n: out[n] for n in names}
  return out


# ---------------------------------------------------------------------------
# Timing and memory.


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


def static_costs(compiled: Any) -> dict[str, Any]:
  """Kernels (`count_kernels`), flops (`flops`) and `memory_stats`."""
  return dict(kernels=count_kernels(compiled.as_text()),
              flops=flops(compiled), memory=memory_stats(compiled))


def memory_stats(compiled: Any) -> dict[str, int | None]:
  """Byte counts of a compiled executable's memory analysis.

  `peak_bytes` is temp + argument + output (an upper bound on the live
  buffers); `xla_peak_bytes` is XLA's own peak estimate where the backend
  reports one. Missing numbers are None.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  names = ("temp_size_in_bytes", "argument_size_in_bytes",
           "output_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")
  out: dict[str, int | None] = {}
  for name in names:
    value = getattr(stats, name, None) if stats is not None else None
    out[name] = int(value) if isinstance(value, (int, np.integer)) else None
  parts = [out[n] for n in names[:3]]
  out["peak_bytes"] = None if None in parts else sum(parts)
  peak = out.pop("peak_memory_in_bytes")
  out["xla_peak_bytes"] = peak if peak else None
  return out


def flops(compiled: Any) -> float:
  """XLA's flop count of a compiled executable (`cost_analysis()`), or nan."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def make_sampler(fn: Callable[..., Any], args: Sequence[Any],
                 calls: int) -> Callable[[], float]:
  """`sample() -> seconds per call`, the mean over `calls` chained calls.

  Each sample starts from `args` and feeds the new (params, opt_state) of one
  call into the next, like a training loop; the batch stays fixed. The clock
  stops when the last result is ready.
  """
  params, state, *rest = args

  def sample() -> float:
    p, s = params, state
    tic = time.perf_counter()
    for _ in range(calls):
      p, s, loss = fn(p, s, *rest)
    jax.block_until_ready((p, s, loss))
    return (time.perf_counter() - tic) / calls
  return sample


def call_sampler(fn: Callable[..., Any], args: Sequence[Any],
                 target_s: float = 0.03) -> Callable[[], float]:
  """`sample() -> seconds per call` of `fn(*args)` (same inputs every call).

  For functions that are not training steps (a curvature evaluation, a
  Hessian diagonal). After a warm-up call, the number of calls per sample is
  set so that a sample takes about `target_s`.
  """
  def run(calls: int) -> float:
    tic = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - tic) / calls

  run(1)
  calls = max(1, int(target_s / max(run(1), 1e-9)))
  return lambda: run(calls)


def calibrate(fn: Callable[..., Any], args: Sequence[Any], target_s: float,
              max_calls: int = 100_000) -> int:
  """Calls per sample so that a sample takes about `target_s` seconds."""
  make_sampler(fn, args, 1)()                     # warm-up
  calls = 1
  while True:
    per_call = min(make_sampler(fn, args, calls)() for _ in range(2))
    if calls * per_call >= target_s / 4 or calls >= max_calls:
      break
    calls = min(max_calls, calls * 4)
  return int(min(max_calls, max(1, round(target_s / max(per_call, 1e-9)))))


def interleaved_samples(samplers: dict[str, Callable[[], float]],
                        repeats: int, seed: int = 0) -> dict[str, list[float]]:
  """Round-robin timing: each repeat samples every entry once, shuffled.

  Garbage collection is off while sampling.
  """
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
