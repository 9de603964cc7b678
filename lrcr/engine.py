"""The engine: exact curvature along a direction for any JAX program.

lrcr reads the loss's own program (its jaxpr) and evaluates the second-order
adjoint identity on it. For a direction g and every operation y = op(x_1..x_m)
of the program,

    g^T H g = sum over operations of  ybar . op''[xdot, xdot]           (*)

with xdot the first-order tangents along g (what `jax.jvp` propagates),
ybar = dF/dy the adjoint that the gradient pass computes anyway, and
op''[xdot, xdot] the second-order term of that one operation along its input
tangents. Only operations that are not linear in their tangent-carrying
inputs contribute:

* a dense layer z = v W with both v and W carrying tangents gives
  2 dv phi: the paper's eq. 36, and for convolutions appendix B.2;
* an elementwise nonlinearity gives A''(z) dz^2: appendix B.3;
* the loss head (softmax cross-entropy is exp, log, div, ...) gives
  dp^T (d2f/dp2) dp, the Gauss-Newton term of eq. 39, including the
  cross-layer blocks that eq. 39 as printed leaves out;
* linear and piecewise-linear operations (add, reshape, max, relu, pooling,
  a matmul with a constant operand, ...) give nothing.

Griewank and Walther, *Evaluating Derivatives*, ch. 5, call this the
second-order adjoint. The engine never guesses which class an operation is
in: it traces each operation's own JAX forward-mode rule twice (the tangent,
and the derivative of the tangent along the tangent) and keeps the second
term only where JAX cannot prove it is zero. An operation with no JAX
differentiation rule is refused by name.

How the numbers are obtained
----------------------------
1. The program is traced once (`jax.make_jaxpr`) and flattened: nested `jit`
   calls, `custom_vjp` functions (through their primal definition: JAX has no
   forward-mode rule for them) and `remat` are inlined. `custom_jvp`
   functions (relu, gelu, softplus, logsumexp pieces) stay whole and are
   differentiated by their own rules. `scan` bodies (`nn.RNN`, `nn.scan`) are
   read recursively, so the identity holds at every time step.
2. The forward pass adds a zero offset e_i to the output of every operation
   whose second-order term is not zero. One `jax.vjp` with respect to the
   parameters and the offsets gives the loss, the gradient, and every
   ybar_i = dF/de_i, in the one forward/backward pass that the gradient costs.
3. For each direction, one tangent sweep over the stored forward values
   gives the xdot's, and (*) sums ybar_i . op_i''[xdot, xdot]. No Hessian,
   per-sample gradient, or second forward pass is formed.

The per-sample low-rank structure of the paper (section 2) appears where an
operation is a matmul of a per-sample activation and a weight: see
`lrcr.curvature` for the Gram form and the per-sample factors built on it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr

Array = jax.Array

#: Call-like primitives whose body is inlined into the program.
_INLINE_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat",
                 "checkpoint", "custom_vjp_call", "custom_vjp_call_jaxpr")
#: Primitives whose output never carries a tangent.
_NO_TANGENT = ("stop_gradient",)

UNSUPPORTED_HINT = (
    "Use lrcr.autodiff_curvature_fn(loss_fn, *batch) for this model "
    "(forward-over-forward autodiff: the same exact numbers, no low-rank "
    "speed-up).")


class UnsupportedProgramError(NotImplementedError):
  """The loss program holds an operation the engine cannot differentiate."""


@dataclasses.dataclass(frozen=True)
class _Lit:
  """A constant of the program (a literal or a closed-over array)."""
  val: Any


Atom = Any  # int (a value id) or _Lit


@dataclasses.dataclass
class _Node:
  """One operation of the flattened program.

  kind: "const" (no tangent-carrying input), "linear" (zero second-order
  term), "second" (a second-order term to contract with its adjoint) or
  "scan" (a loop whose body is a `_Program` of its own).
  """
  id: int
  prim: Any
  params: dict
  ins: list
  outs: list
  in_avals: list
  out_avals: list
  body: Any = None                      # _Program, for scan
  kind: str = "const"
  cin: tuple = ()                       # which ins carry a tangent
  cout: tuple = ()                      # which outs carry a tangent
  second: tuple = ()                    # which outs have op'' != 0
  offsets: tuple = ()                   # which outs get an offset
  weight: int = -1                      # param operand index, weight ops
  param: int = -1                       # its flat param index

  @property
  def name(self) -> str:
    return self.prim.name

  def apply(self, vals: Sequence[Any]) -> list[Any]:
    out = self.prim.bind(*vals, **self.params)
    return list(out) if self.prim.multiple_results else [out]


@dataclasses.dataclass
class _Program:
  """A flattened jaxpr: value ids, nodes in order, outputs."""
  invars: list
  nodes: list
  outvars: list
  avals: dict                           # id -> aval
  needed: set = dataclasses.field(default_factory=set)


def _is_float(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return (dtype is not None and not jax.dtypes.issubdtype(
      dtype, jax.dtypes.extended) and jnp.issubdtype(dtype, jnp.inexact))


def _sds(aval):
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


# ---------------------------------------------------------------------------
# Reading the program.
# ---------------------------------------------------------------------------

class _Builder:
  """Flattens a jaxpr into a `_Program`, inlining calls."""

  def __init__(self):
    self._ids = itertools.count()

  def new_id(self) -> int:
    return next(self._ids)

  def program(self, closed: jcore.ClosedJaxpr) -> _Program:
    jaxpr = closed.jaxpr
    prog = _Program(invars=[], nodes=[], outvars=[], avals={})
    env = {}
    for v in jaxpr.invars:
      i = self.new_id()
      prog.invars.append(i)
      prog.avals[i] = v.aval
      env[v] = i
    for v, c in zip(jaxpr.constvars, closed.consts):
      env[v] = _Lit(c)
    prog.outvars = self._inline(prog, jaxpr, env)
    return prog

  def _read(self, env, v) -> Atom:
    if isinstance(v, jcore.Literal):
      return _Lit(v.val)
    return env[v]

  def _inline(self, prog: _Program, jaxpr: jcore.Jaxpr, env: dict) -> list:
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      ins = [self._read(env, v) for v in eqn.invars]
      if name in _INLINE_CALLS:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr",
                                                     eqn.params.get("fun_jaxpr")))
        if sub is None:
          raise UnsupportedProgramError(
              f"lrcr's engine cannot read the body of `{name}`. "
              + UNSUPPORTED_HINT)
        if isinstance(sub, jcore.ClosedJaxpr):
          sub_jaxpr, consts = sub.jaxpr, sub.consts
        else:
          sub_jaxpr, consts = sub, ()
        sub_env = {v: _Lit(c) for v, c in zip(sub_jaxpr.constvars, consts)}
        sub_env.update(zip(sub_jaxpr.invars, ins))
        outs = self._inline(prog, sub_jaxpr, sub_env)
        env.update(zip(eqn.outvars, outs))
        continue
      outs = []
      for v in eqn.outvars:
        i = self.new_id()
        prog.avals[i] = v.aval
        outs.append(i)
      node = _Node(
          id=outs[0] if outs else self.new_id(), prim=eqn.primitive,
          params=eqn.primitive.get_bind_params(eqn.params), ins=ins,
          outs=outs, in_avals=[v.aval for v in eqn.invars],
          out_avals=[v.aval for v in eqn.outvars])
      if name == "scan":
        node.body = self.program(eqn.params["jaxpr"])
      prog.nodes.append(node)
      env.update(zip(eqn.outvars, outs))
    return [self._read(env, v) for v in jaxpr.outvars]


def _split(node: _Node, vals: Sequence[Any], tans: Sequence[Any]):
  """f(carried inputs) -> outputs, closing over the other inputs."""
  vals = list(vals)
  where = [k for k, c in enumerate(node.cin) if c]

  def f(*carried):
    full = list(vals)
    for k, v in zip(where, carried):
      full[k] = v
    return node.apply(full)

  return f, tuple(vals[k] for k in where), tuple(tans)


def _jvp1(node: _Node, vals, tans) -> list:
  """The output tangents of one operation."""
  f, primals, tans = _split(node, vals, tans)
  return jax.jvp(f, primals, tans)[1]


def _jvp2(node: _Node, vals, tans) -> tuple[list, list]:
  """(output tangents, second-order terms op''[xdot, xdot]) of one operation."""
  f, primals, tans = _split(node, vals, tans)

  def tangent(*p):
    return jax.jvp(f, p, tans)[1]

  return jax.jvp(tangent, primals, tans)


def _constant_zero(jaxpr: jcore.Jaxpr, consts, index: int) -> bool:
  """Whether output `index` of a traced jaxpr is identically zero."""
  out = jaxpr.outvars[index]
  if getattr(out.aval, "dtype", None) == jax.dtypes.float0:
    return True                         # the tangent of a non-float value
  if isinstance(out, jcore.Literal):
    return bool(np.all(np.asarray(out.val) == 0))
  used = [k == index for k in range(len(jaxpr.outvars))]
  dced, used_inputs = pe.dce_jaxpr(jaxpr, used)
  if any(used_inputs):
    return False                        # depends on its inputs
  try:
    with jax.ensure_compile_time_eval():     # concrete even under an outer jit
      (val,) = jax.core.eval_jaxpr(dced, list(consts))
    return bool(np.all(np.asarray(val) == 0))
  except Exception:  # pylint: disable=broad-except
    return False                        # not concrete: keep the term


_CLASSES: dict = {}          # signature -> (cout, second); see `_classify`
#: Constants larger than this (a batch closed over by the loss) make a node
#: uncached: its key would hold a copy of their bytes.
_MAX_KEY_CONSTANT = 64


def _signature(node: _Node):
  """A hashable key of what decides a node's class, or None."""
  try:
    consts = [(k, np.asarray(x.val)) for k, x in enumerate(node.ins)
              if isinstance(x, _Lit)]
    if any(v.size > _MAX_KEY_CONSTANT for _, v in consts):
      return None
    lits = tuple((k, v.tobytes(), str(v.dtype)) for k, v in consts)
    key = (node.prim, tuple(sorted(node.params.items())),
           tuple((tuple(a.shape), str(a.dtype)) for a in node.in_avals),
           node.cin, lits)
    hash(key)
    return key
  except Exception:  # pylint: disable=broad-except
    return None      # unhashable params (e.g. a closure over a tracer)


def _classify(node: _Node) -> None:
  """Sets node.kind / cout / offsets from JAX's own rules for the operation."""
  if node.name in _NO_TANGENT:
    node.kind, node.cout = "const", (False,) * len(node.outs)
    node.second = node.offsets = (False,) * len(node.outs)
    return
  key = _signature(node)
  if key is not None and key in _CLASSES:
    node.cout, node.second = _CLASSES[key]
    node.offsets = node.second
    node.kind = "second" if any(node.second) else "linear"
    return
  lit = [isinstance(x, _Lit) for x in node.ins]
  tan_avals = [jax.ShapeDtypeStruct(a.shape, jax.dtypes.float0
                                    if not _is_float(a) else a.dtype)
               for a, c in zip(node.in_avals, node.cin) if c]

  def both(vals, tans):
    full = [x.val if l else v for x, l, v in zip(node.ins, lit, vals)]
    return _jvp2(node, full, tans)

  # Constants are closed over in `both`; their argument slots are dummies.
  args = [jax.ShapeDtypeStruct((), jnp.float32) if l else _sds(a)
          for a, l in zip(node.in_avals, lit)]
  try:
    closed = jax.make_jaxpr(both)(args, tan_avals)
  except Exception as e:  # pylint: disable=broad-except  # JAX's rule refused
    if isinstance(e, UnsupportedProgramError):
      raise
    raise UnsupportedProgramError(
        f"lrcr's engine cannot differentiate the primitive `{node.name}` "
        f"twice along a direction ({type(e).__name__}: {e}). "
        + UNSUPPORTED_HINT) from e
  n = len(node.outs)
  floats = [_is_float(a) for a in node.out_avals]
  tangent_zero = [_constant_zero(closed.jaxpr, closed.consts, k)
                  for k in range(n)]
  second_zero = [_constant_zero(closed.jaxpr, closed.consts, n + k)
                 for k in range(n)]
  node.cout = tuple(f and not z for f, z in zip(floats, tangent_zero))
  node.second = tuple(f and not z for f, z in zip(floats, second_zero))
  node.offsets = node.second
  node.kind = "second" if any(node.second) else "linear"
  if key is not None:
    if len(_CLASSES) > 4096:
      _CLASSES.clear()
    _CLASSES[key] = (node.cout, node.second)


def _analyze(prog: _Program, carried_in: Sequence[bool]) -> list[bool]:
  """Marks which values carry tangents and classifies every node.

  Returns which outputs of `prog` carry a tangent.
  """
  carried = {i for i, c in zip(prog.invars, carried_in) if c}
  prog.needed = set()
  for node in prog.nodes:
    node.cin = tuple(isinstance(x, int) and x in carried for x in node.ins)
    if not any(node.cin):
      node.kind, node.cout = "const", (False,) * len(node.outs)
      node.second = node.offsets = (False,) * len(node.outs)
      continue
    if node.name == "scan":
      _analyze_scan(node)
    else:
      _classify(node)
    if node.kind != "const":
      prog.needed.update(x for x in node.ins if isinstance(x, int))
    carried.update(o for o, c in zip(node.outs, node.cout) if c)
  return [isinstance(x, int) and x in carried for x in prog.outvars]


def _analyze_scan(node: _Node) -> None:
  p = node.params
  nc, nk = p["num_consts"], p["num_carry"]
  cin = list(node.cin)
  for k in range(nc + nk, len(cin)):
    cin[k] = cin[k] and _is_float(node.in_avals[k])
  carry = cin[nc:nc + nk]
  while True:
    out = _analyze(node.body, cin[:nc] + carry + cin[nc + nk:])
    new = [a or b for a, b in zip(carry, out[:nk])]
    if new == carry:
      break
    carry = new
  node.cin = tuple(cin[:nc] + carry + cin[nc + nk:])
  node.cout = tuple(carry + out[nk:])
  node.kind = "scan"


# ---------------------------------------------------------------------------
# Evaluating it: the forward pass with offsets, and the tangent sweep.
# ---------------------------------------------------------------------------

def zero_offsets(prog: _Program, prefix: tuple = ()) -> dict:
  """Zero offsets for every second-order node (stacked over scan lengths)."""
  eps = {}
  for node in prog.nodes:
    if any(node.offsets):
      eps[node.id] = tuple(
          jnp.zeros(prefix + tuple(a.shape), a.dtype) if o else None
          for a, o in zip(node.out_avals, node.offsets))
    elif node.kind == "scan":
      eps[node.id] = zero_offsets(node.body, prefix + (node.params["length"],))
  return eps


def _read(env: dict, x: Atom) -> Any:
  return x.val if isinstance(x, _Lit) else env[x]


def value_of(values: dict, atom: Atom) -> Any:
  """The value of an operation's input: a constant, or one of `values`."""
  return _read(values, atom)


def forward(prog: _Program, args: Sequence[Any], eps: dict,
            skip: frozenset = frozenset(), extra: Sequence[int] = (),
            ) -> tuple[list, dict]:
  """Evaluates the program with offsets; returns (outputs, residuals).

  The residuals are the forward values the tangent sweep reads (those in
  `prog.needed`, except the ids in `skip`), and for each scan node its body's
  residuals stacked over the iterations.
  """
  env = dict(zip(prog.invars, args))
  res = {}
  for node in prog.nodes:
    vals = [_read(env, x) for x in node.ins]
    if node.kind == "scan":
      outs, res[-1 - node.id] = _scan_forward(node, vals, eps[node.id])
    else:
      outs = node.apply(vals)
      if any(node.offsets):
        outs = [o + e if e is not None else o
                for o, e in zip(outs, eps[node.id])]
    env.update(zip(node.outs, outs))
  for i in prog.needed:
    if i not in skip:
      res[i] = env[i]
  outs = [_read(env, x) for x in prog.outvars] + [env[i] for i in extra]
  return outs, res


def _scan_forward(node: _Node, vals: list, eps: dict):
  p = node.params
  nc, nk = p["num_consts"], p["num_carry"]
  consts, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]
  body = node.body
  skip = frozenset(body.invars[:nc])

  def step(carry, x):
    x_t, eps_t = x
    outs, res_t = forward(body, list(consts) + list(carry) + list(x_t), eps_t,
                          skip)
    return outs[:nk], (outs[nk:], res_t)

  carry, (ys, res) = lax.scan(step, list(init), (list(xs), eps),
                              length=p["length"], reverse=p["reverse"],
                              unroll=p["unroll"])
  return list(carry) + list(ys), res


def total(terms: Sequence[tuple], dtype: Any = jnp.float32) -> Array:
  """sum_k c_k <a_k, b_k> over (c, a, b) terms; a `dtype` zero if none.

  Terms of one shape and one c are summed elementwise and reduced once:
  XLA:CPU launches a kernel (two for a large one) per reduction, and more
  where a reduction follows a reshape (`jnp.vdot` flattens).
  """
  terms = list(terms)
  if not terms:
    return jnp.zeros((), dtype)
  dtype = jnp.result_type(*[a.dtype for _, a, _ in terms])
  groups: dict[tuple, list] = {}
  for c, a, b in terms:
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if a.shape != b.shape:
      a, b = a.ravel(), b.ravel()
    key = (a.shape, c if isinstance(c, (int, float)) else id(c))
    groups.setdefault(key, [c]).append(a * b)
  return sum(c * jnp.sum(sum(prods)) for c, *prods in groups.values())


def sweep(prog: _Program, res: dict, ybar: dict, in_tans: dict,
          rewrite: Callable[..., Any] | None = None,
          dtype: Any = None) -> tuple[list, Array]:
  """The tangent sweep: (output tangents, sum of ybar . op''[xdot, xdot]).

  `dtype`: that of the sum where no operation contributes to it (default:
  the input tangents'), so that a float64 program's curvature stays float64.

  `rewrite(node, vals, tans)`, if given, may return the output tangents of
  a node of `prog` (not of a scan's body), replacing the generic evaluation
  by an equivalent cheaper one (the Gram form), or None to keep it; the
  second-order terms of a rewritten node are then the caller's to add.
  """
  tan = dict(in_tans)
  acc, terms = [], []
  for node in prog.nodes:
    if node.kind == "const":
      continue
    vals = [_read(res, x) for x in node.ins]
    tans = [tan.get(x) for x, c in zip(node.ins, node.cin) if c]
    if node.kind != "scan":   # a carried input without a tangent: zero
      tans = [t if t is not None else jnp.zeros_like(_read(res, x))
              for t, x in zip(tans, [x for x, c in zip(node.ins, node.cin)
                                     if c])]
    outs = None
    if rewrite is not None and node.kind != "scan":
      outs = rewrite(node, vals, tans)
    if outs is not None:
      pass                                    # evaluated by `rewrite`
    elif node.kind == "linear":
      outs = _jvp1(node, vals, tans)
    elif node.kind == "second":
      outs, second = _jvp2(node, vals, tans)
      for o, s, yb in zip(node.second, second, ybar[node.id]):
        if o:
          terms.append((1.0, yb, s))
    else:
      outs, a = _scan_sweep(node, vals, tans, res[-1 - node.id],
                            ybar[node.id])
      acc.append(a)
    for o, c, t in zip(node.outs, node.cout, outs):
      if c:
        tan[o] = t
  if dtype is None:
    dtype = (jnp.result_type(*in_tans.values()) if in_tans else jnp.float32)
  out = total(terms, dtype)
  for a in acc:
    out = out + a
  return [tan.get(x) if isinstance(x, int) else None for x in prog.outvars], out


def _scan_sweep(node: _Node, vals: list, tans: list, res: dict, ybar: dict):
  p = node.params
  nc, nk = p["num_consts"], p["num_carry"]
  body = node.body
  it = iter(tans)
  full_tans = [next(it) if c else None for c in node.cin]
  const_env = dict(zip(body.invars[:nc], vals[:nc]))
  const_tans = {i: t for i, t in zip(body.invars[:nc], full_tans[:nc])
                if t is not None}
  init = []
  for k in range(nc, nc + nk):
    if node.cin[k]:
      t = full_tans[k]
      init.append(t if t is not None else jnp.zeros_like(vals[k]))
  xs_tans = [t for t, c in zip(full_tans[nc + nk:], node.cin[nc + nk:]) if c]
  carry_ids = [i for i, c in zip(body.invars[nc:nc + nk], node.cin[nc:nc + nk])
               if c]
  xs_ids = [i for i, c in zip(body.invars[nc + nk:], node.cin[nc + nk:]) if c]
  dtype = jnp.result_type(*[jnp.asarray(t).dtype for t in tans if t is not None])

  def step(carry, x):
    ctan, acc = carry
    res_t, ybar_t, xt = x
    env = dict(const_env)
    env.update(res_t)
    in_tans = dict(const_tans)
    in_tans.update(zip(carry_ids, ctan))
    in_tans.update(zip(xs_ids, xt))
    out_tans, a = sweep(body, env, ybar_t, in_tans)
    new = []
    for k, (c, t) in enumerate(zip(node.cin[nc:nc + nk], out_tans[:nk])):
      if c:
        new.append(t if t is not None else jnp.zeros_like(ctan[len(new)]))
    ys = [t for t, c in zip(out_tans[nk:], node.cout[nk:]) if c]
    return (new, acc + a.astype(acc.dtype)), ys

  (ctan, acc), ys = lax.scan(step, (init, jnp.zeros((), dtype)),
                             (res, ybar, xs_tans), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
  out = list(ctan) + list(ys)
  it = iter(out)
  return [next(it) if c else None for c in node.cout], acc


# ---------------------------------------------------------------------------
# The traced loss.
# ---------------------------------------------------------------------------

_WEIGHT_OPS = ("dot_general", "conv_general_dilated")


def _mark_weights(prog: _Program, param_ids: dict, uses: dict) -> None:
  """Marks the weight operations: a matmul or convolution of a parameter.

  A weight operation gets an offset on its output, so that its adjoint
  (the output factor of the per-sample gradient, section 2) is available.
  `uses` counts, per flat parameter index, the operations that read it.
  """
  for node in prog.nodes:
    # A scan's consts are counted where its body reads them; its carries
    # and scanned inputs are read by the scan itself.
    reads = (node.ins[node.params["num_consts"]:] if node.name == "scan"
             else node.ins)
    for x in reads:
      if isinstance(x, int) and x in param_ids:
        uses[param_ids[x]] = uses.get(param_ids[x], 0) + 1
    if node.name == "scan":
      nc = node.params["num_consts"]
      inner = {b: param_ids[x] for b, x in zip(node.body.invars[:nc],
                                               node.ins[:nc])
               if isinstance(x, int) and x in param_ids}
      _mark_weights(node.body, inner, uses)
      continue
    if node.name not in _WEIGHT_OPS or node.kind == "const":
      continue
    is_param = [isinstance(x, int) and x in param_ids for x in node.ins[:2]]
    if is_param.count(True) != 1 or not _is_float(node.out_avals[0]):
      continue
    node.weight = is_param.index(True)
    node.param = param_ids[node.ins[node.weight]]
    node.offsets = (True,)


@dataclasses.dataclass
class Traced:
  """A loss function's program, analysed for directions on its params."""
  program: _Program
  params_treedef: Any
  num_params: int
  batch: list                            # the flat batch leaves
  uses: dict                             # flat param index -> operations

  def weight_nodes(self) -> list[tuple[_Node, tuple]]:
    """Every weight operation, with the scan nodes that enclose it."""
    out = []

    def walk(prog, outer):
      for node in prog.nodes:
        if node.weight >= 0:
          out.append((node, outer))
        if node.kind == "scan":
          walk(node.body, outer + (node,))

    walk(self.program, ())
    return out

  def forward(self, flat_params: Sequence[Array], eps: dict):
    outs, res = forward(self.program, list(flat_params) + list(self.batch),
                        eps)
    return outs[0], res

  def forward_with(self, flat_params: Sequence[Array], eps: dict, head: int):
    """(loss, the value `head`) and the residuals."""
    outs, res = forward(self.program, list(flat_params) + list(self.batch),
                        eps, extra=(head,))
    return tuple(outs), res

  def head_fn(self, res: dict, head: int) -> Callable[[Array], Array]:
    """The loss as a function of the value `head`, other values fixed."""
    prog = self.program
    start = next(k for k, n in enumerate(prog.nodes) if head in n.outs) + 1

    def fn(value):
      env = dict(res)
      env[head] = value
      for node in prog.nodes[start:]:
        if node.kind == "const":
          continue
        outs = node.apply([_read(env, x) for x in node.ins])
        env.update(zip(node.outs, outs))
      return _read(env, prog.outvars[0])

    return fn

  def find_head(self) -> int:
    """The logits: the last value that every parameter reaches the loss through.

    Every operation with a nonzero second-order term, other than the weight
    operations, must come after it, so that the loss is piecewise linear in
    each single weight up to it (then the Hessian diagonal is the
    Gauss-Newton diagonal through it; `lrcr.curvature.hessian_diagonal`).

    Raises:
      UnsupportedProgramError: naming the operation that breaks this.
    """
    prog = self.program
    nodes = prog.nodes
    bad = next((k for k, n in enumerate(nodes)
                if (n.kind == "second" and n.weight < 0) or n.kind == "scan"),
               None)
    if bad is None:
      raise UnsupportedProgramError(
          "the loss has no nonlinear head (e.g. softmax cross-entropy) after "
          "its last weight; the Hessian diagonal needs one.")
    params = set(prog.invars[:self.num_params])
    out = prog.outvars[0]
    for k in range(bad - 1, -1, -1):
      for cand, c in zip(nodes[k].outs, nodes[k].cout):
        if c and not _reaches(prog, params, out, block=cand):
          return cand
    where = nodes[bad]
    raise UnsupportedProgramError(
        f"the exact Hessian diagonal covers models that are piecewise linear "
        f"(ReLU, max-pooling, ...) from their weights up to the logits; this "
        f"one has `{where.name}` before any value that all parameters pass "
        f"through. Use granularity 'layer' or 'global'.")


def _reaches(prog: _Program, sources: set, target: Any, block: int) -> bool:
  """Whether `target` depends on `sources` when the value `block` is cut."""
  live = set(sources) - {block}
  for node in prog.nodes:
    if any(isinstance(x, int) and x in live for x in node.ins):
      live.update(o for o, c in zip(node.outs, node.cout) if c and o != block)
  return isinstance(target, int) and target in live


def trace(loss_fn: Callable[..., Array], params: Any,
          batch: Sequence[Any]) -> Traced:
  """Reads `loss_fn(params, *batch)`'s program and classifies its operations.

  Raises:
    UnsupportedProgramError: for an operation with no differentiation rule.
    ValueError: if the loss is not a real scalar.
  """
  flat_p, treedef = jax.tree.flatten(params)
  flat_b, btree = jax.tree.flatten(list(batch))

  def flat_loss(*leaves):
    p = jax.tree.unflatten(treedef, leaves[:len(flat_p)])
    b = jax.tree.unflatten(btree, leaves[len(flat_p):])
    return loss_fn(p, *b)

  closed = jax.make_jaxpr(flat_loss)(*flat_p, *flat_b)
  out = closed.out_avals
  if len(out) != 1 or out[0].shape != () or not _is_float(out[0]):
    raise ValueError(
        f"loss_fn(params, *batch) must return a real scalar; it returns "
        f"{', '.join(str(a) for a in out)}. Reduce the per-sample losses "
        f"(e.g. .mean()) inside loss_fn.")
  prog = _Builder().program(closed)
  carried = [_is_float(prog.avals[i]) for i in prog.invars[:len(flat_p)]]
  carried += [False] * len(flat_b)
  _analyze(prog, carried)
  uses = {}
  _mark_weights(prog, {i: k for k, i in enumerate(prog.invars[:len(flat_p)])},
                uses)
  return Traced(prog, treedef, len(flat_p), flat_b, uses)
