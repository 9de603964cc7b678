"""`scale_by_cubic_step`: the CR step length as an optax transform (sec. 3.1).

CR is a metamethod: a base optimizer proposes a direction g, and CR chooses the
learning rate alpha for it from the cubic model of eq. 8 (`lrcr.cubic`). In
optax terms the direction is the `updates` that reach this transform from
whatever precedes it in an `optax.chain`, and the result is alpha * updates:

    tx = optax.chain(optax.sgd(1.0), lrcr.scale_by_cubic_step(sigma=100.0))
    loss, grads, curvature_fn = lrcr.value_grad_and_curvature(
        loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params,
                               curvature_fn=curvature_fn)

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
products, which saves writing a scaled copy of g every step. For a
multiple of the gradient (`gradient_direction=True`, or the gradient it
returned itself) it also picks e itself (`autoscaled`), from ||grad F|| and
the multiple c of g = c grad F. `cubic_sgd` hands it that gradient and c =
-learning_rate, so c needs no pass over the leaves either.

Cost (granularity "global"): the direction's largest entry takes one
reduction per leaf (a copy of the leaves into one flat buffer would take
one reduction in all, but it doubles the step's temporary memory: an extra
copy of the direction); with an `autoscaled` curvature_fn there is none,
except for the finiteness check on the steps that reuse alpha
(`curvature_every`). Eq. 37 is solved in a few scalar kernels
(`lrcr.cubic.solve`), and the rest fuses into the writes of the update, one
per leaf, as for `optax.sgd`.
"""

from __future__ import annotations

import functools
import inspect
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
      slope, curvature or squared norm (a NaN or inf direction gives one),
      or where the solve left the float range (alpha beyond it; or an
      infinite predicted decrease). The block's update is then 0 and its
      alpha 0. Count `~finite` as a non-finite step: the other fields are
      not a reliable test, since they may overflow while the step is fine.
  """
  slope: Any
  curvature: Any
  sqnorm: Any
  predicted_decrease: Any
  finite: Any


class CubicStepState(NamedTuple):
  """State of `scale_by_cubic_step`.

  Attributes:
    learning_rate: alpha, the step size the transform applied to the
      incoming updates g (a scalar, one per layer or one per weight), as
      optax's line searches keep theirs: `optax.tree.get(state,
      "learning_rate")` finds it. It is in the units of g: after a base
      optimizer with learning rate lr, the step in that optimizer's units
      is alpha * lr (what the paper plots).
    info: a `CubicStepInfo` of the last update.
    sigma: the current cubic weight (changes only with `adaptive_sigma`).
    accepted: whether the last update was applied (False only where
      `adaptive_sigma` rejected it).
    count: the number of updates so far.
  """
  learning_rate: Any
  info: CubicStepInfo
  sigma: Array
  accepted: Array
  count: Array


_MISSING = ("scale_by_cubic_step.update needs the keyword-only extra argument "
            "`curvature_fn`, a callable (params, direction) -> "
            "lrcr.Directional. Build it for the current batch with "
            "lrcr.value_grad_and_curvature(loss_fn, params, *batch) for any "
            "model (lrcr.lowrank_curvature_fn(model, x, labels) for an "
            "lrcr.MLP, lrcr.autodiff_curvature_fn(loss_fn, *args) as a "
            "reference), and call tx.update(grads, state, params, "
            "curvature_fn=...).")

_GRADIENT_DIRECTION = (
    "`gradient_direction` is an argument of lrcr.value_grad_and_curvature, "
    "not of {where}: build the curvature_fn with "
    "lrcr.value_grad_and_curvature(loss_fn, params, *batch, "
    "gradient_direction=True) when the base optimizer is plain SGD, and pass "
    "that curvature_fn to tx.update(..., curvature_fn=curvature_fn).")

_CONTRACT = (
    "curvature_fn(params, direction) must return "
    "lrcr.Directional(slope, curvature, sqnorm), or a tuple of these three, "
    "along `direction`: for granularity='global' three scalars (shape ()); "
    "for 'layer' three trees shaped like lrcr.param_groups(params), one "
    "scalar per layer; for 'variable' three trees shaped like params, one "
    "value per weight. lrcr.value_grad_and_curvature(loss_fn, params, "
    "*batch, granularity=...) and lrcr.autodiff_curvature_fn(loss_fn, "
    "*args, granularity=...) build one.")


def _work_dtype(params: Any):
  """The state's float dtype: the params' float dtype, at least float32."""
  leaves = [x for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  dtype = jnp.asarray(leaves[0]).dtype if leaves else jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def _zeros_for(granularity: str, params: Any, dtype) -> Any:
  if granularity == "global":
    return jnp.zeros((), dtype)
  if granularity == "layer":
    return jax.tree.map(lambda _: jnp.zeros((), dtype), param_groups(params))
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


# --- Exact power-of-two rescaling of the direction ---------------------------


def _max_abs(tree: Any) -> Array:
  """max |x| over every leaf of a group, in at least float32 (float64 kept)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  return functools.reduce(jnp.maximum, [
      jnp.max(jnp.abs(x)).astype(dtype) for x in leaves])


def _block_exponents(granularity: str, updates: Any) -> Any:
  """One exponent per block ("layer" or "variable"): e of max |g_block|."""
  if granularity == "layer":
    return jax.tree.map(lambda _, sub: cubic.exponent(_max_abs(sub)),
                        param_groups(updates), updates)
  return jax.tree.map(
      lambda u: cubic.exponent(jnp.abs(u).astype(
          jnp.promote_types(u.dtype, jnp.float32))), updates)


def _finite_blocks(granularity: str, updates: Any) -> Any:
  """Whether the direction is finite, per block (a tree like `alpha`)."""
  if granularity == "global":
    return jnp.isfinite(_max_abs(updates))
  if granularity == "layer":
    return jax.tree.map(lambda _, sub: jnp.isfinite(_max_abs(sub)),
                        param_groups(updates), updates)
  return jax.tree.map(jnp.isfinite, updates)


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


# --- The update, in parts -----------------------------------------------------


class _Step(NamedTuple):
  """One update's step lengths, per block (trees like `learning_rate`)."""
  alpha_unit: Any    # alpha' = alpha 2^e, along the unit direction g 2^-e
  alpha: Any         # alpha, along g
  info: CubicStepInfo


def _solve_blocks(d: Directional, exps: Any, sigma: Array, like: Any
                  ) -> _Step:
  """Eq. 37 for every block at once, from its unit-direction Directional.

  Args:
    d: slope, curvature and ||g'||^2 along g' = g 2^-e, trees like `like`.
    exps: e per block (int32), like `like`.
    sigma: the cubic weight, a scalar of the state's dtype.
    like: the `learning_rate` tree (its structure and shapes).

  Returns:
    A `_Step` whose info is back in the units of g.
  """
  dtype = sigma.dtype
  treedef = jax.tree.structure(like)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(like)]
  single = len(shapes) == 1
  # One solve for all blocks: the leaves flattened and concatenated.
  flat = lambda tree, dt: (
      jnp.asarray(treedef.flatten_up_to(tree)[0]).astype(dt) if single
      else jnp.concatenate([jnp.ravel(jnp.asarray(x).astype(dt))
                            for x in treedef.flatten_up_to(tree)]))
  s, h, n2 = (flat(f, dtype) for f in d)
  e = flat(exps, jnp.int32)
  alpha_unit, decrease, ok = cubic.solve(s, h, n2, sigma)
  # alpha = alpha' 2^-e; one beyond the float range: no step, not finite.
  alpha = cubic.times_pow2(alpha_unit, -e)
  fits = jnp.isfinite(alpha)
  zero = lambda x: jnp.where(fits, x, jnp.zeros_like(x))
  alpha_unit, alpha, decrease, ok = (zero(alpha_unit), zero(alpha),
                                     zero(decrease), ok & fits)
  if single:
    tree = lambda x: jax.tree.unflatten(treedef, [x.reshape(shapes[0])])
  else:
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
    tree = lambda x: jax.tree.unflatten(treedef, [
        part.reshape(shape) for part, shape in zip(jnp.split(x, ends),
                                                   shapes)])
  # Back to the units of g: s 2^e, h 2^2e, ||g||^2 2^2e.
  info = CubicStepInfo(
      slope=tree(cubic.times_pow2(s, e)),
      curvature=tree(cubic.times_pow2(h, 2 * e)),
      sqnorm=tree(cubic.times_pow2(n2, 2 * e)),
      predicted_decrease=tree(decrease), finite=tree(ok))
  return _Step(tree(alpha_unit), tree(alpha), info)


def _times(c: Array, updates: Any) -> Any:
  """c * updates, each leaf in its own dtype, as `optax.sgd` writes it."""
  return jax.tree.map(lambda u: (c * u).astype(u.dtype), updates)


def _scaled_updates(step: _Step, updates: Any, unit: Any,
                    direction_scale: Any = None) -> Any:
  """alpha g = alpha' g' per block (eq. 42), and 0 where not finite.

  A block whose step is not finite (a NaN or inf direction, or a
  curvature_fn that returned one) gets a zero update, not alpha * NaN.
  With `direction_scale` c, g is c * updates, written here as `optax.sgd`
  writes it (c * u in u's dtype), in the same kernel as the update.
  """
  def scale(a, ok, u):
    return jnp.where(ok, (a * u).astype(u.dtype), jnp.zeros_like(u))
  if direction_scale is not None:
    updates = _times(direction_scale, updates)
  if unit is None:      # the engine rescaled inside: alpha g directly
    return jax.tree.map(lambda u: scale(step.alpha, step.info.finite, u),
                        updates)
  return jax.tree.map(
      lambda a, ok, sub: jax.tree.map(lambda u: scale(a, ok, u), sub),
      step.alpha_unit, step.info.finite, unit)


class _Settings(NamedTuple):
  """`scale_by_cubic_step`'s arguments, checked."""
  granularity: str
  adaptive_sigma: bool
  eta_successful: float
  eta_very_successful: float
  gamma: float
  sigma_min: float
  sigma_max: float
  curvature_every: int


def _check_settings(sigma: Any, c: _Settings) -> None:
  """Raises ValueError for settings `scale_by_cubic_step` cannot use."""
  cubic.check_sigma(sigma, "scale_by_cubic_step")
  if not isinstance(sigma, jax.core.Tracer) and jnp.ndim(sigma) != 0:
    raise ValueError(f"scale_by_cubic_step(sigma=array of shape "
                     f"{jnp.shape(sigma)}): sigma must be a scalar.")
  if not (isinstance(c.curvature_every, int) and c.curvature_every >= 1):
    raise ValueError(f"curvature_every={c.curvature_every!r}: must be an "
                     "integer >= 1 (1 = every step, the paper).")
  if c.adaptive_sigma and c.curvature_every > 1:
    raise ValueError("adaptive_sigma needs a fresh predicted decrease every "
                     "step; use it with curvature_every=1.")
  if c.granularity not in GRANULARITIES:
    raise ValueError(
        f"scale_by_cubic_step(granularity={c.granularity!r}): expected one "
        f"of {GRANULARITIES}.")
  if c.adaptive_sigma:
    if not 0 < c.sigma_min <= c.sigma_max < float("inf"):
      raise ValueError(f"sigma_min={c.sigma_min!r}, sigma_max="
                       f"{c.sigma_max!r}: need 0 < sigma_min <= sigma_max "
                       "< inf.")
    if not 1 < c.gamma < float("inf"):
      raise ValueError(f"gamma={c.gamma!r}: must be > 1 (K&L use 2).")
    if not 0 < c.eta_successful <= c.eta_very_successful:
      raise ValueError(
          f"eta_successful={c.eta_successful!r}, eta_very_successful="
          f"{c.eta_very_successful!r}: need 0 < eta_successful <= "
          "eta_very_successful (K&L: 0.1 and 0.9).")


def _check_update_args(c: _Settings, params, curvature_fn, value_fn,
                       extra_args: dict) -> None:
  """Raises TypeError for a missing or misplaced extra argument."""
  if "gradient_direction" in extra_args:
    raise TypeError(_GRADIENT_DIRECTION.format(
        where="scale_by_cubic_step.update"))
  if curvature_fn is None:
    raise TypeError(_MISSING)
  if params is None:
    raise TypeError("scale_by_cubic_step.update needs `params` (the point "
                    "where the curvature is evaluated): "
                    "tx.update(grads, state, params, curvature_fn=...).")
  if c.adaptive_sigma and value_fn is None:
    raise TypeError(
        "scale_by_cubic_step(adaptive_sigma=True).update needs the extra "
        "argument `value_fn`, a callable params -> batch loss on the same "
        "batch as curvature_fn (optionally also `value`, the loss at "
        "params).")


def _adapt_sigma(c: _Settings, state: CubicStepState, step: _Step,
                 new_updates: Any, params: Any, value_fn, value):
  """Kohler & Lucchi's ratio test (see `scale_by_cubic_step`).

  Returns:
    (updates, alpha, sigma, accepted): the updates and alpha actually
    applied (zero where rejected) and the next sigma.
  """
  sig = state.sigma
  f0 = value_fn(params) if value is None else value
  trial = optax.apply_updates(params, new_updates)
  predicted = sum(jnp.sum(x) for x in
                  jax.tree.leaves(step.info.predicted_decrease))
  actual = f0 - value_fn(trial)
  # Every step with alpha > 0 faces the ratio test; a predicted decrease
  # that is 0 or overflowed cannot pass it.
  moves = jnp.any(jnp.stack([jnp.any(a > 0)
                             for a in jax.tree.leaves(step.alpha_unit)]))
  judged = jnp.isfinite(predicted) & (predicted > 0)
  rho = actual / jnp.where(judged, predicted, 1.0)
  success = judged & jnp.isfinite(rho) & (rho >= c.eta_successful)
  very = judged & jnp.isfinite(rho) & (rho > c.eta_very_successful)
  accepted = ~moves | success
  sig = jnp.where(~moves, sig, jnp.where(
      very, sig / c.gamma, jnp.where(success, sig, sig * c.gamma)))
  sig = jnp.clip(sig, c.sigma_min, c.sigma_max).astype(state.sigma.dtype)
  updates = jax.tree.map(
      lambda u: jnp.where(accepted, u, jnp.zeros_like(u)), new_updates)
  # A rejected step moves nothing: record the alpha actually applied.
  alpha = jax.tree.map(lambda a: jnp.where(accepted, a, 0.0), step.alpha)
  return updates, alpha, sig, accepted


def _update(c: _Settings, updates: Any, state: CubicStepState, params: Any,
            curvature_fn, value_fn, value, direction_scale: Any = None):
  """`scale_by_cubic_step`'s update_fn, its arguments checked.

  With `direction_scale` (a scalar c, from `cubic_sgd`), the direction is
  g = c * updates.
  """
  like = state.learning_rate
  # An engine-built curvature_fn (`lrcr.value_grad_and_curvature`) takes
  # the exponent and applies the scaling inside its products, which saves
  # writing a scaled copy of the whole direction every step; for a multiple
  # of the gradient (`gradient_direction=True`, or the gradient itself) it
  # also chooses the exponent, which saves the search for the largest entry,
  # and where g is c times the gradient itself, also the pass for c.
  scalable = (c.granularity == "global" and
              isinstance(curvature_fn, ScalableCurvatureFn))
  auto = scalable and curvature_fn.autoscales(updates)
  if direction_scale is not None and not auto:
    updates, direction_scale = _times(direction_scale, updates), None
  # With direction_scale, g' = c * updates 2^-e.
  scale_arg = () if direction_scale is None else (direction_scale,)
  # g' = g 2^-e per block, max |g'| in [0.5, 1) (||g'||^2 in [1/16, 1)
  # when autoscaled): curvature_fn sees a unit-sized direction, and alpha'
  # along g' is alpha 2^e.
  if auto:
    exps = jnp.zeros((), jnp.int32)     # the reused alpha needs none
  elif c.granularity == "global":
    exps = cubic.exponent(_max_abs(updates))
  else:
    exps = _block_exponents(c.granularity, updates)
  unit = None if scalable else _per_block(
      lambda e, u: cubic.times_pow2(u, -e), exps, updates)

  def fresh(_):
    e = exps
    if auto:
      raw, e = curvature_fn.autoscaled(params, updates, *scale_arg)
      e = jnp.asarray(e, jnp.int32)
    elif scalable:
      raw = curvature_fn.fn(params, updates, exps)
    else:
      raw = curvature_fn(params, unit)
    d = _as_directional(raw, c.granularity, like)
    return _solve_blocks(d, e, state.sigma, like)

  def reuse(_):
    alpha = state.learning_rate
    # The kept alpha applies to this step's direction: a block whose
    # direction is not finite gets no step here either.
    finite = jax.tree.map(jnp.logical_and, state.info.finite,
                          _finite_blocks(c.granularity, updates))
    if direction_scale is not None:
      finite = finite & jnp.isfinite(direction_scale)
    return _Step(jax.tree.map(cubic.times_pow2, alpha, exps), alpha,
                 state.info._replace(finite=finite))

  if c.curvature_every == 1:
    step = fresh(None)
  else:
    step = jax.lax.cond(state.count % c.curvature_every == 0, fresh, reuse,
                        None)
  new_updates = _scaled_updates(step, updates, unit,          # eq. 42
                               direction_scale)
  alpha, sig, accepted = step.alpha, state.sigma, jnp.asarray(True)
  if c.adaptive_sigma:
    new_updates, alpha, sig, accepted = _adapt_sigma(
        c, state, step, new_updates, params, value_fn, value)
  return new_updates, CubicStepState(
      learning_rate=alpha, info=step.info, sigma=sig, accepted=accepted,
      count=optax.safe_increment(state.count))


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
  The quantities are those of g divided by a power of two per block (see
  the module docstring), computed by the transform or, for an engine-built
  `curvature_fn`, inside it; slope, curvature and ||g||^2 being linear and
  quadratic in g, this is exact. The options of the curvature_fn itself
  (`gradient_direction=True` for plain SGD, `granularity`) are arguments of
  `lrcr.value_grad_and_curvature`, which builds it.

  Granularity (section 4's future work, appendix B Table 2):

  * "global": one alpha per step from the exact s, g^T H g and ||g||^2: the
    paper's method. `curvature_fn` returns scalars.
  * "layer": one alpha_k per layer from the block-diagonal model
    m_k(a) = a s_k + a^2/2 g_k^T H_kk g_k + sigma/6 a^3 ||g_k||^3, each layer
    solved on its own; cross-layer blocks are ignored. `curvature_fn` returns
    one scalar per layer (`value_grad_and_curvature(...,
    granularity="layer")`, a tree like `lrcr.param_groups(params)`); each
    layer's values must depend on that layer's part of the direction only.
  * "variable": one alpha_i per weight from the diagonal model
    m_i(a) = a g_i dF/dw_i + a^2/2 g_i^2 H_ii + sigma/6 |a g_i|^3. In the unit
    step t = a |g_i| this is Table 2's model with a unit baseline step along
    each variable. Consequence: the step alpha_i g_i depends on the base
    optimizer only through the sign of g_i, so after SGD, Adagrad, Adadelta
    or Adam (which keep the gradient's sign) it is the same method.
    `curvature_fn` returns trees shaped like params
    (`value_grad_and_curvature(..., granularity="variable")`, built from the
    exact Hessian diagonal `lrcr.hessian_diagonal`).

  Every block follows the same stable root and non-descent policy: alpha is
  the minimizer of its cubic model over alpha >= 0, so a block whose
  direction does not descend gets 0 unless negative curvature makes a step
  pay. Non-finite slope, curvature or ||g||^2 (a NaN or inf direction gives
  them) give alpha = 0, a zero update for that block and
  `info.finite = False`; NaN never reaches alpha or the update.

  Low precision: for bfloat16 or float16 params the state (alpha, info,
  sigma), the largest-entry search and the solve are at least float32; the
  updates keep the direction's dtype. `curvature_fn` owns its reductions
  (`lrcr.value_grad_and_curvature` accumulates them in float32 at least).

  Differentiable: under `jax.grad` or `jax.jvp`, alpha and the update have
  the implicit-function derivative of eq. 37's root (`lrcr.cubic.solve`);
  the exponents of the power-of-two rescaling are piecewise constant and
  contribute nothing, which is exact wherever they do not jump. What is
  piecewise by design (the no-step policy, `curvature_every`'s reuse, the
  adaptive ratio test and sigma's clipping to [sigma_min, sigma_max]) has
  the derivative of the branch taken; a non-finite block's is 0.

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
    `params`. The state is a `CubicStepState`; `optax.tree.get(state,
    "learning_rate")` reads alpha (a scalar, one per layer, or one per
    weight), and `info` is a `CubicStepInfo` whose `finite` field flags
    non-finite steps.

  Raises:
    ValueError: if sigma is concrete and not a finite scalar > 0, for an
      unknown granularity, or for bad adaptive-sigma or curvature_every
      settings.
    TypeError: at update time, if `curvature_fn`, `params` or (adaptive)
      `value_fn` is missing, if `gradient_direction` is passed (it belongs
      to `lrcr.value_grad_and_curvature`), or if `curvature_fn` breaks its
      contract (the message states it).
  """
  return _transform(sigma, _Settings(
      granularity, adaptive_sigma, eta_successful, eta_very_successful, gamma,
      sigma_min, sigma_max, curvature_every))


def _transform(sigma: Any, settings: _Settings,
               sgd: optax.GradientTransformation | None = None
               ) -> optax.GradientTransformationExtraArgs:
  """`scale_by_cubic_step`, or with `sgd` the pair (sgd, it) of `cubic_sgd`.

  With `sgd` the state is `optax.chain(sgd, scale_by_cubic_step(...))`'s,
  and the direction is c * updates, with c = sgd's update of a unit scalar
  (-learning_rate at this step): where updates are the engine's own
  gradient, the curvature_fn then knows c without a pass over the leaves.
  """
  _check_settings(sigma, settings)

  def init_fn(params: Any) -> Any:
    dtype = _work_dtype(params)
    zeros = lambda: _zeros_for(settings.granularity, params, dtype)
    trues = jax.tree.map(lambda z: jnp.ones(jnp.shape(z), bool), zeros())
    state = CubicStepState(
        learning_rate=zeros(),
        info=CubicStepInfo(zeros(), zeros(), zeros(), zeros(), trues),
        sigma=jnp.asarray(sigma, dtype), accepted=jnp.asarray(True),
        count=jnp.zeros((), jnp.int32))
    return state if sgd is None else (sgd.init(params), state)

  def update_fn(updates: Any, state: Any, params: Any = None, *,
                curvature_fn: Any = None, value_fn: Any = None,
                value: Any = None, **extra_args: Any):
    _check_update_args(settings, params, curvature_fn, value_fn, extra_args)
    if sgd is None:
      return _update(settings, updates, state, params, curvature_fn,
                     value_fn, value)
    sgd_state, state = state
    c, sgd_state = sgd.update(jnp.ones((), _work_dtype(updates)), sgd_state)
    updates, state = _update(settings, updates, state, params, curvature_fn,
                             value_fn, value, c)
    return updates, (sgd_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cubic_kwargs(cubic_kwargs: dict) -> dict:
  """The aliases' `cubic_kwargs`, refusing `gradient_direction`."""
  if "gradient_direction" in cubic_kwargs:
    raise TypeError(_GRADIENT_DIRECTION.format(
        where="the cubic_* aliases or scale_by_cubic_step"))
  return cubic_kwargs


def _with_cubic(base: optax.GradientTransformation, sigma,
                **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  return optax.chain(base, scale_by_cubic_step(sigma,
                                               **_cubic_kwargs(cubic_kwargs)))


def cubic_sgd(sigma: float, learning_rate: optax.ScalarOrSchedule = 1.0,
              **cubic_kwargs) -> optax.GradientTransformationExtraArgs:
  """`optax.sgd` followed by `scale_by_cubic_step` (the paper's Figs. 1-3).

  The learning rate cancels out of the update (see the module docstring); it
  only sets the units of `alpha`. `cubic_kwargs` go to `scale_by_cubic_step`
  (granularity, adaptive_sigma, ...), as for every alias below.

  The same updates and state as `optax.chain(optax.sgd(learning_rate),
  scale_by_cubic_step(sigma, **cubic_kwargs))`, with one saving: where the
  incoming updates are the gradient that `lrcr.value_grad_and_curvature`
  returned (the same arrays, as in its README example), the direction is
  known to be -learning_rate times that gradient, so the curvature_fn needs
  neither the `gradient_direction` promise nor a pass over the direction's
  leaves for its multiple of the gradient.
  """
  cubic = inspect.signature(scale_by_cubic_step).bind(
      sigma, **_cubic_kwargs(cubic_kwargs))      # TypeError names a wrong one
  cubic.apply_defaults()
  settings = _Settings(**{k: v for k, v in cubic.arguments.items()
                          if k != "sigma"})
  return _transform(sigma, settings, optax.sgd(learning_rate))


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
