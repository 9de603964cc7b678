"""scale_by_cubic_step as an optax transform: chaining, jit, scan, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from tests import reference

SCHEDULE = optax.exponential_decay(0.02, transition_steps=100, decay_rate=0.95)
BASES = {
    "sgd": lambda lr: optax.sgd(lr),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1),
    "adadelta": lambda lr: optax.adadelta(lr, rho=0.95, eps=1e-8),
    "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}


@functools.lru_cache(maxsize=None)
def _small():
  """A random 6-5 tanh MLP with biases, its params and a batch of 8 (shared:
  building it eagerly costs more than most tests)."""
  return reference.make_problem(3, (6, 5), 4, 8, 3, dtype=jnp.float32,
                                activation=jnp.tanh, use_bias=True)


@functools.partial(jax.jit, static_argnums=0)
def _grads(model, params, x, y):
  return jax.grad(lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y))(
      params)


def _update(tx, curvature_fn, **extra):
  """tx.update, jitted (eager updates are slow), with curvature_fn bound."""
  return jax.jit(lambda g, state, params: tx.update(
      g, state, params, curvature_fn=curvature_fn, **extra))


def _curvature_fn(model, x, y, granularity):
  """The engine's curvature_fn; for "variable" a dense one (jax.hessian).

  The per-weight quantities from the dense Hessian's diagonal: g_i dF/dw_i,
  g_i^2 H_ii, g_i^2. Independent of the engine, and valid for any model.
  """
  if granularity != "variable":
    return lrcr.lowrank_curvature_fn(model, x, y, granularity=granularity)

  def curvature_fn(params, direction):
    loss, flat, unravel = reference.flat_loss(model, params, x, y)
    g = ravel_pytree(direction)[0]
    grad = jax.grad(loss)(flat)
    diag = jnp.diagonal(jax.hessian(loss)(flat))
    return lrcr.Directional(unravel(g * grad), unravel(g * g * diag),
                            unravel(g * g))

  return curvature_fn


def _const_curvature_fn(slope, curvature, sqnorm):
  return lambda params, direction: lrcr.Directional(
      jnp.float32(slope), jnp.float32(curvature), jnp.float32(sqnorm))


@pytest.mark.parametrize("granularity", ["global", "layer", "variable"])
def test_updates_are_alpha_times_direction_for_any_size(granularity):
  """alpha solves each block's model; alpha g is the update, for any |g|.

  Issue 5: an SGD direction -lr grad F with lr = 1e30 overflowed ||g||^2
  and gave alpha = 0 on every step. The update must not depend on lr from
  1e-30 (whose squares underflow float32) to 1e30 (whose squares overflow).
  """
  model, params, x, y = _small()
  grads = _grads(model, params, x, y)
  tx = lrcr.scale_by_cubic_step(50.0, granularity=granularity)
  fn = _curvature_fn(model, x, y, granularity)

  @jax.jit
  def update(lr):
    g = jax.tree.map(lambda a: -lr * a, grads)
    return g, *tx.update(g, tx.init(params), params, curvature_fn=fn)

  flat = lambda tree: np.concatenate([np.ravel(a) for a in
                                      jax.tree.leaves(tree)])
  first = None
  for lr in (1.0, 1e-30, 1e30):
    g, updates, state = update(lr)
    info = state.info
    assert bool(jnp.all(flat(info.finite)))
    alpha = optax.tree.get(state, "learning_rate")
    if first is None:
      # Each block's alpha solves its own model (one solve for all blocks).
      step = lrcr.cubic_step(flat(info.slope), flat(info.curvature),
                             flat(info.sqnorm), 50.0)
      np.testing.assert_allclose(flat(alpha), step.alpha, rtol=1e-5,
                                 atol=1e-30)
      np.testing.assert_allclose(flat(info.predicted_decrease),
                                 step.predicted_decrease, rtol=1e-5,
                                 atol=1e-30)
      assert float(jnp.max(flat(alpha))) > 0
      assert bool(jnp.all(flat(info.slope) <= 0))     # -grads descends
      # updates = alpha_block * g on every block.
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                           atol=1e-12),
                   updates, _per_block_product(alpha, g))
      first = updates, flat(alpha)
    else:
      # The same update, and alpha in units of the gradient (alpha * lr).
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                           atol=1e-12),
                   updates, first[0])
      np.testing.assert_allclose(flat(alpha) * lr, first[1], rtol=2e-5,
                                 atol=1e-30)


@pytest.mark.parametrize("sizes", [(2, 3), (40, 3)])  # Gram form / dense
def test_gradient_direction_picks_its_own_exponent_for_any_size(sizes):
  """With gradient_direction=True the engine's curvature_fn chooses the
  power of two itself (`ScalableCurvatureFn.autoscaled`): the update is
  the same for base learning rates 1e-30 to 1e30 in float32, and the same
  as the transform's own largest-entry rescaling gives."""
  batch, classes = sizes
  model, params, x, y = reference.make_problem(
      5, (6, 5), 4, batch, classes, dtype=jnp.float32, activation=jnp.tanh,
      use_bias=True)
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  tx = lrcr.scale_by_cubic_step(20.0)

  @functools.partial(jax.jit, static_argnums=1)
  def update(lr, auto):
    _, grads, fn = lrcr.value_grad_and_curvature(loss, params, x, y,
                                                 gradient_direction=True)
    assert fn.autoscaled is not None
    if not auto:     # the same engine function, rescaled by the transform
      fn = lrcr.types.ScalableCurvatureFn(fn.fn)
    g = jax.tree.map(lambda a: -lr * a, grads)
    return tx.update(g, tx.init(params), params, curvature_fn=fn)

  close = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=0), a, b)
  first, state = update(1.0, True)
  assert bool(state.info.finite) and float(state.learning_rate) > 0
  close(first, update(1.0, False)[0])
  close(state.info, update(1.0, False)[1].info)
  for lr in (1e-30, 1e30, 2.0**-100):
    updates, s = update(lr, True)
    assert bool(s.info.finite)
    close(updates, first)
    np.testing.assert_allclose(s.learning_rate * lr, state.learning_rate,
                               rtol=2e-5)


def test_gradient_direction_beyond_its_range_is_flagged_not_wrong():
  """Along grad F the sweep is not rescaled: where ||grad F||^2 leaves
  [2^-79, 2^80] in float32 (a loss times 1e20, 1e-15 or 1e-21, whose
  squares flush to zero) the step is flagged and skipped; a loss times 1e6
  gets the step of the sweep along the rescaled direction, and a zero
  gradient a zero step."""
  model, params, x, y = _small()
  tx = lrcr.scale_by_cubic_step(20.0)

  def step(scale, gradient_direction):
    loss = lambda p, x, y: scale * lrcr.cross_entropy_loss(model.apply(p, x),
                                                           y)
    _, grads, fn = lrcr.value_grad_and_curvature(
        loss, params, x, y, gradient_direction=gradient_direction)
    d = jax.tree.map(lambda a: -1e-3 * a, grads)
    return tx.update(d, tx.init(params), params, curvature_fn=fn)

  for scale in (1e20, 1e-15, 1e-21):
    u, state = step(scale, True)
    assert not bool(state.info.finite), scale
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u))
    assert bool(step(scale, False)[1].info.finite) or scale == 1e20
  u, state = step(0.0, True)
  assert bool(state.info.finite) and float(state.learning_rate) == 0.0
  u, state = step(1e6, True)
  u_ref, ref = step(1e6, False)
  assert bool(state.info.finite) and float(state.learning_rate) > 0
  np.testing.assert_allclose(state.learning_rate, ref.learning_rate,
                             rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-9), u, u_ref)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_gradient_direction_with_a_nonfinite_entry_is_no_step(bad):
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  _, grads, fn = lrcr.value_grad_and_curvature(loss, params, x, y,
                                               gradient_direction=True)
  leaves, treedef = jax.tree.flatten(jax.tree.map(jnp.negative, grads))
  leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(bad)
  tx = lrcr.scale_by_cubic_step(10.0)
  u, state = tx.update(jax.tree.unflatten(treedef, leaves), tx.init(params),
                       params, curvature_fn=fn)
  assert not bool(state.info.finite)
  assert float(state.learning_rate) == 0.0
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u))


def test_curvature_fn_sees_a_unit_direction_and_info_is_in_g_units():
  """g is divided by 2^e (max |g| 2^-e in [0.5, 1)), exactly, and back."""
  seen = []

  def fn(params, direction):
    seen.append(direction)
    return lrcr.Directional(jnp.float32(-0.5), jnp.float32(0.25),
                            jnp.float32(0.75))

  params = jnp.zeros(2)
  g = jnp.array([3.0 * 2.0 ** 40, -2.0 ** 38])     # e = 42
  tx = lrcr.scale_by_cubic_step(2.0)
  u, state = tx.update(g, tx.init(params), params, curvature_fn=fn)
  np.testing.assert_array_equal(seen[0], g * 2.0 ** -42)
  np.testing.assert_array_equal(state.info.slope, -0.5 * 2.0 ** 42)
  np.testing.assert_array_equal(state.info.curvature, 0.25 * 2.0 ** 84)
  np.testing.assert_array_equal(state.info.sqnorm, 0.75 * 2.0 ** 84)
  unit = lrcr.cubic_step(-0.5, 0.25, 0.75, 2.0)
  np.testing.assert_allclose(state.learning_rate, unit.alpha * 2.0 ** -42,
                             rtol=1e-7)
  np.testing.assert_allclose(state.info.predicted_decrease,
                             unit.predicted_decrease, rtol=1e-7)
  np.testing.assert_allclose(u, unit.alpha * seen[0], rtol=1e-7)


def _per_block_product(alpha, g):
  return jax.tree.map(lambda a, sub: jax.tree.map(lambda u: a * u, sub),
                      alpha, g)


def test_missing_curvature_fn_says_what_to_pass():
  model, params, x, y = _small()
  tx = lrcr.cubic_sgd(sigma=10.0)
  with pytest.raises(TypeError, match="lowrank_curvature_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="params"):
    tx.update(params, tx.init(params),
              curvature_fn=lrcr.lowrank_curvature_fn(model, x, y))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"),
                                   jnp.float32(0.0), np.float32(-1.0),
                                   jnp.array([1.0, -1.0])])
def test_bad_sigma_is_refused_also_as_an_array(sigma):
  # Issue 7: concrete arrays used to pass, and every update was then zero.
  with pytest.raises(ValueError, match="sigma must be finite and > 0"):
    lrcr.scale_by_cubic_step(sigma)
  with pytest.raises(ValueError, match="sigma must be finite and > 0"):
    lrcr.cubic_sgd(sigma)


def test_sigma_array_must_be_a_scalar_and_other_settings_are_checked():
  lrcr.scale_by_cubic_step(jnp.float32(100.0))          # fine
  lrcr.scale_by_cubic_step(np.float32(100.0))           # fine
  with pytest.raises(ValueError, match="scalar"):
    lrcr.scale_by_cubic_step(jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="gamma"):
    lrcr.scale_by_cubic_step(1.0, adaptive_sigma=True, gamma=1.0)
  with pytest.raises(ValueError, match="sigma_min"):
    lrcr.scale_by_cubic_step(1.0, adaptive_sigma=True, sigma_min=0.0)
  with pytest.raises(ValueError, match="eta_successful"):
    lrcr.scale_by_cubic_step(1.0, adaptive_sigma=True, eta_successful=0.95)


def test_nonfinite_curvature_is_flagged_and_kept_in_info():
  """Issue 5: non-finite curvature gave alpha = 0 and nothing to count."""
  params = jnp.zeros(3)
  g = jnp.ones(3)
  tx = lrcr.scale_by_cubic_step(1.0)
  for bad in [(-1.0, jnp.nan, 1.0), (-1.0, jnp.inf, 1.0), (jnp.nan, 1.0, 1.0),
              (-1.0, 1.0, jnp.inf)]:
    u, state = _update(tx, _const_curvature_fn(*bad))(g, tx.init(params),
                                                      params)
    assert not bool(state.info.finite)
    assert float(state.learning_rate) == 0.0
    np.testing.assert_array_equal(u, 0.0)
    # The non-finite value itself stays visible.
    assert not all(np.isfinite(float(v)) for v in
                   (state.info.slope, state.info.curvature, state.info.sqnorm))
  # A zero direction is no step, but nothing non-finite.
  u, state = _update(tx, _const_curvature_fn(0.0, 0.0, 0.0))(
      jnp.zeros(3), tx.init(params), params)
  assert bool(state.info.finite) and float(state.learning_rate) == 0.0


@pytest.mark.parametrize("curvature_every", [1, 3])
def test_a_step_length_beyond_the_float_range_is_no_step(curvature_every):
  """g = 1e-37 and a solve of alpha' ~ 1e3 along g 2^-e: alpha ~ 5e39.

  The step is flagged and not taken, also on the steps that reuse alpha.
  """
  params = jnp.zeros(3)
  g = jnp.full(3, -1e-37, jnp.float32)
  tx = lrcr.scale_by_cubic_step(1e-6, curvature_every=curvature_every)
  fn = _const_curvature_fn(-1.0, 0.0, 1.0)
  unit = lrcr.cubic_step(-1.0, 0.0, 1.0, 1e-6)
  assert unit.alpha * 2.0 ** 123 > np.finfo(np.float32).max    # e = -122
  state = tx.init(params)
  for _ in range(3):
    u, state = _update(tx, fn)(g, state, params)
    assert not bool(state.info.finite)
    assert float(state.learning_rate) == 0.0
    assert float(state.info.predicted_decrease) == 0.0
    np.testing.assert_array_equal(u, 0.0)


@pytest.mark.parametrize("size", [1e-200, 1.0, 1e200])
def test_float64_directions_are_rescaled_in_float64(size):
  """max |g| beyond float32's range still gives g 2^-e of unit size."""
  with jax.enable_x64(True):
    params = jnp.zeros(3, jnp.float64)
    g = jnp.array([-1.0, -0.5, 0.25], jnp.float64) * size

    def fn(params, d):     # F = -sum(w) + sum(w^2) / 2 along d, exactly
      del params
      return lrcr.Directional(-jnp.sum(d), jnp.sum(d * d), jnp.sum(d * d))

    tx = lrcr.scale_by_cubic_step(1.0)
    u, state = tx.update(g, tx.init(params), params, curvature_fn=fn)
    unit = g / size
    ref = lrcr.cubic_step(-jnp.sum(unit), jnp.sum(unit * unit),
                          jnp.sum(unit * unit), 1.0)
    assert bool(state.info.finite)
    np.testing.assert_allclose(u, ref.alpha * unit, rtol=1e-12)
    np.testing.assert_allclose(state.learning_rate * size, ref.alpha,
                               rtol=1e-12)


def test_adaptive_sigma_rejects_a_step_whose_predicted_decrease_overflows():
  """Issue 3: the overflowed prediction counted as "no step" and was accepted.

  slope -1, curvature -1e13, ||g||^2 1, sigma 1: alpha = 2e13 and the model
  predicts a decrease of 6.7e38, beyond float32.
  """
  params = jnp.zeros(1)
  g = jnp.full(1, 0.75)        # already unit-sized: curvature_fn sees g
  tx = lrcr.scale_by_cubic_step(1.0, adaptive_sigma=True)
  loss = lambda p: 3.0 + jnp.sum(p) ** 2
  u, state = _update(tx, _const_curvature_fn(-1.0, -1e13, 1.0),
                     value_fn=loss)(g, tx.init(params), params)
  assert float(state.info.predicted_decrease) == np.inf
  assert not bool(state.info.finite)
  assert not bool(state.accepted)
  assert float(state.sigma) == 2.0
  np.testing.assert_array_equal(u, 0.0)
  assert float(state.learning_rate) == 0.0
  # Even a trial loss far below the start cannot pass against an infinite
  # prediction.
  u, state = _update(tx, _const_curvature_fn(-1.0, -1e13, 1.0),
                     value_fn=lambda p: -1e30)(g, tx.init(params), params)
  assert not bool(state.accepted) and float(state.sigma) == 2.0


def test_adaptive_sigma_rejects_a_step_with_zero_predicted_decrease():
  # alpha ~ 1 but F - m = s^2 / 2h = 1e-38 underflows float32 to 0.
  params = jnp.zeros(1)
  g = jnp.full(1, 0.75)
  tx = lrcr.scale_by_cubic_step(1e-6, adaptive_sigma=True)
  u, state = _update(tx, _const_curvature_fn(-2e-38, 2e-38, 1.0),
                     value_fn=lambda p: 3.0 - jnp.sum(p))(
                         g, tx.init(params), params)
  assert float(state.info.predicted_decrease) == 0.0
  assert not bool(state.accepted) and state.sigma == np.float32(2e-6)
  np.testing.assert_array_equal(u, 0.0)
  # No step at all (a non-descent direction) is accepted and keeps sigma.
  u, state = _update(tx, _const_curvature_fn(1.0, 1.0, 1.0),
                     value_fn=lambda p: 3.0)(g, tx.init(params), params)
  assert bool(state.accepted) and state.sigma == np.float32(1e-6)


@pytest.mark.parametrize("returned, match", [
    (1.0, "returned a float"),
    ((1.0, 2.0), "returned a tuple"),
    (lrcr.Directional(jnp.ones(3), jnp.float32(1.0), jnp.float32(1.0)),
     r"slope has a leaf of shape \(3,\), expected \(\)"),
    (lrcr.Directional(-1.0, None, 1.0), "curvature has structure"),
    (lrcr.Directional(-1.0, "1", 1.0), "not a real number"),
])
def test_curvature_fn_breaking_the_contract_is_told_the_contract(returned,
                                                                 match):
  """Issue 6: these used to fail with an unpacking or broadcasting error."""
  params = {"w": jnp.zeros((2, 3))}
  tx = lrcr.scale_by_cubic_step(10.0)
  fn = lambda p, d: returned
  for update in (tx.update, jax.jit(tx.update, static_argnames="curvature_fn")):
    with pytest.raises(TypeError, match=match) as e:
      update(params, tx.init(params), params, curvature_fn=fn)
    assert "for granularity='global' three scalars" in str(e.value)
    assert "for 'layer' three trees shaped like lrcr.param_groups(params)" in \
        str(e.value)


def test_lowrank_and_autodiff_curvature_fn_give_same_step():
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads = _grads(model, params, x, y)
  tx = lrcr.cubic_adam(sigma=100.0)
  state = tx.init(params)
  u1, _ = _update(tx, lrcr.lowrank_curvature_fn(model, x, y))(
      grads, state, params)
  u2, _ = _update(tx, lrcr.autodiff_curvature_fn(loss, x, y))(
      grads, state, params)
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


# --- Training: the loss goes down after every base optimizer. ----------------


def _regression():
  """Softmax regression on 64 points labelled by a linear teacher."""
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (64, 5))
  y = jnp.argmax(x @ jax.random.normal(k[1], (5, 3)), -1)
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  loss = lambda p, x, y: lrcr.cross_entropy_loss(x @ p["w"] + p["b"], y)
  return loss, params, x, y


@functools.lru_cache(maxsize=None)
def _train_base(name):
  """`_train` of chain(base(lr=1) or sgd(SCHEDULE), CR), once per base."""
  base = (optax.sgd(SCHEDULE) if name == "sgd_schedule" else BASES[name](1.0))
  return _train(optax.chain(base, lrcr.scale_by_cubic_step(10.0)))


def _train(tx, steps=20):
  """`steps` jitted, scanned updates of tx on `_regression`: (losses, alphas)."""
  loss_fn, params, x, y = _regression()

  def body(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(
        grads, state, params,
        curvature_fn=lrcr.autodiff_curvature_fn(loss_fn, x, y))
    alpha = optax.tree.get(state, "learning_rate")
    return (optax.apply_updates(params, updates), state), (loss, alpha)

  (params, state), (losses, alphas) = jax.jit(
      lambda c: jax.lax.scan(body, c, None, length=steps))(
          (params, tx.init(params)))
  # The state's alpha is the last step's.
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), alphas[-1])
  return np.append(np.asarray(losses), float(loss_fn(params, x, y))), alphas


@pytest.mark.parametrize("name", list(BASES) + ["sgd_schedule"])
def test_lowers_the_loss_after_every_base_optimizer(name):
  """20 steps of chain(base(lr=1), CR) more than halve the loss (issue 10).

  Measured final/initial loss: 0.21 (sgd, adagrad, sgd_schedule), 0.24
  (adam), 0.27 (adadelta), 0.28 (rmsprop). Every base runs at learning rate 1,
  far too large for Adam or RMSProp alone: CR sets the step.
  """
  losses, alphas = _train_base(name)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.4 * losses[0], losses
  assert bool(jnp.all(alphas > 0))       # CR took every step
  if name == "sgd_schedule":
    # The schedule cancels: the same trajectory as a constant learning rate.
    plain, _ = _train_base("sgd")
    np.testing.assert_allclose(losses, plain, rtol=1e-5)


def test_adaptive_sigma_lowers_the_loss():
  tx = optax.chain(optax.sgd(1.0),
                   lrcr.scale_by_cubic_step(1e-3, adaptive_sigma=True))
  loss_fn, params, x, y = _regression()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(
      jax.grad(loss_fn)(p, x, y), s, p,
      curvature_fn=lrcr.autodiff_curvature_fn(loss_fn, x, y),
      value_fn=lambda q: loss_fn(q, x, y)))
  losses, accepted = [float(loss_fn(params, x, y))], []
  for _ in range(20):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    losses.append(float(loss_fn(params, x, y)))
    accepted.append(bool(state[1].accepted))
  # A rejected step never raises the loss; accepted ones lower it.
  assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
  assert losses[-1] < 0.4 * losses[0], losses
  assert sum(accepted) >= 10


# --- Granularity and adaptive sigma (beyond the paper). ----------------------


def test_layer_granularity_autodiff_matches_lowrank():
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  g = reference.random_direction(1, params)
  a = jax.jit(lrcr.autodiff_curvature_fn(loss, x, y, granularity="layer"))(
      params, g)
  b = jax.jit(lrcr.lowrank_curvature_fn(model, x, y, granularity="layer"))(
      params, g)
  for f in ("slope", "curvature", "sqnorm"):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4,
                                                         atol=1e-7),
                 getattr(a, f), getattr(b, f))
  with pytest.raises(ValueError, match="variable"):
    lrcr.autodiff_curvature_fn(loss, x, y, granularity="variable")


def test_wrong_structure_for_granularity_is_a_clear_error():
  params = {"a": {"w": jnp.zeros((2, 3))}, "b": {"w": jnp.zeros(3)}}
  tx = lrcr.scale_by_cubic_step(10.0, granularity="layer")
  # Scalars, as for the global granularity.
  with pytest.raises(TypeError, match="granularity='layer'.*structure"):
    tx.update(params, tx.init(params), params,
              curvature_fn=_const_curvature_fn(-1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="granularity"):
    lrcr.scale_by_cubic_step(10.0, granularity="row")


def test_adaptive_sigma_accepts_rejects_and_updates_sigma():
  model, params, x, y = _small()
  loss = lambda p: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads = _grads(model, params, x, y)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  tx = lrcr.cubic_sgd(10.0, adaptive_sigma=True)
  state = tx.init(params)
  with pytest.raises(TypeError, match="value_fn"):
    tx.update(grads, state, params, curvature_fn=fn)
  f0 = loss(params)

  @jax.jit
  def update(offset, real):
    # The trial loss: the real one, or f0 + offset.
    value_fn = lambda p: jnp.where(real, loss(p), f0 + offset)
    return tx.update(grads, state, params, curvature_fn=fn,
                     value_fn=value_fn, value=f0)

  # A trial loss far above the start: rho < 0.1, rejected, sigma doubles.
  u, s = update(10.0, False)
  assert not bool(s[1].accepted) and float(s[1].sigma) == 20.0
  assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree.leaves(u))
  # A decrease far beyond the prediction: very successful, sigma halves.
  u, s = update(-10.0, False)
  assert bool(s[1].accepted) and float(s[1].sigma) == 5.0
  assert float(optax.tree.get(s, "learning_rate")) > 0
  # The real loss: rho from the true trial value, and sigma is recorded.
  u, s = update(0.0, True)
  # The prediction is the cubic model's decrease along -grads (eq. 37).
  ref = lrcr.cubic_step(*lrcr.directional(
      model, params, x, y, jax.tree.map(jnp.negative, grads)), 10.0)
  np.testing.assert_allclose(s[1].info.predicted_decrease,
                             ref.predicted_decrease, rtol=1e-5)
  rho = (f0 - loss(optax.apply_updates(params, u))) / \
      s[1].info.predicted_decrease
  assert float(s[1].sigma) == (5.0 if rho > 0.9 else 10.0 if rho >= 0.1 else 20.0)


def test_curvature_every_reuses_alpha_and_skips_the_curvature():
  model, params, x, y = _small()
  grads = _grads(model, params, x, y)
  fn = lrcr.lowrank_curvature_fn(model, x, y)
  tx = lrcr.scale_by_cubic_step(10.0, curvature_every=3)
  update = _update(tx, fn)
  state = tx.init(params)
  alphas = []
  for i in range(6):
    # Descent directions that differ from step to step, and in size.
    g = jax.tree.map(lambda a, r: -a * (1.0 + jnp.abs(r)) * 10.0 ** (i - 3),
                     grads, reference.random_direction(i, params))
    u, state = update(g, state, params)
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


# --- Derivatives, non-finite directions, low precision, kernels. -------------


def _regression64():
  loss_fn, params, x, y = _regression()
  f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
  params = jax.tree.map(lambda a: 0.3 * jnp.ones_like(a), f64(params))
  return loss_fn, params, f64(x), y


def test_derivative_of_alpha_and_update_matches_finite_differences():
  """d alpha / d params, d update / d params and d alpha / d sigma against
  float64 central differences (issue 18: jax.grad gave zeros).

  The direction is the SGD direction -grad F(w) at w, so alpha depends on w
  through s, h and ||g||^2; the curvature_fn is autodiff's, differentiated
  once more.
  """
  with jax.enable_x64(True):
    loss_fn, params, x, y = _regression64()
    tx = lrcr.scale_by_cubic_step(10.0)
    state = tx.init(params)
    fn = lrcr.autodiff_curvature_fn(loss_fn, x, y)
    r = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)
                                       ).reshape(a.shape), params)

    def outputs(p, sigma):
      g = jax.tree.map(jnp.negative, jax.grad(loss_fn)(p, x, y))
      u, s = tx.update(g, state._replace(sigma=sigma), p, curvature_fn=fn)
      return s.learning_rate, optax.tree.vdot(u, r)

    sigma = jnp.float64(10.0)
    v = jax.tree.map(lambda a: jnp.sin(1.0 + jnp.arange(a.size, dtype=a.dtype)
                                       ).reshape(a.shape), params)
    step = 1e-6
    moved = lambda t: jax.tree.map(lambda a, b: a + t * b, params, v)
    for i in range(2):
      f = lambda p, sig: outputs(p, sig)[i]
      # Along params: jax.grad against (f(w + t v) - f(w - t v)) / 2t.
      got = optax.tree.vdot(jax.jit(jax.grad(f))(params, sigma), v)
      ref = (f(moved(step), sigma) - f(moved(-step), sigma)) / (2 * step)
      assert abs(float(ref)) > 1e-3
      np.testing.assert_allclose(got, ref, rtol=1e-6)
      # Along sigma.
      got = jax.grad(f, argnums=1)(params, sigma)
      ref = (f(params, sigma * (1 + step)) - f(params, sigma * (1 - step))
             ) / (2 * step * sigma)
      assert abs(float(ref)) > 1e-6
      np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("gradient_direction", [False, True])
def test_derivative_of_alpha_through_the_engine(gradient_direction):
  """The engine's curvature_fn (a ScalableCurvatureFn, rescaled inside) is
  differentiated as well: d alpha / d params against central differences."""
  with jax.enable_x64(True):
    model = lrcr.MLP((6, 5), 3, kernel_init=lrcr.uniform_init(0.5))
    x = jax.random.normal(jax.random.key(0), (8, 4), jnp.float64)
    y = jnp.arange(8) % 3
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(1), x))
    loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
    tx = lrcr.scale_by_cubic_step(10.0)
    state = tx.init(params)

    def alpha(p):
      _, g, fn = lrcr.value_grad_and_curvature(
          loss_fn, p, x, y, gradient_direction=gradient_direction)
      assert isinstance(fn, lrcr.types.ScalableCurvatureFn)
      g = jax.tree.map(jnp.negative, g)
      return tx.update(g, state, p, curvature_fn=fn)[1].learning_rate

    v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype)
                                       ).reshape(a.shape), params)
    moved = lambda t: jax.tree.map(lambda a, b: a + t * b, params, v)
    got = optax.tree.vdot(jax.grad(alpha)(params), v)
    ref = (alpha(moved(1e-6)) - alpha(moved(-1e-6))) / 2e-6
    assert abs(float(ref)) > 1e-2
    np.testing.assert_allclose(got, ref, rtol=1e-7)


def test_derivative_of_the_update_with_respect_to_the_base_learning_rate():
  """alpha g does not depend on the base learning rate: nor does its
  derivative, which is 0 (up to rounding), while alpha's is -alpha / lr."""
  with jax.enable_x64(True):
    loss_fn, params, x, y = _regression64()
    tx = lrcr.scale_by_cubic_step(10.0)
    fn = lrcr.autodiff_curvature_fn(loss_fn, x, y)
    grads = jax.grad(loss_fn)(params, x, y)

    def outputs(lr):
      g = jax.tree.map(lambda a: -lr * a, grads)
      u, s = tx.update(g, tx.init(params), params, curvature_fn=fn)
      return s.learning_rate, optax.tree.vdot(u, u)

    lr = jnp.float64(0.25)
    alpha = outputs(lr)[0]
    np.testing.assert_allclose(jax.grad(lambda t: outputs(t)[0])(lr),
                               -alpha / lr, rtol=1e-10)
    assert abs(float(jax.grad(lambda t: outputs(t)[1])(lr))) < 1e-12


def _mlp_direction_with_nan(model, params, x, y):
  """(-grad F, the same with a NaN in its first leaf)."""
  grads = jax.tree.map(jnp.negative, _grads(model, params, x, y))
  leaves, treedef = jax.tree.flatten(grads)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  return grads, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("engine", [True, False])
def test_a_nan_direction_gives_a_zero_update_not_nan(engine):
  """info.finite False: alpha = 0 and the update 0 (0 * NaN was NaN)."""
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads, bad = _mlp_direction_with_nan(model, params, x, y)
  fn = (lrcr.value_grad_and_curvature(loss, params, x, y)[2] if engine
        else lrcr.autodiff_curvature_fn(loss, x, y))
  tx = lrcr.scale_by_cubic_step(10.0)
  for g, finite in ((bad, False), (grads, True)):
    for update in (tx.update, jax.jit(tx.update,
                                      static_argnames="curvature_fn")):
      u, state = update(g, tx.init(params), params, curvature_fn=fn)
      assert bool(state.info.finite) == finite
      if not finite:
        assert float(state.learning_rate) == 0.0
        for leaf in jax.tree.leaves(u):
          np.testing.assert_array_equal(leaf, 0.0)
      else:
        assert float(state.learning_rate) > 0.0
  # An inf entry as well.
  leaves, treedef = jax.tree.flatten(grads)
  leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(-jnp.inf)
  u, state = tx.update(jax.tree.unflatten(treedef, leaves), tx.init(params),
                       params, curvature_fn=fn)
  assert not bool(state.info.finite)
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u))


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_a_nan_direction_on_a_reused_step_gives_a_zero_update(granularity):
  """curvature_every=3: step 1 keeps step 0's alpha; a NaN direction there
  is still no step (finite False, update 0), and a finite one is alpha g."""
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads, bad = _mlp_direction_with_nan(model, params, x, y)
  fn = lrcr.value_grad_and_curvature(loss, params, x, y,
                                     granularity=granularity)[2]
  tx = lrcr.scale_by_cubic_step(10.0, curvature_every=3,
                                granularity=granularity)
  _, state = tx.update(grads, tx.init(params), params, curvature_fn=fn)
  assert all(bool(f) for f in jax.tree.leaves(state.info.finite))
  u, reused = tx.update(bad, state, params, curvature_fn=fn)
  assert not bool(jax.tree.leaves(reused.info.finite)[0])
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))
  np.testing.assert_array_equal(jax.tree.leaves(u)[0], 0.0)
  u, kept = tx.update(grads, state, params, curvature_fn=fn)
  assert all(bool(f) for f in jax.tree.leaves(kept.info.finite))
  if granularity == "global":
    for a, g in zip(jax.tree.leaves(u), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, float(state.learning_rate) * g,
                                 rtol=1e-6)


def test_a_nan_in_one_layer_zeroes_that_layer_only():
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  _, bad = _mlp_direction_with_nan(model, params, x, y)
  fn = lrcr.value_grad_and_curvature(loss, params, x, y,
                                     granularity="layer")[2]
  tx = lrcr.scale_by_cubic_step(10.0, granularity="layer")
  u, state = _update(tx, fn)(bad, tx.init(params), params)
  finite = jax.tree.leaves(state.info.finite)
  assert not bool(finite[0]) and all(bool(f) for f in finite[1:])
  groups = jax.tree.leaves(jax.tree.map(
      lambda _, sub: jax.tree.leaves(sub), lrcr.param_groups(u), u,
      is_leaf=lambda t: isinstance(t, list)), is_leaf=lambda t:
      isinstance(t, list))
  assert all(bool(jnp.all(leaf == 0)) for leaf in groups[0])
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for g in groups for leaf in g)
  assert any(bool(jnp.any(leaf != 0)) for g in groups[1:] for leaf in g)


@pytest.mark.parametrize("size", [1.0, 1e30, 1e-30])
def test_bfloat16_params_keep_a_float32_state_and_solve(size):
  """bf16 params and direction: alpha, info and sigma are float32, and equal
  the float32 run on the same (exactly widened) direction; the update is
  alpha g rounded to bf16, for directions of any size."""
  loss_fn, params32, x, y = _regression()
  params32 = jax.tree.map(lambda a: a + 0.1, params32)
  grads32 = jax.grad(loss_fn)(params32, x, y)
  bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  params, g = bf(params32), bf(jax.tree.map(lambda a: -size * a, grads32))
  fn32 = lrcr.autodiff_curvature_fn(loss_fn, x, y)
  fn = lambda p, d: fn32(f32(p), f32(d))
  tx = lrcr.scale_by_cubic_step(10.0)
  u, state = _update(tx, fn)(g, tx.init(params), params)
  u32, state32 = _update(tx, fn)(f32(g), tx.init(f32(params)), f32(params))
  for leaf in jax.tree.leaves((state.learning_rate, state.info.slope,
                               state.info.sqnorm, state.sigma)):
    assert leaf.dtype == jnp.float32
  assert bool(state.info.finite) and float(state.learning_rate) > 0
  np.testing.assert_allclose(state.learning_rate, state32.learning_rate,
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u32)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=1e-2,
                               atol=1e-30)


def test_gradient_direction_belongs_to_value_grad_and_curvature():
  """Issue 20: the option was put on the transform and got a bare TypeError."""
  with pytest.raises(TypeError, match="argument of lrcr.value_grad_and_"):
    lrcr.cubic_sgd(1.0, gradient_direction=True)
  params = jnp.zeros(3)
  tx = lrcr.scale_by_cubic_step(1.0)
  with pytest.raises(TypeError, match="scale_by_cubic_step.update"):
    tx.update(jnp.ones(3), tx.init(params), params,
              curvature_fn=_const_curvature_fn(-1.0, 1.0, 1.0),
              gradient_direction=True)


def test_kernels_of_the_update_on_the_paper_net():
  """scale_by_cubic_step's update + apply_updates on the 12x128 net's params,
  compiled, counted by experiments.bench.count_kernels (deterministic for a
  given XLA). The curvature_fn reads one entry of the direction, so the
  count is the transform's own: 31, against optax.sgd's 13: the largest
  entry takes one reduction per leaf; 16 with a curvature_fn that picks its
  own exponent. Reading the leaves as one flat buffer took 18 kernels
  but doubled the step's temporary memory, which this test also bounds: no
  copy of the direction.
  """
  from experiments import bench   # pylint: disable=import-outside-toplevel
  _, params, _, _ = bench.make_problem(128, 12, 32)
  tx = lrcr.scale_by_cubic_step(100.0)
  state = tx.init(params)

  def one_entry(p, d):
    n = 1.0 + jnp.square(jax.tree.leaves(d)[0][0, 0])
    return lrcr.Directional(-n, 2.0 * n, n)

  scalable = lrcr.types.ScalableCurvatureFn(lambda p, d, e: one_entry(p, d))
  count = lambda f: bench.count_kernels(
      jax.jit(f).lower(params, params).compile().as_text())
  sgd = optax.sgd(0.02)
  assert count(lambda p, g: optax.apply_updates(
      p, sgd.update(g, sgd.init(p), p)[0])) == 13
  temp = lambda f: jax.jit(f).lower(params, params).compile(
      ).memory_analysis().temp_size_in_bytes
  size = sum(x.nbytes for x in jax.tree.leaves(params))
  for fn in (one_entry, scalable):
    step = lambda p, g, fn=fn: optax.apply_updates(
        p, tx.update(g, state, p, curvature_fn=fn)[0])
    assert count(step) <= 31
    assert temp(step) < size / 2, (temp(step), size)
  # A curvature_fn that picks its own exponent (the engine's, with
  # gradient_direction=True): no largest-entry search, 3 scalar kernels
  # beyond the 13 writes of the update.
  auto = lrcr.types.ScalableCurvatureFn(
      lambda p, d, e: one_entry(p, d),
      lambda p, d: (one_entry(p, d), lrcr.cubic.exponent(
          jax.tree.leaves(d)[0][0, 0])), gradient_direction=True)
  step = lambda p, g: optax.apply_updates(
      p, tx.update(g, state, p, curvature_fn=auto)[0])
  assert count(step) <= 16
  assert temp(step) < size / 2, (temp(step), size)


@pytest.mark.parametrize("seed,hidden,batch,lr", [
    (0, (6, 5), 7, 1e-30), (1, (4,), 3, 0.3), (2, (5, 5, 5), 12, 1e30)])
def test_cubic_sgd_on_the_gradient_itself_is_exact(seed, hidden, batch, lr):
  """cubic_sgd hands the engine the gradient it returned: the curvature_fn
  knows the direction is -lr grad F without the gradient_direction promise
  and without a pass for the multiple. Slope, curvature and ||g||^2 of
  g = -lr grad F against the dense float64 Hessian, for lr 1e-30 to 1e30."""
  jax.config.update("jax_enable_x64", True)
  try:
    model, params, x, y = reference.make_problem(
        seed, hidden, 4, batch, 3, activation=jnp.tanh, use_bias=True)
    loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
    grads = _grads(model, params, x, y)
    tx = lrcr.cubic_sgd(5.0, lr)

    @jax.jit
    def update(params, state):
      _, grads, fn = lrcr.value_grad_and_curvature(loss, params, x, y)
      assert fn.autoscales(grads) and not fn.gradient_direction
      return tx.update(grads, state, params, curvature_fn=fn)

    _, state = update(params, tx.init(params))
    g = jax.tree.map(lambda a: -lr * a, grads)
    slope, curv, sqnorm = reference.dense_reference(model, params, x, y, g)
    info = state[1].info
    assert bool(info.finite)
    np.testing.assert_allclose(info.slope, slope, rtol=1e-10)
    np.testing.assert_allclose(info.curvature, curv, rtol=1e-10)
    np.testing.assert_allclose(info.sqnorm, sqnorm, rtol=1e-10)
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("learning_rate,gradient_direction,kwargs,clip", [
    (0.05, False, {}, False), (SCHEDULE, True, {}, True),
    (0.05, True, dict(curvature_every=2), False),
    (SCHEDULE, False, dict(adaptive_sigma=True), False)])
def test_cubic_sgd_is_the_chain_of_sgd_and_the_transform(
    learning_rate, gradient_direction, kwargs, clip):
  """Same state structure, updates and alphas as optax.chain(optax.sgd,
  scale_by_cubic_step), over three steps: with the engine's gradient (the
  fast path), with a clipped gradient (not the engine's arrays: the
  direction is written out), and with curvature_every and adaptive sigma."""
  model, params, x, y = _small()
  loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  fused = lrcr.cubic_sgd(20.0, learning_rate, **kwargs)
  chain = optax.chain(optax.sgd(learning_rate),
                      lrcr.scale_by_cubic_step(20.0, **kwargs))

  @functools.partial(jax.jit, static_argnums=2)
  def step(p, state, chained):
    value, grads, fn = lrcr.value_grad_and_curvature(
        loss, p, x, y, gradient_direction=gradient_direction)
    if clip:
      grads = optax.clip_by_global_norm(0.5).update(grads, None)[0]
    tx = chain if chained else fused
    u, state = tx.update(grads, state, p, curvature_fn=fn,
                         value_fn=lambda w: loss(w, x, y), value=value)
    return optax.apply_updates(p, u), state

  p, q = params, params
  s, r = fused.init(params), chain.init(params)
  assert jax.tree.structure(s) == jax.tree.structure(r)
  for _ in range(3):
    p, s = step(p, s, False)
    q, r = step(q, r, True)
    assert bool(s[1].info.finite) and float(s[1].learning_rate) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-7), (p, s), (q, r))


def test_cubic_sgd_at_the_edges_of_the_gradients_range():
  """On the fast path a zero gradient is no step (finite), a gradient whose
  ||grad F||^2 leaves [2^-79, 2^80] in float32 is flagged and skipped, and
  one of norm 1e6 gets the chain's step."""
  model, params, x, y = _small()
  tx = lrcr.cubic_sgd(20.0, 1e-3)
  chain = optax.chain(optax.sgd(1e-3), lrcr.scale_by_cubic_step(20.0))

  def step(scale, tx):
    loss = lambda p, x, y: scale * lrcr.cross_entropy_loss(model.apply(p, x),
                                                           y)
    _, grads, fn = lrcr.value_grad_and_curvature(loss, params, x, y)
    return tx.update(grads, tx.init(params), params, curvature_fn=fn)

  u, state = step(0.0, tx)
  assert bool(state[1].info.finite) and float(state[1].learning_rate) == 0.0
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u))
  for scale in (1e20, 1e-15):
    u, state = step(scale, tx)
    assert not bool(state[1].info.finite), scale
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u))
  u, state = step(1e6, tx)
  u_ref, ref = step(1e6, chain)
  np.testing.assert_allclose(state[1].learning_rate, ref[1].learning_rate,
                             rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-9), u, u_ref)


def test_cubic_sgd_refuses_a_wrong_keyword():
  with pytest.raises(TypeError, match="gradient_direction"):
    lrcr.cubic_sgd(1.0, gradient_direction=True)
  with pytest.raises(TypeError, match="sigmaa"):
    lrcr.cubic_sgd(1.0, sigmaa=2.0)
  with pytest.raises(ValueError, match="granularity"):
    lrcr.cubic_sgd(1.0, granularity="row")
