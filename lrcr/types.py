"""Types shared by the engine and the transform: a leaf module, imports no lrcr.

`Directional` is what a `curvature_fn` returns, and `param_groups` decides what
"one layer" means for the per-layer step lengths (granularity "layer").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

Array = jax.Array

#: The granularities of the CR step: one alpha per step, per param group
#: (a flax module's params), or per weight.
GRANULARITIES = ("global", "layer", "variable")


class Directional(NamedTuple):
  """Slope, curvature and squared norm of the batch loss F along g.

  For granularity "global" each field is a scalar; for "layer" a tree shaped
  like `param_groups(params)` (one scalar per group); for "variable" a tree
  shaped like params (one value per weight).

  Attributes:
    slope: g . grad F (eq. 38).
    curvature: g^T H g with H the exact Hessian of F (eq. 39, corrected).
    sqnorm: ||g||^2 (eq. 40 before the power 3/2).
  """
  slope: Any
  curvature: Any
  sqnorm: Any


#: `curvature_fn(params, direction) -> Directional`, the contract of
#: `lrcr.scale_by_cubic_step`'s extra argument.
CurvatureFn = Callable[[Any, Any], Directional]


@dataclasses.dataclass(frozen=True, eq=False)       # hashed by identity
class ScalableCurvatureFn:
  """A `CurvatureFn` that can rescale the direction by 2^-e inside itself.

  `lrcr.value_grad_and_curvature` returns one for granularity "global".
  `lrcr.scale_by_cubic_step` recognises it by its type and passes the
  exponent e of its exact power-of-two rescaling instead of writing a scaled
  copy of the direction: `fn(params, direction, e)` is the `Directional` of
  direction * 2^-e. Called as a plain `CurvatureFn`, e is 0.

  Attributes:
    fn: `fn(params, direction, log2_scale) -> Directional`, where log2_scale
      is an int32 scalar or None (no rescaling).
    autoscaled: optional `autoscaled(params, direction, scale=None) ->
      (Directional, e)` for a direction that is a multiple of the gradient
      (see `autoscales`): it chooses the exponent e itself (an int32
      scalar, exact power of two, the unit direction's values in range) and
      returns the `Directional` of scale * direction * 2^-e (scale: a
      scalar, 1 when None). The transform then skips its own search for
      the direction's largest entry (one reduction per leaf).
    gradient_direction: the promise of `value_grad_and_curvature`: every
      direction is a multiple of the gradient.
    gradient: the gradient's leaves, for `autoscales`.
  """
  fn: Callable[[Any, Any, Any], Directional]
  autoscaled: Callable[..., tuple[Directional, Any]] | None = None
  gradient_direction: bool = False
  gradient: tuple = ()

  def __call__(self, params: Any, direction: Any) -> Directional:
    return self.fn(params, direction, None)

  def is_gradient(self, direction: Any) -> bool:
    """Whether `direction`'s leaves are the gradient's own arrays."""
    return bool(self.gradient) and same_arrays(jax.tree.leaves(direction),
                                               self.gradient)

  def autoscales(self, direction: Any) -> bool:
    """Whether `autoscaled` takes `direction`: a multiple of the gradient,
    by the promise or because it is the gradient itself."""
    return self.autoscaled is not None and (
        self.gradient_direction or self.is_gradient(direction))


def same_arrays(a: Sequence[Any], b: Sequence[Any]) -> bool:
  """Whether two lists hold the same objects, one by one (so equal values
  without a look at them: traced arrays cannot be compared eagerly)."""
  return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def param_groups(tree: Any, fill: Any = 0.0) -> Any:
  """The tree with every innermost dict (one module's arrays) set to `fill`.

  For flax params {'params': {'Dense_0': {'kernel', 'bias'}, ...}} this is
  {'params': {'Dense_0': fill, ...}}: a tree prefix of params with one leaf
  per module. A tree that is a single array is one group.
  """
  if isinstance(tree, Mapping):
    if tree and all(not isinstance(v, (Mapping, list, tuple))
                    for v in tree.values()):
      return fill
    return {k: param_groups(v, fill) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(param_groups(v, fill) for v in tree)
  return fill


def group_index(tree: Any) -> tuple[list[int], Any]:
  """For each leaf of `tree`, the index of its group in `param_groups(tree)`.

  Returns:
    (indices, groups_treedef): one int per leaf of `tree` (in flatten order)
    and the treedef of `param_groups(tree)`.
  """
  prefix = param_groups(tree, fill=0)
  groups, treedef = jax.tree_util.tree_flatten_with_path(prefix)
  paths = [p for p, _ in groups]
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  index = []
  for path, _ in leaves:
    matches = [i for i, g in enumerate(paths) if path[:len(g)] == g]
    index.append(matches[0])
  return index, treedef
