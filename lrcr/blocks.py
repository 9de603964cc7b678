"""Block-diagonal curvature from the per-sample factors: the Hessian diagonal and
per-layer blocks (section 4's layer- and variable-specific step lengths,
appendix B, Table 2).

Exact diagonal of the batch Hessian
-----------------------------------
A weight W_k[i, j] enters only z_k[j] = sum_i v_{k-1}[i] W_k[i, j], linearly,
so per sample

    d2f / dW_k[i, j]^2 = v_{k-1}[i]^2 * (d2f / dz_k^2)[j, j]        # [d_in, d_out]
    d2f / db_k[j]^2    = (d2f / dz_k^2)[j, j]

and the batch diagonal is the batch mean: one [d_in, B] x [B, d_out] matmul of
squared inputs against the per-sample curvature of z_k, with no per-sample
Hessian or gradient formed. The curvature of z_k splits as

    d2f/dz_k^2 = J_k^T (d2f/dp2) J_k  +  R_k                       # Gauss-Newton + residual
    R_n  = diag(df/dv_n * A''(z_n))
    R_k  = diag(A'(z_k)) W_{k+1} R_{k+1} W_{k+1}^T diag(A'(z_k)) + diag(df/dv_k * A''(z_k))

with J_k = dp/dz_k = u eta^(n,k) (eq. 23). The Gauss-Newton diagonal needs
only J_k: sum_c q_c J_k[c, j]^2 - (sum_c q_c J_k[c, j])^2.

Why the diagonal equals the Gauss-Newton diagonal for ReLU: the residual
(df/dp) . d2p/dw^2 involves a second derivative of p in one weight, and p is
linear in each single weight when A'' = 0: eq. 33 gives exactly 0 for r = k
(same layer), so every same-layer block, and the diagonal with it, is pure
Gauss-Newton; R_k = 0. (The off-diagonal cross-layer blocks r != k are not
Gauss-Newton even for ReLU.) For smooth activations R_k adds the A'' terms of
appendix B.3; lrcr carries R_k as a d_k x d_k matrix per sample, O(B d^3) per
layer, only when A'' != 0.

Per-layer blocks
----------------
`layer_directional` gives, for each layer k, the slope g_k . grad_k F and the
diagonal block g_k^T H_kk g_k of the curvature, the model behind one step
length per layer. Per sample, with dz_k = v_{k-1} phi_k + beta_k the tangent
that layer k alone injects:

    g_k^T H_kk g_k = (J_k dz_k)^T (d2f/dp2) (J_k dz_k)
                   + sum_{l >= k} (df/dv_l) . (A''(z_l) dz_l^2)     # app. B.3; 0 for ReLU

The second line propagates dz_k through the layers above (O(depth^2) for
smooth activations, skipped for ReLU).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lrcr import factors as factors_lib
from lrcr import layers as layers_lib
from lrcr.mlp import MLP

Array = jax.Array


def _sample_hz_diag(layers, activation, x: Array, label: Array):
  """Per sample: layer inputs and diag(d2f/dz_k^2) for every affine layer."""
  fac = factors_lib._sample_factors(layers, activation, x, label)  # pylint: disable=protected-access
  q = fac.loss_grad + jax.nn.one_hot(label, fac.loss_grad.shape[0],
                                     dtype=fac.loss_grad.dtype)  # softmax
  hz = [layers_lib.softmax_gauss_newton(q, jac) for jac in fac.jacobians]
  hz.append(jnp.diag(fac.loss_hess))                  # p = v_n U: no residual
  if not layers_lib.is_piecewise_linear(activation):
    # R_k by the recursion in the module docstring, from the top layer down.
    df_dv = layers[-1].kernel @ fac.loss_grad         # df/dv_{n} [d_n]
    r = None
    for k in range(len(layers) - 2, -1, -1):
      a1 = fac.act_grads[k]
      r_new = jnp.diag(df_dv * fac.act_second[k])     # diag(df/dv_k A''(z_k))
      if r is not None:
        w = layers[k + 1].kernel                      # [d_k, d_{k+1}]
        r_new = r_new + a1[:, None] * (w @ r @ w.T) * a1[None, :]
      r = r_new
      hz[k] = hz[k] + jnp.diag(r)
      df_dv = layers[k].kernel @ (df_dv * a1)         # df/dv_{k-1}
  return fac.inputs, tuple(hz)


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def hessian_diagonal(model: MLP, params: Any, x: Any, labels: Any) -> Any:
  """The exact diagonal of the Hessian of the batch-mean loss F.

  Built from the per-sample factors (see the module docstring): for ReLU it is
  the Gauss-Newton diagonal, because the residual term vanishes on every
  same-layer block (eq. 33, r = k); for smooth activations it adds the A''
  terms. No Hessian, per-sample Hessian or per-sample gradient is formed.

  Args:
    model: an `lrcr.MLP`.
    params: its parameters.
    x: inputs [B, d_0].
    labels: integer labels [B].

  Returns:
    A pytree shaped like params: d2F/dw^2 for every weight w.
  """
  layers = layers_lib.as_layers(model, params)
  x, labels = factors_lib.check_batch(layers, x, labels)
  fn = lambda xi, yi: _sample_hz_diag(layers, model.activation, xi, yi)
  inputs, hz = jax.vmap(fn)(x, labels)
  batch = x.shape[0]
  inner = {}
  for name, layer, v, h in zip(layers_lib.layer_names(model), layers, inputs,
                               hz):
    entry = {"kernel": (v * v).T @ h / batch}          # mean_b v_b^2 (x) h_b
    if layer.bias is not None:
      entry["bias"] = h.mean(0)
    inner[name] = entry
  return layers_lib.rewrap(params, inner)


def _sample_layer_blocks(layers, steps, activation, x: Array, label: Array):
  """Per sample: (slope_k, g_k^T H_kk g_k) for every affine layer k."""
  fac = factors_lib._sample_factors(layers, activation, x, label)  # pylint: disable=protected-access
  hp, dfdp = fac.loss_hess, fac.loss_grad
  n = len(layers) - 1
  smooth = not layers_lib.is_piecewise_linear(activation)
  if smooth:
    # df/dv_l for every hidden layer l: W_{l+1} delta_{l+1}.
    deltas = [dfdp @ jac for jac in fac.jacobians] + [dfdp]
    df_dv = [layers[l + 1].kernel @ deltas[l + 1] for l in range(n)]
  slopes, curvs = [], []
  for k in range(n + 1):
    dz = fac.inputs[k] @ steps[k].kernel                   # v_{k-1} phi_k
    if steps[k].bias is not None:
      dz = dz + steps[k].bias
    dp = dz if k == n else fac.jacobians[k] @ dz           # J_k dz_k  [C]
    slopes.append(dfdp @ dp)                               # eq. 38, layer k
    curv = dp @ hp @ dp                                    # Gauss-Newton block
    if smooth and k < n:
      t = dz
      for l in range(k, n):                                # app. B.3
        curv = curv + df_dv[l] @ (fac.act_second[l] * t * t)
        t = (fac.act_grads[l] * t) @ layers[l + 1].kernel
    curvs.append(curv)
  return jnp.stack(slopes), jnp.stack(curvs)


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def layer_directional(model: MLP, params: Any, x: Any, labels: Any,
                      direction: Any):
  """Per-layer slopes g_k . grad_k F and diagonal blocks g_k^T H_kk g_k.

  Args:
    model: an `lrcr.MLP`.
    params: its parameters.
    x: inputs [B, d_0].
    labels: integer labels [B].
    direction: g, shaped like params.

  Returns:
    `lrcr.Directional(slope, curvature, sqnorm)` whose fields are dicts
    {layer name: scalar} (under 'params' when params has that key): the
    block-diagonal model of section 4's layer-specific step lengths. The sums
    of the slopes and of the squared norms are the global ones; the sum of
    the curvatures omits the off-diagonal blocks.
  """
  from lrcr.directional import Directional  # pylint: disable=g-import-not-at-top
  layers = layers_lib.as_layers(model, params)
  steps = layers_lib.as_layers(model, direction, what="direction")
  layers_lib.check_direction(layers, steps)
  x, labels = factors_lib.check_batch(layers, x, labels)
  fn = lambda xi, yi: _sample_layer_blocks(layers, steps, model.activation,
                                           xi, yi)
  slopes, curvs = jax.vmap(fn)(x, labels)
  slopes, curvs = slopes.mean(0), curvs.mean(0)
  names = layers_lib.layer_names(model)
  sq = [jnp.sum(s.kernel ** 2) + (0.0 if s.bias is None else jnp.sum(s.bias ** 2))
        for s in steps]
  wrap = lambda values: layers_lib.rewrap(
      params, {name: values[k] for k, name in enumerate(names)})
  return Directional(wrap(slopes), wrap(curvs), wrap(sq))


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def variable_directional(model: MLP, params: Any, x: Any, labels: Any,
                         direction: Any):
  """Per-weight slope, curvature and squared norm: the diagonal model.

  For every weight w_i with direction component g_i: slope g_i dF/dw_i,
  curvature g_i^2 d2F/dw_i^2 (the exact diagonal, `hessian_diagonal`) and
  squared norm g_i^2 (appendix B, Table 2, with g_i in place of the unit
  baseline step).

  Returns:
    `lrcr.Directional` whose fields are pytrees shaped like params.
  """
  from lrcr.directional import Directional  # pylint: disable=g-import-not-at-top
  from lrcr.mlp import cross_entropy_loss  # pylint: disable=g-import-not-at-top
  grads = jax.grad(lambda p: cross_entropy_loss(model.apply(
      {"params": layers_lib.unwrap(p)}, x), labels))(params)
  diag = hessian_diagonal(model, params, x, labels)
  return Directional(jax.tree.map(jnp.multiply, direction, grads),
                     jax.tree.map(lambda g, h: g * g * h, direction, diag),
                     jax.tree.map(jnp.square, direction))
