"""experiments.steps: every curvature path takes the same CR step."""

import jax
import numpy as np
import optax
import pytest

import lrcr
from experiments import bench
from experiments import models
from experiments import steps


def _cr_tx():
  return optax.chain(optax.sgd(0.05), lrcr.scale_by_cubic_step(100.0))


def _take(model, params, x, y, **options):
  tx = _cr_tx()
  step = jax.jit(steps.make_cr_step(model, tx, steps.CROptions(**options)))
  out = step(params, tx.init(params), x, y)
  return out, out.opt_state[1]


@pytest.mark.parametrize("rows", [0, 5])
def test_every_curvature_path_gives_the_same_alpha(rows):
  model, params, x, y = bench.make_problem(16, 3, 12, seed=1)
  results = {}
  for curvature in steps.CURVATURE_PATHS:
    for gram in ((False, True) if curvature == "engine" else (False,)):
      out, cubic = _take(model, params, x, y, curvature=curvature,
                         gradient_direction=gram, curvature_batch_size=rows)
      results[curvature, gram] = (cubic.learning_rate, cubic.info.slope, out)
  ref_alpha, ref_slope, ref = results["autodiff", False]
  assert ref_alpha > 0
  for key, (alpha, slope, out) in results.items():
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-3, err_msg=str(key))
    np.testing.assert_allclose(slope, ref_slope, rtol=1e-4, err_msg=str(key))
    for a, b in zip(jax.tree.leaves(out.updates),
                    jax.tree.leaves(ref.updates)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7, err_msg=str(key))


def test_subbatch_curvature_keeps_the_full_batch_slope():
  """curvature_batch_size=r: slope of all B rows, curvature of the first r."""
  model, params, x, y = bench.make_problem(16, 3, 12, seed=2)
  for curvature in ("engine", "lowrank", "autodiff"):
    out, cubic = _take(model, params, x, y, curvature=curvature,
                       curvature_batch_size=4)
    g = jax.tree.map(lambda a: -0.05 * a, out.grads)
    full = lrcr.directional(model, params, x, y, g)
    sub = lrcr.directional(model, params, x[:4], y[:4], g)
    np.testing.assert_allclose(cubic.info.slope, full.slope, rtol=1e-4)
    np.testing.assert_allclose(cubic.info.curvature, sub.curvature, rtol=1e-3)


def test_non_mlp_models_take_the_engine_path():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      kind="rnn", width=6, init_scale=0.3, use_bias=True, activation="tanh"))
  model = models.make_model(config, 10)
  x = jax.random.normal(jax.random.key(0), (8, 5, 3))
  y = np.arange(8) % 10
  params = model.init(jax.random.key(1), x)["params"]
  engine, _ = _take(model, params, x, y, curvature="engine")
  hvp, _ = _take(model, params, x, y, curvature="hvp")
  for a, b in zip(jax.tree.leaves(engine.updates), jax.tree.leaves(hvp.updates)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)


def test_cr_step_lowers_the_loss_more_than_its_prediction_risks():
  """On a batch, the CR update lowers F, by about the cubic model's decrease."""
  model, params, x, y = bench.make_problem(16, 3, 12, seed=3)
  out, cubic = _take(model, params, x, y)
  loss_fn = steps.cross_entropy_loss_fn(model)
  after = loss_fn(optax.apply_updates(params, out.updates), x, y)
  assert after < out.loss
  assert cubic.info.predicted_decrease > 0


def test_options_come_from_the_config_section():
  from configs import paper  # pylint: disable=g-import-not-at-top
  options = steps.CROptions.from_config(paper.get_config(
      "mnist_adam_plateau").optimizer)
  assert options == steps.CROptions(sigma=1000.0)
  assert steps.CROptions.from_config(paper.get_config().optimizer) == \
      steps.CROptions(gradient_direction=True)
  with pytest.raises(ValueError, match="config.optimizer.curvature='exact'"):
    steps.CROptions(curvature="exact")
