"""The CR step length: eq. 37, the limits of eq. 41, stability, policy."""

import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcr


def eq37(s, h, n2, sigma):
  """Eq. 37 exactly as printed, in 60-digit decimal arithmetic."""
  with decimal.localcontext() as ctx:
    ctx.prec = 60
    s, h, n2, sigma = (decimal.Decimal(float(v)) for v in (s, h, n2, sigma))
    big_s = sigma * n2 * n2.sqrt()
    return float((-h + (h * h - 2 * s * big_s).sqrt()) / big_s)


def test_matches_eq37_on_random_descent_inputs():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for _ in range(500):
      s = -10 ** rng.uniform(-4, 2)
      h = rng.normal() * 10 ** rng.uniform(-3, 2)
      n2 = 10 ** rng.uniform(-3, 3)
      sigma = 10 ** rng.uniform(0, 4)
      a = float(lrcr.cubic_step_length(s, h, n2, sigma))
      np.testing.assert_allclose(a, eq37(s, h, n2, sigma), rtol=1e-9)
      # It is a stationary point of the model: m'(a) = 0 (eq. 9).
      dm = s + h * a + 0.5 * sigma * n2 ** 1.5 * a * a
      assert abs(dm) <= 1e-9 * (abs(s) + abs(h * a) + 0.5 * sigma * n2 ** 1.5 * a * a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_eq41_limits(dtype):
  with jax.enable_x64(True):
    n2, sigma = 4.0, 10.0
    big_s = sigma * n2 ** 1.5
    f = lambda s, h: float(lrcr.cubic_step_length(
        jnp.asarray(s, dtype), jnp.asarray(h, dtype), jnp.asarray(n2, dtype),
        jnp.asarray(sigma, dtype)))
    # h > 0, h^2 >> |s| S: alpha -> |s| / h (Newton step).
    s, h = -1e-6, 50.0
    np.testing.assert_allclose(f(s, h), abs(s) / h, rtol=1e-5)
    # |h| small, h^2 << |s| S: alpha -> sqrt(2 |s| / S).
    s, h = -2.0, 1e-6
    np.testing.assert_allclose(f(s, h), np.sqrt(2 * abs(s) / big_s), rtol=1e-5)
    # h < 0, h^2 >> |s| S: alpha -> 2|h|/S + |s/h|.
    s, h = -1e-6, -50.0
    np.testing.assert_allclose(f(s, h), 2 * abs(h) / big_s + abs(s / h),
                               rtol=1e-5)


def test_float32_is_stable_in_all_three_regimes():
  """float32 matches a float64 evaluation where eq. 37 cancels catastrophically."""
  cases = [(-1e-6, 1e3, 1.0, 100.0),   # eq. 41 case 1: numerator cancels
           (-3.0, 1e-7, 1.0, 100.0),   # case 2
           (-1e-6, -1e3, 1.0, 100.0),  # case 3
           (-1e-30, 1e-20, 1e-12, 1e4),  # tiny direction: ||g||^3 underflows
           (-1e20, 1e25, 1e18, 1.0)]   # huge numbers: h^2 overflows
  with jax.enable_x64(True):
    for s, h, n2, sigma in cases:
      ref = float(lrcr.cubic_step_length(s, h, n2, sigma))   # float64
      got = lrcr.cubic_step_length(*(jnp.float32(v) for v in (s, h, n2, sigma)))
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # eq. 37 as printed, in float32, loses the first case entirely.
  s, h, n2, sigma = (np.float32(v) for v in cases[0])
  naive = (-h + np.sqrt(h * h - np.float32(2) * s * sigma * n2)) / (sigma * n2)
  assert naive == 0.0


def test_scale_invariance():
  """alpha(c g) = alpha(g) / c, so alpha g and the base lr drop out."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for _ in range(100):
      s, h = -abs(rng.normal()), rng.normal()
      n2, sigma = abs(rng.normal()) + 0.1, 10 ** rng.uniform(0, 3)
      c = 10 ** rng.uniform(-3, 3)
      a1 = float(lrcr.cubic_step_length(s, h, n2, sigma))
      ac = float(lrcr.cubic_step_length(c * s, c * c * h, c * c * n2, sigma))
      np.testing.assert_allclose(ac * c, a1, rtol=1e-10)


def _grid_minimizer(s, h, n2, sigma):
  a = np.concatenate([[0.0], np.geomspace(1e-8, 1e4, 400001)])
  m = a * s + 0.5 * a * a * h + sigma / 6 * a ** 3 * n2 ** 1.5
  return a[np.argmin(m)], m.min()


def test_non_descent_policy_is_the_model_minimizer():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    cases = [(0.5, 2.0), (0.0, 0.0), (0.0, -3.0), (1e-3, -3.0), (5.0, -1.0),
             (2.0, -4.0)]
    cases += [(abs(rng.normal()), rng.normal() * 3) for _ in range(30)]
    for s, h in cases:
      n2, sigma = 1.3, 2.0
      step = lrcr.cubic_step(s, h, n2, sigma)
      alpha = float(step.alpha)
      assert np.isfinite(alpha) and alpha >= 0
      a_grid, m_grid = _grid_minimizer(s, h, n2, sigma)
      m = float(lrcr.cubic_model(alpha, s, h, n2, sigma))
      assert m <= m_grid + 1e-9, (s, h, alpha, a_grid)
      np.testing.assert_allclose(float(step.predicted_decrease), -m,
                                 atol=1e-12)
      if h >= 0:
        assert alpha == 0.0


def test_descent_predicted_decrease_matches_model():
  with jax.enable_x64(True):
    s, h, n2, sigma = -2.0, 0.5, 3.0, 7.0
    step = lrcr.cubic_step(s, h, n2, sigma)
    np.testing.assert_allclose(
        float(step.predicted_decrease),
        -float(lrcr.cubic_model(step.alpha, s, h, n2, sigma)), rtol=1e-12)
    assert float(step.predicted_decrease) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_always_finite_and_nonnegative(dtype):
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    mag = lambda: 10.0 ** rng.uniform(-30, 30)
    vals = []
    for _ in range(2000):
      vals.append((rng.choice([-1, 0, 1]) * mag(), rng.choice([-1, 0, 1]) * mag(),
                   rng.choice([0, 1]) * mag(), mag()))
    vals += [(np.nan, 1.0, 1.0, 1.0), (-1.0, np.inf, 1.0, 1.0),
             (-1.0, 1.0, np.nan, 1.0), (-1.0, 1.0, 1.0, 0.0)]
    arr = jnp.asarray(np.array(vals, dtype=np.float64), dtype)
    alpha = jax.jit(jax.vmap(lrcr.cubic_step_length))(*arr.T)
    assert alpha.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(alpha))) and bool(jnp.all(alpha >= 0))
    # Zero direction, non-finite inputs and sigma <= 0 give no step.
    assert np.all(np.asarray(alpha[-4:]) == 0)
    zero_dir = arr[:, 2] == 0
    assert bool(jnp.all(alpha[zero_dir] == 0))
