"""The fast CR step: one forward/backward pass shared by the gradient and the curvature.

`lrcr.directional` is self-contained: it redoes the forward pass and the
backprop signals every time it is called. Inside a training step those are
already computed by the gradient pass. This module computes the loss and the
gradient of an `lrcr.MLP` with an explicit batched backward pass that keeps
what the curvature needs (`Cache`), and then contracts any direction against
it (`cached_directional`). Same exact numbers as `lrcr.directional` (tested to
float64 round-off), less work.

Cost, counting one B x d x d matmul per layer as a unit (see the notes): the
gradient pass is 3 units; the cached curvature adds

    dZ_k = V_{k-1} phi_k + dV_{k-1} W_k     2 units   (tangent sweep)
    sum_i delta_k,i . (dv_{k-1,i} phi_k)    1 unit    (adjoint term, eq. 36)

so about 2x an SGD step for a dense direction. For plain SGD the direction is a
multiple of the batch gradient, phi_k = c V_{k-1}^T Delta_k / B (eqs. 27-28
summed over the batch), and with `gradient_direction=True` the two
phi-products go through B x B Gram matrices instead:

    V_{k-1} phi_k = c/B (V_{k-1} V_{k-1}^T) Delta_k                    # [B, d_k]
    sum_i delta_i . (dv_i phi_k) = c/B <dV_{k-1} V_{k-1}^T, Delta_k Delta_k^T>

at O(B^2 d) instead of O(B d^2): cheaper when B < d/2 (32 against 128), and
much cheaper on the 784-wide first layer. Biases are handled by appending a
column of ones to V.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import factors as factors_lib
from lrcr import layers as layers_lib
from lrcr.directional import CurvatureFn, Directional
from lrcr.mlp import MLP

Array = jax.Array


class Cache(NamedTuple):
  """What the gradient pass keeps for the curvature (batched, B rows).

  Attributes:
    inputs: V_{k-1}, layer inputs, k = 1..n+1: tuple of [B, d_{k-1}].
    act_grads: A'(Z_k), k = 1..n: tuple of [B, d_k] (gamma, eq. 19).
    act_second: A''(Z_k) for smooth activations, else empty.
    deltas: Delta_k = df/dZ_k per sample, k = 1..n+1 (the last is df/dp):
      tuple of [B, d_k].
    grad_v: df/dV_k per sample, k = 1..n, kept only for smooth activations
      (the A'' terms of app. B.3), else empty.
    probs: softmax(p), [B, C].
    grads: the gradient of the batch-mean loss F, shaped like the inner
      params dict.
  """
  inputs: tuple[Array, ...]
  act_grads: tuple[Array, ...]
  act_second: tuple[Array, ...]
  deltas: tuple[Array, ...]
  grad_v: tuple[Array, ...]
  probs: Array
  grads: Any


def _wrap_like(params: Any, inner: dict) -> Any:
  return {"params": inner} if "params" in params else inner


@functools.partial(jax.jit, static_argnames="model")
def value_grad_and_cache(model: MLP, params: Any, x: Any,
                         labels: Any) -> tuple[Array, Any, Cache]:
  """Loss F, its gradient, and the cache for `cached_directional`.

  An explicit forward and backward pass over the batch (eqs. 10-16, 27-28);
  the gradient equals `jax.grad` of the mean softmax cross-entropy.

  Args:
    model: an `lrcr.MLP`.
    params: its parameters.
    x: inputs [B, d_0].
    labels: integer labels [B].

  Returns:
    (loss, grads shaped like params, Cache).
  """
  layers = layers_lib.as_layers(model, params)
  x, labels = factors_lib.check_batch(layers, x, labels)
  smooth = not layers_lib.is_piecewise_linear(model.activation)
  batch = x.shape[0]
  inputs, a1s, a2s = [], [], []
  v = x
  for layer in layers[:-1]:
    inputs.append(v)
    z = v @ layer.kernel                                        # eq. 10
    if layer.bias is not None:
      z = z + layer.bias
    v, a1, a2 = layers_lib.activation_derivatives(model.activation, z, smooth)
    a1s.append(a1)
    if smooth:
      a2s.append(a2)
  inputs.append(v)
  out = layers[-1]
  p = v @ out.kernel                                            # eq. 13
  if out.bias is not None:
    p = p + out.bias
  q = jax.nn.softmax(p)                                         # eq. 14
  loss = optax.softmax_cross_entropy_with_integer_labels(
      p, labels).mean()                                         # eqs. 15-16
  delta = q - jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)  # df/dp [B, C]

  deltas, grad_vs, grads = [delta], [], []
  names = layers_lib.layer_names(model)
  for k in range(len(layers) - 1, -1, -1):
    layer = layers[k]
    entry = {"kernel": inputs[k].T @ deltas[0] / batch}         # eqs. 27-28
    if layer.bias is not None:
      entry["bias"] = deltas[0].sum(0) / batch
    grads.append((names[k], entry))
    if k == 0:
      break
    g_v = deltas[0] @ layer.kernel.T                            # df/dV_k
    if smooth:
      grad_vs.insert(0, g_v)
    deltas.insert(0, g_v * a1s[k - 1])
  grads = _wrap_like(params, dict(grads))
  cache = Cache(tuple(inputs), tuple(a1s), tuple(a2s), tuple(deltas),
                tuple(grad_vs), q, grads)
  return loss, grads, cache


def cached_directional(model: MLP, params: Any, cache: Cache, direction: Any,
                       gradient_direction: bool = False) -> Directional:
  """Exact slope, curvature and squared norm along g, from a gradient pass's cache.

  The same numbers as `lrcr.directional(model, params, x, labels, direction)`
  for the batch the cache was built on.

  Args:
    model: the `lrcr.MLP`.
    params: the parameters the cache was built at.
    cache: from `value_grad_and_cache`.
    direction: g, shaped like params.
    gradient_direction: promise that g is a scalar multiple of the cached
      batch gradient (plain SGD with any learning rate or schedule). Enables
      the Gram-matrix path; the result is exact only if the promise holds.

  Returns:
    `Directional(slope, curvature, sqnorm)`.
  """
  layers = layers_lib.as_layers(model, params)
  steps = layers_lib.as_layers(model, direction, what="direction")
  layers_lib.check_direction(layers, steps)
  grads = cache.grads
  slope = optax.tree.vdot(direction, grads)                     # eq. 38
  sqnorm = optax.tree.norm(direction, squared=True)
  if gradient_direction:
    gsq = optax.tree.norm(grads, squared=True)
    scale = jnp.where(gsq > 0, slope / jnp.where(gsq > 0, gsq, 1.0), 0.0)
    curvature = _sweep_gram(layers, cache, scale)
  else:
    curvature = _sweep_dense(layers, steps, cache)
  return Directional(slope, curvature, sqnorm)


def _sweep_dense(layers, steps, cache: Cache) -> Array:
  """g^T H g for a general direction: tangent sweep + adjoint terms."""
  batch = cache.probs.shape[0]
  acc = 0.0
  dv = None
  n = len(layers) - 1
  for k in range(n + 1):
    layer, step, v, delta = layers[k], steps[k], cache.inputs[k], cache.deltas[k]
    dz = v @ step.kernel
    if dv is not None:
      dz = dz + dv @ layer.kernel
      acc = acc + 2.0 * jnp.sum(delta * (dv @ step.kernel))   # eqs. 35-36
    if step.bias is not None:
      dz = dz + step.bias
    if k < n:
      if cache.act_second:                                      # app. B.3
        acc = acc + jnp.sum(cache.grad_v[k] * cache.act_second[k] * dz * dz)
      dv = cache.act_grads[k] * dz
  return (acc + _gauss_newton(cache.probs, dz)) / batch


def _sweep_gram(layers, cache: Cache, scale: Array) -> Array:
  """g^T H g for g = scale * grad F, through B x B Gram matrices."""
  batch = cache.probs.shape[0]
  c = scale / batch                    # phi_k = c V_{k-1}^T Delta_k
  acc = 0.0
  dv = None
  n = len(layers) - 1
  for k in range(n + 1):
    layer, v, delta = layers[k], cache.inputs[k], cache.deltas[k]
    gram = v @ v.T                                              # [B, B]
    if layer.bias is not None:
      gram = gram + 1.0                                         # the ones column
    dz = c * (gram @ delta)                                     # V_{k-1} phi_k
    if dv is not None:
      dz = dz + dv @ layer.kernel
      cross = dv @ v.T                                          # dV V^T [B, B]
      acc = acc + 2.0 * c * jnp.sum(cross * (delta @ delta.T))  # eqs. 35-36
    if k < n:
      if cache.act_second:                                      # app. B.3
        acc = acc + jnp.sum(cache.grad_v[k] * cache.act_second[k] * dz * dz)
      dv = cache.act_grads[k] * dz
  return (acc + _gauss_newton(cache.probs, dz)) / batch


def _gauss_newton(q: Array, dp: Array) -> Array:
  """sum_i dp_i^T (diag(q_i) - q_i q_i^T) dp_i for softmax cross-entropy (eq. 3)."""
  return jnp.sum(q * dp * dp) - jnp.sum(jnp.sum(q * dp, axis=1) ** 2)


def cached_curvature_fn(model: MLP, cache: Cache,
                        gradient_direction: bool = False) -> CurvatureFn:
  """`curvature_fn(params, direction)` for `scale_by_cubic_step`, from a cache.

  Use it inside a training step after `value_grad_and_cache`, so the curvature
  reuses the gradient pass. Pass `gradient_direction=True` only when the
  optimizer before `scale_by_cubic_step` is plain SGD.
  """
  layers_lib.check_model(model)

  def curvature_fn(params: Any, direction: Any) -> Directional:
    return cached_directional(model, params, cache, direction,
                              gradient_direction)

  return curvature_fn
