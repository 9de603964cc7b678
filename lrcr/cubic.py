"""The Cubic-Regularization step length along a fixed direction (eqs. 8, 9, 37).

With the direction g fixed, the cubic model of eq. 8 is a cubic in the step
length alpha (the paper's sigma/6 convention):

    m(alpha) = F + alpha s + alpha^2 h / 2 + sigma/6 alpha^3 ||g||^3     # eq. 8
    s = g . grad F,  h = g^T H g

and m'(alpha) = 0 has the roots of eq. 9; the paper takes the positive one:

    alpha = (-h + sqrt(h^2 - 2 s sigma ||g||^3)) / (sigma ||g||^3)    # eq. 37

Kohler & Lucchi (2017), whose adaptive-sigma scheme lrcr also offers, write
sigma/3 in front of the cubic term: their sigma equals this paper's sigma / 2.

Numerics (departures from eq. 37 as printed)
--------------------------------------------
Write S = sigma ||g||^3. The model has two exact symmetries: scaling g by c
(s -> c s, h -> c^2 h, S -> c^3 S, alpha -> alpha / c) and scaling F by l
(s, h, S -> l s, l h, l S; alpha unchanged). lrcr uses them with powers of
two, c = 2^k and l = 2^j, chosen from the inputs' binary exponents so that
the rescaled problem has |s~| in [1/2, 1) and S~ in [1/16, 3]:

    s~ = l c s,  h~ = l c^2 h,  S~ = l c^3 S
    alpha = c b,  F - m(alpha) = D~ / l

where b is the larger root of m~'(b) = s~ + h~ b + S~ b^2 / 2 = 0:

    b = (-h~ + R) / S~ = -2 s~ / (h~ + R),  R = sqrt(h~^2 - 2 s~ S~)  # eq. 37

Only h~ is left free; it is the ratio that sorts the regimes of eq. 41
(h~^2 / (2|s~| S~) is scale-free).

* Range. k, j and the exponent of h~ are integers computed from each
  input's mantissa and binary exponent (`frexp`), so no intermediate such
  as h^2, sigma ||g||^3 or 2|s| over- or underflows; only the final alpha
  and F - m(alpha) are rounded to the input dtype (`times_pow2`). Against a
  60-digit reference on inputs spanning the whole float32 range, alpha is
  within about 2 ulps (tests/cubic_test.py), and likewise in float64.
  Subnormal inputs count as 0 (XLA flushes them).
* Cancellation. For h~ > 0 the numerator of eq. 37 subtracts two nearly
  equal numbers when h~^2 >> |s~| S~ (the first regime of eq. 41). There
  lrcr uses the conjugate form -2 s~ / (h~ + R), which is exact algebra
  without cancellation. For |h~| beyond 2^32 the limits of eq. 41 are exact
  to far below an ulp: b = |s~| / h~ (h~ > 0) or 2|h~| / S~ (h~ < 0).
* Predicted decrease. At the root, m'(alpha) = 0 turns F - m(alpha) into
  D~ = -b (4 s~ + h~ b) / 6, a sum of positive terms for a descent
  direction (h~ b <= |s~| where h~ > 0).
* Kernels. The solve is written so that XLA compiles it into a few fused
  scalar kernels (see `_solve_primal` and `_solve_jit`): the CR step runs
  it every update, and on accelerators a step of small kernels costs about
  its number of kernels.
* Derivatives. `solve` (and with it `cubic_step`, `cubic_step_length` and
  `lrcr.scale_by_cubic_step`) is a `jax.custom_jvp`: the implicit-function
  derivative of eq. 37's root, and the envelope derivative of F - m(alpha);
  see `solve` for the points where alpha has none.

Non-descent directions: the documented policy
---------------------------------------------
Eq. 37 assumes s < 0. Adaptive or momentum directions (Adam on a plateau, for
example) can have s >= 0, where eq. 37 gives a negative or complex root; a
plain implementation returns NaN. lrcr takes in every case the global
minimizer of the cubic model over alpha >= 0:

* s < 0: the positive root of eq. 37 (m decreases there: the paper's step).
* s >= 0 and h >= 0: alpha = 0. Along g the model only rises; no step.
* s > 0 and h < 0: m has a local minimum at the larger root of m' when
  h^2 >= 2 s S. lrcr steps there if the model value is below m(0),
  otherwise alpha = 0.
* s = 0 and h < 0 (a saddle): alpha = 2 |h| / S, which steps off it.
* g = 0, any non-finite input, or sigma <= 0 (possible only under a
  transformation such as `jit`, see below): alpha = 0.

Outside the float range
-----------------------
alpha is always finite and >= 0. When the minimizer alpha is itself beyond
the largest float of the dtype (3e38 in float32; `scale_by_cubic_step` solves
along a direction with entries of size 1, so this takes a tiny sigma with a
huge negative curvature), lrcr returns alpha = 0; when it is below the
smallest normal float it rounds to 0 as well. The
predicted decrease F - m(alpha) is >= 0 and is +inf when it exceeds the float
range while alpha does not: `scale_by_cubic_step`'s adaptive sigma rejects
such a step, and its `info.finite` flags both cases.

sigma
-----
`cubic_step` and `cubic_step_length` refuse a concrete sigma (a Python number
or a concrete array) that is not finite and > 0. Under `jit`, `vmap` or
`grad` sigma can be a tracer, whose value is unknown at trace time: it is then
not checked, and every lane with sigma <= 0 or non-finite gets alpha = 0 and a
predicted decrease of 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Where h~ = m 2^E has E > _HUGE_EXP (|h~| > 2^32), the limits of eq. 41
# replace the closed form; their relative error, about 2^-2E < 2^-64, is
# below an ulp of float64. Below it h~^2 < 2^66 stays in range.
_HUGE_EXP = 32


class CubicStep(NamedTuple):
  """The chosen step length and what the cubic model predicts for it.

  Attributes:
    alpha: the step length multiplying g (>= 0, finite).
    predicted_decrease: F - m(alpha) >= 0, the decrease the model predicts;
      +inf where it exceeds the float range (see the module docstring).
  """
  alpha: Array
  predicted_decrease: Array


class CubicSolution(NamedTuple):
  """`solve`'s result: a `CubicStep` and whether it stayed in range.

  Attributes:
    alpha: the step length multiplying g (>= 0, finite).
    predicted_decrease: F - m(alpha) >= 0; +inf where it overflows.
    finite: False where an input was not finite, or where alpha or the
      predicted decrease left the float range (alpha is then 0).
  """
  alpha: Array
  predicted_decrease: Array
  finite: Array


def check_sigma(sigma: Any, where: str) -> None:
  """Refuses a concrete sigma that is not finite and > 0; passes tracers.

  Args:
    sigma: a Python number, a NumPy or JAX array, or a tracer.
    where: the call to name in the message, e.g. "cubic_step".

  Raises:
    ValueError: if sigma is concrete and some entry is <= 0 or not finite.
    TypeError: if sigma is concrete and not a real number.
  """
  if isinstance(sigma, jax.core.Tracer):
    return   # Unknown at trace time: documented, alpha = 0 where sigma <= 0.
  try:
    value = np.asarray(sigma)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{where}(sigma={sigma!r}): sigma must be a real number "
                    "> 0 (the paper uses 100 and 1000).") from e
  if value.dtype == bool or not np.issubdtype(value.dtype, np.number) or \
     np.issubdtype(value.dtype, np.complexfloating):
    raise TypeError(f"{where}(sigma={sigma!r}): sigma must be a real number "
                    f"> 0, got dtype {value.dtype}.")
  with np.errstate(invalid="ignore"):
    bad = ~(np.isfinite(value) & (value > 0))
  if np.any(bad):
    shown = value if value.ndim == 0 else value[bad][:5]
    raise ValueError(
        f"{where}(sigma={shown!r}): sigma must be finite and > 0 (it weighs "
        "the cubic term sigma/6 alpha^3 ||g||^3 of eq. 8; the paper uses 100 "
        "and 1000). With sigma <= 0 the model has no minimizer.")


# --- Numbers as (mantissa, binary exponent) ----------------------------------
# x = m 2^e with m a moderate float (within a few powers of two of 1) and e an
# int32: products, quotients and square roots never leave the float range.
# Only the inputs, h~ and the two results are normalised (frexp, ldexp), and
# those are read and written from the bits: jnp.frexp and jnp.ldexp are much
# larger programs, and this code runs once per weight for the "variable"
# granularity.


def _int_type(dtype):
  return {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[jnp.finfo(dtype).bits]


def _where(cond: Array, a: Any, b: Any) -> Array:
  """jnp.where as one lax.select (jnp.where and jnp.clip are nested jits:
  several times the program to compile). a, b: cond's shape, or scalars."""
  dtype = jnp.result_type(a, b)
  fit = lambda v: jax.lax.broadcast_in_dim(
      jnp.asarray(v, dtype), jnp.shape(cond), ()) if jnp.ndim(v) == 0 \
      else jnp.asarray(v, dtype)
  return jax.lax.select(cond, fit(a), fit(b))


def _clip(k: Array, lo: int, hi: int) -> Array:
  return jax.lax.clamp(jnp.asarray(lo, k.dtype), k, jnp.asarray(hi, k.dtype))


def _pow2(k: Array, dtype) -> Array:
  """2^k in dtype, exactly; k (int32) is clipped to the normal exponents."""
  finfo = jnp.finfo(dtype)
  k = _clip(k, finfo.minexp, finfo.maxexp - 1)
  bits = jnp.left_shift((k + finfo.maxexp - 1).astype(_int_type(dtype)),
                        finfo.nmant)
  return jax.lax.bitcast_convert_type(bits, dtype)


def times_pow2(x: Array, k: Array) -> Array:
  """x 2^k, exact unless the result leaves the normal floats.

  Two factors 2^(k//2) and 2^(k - k//2), so that 2^k itself need not be
  representable: |k| up to twice the exponent range. Linear in x, so its
  derivative in x is 2^k (k has none).

  Args:
    x: a float array.
    k: int32 exponents, broadcastable against x.

  Returns:
    x 2^k in x's dtype: +-inf above the range, 0 or subnormal below it.
  """
  x = jnp.asarray(x)
  k1 = jax.lax.shift_right_arithmetic(k, jnp.ones_like(k))   # floor(k / 2)
  return x * _pow2(k1, x.dtype) * _pow2(k - k1, x.dtype)



def frexp(x: Array) -> tuple[Array, Array]:
  """The mantissa and binary exponent of |x|, read from its bits.

  Args:
    x: a finite float array (for inf or NaN the result is meaningless).

  Returns:
    (m, e) with |x| = m 2^e, 0.5 <= m < 1 and e an int32; (0, 0) for 0 and
    subnormals. Cheaper than `jnp.frexp`, which also handles those.
  """
  finfo = jnp.finfo(x.dtype)
  int_type = _int_type(x.dtype)
  bits = jax.lax.bitcast_convert_type(jnp.abs(x), int_type)
  biased = jnp.right_shift(bits, finfo.nmant)          # the sign bit is 0
  frac = bits & jnp.asarray((1 << finfo.nmant) - 1, int_type)
  half = jnp.asarray((finfo.maxexp - 2) << finfo.nmant, int_type)   # 0.5
  m = jax.lax.bitcast_convert_type(frac | half, x.dtype)
  zero = biased == 0
  e = (biased - (finfo.maxexp - 2)).astype(jnp.int32)
  return _where(zero, 0.0, m), _where(zero, 0, e)


def exponent(x: Array) -> Array:
  """e with |x| 2^-e in [0.5, 1) (int32); 0 for 0, subnormals, inf and NaN."""
  usable = jnp.isfinite(x)
  return jnp.where(usable, frexp(jnp.where(usable, x, jnp.zeros_like(x)))[1],
                   0)


def _to_float(m: Array, e: Array) -> Array:
  """m 2^e (m >= 0 finite) rounded: inf above the range, 0 below normals."""
  m, de = frexp(m)
  e = e + de
  finfo = jnp.finfo(m.dtype)
  k = _clip(e, finfo.minexp - 1, finfo.maxexp + 1)
  return _where(e <= finfo.minexp, 0.0, times_pow2(m, k))


def _abs(x: Array) -> Array:
  """|x|, for squares of x >= 0 written as x |x|.

  XLA keeps a value that depends on several inputs as a kernel of its own
  when a consumer multiplies it by itself; x |x| reads it through two
  different operations, and fuses.
  """
  return jnp.abs(x)


def _even(m: Array, e: Array) -> tuple[Array, Array]:
  """The same number with an even exponent, for a square root."""
  odd = (e & 1) != 0
  return _where(odd, 2.0 * m, m), _where(odd, e - 1, e)


def _solve_primal(s, h, n2, sig):
  """(alpha, predicted decrease, ok) of eq. 37 and the policy; see `solve`.

  s, h, n2, sig: arrays of one float dtype, broadcast together. Written so
  that XLA fuses it into a few kernels: no value that depends on two inputs is
  multiplied by itself (XLA does not duplicate such a value into a consumer
  that reads it twice, and keeps it as a kernel of its own).
  """
  dtype = s.dtype
  # Half precision is solved in float32 and rounded at the end.
  work = jnp.promote_types(dtype, jnp.float32)
  tiny = jnp.finfo(work).tiny
  flush = lambda x: _where(jnp.abs(x) < tiny, jnp.zeros_like(x), x)
  s, h, n2, sig = (flush(x.astype(work)) for x in (s, h, n2, sig))
  finite = (jnp.isfinite(s) & jnp.isfinite(h) & jnp.isfinite(n2)
            & jnp.isfinite(sig))
  valid = finite & (n2 > 0) & (sig > 0)

  # Mantissas and exponents: |s| = ms 2^es, ..., ||g||^2 = mn 2^en (en even).
  # Non-finite lanes give garbage here, and 0 at the end.
  ms, es = frexp(s)
  mh, eh = frexp(h)
  mn, en = _even(*frexp(n2))
  mg, eg = frexp(sig)
  saddle = s == 0
  # Rescale g by 2^k and F by 2^j (the two symmetries of the module
  # docstring) so that |s~| = ms and S~ = sigma~ ||g~||^3 is within [1/16, 3]:
  #   j + k = -es,   j + 3k = -(eg + 3 en/2) - r,  r in {0, 1}.
  # A saddle (s = 0) has no s to normalise: there h~ = mh (E = 0).
  es = _where(saddle, 2 * eh - eg - 3 * jnp.right_shift(en, 1), es)
  t = es - eg - 3 * jnp.right_shift(en, 1)
  k = jnp.right_shift(t, 1)
  big_s = _where(t - 2 * k == 1, 0.5 * mg, mg) * mn * jnp.sqrt(mn)  # S~
  st = jnp.sign(s) * ms                                              # s~
  e_h = eh + k - es                                     # h~ = mh 2^e_h
  huge = (mh > 0) & (e_h > _HUGE_EXP)
  e_hc = jnp.minimum(e_h, _HUGE_EXP)
  ht = jnp.sign(h) * _to_float(mh, e_hc)                             # h~
  pos = h > 0

  # m'(b) = s~ + h~ b + S~ b^2 / 2 = 0, the larger root:             # eq. 37
  #   b = (-h~ + R) / S~ = -2 s~ / (h~ + R),  R = sqrt(h~^2 - 2 s~ S~),
  # the second (conjugate) form where h~ > 0, against cancellation. For
  # s~ > 0 (non-descent, h~ < 0) it is the local minimum; for s = 0, h < 0
  # (a saddle) b = 2|h~| / S~. Huge |h~|, the limits of eq. 41:
  #   h~ > 0: b = |s~| / h~;   h~ < 0: b = 2|h~| / S~.
  disc = _to_float(mh * _abs(mh), 2 * e_hc) - 2.0 * st * big_s
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  num = _where(huge, _where(pos, ms, 2.0 * mh), _where(pos, -2.0 * st,
                                                       root - ht))
  den = _where(huge, _where(pos, mh, big_s), _where(pos, ht + root, big_s))
  mb = num / den
  eb = _where(huge, _where(pos, -e_h, e_h), 0)
  # F - m at the root (m' = 0 removes S~): D~ = -b (4 s~ + h~ b) / 6, a
  # sum of positive terms for s~ < 0 (h~ b <= |s~| where h~ > 0). Huge:
  #   h~ > 0: h~ b = |s~|, D~ = b |s~| / 2;
  #   h~ < 0: D~ = b^3 |h~| S~ / 12 = b (mh b) / 6 2^(3E).
  # Written as one quotient of num and den, so that no quotient is read
  # twice (XLA keeps a reused division as a kernel of its own).
  num_d = _where(huge, _where(pos, 0.5 * ms * num, num * mh * _abs(num)),
                 -num * (4.0 * st * den + ht * num))
  md = num_d / _where(huge & pos, den, 6.0 * den * _abs(den))
  ed = _where(huge & ~pos, 3 * eb, eb)
  # alpha = b 2^k, F - m = D~ 2^-j = D~ 2^(k + es).
  take = valid & ((s < 0) | ((h < 0) & (
      saddle | (huge | (disc >= 0)) & (num_d > 0))))
  alpha = _where(take, _to_float(mb, eb + k), 0.0).astype(dtype)
  decrease = _where(take, _to_float(md, ed + k + es), 0.0).astype(dtype)
  alpha_ok = jnp.isfinite(alpha)
  alpha = _where(alpha_ok, alpha, 0.0)
  decrease = _where(alpha > 0, decrease, 0.0)
  ok = finite & alpha_ok & jnp.isfinite(decrease)
  return alpha, decrease, ok


@jax.custom_jvp
def _solve_differentiable(s, h, n2, sig):
  return _solve_primal(s, h, n2, sig)


@_solve_differentiable.defjvp
def _solve_jvp(primals, tangents):
  """The implicit-function derivative of the root of eq. 37 (see `solve`).

  m'(alpha) = s + alpha h + S alpha^2 / 2 = 0 with S = sigma ||g||^3, so
      d alpha = -(ds + alpha dh + alpha^2 dS / 2) / (h + S alpha),
  and at that root (the envelope theorem) F - m(alpha) has the derivative
      d(F - m) = -(alpha ds + alpha^2 dh / 2 + alpha^3 dS / 6),
  with dS = ||g||^3 dsigma + 3/2 sigma ||g|| d||g||^2.
  """
  alpha, decrease, ok = _solve_differentiable(*primals)
  work = jnp.promote_types(alpha.dtype, jnp.float32)
  s, h, n2, sig = (x.astype(work) for x in primals)
  ds, dh, dn2, dsig = (x.astype(work) for x in tangents)
  a = alpha.astype(work)
  norm = jnp.sqrt(jnp.maximum(n2, 0.0))
  d_big_s = n2 * norm * dsig + 1.5 * sig * norm * dn2
  # h + S alpha = sqrt(h^2 - 2 s S) > 0 at every root the policy takes.
  m2 = h + sig * n2 * norm * a
  live = (alpha > 0) & (m2 > 0) & jnp.isfinite(m2)
  d_alpha = -(ds + a * dh + 0.5 * a * a * d_big_s) / _where(live, m2, 1.0)
  d_alpha = _where(live, d_alpha, 0.0)
  d_dec = -(a * ds + 0.5 * a * a * dh + a * a * a / 6.0 * d_big_s)
  d_dec = _where(live & jnp.isfinite(decrease), d_dec, 0.0)
  d_ok = np.zeros(jnp.shape(ok), jax.dtypes.float0)
  return ((alpha, decrease, ok),
          (d_alpha.astype(alpha.dtype), d_dec.astype(alpha.dtype), d_ok))


@jax.jit
def _solve_jit(s, h, n2, sig):
  """The solve, whose results leave through one array.

  Without the barrier, XLA fuses parts of the solve into each reader of
  alpha (every leaf of an update) and keeps the shared divisions and
  square roots as kernels of their own; with it, the solve is a few
  kernels whatever reads alpha.
  """
  alpha, decrease, ok = _solve_differentiable(s, h, n2, sig)
  pack = jax.lax.optimization_barrier(
      jnp.stack([alpha, decrease, ok.astype(alpha.dtype)]))
  return pack[0], pack[1], pack[2] > 0


def solve(slope, curvature, sqnorm, sigma) -> CubicSolution:
  """`cubic_step` without the sigma check, and with a range flag.

  The shared solve of `cubic_step`, `cubic_step_length` and
  `lrcr.scale_by_cubic_step` (which checks sigma once, when it is built).
  Differentiable: `jax.grad` and `jax.jvp` give the implicit-function
  derivative of the root of eq. 37 (a `jax.custom_jvp`), and the envelope
  derivative of the predicted decrease. Where the policy takes no step
  (alpha = 0 on an open set of inputs: s >= 0 and h >= 0, no minimum below
  m(0), invalid or non-finite inputs) the derivative is 0, which is exact
  there. At the boundaries where alpha jumps (s > 0 as h^2 crosses 2 s S,
  or m(alpha) crosses m(0)) alpha has no derivative; lrcr returns the
  derivative of the side it took (0 on the no-step side). Where alpha
  overflowed (`finite` False) both derivatives are 0, and where only the
  decrease did, the decrease's. The derivative is evaluated in the input
  dtype (at least float32) without the rescaling of the solve itself, so
  it is exact where sigma ||g||^3 alpha and its tangents stay in the float
  range (as along the unit-sized direction that `lrcr.scale_by_cubic_step`
  solves on).

  Args:
    slope: s = g . grad F.
    curvature: h = g^T H g.
    sqnorm: ||g||^2.
    sigma: the cubic weight; lanes where it is <= 0 or not finite get
      alpha = 0 (it is not checked here).

  Returns:
    `CubicSolution(alpha, predicted_decrease, finite)` in the promoted
    dtype of the inputs (float32 for integers), broadcast together.
  """
  dtype = jnp.result_type(slope, curvature, sqnorm, sigma)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  args = jnp.broadcast_arrays(*(jnp.asarray(x, dtype) for x in
                                (slope, curvature, sqnorm, sigma)))
  return CubicSolution(*_solve_jit(*args))


def cubic_step(slope, curvature, sqnorm, sigma) -> CubicStep:
  """Minimizer of the cubic model over alpha >= 0, and its predicted decrease.

  See the module docstring for the formulas (eqs. 9, 37), the stable
  evaluation over the whole float range, and the policy for non-descent
  directions.

  Args:
    slope: s = g . grad F.
    curvature: h = g^T H g.
    sqnorm: ||g||^2.
    sigma: the cubic weight, > 0 (this paper's sigma/6 convention).
      Checked when concrete; under `jit` a sigma <= 0 gives alpha = 0.

  Returns:
    `CubicStep(alpha, predicted_decrease)` in the promoted dtype of the
    inputs, broadcast together.

  Raises:
    ValueError: if sigma is concrete and not finite and > 0.
    TypeError: if sigma is concrete and not a real number.
  """
  check_sigma(sigma, "cubic_step")
  alpha, decrease, _ = solve(slope, curvature, sqnorm, sigma)
  return CubicStep(alpha, decrease)


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
    sigma: cubic weight, > 0. Checked when concrete; under `jit` a
      sigma <= 0 gives alpha = 0.

  Returns:
    alpha >= 0, finite for every input. For s >= 0 (not a descent direction),
    g = 0, non-finite inputs or a minimizer beyond the float range it follows
    the policy in the module docstring (the global minimizer of the cubic
    model over alpha >= 0, or 0).

  Raises:
    ValueError: if sigma is concrete and not finite and > 0.
    TypeError: if sigma is concrete and not a real number.
  """
  check_sigma(sigma, "cubic_step_length")
  return solve(slope, curvature, sqnorm, sigma).alpha


def cubic_model(alpha, slope, curvature, sqnorm, sigma) -> Array:
  """m(alpha) - F of eq. 8: alpha s + alpha^2 h/2 + sigma/6 alpha^3 ||g||^3."""
  return (alpha * slope + 0.5 * alpha ** 2 * curvature
          + sigma / 6.0 * alpha ** 3 * sqnorm ** 1.5)
