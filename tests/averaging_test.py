"""Section 3.1's averaging options against per-sample dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from lrcr import averaging
from tests import reference


def _dense_per_sample(model, params, x, y):
  """Per sample i: (grad f_i, Hessian of f_i) of the flattened loss, jitted."""
  flat, unravel = ravel_pytree(params)

  def one(xi, yi):
    f = lambda w: lrcr.cross_entropy_loss(model.apply(unravel(w), xi[None]),
                                          yi[None])
    return jax.grad(f)(flat), jax.hessian(f)(flat)

  return jax.jit(jax.vmap(one))(x, y)


@pytest.mark.parametrize("act,bias", [(jax.nn.relu, False), (jnp.tanh, True),
                                      (jax.nn.softplus, False)])
def test_per_sample_own_directional_matches_dense(act, bias):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(2, (5, 4, 6), 4, 5, 3,
                                                 activation=act, use_bias=bias,
                                                 scale=0.8)
    own = jax.jit(lambda p: averaging.per_sample_own_directional(
        model, p, x, y))(params)
    grads, hessians = _dense_per_sample(model, params, x, y)
    for i in range(x.shape[0]):
      g, h = -grads[i], hessians[i]
      np.testing.assert_allclose(own.slope[i], -(g @ g), rtol=1e-10)
      np.testing.assert_allclose(own.sqnorm[i], g @ g, rtol=1e-10)
      np.testing.assert_allclose(own.curvature[i], g @ h @ g, rtol=1e-10,
                                 atol=1e-15)


def test_the_three_averagings_match_their_definitions():
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(3, (6, 5), 4, 6, 3, scale=0.8)
    sigma = 50.0
    per_grads, _ = _dense_per_sample(model, params, x, y)         # [B, P]
    mean_grad = per_grads.mean(0)
    own = jax.jit(lambda p: averaging.per_sample_own_directional(
        model, p, x, y))(params)
    alphas = lrcr.cubic_step_length(own.slope, own.curvature, own.sqnorm,
                                    sigma)
    assert float(alphas.std()) > 0

    update = jax.jit(lambda p, averaging_name: averaging.averaged_sgd_update(
        model, p, x, y, sigma=sigma, averaging=averaging_name),
                     static_argnums=1)
    step = update(params, "mean_alpha_g")
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -(alphas[:, None] * per_grads).mean(0),
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(step.alphas, alphas, rtol=1e-12)

    step = update(params, "mean_alpha")
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -alphas.mean() * mean_grad, rtol=1e-10,
                               atol=1e-15)

    step = update(params, "batch")
    g = jax.tree.map(jnp.negative, jax.grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params))
    d = lrcr.directional(model, params, x, y, g)
    alpha = lrcr.cubic_step_length(d.slope, d.curvature, d.sqnorm, sigma)
    np.testing.assert_allclose(step.alpha, alpha, rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -alpha * mean_grad, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="averaging"):
      averaging.averaged_sgd_update(model, params, x, y, sigma=sigma,
                                    averaging="median")


def test_any_loss_fn_works_and_a_sample_is_a_batch_of_one():
  """A hand-written loss (mean squared error of a tanh model) per sample."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (3, 2), jnp.float64)}
    x = jax.random.normal(k[1], (4, 3), jnp.float64)
    t = jax.random.normal(k[2], (4, 2), jnp.float64)
    loss_fn = lambda p, x, t: jnp.mean((jnp.tanh(x @ p["w"]) - t) ** 2)
    own = jax.jit(lambda p: averaging.per_sample_own_directional(
        loss_fn, p, x, t))(params)
    for i in range(4):
      flat, unravel = ravel_pytree(params)
      f = lambda w: loss_fn(unravel(w), x[i:i + 1], t[i:i + 1])
      g = -jax.grad(f)(flat)
      np.testing.assert_allclose(own.curvature[i], g @ jax.hessian(f)(flat) @ g,
                                 rtol=1e-10)
