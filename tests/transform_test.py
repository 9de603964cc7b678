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


# --- Granularity and adaptive sigma (beyond the paper). ----------------------


@pytest.mark.parametrize("granularity", ["layer", "variable"])
def test_block_alphas_solve_each_block(granularity):
  model, params, x, y = reference.make_problem(3, (6, 5), 4, 8, 3,
                                               dtype=jnp.float32,
                                               activation=jnp.tanh,
                                               use_bias=True)
  grads = jax.grad(lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
  g = jax.tree.map(lambda a: -0.1 * a, grads)
  tx = lrcr.scale_by_cubic_step(50.0, granularity=granularity)
  fn = lrcr.lowrank_curvature_fn(model, x, y, granularity=granularity)
  updates, state = tx.update(g, tx.init(params), params, curvature_fn=fn)
  d = fn(params, g)
  alpha = jax.tree.map(lambda s, h, n: lrcr.cubic_step_length(s, h, n, 50.0),
                       d.slope, d.curvature, d.sqnorm)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               optax.tree.get(state, "learning_rate"), alpha)
  leaves = jax.tree.leaves(optax.tree.get(state, "learning_rate"))
  assert all(bool(jnp.all(jnp.isfinite(a) & (a >= 0))) for a in leaves)
  assert max(float(jnp.max(a)) for a in leaves) > 0
  # updates = alpha_block * g on every block.
  scaled = jax.tree.map(
      lambda a, sub: jax.tree.map(lambda u: a * u, sub), alpha, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-12),
               updates, scaled)


def test_layer_granularity_autodiff_matches_lowrank():
  model, params, x, y = reference.make_problem(4, (6, 5), 4, 8, 3,
                                               dtype=jnp.float32)
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  g = reference.random_direction(1, params)
  a = lrcr.autodiff_curvature_fn(loss, x, y, granularity="layer")(params, g)
  b = lrcr.lowrank_curvature_fn(model, x, y, granularity="layer")(params, g)
  for f in ("slope", "curvature", "sqnorm"):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4,
                                                         atol=1e-7),
                 getattr(a, f), getattr(b, f))
  with pytest.raises(ValueError, match="variable"):
    lrcr.autodiff_curvature_fn(loss, x, y, granularity="variable")


def test_wrong_structure_for_granularity_is_a_clear_error():
  model, params, x, y = _small()
  tx = lrcr.scale_by_cubic_step(10.0, granularity="layer")
  with pytest.raises(TypeError, match="granularity='layer'"):
    tx.update(params, tx.init(params), params,
              curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))
  with pytest.raises(ValueError, match="granularity"):
    lrcr.scale_by_cubic_step(10.0, granularity="row")


def test_adaptive_sigma_accepts_rejects_and_updates_sigma():
  model, params, x, y = _small()
  loss = lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads = jax.grad(loss)(params)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  tx = lrcr.cubic_sgd(10.0, adaptive_sigma=True)
  state = tx.init(params)
  with pytest.raises(TypeError, match="value_fn"):
    tx.update(grads, state, params, curvature_fn=fn)
  f0 = loss(params)
  # A trial loss far above the start: rho < 0.1, rejected, sigma doubles.
  u, s = tx.update(grads, state, params, curvature_fn=fn,
                   value_fn=lambda p: f0 + 10.0, value=f0)
  assert not bool(s[1].accepted) and float(s[1].sigma) == 20.0
  assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree.leaves(u))
  # A decrease far beyond the prediction: very successful, sigma halves.
  u, s = tx.update(grads, state, params, curvature_fn=fn,
                   value_fn=lambda p: f0 - 10.0, value=f0)
  assert bool(s[1].accepted) and float(s[1].sigma) == 5.0
  assert float(optax.tree.get(s, "learning_rate")) > 0
  # The real loss: rho from the true trial value, and sigma is recorded.
  u, s = tx.update(grads, state, params, curvature_fn=fn, value_fn=loss)
  step = lrcr.cubic_step(*lrcr.directional(model, params, x, y,
                                           jax.tree.map(lambda a: -a, grads)),
                         10.0)
  rho = (f0 - loss(optax.apply_updates(params, u))) / step.predicted_decrease
  assert float(s[1].sigma) == (5.0 if rho > 0.9 else 10.0 if rho >= 0.1 else 20.0)


def test_curvature_every_reuses_alpha_and_skips_the_curvature():
  model, params, x, y = _small()
  grads = jax.grad(lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(params)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  tx = lrcr.scale_by_cubic_step(10.0, curvature_every=3)
  state = tx.init(params)
  alphas = []
  for i in range(6):
    # Descent directions that differ from step to step.
    g = jax.tree.map(lambda a, r: -a * (1.0 + jnp.abs(r)), grads,
                     reference.random_direction(i, params))
    u, state = tx.update(g, state, params, curvature_fn=fn)
    alphas.append(float(optax.tree.get(state, "learning_rate")))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, alphas[-1] * b,
                                                         rtol=1e-6), u, g)
  # Refreshed on updates 0 and 3 only; in between the last alpha is reused.
  assert alphas[1] == alphas[0] == alphas[2] and alphas[4] == alphas[3] == alphas[5]
  assert alphas[3] != alphas[0]
  with pytest.raises(ValueError, match="curvature_every"):
    lrcr.scale_by_cubic_step(10.0, curvature_every=0)
  with pytest.raises(ValueError, match="adaptive_sigma"):
    lrcr.scale_by_cubic_step(10.0, curvature_every=2, adaptive_sigma=True)


def test_curvature_rows_takes_the_curvature_on_a_sub_batch():
  model, params, x, y = _small()
  loss, grads, cache = lrcr.value_grad_and_cache(model, params, x, y)
  g = reference.random_direction(3, params)
  d = lrcr.cached_directional(model, params, cache, g, curvature_rows=3)
  full = lrcr.directional(model, params, x, y, g)
  sub = lrcr.directional(model, params, x[:3], y[:3], g)
  np.testing.assert_allclose(d.slope, full.slope, rtol=1e-5)
  np.testing.assert_allclose(d.curvature, sub.curvature, rtol=1e-5)
  np.testing.assert_allclose(d.sqnorm, full.sqnorm, rtol=1e-6)
