"""The cached (fused) CR path equals lrcr.directional and jax.grad exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from lrcr import fused
from tests import reference

# Widths of 24-40 at batch 7 make the Gram form the cheaper one (and so the
# one taken) on the wide layers; the narrow ones take the plain products.
CASES = [(0, (5, 7, 4), jax.nn.relu, False), (1, (30, 40), jnp.tanh, True),
         (2, (4, 30, 30, 30, 5), jax.nn.softplus, False),
         (3, (32, 24), jax.nn.gelu, True), (4, (36, 36, 36), jax.nn.relu, True)]


@pytest.mark.parametrize("seed,hidden,act,bias", CASES)
def test_cached_path_is_exact(seed, hidden, act, bias):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(seed, hidden, 4, 7, 40,
                                                 activation=act, use_bias=bias)
    loss, grads, cache = fused.value_grad_and_cache(model, params, x, y)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-14),
                 grads, ref_grads)
    for g in (reference.random_direction(seed, params),
              jax.tree.map(lambda a: -0.37 * a, grads)):
      _, curv, _ = reference.dense_reference(model, params, x, y, g)
      d = fused.cached_directional(model, params, cache, g)
      ref = lrcr.directional(model, params, x, y, g)
      np.testing.assert_allclose(d.curvature, curv, rtol=1e-10)
      np.testing.assert_allclose(d.slope, ref.slope, rtol=1e-12)
      np.testing.assert_allclose(d.sqnorm, ref.sqnorm, rtol=1e-12)
    # The Gram-matrix path for gradient-proportional directions (SGD).
    for scale in (-0.37, 2.5, 0.0):
      g = jax.tree.map(lambda a: scale * a, grads)
      slope, curv, sqnorm = reference.dense_reference(model, params, x, y, g)
      d = fused.cached_directional(model, params, cache, g,
                                   gradient_direction=True)
      np.testing.assert_allclose(d.curvature, curv, rtol=1e-10, atol=1e-16)
      np.testing.assert_allclose(d.slope, slope, rtol=1e-10, atol=1e-16)
      np.testing.assert_allclose(d.sqnorm, sqnorm, rtol=1e-10, atol=1e-16)


def test_cached_curvature_fn_in_a_chain_matches_lowrank_curvature_fn():
  model, params, x, y = reference.make_problem(0, (16, 16), 10, 8, 12,
                                               dtype=jnp.float32)
  tx = lrcr.cubic_sgd(sigma=100.0, learning_rate=0.02)
  state = tx.init(params)
  _, grads, cache = fused.value_grad_and_cache(model, params, x, y)
  u_ref, s_ref = tx.update(grads, state, params,
                           curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
  for gram in (False, True):
    u, s = tx.update(grads, state, params,
                     curvature_fn=fused.cached_curvature_fn(model, cache, gram))
    np.testing.assert_allclose(optax.tree.get(s, "learning_rate"),
                               optax.tree.get(s_ref, "learning_rate"), rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-9), u, u_ref)


def test_gram_path_falls_back_when_the_output_gradient_is_zero():
  """c = <g, grad>/||grad||^2 is read off the output layer; when that layer's
  gradient vanishes, the whole tree is used."""
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(2, (30, 30), 4, 6, 40)
    loss, grads, cache = fused.value_grad_and_cache(model, params, x, y)
    zero_out = jax.tree.map(jnp.zeros_like, grads["params"]["output"])
    grads = {"params": dict(grads["params"], output=zero_out)}
    cache = cache._replace(grads=grads)
    g = jax.tree.map(lambda a: -0.5 * a, grads)
    d = fused.cached_directional(model, params, cache, g, True)
    gf = ravel_pytree(g)[0]
    gr = ravel_pytree(grads)[0]
    np.testing.assert_allclose(d.slope, gf @ gr, rtol=1e-12)
    np.testing.assert_allclose(d.sqnorm, gf @ gf, rtol=1e-12)
