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
   calls and `remat` (`jax.checkpoint`) are inlined, and so are `custom_vjp`
   functions, for reading only (see below). `custom_jvp`
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

Programs beyond plain arrays
----------------------------
* `custom_vjp`. A function with a custom VJP defines the gradient that the
  optimizer follows: lrcr returns it, the user's bwd rule applied exactly as
  `jax.value_and_grad` applies it. The curvature is the derivative of that
  gradient along g, g^T d/dt grad F(params + t g), with grad F the custom
  gradient; where the rule is the true derivative (a stable softplus or
  logsumexp) this is g^T H g. The engine reads only the primal of such a
  function, so a loss that holds one takes autodiff of its custom gradient
  instead of the sweep: reverse-over-reverse, or forward-over-reverse where
  the rule has no reverse mode (`lrcr.reverse_curvature_fn` is the same,
  standalone). Where neither runs, `UnsupportedProgramError` names the
  function. The Hessian diagonal and the per-sample factors are read from
  the primal program and refuse such a loss by name.
* Complex values. A real loss may hold complex intermediates or weights:
  adjoints pair with tangents as Re sum(ybar * ydot), without the conjugation
  of `jnp.vdot` (JAX's VJPs are transposes), and the curvature is the real
  d^2/dt^2 F(params + t g). A complex loss is refused.
* Collectives. Inside `jax.shard_map` (check_vma=True, the default) the
  offsets vary over the same mesh axes as their values, collectives are
  linear, and each term ybar . op'' is summed over the axes along which its
  value varies and the loss does not: the curvature of a `pmean`-ed loss is
  global, that of a per-shard loss per shard, as `jax.jvp` gives them. Under
  `jax.pmap` or `check_vma=False` JAX does not mark per-device values; a
  loss holding a collective there is refused.
* Sums over samples. The per-sample quantities (the Hessian diagonal, the
  factors) need a loss that is a sum of per-sample terms; `lrcr.samples`
  checks it from the program.

This module reads the program (`trace`), classifies its operations (`Kind`)
and runs its forward pass (`forward`). A higher-order primitive (a loop with
a body) is one `NestedRule` in `NESTED_RULES`, which every generic pass asks,
as JAX keeps its JVP rules in `primitive_jvps`. `lrcr.sweep` owns step 3:
the tangent sweep, the weight operations' forms, and the rule of `scan`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr

Array = jax.Array

#: Call-like primitives: the operation is its body, a jaxpr in its params.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2",
          "checkpoint", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "custom_jvp_call")
#: Calls that the engine keeps whole (differentiated by their own rules);
#: it inlines the others.
_KEPT_CALLS = ("custom_jvp_call",)
#: Primitives whose output never carries a tangent.
_NO_TANGENT = ("stop_gradient",)
#: Collectives that are linear in their input (zero second-order term). They
#: are classified here rather than traced: their rules need the
#: `jax.shard_map` context in which the loss is traced.
_LINEAR_COLLECTIVES = ("psum", "psum_invariant", "pvary", "all_gather",
                       "all_gather_invariant", "all_to_all", "ppermute",
                       "reduce_scatter", "pbroadcast")
#: Every collective: a loss that holds one outside `check_vma` is refused.
_COLLECTIVES = _LINEAR_COLLECTIVES + ("pmax", "pmin", "ragged_all_to_all")

UNSUPPORTED_HINT = (
    "Use lrcr.autodiff_curvature_fn(loss_fn, *batch) for this model "
    "(forward-over-forward autodiff: the same exact numbers, no low-rank "
    "speed-up).")


class UnsupportedProgramError(NotImplementedError):
  """The loss program holds an operation the engine cannot differentiate."""


class Kind(enum.Enum):
  """How the tangent sweep treats an operation."""
  CONST = "const"        # no input carries a tangent: skipped
  LINEAR = "linear"      # zero second-order term: its tangent only
  SECOND = "second"      # a second-order term, contracted with its adjoint
  NESTED = "nested"      # a body program: evaluated by its `NestedRule`


@dataclasses.dataclass(frozen=True)
class Lit:
  """A constant of the program (a literal or a closed-over array)."""
  val: Any


Atom = Any  # int (a value id) or Lit


@dataclasses.dataclass
class Node:
  """One operation of the flattened program."""
  id: int
  prim: Any
  params: dict
  ins: list
  outs: list
  in_avals: list
  out_avals: list
  rule: NestedRule | None = None        # a higher-order primitive's
  body: Program | None = None           # its body, read by `rule`
  kind: Kind = Kind.CONST
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

  def _split(self, vals: Sequence[Any]):
    """f(carried inputs) -> outputs, closing over the other inputs."""
    vals = list(vals)
    where = [k for k, c in enumerate(self.cin) if c]

    def f(*carried):
      full = list(vals)
      for k, v in zip(where, carried):
        full[k] = v
      return self.apply(full)

    return f, tuple(vals[k] for k in where)

  def jvp(self, vals: Sequence[Any], tans: Sequence[Any]) -> list:
    """The output tangents, from the tangents of the carried inputs."""
    f, primals = self._split(vals)
    return jax.jvp(f, primals, tuple(tans))[1]

  def jvp2(self, vals: Sequence[Any], tans: Sequence[Any]) -> tuple:
    """(output tangents, second-order terms op''[xdot, xdot])."""
    f, primals = self._split(vals)
    tans = tuple(tans)

    def tangent(*p):
      return jax.jvp(f, p, tans)[1]

    return jax.jvp(tangent, primals, tans)


@dataclasses.dataclass
class Program:
  """A flattened jaxpr: value ids, nodes in order, outputs."""
  invars: list
  nodes: list
  outvars: list
  avals: dict                           # id -> aval
  needed: set = dataclasses.field(default_factory=set)


class Residuals(NamedTuple):
  """The forward values that the tangent sweep reads.

  Attributes:
    values: value id -> its value.
    bodies: id of a `Kind.NESTED` node -> its body's `Residuals`, stacked
      over the iterations along a leading axis.
  """
  values: dict
  bodies: dict


class NestedRule(abc.ABC):
  """How the engine evaluates a higher-order primitive (one with a body).

  One instance per primitive, registered once in `NESTED_RULES`; every
  generic pass (reading, analysis, offsets, forward, tangent sweep, weight
  marking) asks the rule of a node that has one. A primitive without a rule
  is an ordinary operation, differentiated whole by its own JVP rule. A
  body's offsets, residuals and adjoints are stacked over its iterations
  along a leading axis.
  """

  @abc.abstractmethod
  def body(self, params: dict) -> jcore.ClosedJaxpr:
    """The body program, from the operation's params."""

  @abc.abstractmethod
  def analyze(self, node: Node) -> None:
    """Sets node.cin and node.cout, analysing node.body (`analyze`)."""

  @abc.abstractmethod
  def invariants(self, node: Node) -> list[tuple[int, int]]:
    """(input index, body value id) of inputs the body reads unchanged.

    Their uses are counted where the body reads them (`_mark_weights`).
    """

  @abc.abstractmethod
  def zero_offsets(self, node: Node, prefix: tuple) -> dict:
    """The body's zero offsets (`zero_offsets`), stacked over iterations."""

  @abc.abstractmethod
  def forward(self, node: Node, vals: list, eps: dict,
              ) -> tuple[list, Residuals]:
    """(outputs, the body's stacked `Residuals`), with offsets `eps`."""

  @abc.abstractmethod
  def sweep(self, node: Node, vals: list, tans: list, res: Residuals,
            ybar: dict, keep: frozenset | None) -> tuple[list, Array]:
    """(output tangents, sum of ybar . op''[xdot, xdot] over the body).

    `tans`: those of the carried inputs (None where it is zero).
    """


#: Higher-order primitive name -> its rule, registered once.
NESTED_RULES: dict[str, NestedRule] = {}


def walk(prog: Program, outer: tuple = ()):
  """Yields (node, the nodes whose bodies enclose it) over a program."""
  for node in prog.nodes:
    yield node, outer
    if node.body is not None:
      yield from walk(node.body, outer + (node,))


def is_float(aval) -> bool:
  """Whether a value is a float (or complex) array that carries tangents."""
  dtype = getattr(aval, "dtype", None)
  return (dtype is not None and not jax.dtypes.issubdtype(
      dtype, jax.dtypes.extended) and jnp.issubdtype(dtype, jnp.inexact))


# ---------------------------------------------------------------------------
# Reading the program.
# ---------------------------------------------------------------------------

def call_body(eqn, required: bool = True) -> Any:
  """The body of a call-like operation (jit, remat, custom_jvp/vjp), or None.

  Args:
    eqn: a jaxpr equation.
    required: raise where a call-like primitive has no body; with False,
      return None (the callers that only look inside where they can).

  Returns:
    The `ClosedJaxpr` or `Jaxpr` among its params, or None for a primitive
    that is not call-like.

  Raises:
    UnsupportedProgramError: for a call-like primitive with no body found,
      where `required`.
  """
  name = eqn.primitive.name
  if name not in _CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      return eqn.params[key]
  if not required:
    return None
  raise UnsupportedProgramError(
      f"lrcr's engine cannot read the body of `{name}`. " + UNSUPPORTED_HINT)


def _program(closed: jcore.ClosedJaxpr, ids: Iterator[int]) -> Program:
  """Flattens a jaxpr into a `Program`; `ids` numbers its values."""
  prog = Program(invars=[], nodes=[], outvars=[], avals={})
  env = {}
  for v in closed.jaxpr.invars:
    env[v] = i = next(ids)
    prog.invars.append(i)
    prog.avals[i] = v.aval
  prog.outvars = _inline(prog, closed.jaxpr, closed.consts, env, ids)
  return prog


def _inline(prog: Program, jaxpr: jcore.Jaxpr, consts: Sequence[Any],
            env: dict, ids: Iterator[int]) -> list:
  """Appends jaxpr's operations to prog; returns the atoms of its outputs.

  `env` maps the jaxpr's inputs to atoms. Calls are inlined, and the body of
  a primitive with a rule (`NESTED_RULES`) is read as a program of its own.
  """
  env.update((v, Lit(c)) for v, c in zip(jaxpr.constvars, consts))
  read = lambda v: Lit(v.val) if isinstance(v, jcore.Literal) else env[v]
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = None if eqn.primitive.name in _KEPT_CALLS else call_body(eqn)
    if sub is not None:
      sub, sub_consts = ((sub.jaxpr, sub.consts)
                         if isinstance(sub, jcore.ClosedJaxpr) else (sub, ()))
      outs = _inline(prog, sub, sub_consts, dict(zip(sub.invars, ins)), ids)
      env.update(zip(eqn.outvars, outs))
      continue
    outs = [next(ids) for _ in eqn.outvars]
    prog.avals.update(zip(outs, (v.aval for v in eqn.outvars)))
    node = Node(
        id=outs[0] if outs else next(ids), prim=eqn.primitive,
        params=eqn.primitive.get_bind_params(eqn.params), ins=ins,
        outs=outs, in_avals=[v.aval for v in eqn.invars],
        out_avals=[v.aval for v in eqn.outvars],
        rule=NESTED_RULES.get(eqn.primitive.name))
    if node.rule is not None:
      node.body = _program(node.rule.body(eqn.params), ids)
    prog.nodes.append(node)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


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


def _signature(node: Node):
  """A hashable key of what decides a node's class, or None."""
  try:
    consts = [(k, np.asarray(x.val)) for k, x in enumerate(node.ins)
              if isinstance(x, Lit)]
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


def _set_class(node: Node, cout: Sequence[bool], second: Sequence[bool],
               kind: Kind | None = None) -> None:
  """Sets which outputs carry a tangent, have op'' != 0 and an offset."""
  node.cout, node.second = tuple(cout), tuple(second)
  node.offsets = node.second
  node.kind = kind or (Kind.SECOND if any(node.second) else Kind.LINEAR)


def _classify(node: Node) -> None:
  """Sets node.kind / cout / offsets from JAX's own rules for the operation."""
  none = (False,) * len(node.outs)
  if node.name in _NO_TANGENT:
    return _set_class(node, none, none, Kind.CONST)
  if node.name in _LINEAR_COLLECTIVES:
    return _set_class(node, [is_float(a) for a in node.out_avals], none)
  key = _signature(node)
  if key is not None and key in _CLASSES:
    return _set_class(node, *_CLASSES[key])
  lit = [isinstance(x, Lit) for x in node.ins]
  tan_avals = [jax.ShapeDtypeStruct(a.shape, jax.dtypes.float0
                                    if not is_float(a) else a.dtype)
               for a, c in zip(node.in_avals, node.cin) if c]

  def both(vals, tans):
    full = [x.val if l else v for x, l, v in zip(node.ins, lit, vals)]
    return node.jvp2(full, tans)

  # Constants are closed over in `both`; their argument slots are dummies.
  args = [jax.ShapeDtypeStruct((), jnp.float32) if l else
          jax.ShapeDtypeStruct(a.shape, a.dtype)
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
  floats = [is_float(a) for a in node.out_avals]
  tangent_zero = [_constant_zero(closed.jaxpr, closed.consts, k)
                  for k in range(n)]
  second_zero = [_constant_zero(closed.jaxpr, closed.consts, n + k)
                 for k in range(n)]
  _set_class(node, [f and not z for f, z in zip(floats, tangent_zero)],
             [f and not z for f, z in zip(floats, second_zero)])
  if key is not None:
    if len(_CLASSES) > 4096:
      _CLASSES.clear()
    _CLASSES[key] = (node.cout, node.second)


def analyze(prog: Program, carried_in: Sequence[bool]) -> list[bool]:
  """Marks which values carry tangents and classifies every node.

  Returns which outputs of `prog` carry a tangent.
  """
  carried = {i for i, c in zip(prog.invars, carried_in) if c}
  prog.needed = set()
  for node in prog.nodes:
    node.cin = tuple(isinstance(x, int) and x in carried for x in node.ins)
    if not any(node.cin):
      _set_class(node, (False,) * len(node.outs), (False,) * len(node.outs),
                 Kind.CONST)
      continue
    if node.rule is not None:
      node.rule.analyze(node)
      node.kind = Kind.NESTED
    else:
      _classify(node)
    if node.kind is not Kind.CONST:
      prog.needed.update(x for x in node.ins if isinstance(x, int))
    carried.update(o for o, c in zip(node.outs, node.cout) if c)
  return [isinstance(x, int) and x in carried for x in prog.outvars]


# ---------------------------------------------------------------------------
# Evaluating it: the forward pass with offsets.
# ---------------------------------------------------------------------------

def _varying(aval) -> tuple:
  """The `jax.shard_map` axes along which a value differs between shards."""
  mat = getattr(aval, "mat", None)
  return tuple(sorted(getattr(mat, "varying", ()) or ()))


def varying_axes(x: Array) -> tuple:
  """The `jax.shard_map` axes along which the array x differs between shards."""
  return _varying(jax.typeof(x))


def _zeros(aval, prefix: tuple = ()) -> Array:
  """Zeros of an aval's shape and dtype, varying where the aval does.

  Inside `jax.shard_map(check_vma=True)` an offset must vary over the same
  axes as the value it is added to: an invariant one would be broadcast, and
  its adjoint would be the sum of the value's adjoints over the shards.
  """
  z = jnp.zeros(prefix + tuple(aval.shape), aval.dtype)
  axes = _varying(aval)
  return lax.pcast(z, axes, to="varying") if axes else z


def zero_offsets(prog: Program, prefix: tuple = ()) -> dict:
  """Zero offsets for every second-order node (a body's: stacked)."""
  eps = {}
  for node in prog.nodes:
    if any(node.offsets):
      eps[node.id] = tuple(
          _zeros(a, prefix) if o else None
          for a, o in zip(node.out_avals, node.offsets))
    elif node.kind is Kind.NESTED:
      eps[node.id] = node.rule.zero_offsets(node, prefix)
  return eps


def value_of(values: dict, atom: Atom) -> Any:
  """The value of an operation's input: a constant, or one of `values`."""
  return atom.val if isinstance(atom, Lit) else values[atom]


def forward(prog: Program, args: Sequence[Any], eps: dict,
            skip: frozenset = frozenset(), extra: Sequence[int] = (),
            ) -> tuple[list, Residuals]:
  """Evaluates the program with offsets; returns (outputs, residuals).

  The residuals are the forward values the tangent sweep reads (those in
  `prog.needed`, except the ids in `skip`), and the `Residuals` of each
  nested node's body, from its rule.
  """
  env = dict(zip(prog.invars, args))
  res = Residuals({}, {})
  for node in prog.nodes:
    vals = [value_of(env, x) for x in node.ins]
    if node.kind is Kind.NESTED:
      outs, res.bodies[node.id] = node.rule.forward(node, vals, eps[node.id])
    else:
      outs = node.apply(vals)
      if any(node.offsets):
        outs = [o + e if e is not None else o
                for o, e in zip(outs, eps[node.id])]
    env.update(zip(node.outs, outs))
  for i in prog.needed:
    if i not in skip:
      res.values[i] = env[i]
  outs = [value_of(env, x) for x in prog.outvars] + [env[i] for i in extra]
  return outs, res


def accumulation_dtype(*dtypes: Any) -> Any:
  """The dtype of a sum that lrcr adds: float32 at least (bf16/fp16 leaves).

  Complex operands give their real counterpart: every sum lrcr returns
  (slope, curvature, squared norm) is real.
  """
  dtype = jnp.result_type(jnp.float32, *dtypes)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.finfo(dtype).dtype
  return dtype


def _explicitly_sharded(x: Array) -> bool:
  """Whether x's type names mesh axes (`jax.sharding.AxisType.Explicit`)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return any(s is not None for s in (spec or ()))


def pair(a: Array, b: Array, keep: frozenset | None = None) -> Array:
  """Re sum(a * b): the real pairing of an adjoint and a tangent.

  JAX's adjoints pair with tangents without conjugation (its VJPs are
  transposes, not adjoints): for a real loss F of a complex value z with
  adjoint zbar, dF = Re sum(zbar * dz). `jnp.vdot` would conjugate zbar.
  Accumulated in float32 at least. Inside `jax.shard_map(check_vma=True)`
  a value that differs between shards contributes on every shard, so the
  sum is taken over the axes along which it varies and the loss (`keep`)
  does not. `keep=None` (a product of directions and gradients, such as a
  squared norm) sums on the shard alone.
  """
  dtype = jnp.result_type(jnp.float32, a.dtype, b.dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  if _explicitly_sharded(a) or _explicitly_sharded(b):
    out = jnp.sum(a * b)      # a dot over sharded axes needs an out_sharding
  else:
    out = jnp.dot(a.ravel(), b.ravel())                   # one dot, no conj
  out = jnp.real(out) if jnp.issubdtype(dtype, jnp.complexfloating) else out
  if keep is None:
    return out
  axes = tuple(x for x in _varying(jax.typeof(out)) if x not in keep)
  return lax.psum(out, axes) if axes else out


# ---------------------------------------------------------------------------
# The traced loss.
# ---------------------------------------------------------------------------

_WEIGHT_OPS = ("dot_general", "conv_general_dilated")


def _mark_weights(prog: Program, param_ids: dict, uses: dict) -> None:
  """Marks the weight operations: a matmul or convolution of a parameter.

  A weight operation gets an offset on its output, so that its adjoint
  (the output factor of the per-sample gradient, section 2) is available.
  `uses` counts, per flat parameter index, the operations that read it.
  """
  for node in prog.nodes:
    # A body's invariant inputs (a scan's consts) are counted where the body
    # reads them; its other inputs are read by the operation itself.
    through = node.rule.invariants(node) if node.rule is not None else []
    via_body = {k for k, _ in through}
    for k, x in enumerate(node.ins):
      if k not in via_body and isinstance(x, int) and x in param_ids:
        uses[param_ids[x]] = uses.get(param_ids[x], 0) + 1
    if node.rule is not None:
      inner = {b: param_ids[node.ins[k]] for k, b in through
               if isinstance(node.ins[k], int) and node.ins[k] in param_ids}
      _mark_weights(node.body, inner, uses)
      continue
    if node.name not in _WEIGHT_OPS or node.kind is Kind.CONST:
      continue
    is_param = [isinstance(x, int) and x in param_ids for x in node.ins[:2]]
    if is_param.count(True) != 1 or not is_float(node.out_avals[0]):
      continue
    node.weight = is_param.index(True)
    node.param = param_ids[node.ins[node.weight]]
    node.offsets = (True,)


@dataclasses.dataclass
class Traced:
  """A loss function's program, analysed for directions on its params."""
  program: Program
  params_treedef: Any
  num_params: int
  batch: list                            # the flat batch leaves
  uses: dict                             # flat param index -> operations
  closed: Any = None                     # the ClosedJaxpr that was read
  custom_vjps: tuple = ()                # names of its custom_vjp functions
  keep: frozenset = frozenset()          # shard_map axes the loss varies on
  aux_tree: Any = None                   # has_aux: the aux output's treedef

  def weight_nodes(self) -> list[tuple[Node, tuple]]:
    """Every weight operation, with the nested nodes that enclose it."""
    return [(n, outer) for n, outer in walk(self.program) if n.weight >= 0]

  def forward(self, flat_params: Sequence[Array], eps: dict,
              head: int | None = None):
    """(loss, (residuals, aux)), aux None without has_aux.

    With `head`, ((loss, the value `head`), (residuals, aux)).
    """
    extra = () if head is None else (head,)
    outs, res = forward(self.program, list(flat_params) + list(self.batch),
                        eps, extra=extra)
    aux = (None if self.aux_tree is None else jax.tree.unflatten(
        self.aux_tree, list(outs[1:len(outs) - len(extra)])))
    return (outs[0] if head is None else (outs[0], outs[-1])), (res, aux)

  def head_fn(self, res: Residuals, head: int) -> Callable[[Array], Array]:
    """The loss as a function of the value `head`, other values fixed."""
    prog = self.program
    start = next(k for k, n in enumerate(prog.nodes) if head in n.outs) + 1

    def fn(value):
      env = dict(res.values)
      env[head] = value
      for node in prog.nodes[start:]:
        if node.kind is Kind.CONST:
          continue
        outs = node.apply([value_of(env, x) for x in node.ins])
        env.update(zip(node.outs, outs))
      return value_of(env, prog.outvars[0])

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
                if (n.kind is Kind.SECOND and n.weight < 0)
                or n.kind is Kind.NESTED),
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


class Pass(NamedTuple):
  """The engine's forward and backward pass (step 2) at one point."""
  traced: Traced
  flat_params: list
  loss: Array
  flat_grads: list
  residuals: Residuals
  ybar: dict                      # node id -> the adjoints of its offsets
  diagonal: list | None = None    # the Hessian diagonal's leaves, if asked
  aux: Any = None                 # loss_fn's aux output (has_aux)

  def weight_values(self, node: Node, outer: tuple) -> tuple[Array, Array]:
    """(operand, adjoint) of a weight operation, batch axis first.

    `outer`: the nested nodes that enclose it (`Traced.weight_nodes`),
    whose values are stacked over iterations: [T, B, ...] becomes
    [B, T, ...].
    """
    res, ybar = self.residuals, self.ybar
    for nest in outer:
      res, ybar = res.bodies[nest.id], ybar[nest.id]
    operand = value_of(res.values, node.ins[1 - node.weight])
    adjoint = ybar[node.id][0]
    for _ in outer:
      operand = jnp.moveaxis(operand, 0, 1)
      adjoint = jnp.moveaxis(adjoint, 0, 1)
    return operand, adjoint


def _reaches(prog: Program, sources: set, target: Any, block: int) -> bool:
  """Whether `target` depends on `sources` when the value `block` is cut."""
  live = set(sources) - {block}
  for node in prog.nodes:
    if any(isinstance(x, int) and x in live for x in node.ins):
      live.update(o for o, c in zip(node.outs, node.cout) if c and o != block)
  return isinstance(target, int) and target in live


def _leaf_names(tree: Any, prefix: str) -> list[str]:
  return [prefix + jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_inputs(params: Any, batch: Sequence[Any]) -> None:
  """Refuses params that `jax.grad` refuses, and an empty batch.

  Raises:
    ValueError: for params with no leaves, or a batch argument whose leading
      (sample) axis has size 0.
    TypeError: for a params leaf that is not a float array, named by path.
  """
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(
        "params has no arrays: there is nothing to differentiate. Pass the "
        "model's parameters (e.g. model.init(key, x)).")
  for name, leaf in zip(_leaf_names(params, "params"), leaves):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{name} has dtype {dtype}; like jax.grad, lrcr differentiates "
          f"float (or complex) params only. Move integer state out of params "
          f"(pass it as a batch argument or close over it).")
  for k, arg in enumerate(batch):
    for name, leaf in zip(_leaf_names(arg, f"batch[{k}]"),
                          jax.tree.leaves(arg)):
      if jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0:
        raise ValueError(
            f"{name} has shape {jnp.shape(leaf)}: a batch of 0 samples has "
            f"no loss (a mean over it is NaN). Pass at least one sample.")


def _check_loss(out: Sequence[Any], has_aux: bool) -> None:
  """The loss must be one real scalar (and aux outputs follow it)."""
  loss = out[0] if out else None
  if (loss is not None and loss.shape == () and is_float(loss)
      and not jnp.issubdtype(loss.dtype, jnp.complexfloating)):
    if has_aux or len(out) == 1:
      return
  got = ", ".join(str(a) for a in out)
  if has_aux:
    raise ValueError(
        f"with has_aux=True, loss_fn(params, *batch) must return "
        f"(loss, aux) with loss a real scalar; its outputs are {got}.")
  if len(out) > 1 and loss is not None and loss.shape == ():
    raise ValueError(
        f"loss_fn(params, *batch) returns several values ({got}). If it "
        f"returns (loss, aux), pass has_aux=True, as to jax.value_and_grad.")
  if loss is not None and jnp.issubdtype(loss.dtype, jnp.complexfloating):
    raise ValueError(
        f"loss_fn(params, *batch) returns a complex value ({got}); the "
        f"curvature is defined for a real loss. Return a real scalar, e.g. "
        f"the squared magnitude jnp.abs(z) ** 2.")
  raise ValueError(
      f"loss_fn(params, *batch) must return a real scalar; it returns "
      f"{got}. Reduce the per-sample losses (e.g. .mean()) inside loss_fn.")


def _check_collectives(prog: Program) -> None:
  """Collectives are exact only where JAX marks per-shard values (check_vma).

  Raises:
    UnsupportedProgramError: naming the collective, for a loss traced under
      `jax.pmap` or `jax.shard_map(check_vma=False)`.
  """
  nodes = [n for n, _ in walk(prog)]
  names = {n.name for n in nodes if n.name in _COLLECTIVES}
  if names and not any(_varying(a) for n in nodes for a in n.out_avals):
    raise UnsupportedProgramError(
        f"the loss holds the collective(s) {sorted(names)} but JAX does not "
        f"mark which of its values differ between devices (jax.pmap, or "
        f"jax.shard_map with check_vma=False), so the engine cannot tell "
        f"how to sum its terms over the devices. Use jax.shard_map with "
        f"check_vma=True (the default), compute the loss per device and "
        f"average grads and curvature after lrcr's call, or use "
        f"lrcr.autodiff_curvature_fn(loss_fn, *batch) (forward-over-forward "
        f"autodiff, exact here).")


def trace(loss_fn: Callable[..., Array], params: Any,
          batch: Sequence[Any], has_aux: bool = False) -> Traced:
  """Reads `loss_fn(params, *batch)`'s program and classifies its operations.

  Args:
    loss_fn: `loss_fn(params, *batch) -> loss`, or `-> (loss, aux)` with
      `has_aux`.
    params: the point (a pytree of float arrays).
    batch: the other arguments.
    has_aux: whether loss_fn returns (loss, aux), as in `jax.value_and_grad`.

  Returns:
    The analysed program (`Traced`).

  Raises:
    UnsupportedProgramError: for an operation with no differentiation rule,
      or collectives whose per-device values JAX does not mark.
    ValueError: if the loss is not a real scalar, for empty params or an
      empty batch.
    TypeError: for a params leaf that is not a float array.
  """
  check_inputs(params, batch)
  flat_p, treedef = jax.tree.flatten(params)
  flat_b, btree = jax.tree.flatten(list(batch))
  aux_tree = []

  def flat_loss(*leaves):
    p = jax.tree.unflatten(treedef, leaves[:len(flat_p)])
    b = jax.tree.unflatten(btree, leaves[len(flat_p):])
    out = loss_fn(p, *b)
    if not has_aux:
      return out
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      raise ValueError(
          f"with has_aux=True, loss_fn must return a pair (loss, aux); it "
          f"returns {type(out).__name__}.")
    aux_leaves, tree = jax.tree.flatten(out[1])
    aux_tree.append(tree)
    return (out[0], *aux_leaves)

  closed = jax.make_jaxpr(flat_loss)(*flat_p, *flat_b)
  out = closed.out_avals
  _check_loss(out, has_aux)
  prog = _program(closed, itertools.count())
  custom = tuple(custom_vjp_names(closed.jaxpr))
  uses = {}
  if not custom:       # with a custom_vjp the engine reads the program only
    _check_collectives(prog)
    carried = [is_float(prog.avals[i]) for i in prog.invars[:len(flat_p)]]
    carried += [False] * len(flat_b)
    analyze(prog, carried)
    _mark_weights(prog, {i: k for k, i in
                         enumerate(prog.invars[:len(flat_p)])}, uses)
  return Traced(prog, treedef, len(flat_p), flat_b, uses, closed, custom,
                frozenset(_varying(out[0])), aux_tree[0] if has_aux else None)


def _sub_jaxprs(eqn) -> list:
  """Every jaxpr among an operation's parameters (bodies, branches)."""
  out = []
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jcore.ClosedJaxpr):
        out.append(v.jaxpr)
      elif isinstance(v, jcore.Jaxpr):
        out.append(v)
  return out


def custom_vjp_names(jaxpr: jcore.Jaxpr) -> list[str]:
  """The names of the custom_vjp functions anywhere in a program.

  Nested bodies count: jit calls, scan, cond and while bodies, shard_map.
  """
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith("custom_vjp"):
      names.append(_function_name(eqn))
    for sub in _sub_jaxprs(eqn):
      names.extend(custom_vjp_names(sub))
  return names


def _function_name(eqn) -> str:
  """The Python name of a custom_vjp function, from its traced body."""
  sub = call_body(eqn, required=False)
  info = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
  src = getattr(info, "func_src_info", None) or ""
  return src.split(" ")[0] or str(eqn.params.get("name", "?"))
