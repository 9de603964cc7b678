"""Slope, curvature and low-rank factors of any loss: lrcr's public engine API.

Given `loss_fn(params, *batch) -> F` (any JAX program: `model.apply` of a flax
linen model, a functional nnx model, a hand-written function) and a direction
g shaped like params, the cubic step of eq. 37 needs

    slope     = g . grad F          # eq. 38
    curvature = g^T H g             # eq. 39 (corrected), H the exact Hessian
    sqnorm    = ||g||^2             # eq. 40, squared

`value_grad_and_curvature` computes the loss and the gradient in one forward
and backward pass and returns a `curvature_fn` that contracts any direction
against the second-order adjoint of that same pass: the fast path, exact to
float rounding, for any model. `lrcr.engine` reads the program and runs the
pass; each evaluation is one call of `lrcr.sweep.curvature`.
`lowrank_curvature_fn` is the same engine behind the signature of
`autodiff_curvature_fn`.

Granularity (section 4's future work; appendix B's Table 2):

* "global": scalars, the paper's method.
* "layer": one slope and one diagonal block g_k^T H_kk g_k per param group
  (the innermost dicts of params, i.e. one flax module each), exact, for any
  model: the tangent sweep runs once per group, vectorized with `jax.vmap`.
* "variable": the exact Hessian diagonal (`hessian_diagonal`), per weight.

The Gram form (section 2). When the direction is a
multiple of the gradient (plain SGD), each weight's direction is itself a sum
of per-sample outer products, phi = c V^T Ybar with V the operand of the weight
and Ybar the adjoint of its output. Then V phi = c (V V^T) Ybar and
Ybar . (dV phi) = c dV . ((Ybar Ybar^T) V) cost O(N^2 d) through N x N
Gram matrices instead of O(N d^2): `gradient_direction=True` runs the sweep
along grad F itself, in this form for every weight operation where that is
cheaper (`lrcr.sweep`), and scales its results by
c = g . grad F / ||grad F||^2 (one reduction over every leaf).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lrcr import cubic
from lrcr import engine
from lrcr import reference
from lrcr import samples
from lrcr import sweep
from lrcr.losses import cross_entropy_loss
from lrcr.types import (CurvatureFn, Directional, ScalableCurvatureFn,
                        group_index, same_arrays)

Array = jax.Array


def _check_labels(model_or_loss: Any, batch: Sequence[Any]) -> None:
  """Concrete labels of a classifier module must lie in [0, num_classes).

  `cross_entropy_loss` checks them itself when it sees their values; the
  engine traces the loss with the batch as arguments, so the check is made
  here, where the values are still known.
  """
  num = getattr(model_or_loss, "num_classes", None)
  if not isinstance(model_or_loss, nn.Module) or num is None or len(batch) < 2:
    return
  labels = batch[1]
  if isinstance(labels, jax.core.Tracer):
    return                 # under jit: a bad label makes F (and all else) NaN
  cross_entropy_loss(jnp.zeros(jnp.shape(labels) + (num,)), labels)


def as_loss_fn(model_or_loss: Any, *batch: Any) -> Callable[..., Array]:
  """A flax module becomes its softmax cross-entropy loss (the paper's F).

  With the batch given, a classifier module's concrete labels are checked
  here (the engine traces the loss with the batch as arguments).
  """
  _check_labels(model_or_loss, batch)
  if isinstance(model_or_loss, nn.Module):
    model = model_or_loss

    def loss_fn(params, x, labels):
      # flax variables {"params": ...}, or the inner params dict itself.
      variables = (params if isinstance(params, Mapping) and "params" in params
                   else {"params": params})
      return cross_entropy_loss(model.apply(variables, x), labels)

    return loss_fn
  if not callable(model_or_loss):
    raise TypeError(
        f"expected loss_fn(params, *batch) -> scalar, or a flax module; got "
        f"{type(model_or_loss).__name__}.")
  return model_or_loss


# ---------------------------------------------------------------------------
# The fast path.
# ---------------------------------------------------------------------------

def _gradient_pass(traced: engine.Traced, params: Any,
                   diagonal: bool = False) -> engine.Pass:
  """The forward and backward pass of the engine on a traced loss.

  With `diagonal`, also the exact Hessian diagonal (`hessian_diagonal`).
  """
  flat_p = jax.tree.leaves(params)
  eps = engine.zero_offsets(traced.program)
  if not diagonal:
    loss, vjp_fn, (res, aux) = jax.vjp(traced.forward, flat_p, eps,
                                       has_aux=True)
    flat_g, ybar = vjp_fn(jnp.ones_like(loss))
    return engine.Pass(traced, flat_p, loss, list(flat_g), res, ybar, aux=aux)
  _refuse_custom_vjp(traced, "the exact Hessian diagonal (granularity "
                     "'variable')", "granularity 'layer' or 'global'")
  samples.check_separable(
      traced, "the exact Hessian diagonal (granularity 'variable')",
      "Use granularity 'layer' or 'global', exact for any loss.")
  names = [n for n, p in zip(_path_names(params), flat_p)
           if jnp.iscomplexobj(p)]
  if names:
    raise engine.UnsupportedProgramError(
        f"the exact Hessian diagonal covers real parameters; {names[0]} is "
        f"complex. Use granularity 'layer' or 'global'.")
  roles = _diagonal_roles(traced, params)
  head = traced.find_head()
  (loss, logits), vjp_fn, (res, aux) = jax.vjp(
      lambda p, e: traced.forward(p, e, head), flat_p, eps, has_aux=True)
  flat_g, ybar = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(logits)))
  ps = engine.Pass(traced, flat_p, loss, list(flat_g), res, ybar, aux=aux)
  # Per sample b, the Hessian of F in the logits row P_b (C x C), by
  # forward-over-reverse on the head with one unit tangent per class on
  # every row at once (the rows are separate samples), then its
  # eigendecomposition H_b = sum_r lam_br u_br u_br^T.
  batch_size = logits.shape[0]
  num = logits[0].size
  head_grad = jax.grad(traced.head_fn(res, head))
  unit = lambda c: jnp.broadcast_to(
      jax.nn.one_hot(c, num, dtype=logits.dtype), (batch_size, num)
  ).reshape(logits.shape)
  cols = jax.vmap(lambda c: jax.jvp(head_grad, (logits,), (unit(c),))[1])(
      jnp.arange(num)).reshape(num, batch_size, num)           # [C_in, B, C]
  hess = jnp.moveaxis(cols, 0, -1)                             # [B, C, C]
  lam, vecs = jnp.linalg.eigh((hess + jnp.swapaxes(hess, 1, 2)) / 2)
  # One backward pass per r from the pseudo-outputs s_br = u_br . P_b
  # (vectorized over r) gives each weight's adjoints for all of them.
  cot = jnp.moveaxis(vecs, -1, 0).reshape((num,) + logits.shape)
  _, ybar_r = jax.vmap(lambda u: vjp_fn((jnp.zeros_like(loss), u)))(cot)
  diag = [_leaf_diagonal(ps, role, ybar_r, lam, jnp.shape(p))
          for role, p in zip(roles, flat_p)]
  return ps._replace(diagonal=diag)


def value_grad_and_curvature(
    loss_fn: Callable[..., Array], params: Any, *batch: Any,
    granularity: str = "global", gradient_direction: bool = False,
    stack_layers: bool = False, has_aux: bool = False,
) -> tuple[Any, Any, CurvatureFn]:
  """The loss, its gradient, and the exact curvature along any direction.

  One forward and one backward pass (what `jax.value_and_grad` costs) give
  the loss, the gradient and every adjoint the curvature needs; the returned
  `curvature_fn(params, direction)` then costs one tangent sweep. Use it
  inside your jitted step:

      loss, grads, curvature_fn = lrcr.value_grad_and_curvature(
          loss_fn, params, x, y)
      updates, state = tx.update(grads, state, params,
                                 curvature_fn=curvature_fn)

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`, any JAX program.
    params: the point (a pytree of float arrays).
    *batch: the other arguments of loss_fn (a batch, labels, a dropout key).
    granularity: "global", "layer" or "variable" (see the module docstring),
      matching `scale_by_cubic_step(granularity=...)`.
    gradient_direction: promise that every direction passed to
      `curvature_fn` is a scalar multiple c grad F of the gradient (plain
      SGD, also with a learning-rate schedule). The sweep then runs along
      grad F, the weights' products go through N x N Gram matrices where
      that is cheaper, and
      `curvature_fn.autoscaled` lets the transform skip its search for the
      direction's largest entry; the numbers are the same up to float
      rounding. The promise is not checked: for another direction the
      slope stays exact, while the curvature and the squared norm are
      those of its projection on grad F. Without the promise, a direction
      that is the returned gradient itself (the same arrays: what
      `lrcr.cubic_sgd` passes) takes the same sweep along grad F. The
      sweep along grad F is not rescaled: where ||grad F||^2 is outside
      [2^-79, 2^80] (float32; wider in float64) the curvature_fn returns
      NaN, which the transform flags as a non-finite step and skips (the
      sweep along another, rescaled direction has no such limit). Not
      used (a plain sweep runs) for complex params, a custom_vjp in the
      loss, or a loss or gradient that differs between shard_map devices.
      Used by granularity "global" (the others ignore it).
    stack_layers: evaluate the sweep's products that do not depend on its
      sequential chain (V phi before it, dV phi after it) as one batched
      matmul for every group of equally shaped weight operations, instead
      of one small matmul per layer. By default (False) a group is stacked
      where that launches fewer kernels: from 3 operations in the Gram
      form (the paper's eleven 128 x 128 hidden layers are one group), not
      in the dense one. Stacking copies the stacked operands once.
      With `gradient_direction` and granularity "global", True also
      computes the gradients of each stacked Gram-form group as one batched
      matmul of those stacks, instead of one per layer in the backward pass:
      fewer kernels, but the group's gradients are then all held at once
      (more temporary memory), and on CPUs the batched matmul is not
      faster. The numbers are the same up to float rounding. It applies to
      granularity "global" and "layer" (not to "variable", which reads the
      Hessian diagonal, not a sweep).
    has_aux: as in `jax.value_and_grad`: loss_fn returns (loss, aux), aux
      any pytree (a BatchNorm's new batch statistics); the curvature is the
      loss's alone.

  Returns:
    (loss, grads, curvature_fn), or ((loss, aux), grads, curvature_fn) with
    has_aux. grads are `jax.grad`'s (custom_vjp rules included).
    `curvature_fn(params, direction)` returns
    `lrcr.Directional(slope, curvature, sqnorm)`, always at the params given
    here (its own `params` argument is accepted for the optax contract and
    not read). For a loss with a custom_vjp the curvature is that of the
    custom gradient (see `lrcr.engine`), by autodiff.

  Raises:
    lrcr.engine.UnsupportedProgramError: for an operation JAX cannot
      differentiate twice (`autodiff_curvature_fn` is then no help either),
      a collective outside `shard_map(check_vma=True)`, a custom_vjp whose
      gradient JAX cannot differentiate, or (granularity "variable") a loss
      that is not a sum of per-sample terms; the message names it.
    ValueError: if loss_fn does not return a real scalar (or a (loss, aux)
      pair with has_aux), for empty params or an empty batch, or for an
      unknown granularity.
    TypeError: for a params leaf that is not a float array.
  """
  reference.check_granularity(granularity)
  traced = engine.trace(loss_fn, params, batch, has_aux)
  if traced.custom_vjps:
    return _custom_vjp_path(loss_fn, params, batch, traced, granularity,
                            has_aux)
  ps = _gradient_pass(traced, params, diagonal=granularity == "variable")
  if (stack_layers and granularity == "global" and gradient_direction
      and _can_sweep_along_grad(ps)):
    # The sweep along grad F stacks V and Ybar of equally shaped Gram-form
    # layers: their gradients from those stacks in one batched matmul.
    ps = ps._replace(flat_grads=sweep.stacked_gradients(
        ps, sweep.gram_operations(ps)))
  grads = jax.tree.unflatten(traced.params_treedef, ps.flat_grads)
  value = (ps.loss, ps.aux) if has_aux else ps.loss
  if granularity == "layer":
    return value, grads, _layer_fn(ps, params, stack_layers)
  if granularity == "variable":
    return value, grads, _variable_fn(ps)
  # The transform may pass the exponent of an exact power-of-two rescaling
  # instead of rescaling the direction itself (`scale_by_cubic_step`).
  return value, grads, _global_fn(ps, gradient_direction, stack_layers)


def _sweep_along_grad(ps: engine.Pass, stack_layers: bool,
                      gram_ids: frozenset) -> tuple[Array, Array, Array]:
  """(||grad F||^2, grad F^T H grad F, whether ||grad F||^2 is in range).

  The sweep along grad F is not rescaled: where ||grad F||^2 is outside
  [2^(5 minexp / 8), 2^(5 maxexp / 8)] of its dtype (2^-79 to 2^80 in
  float32), its terms may underflow or overflow, and the step is flagged
  (`_flagged`).
  """
  gg, curv = sweep.curvature(ps, ps.flat_grads, 1.0, None, stack_layers,
                             gram_ids)
  fi = jnp.finfo(gg.dtype)
  in_range = ((gg >= 2.0 ** (5 * fi.minexp // 8))
              & (gg <= 2.0 ** (5 * fi.maxexp // 8)))
  return gg, curv, in_range


def _flagged(in_range: Array, gg: Array, dot: Array, c: Array) -> Array:
  """c, or NaN (so `info.finite` is False: no step) where ||grad F||^2 is
  out of range; a zero gradient (gg = 0 and g . grad F = 0) keeps c = 0."""
  return jnp.where(in_range | ((gg == 0) & (dot == 0)), c, jnp.nan)


def _can_sweep_along_grad(ps: engine.Pass) -> bool:
  """Whether ||grad F||^2 can be read off the loss's tangent along grad F:
  not for complex params, nor where the loss or the gradient differs
  between shard_map shards (the tangent and g . grad F would then sum over
  other shards)."""
  return not (
      any(jnp.iscomplexobj(p) for p in ps.flat_params) or ps.traced.keep
      or any(engine.varying_axes(g) for g in ps.flat_grads))


def _global_fn(ps: engine.Pass, gradient_direction: bool,
               stack_layers: bool) -> ScalableCurvatureFn:
  """The `ScalableCurvatureFn` of granularity "global"."""
  treedef = ps.traced.params_treedef
  can_along = _can_sweep_along_grad(ps)
  along_grad = gradient_direction and can_along

  # direction = c grad F: the sweep runs along grad F itself, so that its
  # slope is ||grad F||^2 (eq. 38 along grad F) and needs no reduction over
  # the leaves, in the Gram form where some weight operation gains by it.
  # With c = g . grad F / ||grad F||^2, slope = c ||grad F||^2 = g . grad F
  # (eq. 38), curvature = c^2 grad F^T H grad F (eq. 39) and ||g||^2
  # = c^2 ||grad F||^2 (eq. 40).
  def along_grad_sweep() -> tuple[Array, Array, Array]:
    return _sweep_along_grad(ps, stack_layers, sweep.gram_operations(ps))

  def fn(params_unused: Any, direction: Any,
         log2_scale: Any = None) -> Directional:
    del params_unused
    flat_d = reference.flat_direction(direction, treedef, ps.flat_params)
    log2 = None if log2_scale is None else jnp.asarray(log2_scale, jnp.int32)
    unit = sweep.unit(log2)
    if along_grad:
      gg, curv, in_range = along_grad_sweep()
      dg = sweep.inner(flat_d, ps.flat_grads, unit)     # 2^-log2 included
      c = _flagged(in_range, gg, dg, dg / jnp.where(gg > 0, gg, 1.0))
      return Directional(dg, c * c * curv, c * dg)
    slope, curv = sweep.curvature(ps, flat_d, None, log2, stack_layers)
    # One reduction per leaf: concatenating the leaves into fewer blocks
    # saves kernels but writes a copy of the whole direction.
    sqnorm = sum(reference.sqnorm(unit(d)) for d in flat_d)
    return Directional(slope, curv, sqnorm)

  def autoscaled(params_unused: Any, direction: Any, scale: Any = None
                 ) -> tuple[Directional, Array]:
    """(the Directional of scale g 2^-e, e), e from ||grad F|| and c alone.

    With u = grad F 2^-k, ||u|| near 1, and c = m 2^ec, |m| in [0.5, 1):
    scale g = c grad F = m 2^(ec + k) u, so scale g 2^-e = m u for e = ec
    + k, found without a search for g's largest entry. Where g is grad F
    itself (the same arrays), c = scale with no pass over the leaves (a
    gradient whose squares all flush to zero then counts as a zero one: no
    step). Otherwise c is summed as scale g . (grad F 2^-2k) / ||u||^2,
    whose products are of the size of c (the base learning rate), whatever
    the size of grad F.
    """
    del params_unused
    flat_d = reference.flat_direction(direction, treedef, ps.flat_params)
    gg, curv, in_range = along_grad_sweep()
    scale = jnp.ones_like(gg) if scale is None else jnp.asarray(scale,
                                                                gg.dtype)
    # 2^-2k is one normal float (one factor per entry): |k| <= 63 in float32.
    kmax = jnp.finfo(gg.dtype).maxexp // 2 - 1
    # k = exponent(||grad F||) = ceil(exponent(gg) / 2), without a sqrt.
    k = jnp.clip((cubic.exponent(gg) + 1) // 2, -kmax, kmax)
    uu = cubic.times_pow2(gg, -2 * k)                         # ||u||^2
    if same_arrays(flat_d, ps.flat_grads):          # g is grad F itself
      c = _flagged(in_range, gg, gg, scale)
    else:
      # gg = 0: a zero gradient, or one whose squares flushed to zero;
      # 2^100 lifts the products of the latter, so that c != 0 flags it.
      inv = jnp.where(gg == 0, 2.0 ** 100,
                      cubic.times_pow2(jnp.ones_like(gg), -2 * k))
      c = sweep.inner(ps.flat_grads, flat_d, lambda x: x * inv)
      c = scale * c / jnp.where(uu > 0, uu, 1.0)
      c = _flagged(in_range, gg, c, c)
    ec = cubic.exponent(c)
    m = cubic.times_pow2(c, -ec)
    # Eqs. 38-40 along scale g 2^-e = m u: slope m ||grad F||^2 2^-k,
    # curvature m^2 grad F^T H grad F 2^-2k, squared norm m^2 ||u||^2.
    return Directional(m * cubic.times_pow2(gg, -k),
                       m * m * cubic.times_pow2(curv, -2 * k),
                       m * m * uu), ec + k

  return ScalableCurvatureFn(fn, autoscaled if can_along else None,
                             gradient_direction=along_grad,
                             gradient=tuple(ps.flat_grads))


def _layer_fn(ps: engine.Pass, params: Any, stack_layers: bool) -> CurvatureFn:
  """`curvature_fn` of granularity "layer": one g_k^T H_kk g_k per group."""
  treedef = ps.traced.params_treedef

  def curvature_fn(params_unused: Any, direction: Any) -> Directional:
    del params_unused
    flat_d = reference.flat_direction(direction, treedef, ps.flat_params)
    index, gtree = group_index(params)

    def masked(j):
      return [jnp.where(i == j, d, jnp.zeros_like(d))
              for i, d in zip(index, flat_d)]

    curv = jax.vmap(lambda j: sweep.curvature(ps, masked(j),
                                              stack=stack_layers)[1])(
                                                  jnp.arange(gtree.num_leaves))
    return Directional(
        reference.per_group(params, [engine.pair(d, g)
                            for d, g in zip(flat_d, ps.flat_grads)]),
        jax.tree.unflatten(gtree, list(curv)),
        reference.per_group(params, [reference.sqnorm(d) for d in flat_d]))

  return curvature_fn


def _variable_fn(ps: engine.Pass) -> CurvatureFn:
  """`curvature_fn` of granularity "variable": the exact diagonal's."""
  treedef = ps.traced.params_treedef
  unf = lambda leaves: jax.tree.unflatten(treedef, leaves)

  def curvature_fn(params_unused: Any, direction: Any) -> Directional:
    del params_unused
    flat_d = reference.flat_direction(direction, treedef, ps.flat_params)
    return Directional(unf([d * g for d, g in zip(flat_d, ps.flat_grads)]),
                       unf([d * d * h for d, h in zip(flat_d, ps.diagonal)]),
                       unf([d * d for d in flat_d]))

  return curvature_fn


# ---------------------------------------------------------------------------
# custom_vjp: the derivative of the gradient that jax.grad returns.
# ---------------------------------------------------------------------------

def _refuse_custom_vjp(traced: engine.Traced, what: str, fallback: str):
  """Raises for a quantity read from the primal program of a custom_vjp."""
  if traced.custom_vjps:
    names = ", ".join(f"`{n}`" for n in sorted(set(traced.custom_vjps)))
    raise engine.UnsupportedProgramError(
        f"{what} is read from the loss's primal program, but the loss holds "
        f"the custom_vjp function(s) {names}, whose gradient is the user's "
        f"rule, not the primal's derivative. Use {fallback}: "
        f"lrcr.value_grad_and_curvature follows the custom rule there.")


def _custom_vjp_path(loss_fn, params, batch, traced: engine.Traced,
                     granularity: str, has_aux: bool):
  """`value_grad_and_curvature` for a loss that holds a custom_vjp.

  The loss and the gradient are `jax.value_and_grad`'s; the curvature is
  g^T d/dt grad F(params + t g) by autodiff of that gradient
  (`reference.hvp_fn`).
  """
  names = ", ".join(f"`{n}`" for n in sorted(set(traced.custom_vjps)))
  if granularity == "variable":
    _refuse_custom_vjp(traced, "the exact Hessian diagonal (granularity "
                       "'variable')", "granularity 'layer' or 'global'")
  value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *batch)
  hvp = reference.hvp_fn(reference.loss_only(loss_fn, has_aux), params,
                         batch, names)
  fn = reference.directional_fn(hvp, grads, granularity)
  if granularity == "global":
    return value, grads, ScalableCurvatureFn(fn)
  return value, grads, lambda p, d: fn(p, d)


def lowrank_curvature_fn(loss_fn: Any, *batch: Any,
                         granularity: str = "global") -> CurvatureFn:
  """Builds `curvature_fn(params, direction)` for `scale_by_cubic_step`.

  The engine behind `autodiff_curvature_fn`'s signature. Each call runs its
  own forward and backward pass; inside a training step,
  `value_grad_and_curvature` shares them with the gradient and is faster.

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`, or a flax module such as
      `lrcr.MLP`, standing for softmax cross-entropy of its logits on
      `batch = (x, labels)`.
    *batch: the other arguments of loss_fn.
    granularity: "global", "layer" or "variable".
  """
  reference.check_granularity(granularity)
  fn = as_loss_fn(loss_fn, *batch)

  def curvature_fn(params: Any, direction: Any) -> Directional:
    return value_grad_and_curvature(fn, params, *batch,
                                    granularity=granularity)[2](params,
                                                                direction)

  return curvature_fn


def directional(model_or_loss: Any, params: Any, *args: Any) -> Directional:
  """Slope, curvature and squared norm along a direction, by the engine.

  `directional(model, params, x, labels, direction)` for a flax module (its
  softmax cross-entropy), or `directional(loss_fn, params, *batch,
  direction)`: the direction is the last argument.
  """
  *batch, direction = args
  fn = as_loss_fn(model_or_loss, *batch)
  return value_grad_and_curvature(fn, params, *batch)[2](params, direction)


def value_and_directional(model_or_loss: Any, params: Any,
                          *args: Any) -> tuple[Array, Directional]:
  """(F, `directional(...)`) from one pass."""
  *batch, direction = args
  fn = as_loss_fn(model_or_loss, *batch)
  loss, _, curvature_fn = value_grad_and_curvature(fn, params, *batch)
  return loss, curvature_fn(params, direction)


# ---------------------------------------------------------------------------
# Per-sample factors and the Hessian diagonal.
# ---------------------------------------------------------------------------

class WeightFactors(NamedTuple):
  """The per-sample factors of one weight operation's gradient (section 2).

  For a dense layer z = v W read at P positions per sample (P = 1 for an
  MLP; time steps of a scan; pixels of a convolution, whose inputs are then
  the image patches), sample b contributes

      dF/dW (from this operation) = sum_p inputs[b, p]^T adjoints[b, p]

  (eqs. 27-28: rank 1 per position), and the batch gradient is the sum over
  b. For a mean loss F = mean_b f_b, the per-sample gradient is
  B * sum_p inputs[b, p]^T adjoints[b, p].

  Attributes:
    inputs: [B, P, d_in], the operand that multiplies the weight.
    adjoints: [B, P, d_out], dF/dz at the operation's output.
    kernel_shape: the weight's shape; `sample_gradients()` reshapes to it.
    conv: whether the weight is a convolution kernel (its d_in is the
      patch, ordered (C_in, *window)); else d_in and d_out are the weight's
      contracted and free axes, flattened.
    groups: a grouped convolution's feature_group_count G (depthwise: G =
      C_in). Input channels and output channels then split into G equal
      groups, and group g's outputs read group g's inputs only: its block
      of the kernel is the product of the g-th parts of inputs and adjoints.
  """
  inputs: Array
  adjoints: Array
  kernel_shape: tuple
  conv: bool = False
  groups: int = 1

  def sample_gradients(self) -> Array:
    """[B, *kernel_shape]: each sample's term of dF/dW, sum_p in^T adj."""
    if self.groups == 1:
      g = jnp.einsum("bpi,bpj->bij", self.inputs, self.adjoints)
      return _to_kernel(g, self.kernel_shape, self.conv)
    b, p, n = self.inputs.shape[0], self.inputs.shape[1], self.groups
    g = jnp.einsum("bpgi,bpgj->bgij",                      # [B, G, Cg K, Co/G]
                   self.inputs.reshape(b, p, n, -1),
                   self.adjoints.reshape(b, p, n, -1))
    *spatial, c_in, c_out = self.kernel_shape             # HWIO, I = C_in/G
    g = g.reshape((b, n, c_in, *spatial, c_out // n))
    g = jnp.moveaxis(jnp.moveaxis(g, 2, -2), 1, -2)      # [B, *sp, Cg, G, Co/G]
    return g.reshape((b, *spatial, c_in, c_out))


def _to_kernel(g: Array, kernel_shape: tuple, conv: bool) -> Array:
  """[B, d_in, d_out] -> [B, *kernel_shape].

  A dense weight's axes are (contracted..., free...), flattened in order; a
  convolution's patch features are ordered (C_in, *window).
  """
  if not conv:
    return g.reshape((g.shape[0],) + tuple(kernel_shape))
  # Convolution HWIO: the patches' features are ordered (C_in, H, W).
  *spatial, c_in, c_out = kernel_shape
  g = g.reshape((g.shape[0], c_in, *spatial, c_out))
  return jnp.moveaxis(g, 1, -2)


def _path_names(params: Any) -> list[str]:
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _rows(node, operand: Array, adjoint: Array, depth: int):
  """Per-sample [B, P, d_in] inputs and [B, P, d_out] adjoints of one operation.

  None for a layout that is not factored; a grouped convolution's inputs and
  adjoints hold its groups one after the other (`WeightFactors.groups`).
  """
  b = operand.shape[0]
  if node.name == "dot_general":
    # z = V W contracting V's trailing axes with W's leading ones (flax
    # Dense and DenseGeneral): V [..., K], W [K, M], z [..., M] once flattened.
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    w_aval = node.in_avals[node.weight]
    lhs_aval = node.in_avals[1 - node.weight]
    nc = len(rc)
    if (node.weight != 1 or lb or rb or tuple(rc) != tuple(range(nc)) or
        tuple(lc) != tuple(range(lhs_aval.ndim - nc, lhs_aval.ndim))):
      return None
    k = int(np.prod(w_aval.shape[:nc]))
    m = int(np.prod(w_aval.shape[nc:]))
    return operand.reshape(b, -1, k), adjoint.reshape(b, -1, m)
  p = node.params
  nd = len(node.in_avals[0].shape)
  dn = p["dimension_numbers"]
  if (node.weight != 1 or p["batch_group_count"] != 1
      or tuple(dn.lhs_spec) != (0, nd - 1) + tuple(range(1, nd - 1))
      or tuple(dn.rhs_spec) != (nd - 1, nd - 2) + tuple(range(nd - 2))):
    return None                                    # not NHWC / HWIO
  lead = operand.shape[:depth + 1]
  flat = operand.reshape((-1,) + operand.shape[depth + 1:])
  rhs = node.in_avals[1]
  patches = jax.lax.conv_general_dilated_patches(
      flat, filter_shape=_filter_shape(p["dimension_numbers"], rhs.shape),
      window_strides=p["window_strides"], padding=p["padding"],
      lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
      dimension_numbers=p["dimension_numbers"], precision=p["precision"])
  patches = patches.reshape(lead + patches.shape[1:])
  return (patches.reshape(b, -1, patches.shape[-1]),
          adjoint.reshape(b, -1, adjoint.shape[-1]))


def _filter_shape(dn, rhs_shape) -> tuple:
  spec = dn.rhs_spec                      # (out, in, spatial...)
  return tuple(rhs_shape[i] for i in spec[2:])


class SampleFactors(NamedTuple):
  """What `per_sample_factors` found: the factors, and every leaf without.

  Attributes:
    factors: {param path: [WeightFactors, ...]}, one entry per matmul or
      convolution that multiplies the parameter with a per-sample operand.
    unfactored: {param path: why} for every other params leaf (biases,
      normalisation scales, embedding tables read by a gather, a weight
      read through a transpose as in a tied embedding, a layout that is not
      factored). Their per-sample gradients are not in `factors`.
  """
  factors: dict
  unfactored: dict


def per_sample_factors(model_or_loss: Any, params: Any,
                       *batch: Any) -> SampleFactors:
  """Every dense and convolutional weight's per-sample factors, from the loss.

  Reads `loss_fn(params, *batch)` (or a flax module's cross-entropy) and
  returns, for every parameter that a matmul or a convolution (grouped and
  depthwise included) multiplies with a per-sample operand, its
  `WeightFactors`: inputs and output adjoints per sample and position,
  from one forward/backward pass. These are the per-sample gradients of the
  paper (eqs. 27-28, appendix B.2) without forming them:
  `WeightFactors.sample_gradients()` rebuilds them. Every other params leaf
  is named, with the reason, in `unfactored`.

  The batch axis is the leading axis of the operand (of each scan step's
  operand inside `scan`). A parameter read by several operations (weight
  sharing) has one entry per operation; their gradients add up.

  Returns:
    `SampleFactors(factors, unfactored)`, keyed by param path
    ("params/Dense_0/kernel").

  Raises:
    UnsupportedProgramError: for a loss that is not a sum of per-sample
      terms (samples coupled by a softmax, centring or batch statistics
      over the batch), or one with a custom_vjp; the message names it.
  """
  traced = engine.trace(as_loss_fn(model_or_loss, *batch), params, batch)
  what = "per_sample_factors"
  _refuse_custom_vjp(traced, what, "jax.vmap(jax.grad(loss_fn)) over "
                     "single samples")
  samples.check_separable(
      traced, what, "Per-sample gradients do not exist for such a loss.")
  ps = _gradient_pass(traced, params)
  names = _path_names(params)
  out: dict[str, list[WeightFactors]] = {}
  unfactored: dict[str, str] = {}
  for node, outer in traced.weight_nodes():
    operand, adjoint = ps.weight_values(node, outer)
    rows = _rows(node, operand, adjoint, len(outer))
    if rows is None:
      unfactored[names[node.param]] = (
          f"read by a `{node.name}` whose layout is not factored (factored: "
          f"dense layers contracting their input's trailing axes, NHWC/HWIO "
          f"convolutions)")
      continue
    groups = node.params.get("feature_group_count", 1)
    out.setdefault(names[node.param], []).append(
        WeightFactors(rows[0], rows[1],
                      tuple(node.in_avals[node.weight].shape),
                      node.name != "dot_general", groups))
  for k, name in enumerate(names):
    if name in unfactored:
      continue
    if name not in out:
      unfactored[name] = (
          "not multiplied by a per-sample operand in a matmul or convolution "
          "(a bias, a normalisation scale, an embedding table, or a weight "
          "read through another operation such as a transpose)")
    elif traced.uses.get(k, 0) > len(out[name]):
      unfactored[name] = (
          "partly factored: also read by operations other than its matmuls "
          "or convolutions (a transpose, a gather, a regularizer), whose "
          "gradient terms are not in its factors")
  for name in set(out) & set(unfactored):
    if not unfactored[name].startswith("partly"):
      unfactored[name] = "partly factored: " + unfactored[name]
  return SampleFactors(out, unfactored)


_PASS_THROUGH = ("broadcast_in_dim", "reshape", "convert_element_type")


def _diagonal_roles(traced: engine.Traced, params: Any) -> list[tuple]:
  """For every param leaf: ("weight", node) or ("bias", weight node).

  Raises:
    engine.UnsupportedProgramError: for a leaf that is neither the weight of
      a matmul or convolution nor a bias added to one's output.
  """
  prog = traced.program
  names = _path_names(params)
  users: dict[int, list] = {}
  for node in prog.nodes:
    for x in node.ins:
      if isinstance(x, int):
        users.setdefault(x, []).append(node)
  weights = {n.param: n for n in prog.nodes if n.weight >= 0}
  outputs = {n.outs[0]: n for n in weights.values()}
  roles = []
  for k, pid in enumerate(prog.invars[:traced.num_params]):
    if traced.uses.get(k, 0) == 1 and k in weights:
      roles.append(("weight", weights[k]))
      continue
    x, role = pid, None
    while len(users.get(x, ())) == 1:
      user = users[x][0]
      if user.name in _PASS_THROUGH:
        x = user.outs[0]
        continue
      other = [y for y in user.ins if y != x]
      if (user.name == "add" and len(other) == 1 and other[0] in outputs
          and len(users.get(other[0], ())) == 1):
        role = ("bias", outputs[other[0]])
      break
    if role is None:
      raise engine.UnsupportedProgramError(
          f"the exact Hessian diagonal (granularity 'variable') covers the "
          f"weights of matmuls and convolutions and the biases added to "
          f"their outputs; the parameter {names[k]!r} is used otherwise. "
          f"Use granularity 'layer' or 'global'.")
    roles.append(role)
  return roles


def _leaf_diagonal(ps: engine.Pass, role: tuple, ybar_r: dict, lam: Array,
                   shape: tuple) -> Array:
  """d2F/dw^2 = sum_{b,r} lam_br (d s_br / dw)^2 for every entry w of a leaf.

  `shape`: the leaf's. A bias is broadcast over the leading axes of its
  operation's output (positions), so it matches the trailing ones.
  """
  kind, node = role
  adj_r = ybar_r[node.id][0]                                   # [C, B, ...]
  if kind == "bias":
    size = math.prod(shape)
    per = adj_r.reshape(adj_r.shape[:2] + (-1, size)).sum(2)   # [C, B, size]
    return jnp.einsum("br,rbj->j", lam, per * per).reshape(shape)
  operand, _ = ps.weight_values(node, ())
  if (node.name == "dot_general" and operand.ndim == 2 and node.weight == 1
      and len(node.in_avals[1].shape) == 2):
    # A 2-D weight, one position per sample:
    # (v_b (x) a_br)^2 = v_b^2 (x) a_br^2.
    return jnp.einsum("bi,bj->ij", operand * operand,
                      jnp.einsum("br,rbj->bj", lam, adj_r * adj_r))
  rows = _rows(node, operand, adj_r[0], 0)
  conv = node.name != "dot_general"
  if rows is None or node.params.get("feature_group_count", 1) != 1:
    raise engine.UnsupportedProgramError(
        f"the exact Hessian diagonal does not cover this `{node.name}` "
        "layout; use granularity 'layer' or 'global'.")
  inputs = rows[0]                                             # [B, P, d_in]
  # [C, B, P, d_out]
  adj = adj_r.reshape(adj_r.shape[:2] + (-1, rows[1].shape[-1]))
  grads = jnp.einsum("bpi,rbpj->rbij", inputs, adj)
  diag = jnp.einsum("br,rbij->ij", lam, grads * grads)[None]
  return _to_kernel(diag, tuple(node.in_avals[node.weight].shape), conv)[0]


def hessian_diagonal(model_or_loss: Any, params: Any, *batch: Any) -> Any:
  """The exact diagonal of the Hessian of F, shaped like params.

  For a model that is piecewise linear (ReLU, max-pooling, ...) from its
  weights up to its logits P, each weight enters P linearly, so the diagonal
  is the Gauss-Newton diagonal through P, read off the program. Per sample
  b, with the Hessian of F in P_b decomposed as sum_r lam_br u_br u_br^T,

      d2F/dw^2 = sum_b sum_r lam_br (d(u_br . P_b)/dw)^2,

  and d(u_br . P_b)/dW is the outer product of the weight's input and the
  adjoint of the pseudo-output u_br . P_b (summed over positions): one
  backward pass per class, vectorized, and no per-sample gradient of the
  whole model. The loss must be a sum of per-sample terms of the rows of P
  (`lrcr.samples` checks it from the program).

  Raises:
    lrcr.engine.UnsupportedProgramError: for a smooth activation or another
      second-order operation before the logits, a parameter that is not a
      dense/convolution weight or its bias, a loss that couples its samples
      (a softmax, centring or batch statistics over the batch), or a
      custom_vjp; the message names it.
  """
  traced = engine.trace(as_loss_fn(model_or_loss, *batch), params, batch)
  ps = _gradient_pass(traced, params, diagonal=True)
  return jax.tree.unflatten(traced.params_treedef, ps.diagonal)
