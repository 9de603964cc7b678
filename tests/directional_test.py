"""Exactness of lrcr.directional against a dense jax.hessian, in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcr
from tests import reference

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh,
               "softplus": jax.nn.softplus, "gelu": jax.nn.gelu}

# 24 cases: depth 1-6, uneven widths, 2-10 classes, 4 activations, +-bias,
# and three kinds of direction.
_rng = np.random.default_rng(0)
CASES = []
for i, (act, bias, kind) in enumerate(itertools.product(
    ACTIVATIONS, (False, True), ("random", "grad", "neg_grad"))):
  depth = 1 + i % 6
  hidden = tuple(int(w) for w in _rng.integers(2, 9, size=depth))
  classes = int(2 + (i * 3) % 9)
  CASES.append((i, act, bias, kind, hidden, classes))


def _direction(kind, seed, model, params, x, y):
  if kind == "random":
    return reference.random_direction(seed, params)
  grad = jax.jit(jax.grad(
      lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y)))(params)
  return grad if kind == "grad" else jax.tree.map(jnp.negative, grad)


@pytest.mark.parametrize("seed,act,bias,kind,hidden,classes", CASES)
def test_matches_dense_hessian(seed, act, bias, kind, hidden, classes):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(
        seed, hidden, classes, batch=7, d0=5, activation=ACTIVATIONS[act],
        use_bias=bias)
    g = _direction(kind, seed + 100, model, params, x, y)
    slope, curv, sqnorm = reference.dense_reference(model, params, x, y, g)
    d = lrcr.directional(model, params, x, y, g)
    assert d.curvature.dtype == jnp.float64
    np.testing.assert_allclose(d.slope, slope, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d.curvature, curv, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d.sqnorm, sqnorm, rtol=1e-12)
    if kind == "grad":
      assert d.slope > 0        # a non-descent direction
    if kind == "neg_grad":
      assert d.slope < 0
    # The generic forward-over-forward path agrees too.
    loss = lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y)
    a = jax.jit(lambda p, g: lrcr.autodiff_directional(loss, p, g))(params, g)
    np.testing.assert_allclose(a.curvature, curv, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.slope, slope, rtol=1e-10, atol=1e-14)


def test_curvature_is_not_gauss_newton():
  """The residual (df/dp . d2p) part is present: H differs from GN here."""
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(3, (6, 5, 4), 4, 8, 5,
                                                 activation=jnp.tanh)
    g = reference.random_direction(9, params)
    loss, flat, unravel = reference.flat_loss(model, params, x, y)
    gf, _ = jax.flatten_util.ravel_pytree(g)
    # Gauss-Newton: J^T H_p J from the logits' Jacobian.
    logits = lambda w: model.apply(unravel(w), x)
    dp = jax.jvp(logits, (flat,), (gf,))[1]
    q = jax.nn.softmax(logits(flat))
    gn = jnp.mean(jnp.sum(q * dp * dp, -1) - jnp.sum(q * dp, -1) ** 2)
    d = lrcr.directional(model, params, x, y, g)
    _, curv, _ = reference.dense_reference(model, params, x, y, g)
    np.testing.assert_allclose(d.curvature, curv, rtol=1e-10)
    assert abs(float(d.curvature - gn)) > 1e-3 * abs(float(curv))


def test_lowrank_and_autodiff_agree_on_paper_net_float32():
  model = lrcr.MLP([128] * 12, 10, kernel_init=lrcr.uniform_init(0.2))
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(k[0], (32, 784))
  y = jax.random.randint(k[1], (32,), 0, 10)
  params = model.init(k[2], x)
  assert lrcr.num_params(params) == 784 * 128 + 11 * 128 * 128 + 128 * 10
  loss = lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grad = jax.grad(loss)(params)
  for g in (jax.tree.map(jnp.negative, grad),
            reference.random_direction(1, params)):
    d = lrcr.directional(model, params, x, y, g)
    a = jax.jit(lambda p, g: lrcr.autodiff_directional(loss, p, g))(params, g)
    assert d.curvature.dtype == jnp.float32
    np.testing.assert_allclose(d.slope, a.slope, rtol=1e-4)
    np.testing.assert_allclose(d.curvature, a.curvature, rtol=1e-4)
    np.testing.assert_allclose(d.sqnorm, a.sqnorm, rtol=1e-5)


def test_value_and_directional_returns_the_loss():
  model, params, x, y = reference.make_problem(1, (4, 3), 3, 5, 4,
                                               dtype=jnp.float32)
  g = reference.random_direction(2, params)
  f, d = lrcr.value_and_directional(model, params, x, y, g)
  np.testing.assert_allclose(
      f, lrcr.cross_entropy_loss(model.apply(params, x), y), rtol=1e-6)
  np.testing.assert_allclose(d.curvature,
                             lrcr.directional(model, params, x, y, g).curvature,
                             rtol=1e-6)


def test_zero_direction_and_inner_params_dict():
  model, params, x, y = reference.make_problem(1, (4, 3), 3, 5, 4,
                                               dtype=jnp.float32)
  zero = jax.tree.map(jnp.zeros_like, params)
  d = lrcr.directional(model, params["params"], x, y, zero["params"])
  assert float(d.slope) == 0.0 and float(d.curvature) == 0.0
  assert float(d.sqnorm) == 0.0


def test_errors_are_clear():
  model, params, x, y = reference.make_problem(1, (4, 3), 3, 5, 4,
                                               dtype=jnp.float32)
  g = reference.random_direction(2, params)
  with pytest.raises(TypeError, match="autodiff_curvature_fn"):
    lrcr.directional(object(), params, x, y, g)
  with pytest.raises(TypeError, match="autodiff_curvature_fn"):
    lrcr.lowrank_curvature_fn(lrcr.mlp.nn.Dense(3), x, y)
  bad = jax.tree.map(lambda a: a[..., :1], g)
  with pytest.raises(ValueError, match="shaped like params"):
    lrcr.directional(model, params, x, y, bad)
  with pytest.raises(ValueError, match="Flatten"):
    lrcr.directional(model, params, x[:, None, :], y, g)
  with pytest.raises(ValueError, match="labels"):
    lrcr.directional(model, params, x, y[:2], g)
  with pytest.raises(ValueError, match="expected keys"):
    lrcr.directional(model, {"params": {"foo": 1}}, x, y, g)
  biased = lrcr.MLP((4, 3), 3, use_bias=True)
  with pytest.raises(ValueError, match="use_bias"):
    lrcr.directional(biased, params, x, y, g)
