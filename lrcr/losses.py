"""The paper's loss: mean softmax cross-entropy over integer labels.

    f   = -log softmax(p)[y]                 # eqs. 14-15
    F   = mean over the batch of f           # eq. 16

A leaf module: the engine's public API (`lrcr.curvature`) uses it for flax
classifier modules without importing the paper's network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


def cross_entropy_loss(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy over integer labels, F of eqs. 14-16.

  Labels are checked when their values are known: eagerly, and under
  `jax.grad` or `jax.jit` of a function that closes over concrete labels.
  When they are traced (labels passed as an argument of a jitted function)
  they cannot be checked: an out-of-range label (>= C, or < 0, which would
  otherwise wrap around) then makes that sample's loss NaN, and with it the
  batch loss, the slope and curvature computed by differentiating it
  (`lrcr.autodiff_curvature_fn`, the engine) and the gradient of every
  weight that sample reaches: never a finite wrong number. Count it with the
  non-finite losses.

  Args:
    logits: [B, C].
    labels: [B] integers in [0, C).

  Returns:
    The scalar batch mean.

  Raises:
    ValueError: for an empty batch, labels not shaped like logits.shape[:-1],
      or concrete labels outside [0, C). These shape checks hold under `jit`
      too.
  """
  logits = jnp.asarray(logits)
  num_classes = logits.shape[-1] if logits.ndim else 0
  if jnp.shape(labels) != logits.shape[:-1]:
    raise ValueError(
        f"cross_entropy_loss: labels have shape {jnp.shape(labels)} but "
        f"logits {logits.shape}; expected labels of shape "
        f"{logits.shape[:-1]}, one integer class per row of logits.")
  if logits.size == 0:
    raise ValueError(
        f"cross_entropy_loss: empty batch (logits of shape {logits.shape}); "
        "the mean over no samples is undefined. Pass at least one sample "
        "(check the batch size and the data split).")
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    bad = (values < 0) | (values >= num_classes)
    if np.any(bad):
      raise ValueError(
          f"cross_entropy_loss: labels must be integers in [0, {num_classes})"
          f" for the {num_classes} classes of logits.shape[-1]; got "
          f"{np.unique(values[bad])[:10].tolist()} in {int(bad.sum())} of "
          f"{values.size} samples (first at index "
          f"{np.argwhere(bad)[0].tolist()}). Make the model's number of "
          "classes match the data (lrcr.MLP(..., num_classes)), or remap "
          "the labels to 0..C-1.")
  labels = jnp.asarray(labels)
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  # Traced labels are not checked: a label outside [0, C) makes its loss
  # NaN. Multiplying (not adding) carries the NaN into every derivative.
  valid = (labels >= 0) & (labels < num_classes)
  per_sample = per_sample * jnp.where(valid, 1.0, jnp.nan).astype(
      per_sample.dtype)
  return per_sample.mean()
