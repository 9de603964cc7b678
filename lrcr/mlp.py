"""The paper's feedforward network (eqs. 10-13) as a flax module.

Its loss, eqs. 14-16, is `lrcr.losses.cross_entropy_loss`.

    v_0 = x                                  # eq. 12
    z_k = v_{k-1} W_k (+ b_k),  v_k = A(z_k)  # eq. 10, k = 1..n
    p   = v_n U (+ c)                        # eq. 13, the logits

flax stores a kernel as [d_in, d_out], so `z = v @ W` with v a row vector: the
paper's `w_i^{(k),j} v^{(k-1),i}` with W transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def num_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
