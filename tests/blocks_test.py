"""Hessian diagonal and per-layer blocks against dense jax.hessian, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from tests import reference

CASES = [(0, (4, 5, 3), jax.nn.relu, False), (1, (6,), jax.nn.relu, True),
         (2, (3, 4, 5, 2), jnp.tanh, False), (3, (5, 3), jnp.tanh, True),
         (4, (4, 4, 4), jax.nn.softplus, True), (5, (2, 6), jax.nn.gelu, False),
         (6, (7, 3, 5, 4, 3), jax.nn.sigmoid, True)]


def _dense(model, params, x, y):
  loss, flat, unravel = reference.flat_loss(model, params, x, y)
  return jax.jit(jax.hessian(loss))(flat), jax.jit(jax.grad(loss))(flat), unravel


def _layer_masks(direction):
  inner = direction["params"]
  for name in inner:
    masked = jax.tree.map(jnp.zeros_like, direction)
    masked["params"][name] = inner[name]
    yield name, ravel_pytree(masked)[0]


@pytest.mark.parametrize("seed,hidden,act,bias", CASES)
def test_hessian_diagonal_and_blocks_match_dense(seed, hidden, act, bias):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(seed, hidden, 5, 6, 4,
                                                 activation=act, use_bias=bias,
                                                 scale=0.8)
    hess, grad, _ = _dense(model, params, x, y)
    diag, _ = ravel_pytree(lrcr.hessian_diagonal(model, params, x, y))
    np.testing.assert_allclose(diag, jnp.diag(hess), rtol=1e-10, atol=1e-15)

    g = reference.random_direction(seed + 7, params)
    blocks = lrcr.layer_directional(model, params, x, y, g)
    for name, m in _layer_masks(g):
      np.testing.assert_allclose(blocks.curvature["params"][name], m @ hess @ m,
                                 rtol=1e-10, atol=1e-15)
      np.testing.assert_allclose(blocks.slope["params"][name], m @ grad,
                                 rtol=1e-10, atol=1e-15)
      np.testing.assert_allclose(blocks.sqnorm["params"][name], m @ m,
                                 rtol=1e-12)
    # The slopes and norms add up to the global ones; the curvatures do not
    # (the off-diagonal blocks are missing).
    gf, _ = ravel_pytree(g)
    total = lambda t: sum(jax.tree.leaves(t))
    np.testing.assert_allclose(total(blocks.slope), gf @ grad, rtol=1e-10)
    np.testing.assert_allclose(total(blocks.sqnorm), gf @ gf, rtol=1e-12)

    var = lrcr.variable_directional(model, params, x, y, g)
    np.testing.assert_allclose(ravel_pytree(var.slope)[0], gf * grad,
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ravel_pytree(var.curvature)[0],
                               gf * gf * jnp.diag(hess), rtol=1e-10, atol=1e-15)


def test_relu_diagonal_equals_gauss_newton_diagonal():
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(8, (5, 4, 6), 4, 7, 3,
                                                 scale=0.8)
    loss, flat, unravel = reference.flat_loss(model, params, x, y)
    logits = lambda w: model.apply(unravel(w), x)                    # [B, C]
    jac = jax.jacfwd(logits)(flat)                                   # [B, C, P]
    q = jax.nn.softmax(logits(flat))
    hp = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(q)
    gn = jnp.einsum("bcp,bcd,bdp->p", jac, hp, jac) / x.shape[0]
    diag, _ = ravel_pytree(lrcr.hessian_diagonal(model, params, x, y))
    np.testing.assert_allclose(diag, gn, rtol=1e-10, atol=1e-15)
    # ...while for tanh the residual terms make them differ.
    model_t, params_t, x, y = reference.make_problem(8, (5, 4, 6), 4, 7, 3,
                                                     activation=jnp.tanh,
                                                     scale=0.8)
    hess, _, _ = _dense(model_t, params_t, x, y)
    loss, flat, unravel = reference.flat_loss(model_t, params_t, x, y)
    logits = lambda w: model_t.apply(unravel(w), x)
    jac = jax.jacfwd(logits)(flat)
    q = jax.nn.softmax(logits(flat))
    hp = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(q)
    gn = jnp.einsum("bcp,bcd,bdp->p", jac, hp, jac) / x.shape[0]
    assert float(jnp.max(jnp.abs(jnp.diag(hess) - gn))) > 1e-4
