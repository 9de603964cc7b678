"""Whether a loss is a sum of per-sample terms, read from its program.

The Hessian diagonal (granularity "variable"), the per-sample factors and
section 3.1's per-sample averagings assume

    F(params, batch) = sum_b f(params, sample b)      (a mean: scaled)

A listwise ranking loss (a softmax over the batch), logits centred over the
batch, or a train-mode BatchNorm (batch statistics) couple the samples, and
those quantities are then not defined. This module follows the sample axis
through the program and finds the first operation that mixes samples,
before the loss's sum over them; the global and per-layer curvature do not
need this and stay exact for any loss.

Each value of the program gets a state: `None` (the same for every sample:
params, constants), an int (per-sample, along that axis), `_SUM` (a sum
over the samples of per-sample values, times constants) or `_MIX` (coupled).
An operation without a rule below mixes samples whenever any input is not
`None`: the check may refuse a separable loss, never accept a coupled one.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from lrcr import engine

_SUM = "sum"
_MIX = "mix"

#: Elementwise primitives (all operands of the output's shape, or scalars).
_ELEMENTWISE = frozenset("""
    abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex
    conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv
    erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log
    log1p logistic lt max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square
    stop_gradient sub tan tanh xor pvary
    """.split())
#: Elementwise and linear in a `_SUM` operand when every other is `None`.
_LINEAR_IN_SUM = frozenset(
    "add sub neg convert_element_type copy copy_p mul reduce_precision "
    "stop_gradient real imag conj pvary".split())  # mul: by shared values
_REDUCE_SUMS = frozenset(["reduce_sum", "psum", "psum_invariant"])
_REDUCES = frozenset(["reduce_max", "reduce_min", "reduce_prod", "argmax",
                      "argmin", "reduce_and", "reduce_or", "reduce_xor"])
#: Operations that only move or copy values: a sum over samples stays one.
_SHAPE_OPS = frozenset(["broadcast_in_dim", "reshape", "squeeze",
                        "expand_dims", "transpose", "reduce_sum", "copy",
                        "convert_element_type"])
_CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin",
                         "cumlogsumexp"])


class _Coupled(Exception):
  """The operation `prim` mixes samples; `why` says how."""

  def __init__(self, prim: str, why: str):
    super().__init__(f"`{prim}` {why}")


def _shift(axis: int, removed: Sequence[int]) -> int:
  return axis - sum(1 for r in removed if r < axis)


def _sum_rule(name: str, states: list) -> str:
  """An elementwise operation on a `_SUM`: linear in it, or coupling."""
  sums = states.count(_SUM)
  shared = all(x is None for x in states if x != _SUM)
  if name in ("add", "sub") and sums == len(states):
    return _SUM
  if shared and sums == 1 and (
      name in _LINEAR_IN_SUM - {"add", "sub"}
      or (name == "div" and states[0] == _SUM)):
    return _SUM
  if any(isinstance(x, int) for x in states):
    raise _Coupled(name, "combines a sum over the samples with per-sample "
                   "values")
  raise _Coupled(name, "is not linear in a sum over the samples")


def _elementwise(name: str, states: list) -> Any:
  if _MIX in states:
    return _MIX
  if _SUM in states:
    return _sum_rule(name, states)
  rows = {x for x in states if isinstance(x, int)}
  if len(rows) > 1:
    raise _Coupled(name, f"combines values whose samples lie along "
                   f"different axes {sorted(rows)}")
  return rows.pop() if rows else None


def _dot_general(eqn, states: list) -> Any:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = states
  lhs, rhs = (v.aval for v in eqn.invars)
  if _MIX in states:
    return _MIX
  if _SUM in states:
    if (ls == _SUM and rs is None) or (rs == _SUM and ls is None):
      return _SUM
    raise _Coupled("dot_general", "multiplies a sum over the samples")
  lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
  if isinstance(ls, int) and isinstance(rs, int):
    if ls in lb and rs in rb and list(lb).index(ls) == list(rb).index(rs):
      return list(lb).index(ls)
    raise _Coupled("dot_general", "contracts or crosses two samples' values")
  if isinstance(ls, int):
    if ls in lc:
      return _SUM
    if ls in lb:                      # row b times the shared block b
      return list(lb).index(ls)
    return len(lb) + lfree.index(ls)
  if isinstance(rs, int):
    if rs in rc:
      return _SUM
    if rs in rb:
      return list(rb).index(rs)
    return len(lb) + len(lfree) + rfree.index(rs)
  return None


def _reshape(eqn, state: int) -> Any:
  old = eqn.invars[0].aval.shape
  new = eqn.params["new_sizes"]
  before = math.prod(old[:state])
  for k in range(len(new)):
    if math.prod(new[:k]) == before and new[k] == old[state]:
      return k
  raise _Coupled("reshape", "merges the sample axis with another")


def _conv(eqn, states: list) -> Any:
  p = eqn.params
  dn = p["dimension_numbers"]
  ls, rs = states
  if rs is None and isinstance(ls, int) and ls == dn.lhs_spec[0] and (
      p["batch_group_count"] == 1):
    return dn.out_spec[0]
  if rs is None and ls is None:
    return None
  raise _Coupled("conv_general_dilated", "convolves across samples")


def _gather(eqn, states: list) -> Any:
  """take_along_axis and indexing: samples stay per sample."""
  dn = eqn.params["dimension_numbers"]
  os_, is_ = states
  operand, indices = (v.aval for v in eqn.invars)
  out_ndim = eqn.outvars[0].aval.ndim
  batch_pos = [d for d in range(out_ndim) if d not in dn.offset_dims]
  idx_dims = list(range(indices.ndim - 1))      # index_vector_dim is last
  if _MIX in states or _SUM in states:
    raise _Coupled("gather", "indexes with values summed over the samples")
  if isinstance(os_, int) and os_ in dn.operand_batching_dims:
    j = list(dn.operand_batching_dims).index(os_)
    if is_ == dn.start_indices_batching_dims[j]:
      return batch_pos[idx_dims.index(is_)]
  elif isinstance(os_, int) and is_ is None and (
      os_ not in dn.collapsed_slice_dims and os_ not in dn.start_index_map
      and eqn.params["slice_sizes"][os_] == operand.shape[os_]):
    kept = [d for d in range(operand.ndim) if d not in dn.collapsed_slice_dims
            and d not in dn.operand_batching_dims]
    return dn.offset_dims[kept.index(os_)]
  elif os_ is None and isinstance(is_, int) and is_ in idx_dims:
    return batch_pos[idx_dims.index(is_)]
  elif os_ is None and is_ is None:
    return None
  raise _Coupled("gather", "reads one sample's values for another")


def _structural(eqn, states: list) -> Any:
  """Rules of one-input shape operations on a per-sample input."""
  name, p, s = eqn.primitive.name, eqn.params, states[0]
  if name == "broadcast_in_dim":
    return p["broadcast_dimensions"][s]
  if name == "reshape":
    return _reshape(eqn, s)
  if name == "transpose":
    return list(p["permutation"]).index(s)
  if name == "squeeze":
    return _shift(s, p["dimensions"])
  if name == "expand_dims":
    return s + sum(1 for d in p["dimensions"] if d <= s)
  if name in _REDUCE_SUMS and "axes" in p and isinstance(p["axes"][0], int):
    return _SUM if s in p["axes"] else _shift(s, p["axes"])
  if name in _REDUCES:
    if s not in p["axes"]:
      return _shift(s, p["axes"])
    raise _Coupled(name, f"reduces over the sample axis {s}")
  if name in _CUMULATIVE or name == "sort" or name == "split":
    if p.get("axis", p.get("dimension")) != s:
      return s
    raise _Coupled(name, f"runs along the sample axis {s}")
  if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min",
              "reduce_window"):
    if p["window_dimensions"][s] == 1 and p["window_strides"][s] == 1:
      return s
    raise _Coupled(name, "pools over the sample axis")
  if name in ("slice", "pad", "rev", "dynamic_slice"):
    shape_in = eqn.invars[0].aval.shape[s]
    if eqn.outvars[0].aval.shape[s] == shape_in and not (
        name == "rev" and s in p["dimensions"]) and not (
            name == "pad" and any(p["padding_config"][s])):
      return s
    raise _Coupled(name, "slices or reorders the sample axis")
  if name in ("fft",):
    if s < eqn.invars[0].aval.ndim - len(p["fft_lengths"]):
      return s
    raise _Coupled(name, "transforms along the sample axis")
  return _MIX


def _rule(eqn, states: list) -> list:
  """The states of an operation's outputs from those of its inputs."""
  name = eqn.primitive.name
  n = len(eqn.outvars)
  if all(s is None for s in states):
    return [None] * n
  if name in _ELEMENTWISE:
    return [_elementwise(name, states)] * n
  if name in _RULES:
    return _RULES[name](eqn, states)
  if _SUM in states and name in _SHAPE_OPS and all(
      x in (_SUM, None) for x in states[1:]) and states[0] == _SUM:
    return [_SUM] * n                    # a reshaped or broadcast sum
  sub = engine.call_body(eqn, required=False)
  if sub is not None:
    return _walk(sub, states)
  live = [s for s in states if s is not None]
  if len(states) >= 1 and all(isinstance(s, int) for s in live) and (
      states[0] is not None):
    if all(s is None for s in states[1:]) or name == "sort":
      out = _structural(eqn, [states[0]])
      if out != _MIX:
        return [out] * n
  raise _Coupled(name, "has no per-sample rule in lrcr and reads "
                 "per-sample values")


def _concatenate(eqn, states: list) -> list:
  rows = {s for s in states if s is not None}
  if len(rows) == 1 and isinstance(r := rows.pop(), int) and (
      r != eqn.params["dimension"]):
    return [r]
  raise _Coupled("concatenate", "joins values along or across the sample axis")


def _scan(eqn, states: list) -> list:
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  consts, carry, xs = states[:nc], states[nc:nc + nk], states[nc + nk:]
  inner_xs = []
  for s in xs:
    if s == 0:
      raise _Coupled("scan", "loops over the sample axis")
    inner_xs.append(s - 1 if isinstance(s, int) else s)
  for _ in range(len(carry) + 2):
    out = _walk(p["jaxpr"], consts + carry + inner_xs)
    new = [_join(a, b) for a, b in zip(carry, out[:nk])]
    if new == carry:
      break
    carry = new
  ys = [s + 1 if isinstance(s, int) else s for s in out[nk:]]
  return carry + ys


def _join(a, b):
  if a is None:
    return b
  if b is None or a == b:
    return a
  raise _Coupled("scan", "carries values whose sample axis changes")


#: Rules of the primitives that need their params: (eqn, input states) ->
#: output states.
_RULES = {
    "dot_general": lambda eqn, states: [_dot_general(eqn, states)],
    "conv_general_dilated": lambda eqn, states: [_conv(eqn, states)],
    "gather": lambda eqn, states: [_gather(eqn, states)],
    "concatenate": _concatenate,
    "scan": _scan,
}


def _constant(eqn, states: list) -> list:
  """States of an operation that the params do not reach.

  Its outputs are constants of every per-sample term: a mix of samples
  (data centred over the batch, a mask's count) is one shared constant.
  """
  try:
    outs = _rule(eqn, states)
  except _Coupled:
    return [None] * len(eqn.outvars)
  return [None if x in (_SUM, _MIX) else x for x in outs]


def _walk(closed, states: Sequence[Any], deps: Sequence[bool] | None = None,
          ) -> list:
  """The states of a program's outputs; `deps`: which inputs params reach.

  With deps None every value counts as reached by the params (the strict
  check, and inside loop bodies).
  """
  jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
  env = dict(zip(jaxpr.invars, states))
  reached = {v for v, d in zip(jaxpr.invars, deps or [True] * len(states))
             if d}
  read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    din = [not isinstance(v, jcore.Literal) and v in reached
           for v in eqn.invars]
    if any(din):
      sub = engine.call_body(eqn, required=False)
      outs = (_walk(sub, ins, din) if sub is not None and deps is not None
              else _rule(eqn, ins))
      reached.update(eqn.outvars)
    else:
      outs = _constant(eqn, ins)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def coupling(traced: engine.Traced, strict: bool = False) -> str | None:
  """The operation that couples samples, or None if F is a sum over them.

  F = sum_b f_b(params), with f_b reached by the params through sample b
  only. Values that the params do not reach are constants of the terms, so
  data centred over the batch or a masked mean's count of samples do not
  couple. With `strict`, they do: f_b must also be the loss on sample b
  alone (section 3.1's per-sample losses).

  The samples are the leading axis of the batch leaves whose leading size
  is the most common one among the batch leaves (a key, a scalar or model
  state of another leading size is shared by all samples). A batch of one
  sample is never coupled.
  """
  sizes = collections.Counter(np.shape(b)[0] for b in traced.batch
                              if np.ndim(b))
  if not sizes:
    return None
  size = sizes.most_common(1)[0][0]
  if size <= 1:
    return None
  states = [None] * traced.num_params + [
      0 if np.ndim(b) and np.shape(b)[0] == size else None
      for b in traced.batch]
  deps = None if strict else [True] * traced.num_params + [False] * len(
      traced.batch)
  try:
    out = _walk(traced.closed, states, deps)[0]
  except _Coupled as e:
    return str(e)
  if out in (_SUM, None):
    return None
  return "the loss is not a sum over the samples of per-sample values"


def check_separable(traced: engine.Traced, what: str, fallback: str,
                    strict: bool = False) -> None:
  """Refuses `what` for a loss that is not a sum of per-sample terms.

  `strict`: see `coupling`.

  Raises:
    UnsupportedProgramError: naming the operation that couples samples.
  """
  why = coupling(traced, strict)
  if why is not None:
    raise engine.UnsupportedProgramError(
        f"{what} assumes the loss is a sum of per-sample terms, but this "
        f"loss couples its samples: {why} (a softmax, a centring or batch "
        f"statistics over the batch). {fallback}")
