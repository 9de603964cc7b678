"""Convolutional and recurrent networks in the low-rank engine (appendix B.2).

`lrcr.Sequential` stacks layers that keep the per-sample low-rank structure:
`Dense`, `Conv` (any stride, padding, channels), `Activation` (the network's
elementwise A), `AvgPool`, `MaxPool`, `Flatten`, and `Recurrent`, the layer
v_t = A(v_{t-1} W + x_t V (+ b)) of eq. 58 with weights shared over time. The
logits are a final dense layer p = v U (+ c), as in eq. 13.

Exact slope and curvature, one engine for every layer
-----------------------------------------------------
Every parameterized layer is bilinear in (input, weights) plus a bias:
z = B(v, W) + b (Dense: v W; Conv: the convolution of eq. 46; each time step
of Recurrent: v_{t-1} W + x_t V). Along a direction g (phi for W, beta for b)
the second-order tangent of z is 2 B(dv, phi) + B(d2v, W), and of an
activation v = A(z) it is A'(z) d2z + A''(z) dz^2; linear layers (flatten,
average pooling) and locally linear ones (max pooling, A'' = 0 almost
everywhere) only pass second-order tangents on. So

    g^T H_f g = dp^T (d2f/dp2) dp + sum_sources delta_source . s_source

with one source s = 2 B(dv, phi) at every bilinear application (every
position of a convolution, every time step of a recurrence) and one source
s = A''(z) dz^2 at every activation, and delta_source the backprop signal
df/d(that point). The engine runs the forward pass with its tangent (dv, dz)
once, collecting the sources, and gets every delta from a single reverse pass
(`jax.vjp` with respect to zero offsets added at the source points): no
Hessian, no per-sample gradient, and time linear in the number of layers and
time steps. For `Sequential` nets made only of Dense and Activation layers
this is the same computation as `lrcr.directional` on an `lrcr.MLP`.

The per-sample factors of appendix B.2
--------------------------------------
A convolution's per-sample weight gradient is a sum over output positions of
outer products of an input patch and the output signal there (eqs. 49, 53);
a recurrent layer's is a sum over time steps of outer products v_{t-1}^T
delta_t (eq. 61). `per_sample_factors` returns those factors; the rank of a
per-sample weight gradient is at most the number of output positions (or of
time steps), not 1 as for a dense layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lrcr import layers as layers_lib
from lrcr.mlp import uniform_init

Array = jax.Array


# --- Layer specifications (hashable, so the model can be a static argument).


@dataclasses.dataclass(frozen=True)
class Dense:
  """z = v W (+ b); v must be a vector (put `Flatten` after spatial layers)."""
  features: int


@dataclasses.dataclass(frozen=True)
class Conv:
  """2-D convolution over [H, W, C] (eq. 44), kernel [kh, kw, C_in, C_out]."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class Activation:
  """The network's elementwise activation A."""


@dataclasses.dataclass(frozen=True)
class AvgPool:
  window: tuple[int, int] = (2, 2)
  strides: tuple[int, int] = (2, 2)


@dataclasses.dataclass(frozen=True)
class MaxPool:
  window: tuple[int, int] = (2, 2)
  strides: tuple[int, int] = (2, 2)


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Reshapes a sample to a vector."""


@dataclasses.dataclass(frozen=True)
class Recurrent:
  """v_t = A(v_{t-1} W + x_t V (+ b)), v_0 = 0, over x [T, d]; returns v_T (eq. 58)."""
  features: int


SUPPORTED = (Dense, Conv, Activation, AvgPool, MaxPool, Flatten, Recurrent)


def _conv(v: Array, kernel: Array, spec: Conv) -> Array:
  """One sample [H, W, C] convolved with kernel [kh, kw, C, F] (eqs. 44-46)."""
  return jax.lax.conv_general_dilated(
      v[None], kernel, window_strides=spec.strides, padding=spec.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]


def _pool(v: Array, spec, reducer) -> Array:
  return reducer(v[None], spec.window, strides=spec.strides,
                 padding="VALID")[0]


class Sequential(nn.Module):
  """A network of supported layers followed by dense logits (eq. 13).

  Attributes:
    layers: the layer specs, e.g. (Conv(16), Activation(), MaxPool(),
      Flatten(), Dense(64), Activation()).
    num_classes: C.
    activation: the elementwise A used by `Activation` and `Recurrent`.
    use_bias: biases on every parameterized layer.
    kernel_init: initializer of every weight matrix or kernel.
  """
  layers: tuple
  num_classes: int
  activation: Callable[[Array], Array] = jax.nn.relu
  use_bias: bool = False
  kernel_init: Callable[..., Array] = uniform_init(0.1)

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    for spec in self.layers:
      if not isinstance(spec, SUPPORTED):
        raise TypeError(
            f"lrcr.Sequential: unsupported layer {spec!r}; the low-rank engine "
            f"covers {', '.join(c.__name__ for c in SUPPORTED)}. "
            f"{layers_lib.UNSUPPORTED_HINT}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps inputs [B, ...] to logits [B, C]."""
    v = x
    for i, spec in enumerate(self.layers):
      name = f"layer_{i}"
      if isinstance(spec, Dense):
        v = nn.Dense(spec.features, use_bias=self.use_bias,
                     kernel_init=self.kernel_init, name=name)(v)
      elif isinstance(spec, Conv):
        v = nn.Conv(spec.features, spec.kernel_size, spec.strides,
                    padding=spec.padding, use_bias=self.use_bias,
                    kernel_init=self.kernel_init, name=name)(v)
      elif isinstance(spec, Activation):
        v = self.activation(v)
      elif isinstance(spec, AvgPool):
        v = nn.avg_pool(v, spec.window, strides=spec.strides)
      elif isinstance(spec, MaxPool):
        v = nn.max_pool(v, spec.window, strides=spec.strides)
      elif isinstance(spec, Flatten):
        v = v.reshape(v.shape[0], -1)
      else:
        v = _RecurrentCell(spec.features, self.activation, self.use_bias,
                           self.kernel_init, name=name)(v)
    return nn.Dense(self.num_classes, use_bias=self.use_bias,
                    kernel_init=self.kernel_init, name="output")(v)


class _RecurrentCell(nn.Module):
  features: int
  activation: Callable[[Array], Array]
  use_bias: bool
  kernel_init: Callable[..., Array]

  @nn.compact
  def __call__(self, x: Array) -> Array:          # x [B, T, d] -> v_T [B, h]
    w = self.param("recurrent_kernel", self.kernel_init,
                   (self.features, self.features))
    u = self.param("input_kernel", self.kernel_init,
                   (x.shape[-1], self.features))
    b = (self.param("bias", nn.initializers.zeros, (self.features,))
         if self.use_bias else 0.0)
    v = jnp.zeros(x.shape[:-2] + (self.features,), x.dtype)
    for t in range(x.shape[-2]):
      v = self.activation(v @ w + x[..., t, :] @ u + b)   # eq. 58
    return v


# --- The engine.


def _params_of(model: Sequential, params: Any, what: str = "params"):
  inner = params["params"] if "params" in params else params
  names = [f"layer_{i}" for i, s in enumerate(model.layers)
           if isinstance(s, (Dense, Conv, Recurrent))] + ["output"]
  if set(inner) != set(names):
    raise ValueError(f"{what} does not match {model!r}: expected keys "
                     f"{names}, got {sorted(inner)}.")
  return inner


class _Sweep(NamedTuple):
  logits: Array
  dp: Array
  sources: tuple
  inputs: tuple      # what the weights multiply, one per bilinear source


def _sample_sweep(model: Sequential, params, direction, x: Array,
                  offsets: tuple | None, tags: list | None = None):
  """Forward pass with its tangent along the direction, for one sample.

  Adds offsets[k] at the k-th source point (each bilinear output and each
  activation output), so a vjp with respect to the offsets gives the deltas.
  Returns (logits, aux) with aux the tangent of the logits, the sources and
  the weights' inputs; `tags` (if given) receives, per source, the layer name
  of a bilinear source or None for an activation's.
  """
  act = model.activation
  smooth = not layers_lib.is_piecewise_linear(act)
  sources, records = [], []
  tags = [] if tags is None else tags
  it = iter(offsets) if offsets is not None else None
  name = ""

  def bilinear(z, src, inp):
    sources.append(src)
    records.append(inp)
    tags.append(name)
    return z + next(it) if it is not None else z

  def activate(z, dz):
    v, a1, a2 = layers_lib.activation_derivatives(act, z, smooth)
    dv = a1 * dz
    s = a2 * dz * dz if a2 is not None else jnp.zeros_like(z)
    sources.append(s)                                      # app. B.3
    tags.append(None)
    return (v + next(it) if it is not None else v), dv

  v, dv = x, jnp.zeros_like(x)
  for i, spec in enumerate(model.layers):
    name = f"layer_{i}"
    if isinstance(spec, (Dense, Conv)):
      p, g = params[name], direction[name]
      op = ((lambda a, w: a @ w) if isinstance(spec, Dense)
            else functools.partial(lambda a, w, s: _conv(a, w, s), s=spec))
      z = op(v, p["kernel"])                              # eq. 10 / 46
      dz = op(dv, p["kernel"]) + op(v, g["kernel"])
      if "bias" in p:
        z, dz = z + p["bias"], dz + g["bias"]
      v, dv = bilinear(z, 2.0 * op(dv, g["kernel"]), v), dz  # eq. 36 (r != k)
    elif isinstance(spec, Activation):
      v, dv = activate(v, dv)
    elif isinstance(spec, (AvgPool, MaxPool)):
      reducer = nn.avg_pool if isinstance(spec, AvgPool) else nn.max_pool
      v, dv = jax.jvp(lambda a: _pool(a, spec, reducer), (v,), (dv,))
    elif isinstance(spec, Flatten):
      v, dv = v.reshape(-1), dv.reshape(-1)
    else:                                                 # Recurrent, eq. 58
      p, g = params[name], direction[name]
      w, u = p["recurrent_kernel"], p["input_kernel"]
      gw, gu = g["recurrent_kernel"], g["input_kernel"]
      h = jnp.zeros((spec.features,), v.dtype)
      dh = jnp.zeros_like(h)
      for t in range(v.shape[0]):
        z = h @ w + v[t] @ u
        dz = dh @ w + h @ gw + dv[t] @ u + v[t] @ gu
        if "bias" in p:
          z, dz = z + p["bias"], dz + g["bias"]
        z = bilinear(z, 2.0 * (dh @ gw + dv[t] @ gu), (h, v[t]))  # eq. 63
        h, dh = activate(z, dz)
      v, dv = h, dh
  out, gout = params["output"], direction["output"]
  name = "output"
  p = v @ out["kernel"]
  dp = dv @ out["kernel"] + v @ gout["kernel"]
  if "bias" in out:
    p, dp = p + out["bias"], dp + gout["bias"]
  p = bilinear(p, 2.0 * (dv @ gout["kernel"]), v)         # eq. 35
  return p, _Sweep(p, dp, tuple(sources), tuple(records))


def _source_shapes(model, params, x):
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, aux = _sample_sweep(model, params, zeros, x, None)
  return tuple(jnp.zeros_like(s) for s in aux.sources)


def _sample_directional(model, params, direction, x, label):
  """(f, slope, curvature) of one sample."""
  offsets = _source_shapes(model, params, x)

  def loss_of(offs):
    p, aux = _sample_sweep(model, params, direction, x, offs)
    return optax.softmax_cross_entropy_with_integer_labels(p, label), aux

  f, vjp, aux = jax.vjp(loss_of, offsets, has_aux=True)
  deltas = vjp(jnp.ones_like(f))[0]                       # df/d(source points)
  q = jax.nn.softmax(aux.logits)
  dfdp = q - jax.nn.one_hot(label, q.shape[-1], dtype=q.dtype)
  dp = aux.dp
  gauss_newton = layers_lib.softmax_gauss_newton(q, dp)  # dp^T H_p dp
  residual = sum(jnp.sum(d * s) for d, s in zip(deltas, aux.sources))
  return f, dfdp @ dp, gauss_newton + residual


def check_model(model: Any) -> Sequential:
  if not isinstance(model, Sequential):
    raise TypeError(f"Unsupported model {type(model).__name__}. "
                    f"{layers_lib.UNSUPPORTED_HINT}")
  return model


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def sequential_directional(model: Sequential, params: Any, x: Any,
                           labels: Any, direction: Any):
  """Exact (loss, slope, curvature, sqnorm) of F along g for a `Sequential`.

  See the module docstring; `lrcr.directional` dispatches here.
  """
  from lrcr.directional import Directional  # pylint: disable=g-import-not-at-top
  check_model(model)
  p = _params_of(model, params)
  g = _params_of(model, direction, "direction")
  jax.tree.map(lambda a, b: None if a.shape == b.shape else (_ for _ in ()).throw(
      ValueError(f"direction leaf shape {b.shape} != params {a.shape}: the "
                 "direction must be a pytree shaped like params.")), p, g)
  x, labels = jnp.asarray(x), jnp.asarray(labels)
  fn = lambda xi, yi: _sample_directional(model, p, g, xi, yi)
  f, slope, curvature = jax.vmap(fn)(x, labels)
  sqnorm = optax.tree.norm(g, squared=True)
  return f.mean(), Directional(slope.mean(), curvature.mean(), sqnorm)


class LayerFactors(NamedTuple):
  """Per-sample factors of one parameterized layer (leading batch axis B).

  Attributes:
    inputs: what the weights multiply, per application: Dense / output:
      v^(k-1) [B, d_in]; Conv: the input patches [B, P, kh*kw*C_in] (eq. 53,
      P output positions); Recurrent: (v_{t-1} [B, T, h], x_t [B, T, d]).
    deltas: the backprop signal at the layer's output per application:
      [B, d_out], [B, P, C_out] or [B, T, h] (eqs. 28, 49, 61).
  """
  inputs: Any
  deltas: Array


@functools.partial(jax.jit, static_argnames="model")
@layers_lib.exact_matmuls
def sequential_factors(model: Sequential, params: Any, x: Any,
                       labels: Any) -> dict[str, LayerFactors]:
  """The per-sample factors of every parameterized layer (appendix B.2), by name.

  The per-sample weight gradient of a layer is sum over applications of
  outer(input, delta): dense kernels are rank 1, convolution kernels rank
  <= P positions (eqs. 49, 53), recurrent kernels rank <= T steps (eq. 61).
  """
  check_model(model)
  p = _params_of(model, params)
  zeros = jax.tree.map(jnp.zeros_like, p)

  tags: list = []
  jax.eval_shape(lambda xi: _sample_sweep(model, p, zeros, xi, None, tags),
                 jnp.asarray(x)[0])
  keep = [k for k, tag in enumerate(tags) if tag is not None]

  def one(xi, yi):
    offsets = _source_shapes(model, p, xi)

    def loss_of(offs):
      logits, aux = _sample_sweep(model, p, zeros, xi, offs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yi), aux

    f, vjp, aux = jax.vjp(loss_of, offsets, has_aux=True)
    deltas = vjp(jnp.ones_like(f))[0]
    return aux.inputs, tuple(deltas[k] for k in keep)

  inputs, deltas = jax.vmap(one)(jnp.asarray(x), jnp.asarray(labels))
  names = [tags[k] for k in keep]
  return _group_factors(model, list(zip(names, inputs, deltas)))


def _group_factors(model, per) -> dict[str, LayerFactors]:
  grouped: dict[str, list] = {}
  for name, inp, delta in per:
    grouped.setdefault(name, []).append((inp, delta))
  out = {}
  for name, items in grouped.items():
    spec = None if name == "output" else model.layers[int(name.split("_")[1])]
    if isinstance(spec, Conv):
      (inp, delta), = items
      patches = jax.vmap(lambda a: jax.lax.conv_general_dilated_patches(
          a[None], spec.kernel_size, spec.strides, spec.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))[0])(inp)
      b, hh, ww, kk = patches.shape
      out[name] = LayerFactors(patches.reshape(b, hh * ww, kk),
                               delta.reshape(b, hh * ww, -1))
    elif isinstance(spec, Recurrent):
      hs = jnp.stack([inp[0] for inp, _ in items], 1)
      xs = jnp.stack([inp[1] for inp, _ in items], 1)
      out[name] = LayerFactors((hs, xs), jnp.stack([d for _, d in items], 1))
    else:
      (inp, delta), = items
      out[name] = LayerFactors(inp, delta)
  return out
