"""scale_by_cubic_step as an optax transform: chaining, jit, scan, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrcr
from lrcr import data as data_lib
from tests import reference

SCHEDULE = optax.exponential_decay(0.02, transition_steps=100, decay_rate=0.95)
BASES = {
    "sgd": lambda lr: optax.sgd(lr),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1),
    "adadelta": lambda lr: optax.adadelta(lr, rho=0.95, eps=1e-8),
    "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}


def _small():
  return reference.make_problem(0, (6, 5), 4, 8, 3, dtype=jnp.float32)


def test_updates_are_alpha_times_direction():
  model, params, x, y = _small()
  tx = lrcr.scale_by_cubic_step(sigma=10.0)
  g = reference.random_direction(1, params)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  updates, state = tx.update(g, tx.init(params), params, curvature_fn=fn)
  d = lrcr.directional(model, params, x, y, g)
  alpha = lrcr.cubic_step_length(d.slope, d.curvature, d.sqnorm, 10.0)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), alpha)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, alpha * v, rtol=1e-6),
               updates, g)
  np.testing.assert_allclose(state.info.curvature, d.curvature, rtol=1e-6)
  np.testing.assert_allclose(state.info.slope, d.slope, rtol=1e-6)
  assert float(state.info.predicted_decrease) >= 0


def test_missing_curvature_fn_says_what_to_pass():
  model, params, x, y = _small()
  tx = lrcr.cubic_sgd(sigma=10.0)
  with pytest.raises(TypeError, match="lowrank_curvature_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="params"):
    tx.update(params, tx.init(params),
              curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
  with pytest.raises(ValueError, match="sigma"):
    lrcr.scale_by_cubic_step(0.0)


def test_base_learning_rate_cancels():
  model, params, x, y = _small()
  grads = jax.grad(lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  outs = []
  for lr in (1e-3, 1.0, SCHEDULE):
    tx = lrcr.cubic_sgd(sigma=100.0, learning_rate=lr)
    u, _ = tx.update(grads, tx.init(params), params, curvature_fn=fn)
    outs.append(u)
  for u in outs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                         atol=1e-9), u, outs[0])


def test_lowrank_and_autodiff_curvature_fn_give_same_step():
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads = jax.grad(loss)(params, x, y)
  tx = lrcr.cubic_adam(sigma=100.0)
  state = tx.init(params)
  u1, _ = tx.update(grads, state, params,
                    curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
  u2, _ = tx.update(grads, state, params,
                    curvature_fn=lrcr.autodiff_curvature_fn(loss, x, y))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-9), u1, u2)


def test_jit_does_not_recompile():
  model, params, x, y = _small()
  tx = lrcr.cubic_sgd(sigma=100.0, learning_rate=SCHEDULE)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads = jax.value_and_grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
    updates, state = tx.update(grads, state, params,
                               curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for i in range(3):
    params, state, _ = step(params, state, x + i, y)
  assert len(traces) == 1
  assert step._cache_size() == 1


@pytest.fixture(scope="module")
def mnist():
  ds = data_lib.load_dataset("mnist", "mnist_5k")
  idx = np.random.default_rng(0).permutation(len(ds.labels))[:150 * 32]
  return (jnp.asarray(ds.images[idx].reshape(150, 32, -1)),
          jnp.asarray(ds.labels[idx].reshape(150, 32)))


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("scheduled", [False, True])
def test_trains_paper_net_after_every_base_optimizer(mnist, name, scheduled):
  """150 steps of base+CR on the 12x128 net from the plateau init U(+-0.1)."""
  lr = {"sgd": 0.02, "adagrad": 0.1, "adadelta": 1.0, "adam": 1e-3,
        "rmsprop": 1e-3}[name]
  if scheduled:
    lr = optax.exponential_decay(lr, transition_steps=100, decay_rate=0.95)
  tx = optax.chain(BASES[name](lr), lrcr.scale_by_cubic_step(sigma=1000.0))
  model = lrcr.MLP([128] * 12, 10, kernel_init=lrcr.uniform_init(0.1))
  xs, ys = mnist
  params = model.init(jax.random.key(0), xs[0])

  def body(carry, batch):
    params, state = carry
    x, y = batch
    loss, grads = jax.value_and_grad(
        lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
    updates, state = tx.update(grads, state, params,
                               curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
    alpha = optax.tree.get(state, "learning_rate")
    return (optax.apply_updates(params, updates), state), (loss, alpha)

  (params, state), (losses, alphas) = jax.jit(
      lambda c, b: jax.lax.scan(body, c, b))((params, tx.init(params)), mnist)
  assert losses.shape == (150,)
  assert bool(jnp.all(jnp.isfinite(losses))), losses
  assert bool(jnp.all(jnp.isfinite(alphas))) and bool(jnp.all(alphas >= 0))
  assert float(alphas.max()) > 0          # CR did take steps
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  # The state's alpha is the last step's.
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), alphas[-1])
