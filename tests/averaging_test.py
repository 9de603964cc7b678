"""Section 3.1's averaging options against per-sample dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from lrcr import averaging
from tests import reference


@pytest.mark.parametrize("act,bias", [(jax.nn.relu, False), (jnp.tanh, True),
                                      (jax.nn.softplus, False)])
def test_per_sample_own_directional_matches_dense(act, bias):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(2, (5, 4, 6), 4, 5, 3,
                                                 activation=act, use_bias=bias,
                                                 scale=0.8)
    own = averaging.per_sample_own_directional(model, params, x, y)
    for i in range(x.shape[0]):
      loss, flat, _ = reference.flat_loss(model, params, x[i:i + 1], y[i:i + 1])
      g = -jax.grad(loss)(flat)
      h = jax.hessian(loss)(flat)
      np.testing.assert_allclose(own.slope[i], -(g @ g), rtol=1e-10)
      np.testing.assert_allclose(own.sqnorm[i], g @ g, rtol=1e-10)
      np.testing.assert_allclose(own.curvature[i], g @ h @ g, rtol=1e-10,
                                 atol=1e-15)


def test_the_three_averagings_match_their_definitions():
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(3, (6, 5), 4, 6, 3, scale=0.8)
    sigma = 50.0
    per_grads = []
    for i in range(x.shape[0]):
      loss, flat, unravel = reference.flat_loss(model, params, x[i:i + 1],
                                                y[i:i + 1])
      per_grads.append(jax.grad(loss)(flat))
    per_grads = jnp.stack(per_grads)                              # [B, P]
    mean_grad = per_grads.mean(0)
    own = averaging.per_sample_own_directional(model, params, x, y)
    alphas = lrcr.cubic_step_length(own.slope, own.curvature, own.sqnorm,
                                    sigma)
    assert float(alphas.std()) > 0

    step = averaging.averaged_sgd_update(model, params, x, y, sigma=sigma, averaging="mean_alpha_g")
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -(alphas[:, None] * per_grads).mean(0),
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(step.alphas, alphas, rtol=1e-12)

    step = averaging.averaged_sgd_update(model, params, x, y, sigma=sigma, averaging="mean_alpha")
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -alphas.mean() * mean_grad, rtol=1e-10,
                               atol=1e-15)

    step = averaging.averaged_sgd_update(model, params, x, y, sigma=sigma, averaging="batch")
    g = jax.tree.map(jnp.negative, jax.grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params))
    d = lrcr.directional(model, params, x, y, g)
    alpha = lrcr.cubic_step_length(d.slope, d.curvature, d.sqnorm, sigma)
    np.testing.assert_allclose(step.alpha, alpha, rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(step.updates)[0],
                               -alpha * mean_grad, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="averaging"):
      averaging.averaged_sgd_update(model, params, x, y, sigma=sigma, averaging="median")


def test_any_loss_fn_works_and_a_sample_is_a_batch_of_one():
  """A hand-written loss (mean squared error of a tanh model) per sample."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (3, 2), jnp.float64)}
    x = jax.random.normal(k[1], (4, 3), jnp.float64)
    t = jax.random.normal(k[2], (4, 2), jnp.float64)
    loss_fn = lambda p, x, t: jnp.mean((jnp.tanh(x @ p["w"]) - t) ** 2)
    own = averaging.per_sample_own_directional(loss_fn, params, x, t)
    for i in range(4):
      flat, unravel = ravel_pytree(params)
      f = lambda w: loss_fn(unravel(w), x[i:i + 1], t[i:i + 1])
      g = -jax.grad(f)(flat)
      np.testing.assert_allclose(own.curvature[i], g @ jax.hessian(f)(flat) @ g,
                                 rtol=1e-10)
