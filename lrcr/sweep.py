"""The tangent sweep of the second-order adjoint, and its rules.

For a direction g, one sweep over the forward values that `lrcr.engine`
stored propagates the tangents xdot along g and sums ybar . op''[xdot, xdot]
(the identity (*) of `lrcr.engine`). This module owns the generic `sweep`,
the rule of `scan` (an `engine.NestedRule`), and the weight operations'
plans: a dense layer's tangent and second-order term (eq. 36) in the dense
form, or in section 2's Gram form for a multiple of the gradient.
`curvature` gives one direction's (slope, curvature): `lrcr.curvature`
calls it once per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lrcr import cubic
from lrcr import engine
from lrcr.engine import Kind, Node, Pass, Program, Residuals

Array = jax.Array


def total(terms: Sequence[tuple], dtype: Any = jnp.float32,
          keep: frozenset | None = None) -> Array:
  """sum_k c_k Re<a_k, b_k> over (c, a, b) terms; a `dtype` zero if none.

  Each pairing is `engine.pair`'s (no conjugation, float32 at least, summed
  over the `shard_map` axes along which it varies and the loss (`keep`) does
  not). Terms of one shape (size-1 axes dropped), dtype, coefficient and
  set of varying axes are summed elementwise and reduced once: XLA:CPU
  launches a kernel (two for a large one) per reduction, and more where a
  reduction follows a reshape. A group whose shape extends another's (the
  loss's [B, C] terms beside its [B] ones) is first summed over its
  trailing axes into that one.
  """
  terms = list(terms)
  if not terms:
    return jnp.zeros((), engine.accumulation_dtype(dtype))
  groups: dict[tuple, list] = {}
  for c, a, b in terms:
    dt = jnp.result_type(jnp.float32, a.dtype, b.dtype)
    a, b = jnp.asarray(a, dt), jnp.asarray(b, dt)
    if a.shape != b.shape:
      a, b = a.ravel(), b.ravel()
    prod = a * b
    prod = prod.reshape(tuple(d for d in prod.shape if d != 1))
    key = (prod.shape, dt, c if isinstance(c, (int, float)) else id(c),
           engine.varying_axes(prod))
    groups.setdefault(key, [c]).append(prod)
  merged: dict[tuple, list] = {}
  for key in sorted(groups, key=lambda k: len(k[0])):
    shape, rest = key[0], key[1:]
    into = next((k for k in merged if k[1:] == rest and k[0]
                 and shape[:len(k[0])] == k[0]), None)
    if into is None:
      merged[key] = groups[key]
    else:
      axes = tuple(range(len(into[0]), len(shape)))
      merged[into].extend(p.sum(axes) for p in groups[key][1:])
  out = []
  for c, *prods in merged.values():
    acc = jnp.sum(sum(prods))
    if jnp.issubdtype(acc.dtype, jnp.complexfloating):
      acc = jnp.real(acc)
    if keep is not None:
      axes = tuple(x for x in engine.varying_axes(acc) if x not in keep)
      acc = lax.psum(acc, axes) if axes else acc
    out.append(c * acc)
  return sum(out)


def sweep(prog: Program, res: Residuals, ybar: dict, in_tans: dict,
          plan: _WeightPlan | None = None, dtype: Any = None,
          keep: frozenset | None = None) -> tuple[list, Array]:
  """The tangent sweep: (output tangents, sum of ybar . op''[xdot, xdot]).

  Args:
    prog: the program.
    res: its forward values (`engine.forward`).
    ybar: the adjoints of its offsets.
    in_tans: input value id -> tangent (absent: zero).
    plan: the weight operations of `prog` evaluated apart (`_WeightPlan`);
      their second-order terms are then the plan's to add.
    dtype: that of the sum where no operation contributes to it (default:
      the input tangents'), so that a float64 program's curvature stays
      float64.
    keep: the `shard_map` axes along which the loss varies (`engine.pair`).

  Returns:
    (tangents of prog's outputs (None where not carried), the sum).
  """
  tan = dict(in_tans)
  acc, terms = [], []
  for node in prog.nodes:
    if node.kind is Kind.CONST:
      continue
    vals = [engine.value_of(res.values, x) for x in node.ins]
    carried = [x for x, c in zip(node.ins, node.cin) if c]
    tans = [tan.get(x) for x in carried]
    outs = None
    if node.kind is Kind.NESTED:
      outs, a = node.rule.sweep(node, vals, tans, res.bodies[node.id],
                                ybar[node.id], keep)
      acc.append(a)
    else:           # a carried input without a tangent: zero
      tans = [t if t is not None else
              jnp.zeros_like(engine.value_of(res.values, x))
              for t, x in zip(tans, carried)]
      if plan is not None:
        outs = plan.tangents(node, vals, tans)
    if outs is not None:
      pass                        # evaluated by the rule or by the plan
    elif node.kind is Kind.LINEAR:
      outs = node.jvp(vals, tans)
    else:
      outs, second = node.jvp2(vals, tans)
      for o, s, yb in zip(node.second, second, ybar[node.id]):
        if o:
          terms.append((1.0, yb, s))
    for o, c, t in zip(node.outs, node.cout, outs):
      if c:
        tan[o] = t
  if dtype is None:
    dtype = (jnp.result_type(*in_tans.values()) if in_tans else jnp.float32)
  if plan is not None:              # the weight operations' own terms
    more, summed = plan.second_order()
    terms.extend(more)
    if summed is not None:
      acc.append(summed)
  out = total(terms, dtype, keep)
  for a in acc:
    out = out + a
  return [tan.get(x) if isinstance(x, int) else None for x in prog.outvars], out


# ---------------------------------------------------------------------------
# Higher-order primitives: one `engine.NestedRule` each, registered once.
# ---------------------------------------------------------------------------

class _ScanRule(engine.NestedRule):
  """`lax.scan`: consts, carries and scanned inputs; carries and outputs.

  The body is a program of its own: its carried values are found by a
  fixed point over the carries, its offsets and residuals are stacked over
  the iterations, and the tangent sweep runs inside a `lax.scan` of its own,
  so that the identity holds at every time step.
  """

  def body(self, params: dict):
    return params["jaxpr"]

  def analyze(self, node: Node) -> None:
    p = node.params
    nc, nk = p["num_consts"], p["num_carry"]
    cin = list(node.cin)
    for k in range(nc + nk, len(cin)):
      cin[k] = cin[k] and engine.is_float(node.in_avals[k])
    carry = cin[nc:nc + nk]
    while True:
      out = engine.analyze(node.body, cin[:nc] + carry + cin[nc + nk:])
      new = [a or b for a, b in zip(carry, out[:nk])]
      if new == carry:
        break
      carry = new
    node.cin = tuple(cin[:nc] + carry + cin[nc + nk:])
    node.cout = tuple(carry + out[nk:])

  def invariants(self, node: Node) -> list[tuple[int, int]]:
    return list(enumerate(node.body.invars[:node.params["num_consts"]]))

  def zero_offsets(self, node: Node, prefix: tuple) -> dict:
    return engine.zero_offsets(node.body, prefix + (node.params["length"],))

  def forward(self, node: Node, vals: list, eps: dict,
              ) -> tuple[list, Residuals]:
    p = node.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]
    body = node.body
    skip = frozenset(body.invars[:nc])

    def step(carry, x):
      x_t, eps_t = x
      outs, res_t = engine.forward(
          body, list(consts) + list(carry) + list(x_t), eps_t, skip)
      return outs[:nk], (outs[nk:], res_t)

    carry, (ys, res) = lax.scan(step, list(init), (list(xs), eps),
                                length=p["length"], reverse=p["reverse"],
                                unroll=p["unroll"])
    return list(carry) + list(ys), res

  def sweep(self, node: Node, vals: list, tans: list, res: Residuals,
            ybar: dict, keep: frozenset | None) -> tuple[list, Array]:
    p = node.params
    nc, nk = p["num_consts"], p["num_carry"]
    body = node.body
    where = [k for k, c in enumerate(node.cin) if c]      # tans' inputs
    const_env = dict(zip(body.invars[:nc], vals[:nc]))
    const_tans = {body.invars[k]: t for k, t in zip(where, tans)
                  if k < nc and t is not None}
    init = [t if t is not None else jnp.zeros_like(vals[k])
            for k, t in zip(where, tans) if nc <= k < nc + nk]
    xs_tans = [t for k, t in zip(where, tans) if k >= nc + nk]
    carry_ids = [body.invars[k] for k in where if nc <= k < nc + nk]
    xs_ids = [body.invars[k] for k in where if k >= nc + nk]
    dtype = engine.accumulation_dtype(*[jnp.asarray(t).dtype for t in tans
                                        if t is not None])

    def step(carry, x):
      ctan, acc = carry
      res_t, ybar_t, xt = x
      env = Residuals({**const_env, **res_t.values}, res_t.bodies)
      in_tans = dict(const_tans)
      in_tans.update(zip(carry_ids, ctan))
      in_tans.update(zip(xs_ids, xt))
      out_tans, a = sweep(body, env, ybar_t, in_tans, keep=keep)
      new = []
      for c, t in zip(node.cin[nc:nc + nk], out_tans[:nk]):
        if c:
          new.append(t if t is not None else jnp.zeros_like(ctan[len(new)]))
      ys = [t for t, c in zip(out_tans[nk:], node.cout[nk:]) if c]
      return (new, acc + a.astype(acc.dtype)), ys

    (ctan, acc), ys = lax.scan(step, (init, jnp.zeros((), dtype)),
                               (res, ybar, xs_tans), length=p["length"],
                               reverse=p["reverse"], unroll=p["unroll"])
    it = iter(list(ctan) + list(ys))
    return [next(it) if c else None for c in node.cout], acc


engine.NESTED_RULES["scan"] = _ScanRule()


# ---------------------------------------------------------------------------
# Weight operations, evaluated in groups (and in the Gram form for SGD).
# ---------------------------------------------------------------------------
#
# For a weight operation z = V W (V [N, d_in] the operand, N = batch x
# positions; W [d_in, d_out]; phi the direction on W; Ybar = dF/dz) the
# sweep needs the tangent dz = dV W + V phi and the second-order term
# Ybar . (2 dV phi) (eq. 36). V phi does not depend on the sequential chain
# and is taken before the sweep; the second-order terms are summed after it.
# When the direction is c * grad F (plain SGD) and W is read by this
# operation only, phi = c V^T Ybar, so
#
#     V phi = c (V V^T) Ybar,   Ybar . (dV phi) = c dV . ((Ybar Ybar^T) V)
#
# through N x N Gram matrices: O(N^2 d) instead of O(N d^2) (section 2's
# low rank; the form is used where it needs fewer multiplications).


def _dense_2d(node) -> bool:
  """z = V W with V [..., d_in] and a 2-D W on the right."""
  if node.name != "dot_general" or node.weight != 1:
    return False
  (lc, rc), (lb, rb) = node.params["dimension_numbers"]
  lhs, rhs = node.in_avals
  return (not lb and not rb and rhs.ndim == 2 and tuple(rc) == (0,)
          and tuple(lc) == (lhs.ndim - 1,))


def _weight_nodes(ps: Pass) -> dict:
  """id -> node of the 2-D dense weight operations that have an adjoint."""
  return {n.id: n for n in ps.traced.program.nodes
          if n.weight >= 0 and _dense_2d(n) and n.id in ps.ybar}


def gram_operations(ps: Pass) -> frozenset:
  """Weight operations where the Gram form needs fewer multiplications.

  N (d_in + d_out) < d_in d_out, and the weight is read by this operation
  only (so its gradient is V^T Ybar alone).
  """
  out = set()
  for node in _weight_nodes(ps).values():
    n = math.prod(node.in_avals[0].shape[:-1])
    d_in, d_out = node.in_avals[1].shape
    sole = ps.traced.uses.get(node.param) == 1
    if sole and n * (d_in + d_out) < d_in * d_out:
      out.add(node.id)
  return frozenset(out)


def unit(log2: Array | None) -> Callable[[Array], Array]:
  """x -> x 2^-log2 (exact), or the identity without an exponent."""
  if log2 is None:
    return lambda x: x
  return lambda x: cubic.times_pow2(x, -log2)


def _stack(xs: Sequence[Array]) -> Array:
  """[L, ...]: equally shaped arrays in one buffer (one copy).

  Concatenated along their leading axis and reshaped: `jnp.stack` would
  reshape each to [1, ...] first, and XLA then fuses each array's producer
  (a ReLU, a scaling) into that reshape, so the producer runs twice.
  """
  return jnp.concatenate(list(xs)).reshape((len(xs),) + xs[0].shape)


def _bmm(a: Array, b: Array, spec: str) -> Array:
  """einsum over a leading layer axis; a plain 2-D product when L = 1."""
  if a.shape[0] == 1:
    return jnp.einsum(spec.replace("l", ""), a[0], b[0])[None]
  return jnp.einsum(spec, a, b)


def _stack_pays(size: int, gram: bool, tangent: bool) -> bool:
  """Whether stacking `size` equal weight operations launches fewer kernels.

  Per operation, the Gram form launches V V^T, (V V^T) Ybar and, where the
  operand carries a tangent dV, the second-order term; stacked, each of
  these launches once for the group, after one copy per stacked operand
  (V, Ybar, dV). The dense form is not stacked by default: XLA:CPU fuses
  its per-operation products, so that stacking saves few kernels and costs
  the copies of V, phi, dV and Ybar.
  """
  if not gram:
    return False
  t = int(tangent)
  return size * (2 + t) > 4 + 2 * t


def _groups(ps: Pass, dtypes: Sequence[Any], stack: bool,
            gram_ids: frozenset) -> list[list[Node]]:
  """The weight operations in the groups that `_WeightPlan` evaluates
  together (one operation alone where stacking does not pay); `dtypes`:
  the direction's, per flat param."""
  groups: dict[tuple, list] = {}
  for node in _weight_nodes(ps).values():
    key = (node.in_avals[0].shape, node.in_avals[1].shape,
           node.in_avals[0].dtype, node.in_avals[1].dtype,
           node.out_avals[0].dtype, dtypes[node.param], node.cin[0],
           node.id in gram_ids)
    groups.setdefault(key, []).append(node)
  out = []
  for key, nodes in groups.items():
    if len(nodes) > 1 and (stack or _stack_pays(len(nodes), key[-1],
                                                key[-2])):
      out.append(nodes)
    else:
      out.extend([n] for n in nodes)
  return out


def _operands(ps: Pass, nodes: Sequence[Node]) -> tuple[Array, Array]:
  """[L, N, d_in] operands V and [L, N, d_out] adjoints Ybar of a group's
  operations (stacked: one copy each; L = 1: no copy)."""
  stacked = (lambda xs: xs[0][None]) if len(nodes) == 1 else _stack
  pairs = [ps.weight_values(n, ()) for n in nodes]
  return (stacked([x.reshape(-1, n.in_avals[0].shape[-1])
                   for (x, _), n in zip(pairs, nodes)]),
          stacked([a.reshape(-1, n.out_avals[0].shape[-1])
                   for (_, a), n in zip(pairs, nodes)]))


def stacked_gradients(ps: Pass, gram_ids: frozenset) -> list[Array]:
  """ps.flat_grads, those of each stack_layers group in the Gram form as
  one batched product.

  The weight of a Gram-form operation is read by it alone, so its gradient
  is V^T Ybar (eq. 27 summed over the batch). The sweep along grad F
  stacks the group's V and Ybar anyway: one batched matmul of the stacks
  gives the group's gradients, in place of one matmul per layer in the
  backward pass (which XLA then drops). The values are jax.grad's up to
  float rounding (the order of the sums may change).
  """
  flat = list(ps.flat_grads)
  for nodes in _groups(ps, [g.dtype for g in flat], True, gram_ids):
    if len(nodes) < 2 or nodes[0].id not in gram_ids:
      continue
    v, y = _operands(ps, nodes)
    if not all(flat[n.param].dtype == v.dtype == y.dtype for n in nodes):
      continue                       # low precision: jax.grad's own dot
    grads = jnp.einsum("lni,lnj->lij", v, y)
    for k, n in enumerate(nodes):
      flat[n.param] = grads[k]
  return flat


class _WeightPlan:
  """The weight operations of one sweep, each in the dense or the Gram form.

  Operations of equal shapes (the paper's eleven 128 x 128 hidden layers)
  are evaluated together where that launches fewer kernels
  (`_stack_pays`; with `stack`, every such group): V phi before the sweep
  and dV phi after it are one batched matmul over a stacked layer axis L
  each, at the price of copying the stacked operands. Only the chain dV W
  stays per layer. The numbers are the same up to float rounding (the
  order of some sums changes).
  """

  def __init__(self, ps: Pass, flat_d: list, scale: Array | None,
               log2: Array | None = None, stack: bool = False,
               gram_ids: frozenset = frozenset()):
    # `log2`: flat_d is the raw direction and the sweep runs along
    # flat_d 2^-log2 (exact): the dense products V phi and dV phi of a
    # single operation are taken with the raw phi and scaled afterwards, so
    # phi itself is not copied; a stacked phi is scaled as it is copied.
    self.ps, self.flat_d, self.scale = ps, flat_d, scale
    self.log2, self.unit = log2, unit(log2)
    self.groups = _groups(ps, [jnp.result_type(d) for d in flat_d], stack,
                          gram_ids)
    self.slot = {n.id: (g, k) for g, nodes in enumerate(self.groups)
                 for k, n in enumerate(nodes)}
    self.sources, self.parts, self.dv = [], [], {}
    for nodes in self.groups:
      v, y = _operands(ps, nodes)
      gram = nodes[0].id in gram_ids
      if gram:                                                # c (V V^T) Ybar
        phi = None
        src = scale * _bmm(_bmm(v, v, "lni,lmi->lnm"), y, "lnm,lmj->lnj")
      elif len(nodes) == 1:                 # V phi, phi raw, scaled after
        phi = self.flat_d[nodes[0].param][None]
        src = self.unit(_bmm(v, phi, "lni,lij->lnj"))
      else:                         # V phi, phi scaled as it is stacked
        phi = self.unit(_stack([self.flat_d[n.param] for n in nodes]))
        src = _bmm(v, phi, "lni,lij->lnj")
      self.sources.append(src)
      self.parts.append((gram, v, y, phi))

  def tangents(self, node: Node, vals: list, tans: list) -> list | None:
    """The output tangents of one of the plan's operations, else None."""
    if node.id not in self.slot:
      return None
    g, k = self.slot[node.id]
    out = self.sources[g][k]                                  # [N, d_out]
    if node.cin[0]:
      dv = tans[0].reshape(-1, vals[0].shape[-1])             # [N, d_in]
      self.dv[node.id] = dv
      out = out + dv @ vals[1]                                # + dV W
    return [out.reshape(node.out_avals[0].shape)]

  def second_order(self) -> tuple[list, Array | None]:
    """sum over weight operations of Ybar . (2 dV phi): (terms for
    `total`, and the rest, already summed, or None)."""
    terms, raw = [], []
    for nodes, (gram, v, y, phi) in zip(self.groups, self.parts):
      if nodes[0].id not in self.dv:
        continue                                              # dV = 0
      dv = (self.dv[nodes[0].id][None] if len(nodes) == 1 else
            _stack([self.dv[n.id] for n in nodes]))           # [L, N, d_in]
      if gram:                  # c dV . ((Ybar Ybar^T) V), [L, N, d_in]
        terms.append((2 * self.scale, dv,
                      _bmm(_bmm(y, y, "lnj,lmj->lnm"), v, "lnm,lmi->lni")))
      else:
        (raw if len(nodes) == 1 else terms).append(
            (2.0, _bmm(dv, phi, "lni,lij->lnj"), y))
    # The terms of a raw (unstacked) phi: one scaling of their sum (where
    # there is a scaling; otherwise summed with the others).
    if self.log2 is None or not raw:
      return terms + raw, None
    return terms, self.unit(total(raw, jnp.result_type(*self.flat_d),
                                  self.ps.traced.keep))

  def direct_params(self) -> set:
    """Flat param indices that some operation other than the plan's reads."""
    prog = self.ps.traced.program
    ids = {i: k for k, i in enumerate(prog.invars[:self.ps.traced.num_params])}
    out = set()
    for node in prog.nodes:
      if node.id in self.slot:
        continue
      out.update(ids[x] for x in node.ins if isinstance(x, int) and x in ids)
    return out


def curvature(ps: Pass, flat_d: list, scale: Array | None = None,
              log2: Array | None = None, stack: bool = False,
              gram_ids: frozenset = frozenset()) -> tuple[Array, Array]:
  """(slope, curvature) along the flat direction, from one tangent sweep.

  Args:
    ps: the engine's pass at the point.
    flat_d: the direction's leaves.
    scale: the direction is `scale` * grad F (with `log2`, scale is already
      that of the scaled direction), for the Gram form.
    log2: the sweep runs along flat_d 2^-log2 (see `_WeightPlan`).
    stack: batch every group of equally shaped weight operations.
    gram_ids: the weight operations that take the Gram form
      (`gram_operations`; needs `scale`).

  Returns:
    (g . grad F (eq. 38), g^T H g (eq. 39)) along g = flat_d 2^-log2.
  """
  prog = ps.traced.program
  plan = _WeightPlan(ps, flat_d, scale, log2, stack, gram_ids)
  if log2 is None:
    in_tans = dict(zip(prog.invars, flat_d))
  else:           # only the leaves other operations read are scaled here
    direct = plan.direct_params()
    in_tans = {i: plan.unit(d) for k, (i, d) in enumerate(zip(prog.invars,
                                                              flat_d))
               if k in direct}
  outs, curv = sweep(prog, ps.residuals, ps.ybar, in_tans, plan,
                     dtype=jnp.result_type(*flat_d), keep=ps.traced.keep)
  dtype = engine.accumulation_dtype(*flat_d)
  if any(jnp.finfo(jnp.result_type(d)).bits < 32 for d in flat_d):
    # Low-precision params: g . grad F summed in float32 (eq. 38), not the
    # tangent of the loss's own low-precision reduction.
    slope = unit(log2)(sum(engine.pair(d, g)
                           for d, g in zip(flat_d, ps.flat_grads)))
  else:
    slope = outs[0] if outs[0] is not None else jnp.zeros_like(ps.loss)
  return slope.astype(dtype), curv


def inner(a: Sequence[Array], b: Sequence[Array],
          rescale: Callable[[Array], Array] = lambda x: x) -> Array:
  """sum_k <rescale(a_k), b_k> over many leaves, one reduction per leaf.

  Where a leaf is not computed anyway (a direction -lr grad F that nothing
  else reads), XLA fuses its producer and `rescale` (an exact rescaling,
  `unit`) into that leaf's reduction; concatenated, it would compute each
  leaf again in a kernel of its own to copy it.
  """
  dtype = jnp.result_type(jnp.float32, *a, *b)      # float32 at least
  out = sum(jnp.sum(rescale(x.astype(dtype)) * y.astype(dtype))
            for x, y in zip(a, b))
  return jnp.real(out) if jnp.iscomplexobj(out) else out     # no conjugate
