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

at O(B^2 d) instead of O(B d^2): cheaper when B (d_in + d_out) < d_in d_out
(B < 64 for 128 x 128 layers, B < 110 for the 784 x 128 first layer); each
layer takes the cheaper form, so large batches fall back to the plain
products.
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


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
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
  fwd = layers_lib.forward(layers, model.activation, x, smooth)
  inputs, a1s, a2s, p = fwd.inputs, fwd.act_grads, fwd.act_second, fwd.logits
  q = jax.nn.softmax(p)                                         # eq. 14
  loss = optax.softmax_cross_entropy_with_integer_labels(
      p, labels).mean()                                         # eqs. 15-16
  delta = q - jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)  # df/dp [B, C]

  deltas, grad_vs = [delta], []
  for k in range(len(layers) - 1, 0, -1):
    g_v = deltas[0] @ layers[k].kernel.T                        # df/dV_k
    if smooth:
      grad_vs.insert(0, g_v)
    deltas.insert(0, g_v * a1s[k - 1])
  grads = {}
  for name, layer, v, d in zip(layers_lib.layer_names(model), layers, inputs,
                               deltas):
    grads[name] = {"kernel": v.T @ d / batch}                   # eqs. 27-28
    if layer.bias is not None:
      grads[name]["bias"] = d.sum(0) / batch
  grads = layers_lib.rewrap(params, grads)
  cache = Cache(tuple(inputs), tuple(a1s), tuple(a2s), tuple(deltas),
                tuple(grad_vs), q, grads)
  return loss, grads, cache


#: Stack equally shaped layers only while a stacked operand stays below this
#: size: stacking pays at small batches (dispatch-bound), and its copies cost
#: more than they save at large ones (measured in experiments.benchmark).
GROUP_MAX_BYTES = 2 ** 21


def grouped(fn, *lists):
  """[fn(a_k, b_k, ...) for k], batched over runs of equally shaped entries.

  The paper's net has 11 identical 128x128 hidden layers: stacking them turns
  11 small matmuls into one batched matmul, which matters when a step is
  dispatch-bound (batch 32 on a CPU). Same numbers as the plain loop.
  """
  n = len(lists[0])
  out = [None] * n
  i = 0
  while i < n:
    j = i + 1
    while (j < n and all(l[j].shape == l[i].shape for l in lists) and
           all((j + 1 - i) * l[i].size * l[i].dtype.itemsize <= GROUP_MAX_BYTES
               for l in lists)):
      j += 1
    if j - i == 1:
      out[i] = fn(*(l[i] for l in lists))
    else:
      stacked = jax.vmap(fn)(*(jnp.stack(l[i:j]) for l in lists))
      for t in range(i, j):
        out[t] = jax.tree.map(lambda a, t=t: a[t - i], stacked)
    i = j
  return out


def subbatch(cache: Cache, rows: int) -> Cache:
  """The cache restricted to its first `rows` samples (grads stay full-batch)."""
  cut = lambda t: tuple(a[:rows] for a in t)
  return cache._replace(inputs=cut(cache.inputs),
                        act_grads=cut(cache.act_grads),
                        act_second=cut(cache.act_second),
                        deltas=cut(cache.deltas), grad_v=cut(cache.grad_v),
                        probs=cache.probs[:rows])


@layers_lib.exact_matmuls
def cached_directional(model: MLP, params: Any, cache: Cache, direction: Any,
                       gradient_direction: bool = False,
                       curvature_rows: int | None = None) -> Directional:
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
    curvature_rows: an option that trades exactness for speed, off by default
      (None): take the curvature on the first `curvature_rows` samples only
      (a sub-sampled Hessian, as in Byrd et al. 2011), the slope and norm
      still on the whole batch. Uses the plain products.

  Returns:
    `Directional(slope, curvature, sqnorm)`.
  """
  layers = layers_lib.as_layers(model, params)
  steps = layers_lib.as_layers(model, direction, what="direction")
  layers_lib.check_direction(layers, steps)
  grads = cache.grads
  if curvature_rows is not None and curvature_rows < cache.probs.shape[0]:
    curvature, _ = _sweep_dense(layers, steps, subbatch(cache, curvature_rows))
    return Directional(optax.tree.vdot(direction, grads), curvature,
                       optax.tree.norm(direction, squared=True))
  if not gradient_direction:
    curvature, slope = _sweep_dense(layers, steps, cache)
    sqnorm = optax.tree.norm(direction, squared=True)
    return Directional(slope, curvature, sqnorm)
  # g = c grad F. c from the output layer's few weights (falling back to the
  # whole tree when their gradient is zero); then slope = c ||grad F||^2 and
  # ||g||^2 = c^2 ||grad F||^2 with ||grad F||^2 read off the Gram matrices:
  # no extra pass over all the weights.
  grad_layers = layers_lib.as_layers(model, grads)
  out_g = grad_layers[-1]
  out_d = steps[-1]
  num = optax.tree.vdot(out_d, out_g)
  den = optax.tree.norm(out_g, squared=True)
  num, den = jax.lax.cond(
      den > 0, lambda: (num, den),
      lambda: (optax.tree.vdot(direction, grads),
               optax.tree.norm(grads, squared=True)))
  scale = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  curvature, gsq = _sweep_gram(layers, steps, grad_layers, cache, scale)
  return Directional(scale * gsq, curvature, scale * scale * gsq)


def _sweep_dense(layers, steps, cache: Cache) -> tuple[Array, Array]:
  """(g^T H g, g . grad F) for a general direction: tangent sweep + adjoint terms."""
  batch = cache.probs.shape[0]
  n = len(layers) - 1
  kernels = [s.kernel for s in steps]
  pre = grouped(lambda v, phi: v @ phi, list(cache.inputs), kernels)
  curvature, dp = _tangent_sweep(layers, steps, cache, pre, lambda dvs: 2.0 * sum(
      grouped(lambda dv, phi, d: jnp.sum(d * (dv @ phi)), dvs, kernels[1:],
              list(cache.deltas[1:]))), n)
  slope = jnp.sum(cache.deltas[-1] * dp) / batch               # eq. 38: (df/dp) . dp
  return curvature / batch, slope


def _sweep_gram(layers, steps, grad_layers, cache: Cache, scale: Array):
  """g^T H g for g = scale * grad F through B x B Gram matrices, and ||grad F||^2.

  Per layer, the Gram form costs 2 B^2 (d_in + d_out) against 2 B d_in d_out
  for the plain products; each layer takes the cheaper one. With
  G_k = V_{k-1} V_{k-1}^T and E_k = Delta_k Delta_k^T (both [B, B]):

      V_{k-1} phi_k                = c G_k Delta_k
      sum_i delta_i . (dv_i phi_k) = c <dV_{k-1} V_{k-1}^T, E_k>
      ||grad_k F||^2               = <G_k, E_k> / B^2 (+ ||sum_i delta_i||^2 / B^2)

  Returns:
    (batch-mean curvature, ||grad F||^2).
  """
  batch = cache.probs.shape[0]
  n = len(layers) - 1
  c = scale / batch                     # phi_k = c V_{k-1}^T Delta_k
  use_gram = [batch * (k.shape[0] + k.shape[1]) < k.shape[0] * k.shape[1]
              for k in (l.kernel for l in layers)]
  kernels = [s.kernel for s in steps]
  v, d = list(cache.inputs), list(cache.deltas)
  def gram_terms(v, d):
    gram = v @ v.T                                                # G_k [B, B]
    e = d @ d.T                                                   # E_k [B, B]
    return c * (gram @ d), e, jnp.sum(gram * e)                   # V phi, E, B^2 ||grad||^2

  pre, delta_k, gsq = [None] * (n + 1), [None] * (n + 1), 0.0
  idx = [k for k in range(n + 1) if use_gram[k]]
  for k, (p, e, sq) in zip(idx, grouped(gram_terms, [v[k] for k in idx],
                                        [d[k] for k in idx])):
    pre[k], delta_k[k], gsq = p, e, gsq + sq / batch ** 2
  for k in range(n + 1):
    if not use_gram[k]:
      pre[k] = v[k] @ kernels[k]
      gsq = gsq + jnp.sum(grad_layers[k].kernel ** 2)
    if grad_layers[k].bias is not None:
      gsq = gsq + jnp.sum(grad_layers[k].bias ** 2)

  def adjoint(dvs):
    terms = _by_choice(
        use_gram[1:],
        lambda dv, v, e: c * jnp.sum((dv @ v.T) * e),             # eqs. 35-36
        lambda dv, phi, d: jnp.sum(d * (dv @ phi)),
        (dvs, v[1:], delta_k[1:]), (dvs, kernels[1:], d[1:]))
    return 2.0 * sum(terms)

  curvature, _ = _tangent_sweep(layers, steps, cache, pre, adjoint, n)
  return curvature / batch, gsq


def _by_choice(mask, fn_true, fn_false, args_true, args_false):
  """grouped(fn_true) where mask, grouped(fn_false) elsewhere, in order."""
  idx_t = [i for i, m in enumerate(mask) if m]
  idx_f = [i for i, m in enumerate(mask) if not m]
  out = [None] * len(mask)
  for idx, fn, args in ((idx_t, fn_true, args_true),
                        (idx_f, fn_false, args_false)):
    if idx:
      res = grouped(fn, *([a[i] for i in idx] for a in args))
      for i, r in zip(idx, res):
        out[i] = r
  return out


def _tangent_sweep(layers, steps, cache: Cache, pre, adjoint, n) -> Array:
  """Sequential part of the sweep, shared by the dense and Gram forms.

  pre[k] = V_{k-1} phi_k (any form); adds biases, runs dz_k = pre_k +
  dV_{k-1} W_k, dV_k = A'(Z_k) dz_k, and returns the batch sum of the
  Gauss-Newton term, the adjoint terms (`adjoint(dvs)`) and the A'' terms,
  and dp [B, C], the tangent of the logits.
  """
  acc = 0.0
  dvs = []
  dv = None
  for k in range(n + 1):
    dz = pre[k]
    if dv is not None:
      dz = dz + dv @ layers[k].kernel
    if steps[k].bias is not None:
      dz = dz + steps[k].bias
    if k < n:
      if cache.act_second:                                        # app. B.3
        acc = acc + jnp.sum(cache.grad_v[k] * cache.act_second[k] * dz * dz)
      dv = cache.act_grads[k] * dz
      dvs.append(dv)
  return acc + adjoint(dvs) + _gauss_newton(cache.probs, dz), dz


def _gauss_newton(q: Array, dp: Array) -> Array:
  """sum_i dp_i^T (diag(q_i) - q_i q_i^T) dp_i over the batch rows (eq. 3)."""
  return jnp.sum(jax.vmap(layers_lib.softmax_gauss_newton)(q, dp))


def cached_curvature_fn(model: MLP, cache: Cache,
                        gradient_direction: bool = False,
                        curvature_rows: int | None = None) -> CurvatureFn:
  """`curvature_fn(params, direction)` for `scale_by_cubic_step`, from a cache.

  Use it inside a training step after `value_grad_and_cache`, so the curvature
  reuses the gradient pass. Pass `gradient_direction=True` only when the
  optimizer before `scale_by_cubic_step` is plain SGD.
  """
  layers_lib.check_model(model)

  def curvature_fn(params: Any, direction: Any) -> Directional:
    return cached_directional(model, params, cache, direction,
                              gradient_direction, curvature_rows)

  return curvature_fn
