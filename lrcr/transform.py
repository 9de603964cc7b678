"""`scale_by_cubic_step`: the CR step length as an optax transformation (sec. 3.1).

CR is a metamethod: a base optimizer proposes a direction g, and CR chooses the
learning rate alpha for it from the cubic model of eq. 8 (`lrcr.cubic`). In
optax terms the direction is the `updates` that reach this transform from
whatever precedes it in an `optax.chain`, and the result is alpha * updates:

    tx = optax.chain(optax.sgd(1.0), lrcr.scale_by_cubic_step(sigma=100.0))
    updates, state = tx.update(grads, state, params,
                               curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))

Because alpha g does not change when g is scaled, the base optimizer's learning
rate (constant or scheduled) cancels out of the CR update: only sigma and the
base optimizer's preconditioning matter. The effective learning rate in the
base optimizer's own units is alpha times its learning rate; that is what the
paper plots.

That holds in floating point too: before calling `curvature_fn` the transform
divides g, block by block, by the power of two 2^e nearest above its largest
entry, and solves for the step along that unit-sized direction. Slope,
curvature and ||g||^2 scale exactly as 2^e, 2^2e and 2^2e, so this changes
no result, but ||g||^2 (1e60 for a base learning rate of 1e30) can no longer
overflow inside `curvature_fn`. A `lrcr.types.ScalableCurvatureFn` (what
`lrcr.value_grad_and_curvature` returns for granularity "global") is called
as `curvature_fn.fn(params, g, e)` instead and applies 2^-e inside its own
products, which saves writing a scaled copy of g every step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrcr import cubic
from lrcr.types import (GRANULARITIES, Directional, ScalableCurvatureFn,
                        param_groups)

Array = jax.Array


class CubicStepInfo(NamedTuple):
  """Diagnostics of the last CR step, shaped like `learning_rate`.

  Attributes:
    slope: s = g . grad F per block, from `curvature_fn`, in the units of the
      incoming direction g. NaN or inf stay as `curvature_fn` returned them.
      It is computed along the rescaled direction and scaled back exactly, so
      it is +-inf where the value itself exceeds the float range (a direction
      with ||g||^2 > 3e38 in float32); the step is still right then.
    curvature: h = g^T H g per block, likewise.
    sqnorm: ||g||^2 per block, likewise.
    predicted_decrease: F - m(alpha) >= 0 per block; +inf where it exceeds
      the float range.
    finite: bool per block. False where `curvature_fn` returned a non-finite
      slope, curvature or squared norm (alpha is then 0), or where the solve
      left the float range (alpha beyond it, then 0; or an infinite predicted
      decrease). Count `~finite` as a non-finite step: the other fields are
      not a reliable test, since they may overflow while the step is fine.
  """
  slope: Any
  curvature: Any
  sqnorm: Any
  predicted_decrease: Any
  finite: Any


class CubicStepState(NamedTuple):
  """State of `scale_by_cubic_step`: the last alpha, diagnostics and sigma."""
  learning_rate: Any
  info: CubicStepInfo
  sigma: Array
  accepted: Array
  count: Array


_MISSING = ("scale_by_cubic_step.update needs the keyword-only extra argument "
            "`curvature_fn`, a callable (params, direction) -> "
            "lrcr.Directional. Build it for the current batch with "
            "lrcr.lowrank_curvature_fn(model, x, labels) for an lrcr.MLP, or "
            "lrcr.autodiff_curvature_fn(loss_fn, *args) for any model, and "
            "call tx.update(grads, state, params, curvature_fn=...).")

_CONTRACT = (
    "curvature_fn(params, direction) must return "
    "lrcr.Directional(slope, curvature, sqnorm), or a tuple of these three, "
    "along `direction`: for granularity='global' three scalars (shape ()); "
    "for 'layer' three trees shaped like lrcr.layer_prefix(params), one "
    "scalar per layer; for 'variable' three trees shaped like params, one "
    "value per weight. lrcr.lowrank_curvature_fn(model, x, labels, "
    "granularity=...) and lrcr.autodiff_curvature_fn(loss_fn, *args, "
    "granularity=...) build one.")


#: The per-layer blocks of granularity "layer": one per innermost dict of
#: params (a flax module), `lrcr.param_groups`; kept under its former name.
layer_prefix = param_groups


def _zeros_for(granularity: str, params: Any, dtype) -> Any:
  if granularity == "global":
    return jnp.zeros((), dtype)
  if granularity == "layer":
    return jax.tree.map(lambda _: jnp.zeros((), dtype), layer_prefix(params))
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


# --- Exact power-of-two rescaling of the direction ---------------------------

# lrcr.cubic's exact power-of-two helpers and its solve (without the
# concrete-sigma check, done once in scale_by_cubic_step).
_times_pow2 = cubic.times_pow2
_frexp = cubic.frexp
_solve = cubic.solve


def _exponent(max_abs: Array) -> Array:
  """e with max_abs 2^-e in [0.5, 1); 0 for 0, subnormal or non-finite."""
  usable = jnp.isfinite(max_abs)
  e = _frexp(jnp.where(usable, max_abs, 0.0))[1]
  return jnp.where(usable, e, 0)


def _max_abs(tree: Any) -> Array:
  """max |x| over every leaf.

  Each leaf is first reduced to a row of partial maxima (one kernel), and
  the rows are reduced together once: XLA on CPUs otherwise splits each
  leaf's full reduction into two kernels, and the step at small batch is
  bound by its number of kernels.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  # At least float32 (a bfloat16 direction), float64 kept: its exponents
  # reach beyond float32's range.
  dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  rows = [jnp.max(jnp.abs(x), axis=tuple(range(1, jnp.ndim(x))))
          .astype(dtype).ravel() for x in leaves]
  return jnp.max(jnp.concatenate(rows), initial=0)


def _block_exponents(granularity: str, updates: Any) -> Any:
  """One exponent per block, shaped like `learning_rate`: e of max |g_block|."""
  if granularity == "global":
    return _exponent(_max_abs(updates))
  if granularity == "layer":
    return jax.tree.map(lambda _, sub: _exponent(_max_abs(sub)),
                        layer_prefix(updates), updates)
  return jax.tree.map(lambda u: _exponent(jnp.abs(u)), updates)


def _per_block(fn, blocks: Any, tree: Any) -> Any:
  """fn(block leaf, leaf of tree) on every leaf of tree under each block."""
  return jax.tree.map(
      lambda b, sub: jax.tree.map(lambda u: fn(b, u), sub), blocks, tree)


def _describe(x: Any) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{type(x).__name__} of shape {tuple(x.shape)}"
  return f"{type(x).__name__} {x!r}"[:200]


def _as_directional(d: Any, granularity: str, like: Any) -> Directional:
  """d as a Directional whose fields match `like` (the learning_rate tree)."""
  where = f"scale_by_cubic_step(granularity={granularity!r})"
  if not isinstance(d, Directional):
    if not (isinstance(d, (tuple, list)) and len(d) == 3):
      raise TypeError(f"{where}: {_CONTRACT} It returned a {_describe(d)}.")
    d = Directional(*d)
  expected = jax.tree.structure(like)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(like)]
  for name, value in zip(Directional._fields, d):
    got = jax.tree.structure(value)
    if got != expected:
      raise TypeError(f"{where}: {_CONTRACT} Its {name} has structure {got}, "
                      f"expected {expected}.")
    for leaf, shape in zip(jax.tree.leaves(value), shapes):
      try:
        dtype = jnp.result_type(leaf)
      except TypeError:
        dtype = None
      if dtype is None or not (jnp.issubdtype(dtype, jnp.floating) or
                               jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{where}: {_CONTRACT} Its {name} has a leaf "
                        f"{_describe(leaf)}, not a real number.")
      if jnp.shape(leaf) != shape:
        raise TypeError(f"{where}: {_CONTRACT} Its {name} has a leaf of "
                        f"shape {jnp.shape(leaf)}, expected {shape}.")
  return d


def scale_by_cubic_step(
    sigma: float | Array,
    *,
    granularity: str = "global",
    adaptive_sigma: bool = False,
    eta_successful: float = 0.1,
    eta_very_successful: float = 0.9,
    gamma: float = 2.0,
    sigma_min: float = 1e-10,
    sigma_max: float = 1e10,
    curvature_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Multiplies the incoming direction by the Cubic-Regularization step length.

  At each update, with g the incoming updates (the search direction of the
  preceding transforms), it evaluates s = g . grad F, h = g^T H g and ||g||^2
  through `curvature_fn(params, g)`, solves the cubic model of eq. 8 for alpha
  (eq. 37, stable, see `lrcr.cubic`) and returns alpha g (eqs. 42-43).
  `curvature_fn` is called with g divided by a power of two per block (see
  the module docstring); slope, curvature and ||g||^2 being linear and
  quadratic in g, this is exact.

  Granularity (section 4's future work, appendix B Table 2):

  * "global": one alpha per step from the exact s, g^T H g and ||g||^2: the
    paper's method. `curvature_fn` returns scalars.
  * "layer": one alpha_k per layer from the block-diagonal model
    m_k(a) = a s_k + a^2/2 g_k^T H_kk g_k + sigma/6 a^3 ||g_k||^3, each layer
    solved on its own; cross-layer blocks are ignored. `curvature_fn` returns
    one scalar per layer (`lowrank_curvature_fn(..., granularity="layer")`,
    a tree like `layer_prefix(params)`); each layer's values must depend on
    that layer's part of the direction only.
  * "variable": one alpha_i per weight from the diagonal model
    m_i(a) = a g_i dF/dw_i + a^2/2 g_i^2 H_ii + sigma/6 |a g_i|^3. In the unit
    step t = a |g_i| this is Table 2's model with a unit baseline step along
    each variable. Consequence: the step alpha_i g_i depends on the base
    optimizer only through the sign of g_i, so after SGD, Adagrad, Adadelta
    or Adam (which keep the gradient's sign) it is the same method.
    `curvature_fn` returns trees shaped like params
    (`lowrank_curvature_fn(..., granularity="variable")`, built from the
    exact Hessian diagonal `lrcr.hessian_diagonal`).

  Every block follows the same stable root and non-descent policy: alpha is
  the minimizer of its cubic model over alpha >= 0, so a block whose
  direction does not descend gets 0 unless negative curvature makes a step
  pay. Non-finite slope, curvature or ||g||^2 give alpha = 0 for that block
  and `info.finite = False`; NaN never reaches alpha.

  Adaptive sigma (Kohler & Lucchi 2017, Algorithm 1), off by default: with
  `value_fn` (params -> batch loss F) passed as an extra argument, each step
  evaluates F at the trial point (one extra forward pass) and
  rho = (F(x) - F(x + alpha g)) / predicted decrease. A step with some
  alpha > 0 is accepted only when the predicted decrease is finite and > 0
  and rho >= eta_successful; otherwise it is rejected (zero update) and sigma
  grows. An update with alpha = 0 everywhere moves nothing and keeps sigma.
  sigma is divided by gamma when rho > eta_very_successful, kept when
  successful, and multiplied by gamma when rejected, within [sigma_min,
  sigma_max]. Kohler & Lucchi write sigma/3 in front of the cubic term; lrcr
  keeps this paper's sigma/6 throughout, so their sigma_KL equals sigma / 2
  here. Their update rule is scale-free (multiplicative), so only the
  initial value needs converting. `state.sigma` records the current sigma.

  Args:
    sigma: the cubic weight, a finite scalar > 0, in the paper's sigma/6
      convention (eq. 8); the initial value when `adaptive_sigma`. A Python
      number or a concrete array is checked here; a tracer (the transform
      built inside `jit` with a traced sigma) cannot be, and a sigma <= 0
      then gives alpha = 0 on every update.
    granularity: "global", "layer" or "variable".
    adaptive_sigma: update sigma from the actual/predicted decrease ratio.
    eta_successful: rho threshold to accept a step (K&L: 0.1).
    eta_very_successful: rho threshold to decrease sigma (K&L: 0.9).
    gamma: factor of the sigma updates, > 1 (K&L: 2).
    sigma_min: lower bound of adaptive sigma, > 0.
    sigma_max: upper bound of adaptive sigma, >= sigma_min.
    curvature_every: an option that trades exactness for speed, off by
      default (1): evaluate the curvature and refresh alpha only on every
      k-th update and reuse the last alpha in between (`curvature_fn` is not
      called there; under jit a `lax.cond` skips its cost). Not combinable
      with `adaptive_sigma`.

  Returns:
    An `optax.GradientTransformationExtraArgs`. Its update takes the
    keyword-only extra argument `curvature_fn` (and `value_fn`, plus
    optionally `value` = F(params), when `adaptive_sigma`), and requires
    `params`. The state is `CubicStepState(learning_rate=alpha, info, sigma,
    accepted, count)`; `optax.tree.get(state, "learning_rate")` reads alpha
    (a scalar, one per layer, or one per weight), and `info` is a
    `CubicStepInfo` whose `finite` field flags non-finite curvature.

  Raises:
    ValueError: if sigma is concrete and not a finite scalar > 0, for an
      unknown granularity, or for bad adaptive-sigma or curvature_every
      settings.
    TypeError: at update time, if `curvature_fn`, `params` or (adaptive)
      `value_fn` is missing, or `curvature_fn` breaks its contract (the
      message states it).
  """
  cubic.check_sigma(sigma, "scale_by_cubic_step")
  if not isinstance(sigma, jax.core.Tracer) and jnp.ndim(sigma) != 0:
    raise ValueError(f"scale_by_cubic_step(sigma=array of shape "
                     f"{jnp.shape(sigma)}): sigma must be a scalar.")
  if not (isinstance(curvature_every, int) and curvature_every >= 1):
    raise ValueError(f"curvature_every={curvature_every!r}: must be an "
                     "integer >= 1 (1 = every step, the paper).")
  if adaptive_sigma and curvature_every > 1:
    raise ValueError("adaptive_sigma needs a fresh predicted decrease every "
                     "step; use it with curvature_every=1.")
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"scale_by_cubic_step(granularity={granularity!r}): expected one of "
        f"{GRANULARITIES}.")
  if adaptive_sigma:
    if not 0 < sigma_min <= sigma_max < float("inf"):
      raise ValueError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: "
                       "need 0 < sigma_min <= sigma_max < inf.")
    if not 1 < gamma < float("inf"):
      raise ValueError(f"gamma={gamma!r}: must be > 1 (K&L use 2).")
    if not 0 < eta_successful <= eta_very_successful:
      raise ValueError(
          f"eta_successful={eta_successful!r}, eta_very_successful="
          f"{eta_very_successful!r}: need 0 < eta_successful <= "
          "eta_very_successful (K&L: 0.1 and 0.9).")

  def init_fn(params: Any) -> CubicStepState:
    dtype = _float_dtype(params)
    zeros = lambda: _zeros_for(granularity, params, dtype)
    trues = jax.tree.map(lambda z: jnp.ones(jnp.shape(z), bool), zeros())
    return CubicStepState(
        learning_rate=zeros(),
        info=CubicStepInfo(zeros(), zeros(), zeros(), zeros(), trues),
        sigma=jnp.asarray(sigma, dtype), accepted=jnp.asarray(True),
        count=jnp.zeros((), jnp.int32))

  def update_fn(updates: Any, state: CubicStepState, params: Any = None, *,
                curvature_fn: Any = None, value_fn: Any = None,
                value: Any = None, **extra_args: Any):
    del extra_args
    if curvature_fn is None:
      raise TypeError(_MISSING)
    if params is None:
      raise TypeError("scale_by_cubic_step.update needs `params` (the point "
                      "where the curvature is evaluated): "
                      "tx.update(grads, state, params, curvature_fn=...).")
    if adaptive_sigma and value_fn is None:
      raise TypeError(
          "scale_by_cubic_step(adaptive_sigma=True).update needs the extra "
          "argument `value_fn`, a callable params -> batch loss on the same "
          "batch as curvature_fn (optionally also `value`, the loss at "
          "params).")
    dtype = state.sigma.dtype
    sig = state.sigma
    treedef = jax.tree.structure(state.learning_rate)
    # g' = g 2^-e per block, max |g'| in [0.5, 1): curvature_fn sees a
    # unit-sized direction, and alpha' along g' is alpha 2^e.
    exps = _block_exponents(granularity, updates)
    # An engine-built curvature_fn (`lrcr.value_grad_and_curvature`) takes
    # the exponent and applies the scaling inside its products, which saves
    # writing a scaled copy of the whole direction every step.
    in_fn = (granularity == "global" and
             isinstance(curvature_fn, ScalableCurvatureFn))
    unit = None if in_fn else _per_block(lambda e, u: _times_pow2(u, -e),
                                         exps, updates)

    def fresh(_):
      raw = (curvature_fn.fn(params, updates, exps) if in_fn
             else curvature_fn(params, unit))
      d = _as_directional(raw, granularity, state.learning_rate)
      # One solve for all blocks, on the leaves flattened and concatenated.
      flat = lambda tree, dt: jnp.concatenate([
          jnp.ravel(jnp.asarray(x).astype(dt))
          for x in treedef.flatten_up_to(tree)])
      s, h, n2 = (flat(f, dtype) for f in d)
      e = flat(exps, jnp.int32)
      alpha_unit, decrease, ok = _solve(s, h, n2, sig)
      # alpha = alpha' 2^-e; one beyond the float range: no step, not finite.
      alpha = _times_pow2(alpha_unit, -e)
      fits = jnp.isfinite(alpha)
      alpha_unit, alpha, decrease = (jnp.where(fits, x, jnp.zeros_like(x))
                                     for x in (alpha_unit, alpha, decrease))
      ok = ok & fits
      shapes = [jnp.shape(x) for x in jax.tree.leaves(state.learning_rate)]
      ends = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
      tree = lambda x: jax.tree.unflatten(treedef, [
          part.reshape(shape) for part, shape in zip(jnp.split(x, ends),
                                                     shapes)])
      # Back to the units of g: s 2^e, h 2^2e, ||g||^2 2^2e, alpha 2^-e.
      info = CubicStepInfo(
          slope=tree(_times_pow2(s, e)),
          curvature=tree(_times_pow2(h, 2 * e)),
          sqnorm=tree(_times_pow2(n2, 2 * e)),
          predicted_decrease=tree(decrease), finite=tree(ok))
      return tree(alpha_unit), tree(alpha), info

    def reuse(_):
      alpha = state.learning_rate
      return (jax.tree.map(_times_pow2, alpha, exps), alpha, state.info)

    if curvature_every == 1:
      alpha_unit, alpha, info = fresh(None)
    else:
      alpha_unit, alpha, info = jax.lax.cond(
          state.count % curvature_every == 0, fresh, reuse, None)
    # alpha g = alpha' g'.                                           # eq. 42
    if in_fn:
      new_updates = jax.tree.map(lambda u: (alpha * u).astype(u.dtype),
                                 updates)
    else:
      new_updates = _per_block(lambda a, u: (a * u).astype(u.dtype),
                               alpha_unit, unit)
    accepted = jnp.asarray(True)
    if adaptive_sigma:
      f0 = value_fn(params) if value is None else value
      trial = optax.apply_updates(params, new_updates)
      predicted = sum(jnp.sum(x) for x in
                      jax.tree.leaves(info.predicted_decrease))
      actual = f0 - value_fn(trial)
      # Every step with alpha > 0 faces the ratio test; a predicted decrease
      # that is 0 or overflowed cannot pass it.
      moves = jnp.any(jnp.stack([jnp.any(a > 0)
                                 for a in jax.tree.leaves(alpha_unit)]))
      judged = jnp.isfinite(predicted) & (predicted > 0)
      rho = actual / jnp.where(judged, predicted, 1.0)
      success = judged & jnp.isfinite(rho) & (rho >= eta_successful)
      very = judged & jnp.isfinite(rho) & (rho > eta_very_successful)
      accepted = ~moves | success
      sig = jnp.where(~moves, sig, jnp.where(
          very, sig / gamma, jnp.where(success, sig, sig * gamma)))
      sig = jnp.clip(sig, sigma_min, sigma_max).astype(dtype)
      new_updates = jax.tree.map(
          lambda u: jnp.where(accepted, u, jnp.zeros_like(u)), new_updates)
      # A rejected step moves nothing: record the alpha actually applied.
      alpha = jax.tree.map(lambda a: jnp.where(accepted, a, 0.0), alpha)
    return new_updates, CubicStepState(
        learning_rate=alpha, info=info, sigma=sig, accepted=accepted,
        count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _float_dtype(tree: Any):
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.asarray(leaves[0]).dtype if leaves else jnp.float32


def _with_cubic(base: optax.GradientTransformation, sigma,
                **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  return optax.chain(base, scale_by_cubic_step(sigma, **cubic_kwargs))


def cubic_sgd(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
              **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.sgd` followed by `scale_by_cubic_step` (the paper's Figs. 1-3).

  The learning rate cancels out of the update (see the module docstring); it
  only sets the units of `alpha`. `cubic_kwargs` go to `scale_by_cubic_step`
  (granularity, adaptive_sigma, ...), as for every alias below.
  """
  return _with_cubic(optax.sgd(learning_rate), sigma, **cubic_kwargs)


def cubic_adagrad(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
                  initial_accumulator_value: float = 0.1, eps: float = 1e-7,
                  **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.adagrad` followed by `scale_by_cubic_step` (the paper's Fig. 4)."""
  return _with_cubic(optax.adagrad(learning_rate, initial_accumulator_value,
                                   eps), sigma, **cubic_kwargs)


def cubic_adadelta(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
                   rho: float = 0.95, eps: float = 1e-8,
                   **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.adadelta` followed by `scale_by_cubic_step` (the paper's Fig. 5)."""
  return _with_cubic(optax.adadelta(learning_rate, rho=rho, eps=eps), sigma,
                     **cubic_kwargs)


def cubic_adam(sigma: float, learning_rate: optax.ScalarOrSchedule = 1e-3,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.adam` followed by `scale_by_cubic_step` (section 4)."""
  return _with_cubic(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), sigma,
                     **cubic_kwargs)


def cubic_rmsprop(sigma: float, learning_rate: optax.ScalarOrSchedule = 1e-3,
                  decay: float = 0.9, eps: float = 1e-8,
                  **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.rmsprop` followed by `scale_by_cubic_step`."""
  return _with_cubic(optax.rmsprop(learning_rate, decay=decay, eps=eps), sigma,
                     **cubic_kwargs)
