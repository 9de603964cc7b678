"""Exact slope and curvature of the batch loss along a direction (eqs. 38-40).

Given a direction g (phi_k for W_k, beta_k for b_k, omega for U, dc for c), the
cubic step of eq. 37 needs three numbers of the batch-mean loss F:

    slope     = g . grad F          # eq. 38
    curvature = g^T H g             # eq. 39, H the exact Hessian of F
    sqnorm    = ||g||^2             # eq. 40 (squared)

The low-rank engine
-------------------
Eq. 39 writes the curvature as sums over pairs of layers, with n(n-1)/2 chains
of eta matrices: quadratic in depth (section 4). lrcr accumulates the same
number in one forward sweep and one backward sweep, linear in depth, per
sample (legend: B batch, d_k widths, C classes):

    dz_k = dv_{k-1} W_k + v_{k-1} phi_k + beta_k,  dv_0 = 0     # [B, d_k]
    dv_k = A'(z_k) * dz_k                                       # [B, d_k]
    dp   = dv_n U + v_n omega + dc                              # [B, C]

    g^T H_f g = dp^T (d2f/dp2) dp                               # Gauss-Newton
              + 2 sum_k delta_k . (dv_{k-1} phi_k)              # eqs. 33/36, r != k
              + 2 (df/dp) . (dv_n omega)                        # eq. 35, first term
              + sum_k (df/dv_k) . (A''(z_k) * dz_k^2)            # app. B.3, eq. 66-77

with delta_k = df/dz_k the backprop signal of the gradient pass. The second
line is the adjoint form of eq. 39's last double sum: (df/dp) u eta^(n,k)
contracted from the left is exactly delta_k, so the eta^(k-1,r) chains collapse
into the tangent dv_{k-1}. Biases enter linearly and add no second-order term.
Nothing of size B x #params, and no Hessian block, is ever formed.

Departure from the paper: eq. 39 as printed is not the exact curvature
----------------------------------------------------------------------
Its Gauss-Newton part (third line of eq. 39) sums only the same-layer blocks
k = r, while eq. 36 (and eq. 5) has d2f/dp2 blocks between every pair of
layers k != r. Against a dense `jax.hessian` in float64, eq. 39 as printed
misses exactly

    2 sum_{k > r} (J_k v_{k-1} phi_k)^T (d2f/dp2) (J_r v_{r-1} phi_r)

(J_k = dp/dz_k); see `lrcr.eq39` and `tests/eq39_test.py`, which measure the
gap. `dp^T (d2f/dp2) dp` above includes all pairs, so lrcr computes the exact
g^T H g. Eq. 39 also assumes ReLU (A'' = 0) and no biases; lrcr adds both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import blocks
from lrcr import factors as factors_lib
from lrcr import layers as layers_lib
from lrcr import nets
from lrcr.mlp import MLP

Array = jax.Array


class Directional(NamedTuple):
  """Slope, curvature and squared norm of the batch loss F along g.

  Attributes:
    slope: g . grad F (eq. 38).
    curvature: g^T H g with H the exact Hessian of F (eq. 39, corrected).
    sqnorm: ||g||^2 (eq. 40 before the power 3/2).
  """
  slope: Array
  curvature: Array
  sqnorm: Array


def _sample_sweep(layers: list[layers_lib.Layer],
                  direction: list[layers_lib.Layer], activation, x: Array,
                  label: Array) -> tuple[Array, Array, Array]:
  """(f, g.grad f, g^T H_f g) for one sample. x: [d_0]; label: [] int."""
  # Forward sweep with its tangent along g.
  v, dv = x, None
  saved = []   # (v_{k-1}, dv_{k-1}, dz_k, A'(z_k), A''(z_k)) per hidden layer
  for layer, step in zip(layers[:-1], direction[:-1]):
    z = v @ layer.kernel                                        # eq. 10
    dz = v @ step.kernel
    if dv is not None:
      dz = dz + dv @ layer.kernel
    if layer.bias is not None:
      z, dz = z + layer.bias, dz + step.bias
    v_next, a1, a2 = layers_lib.activation_derivatives(activation, z)
    saved.append((v, dv, dz, a1, a2))
    v, dv = v_next, a1 * dz
  out, step = layers[-1], direction[-1]
  p = v @ out.kernel                                            # eq. 13
  dp = v @ step.kernel + (0.0 if dv is None else dv @ out.kernel)
  if out.bias is not None:
    p, dp = p + out.bias, dp + step.bias

  # Softmax cross-entropy and its first two derivatives in p (eqs. 14-15).
  logq = jax.nn.log_softmax(p)
  q = jnp.exp(logq)
  f = -logq[label]
  df_dp = q - jax.nn.one_hot(label, p.shape[-1], dtype=p.dtype)    # [C]
  slope = df_dp @ dp                                            # eq. 38
  gauss_newton = layers_lib.softmax_gauss_newton(q, dp)        # dp^T H_p dp

  # Backward sweep: delta_k = df/dz_k, folded against the tangents.
  residual = 0.0
  if dv is not None:
    residual = residual + 2.0 * df_dp @ (dv @ step.kernel)      # eq. 35
  df_dv = out.kernel @ df_dp                                    # [d_n]
  for (v_in, dv_in, dz, a1, a2), layer, step in zip(
      reversed(saved), reversed(layers[:-1]), reversed(direction[:-1])):
    if a2 is not None:                                          # app. B.3
      residual = residual + df_dv @ (a2 * dz * dz)
    delta = df_dv * a1                                          # [d_k]
    if dv_in is not None:                                       # eq. 36, r != k
      residual = residual + 2.0 * delta @ (dv_in @ step.kernel)
    df_dv = layer.kernel @ delta
  return f, slope, gauss_newton + residual


def _prepare(model: MLP, params: Any, x: Any, labels: Any, direction: Any):
  layers = layers_lib.as_layers(model, params)
  steps = layers_lib.as_layers(model, direction, what="direction")
  layers_lib.check_direction(layers, steps)
  x, labels = factors_lib.check_batch(layers, x, labels)
  return layers, steps, x, labels


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def value_and_directional(model: MLP, params: Any, x: Any, labels: Any,
                          direction: Any) -> tuple[Array, Directional]:
  """Like `directional`, and also returns the batch loss F at params."""
  if isinstance(model, nets.Sequential):       # conv / recurrent, app. B.2
    return nets.sequential_directional(model, params, x, labels, direction)
  layers, steps, x, labels = _prepare(model, params, x, labels, direction)
  fn = lambda xi, yi: _sample_sweep(layers, steps, model.activation, xi, yi)
  f, slope, curvature = jax.vmap(fn)(x, labels)
  sqnorm = optax.tree.norm(direction, squared=True)
  return f.mean(), Directional(slope.mean(), curvature.mean(), sqnorm)


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def directional(model: MLP, params: Any, x: Any, labels: Any,
                direction: Any) -> Directional:
  """Exact slope, curvature and squared norm of F along a direction.

  F is the mean softmax cross-entropy of `model` over the batch (x, labels).
  The per-sample sweep is `jax.vmap`ped over the batch; cost is linear in
  depth, memory that of one forward pass with its tangent. No Hessian and no
  per-sample gradient is materialized.

  The curvature is the exact g^T H g for any elementwise activation (A'' terms
  of appendix B.3 included; skipped for ReLU, where they vanish) and with or
  without biases. It is not eq. 39 as printed, which drops the cross-layer
  Gauss-Newton blocks: see the module docstring and `lrcr.eq39`.

  `lrcr.Sequential` networks (convolutional, pooling and recurrent layers,
  appendix B.2) go through the same exact contraction in `lrcr.nets`.

  Args:
    model: an `lrcr.MLP` or an `lrcr.Sequential`.
    params: its parameters (`model.init` output or the inner dict).
    x: inputs [B, d_0] ([B, ...] for a `Sequential`).
    labels: integer labels [B].
    direction: the search direction g, a pytree shaped like params.

  Returns:
    `Directional(slope, curvature, sqnorm)`, scalars in the params' dtype.

  Raises:
    TypeError: for a model the engine does not support (use
      `autodiff_directional`).
    ValueError: for a direction or batch that does not fit the model.
  """
  if isinstance(model, nets.Sequential):
    return nets.sequential_directional(model, params, x, labels, direction)[1]
  return value_and_directional(model, params, x, labels, direction)[1]


@layers_lib.exact_matmuls
def autodiff_directional(loss_fn: Callable[..., Array], params: Any,
                         direction: Any, *args: Any) -> Directional:
  """Slope, curvature and squared norm along g for any differentiable loss.

  Forward-over-forward autodiff of t -> loss_fn(params + t g, *args) at t=0:
  the inner jvp gives the slope, the outer one its derivative g^T H g. Works
  for any model; the low-rank `directional` is the fast path for `lrcr.MLP`.

  Args:
    loss_fn: `loss_fn(params, *args) -> scalar`.
    params: the point.
    direction: g, shaped like params.
    *args: extra arguments of loss_fn (e.g. a batch).

  Returns:
    `Directional(slope, curvature, sqnorm)`.
  """
  def slope_at(p):
    return jax.jvp(lambda q: loss_fn(q, *args), (p,), (direction,))[1]

  slope, curvature = jax.jvp(slope_at, (params,), (direction,))
  sqnorm = optax.tree.norm(direction, squared=True)
  return Directional(slope, curvature, sqnorm)


CurvatureFn = Callable[[Any, Any], Directional]


def lowrank_curvature_fn(model: MLP, x: Any, labels: Any,
                         granularity: str = "global") -> CurvatureFn:
  """Builds `curvature_fn(params, direction) -> Directional` for an MLP batch.

  Pass the result to `scale_by_cubic_step`'s update as the keyword-only extra
  argument `curvature_fn`.

  Args:
    model: an `lrcr.MLP`.
    x: the batch inputs [B, d_0].
    labels: integer labels [B].
    granularity: "global" (`directional`: scalars), "layer"
      (`lrcr.blocks.layer_directional`: one scalar per layer) or "variable"
      (`lrcr.blocks.variable_directional`: trees shaped like params), matching
      `scale_by_cubic_step(granularity=...)`.

  Raises:
    TypeError: at once, for a model the low-rank engine does not support.
    ValueError: for an unknown granularity.
  """
  if isinstance(model, nets.Sequential):
    if granularity != "global":
      raise ValueError(
          f"granularity={granularity!r} is implemented for lrcr.MLP; an "
          "lrcr.Sequential network supports 'global' (or use "
          "autodiff_curvature_fn(loss_fn, x, labels, granularity='layer')).")
    return lambda params, direction: directional(model, params, x, labels,
                                                 direction)
  layers_lib.check_model(model)
  fn = {"global": directional, "layer": blocks.layer_directional,
        "variable": blocks.variable_directional}.get(granularity)
  if fn is None:
    raise ValueError(f"granularity={granularity!r}: expected 'global', "
                     "'layer' or 'variable'.")

  def curvature_fn(params: Any, direction: Any) -> Directional:
    return fn(model, params, x, labels, direction)

  return curvature_fn


def autodiff_curvature_fn(loss_fn: Callable[..., Array], *args: Any,
                          granularity: str = "global") -> CurvatureFn:
  """Builds `curvature_fn(params, direction)` for any `loss_fn(params, *args)`.

  The generic fallback of `lowrank_curvature_fn`, by forward-over-forward
  autodiff (`autodiff_directional`). With granularity="layer" it runs one
  forward-over-forward pass per layer (the direction masked to that layer),
  layers being the innermost dicts of params (`lrcr.transform.layer_prefix`).
  The "variable" granularity needs the exact Hessian diagonal, which only the
  low-rank engine provides cheaply.
  """
  if granularity == "variable":
    raise ValueError(
        "autodiff_curvature_fn has no 'variable' granularity: the exact "
        "Hessian diagonal would take one Hessian-vector product per weight. "
        "Use lrcr.lowrank_curvature_fn(model, x, labels, "
        "granularity='variable') for an lrcr.MLP.")
  if granularity not in ("global", "layer"):
    raise ValueError(f"granularity={granularity!r}: expected 'global', "
                     "'layer' or 'variable'.")

  def curvature_fn(params: Any, direction: Any) -> Directional:
    if granularity == "global":
      return autodiff_directional(loss_fn, params, direction, *args)
    from lrcr.transform import layer_prefix  # pylint: disable=g-import-not-at-top
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
        layer_prefix(direction, fill=0))[0]]
    out = []
    for path in paths:
      def keep(p, leaf, path=path):
        return leaf if p[:len(path)] == path else jnp.zeros_like(leaf)
      masked = jax.tree_util.tree_map_with_path(keep, direction)
      out.append(autodiff_directional(loss_fn, params, masked, *args))
    treedef = jax.tree.structure(layer_prefix(direction, fill=0))
    return Directional(*(jax.tree.unflatten(treedef, [getattr(d, f) for d in out])
                         for f in Directional._fields))

  return curvature_fn
