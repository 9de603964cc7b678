"""The networks of the configs (`config.model.kind`): "mlp", the paper's net
(`lrcr.MLP`, eqs. 10-16), "cnn" (`CNN`) and "rnn" (`RNN`, eq. 58, over the
rows of an image; appendix B.2).

    model = make_model(config.model, num_classes)
    logits = model.apply({"params": params}, x)      # [B, C]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lrcr

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "tanh": jnp.tanh}
KINDS = ("mlp", "cnn", "rnn")


class CNN(nn.Module):
  """3x3 convolutions (stride 1, SAME), each followed by a 2x2 max pool if
  its index is in `pool_after`, then dense layers and the logits."""
  conv_features: Sequence[int]
  pool_after: Sequence[int]
  dense_features: Sequence[int]
  num_classes: int
  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
  use_bias: bool = False
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:   # [B, H, W, C] -> [B, K]
    dense = functools.partial(nn.Dense, use_bias=self.use_bias,
                              kernel_init=self.kernel_init)
    for i, features in enumerate(self.conv_features):
      x = nn.Conv(features, (3, 3), padding="SAME", use_bias=self.use_bias,
                  kernel_init=self.kernel_init)(x)
      x = self.activation(x)
      if i in self.pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for features in self.dense_features:
      x = self.activation(dense(features)(x))
    return dense(self.num_classes)(x)


class RNN(nn.Module):
  """v_t = A(x_t V + b + v_{t-1} W), v_0 = 0, then logits from v_T (eq. 58).

  `nn.SimpleCell` always has the bias b; `use_bias` is the logits layer's.
  """
  features: int
  num_classes: int
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:   # [B, T, d] -> [B, K]
    cell = nn.SimpleCell(self.features, activation_fn=self.activation,
                         kernel_init=self.kernel_init,
                         recurrent_kernel_init=self.kernel_init)
    states = nn.RNN(cell)(x)                         # [B, T, features]
    return nn.Dense(self.num_classes, use_bias=self.use_bias,
                    kernel_init=self.kernel_init)(states[:, -1])


def make_model(model_config: Any, num_classes: int) -> nn.Module:
  """The network of `config.model`, its weights ~ U(-init_scale, init_scale);
  ValueError for an unknown `model.kind` or `model.activation`."""
  kind = model_config.get("kind", "mlp")
  name = model_config.get("activation", "relu")
  if kind not in KINDS or name not in ACTIVATIONS:
    raise ValueError(
        f"config.model.kind={kind!r}, config.model.activation={name!r}: "
        f"expected a kind among {', '.join(KINDS)} and an activation among "
        f"{', '.join(ACTIVATIONS)}.")
  kwargs = dict(activation=ACTIVATIONS[name], use_bias=model_config.use_bias,
                kernel_init=lrcr.uniform_init(model_config.init_scale))
  if kind == "mlp":
    return lrcr.MLP(hidden_sizes=(model_config.width,) * model_config.depth,
                    num_classes=num_classes, **kwargs)
  if kind == "cnn":
    return CNN(tuple(model_config.conv_features),
               tuple(model_config.pool_after),
               tuple(model_config.dense_features), num_classes, **kwargs)
  return RNN(model_config.width, num_classes, **kwargs)
