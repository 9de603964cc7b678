"""Independent dense references for the tests: flattened loss, jax.hessian."""

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import lrcr


def make_problem(seed, hidden, classes, batch, d0, activation=jax.nn.relu,
                 use_bias=False, scale=0.5, dtype=jnp.float64):
  """A random MLP, its params (cast to dtype) and a batch."""
  k = jax.random.split(jax.random.key(seed), 4)
  model = lrcr.MLP(tuple(hidden), classes, activation=activation,
                   use_bias=use_bias, kernel_init=lrcr.uniform_init(scale),
                   bias_init=jax.nn.initializers.normal(0.3))
  x = jax.random.normal(k[0], (batch, d0), dtype)
  y = jax.random.randint(k[1], (batch,), 0, classes)
  params = model.init(k[2], x)
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  return model, params, x, y


def flat_loss(model, params, x, y):
  """F as a function of the flattened parameter vector, and that vector."""
  flat, unravel = ravel_pytree(params)

  def loss(w):
    return lrcr.cross_entropy_loss(model.apply(unravel(w), x), y)

  return loss, flat, unravel


@functools.partial(jax.jit, static_argnums=0)
def dense_reference(model, params, x, y, direction):
  """(g.grad F, g^T H g, ||g||^2) with H = jax.hessian of the flattened loss."""
  loss, flat, _ = flat_loss(model, params, x, y)
  g, _ = ravel_pytree(direction)
  hess = jax.hessian(loss)(flat)
  grad = jax.grad(loss)(flat)
  return g @ grad, g @ hess @ g, g @ g


def random_direction(seed, params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
