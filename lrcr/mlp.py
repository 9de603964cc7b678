"""The paper's feedforward network (eqs. 10-16) as a flax module, and its loss.

    v_0 = x                                  # eq. 12
    z_k = v_{k-1} W_k (+ b_k),  v_k = A(z_k)  # eq. 10, k = 1..n
    p   = v_n U (+ c)                        # eq. 13, the logits
    f   = -log softmax(p)[y]                 # eqs. 14-15
    F   = mean over the batch of f           # eq. 16

flax stores a kernel as [d_in, d_out], so `z = v @ W` with v a row vector: the
paper's `w_i^{(k),j} v^{(k-1),i}` with W transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
Initializer = Callable[..., Array]


def uniform_init(scale: float) -> Initializer:
  """Kernel initializer drawing every weight from U(-scale, scale).

  Appendix A of the paper uses scale 0.1 to start the 12x128 net on a plateau,
  and 0.2 otherwise.

  Args:
    scale: half-width of the interval; must be positive.

  Returns:
    A flax initializer `init(key, shape, dtype) -> Array`.

  Raises:
    ValueError: if `scale` is not positive.
  """
  if not scale > 0:
    raise ValueError(f"uniform_init(scale={scale!r}): scale must be > 0.")

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

  return init


class MLP(nn.Module):
  """Fully connected network of eqs. 10-13: hidden layers, then linear logits.

  Parameters live under `params/hidden_{k}` (k = 0..n-1, the paper's W^(k+1))
  and `params/output` (the paper's U), each with a `kernel` [d_in, d_out] and,
  when `use_bias`, a `bias` [d_out]. lrcr's engine reads any model's program;
  this layout only names the paper's layers in per-layer results.

  Attributes:
    hidden_sizes: widths d_1..d_n of the hidden layers.
    num_classes: C, the number of logits.
    activation: elementwise A of eq. 10 (ReLU in the paper, eq. 11).
    use_bias: add biases. The paper has none.
    kernel_init: initializer of every kernel, e.g. `uniform_init(0.1)`.
    bias_init: initializer of every bias.
  """

  hidden_sizes: Sequence[int]
  num_classes: int
  activation: Callable[[Array], Array] = jax.nn.relu
  use_bias: bool = False
  kernel_init: Initializer = uniform_init(0.2)
  bias_init: Initializer = nn.initializers.zeros

  def __post_init__(self):
    # A tuple keeps the module hashable, so it can be a static jit argument.
    object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps inputs [..., d_0] to logits p [..., C]."""
    v = x
    for k, width in enumerate(self.hidden_sizes):
      z = nn.Dense(width, use_bias=self.use_bias, kernel_init=self.kernel_init,
                   bias_init=self.bias_init, name=f"hidden_{k}")(v)  # eq. 10
      v = self.activation(z)
    return nn.Dense(self.num_classes, use_bias=self.use_bias,
                    kernel_init=self.kernel_init, bias_init=self.bias_init,
                    name="output")(v)  # eq. 13


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


def num_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
