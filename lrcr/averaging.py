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

The per-sample numbers come from the same engine as everything else
(`lrcr.value_grad_and_curvature`), vectorized over the samples with
`jax.vmap`: each sample is a batch of one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrcr import cubic
from lrcr import curvature
from lrcr import engine
from lrcr import samples
from lrcr.types import Directional

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


def _per_sample(loss_fn, params, batch, what: str):
  """Per sample i: (grad f_i, Directional of f_i along -grad f_i).

  Raises:
    UnsupportedProgramError: if the loss is not a sum of per-sample terms
      (then f_i on a sample alone is not its share of F).
  """
  samples.check_separable(
      engine.trace(loss_fn, params, batch), what,
      "Use averaging='batch' (the paper's choice), exact for any loss.",
      strict=True)

  def one(*sample):
    single = [s[None] for s in sample]                # a batch of one
    _, grads, curvature_fn = curvature.value_grad_and_curvature(
        loss_fn, params, *single)
    return grads, curvature_fn(params, jax.tree.map(jnp.negative, grads))

  return jax.vmap(one)(*batch)


def per_sample_own_directional(model_or_loss: Any, params: Any,
                               *batch: Any) -> Directional:
  """Slope, curvature and squared norm of each f_i along its own -grad f_i.

  Args:
    model_or_loss: `loss_fn(params, *batch) -> scalar` (a mean or sum over
      rows; f_i is its value on row i alone), or a flax module (its softmax
      cross-entropy on `batch = (x, labels)`).
    params: the point.
    *batch: arrays with the samples along the leading axis.

  Returns:
    `Directional` with [B] fields: s_i = -||grad f_i||^2,
    h_i = grad f_i^T (Hessian of f_i) grad f_i, ||grad f_i||^2. Exact.

  Raises:
    UnsupportedProgramError: for a loss that couples its samples (a softmax,
      a centring or batch statistics over the batch); it names the
      operation.
  """
  fn = curvature.as_loss_fn(model_or_loss, *batch)
  return _per_sample(fn, params, batch, "per_sample_own_directional")[1]


def averaged_sgd_update(model_or_loss: Any, params: Any, *batch: Any,
                        sigma: float, averaging: str = "batch") -> AveragedStep:
  """One SGD+CR step with one of section 3.1's three averaging options.

  The base learning rate cancels out of every option (alpha is solved along
  the direction), so none is taken.

  Args:
    model_or_loss: `loss_fn(params, *batch)` (a mean over rows) or a flax
      module such as `lrcr.MLP` (its cross-entropy on (x, labels)).
    params: its parameters.
    *batch: the batch, samples along the leading axis.
    sigma: the cubic weight (paper convention, sigma/6).
    averaging: "batch" (the paper), "mean_alpha" (E[alpha] E[g]) or
      "mean_alpha_g" (E[alpha g]).

  Returns:
    `AveragedStep(updates, alpha, alphas, loss, grads)`.

  Raises:
    ValueError: for an unknown averaging.
    UnsupportedProgramError: for "mean_alpha" or "mean_alpha_g" on a loss
      that couples its samples (its per-sample terms do not exist).
  """
  if averaging not in AVERAGINGS:
    raise ValueError(f"averaging={averaging!r}: expected one of {AVERAGINGS}.")
  fn = curvature.as_loss_fn(model_or_loss, *batch)
  loss, grads, curvature_fn = curvature.value_grad_and_curvature(
      fn, params, *batch)
  size = jax.tree.leaves(batch)[0].shape[0]
  gsq = optax.tree.norm(grads, squared=True)
  if averaging == "batch":
    g = jax.tree.map(jnp.negative, grads)
    d = curvature_fn(params, g)
    alpha = cubic.cubic_step_length(d.slope, d.curvature, d.sqnorm, sigma)
    return AveragedStep(jax.tree.map(lambda u: alpha * u, g), alpha,
                        jnp.full((size,), alpha), loss, grads)
  sample_grads, own = _per_sample(fn, params, batch,
                                  f"averaging={averaging!r}")
  alphas = cubic.cubic_step_length(own.slope, own.curvature, own.sqnorm,
                                   sigma)                          # [B]
  if averaging == "mean_alpha":
    alpha = alphas.mean()
    updates = jax.tree.map(lambda gr: -alpha * gr, grads)
  else:                                                      # E[alpha_i g_i]
    updates = jax.tree.map(
        lambda gi: -jnp.tensordot(alphas, gi, axes=1) / size, sample_grads)
    alpha = optax.tree.vdot(updates, jax.tree.map(jnp.negative, grads)) / \
        jnp.where(gsq > 0, gsq, 1.0)
  return AveragedStep(updates, alpha, alphas, loss, grads)
