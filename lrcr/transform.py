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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import cubic
from lrcr.directional import Directional

Array = jax.Array


class CubicStepInfo(NamedTuple):
  """Diagnostics of the last CR step, shaped like `learning_rate`."""
  slope: Any
  curvature: Any
  sqnorm: Any
  predicted_decrease: Any


class CubicStepState(NamedTuple):
  """State of `scale_by_cubic_step`: the last alpha, diagnostics and sigma."""
  learning_rate: Any
  info: CubicStepInfo
  sigma: Array
  accepted: Array
  count: Array


GRANULARITIES = ("global", "layer", "variable")

_MISSING = ("scale_by_cubic_step.update needs the keyword-only extra argument "
            "`curvature_fn`, a callable (params, direction) -> "
            "lrcr.Directional. Build it for the current batch with "
            "lrcr.lowrank_curvature_fn(model, x, labels) for an lrcr.MLP, or "
            "lrcr.autodiff_curvature_fn(loss_fn, *args) for any model, and "
            "call tx.update(grads, state, params, curvature_fn=...).")


def layer_prefix(tree: Any, fill: Any = 0.0) -> Any:
  """The tree with every innermost dict (one layer's arrays) replaced by `fill`.

  For flax params {'params': {'hidden_0': {'kernel', 'bias'}, ...}} this is
  {'params': {'hidden_0': fill, ...}}: a tree prefix of params with one leaf
  per layer. A tree that is a single array is one layer.
  """
  if isinstance(tree, Mapping):
    if tree and all(not isinstance(v, (Mapping, list, tuple))
                    for v in tree.values()):
      return fill
    return {k: layer_prefix(v, fill) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(layer_prefix(v, fill) for v in tree)
  return fill


def _zeros_for(granularity: str, params: Any, dtype) -> Any:
  if granularity == "global":
    return jnp.zeros((), dtype)
  if granularity == "layer":
    return jax.tree.map(lambda _: jnp.zeros((), dtype), layer_prefix(params))
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


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

  Granularity (section 4's future work, appendix B Table 2):

  * "global": one alpha per step from the exact s, g^T H g and ||g||^2: the
    paper's method. `curvature_fn` returns scalars.
  * "layer": one alpha_k per layer from the block-diagonal model
    m_k(a) = a s_k + a^2/2 g_k^T H_kk g_k + sigma/6 a^3 ||g_k||^3, each layer
    solved on its own; cross-layer blocks are ignored. `curvature_fn` returns
    one scalar per layer (`lowrank_curvature_fn(..., granularity="layer")`,
    a tree like `layer_prefix(params)`).
  * "variable": one alpha_i per weight from the diagonal model
    m_i(a) = a g_i dF/dw_i + a^2/2 g_i^2 H_ii + sigma/6 |a g_i|^3. In the unit
    step t = a |g_i| this is Table 2's model with a unit baseline step along
    each variable. Consequence: the step alpha_i g_i depends on the base
    optimizer only through the sign of g_i, so after SGD, Adagrad, Adadelta
    or Adam (which keep the gradient's sign) it is the same method; in float32
    a weight with |g_i| below about 1e-19 (g_i^2 underflows) gets no step. `curvature_fn` returns trees shaped like params
    (`lowrank_curvature_fn(..., granularity="variable")`, built from the
    exact Hessian diagonal `lrcr.hessian_diagonal`).

  Every block follows the same stable root and non-descent policy: alpha is
  the minimizer of its cubic model over alpha >= 0, so a block whose
  direction does not descend gets 0 unless negative curvature makes a step
  pay. Non-finite inputs give 0; nothing returns NaN.

  Adaptive sigma (Kohler & Lucchi 2017, Algorithm 1), off by default: with
  `value_fn` (params -> batch loss F) passed as an extra argument, each step
  evaluates F at the trial point (one extra forward pass) and
  rho = (F(x) - F(x + alpha g)) / predicted decrease. rho >= eta_successful
  accepts the step, otherwise it is rejected (zero update). sigma is divided
  by gamma when rho > eta_very_successful, kept when successful, and
  multiplied by gamma when rejected, within [sigma_min, sigma_max]. Kohler &
  Lucchi write sigma/3 in front of the cubic term; lrcr keeps this paper's
  sigma/6 throughout, so their sigma_KL equals sigma / 2 here. Their update
  rule is scale-free (multiplicative), so only the initial value needs
  converting. `state.sigma` records the current sigma.

  Args:
    sigma: the cubic weight, > 0, in the paper's sigma/6 convention (eq. 8);
      the initial value when `adaptive_sigma`.
    granularity: "global", "layer" or "variable".
    adaptive_sigma: update sigma from the actual/predicted decrease ratio.
    eta_successful: rho threshold to accept a step (K&L: 0.1).
    eta_very_successful: rho threshold to decrease sigma (K&L: 0.9).
    gamma: factor of the sigma updates (K&L: 2).
    sigma_min: lower bound of adaptive sigma.
    sigma_max: upper bound of adaptive sigma.
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
    accepted)`; `optax.tree.get(state, "learning_rate")` reads alpha (a
    scalar, one per layer, or one per weight).

  Raises:
    ValueError: if sigma is a Python number <= 0 or not finite, or for an
      unknown granularity.
    TypeError: at update time, if `curvature_fn`, `params` or (adaptive)
      `value_fn` is missing, or `curvature_fn` returns the wrong structure
      for the granularity.
  """
  if isinstance(sigma, (int, float)) and not (0 < sigma < float("inf")):
    raise ValueError(
        f"scale_by_cubic_step(sigma={sigma!r}): sigma must be a finite number "
        f"> 0 (the paper uses 100 and 1000).")
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

  def init_fn(params: Any) -> CubicStepState:
    dtype = _float_dtype(params)
    zeros = lambda: _zeros_for(granularity, params, dtype)
    return CubicStepState(
        learning_rate=zeros(),
        info=CubicStepInfo(zeros(), zeros(), zeros(), zeros()),
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
    expected = jax.tree.structure(state.learning_rate)

    def fresh(_):
      d = curvature_fn(params, updates)
      if not isinstance(d, Directional):
        d = Directional(*d)
      if jax.tree.structure(d.slope) != expected:
        raise TypeError(
            f"scale_by_cubic_step(granularity={granularity!r}) got a "
            f"curvature_fn whose slope has structure "
            f"{jax.tree.structure(d.slope)}, expected {expected}. Build it "
            f"with lrcr.lowrank_curvature_fn(model, x, labels, "
            f"granularity={granularity!r}).")
      steps = jax.tree.map(
          lambda s, h, n2: cubic.cubic_step(s, h, n2, sig), d.slope,
          d.curvature, d.sqnorm)
      is_step = lambda x: isinstance(x, cubic.CubicStep)
      alpha = jax.tree.map(lambda st: st.alpha.astype(dtype), steps,
                           is_leaf=is_step)
      decrease = jax.tree.map(
          lambda st: st.predicted_decrease.astype(dtype), steps,
          is_leaf=is_step)
      cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), t)
      return alpha, CubicStepInfo(cast(d.slope), cast(d.curvature),
                                  cast(d.sqnorm), decrease)

    if curvature_every == 1:
      alpha, info = fresh(None)
    else:
      alpha, info = jax.lax.cond(
          state.count % curvature_every == 0, fresh,
          lambda _: (state.learning_rate, state.info), None)
    decrease = info.predicted_decrease
    new_updates = jax.tree.map(
        lambda a, sub: jax.tree.map(lambda u: (a * u).astype(u.dtype), sub),
        alpha, updates)
    accepted = jnp.asarray(True)
    if adaptive_sigma:
      f0 = value_fn(params) if value is None else value
      trial = optax.apply_updates(params, new_updates)
      predicted = sum(jnp.sum(x) for x in jax.tree.leaves(decrease))
      actual = f0 - value_fn(trial)
      rho = actual / jnp.where(predicted > 0, predicted, 1.0)
      no_step = predicted <= 0           # alpha = 0: nothing to judge
      accepted = no_step | (jnp.isfinite(rho) & (rho >= eta_successful))
      very = ~no_step & jnp.isfinite(rho) & (rho > eta_very_successful)
      sig = jnp.where(very, sig / gamma, jnp.where(accepted, sig, sig * gamma))
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
