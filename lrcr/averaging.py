"""The three ways of section 3.1 to average CR over a mini-batch, for SGD.

With per-sample directions g_i = -grad f_i (so the SGD direction is
g = E[g_i]), section 3.1 weighs three options:

    "mean_alpha_g"  E[alpha_i g_i]   a per-sample alpha on the per-sample step
    "mean_alpha"    E[alpha_i] E[g_i]
    "batch"         alpha(E[s], E[h]) E[g_i]   (the paper's choice; what
                                              `scale_by_cubic_step` does)

where alpha_i solves the cubic model of f_i along its own direction g_i
(eq. 37 with s_i = g_i . grad f_i = -||grad f_i||^2, h_i = g_i^T H_i g_i and
||g_i||^2). The paper found the first two too noisy; `averaged_sgd_update`
lets a user run each and see.

The per-sample numbers cost one tangent sweep per sample and no per-sample
gradient: g_i is rank-1 in every layer (eqs. 27-28), phi_k = -v_{k-1}^T
delta_k, so with flax's [d_in, d_out] kernels

    v_{k-1} phi_k + beta_k = -(||v_{k-1}||^2 [+ 1 with bias]) delta_k
    dv_{k-1} phi_k         = -(dv_{k-1} . v_{k-1}) delta_k
    ||g_i||^2              = sum_k (||v_{k-1}||^2 [+ 1]) ||delta_k||^2

and E[alpha_i g_i] = -grad of sum_i (alpha_i / B) f_i with alpha_i held
fixed: one weighted backward pass.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import cubic
from lrcr import factors as factors_lib
from lrcr import layers as layers_lib
from lrcr.directional import Directional, directional
from lrcr.mlp import MLP

Array = jax.Array

AVERAGINGS = ("batch", "mean_alpha", "mean_alpha_g")


class AveragedStep(NamedTuple):
  """An SGD+CR step under one of section 3.1's averaging options.

  Attributes:
    updates: the parameter update, shaped like params.
    alpha: the effective step length along -grad F: <updates, -grad F> /
      ||grad F||^2 (for "batch" and "mean_alpha" exactly the alpha applied).
    alphas: the per-sample alpha_i [B] ("batch": the single alpha, repeated).
    loss: the batch loss F at params.
    grads: grad F at params (shaped like params).
  """
  updates: Any
  alpha: Array
  alphas: Array
  loss: Array
  grads: Any


def _sample_own_gradient(layers, activation, x: Array, label: Array):
  """(s_i, h_i, ||g_i||^2) of f_i along g_i = -grad f_i, for one sample."""
  fac = factors_lib._sample_factors(layers, activation, x, label)  # pylint: disable=protected-access
  n = len(layers) - 1
  dfdp = fac.loss_grad
  deltas = [dfdp @ jac for jac in fac.jacobians] + [dfdp]           # df/dz_k
  bias = 1.0 if layers[0].bias is not None else 0.0
  nv = [v @ v + bias for v in fac.inputs]                           # ||[v, 1]||^2
  nd = [d @ d for d in deltas]
  sqnorm = sum(a * b for a, b in zip(nv, nd))
  smooth = not layers_lib.is_piecewise_linear(activation)
  acc, dv = 0.0, None
  df_dv = [layers[k + 1].kernel @ deltas[k + 1] for k in range(n)]
  for k in range(n + 1):
    dz = -nv[k] * deltas[k]                                         # v phi + beta
    if dv is not None:
      dz = dz + dv @ layers[k].kernel
      acc = acc - 2.0 * (dv @ fac.inputs[k]) * nd[k]                # eqs. 35-36
    if k < n:
      if smooth:                                                    # app. B.3
        acc = acc + df_dv[k] @ (fac.act_second[k] * dz * dz)
      dv = fac.act_grads[k] * dz
  curvature = dz @ fac.loss_hess @ dz + acc
  return -sqnorm, curvature, sqnorm


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def per_sample_own_directional(model: MLP, params: Any, x: Any,
                               labels: Any) -> Directional:
  """Slope, curvature and squared norm of each f_i along its own -grad f_i.

  Returns:
    `Directional` with [B] fields: s_i = -||grad f_i||^2,
    h_i = grad f_i^T (Hessian of f_i) grad f_i, ||grad f_i||^2. Exact; no
    per-sample gradient is formed.
  """
  layers = layers_lib.as_layers(model, params)
  x, labels = factors_lib.check_batch(layers, x, labels)
  fn = lambda xi, yi: _sample_own_gradient(layers, model.activation, xi, yi)
  return Directional(*jax.vmap(fn)(x, labels))


@functools.partial(jax.jit, static_argnames=("model", "averaging"))
@layers_lib.exact_matmuls
def averaged_sgd_update(model: MLP, params: Any, x: Any, labels: Any,
                        sigma: float, averaging: str = "batch") -> AveragedStep:
  """One SGD+CR step with one of section 3.1's three averaging options.

  The base learning rate cancels out of every option (alpha is solved along
  the direction), so none is taken.

  Args:
    model: an `lrcr.MLP`.
    params: its parameters.
    x: inputs [B, d_0].
    labels: integer labels [B].
    sigma: the cubic weight (paper convention, sigma/6).
    averaging: "batch" (the paper), "mean_alpha" (E[alpha] E[g]) or
      "mean_alpha_g" (E[alpha g]).

  Returns:
    `AveragedStep(updates, alpha, alphas)`.

  Raises:
    ValueError: for an unknown averaging.
  """
  if averaging not in AVERAGINGS:
    raise ValueError(f"averaging={averaging!r}: expected one of {AVERAGINGS}.")
  batch = x.shape[0]
  def weighted_loss(p, w):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": layers_lib.unwrap(p)}, x), labels)
    return jnp.sum(w * losses)

  ones = jnp.full((batch,), 1.0 / batch, x.dtype)
  loss, grads = jax.value_and_grad(weighted_loss)(params, ones)   # F, grad F
  gsq = optax.tree.norm(grads, squared=True)
  if averaging == "batch":
    g = jax.tree.map(jnp.negative, grads)
    d = directional(model, params, x, labels, g)
    alpha = cubic.cubic_step_length(d.slope, d.curvature, d.sqnorm, sigma)
    return AveragedStep(jax.tree.map(lambda u: alpha * u, g), alpha,
                        jnp.full((batch,), alpha), loss, grads)
  own = per_sample_own_directional(model, params, x, labels)
  alphas = cubic.cubic_step_length(own.slope, own.curvature, own.sqnorm,
                                   sigma)                          # [B]
  if averaging == "mean_alpha":
    alpha = alphas.mean()
    updates = jax.tree.map(lambda gr: -alpha * gr, grads)
  else:
    weighted = jax.grad(weighted_loss)(params, jax.lax.stop_gradient(alphas)
                                       / batch)
    updates = jax.tree.map(jnp.negative, weighted)                # E[alpha_i g_i]
    alpha = optax.tree.vdot(updates, jax.tree.map(jnp.negative, grads)) / \
        jnp.where(gsq > 0, gsq, 1.0)
  return AveragedStep(updates, alpha, alphas, loss, grads)
