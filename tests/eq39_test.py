"""Eq. 39 as printed against the dense Hessian: what it misses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcr
from experiments import eq39
from tests import reference


@pytest.mark.parametrize("seed,hidden", [(0, (4, 5)), (1, (3, 6, 4)),
                                         (2, (5, 4, 6, 6, 4))])
def test_eq39_as_printed_misses_cross_layer_gauss_newton(seed, hidden):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(seed, hidden, 4, 6, 3,
                                                 scale=0.8)
    g = reference.random_direction(seed + 10, params)
    _, exact, _ = reference.dense_reference(model, params, x, y, g)
    r = eq39.eq39(model, params, x, y, g)
    # Printed eq. 39 plus the omitted k != r Gauss-Newton blocks is exact...
    np.testing.assert_allclose(r.as_printed + r.missing_cross_layer_gauss_newton,
                               exact, rtol=1e-10)
    assert abs(float(exact)) > 1e-6
    # ...and the omission is not small.
    assert abs(float(r.as_printed - exact)) > 1e-3 * abs(float(exact))
    np.testing.assert_allclose(lrcr.directional(model, params, x, y, g).curvature,
                               exact, rtol=1e-10)


def test_eq39_exact_with_one_hidden_layer():
  """With n = 1 there are no pairs k != r, so eq. 39 is exact."""
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(5, (6,), 3, 6, 4)
    g = reference.random_direction(3, params)
    _, exact, _ = reference.dense_reference(model, params, x, y, g)
    r = eq39.eq39(model, params, x, y, g)
    np.testing.assert_allclose(r.as_printed, exact, rtol=1e-10)
    assert float(r.missing_cross_layer_gauss_newton) == 0.0


def test_eq39_refuses_what_it_does_not_cover():
  model, params, x, y = reference.make_problem(5, (3,), 3, 2, 4,
                                               activation=jnp.tanh,
                                               dtype=jnp.float32)
  with pytest.raises(ValueError, match="ReLU"):
    eq39.eq39(model, params, x, y, params)
