"""Step functions and timing helpers for `experiments/benchmark.py`.

Every step function has the signature

    step(params, opt_state, x, y) -> (new_params, new_opt_state, loss)

and is pure, so `jax.jit(step).lower(...).compile()` gives both the executable
that is timed and its memory analysis. `make_steps` builds them all for one
network and batch shape:

    sgd                  value_and_grad + optax.sgd (the base of CR-SGD)
    adagrad              value_and_grad + optax.adagrad (the base of CR-Adagrad)
    cr_sgd_fused_gram    lrcr.fused, gradient_direction=True (Gram matrices)
    cr_sgd_fused         lrcr.fused, dense direction sweep
    cr_sgd_lowrank       value_and_grad + lrcr.lowrank_curvature_fn
    cr_sgd_autodiff      value_and_grad + lrcr.autodiff_curvature_fn (fwd-over-fwd)
    cr_sgd_hvp           value_and_grad + g . (jvp of grad)(g), a Hessian-vector product
    cr_adagrad_fused     lrcr.fused dense sweep after optax.adagrad
    cr_sgd_fused_sub8    option: the gradient on all B rows, the curvature on
                         the first 8 (the fused cache cut to 8 rows)
    cr_sgd_lowrank_sub8  option: the same with lrcr.directional on x[:8]
    sgd_scan10           10 SGD steps under lax.scan (base of cr_sgd_every10)
    cr_sgd_every10       option: 10 CR-SGD steps under lax.scan; alpha is
                         refreshed (fused Gram path) on the first only, the
                         other 9 reuse it (lax.cond)

The sub-batch variants take the slope from the full-batch gradient and the
curvature from the sub-batch (Byrd et al. 2011); with B <= 8 they equal the
exact step. The 10-step variants take xs [10, B, D], ys [10, B].
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrcr import fused
from lrcr.directional import (Directional, autodiff_curvature_fn, directional,
                              lowrank_curvature_fn)
from lrcr.mlp import MLP, cross_entropy_loss, uniform_init
from lrcr.transform import scale_by_cubic_step

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
      by generic autodiff) or "option" (an approximation of issue 4).
    description: one line for the report.
  """
  name: str
  step: Step
  tx: optax.GradientTransformation
  base: str
  steps_per_call: int
  kind: str
  description: str


def paper_mlp(width: int, depth: int, num_classes: int = 10) -> MLP:
  """The paper's ReLU MLP, no biases, weights ~ U(-0.1, 0.1)."""
  return MLP((width,) * depth, num_classes, kernel_init=uniform_init(0.1))


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


def hvp_curvature_fn(loss_fn: Callable[..., Array], grads: Any,
                     *args: Any) -> Callable[[Any, Any], Directional]:
  """curvature_fn from a Hessian-vector product (jvp of grad).

  slope = g . grads, curvature = g . (H g) with H g = jvp(grad F)(g).
  """
  def curvature_fn(params: Any, direction: Any) -> Directional:
    hg = jax.jvp(jax.grad(lambda p: loss_fn(p, *args)), (params,),
                 (direction,))[1]
    return Directional(optax.tree.vdot(direction, grads),
                       optax.tree.vdot(direction, hg),
                       optax.tree.norm(direction, squared=True))
  return curvature_fn


def make_steps(model: MLP, batch: int,
               names: Sequence[str] | None = None) -> dict[str, Variant]:
  """The benchmark's variants for `model` at batch size `batch`."""

  def loss_fn(params, x, y):
    return cross_entropy_loss(model.apply({"params": params}, x), y)

  sgd = optax.sgd(SGD_LR)
  adagrad = optax.adagrad(ADAGRAD_LR, initial_accumulator_value=ADAGRAD_INIT)
  cr_sgd = optax.chain(optax.sgd(SGD_LR), scale_by_cubic_step(SIGMA))
  cr_adagrad = optax.chain(
      optax.adagrad(ADAGRAD_LR, initial_accumulator_value=ADAGRAD_INIT),
      scale_by_cubic_step(SIGMA))
  sub = min(SUB_BATCH, batch)

  def plain(tx):
    def step(params, state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
    return step

  def fused_step(tx, gradient_direction, rows=None):
    def step(params, state, x, y):
      loss, grads, cache = fused.value_grad_and_cache(model, params, x, y)
      curvature_fn = fused.cached_curvature_fn(model, cache,
                                               gradient_direction, rows)
      updates, state = tx.update(grads, state, params,
                                 curvature_fn=curvature_fn)
      return optax.apply_updates(params, updates), state, loss
    return step

  def grad_then(make_curvature_fn):
    def step(params, state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = cr_sgd.update(
          grads, state, params, curvature_fn=make_curvature_fn(grads, x, y))
      return optax.apply_updates(params, updates), state, loss
    return step

  def lowrank_sub(grads, x, y):
    def curvature_fn(params, direction):
      d = directional(model, params, x[:sub], y[:sub], direction)
      return Directional(optax.tree.vdot(direction, grads), d.curvature,
                         d.sqnorm)
    return curvature_fn

  sgd_step = plain(sgd)
  gram_step = fused_step(cr_sgd, True)

  def scan_sgd(params, state, xs, ys):
    def body(carry, xy):
      p, s, loss = sgd_step(*carry, *xy)
      return (p, s), loss
    (params, state), losses = jax.lax.scan(body, (params, state), (xs, ys))
    return params, state, losses[-1]

  def scan_every(params, state, xs, ys):
    def reuse(p, s, x, y):
      # alpha from the last refresh times the SGD direction of this step.
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      direction, sgd_state = optax.sgd(SGD_LR).update(grads, s[0], p)
      alpha = s[1].learning_rate
      updates = jax.tree.map(lambda u: alpha * u, direction)
      return optax.apply_updates(p, updates), (sgd_state, s[1]), loss

    def body(carry, inputs):
      i, (x, y) = inputs
      p, s, loss = jax.lax.cond(i % EVERY == 0, gram_step, reuse, *carry, x, y)
      return (p, s), loss

    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    (params, state), losses = jax.lax.scan(body, (params, state),
                                           (steps, (xs, ys)))
    return params, state, losses[-1]

  variants = [
      Variant("sgd", sgd_step, sgd, "sgd", 1, "base",
              "value_and_grad + optax.sgd"),
      Variant("adagrad", plain(adagrad), adagrad, "adagrad", 1, "base",
              "value_and_grad + optax.adagrad"),
      Variant("cr_sgd_fused_gram", gram_step, cr_sgd, "sgd", 1, "exact",
              "lrcr.fused, gradient_direction=True (Gram matrices)"),
      Variant("cr_sgd_fused", fused_step(cr_sgd, False), cr_sgd, "sgd", 1,
              "exact", "lrcr.fused, dense direction sweep"),
      Variant("cr_sgd_lowrank",
              grad_then(lambda g, x, y: lowrank_curvature_fn(model, x, y)),
              cr_sgd, "sgd", 1, "exact",
              "value_and_grad + lrcr.lowrank_curvature_fn (self-contained)"),
      Variant("cr_sgd_autodiff",
              grad_then(lambda g, x, y: autodiff_curvature_fn(loss_fn, x, y)),
              cr_sgd, "sgd", 1, "baseline",
              "value_and_grad + forward-over-forward (autodiff_curvature_fn)"),
      Variant("cr_sgd_hvp",
              grad_then(lambda g, x, y: hvp_curvature_fn(loss_fn, g, x, y)),
              cr_sgd, "sgd", 1, "baseline",
              "value_and_grad + g.(H g), H g by jvp of grad"),
      Variant("cr_adagrad_fused", fused_step(cr_adagrad, False), cr_adagrad,
              "adagrad", 1, "exact", "lrcr.fused dense sweep after adagrad"),
      Variant("cr_sgd_fused_sub8", fused_step(cr_sgd, False, rows=sub),
              cr_sgd, "sgd", 1, "option",
              f"lrcr.fused; slope on all rows, curvature on the first {sub} "
              "(dense sweep on the cut cache)"),
      Variant("cr_sgd_lowrank_sub8", grad_then(lowrank_sub), cr_sgd, "sgd", 1,
              "option", f"value_and_grad; curvature by lrcr.directional on "
              f"the first {sub} rows"),
      Variant("sgd_scan10", scan_sgd, sgd, "sgd_scan10", EVERY, "base",
              f"{EVERY} SGD steps under lax.scan"),
      Variant("cr_sgd_every10", scan_every, cr_sgd, "sgd_scan10", EVERY,
              "option", f"{EVERY} CR-SGD steps under lax.scan, alpha "
              f"refreshed (fused Gram) on 1 of {EVERY} via lax.cond"),
  ]
  out = {v.name: v for v in variants}
  if names is not None:
    out = {n: out[n] for n in names}
  return out


# ---------------------------------------------------------------------------
# Timing and memory.


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


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
  """(q1, median, q3)."""
  q1, med, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
  return float(q1), float(med), float(q3)
