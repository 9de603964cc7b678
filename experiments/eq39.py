"""Eq. 39 of the paper, evaluated literally, to measure how far it is off.

A reference for analysis and tests, not the training path: the eta chains
built explicitly, at a cost quadratic in depth, exactly as eq. 39 is printed
(ReLU network without biases, appendix B.1). Per sample, with flax's
[d_in, d_out] kernels:

    a_k   = v_{k-1} phi_k                   [d_k]   the layer-k input tangent
    J_k   = dp/dz_k = u eta^(n,k)           [C, d_k]
    e_k   = sum_{r<k} eta^(k-1,r) a_r       [d_{k-1}] the tangent of v_{k-1}

Eq. 39, term by term:

    line 1: (v_n omega)^T d2f/dp2 (v_n omega)
    line 2: 2 sum_k [ df/dp . (eta^(n,k) a_k) omega
                      + (v_n omega)^T d2f/dp2 J_k a_k ]
    line 3: sum_k (J_k a_k)^T d2f/dp2 (J_k a_k)                  <- k = r only
    line 4: 2 sum_{k>r} df/dp u eta^(n,k) (eta^(k-1,r) a_r) phi_k

The exact g^T H g (`lrcr.directional`) has (sum_k J_k a_k)^T d2f/dp2 (sum_r J_r
a_r) in place of line 3: eq. 39 drops the cross-layer Gauss-Newton blocks
k != r that eq. 36 contains. `eq39(...).missing_cross_layer_gauss_newton`
is exactly those.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lrcr.mlp import MLP

Array = jax.Array


class _Factors(NamedTuple):
  """One sample's pieces of eq. 39 (appendix B.1), written out for the MLP.

  inputs: v_0..v_n; act_grads: gamma_k = A'(z_k) (eq. 19); jacobians:
  J_k = dp/dz_k = u eta^(n,k) [C, d_k] (eq. 23); loss_grad df/dp and
  loss_hess d2f/dp2 of softmax cross-entropy (eq. 3).
  """
  inputs: list
  act_grads: list
  jacobians: list
  loss_grad: Array
  loss_hess: Array


def _sample_factors(kernels: list[Array], x: Array, label: Array) -> _Factors:
  inputs, act_grads = [x], []
  for w in kernels[:-1]:
    z = inputs[-1] @ w
    act_grads.append((z > 0).astype(z.dtype))
    inputs.append(jnp.maximum(z, 0))
  p = inputs[-1] @ kernels[-1]
  q = jax.nn.softmax(p)
  jac = kernels[-1].T * act_grads[-1][None, :]                 # J_n [C, d_n]
  jacobians = [jac]
  for k in range(len(kernels) - 2, 0, -1):      # J_k = J_{k+1} W^T gamma_k
    jac = (jac @ kernels[k].T) * act_grads[k - 1][None, :]
    jacobians.insert(0, jac)
  return _Factors(inputs, act_grads, jacobians,
                  q - jax.nn.one_hot(label, q.shape[0], dtype=q.dtype),
                  jnp.diag(q) - jnp.outer(q, q))


class Eq39(NamedTuple):
  """Batch means of eq. 39 as printed and of the cross-layer blocks it omits."""
  as_printed: Array
  missing_cross_layer_gauss_newton: Array


def eq39(model: MLP, params: Any, x: Array, labels: Array,
         direction: Any) -> Eq39:
  """Evaluates eq. 39 as printed, and the cross-layer terms it leaves out.

  Only defined where eq. 39 is: a ReLU `lrcr.MLP` without biases.

  Returns:
    `Eq39(as_printed, missing_cross_layer_gauss_newton)`; for the exact
    curvature add the two.

  Raises:
    ValueError: for a model with biases or a non-ReLU activation.
  """
  if model.use_bias or model.activation is not jax.nn.relu:
    raise ValueError("eq. 39 is printed for ReLU networks without biases.")
  names = [f"hidden_{k}" for k in range(len(model.hidden_sizes))] + ["output"]
  inner = lambda tree: tree["params"] if "params" in tree else tree
  layers = [inner(params)[n]["kernel"] for n in names]
  steps = [inner(direction)[n]["kernel"] for n in names]
  printed, missing = jax.vmap(
      lambda xi, yi: _sample_eq39(layers, steps,
                                  _sample_factors(layers, xi, yi)))(x, labels)
  return Eq39(printed.mean(), missing.mean())


def _sample_eq39(layers, steps, fac: _Factors):
  n = len(layers) - 1
  hp, dfdp = fac.loss_hess, fac.loss_grad
  omega = steps[-1]
  a = [fac.inputs[k] @ steps[k] for k in range(n)]               # a_k

  def eta_apply(k_top: int, r: int, vec: Array) -> Array:
    """eta^(k_top, r) vec: a layer-r pre-activation tangent up to v_{k_top}."""
    t = fac.act_grads[r] * vec                                   # gamma, eq. 19
    for j in range(r + 1, k_top + 1):
      t = fac.act_grads[j] * (t @ layers[j])              # beta, eq. 20
    return t

  vo = fac.inputs[n] @ omega                                     # v_n omega
  line1 = vo @ hp @ vo
  line2 = sum(2.0 * (dfdp @ (eta_apply(n - 1, k, a[k]) @ omega)
                     + vo @ hp @ (fac.jacobians[k] @ a[k])) for k in range(n))
  ja = [fac.jacobians[k] @ a[k] for k in range(n)]
  line3 = sum(ja[k] @ hp @ ja[k] for k in range(n))
  line4 = 0.0
  for k in range(1, n):
    delta_k = dfdp @ fac.jacobians[k]
    for r in range(k):
      line4 = line4 + 2.0 * delta_k @ (eta_apply(k - 1, r, a[r]) @ steps[k])
  missing = sum(2.0 * ja[k] @ hp @ ja[r] for k in range(n) for r in range(k))
  return line1 + line2 + line3 + line4, jnp.asarray(missing)
