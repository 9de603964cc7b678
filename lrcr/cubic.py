"""The Cubic-Regularization step length along a fixed direction (eqs. 8, 9, 37).

With the direction g fixed, the cubic model of eq. 8 is a cubic in the step
length alpha (the paper's sigma/6 convention):

    m(alpha) = F + alpha s + alpha^2 h / 2 + sigma/6 alpha^3 ||g||^3     # eq. 8
    s = g . grad F,  h = g^T H g

and m'(alpha) = 0 has the roots of eq. 9; the paper takes the positive one:

    alpha = (-h + sqrt(h^2 - 2 s sigma ||g||^3)) / (sigma ||g||^3)       # eq. 37

Kohler & Lucchi (2017), whose adaptive-sigma scheme lrcr also offers, write
sigma/3 in front of the cubic term: their sigma equals this paper's sigma / 2.

Numerics (departures from eq. 37 as printed)
--------------------------------------------
* Scale-free form. alpha g does not change when g is scaled, so lrcr solves
  for the step length t = alpha ||g|| along the unit direction, with
  s~ = s / ||g|| and h~ = h / ||g||^2:

      m(t) = s~ t + h~ t^2 / 2 + sigma t^3 / 6,  alpha = t / ||g||

  This keeps ||g||^3 from under- or overflowing in float32.
* Cancellation. For h > 0 the numerator of eq. 37 subtracts two nearly equal
  numbers when h^2 >> |s| sigma ||g||^3 (the first regime of eq. 41). There
  lrcr uses the conjugate form t = -2 s~ / (h~ + sqrt(h~^2 - 2 s~ sigma)),
  which is exact algebra and has no cancellation. For h <= 0 eq. 37 as
  printed is already stable.
* sqrt(h~^2 + 2|s~| sigma) is evaluated as hypot(h~, sqrt(2|s~| sigma)), so
  neither square overflows.

Non-descent directions: the documented policy
---------------------------------------------
Eq. 37 assumes s < 0. Adaptive or momentum directions (Adam on a plateau, for
example) can have s >= 0, where eq. 37 gives a negative or complex root; a
plain implementation returns NaN. lrcr takes in every case the global
minimizer of the cubic model over alpha >= 0:

* s < 0: the positive root of eq. 37 (m decreases there: the paper's step).
* s >= 0 and h >= 0: alpha = 0. Along g the model only rises; no step.
* s >= 0 and h < 0: m has a local minimum at the larger root of m' when
  h~^2 >= 2 s~ sigma. lrcr steps there if the model value is below m(0),
  otherwise alpha = 0. At a saddle (s = 0, h < 0) this steps off it.
* g = 0, or any non-finite input: alpha = 0.

The result is finite and >= 0 for every finite input, and the predicted
decrease F - m(alpha) is >= 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class CubicStep(NamedTuple):
  """The chosen step length and what the cubic model predicts for it.

  Attributes:
    alpha: the step length multiplying g (>= 0, finite).
    predicted_decrease: F - m(alpha) >= 0, the decrease the model predicts.
  """
  alpha: Array
  predicted_decrease: Array


def cubic_step(slope, curvature, sqnorm, sigma) -> CubicStep:
  """Minimizer of the cubic model over alpha >= 0, and its predicted decrease.

  See the module docstring for the formulas (eqs. 9, 37), the stable
  evaluation, and the policy for non-descent directions.

  Args:
    slope: s = g . grad F.
    curvature: h = g^T H g.
    sqnorm: ||g||^2.
    sigma: the cubic weight, > 0 (this paper's sigma/6 convention).

  Returns:
    `CubicStep(alpha, predicted_decrease)` in the promoted dtype of the
    inputs.
  """
  dtype = jnp.result_type(slope, curvature, sqnorm, sigma)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  s, h, n2, sigma = (jnp.asarray(a, dtype) for a in
                     (slope, curvature, sqnorm, sigma))
  finite = jnp.isfinite(s) & jnp.isfinite(h) & jnp.isfinite(n2) & (n2 > 0)
  finite = finite & jnp.isfinite(sigma) & (sigma > 0)
  one = jnp.ones((), dtype)
  # Placeholders keep the untaken branches finite (no NaN leaks into grads).
  norm = jnp.sqrt(jnp.where(finite, n2, one))
  sig = jnp.where(finite, sigma, one)
  st = jnp.where(finite, s / norm, -one)           # s~ = s / ||g||
  ht = jnp.where(finite, h / (norm * norm), one)   # h~ = h / ||g||^2

  # Descent (s~ < 0): the positive root of eq. 37 in scale-free form.
  root_q = jnp.sqrt(2.0 * jnp.abs(st)) * jnp.sqrt(sig)     # sqrt(2|s~| sigma)
  disc_descent = jnp.hypot(ht, root_q)                     # sqrt(h~^2 - 2 s~ sigma)
  conj = 2.0 * jnp.abs(st) / jnp.where(ht > 0, ht + disc_descent, one)
  t_descent = jnp.where(ht > 0, conj, (disc_descent - ht) / sig)

  # Non-descent (s~ >= 0) with h~ < 0: the larger root of m', if real.
  gap = jnp.abs(ht) - root_q                               # >= 0 iff real roots
  disc_up = jnp.sqrt(jnp.maximum(gap, 0.0) * (jnp.abs(ht) + root_q))
  t_up = (disc_up - ht) / sig

  t = jnp.where(st < 0, t_descent,
                jnp.where((ht < 0) & (gap >= 0), t_up, 0.0))
  t = jnp.where(finite, t, 0.0)
  model = st * t + 0.5 * ht * t * t + sig * t * t * t / 6.0    # m(t) - F
  # A non-descent local minimum is only taken when it is below m(0).
  t = jnp.where((st >= 0) & (model >= 0), 0.0, t)
  model = jnp.where(t > 0, model, 0.0)
  alpha = jnp.where(finite, t / norm, 0.0)
  alpha = jnp.where(jnp.isfinite(alpha), alpha, 0.0)
  decrease = jnp.where(jnp.isfinite(model), -jnp.minimum(model, 0.0), 0.0)
  return CubicStep(alpha.astype(dtype), decrease.astype(dtype))


def cubic_step_length(slope, curvature, sqnorm, sigma) -> Array:
  """The CR step length alpha of eq. 37, stable, with the non-descent policy.

  Solves m'(alpha) = 0 for the cubic model of eq. 8 along a fixed direction g
  and takes the positive root (eq. 9/37), in the paper's sigma/6 convention.
  Scaling g by c scales alpha by 1/c, so alpha g, and with it the base
  optimizer's learning rate, drops out: only sigma matters.

  Args:
    slope: s = g . grad F.
    curvature: h = g^T H g.
    sqnorm: ||g||^2.
    sigma: cubic weight, > 0.

  Returns:
    alpha >= 0, finite for every finite input. For s >= 0 (not a descent
    direction), g = 0 or non-finite inputs it follows the policy in the module
    docstring (the global minimizer of the cubic model over alpha >= 0, or 0).
  """
  return cubic_step(slope, curvature, sqnorm, sigma).alpha


def cubic_model(alpha, slope, curvature, sqnorm, sigma) -> Array:
  """m(alpha) - F of eq. 8 along g: alpha s + alpha^2 h/2 + sigma/6 alpha^3 ||g||^3."""
  return (alpha * slope + 0.5 * alpha ** 2 * curvature
          + sigma / 6.0 * alpha ** 3 * sqnorm ** 1.5)
