"""Convolutional, pooling and recurrent layers (appendix B.2) against dense jax.hessian."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from lrcr import nets
from tests import reference

CASES = {
    "conv_same_s1": ((lrcr.Conv(3, (3, 3), (1, 1), "SAME"), lrcr.Activation(),
                      lrcr.Flatten()), (6, 6, 2), jax.nn.relu, False),
    "conv_valid_s2_bias": ((lrcr.Conv(4, (3, 3), (2, 2), "VALID"),
                            lrcr.Activation(), lrcr.Flatten()), (7, 7, 2),
                           jnp.tanh, True),
    "conv_same_s2_maxpool": ((lrcr.Conv(3, (2, 2), (2, 2), "SAME"),
                              lrcr.Activation(), lrcr.MaxPool((2, 2), (1, 1)),
                              lrcr.Flatten()), (8, 8, 1), jax.nn.relu, True),
    "two_convs_avgpool_dense": ((lrcr.Conv(3, (3, 3), (1, 1), "SAME"),
                                 lrcr.Activation(), lrcr.AvgPool(),
                                 lrcr.Conv(4, (2, 2), (1, 1), "VALID"),
                                 lrcr.Activation(), lrcr.Flatten(),
                                 lrcr.Dense(5), lrcr.Activation()),
                                (8, 8, 2), jax.nn.softplus, False),
    "rnn_T1": ((lrcr.Recurrent(4),), (1, 3), jnp.tanh, True),
    "rnn_T3": ((lrcr.Recurrent(5),), (3, 4), jnp.tanh, False),
    "rnn_T7_dense": ((lrcr.Recurrent(4), lrcr.Dense(5), lrcr.Activation()),
                     (7, 3), jax.nn.gelu, True),
    "rnn_relu_T5": ((lrcr.Recurrent(6),), (5, 2), jax.nn.relu, True),
    "dense_only": ((lrcr.Dense(5), lrcr.Activation(), lrcr.Dense(4),
                    lrcr.Activation()), (6,), jnp.tanh, True),
}


def _problem(name, seed=0, batch=4):
  specs, shape, act, bias = CASES[name]
  model = lrcr.Sequential(specs, 3, activation=act, use_bias=bias,
                          kernel_init=lrcr.uniform_init(0.6))
  x = jax.random.normal(jax.random.key(seed), (batch,) + shape, jnp.float64)
  y = jnp.arange(batch) % 3
  params = model.init(jax.random.key(seed + 1), x)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  return model, params, x, y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["random", "neg_grad"])
def test_exact_against_dense_hessian(name, kind):
  with jax.enable_x64(True):
    model, params, x, y = _problem(name)
    flat, unravel = ravel_pytree(params)
    loss = lambda w: lrcr.cross_entropy_loss(model.apply(unravel(w), x), y)
    grad = jax.grad(loss)(flat)
    g = (reference.random_direction(5, params) if kind == "random"
         else unravel(-grad))
    gf, _ = ravel_pytree(g)
    hess = jax.jit(jax.hessian(loss))(flat)
    d = lrcr.directional(model, params, x, y, g)
    np.testing.assert_allclose(d.slope, gf @ grad, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.curvature, gf @ hess @ gf, rtol=1e-10,
                               atol=1e-15)
    np.testing.assert_allclose(d.sqnorm, gf @ gf, rtol=1e-12)
    f, _ = lrcr.value_and_directional(model, params, x, y, g)
    np.testing.assert_allclose(f, loss(flat), rtol=1e-12)


def test_sequential_matches_mlp_engine():
  with jax.enable_x64(True):
    seq = lrcr.Sequential((lrcr.Dense(6), lrcr.Activation(), lrcr.Dense(5),
                           lrcr.Activation()), 4)
    mlp = lrcr.MLP((6, 5), 4)
    model_p, params, x, y = reference.make_problem(0, (6, 5), 4, 5, 3)
    inner = params["params"]
    seq_params = {"params": {"layer_0": inner["hidden_0"],
                             "layer_2": inner["hidden_1"],
                             "output": inner["output"]}}
    g = reference.random_direction(1, params)
    gs = {"params": {"layer_0": g["params"]["hidden_0"],
                     "layer_2": g["params"]["hidden_1"],
                     "output": g["params"]["output"]}}
    a = lrcr.directional(seq, seq_params, x, y, gs)
    b = lrcr.directional(mlp, params, x, y, g)
    np.testing.assert_allclose(a.curvature, b.curvature, rtol=1e-12)
    np.testing.assert_allclose(a.slope, b.slope, rtol=1e-12)


def test_conv_factors_sum_over_positions_with_rank_bound():
  with jax.enable_x64(True):
    model, params, x, y = _problem("conv_valid_s2_bias", batch=5)
    fac = lrcr.per_sample_factors(model, params, x, y)
    per = jax.vmap(jax.grad(lambda p, xi, yi: lrcr.cross_entropy_loss(
        model.apply(p, xi[None]), yi[None])), in_axes=(None, 0, 0))(
            params, x, y)["params"]
    conv = fac["layer_0"]
    kernel = per["layer_0"]["kernel"]                    # [B, kh, kw, C, F]
    b, kh, kw, c, f = kernel.shape
    outer = jnp.einsum("bpk,bpf->bkf", conv.inputs, conv.deltas)   # eqs. 49, 53
    rebuilt = outer.reshape(b, c, kh, kw, f).transpose(0, 2, 3, 1, 4)
    np.testing.assert_allclose(rebuilt, kernel, atol=1e-13)
    positions = conv.inputs.shape[1]
    ranks = np.linalg.matrix_rank(np.asarray(outer), tol=1e-10)
    assert np.all(ranks <= min(positions, f))
    assert np.all(ranks > 1)                  # not rank-1, unlike a dense layer
    out = fac["output"]
    np.testing.assert_allclose(jnp.einsum("bi,bj->bij", out.inputs, out.deltas),
                               per["output"]["kernel"], atol=1e-13)


@pytest.mark.parametrize("steps", [2, 5])
def test_recurrent_factors_sum_over_time_with_rank_bound(steps):
  with jax.enable_x64(True):
    model = lrcr.Sequential((lrcr.Recurrent(8),), 3, activation=jnp.tanh,
                            kernel_init=lrcr.uniform_init(0.6))
    x = jax.random.normal(jax.random.key(3), (4, steps, 6), jnp.float64)
    y = jnp.arange(4) % 3
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(4), x))
    fac = lrcr.per_sample_factors(model, params, x, y)["layer_0"]
    per = jax.vmap(jax.grad(lambda p, xi, yi: lrcr.cross_entropy_loss(
        model.apply(p, xi[None]), yi[None])), in_axes=(None, 0, 0))(
            params, x, y)["params"]["layer_0"]
    hs, xs = fac.inputs
    gw = jnp.einsum("bti,btj->bij", hs, fac.deltas)       # eq. 61
    gu = jnp.einsum("bti,btj->bij", xs, fac.deltas)
    np.testing.assert_allclose(gw, per["recurrent_kernel"], atol=1e-13)
    np.testing.assert_allclose(gu, per["input_kernel"], atol=1e-13)
    ranks = np.linalg.matrix_rank(np.asarray(gu), tol=1e-10)
    assert np.all(ranks <= steps) and np.all(ranks == min(steps, 6))


def test_unsupported_layers_get_a_clear_error():
  class Dropout:  # not a supported layer spec
    pass

  with pytest.raises(TypeError, match="Dropout.*autodiff_curvature_fn"):
    lrcr.Sequential((lrcr.Dense(3), Dropout()), 2)
  x = jnp.ones((2, 4))
  dense = nn.Dense(3)
  params = dense.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="Dense.*autodiff_curvature_fn"):
    lrcr.directional(dense, params, x, jnp.arange(2), params)
  model = lrcr.Sequential((lrcr.Conv(2), lrcr.Flatten()), 2)
  with pytest.raises(ValueError, match="granularity"):
    lrcr.lowrank_curvature_fn(model, x, jnp.arange(2), granularity="layer")


def test_sequential_trains_with_the_transform_under_jit():
  model = lrcr.Sequential((lrcr.Conv(4, (3, 3), (2, 2)), lrcr.Activation(),
                           lrcr.MaxPool(), lrcr.Flatten(), lrcr.Dense(8),
                           lrcr.Activation()), 10)
  x = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
  y = jnp.arange(8) % 10
  params = model.init(jax.random.key(1), x)
  tx = lrcr.cubic_sgd(100.0)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
    updates, state = tx.update(grads, state, params,
                               curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
    return jax.tree.map(jnp.add, params, updates), state, loss

  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert float(state[1].learning_rate) > 0
