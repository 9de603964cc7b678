"""Reads an `lrcr.MLP` and its parameters as the list of layers the engine sweeps.

The low-rank engine (`lrcr.factors`, `lrcr.directional`) works on the plain
sequence (W_1, b_1), ..., (W_n, b_n), (U, c) of eqs. 10-13 rather than on flax
internals. This module does that translation once, and turns every mismatch
between a model, its parameters and a direction into an error that says what
to do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lrcr.mlp import MLP

Array = jax.Array

UNSUPPORTED_HINT = (
    "The low-rank engine covers lrcr.MLP and lrcr.Sequential (Dense, Conv, "
    "pooling, Flatten, Recurrent layers). For any other differentiable "
    "model use lrcr.autodiff_curvature_fn(loss_fn, *args) (or "
    "lrcr.autodiff_directional), which computes the same slope and curvature "
    "by forward-over-forward autodiff.")


class Layer(NamedTuple):
  """One affine layer `z = v @ kernel + bias`.

  Attributes:
    kernel: [d_in, d_out], the paper's W^(k) (or U for the output layer).
    bias: [d_out], or None when the model has no biases.
  """
  kernel: Array
  bias: Array | None


def unwrap(tree: Any) -> Mapping[str, Any]:
  """Accepts `model.init(...)` variables ({'params': ...}) or the inner dict."""
  if isinstance(tree, Mapping) and "params" in tree:
    return tree["params"]
  return tree


def rewrap(like: Any, inner: Any) -> Any:
  """`inner` under a 'params' key when `like` has one: the inverse of `unwrap`."""
  return {"params": inner} if isinstance(like, Mapping) and "params" in like \
      else inner


def softmax_gauss_newton(q: Array, dp: Array) -> Array:
  """dp^T (diag(q) - q q^T) dp for softmax cross-entropy (eq. 3), one sample.

  Args:
    q: softmax probabilities [C].
    dp: a logit tangent [C], or several as columns [C, d] (then the diagonal
      of J^T H_p J, [d]).
  """
  return q @ (dp * dp) - (q @ dp) ** 2


def layer_names(model: MLP) -> list[str]:
  """Names of the layers in forward order: hidden_0..hidden_{n-1}, output."""
  return [f"hidden_{k}" for k in range(len(model.hidden_sizes))] + ["output"]


def check_model(model: Any) -> MLP:
  """Raises a TypeError naming the model when the engine cannot handle it."""
  from lrcr import nets  # pylint: disable=g-import-not-at-top (nets imports this)
  if isinstance(model, nets.Sequential):
    return model             # checked layer by layer in lrcr.nets
  if not isinstance(model, MLP):
    raise TypeError(
        f"Unsupported model {type(model).__name__}. {UNSUPPORTED_HINT}")
  return model


def as_layers(model: MLP, tree: Any, what: str = "params") -> list[Layer]:
  """Extracts [(W_1, b_1), ..., (W_n, b_n), (U, c)] from a params-shaped tree.

  Args:
    model: the `lrcr.MLP` the tree belongs to.
    tree: parameters, or a direction shaped like them, with or without the
      top-level 'params' key.
    what: how to call `tree` in error messages ("params" or "direction").

  Returns:
    One `Layer` per affine map, in forward order.

  Raises:
    TypeError: for a model the engine does not support.
    ValueError: when the tree does not match the model's layout.
  """
  check_model(model)
  inner = unwrap(tree)
  names = layer_names(model)
  if not isinstance(inner, Mapping) or set(inner) != set(names):
    got = sorted(inner) if isinstance(inner, Mapping) else type(inner).__name__
    raise ValueError(
        f"{what} does not match the layers of {model!r}: expected keys "
        f"{names}, got {got}. Pass the tree returned by model.init (or one "
        f"shaped like it).")
  layers = []
  for name in names:
    entry = inner[name]
    bias = entry.get("bias") if isinstance(entry, Mapping) else None
    if not isinstance(entry, Mapping) or "kernel" not in entry:
      raise ValueError(f"{what}['{name}'] has no 'kernel'.")
    if model.use_bias != (bias is not None):
      raise ValueError(
          f"{what}['{name}'] {'lacks' if model.use_bias else 'has'} a 'bias' "
          f"but the model has use_bias={model.use_bias}.")
    layers.append(Layer(jnp.asarray(entry["kernel"]),
                        None if bias is None else jnp.asarray(bias)))
  return layers


def check_direction(params: list[Layer], direction: list[Layer]) -> None:
  """Raises a ValueError when the direction's shapes differ from the params'."""
  for k, (p, d) in enumerate(zip(params, direction)):
    for field in ("kernel", "bias"):
      ps, ds = getattr(p, field), getattr(d, field)
      if ps is not None and ps.shape != ds.shape:
        raise ValueError(
            f"direction layer {k} {field} has shape {ds.shape}, params have "
            f"{ps.shape}: the direction must be a pytree shaped like params.")


def activation_derivatives(
    activation: Callable[[Array], Array], z: Array, second: bool = True
) -> tuple[Array, Array, Array | None]:
  """Evaluates A(z), A'(z) and A''(z) elementwise by forward-mode autodiff.

  The activation must act elementwise (relu, tanh, sigmoid, softplus, gelu...);
  then a jvp with a tangent of ones is its derivative.

  Args:
    activation: elementwise A.
    z: pre-activations, any shape.
    second: also compute A''. Skipped (None) for ReLU, whose A'' is zero
      (eq. 29).

  Returns:
    (A(z), A'(z), A''(z) or None), each shaped like z.
  """
  ones = jnp.ones_like(z)
  if not second or is_piecewise_linear(activation):
    v, a1 = jax.jvp(activation, (z,), (ones,))
    return v, a1, None

  def first(u):
    return jax.jvp(activation, (u,), (jnp.ones_like(u),))

  (v, a1), (_, a2) = jax.jvp(first, (z,), (ones,))
  return v, a1, a2


def is_piecewise_linear(activation: Callable[[Array], Array]) -> bool:
  """True for activations with A'' = 0 almost everywhere (ReLU, eq. 29)."""
  return activation in (jax.nn.relu,)


class Forward(NamedTuple):
  """A forward pass (eqs. 10-13), for one sample ([d]) or a batch ([B, d]).

  Attributes:
    inputs: v^(k-1), the input of every affine layer k = 1..n+1.
    act_grads: A'(z^(k)), k = 1..n (gamma, eq. 19).
    act_second: A''(z^(k)), k = 1..n, or an empty tuple when not asked for
      or zero (ReLU).
    logits: p (eq. 13).
  """
  inputs: tuple[Array, ...]
  act_grads: tuple[Array, ...]
  act_second: tuple[Array, ...]
  logits: Array


def forward(layers: list[Layer], activation: Callable[[Array], Array],
            x: Array, second: bool = True) -> Forward:
  """Runs eqs. 10-13 and keeps what the derivatives need.

  Args:
    layers: from `as_layers`.
    activation: the elementwise A.
    x: one sample [d_0] or a batch [B, d_0].
    second: also keep A''(z^(k)) (skipped for ReLU, where it is zero).

  Returns:
    `Forward`.
  """
  inputs, a1s, a2s = [], [], []
  v = x
  for layer in layers[:-1]:
    inputs.append(v)
    z = v @ layer.kernel                                        # eq. 10
    if layer.bias is not None:
      z = z + layer.bias
    v, a1, a2 = activation_derivatives(activation, z, second)
    a1s.append(a1)
    if a2 is not None:
      a2s.append(a2)
  inputs.append(v)
  out = layers[-1]
  p = v @ out.kernel                                            # eq. 13
  if out.bias is not None:
    p = p + out.bias
  return Forward(tuple(inputs), tuple(a1s), tuple(a2s), p)


def exact_matmuls(fn: Callable) -> Callable:
  """Traces `fn` with float32 matmuls at full precision.

  On GPUs (TF32) and TPUs (bf16 passes) JAX's default float32 matmul keeps
  about 3 significant digits fewer; the curvature engine promises exact
  numbers, so its contractions ask for "highest". No effect on CPUs.
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped
