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
  n = 500
  s = -10 ** rng.uniform(-4, 2, n)
  h = rng.normal(size=n) * 10 ** rng.uniform(-3, 2, n)
  n2 = 10 ** rng.uniform(-3, 3, n)
  sigma = 10 ** rng.uniform(0, 4, n)
  with jax.enable_x64(True):
    alphas = np.asarray(jax.jit(jax.vmap(lrcr.cubic_step_length))(
        s, h, n2, sigma))
  for a, *args in zip(alphas, s, h, n2, sigma):
    np.testing.assert_allclose(a, eq37(*args), rtol=1e-9)
  # It is a stationary point of the model: m'(a) = 0 (eq. 9).
  big_s = sigma * n2 ** 1.5
  dm = s + h * alphas + 0.5 * big_s * alphas ** 2
  assert np.all(np.abs(dm) <= 1e-9 * (np.abs(s) + np.abs(h * alphas)
                                      + 0.5 * big_s * alphas ** 2))


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


# --- The whole float range against a 60-digit reference (issue 11). ---------


def reference_step(s, h, n2, sigma):
  """(alpha, F - m(alpha), scale) of the documented policy, in 60 digits.

  An independent evaluation: eq. 37 (or its conjugate where eq. 37 cancels)
  and the model value m(alpha) summed term by term. `scale` is the sum of the
  terms' magnitudes, the size of F - m's rounding error.
  """
  with decimal.localcontext() as ctx:
    ctx.prec = 60
    s, h, n2, sigma = (decimal.Decimal(float(v)) for v in (s, h, n2, sigma))
    big_s = sigma * n2 * n2.sqrt()
    if s < 0:
      root = (h * h - 2 * s * big_s).sqrt()
      a = -2 * s / (h + root) if h > 0 else (root - h) / big_s
    elif s > 0 and h < 0 and h * h >= 2 * s * big_s:
      a = ((h * h - 2 * s * big_s).sqrt() - h) / big_s
    elif s == 0 and h < 0:
      a = -2 * h / big_s
    else:
      return 0.0, 0.0, 0.0
    m = s * a + h * a * a / 2 + big_s * a ** 3 / 6
    scale = abs(s * a) + abs(h * a * a) / 2 + big_s * a ** 3 / 6
    if m >= 0:
      return 0.0, 0.0, float(scale)
    return float(a), float(-m), float(scale)


def _log_uniform_inputs(rng, n, lo, hi):
  """(s, h, ||g||^2, sigma) with magnitudes 10^U(lo, hi), random signs, zeros."""
  mag = lambda: 10.0 ** rng.uniform(lo, hi, n)
  s = rng.choice([-1, -1, 0, 1], n) * mag()
  h = rng.choice([-1, 0, 1], n) * mag()
  return np.stack([s, h, mag(), mag()], 1)


def _check_against_reference(x, dtype, rtol):
  """Solves the rows of x in dtype; returns (cases in range, max rel errors)."""
  finfo = np.finfo(dtype)
  big, tiny = float(finfo.max), float(finfo.tiny)
  x = x.astype(dtype)
  step = jax.jit(jax.vmap(lrcr.cubic_step))(*jnp.asarray(x).T)
  alpha = np.asarray(step.alpha, np.float64)
  dec = np.asarray(step.predicted_decrease, np.float64)
  ref = np.array([reference_step(*row) for row in x.astype(np.float64)])
  ra, rd, scale = ref.T
  assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0)
  assert np.all(dec >= 0) and not np.any(np.isnan(dec))
  # No step where the policy takes none.
  assert np.all(alpha[ra == 0] == 0)
  # A representable alpha is right to a few ulps.
  in_range = (ra > 1.01 * tiny) & (ra < big / 1.01)
  rel = np.abs(alpha[in_range] - ra[in_range]) / ra[in_range]
  assert rel.max() <= rtol, x[in_range][np.argmax(rel)]
  # Beyond the float range: no step (documented).
  assert np.all(alpha[ra >= big * 1.01] == 0)
  # The predicted decrease: right where representable, +inf above the range.
  d_in = in_range & (rd > 1.01 * tiny) & (rd < big / 1.01)
  err = np.abs(dec[d_in] - rd[d_in])
  # Relative, except where F - m itself cancels (a non-descent minimum just
  # below m(0)): there relative to the terms of m.
  rel_d = err / np.minimum(rd[d_in], 1e300)
  ok = (rel_d <= rtol) | (err <= rtol * scale[d_in])
  assert np.all(ok), x[d_in][~ok][:3]
  assert np.all(dec[in_range & (rd >= big * 1.01)] == np.inf)
  return int(in_range.sum()), float(rel.max()), float(rel_d.max())


def test_float32_whole_range_matches_60_digit_reference():
  """20000 inputs with magnitudes 1e-38..3e38 (issue 11).

  alpha within 3e-7 relative (2.5 ulps) wherever it is in the float32
  range; F - m within 1e-6. An earlier scale-free form was wrong (rel.
  error > 1e-5) on 1696 of them, 1621 of which it returned as alpha = 0.
  """
  x = _log_uniform_inputs(np.random.default_rng(11), 20000, -37.9, 38.5)
  n, rel_alpha, _ = _check_against_reference(x, np.float32, rtol=1e-6)
  assert n > 9000
  assert rel_alpha <= 3e-7


def test_float64_whole_range_matches_60_digit_reference():
  """Magnitudes 1e-300..1e300; alpha within 1e-15 relative (4.5 ulps)."""
  x = _log_uniform_inputs(np.random.default_rng(12), 4000, -300, 300)
  with jax.enable_x64(True):
    n, rel_alpha, _ = _check_against_reference(x, np.float64, rtol=1e-14)
  assert rel_alpha <= 1e-15
  assert n > 1500


def test_issue_11_huge_slope_and_curvature():
  # 2|s~| overflowed float32 and gave alpha = 0; the true alpha is ~1.
  step = lrcr.cubic_step(-3e38, 3e38, 1.0, 100.0)
  a, d, _ = reference_step(np.float32(-3e38), np.float32(3e38), 1.0, 100.0)
  np.testing.assert_allclose(float(step.alpha), a, rtol=1e-6)
  np.testing.assert_allclose(float(step.predicted_decrease), d, rtol=1e-6)
  # Extreme combinations where ||g||^3, sigma ||g||^3 or s / ||g|| leave the
  # range, with alpha itself representable.
  # The previous scale-free form returned 0 on the first three.
  for s, h, n2, sigma in [(-3e38, 1e-30, 1e-10, 1.0),
                          (-3e38, 3e38, 1e-37, 1e-37),
                          (-1e-30, 1e-37, 1e30, 1e-30),
                          (1e-3, -3e38, 1e30, 1e5)]:
    a, _, _ = reference_step(*(np.float32(v) for v in (s, h, n2, sigma)))
    assert 1e-37 < a < 1e38
    np.testing.assert_allclose(float(lrcr.cubic_step_length(s, h, n2, sigma)),
                               a, rtol=1e-6)


def test_decrease_overflow_is_inf_with_finite_alpha():
  # Issue 3: m(alpha) overflowed to NaN, and the decrease was reported as 0.
  step = lrcr.cubic_step(-1.0, -1e13, 1.0, 1.0)
  np.testing.assert_allclose(float(step.alpha), 2e13, rtol=1e-6)
  assert float(step.predicted_decrease) == np.inf      # true value 6.7e38


@pytest.mark.parametrize("fn", [lrcr.cubic_step, lrcr.cubic_step_length])
@pytest.mark.parametrize("sigma", [0.0, -1.0, np.nan, np.inf,
                                   jnp.float32(0.0), np.float32(-1.0),
                                   np.array([1.0, -1.0])])
def test_concrete_sigma_must_be_positive(fn, sigma):
  with pytest.raises(ValueError, match="sigma must be finite and > 0"):
    fn(-1.0, 1.0, 1.0, sigma)


def test_traced_sigma_is_not_checked_and_gives_no_step():
  """Documented: under jit a sigma <= 0 cannot be refused; alpha = 0."""
  step = jax.jit(lrcr.cubic_step)(-1.0, 1.0, 1.0, jnp.array([0.0, -1.0, 4.0]))
  np.testing.assert_array_equal(step.alpha[:2], 0.0)
  np.testing.assert_array_equal(step.predicted_decrease[:2], 0.0)
  assert float(step.alpha[2]) > 0
  with pytest.raises(TypeError, match="real number"):
    lrcr.cubic_step(-1.0, 1.0, 1.0, "100")


# --- Derivatives (issue 18 item 6): the implicit-function derivative. -------


def _central_differences(f, x, rel=1e-6):
  """Central differences of a scalar f at x (float64), per coordinate."""
  out = []
  for i in range(len(x)):
    step = rel * max(abs(x[i]), 1e-3)
    e = np.zeros(len(x))
    e[i] = step
    out.append((float(f(x + e)) - float(f(x - e))) / (2 * step))
  return np.array(out)


@pytest.mark.parametrize("case", [
    (-1.0, 2.0, 1.5, 10.0),       # descent, h > 0
    (-0.3, -2.0, 0.7, 3.0),       # descent, negative curvature
    (-1e-3, 50.0, 4.0, 10.0),     # eq. 41's Newton regime
    (-2.0, 1e-3, 0.5, 100.0),     # eq. 41's h -> 0 regime
    (0.5, -4.0, 1.0, 1.0),        # non-descent: the local minimum
    (0.0, -3.0, 1.3, 2.0),        # a saddle: alpha = 2|h| / S
])
def test_grad_of_step_length_and_decrease_match_finite_differences(case):
  """jax.grad of alpha and F - m against float64 central differences.

  Issue 18: the bit-level solve gave jax.grad = [0, 0, 0, 0].
  """
  with jax.enable_x64(True):
    x = np.array(case, np.float64)
    alpha = lambda v: lrcr.cubic_step_length(*v)
    decrease = lambda v: lrcr.cubic_step(*v).predicted_decrease
    for f in (alpha, decrease):
      got = np.asarray(jax.grad(f)(jnp.asarray(x)))
      ref = _central_differences(f, x)
      scale = np.max(np.abs(ref))
      assert scale > 0
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7 * scale)
    # Forward mode against a central difference along t.
    t = np.array([0.3, -0.2, 0.1, 0.05])
    _, jvp = jax.jvp(alpha, (jnp.asarray(x),), (jnp.asarray(t),))
    eps = 1e-6
    ref = (float(alpha(x + eps * t)) - float(alpha(x - eps * t))) / (2 * eps)
    np.testing.assert_allclose(float(jvp), ref, rtol=1e-6,
                               atol=1e-7 * np.max(np.abs(
                                   _central_differences(alpha, x))))


def test_grad_is_exactly_zero_where_no_step_is_taken():
  """s >= 0 with h >= 0, or no minimum below m(0): alpha = 0 on an open
  set, so its derivative is 0; and a float32 grad is the float64 one
  rounded."""
  with jax.enable_x64(True):
    for case in [(0.5, 2.0, 1.0, 1.0), (1.0, -0.1, 1.0, 1.0)]:  # 2nd: no min
      x = np.array(case)
      assert float(lrcr.cubic_step_length(*x)) == 0.0
      np.testing.assert_array_equal(
          jax.grad(lambda v: lrcr.cubic_step_length(*v))(jnp.asarray(x)),
          0.0)
      np.testing.assert_allclose(
          _central_differences(lambda v: lrcr.cubic_step_length(*v), x), 0.0)
    x = np.array([-1.0, 2.0, 1.5, 10.0])
    g64 = np.asarray(jax.grad(lambda v: lrcr.cubic_step_length(*v))(x))
  g32 = jax.grad(lambda v: lrcr.cubic_step_length(*v))(
      jnp.asarray(x, jnp.float32))
  assert g32.dtype == jnp.float32
  np.testing.assert_allclose(g32, g64, rtol=1e-5)


def test_grad_through_vmap_and_jit_and_of_sigma_alone():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    s = -10 ** rng.uniform(-2, 1, 8)
    h = rng.normal(size=8)
    n2 = 10 ** rng.uniform(-1, 1, 8)
    sigma = 10 ** rng.uniform(0, 2, 8)
    d_sigma = jax.jit(jax.vmap(jax.grad(lrcr.cubic_step_length, argnums=3)))(
        s, h, n2, sigma)
    for i in range(8):
      f = lambda v: lrcr.cubic_step_length(s[i], h[i], n2[i], v[0])
      np.testing.assert_allclose(
          d_sigma[i], _central_differences(f, np.array([sigma[i]]))[0],
          rtol=1e-6)
