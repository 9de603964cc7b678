"""Autodiff references and fallbacks: the same numbers as the engine, slower.

`autodiff_curvature_fn` (forward-over-forward, `jax.jvp` of `jax.jvp`) runs on
any loss that JAX can differentiate forward twice; `reverse_curvature_fn`
(reverse-over-reverse autodiff of the gradient that `jax.grad` returns) also
runs where a `jax.custom_vjp` has no forward mode, and is what
`lrcr.value_grad_and_curvature` uses for such losses. Neither has the
engine's low-rank speed-up; both are the independent references its tests
compare with, besides dense Hessians.

The small helpers at the top (direction checks, float32 sums per group) are
shared with `lrcr.curvature`, which imports this module; it imports no
other lrcr module but `engine`, `cubic` and `types`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lrcr import cubic
from lrcr import engine
from lrcr.types import (GRANULARITIES, CurvatureFn, Directional,
                        group_index)

Array = jax.Array


def check_granularity(granularity: str) -> None:
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}: expected one of "
                     f"{GRANULARITIES}.")


def flat_direction(direction: Any, treedef: Any, flat_params: Sequence[Array]):
  leaves, tree = jax.tree.flatten(direction)
  if tree != treedef:
    raise ValueError(
        f"the direction's tree structure {tree} differs from params' "
        f"{treedef}; pass updates shaped like params.")
  for d, p in zip(leaves, flat_params):
    if jnp.shape(d) != jnp.shape(p):
      raise ValueError(f"a direction leaf has shape {jnp.shape(d)} where its "
                       f"parameter has {jnp.shape(p)}.")
  return leaves


def sqnorm(x: Array) -> Array:
  """||x||^2 (|x|^2 summed for complex x), accumulated in float32 at least."""
  if jnp.iscomplexobj(x):
    return engine.pair(jnp.conj(x), x)
  return jnp.sum(jnp.square(x.astype(engine.accumulation_dtype(x.dtype))))


def per_group(params: Any, leaf_values: Sequence[Array]) -> Any:
  """Sums per-leaf scalars into one per param group (`param_groups`)."""
  index, gtree = group_index(params)
  return jax.tree.unflatten(gtree, [
      sum((v for i, v in zip(index, leaf_values) if i == j),
          jnp.zeros((), leaf_values[0].dtype))
      for j in range(gtree.num_leaves)])


def loss_only(loss_fn: Callable[..., Any], has_aux: bool):
  return (lambda p, *b: loss_fn(p, *b)[0]) if has_aux else loss_fn


def hvp_fn(loss_fn: Callable[..., Any], params: Any, batch: Sequence[Any],
            names: str) -> Callable[[Any], Any]:
  """d -> d/dt grad F(params + t d), the gradient being jax.grad's.

  Reverse-over-reverse (the reference: it runs where the rule's fwd calls a
  custom_vjp, as in `jax.experimental.ode.odeint`, which has no forward
  mode), else forward-over-reverse (a rule whose bwd holds a `while_loop`,
  which has no reverse mode); chosen once, when the call is traced.

  Raises:
    UnsupportedProgramError: naming the custom_vjp functions, where neither
      runs.
  """
  grad_fn = jax.grad(lambda p: loss_fn(p, *batch))
  forward = lambda d: jax.jvp(grad_fn, (params,), (d,))[1]

  def reverse(d):
    return jax.grad(lambda p: sum(engine.pair(a, b) for a, b in zip(
        jax.tree.leaves(d), jax.tree.leaves(grad_fn(p)))))(params)

  errors = []
  for fn in (reverse, forward):
    try:
      jax.eval_shape(fn, params)
      return fn
    except Exception as e:  # pylint: disable=broad-except  # JAX refused
      errors.append(f"{type(e).__name__}: {str(e)[:200]}")
  raise engine.UnsupportedProgramError(
      f"the loss holds the custom_vjp function(s) {names}; the derivative of "
      f"its custom gradient needs JAX to differentiate the rule's fwd and "
      f"bwd, and neither forward-over-reverse nor reverse-over-reverse "
      f"autodiff runs on them ({'; '.join(errors)}). No exact fallback "
      f"exists in lrcr for this program: differentiate the rule's functions "
      f"by hand, or use a plain first-order optimizer.")


def directional_fn(hvp: Callable[[Any], Any], grads: Any, granularity: str):
  """`fn(params, direction, log2_scale=None)` from a Hessian-vector product.

  For granularity "global" or "layer" (vectorized over the groups).
  """
  flat_g, treedef = jax.tree.flatten(grads)

  def directional(flat_d):
    hd = jax.tree.leaves(hvp(jax.tree.unflatten(treedef, flat_d)))
    return ([engine.pair(d, g) for d, g in zip(flat_d, flat_g)],
            [engine.pair(d, h) for d, h in zip(flat_d, hd)],
            [sqnorm(d) for d in flat_d])

  def curvature_fn(params: Any, direction: Any,
                   log2_scale: Any = None) -> Directional:
    flat_d = flat_direction(direction, treedef, flat_g)
    if log2_scale is not None:
      log2 = jnp.asarray(log2_scale, jnp.int32)
      flat_d = [cubic.times_pow2(d, -log2) for d in flat_d]
    if granularity == "global":
      return Directional(*(sum(v) for v in directional(flat_d)))
    index, gtree = group_index(params)

    def one(j):
      masked = [jnp.where(i == j, d, jnp.zeros_like(d))
                for i, d in zip(index, flat_d)]
      return [sum(v) for v in directional(masked)]

    out = jax.vmap(one)(jnp.arange(gtree.num_leaves))
    slope, _, sqnorm = directional(flat_d)
    return Directional(per_group(params, slope),
                       jax.tree.unflatten(gtree, list(out[1])),
                       per_group(params, sqnorm))

  return curvature_fn


def reverse_curvature_fn(loss_fn: Callable[..., Array], *batch: Any,
                         granularity: str = "global") -> CurvatureFn:
  """Builds `curvature_fn(params, direction)` on the gradient jax.grad returns.

  Slope g . grad F and curvature g^T d/dt grad F(params + t g), with grad F
  exactly what `jax.grad(loss_fn)` returns (the user's rules of custom_vjp
  functions included), by reverse-over-reverse autodiff (forward-over-
  reverse where reverse-over-reverse does not run). The reference and the
  fallback for losses with a `jax.custom_vjp` (straight-through estimators,
  gradient clipping, `jax.experimental.ode.odeint`), on which
  forward-over-forward (`autodiff_curvature_fn`) cannot run. Costs about
  two gradients per call.

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`.
    *batch: the other arguments of loss_fn.
    granularity: "global" or "layer".

  Returns:
    `curvature_fn(params, direction) -> Directional`.

  Raises:
    ValueError: for granularity "variable" (one product per weight).
  """
  check_granularity(granularity)
  if granularity == "variable":
    raise ValueError(
        "reverse_curvature_fn has no 'variable' granularity: the exact "
        "Hessian diagonal would take one Hessian-vector product per weight. "
        "Use granularity 'layer' or 'global'.")

  def curvature_fn(params: Any, direction: Any) -> Directional:
    grads = jax.grad(loss_fn)(params, *batch)
    hvp = hvp_fn(loss_fn, params, batch, "in loss_fn")
    return directional_fn(hvp, grads, granularity)(params, direction)

  return curvature_fn


# ---------------------------------------------------------------------------
# Forward-over-forward autodiff: the reference and the fallback.
# ---------------------------------------------------------------------------


def autodiff_directional(loss_fn: Callable[..., Array], params: Any,
                         *args: Any) -> Directional:
  """Slope, curvature and squared norm along g by forward-over-forward autodiff.

  `autodiff_directional(loss_fn, params, *batch, direction)`: the arguments
  of `lrcr.directional`, the direction g last. The inner `jax.jvp` of
  t -> loss_fn(params + t g, *batch) gives the slope, the outer one its
  derivative g^T H g. Works for any differentiable loss.

  Raises:
    TypeError: if no direction is given.
  """
  if not args:
    raise TypeError("autodiff_directional(loss_fn, params, *batch, "
                    "direction) needs a direction, its last argument.")
  *batch, direction = args

  def slope_at(p):
    return jax.jvp(lambda q: loss_fn(q, *batch), (p,), (direction,))[1]

  slope, curvature = jax.jvp(slope_at, (params,), (direction,))
  return Directional(slope, curvature, optax.tree.norm(direction, squared=True))


def autodiff_curvature_fn(loss_fn: Callable[..., Array], *args: Any,
                          granularity: str = "global") -> CurvatureFn:
  """Builds `curvature_fn(params, direction)` by forward-over-forward autodiff.

  The fallback for a program the engine refuses. With granularity "layer" it
  runs one forward-over-forward pass per param group (vectorized). It has no
  "variable" granularity: the exact diagonal would take one Hessian-vector
  product per weight.
  """
  check_granularity(granularity)
  if granularity == "variable":
    raise ValueError(
        "autodiff_curvature_fn has no 'variable' granularity: the exact "
        "Hessian diagonal would take one Hessian-vector product per weight. "
        "Use lrcr.lowrank_curvature_fn(loss_fn, *batch, "
        "granularity='variable').")

  def curvature_fn(params: Any, direction: Any) -> Directional:
    if granularity == "global":
      return autodiff_directional(loss_fn, params, *args, direction)
    index, gtree = group_index(direction)
    leaves, treedef = jax.tree.flatten(direction)

    def one(j):
      masked = [jnp.where(i == j, d, jnp.zeros_like(d))
                for i, d in zip(index, leaves)]
      return autodiff_directional(loss_fn, params, *args,
                                  jax.tree.unflatten(treedef, masked))

    out = jax.vmap(one)(jnp.arange(gtree.num_leaves))
    return Directional(*(jax.tree.unflatten(gtree, list(f)) for f in out))

  return curvature_fn
