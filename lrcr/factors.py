"""Per-sample low-rank factors of the gradient and Hessian (section 2, app. B.1).

For one sample, every derivative of f with respect to the weights is built from
a handful of vectors and small matrices. Written with flax's [d_in, d_out]
kernels (the paper's W transposed):

    dF/dW_k = v_{k-1}^T delta_k,  delta_k = (df/dp) J_k      # eqs. 2, 28
    dF/dU   = v_n^T (df/dp)                                  # eqs. 1, 27
    J_k     = dp/dz_k = u eta^(n,k)   [C, d_k]                # eq. 23
    gamma_k = A'(z_k)                 [d_k]   (diagonal of eq. 19)

Each is a rank-1 outer product per sample (eqs. 27-28); the batch mean of them
is not rank 1. `per_sample_factors` returns the factors for a whole batch by
`jax.vmap` of a function written for one sample.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lrcr import layers as layers_lib
from lrcr import nets
from lrcr.mlp import MLP

Array = jax.Array


class Factors(NamedTuple):
  """Per-sample factors; every field has a leading batch axis B.

  Attributes:
    inputs: v^(k-1), the input of each affine layer, k = 1..n+1 (the last is
      v^(n), the input of the output layer U): tuple of [B, d_{k-1}]. Eqs.
      10, 12.
    act_grads: gamma^(k) = A'(z^(k)), the diagonal of eq. 19, k = 1..n: tuple
      of [B, d_k].
    act_second: A''(z^(k)) (the diagonal of lambda, eq. 67; zero for ReLU,
      eq. 29), k = 1..n: tuple of [B, d_k].
    jacobians: dp/dz^(k) = u eta^(n,k) (eqs. 23, 26), k = 1..n: tuple of
      [B, C, d_k].
    loss_grad: df/dp = softmax(p) - onehot(y), [B, C] (left unevaluated in
      eqs. 1-2).
    loss_hess: d2f/dp2 = diag(softmax) - softmax softmax^T, [B, C, C] (eq. 3).
  """
  inputs: tuple[Array, ...]
  act_grads: tuple[Array, ...]
  act_second: tuple[Array, ...]
  jacobians: tuple[Array, ...]
  loss_grad: Array
  loss_hess: Array


def _sample_factors(layers: list[layers_lib.Layer], activation, x: Array,
                    label: Array) -> Factors:
  """Factors of one sample. x: [d_0]; label: [] int."""
  fwd = layers_lib.forward(layers, activation, x)
  grads = fwd.act_grads                                    # gamma, eq. 19
  seconds = fwd.act_second or tuple(jnp.zeros_like(a) for a in grads)
  p = fwd.logits                                           # eq. 13
  out = layers[-1]
  q = jax.nn.softmax(p)                                    # eq. 14
  loss_grad = q - jax.nn.one_hot(label, p.shape[-1], dtype=p.dtype)
  loss_hess = jnp.diag(q) - jnp.outer(q, q)

  # dp/dv_n = U^T (eq. 26); dp/dz_k = dp/dv_k * A'(z_k); dp/dv_{k-1} = dp/dz_k W_k^T.
  jacobians = []
  dp_dv = out.kernel.T                                     # [C, d_n]
  for layer, a1 in zip(reversed(layers[:-1]), reversed(grads)):
    dp_dz = dp_dv * a1[None, :]                            # u eta^(n,k), eq. 23
    jacobians.append(dp_dz)
    dp_dv = dp_dz @ layer.kernel.T
  return Factors(fwd.inputs, grads, seconds, tuple(reversed(jacobians)),
                 loss_grad, loss_hess)


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def per_sample_factors(model: MLP, params: Any, x: Array,
                       labels: Array) -> Factors:
  """Computes the per-sample low-rank factors of an `lrcr.MLP` for a batch.

  Written for one sample and `jax.vmap`ped over the batch; jit-compatible.

  Args:
    model: the network.
    params: its parameters (`model.init(...)` output).
    x: inputs [B, d_0].
    labels: integer labels [B].

  Returns:
    `Factors`, each field with a leading batch axis. For an `lrcr.Sequential`
    network: `lrcr.nets.sequential_factors`, a dict {layer name:
    LayerFactors(inputs, deltas)} whose outer products summed over output
    positions or time steps are the per-sample weight gradients (eqs. 49, 53,
    61).

  Raises:
    TypeError: for a model the low-rank engine does not support.
    ValueError: for inputs or parameters that do not fit the model.
  """
  if isinstance(model, nets.Sequential):            # app. B.2
    return nets.sequential_factors(model, params, x, labels)
  layers = layers_lib.as_layers(model, params)
  x, labels = check_batch(layers, x, labels)
  fn = lambda xi, yi: _sample_factors(layers, model.activation, xi, yi)
  return jax.vmap(fn)(x, labels)


def factor_gradients(factors: Factors, use_bias: bool = False) -> dict:
  """Per-sample gradients rebuilt as outer products of the factors.

  Materializes B gradients; meant for checks and small-scale analysis, not for
  the training step (the engine never calls it).

    dF/dW_k = v_{k-1}^T (df/dp J_k)        # eq. 28
    dF/dU   = v_n^T df/dp                  # eq. 27

  Args:
    factors: output of `per_sample_factors`.
    use_bias: also return the bias gradients (delta_k and df/dp).

  Returns:
    A dict shaped like the MLP's params (inner dict, without the 'params'
    key), each leaf with a leading batch axis.
  """
  n = len(factors.act_grads)
  out = {}
  for k in range(n):
    delta = jnp.einsum("bc,bcd->bd", factors.loss_grad, factors.jacobians[k])
    entry = {"kernel": jnp.einsum("bi,bj->bij", factors.inputs[k], delta)}
    if use_bias:
      entry["bias"] = delta
    out[f"hidden_{k}"] = entry
  entry = {"kernel": jnp.einsum("bi,bj->bij", factors.inputs[n],
                                factors.loss_grad)}
  if use_bias:
    entry["bias"] = factors.loss_grad
  out["output"] = entry
  return out


def check_batch(layers: list[layers_lib.Layer], x: Any,
                labels: Any) -> tuple[Array, Array]:
  """Validates a batch against the first layer and the number of classes."""
  x = jnp.asarray(x)
  labels = jnp.asarray(labels)
  d0 = layers[0].kernel.shape[0]
  if x.ndim != 2 or x.shape[1] != d0:
    raise ValueError(
        f"x has shape {x.shape}; the network expects [batch, {d0}]. Flatten "
        f"the inputs, e.g. x.reshape(len(x), -1).")
  if labels.shape != (x.shape[0],):
    raise ValueError(
        f"labels have shape {labels.shape}; expected ({x.shape[0]},), one "
        f"integer class per row of x.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f"labels have dtype {labels.dtype}; pass integer class indices.")
  return x, labels
