"""A zoo of small models written as users write them, with plain flax.linen.

Each entry builds (loss_fn, params, batch) in float64 for the exactness tests
of the engine against a dense `jax.hessian`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lrcr

F64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)


class SmoothMLP(nn.Module):
  activations: tuple = (jnp.tanh, jax.nn.gelu, jax.nn.softplus)

  @nn.compact
  def __call__(self, x):
    for act in self.activations:
      x = act(nn.Dense(5, **F64)(x))
    return nn.Dense(3, **F64)(x)


class ResidualLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, **F64)(x)
    for _ in range(2):
      h = h + nn.Dense(6, **F64)(jax.nn.relu(nn.LayerNorm(**F64)(h)))
    return nn.Dense(3, **F64)(nn.LayerNorm(**F64)(h))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", **F64)(x)
    x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(1, 1), padding="SAME")
    x = nn.Conv(3, (2, 2), padding="VALID", use_bias=False, **F64)(x)
    x = nn.avg_pool(jax.nn.relu(x), (2, 2))
    return nn.Dense(3, **F64)(x.reshape(x.shape[0], -1))


class Recurrent(nn.Module):
  cell: str = "gru"

  @nn.compact
  def __call__(self, x):
    cell = (nn.GRUCell(5, **F64) if self.cell == "gru"
            else nn.OptimizedLSTMCell(5, **F64))
    h = nn.RNN(cell)(x)
    return nn.Dense(3, **F64)(h[:, -1])


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, **F64)(x)
    h = h + nn.SelfAttention(num_heads=2, qkv_features=8, **F64)(h)
    return nn.Dense(3, **F64)(h.mean(axis=1))


class DenseGeneral(nn.Module):
  """A 3-D kernel (and a 2-D bias) on a 2-D input."""

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.DenseGeneral((2, 3), **F64)(x))
    return nn.Dense(3, **F64)(h.reshape(x.shape[0], -1))


class Dropout(nn.Module):
  @nn.compact
  def __call__(self, x, key):
    h = jax.nn.relu(nn.Dense(7, **F64)(x))
    h = nn.Dropout(0.3, deterministic=False)(h, rng=key)
    return nn.Dense(3, **F64)(h)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _smoothed_ce(logits, y, eps=0.1):
  labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), eps)
  return optax.softmax_cross_entropy(logits, labels).mean()


def _mse(logits, y):
  return jnp.mean((logits - jax.nn.one_hot(y, logits.shape[-1])) ** 2)


def _init(model, key, *args):
  params = model.init(key, *args)
  return jax.tree.map(lambda a: a.astype(jnp.float64), params)


def make(name: str, seed: int = 0):
  """(loss_fn, params, batch) for a zoo entry, in float64."""
  k = jax.random.split(jax.random.key(seed), 4)
  y = jax.random.randint(k[1], (5,), 0, 3)
  if name == "paper_mlp":
    model = lrcr.MLP((6, 5, 4), 3, kernel_init=lrcr.uniform_init(0.8))
    x = jax.random.normal(k[0], (5, 4), jnp.float64)
    loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name in ("smooth_mlp", "smooth_mlp_mse", "smooth_mlp_smoothed_l2"):
    model = SmoothMLP()
    x = jax.random.normal(k[0], (5, 4), jnp.float64)
    if name == "smooth_mlp":
      loss = lambda p, x, y: _ce(model.apply(p, x), y)
    elif name == "smooth_mlp_mse":
      loss = lambda p, x, y: _mse(model.apply(p, x), y)
    else:
      loss = lambda p, x, y: (_smoothed_ce(model.apply(p, x), y) + 1e-2 *
                              optax.tree.norm(p, squared=True))
    return loss, _init(model, k[2], x), (x, y)
  if name == "dense_general":
    model = DenseGeneral()
    x = jax.random.normal(k[0], (5, 4), jnp.float64)
    loss = lambda p, x, y: _ce(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name == "residual_layernorm":
    model = ResidualLayerNorm()
    x = jax.random.normal(k[0], (5, 4), jnp.float64)
    loss = lambda p, x, y: _ce(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name in ("cnn", "cnn_mse"):
    model = CNN()
    x = jax.random.normal(k[0], (5, 7, 7, 2), jnp.float64)
    head = _ce if name == "cnn" else _mse
    loss = lambda p, x, y: head(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name in ("gru", "lstm"):
    model = Recurrent(name)
    x = jax.random.normal(k[0], (5, 4, 3), jnp.float64)
    loss = lambda p, x, y: _ce(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name == "attention":
    model = Attention()
    x = jax.random.normal(k[0], (5, 4, 3), jnp.float64)
    loss = lambda p, x, y: _ce(model.apply(p, x), y)
    return loss, _init(model, k[2], x), (x, y)
  if name == "dropout":
    model = Dropout()
    x = jax.random.normal(k[0], (5, 4), jnp.float64)
    loss = lambda p, x, y, key: _ce(model.apply(p, x, key), y)
    return loss, _init(model, k[2], x, k[3]), (x, y, k[3])
  raise KeyError(name)


NAMES = ("paper_mlp", "smooth_mlp", "smooth_mlp_mse", "smooth_mlp_smoothed_l2",
         "residual_layernorm", "cnn", "cnn_mse", "gru", "lstm", "attention",
         "dropout")


@functools.partial(jax.jit, static_argnums=0)
def dense(loss_fn, params, batch):
  """(grad, Hessian) of the flattened loss: the independent reference."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f = lambda w: loss_fn(unravel(w), *batch)
  return jax.grad(f)(flat), jax.hessian(f)(flat)


def random_like(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                   for k, a in zip(keys, leaves)])
