"""The engine on programs users write: exact, or refused by name.

Each program is checked against an independent float64 reference built
without lrcr: `jax.value_and_grad` for the loss and gradient, a dense
`jax.hessian` of the flattened loss for the curvature, and for losses with
a `jax.custom_vjp` the reverse-over-reverse derivative of the custom
gradient, g^T grad(g . grad F).
"""

# pylint: disable=protected-access

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.ode import odeint
from jax.flatten_util import ravel_pytree

import lrcr
from tests import zoo

RTOL = 1e-8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = zoo.F64


# ---------------------------------------------------------------------------
# Collectives: shard_map and pmap on 2 host devices, in a subprocess. First
# in the file: the longest test here, started while the rest of the suite can
# still fill the other pytest-xdist worker.
# ---------------------------------------------------------------------------

def test_shard_map_and_pmap_are_exact_or_refused():
  # The session's XLA_FLAGS (tests/conftest.py), and 2 host devices.
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    "--xla_force_host_platform_device_count=2"]).strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "scripts",
                                    "collectives_check.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  exact = ["shard_map vma=True pmean=True", "shard_map vma=True pmean=False",
           "shard_map vma=False pmean=False", "outer shard_map",
           "pmap pmean=False"]
  for name in exact:
    rows = np.array(result[name])
    assert rows.shape == (1 if name == "outer shard_map" else 2, 6), name
    for k in (0, 2, 4):                     # slope, curvature, ||g||^2
      np.testing.assert_allclose(rows[:, k], rows[:, k + 1], rtol=RTOL,
                                 err_msg=f"{name} {k}")
  for name in ("shard_map vma=False pmean=True", "pmap pmean=True"):
    assert "psum" in result[name] and "check_vma" in result[name], name
    assert "autodiff_curvature_fn" in result[name]


# ---------------------------------------------------------------------------
# custom_vjp: straight-through, clipping, reversal, stable softplus, odeint.
# ---------------------------------------------------------------------------

@jax.custom_vjp
def straight_through(x):
  return jnp.round(x)


straight_through.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


@jax.custom_vjp
def clip_gradient(x):
  return x


clip_gradient.defvjp(lambda x: (x, None),
                     lambda _, g: (jnp.clip(g, -0.05, 0.05),))


@jax.custom_vjp
def reverse_gradient(x):
  return x


reverse_gradient.defvjp(lambda x: (x, None), lambda _, g: (-0.5 * g,))


@jax.custom_vjp
def stable_softplus(x):
  return jnp.logaddexp(x, 0.0)


stable_softplus.defvjp(lambda x: (jnp.logaddexp(x, 0.0), x),
                       lambda x, g: (g * jax.nn.sigmoid(x),))


class CustomMLP(nn.Module):
  """Dense layers around one custom_vjp function."""
  custom: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, **F64)(x)
    if self.custom == "straight_through":
      h = jnp.tanh(straight_through(3.0 * h) / 3.0 + 0.1 * h)
    elif self.custom == "clip_gradient":
      h = jnp.tanh(clip_gradient(h))
    elif self.custom == "reverse_gradient":
      h = jnp.tanh(reverse_gradient(h)) + 0.3 * jnp.tanh(h)
    elif self.custom == "cond":          # a custom_vjp inside a branch
      h = jnp.tanh(jax.lax.cond(x.shape[0] > 1,
                                lambda h: clip_gradient(h) * h,
                                lambda h: h, h))
    elif self.custom in ("stable_softplus", "softplus"):
      h = (stable_softplus(h) if self.custom == "stable_softplus"
           else jax.nn.softplus(h))
    return nn.Dense(3, **F64)(jnp.tanh(nn.Dense(5, **F64)(h)))


def _mlp_problem(custom, seed):
  k = jax.random.split(jax.random.key(seed), 3)
  model = CustomMLP(custom)
  x = jax.random.normal(k[0], (7, 4), jnp.float64)
  y = jax.random.randint(k[1], (7,), 0, 3)
  params = zoo._init(model, k[2], x)
  loss = lambda p, x, y: zoo._ce(model.apply(p, x), y)
  return loss, params, (x, y)


def _ode_problem(seed):
  k = jax.random.split(jax.random.key(seed), 3)

  def dynamics(y, t, a):
    return jnp.tanh(a["w"] @ y) * a["s"] - 0.1 * y * t

  def loss(a, y0, target):
    ys = odeint(dynamics, y0, jnp.array([0.0, 0.5, 1.0]), a)
    return jnp.mean((ys[-1] - target) ** 2)

  params = {"w": 0.5 * jax.random.normal(k[0], (3, 3), jnp.float64),
            "s": jnp.array(0.8)}
  return loss, params, (jax.random.normal(k[1], (3,), jnp.float64),
                        jax.random.normal(k[2], (3,), jnp.float64))


@functools.partial(jax.jit, static_argnums=0)
def _reverse_over_reverse(loss_fn, params, batch, flat_d):
  """g^T d/dt grad F = g^T grad(g . grad F), as one compiled program."""
  def gdot(p):
    return ravel_pytree(jax.grad(loss_fn)(p, *batch))[0] @ flat_d

  return ravel_pytree(jax.grad(gdot)(params))[0] @ flat_d


def _custom_reference(loss_fn, params, batch, d):
  """(loss, grads, slope, g^T d/dt grad F) by reverse-over-reverse."""
  # Eager, as lrcr computes them: they are compared bit for bit.
  loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
  flat_d = ravel_pytree(d)[0]
  curv = _reverse_over_reverse(loss_fn, params, batch, flat_d)
  return loss, grads, ravel_pytree(grads)[0] @ flat_d, curv


CUSTOM = ("straight_through", "clip_gradient", "reverse_gradient",
          "stable_softplus", "odeint", "cond")


def _custom_problem(name, seed):
  return _ode_problem(seed) if name == "odeint" else _mlp_problem(name, seed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", CUSTOM)
def test_custom_vjp_grads_are_jax_grads_and_curvature_is_exact(name, seed):
  with jax.enable_x64(True):
    loss_fn, params, batch = _custom_problem(name, seed)
    loss, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, *batch)
    for k, d in enumerate([zoo.random_like(params, seed + 5),
                           jax.tree.map(lambda g: -0.4 * g, grads)]):
      ref_loss, ref_grads, slope, curv = _custom_reference(
          loss_fn, params, batch, d)
      # The user's rule, bit for bit.
      assert loss == ref_loss
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_array_equal(a, b)
      assert np.any(ravel_pytree(grads)[0] != 0)
      out = jax.jit(cf)(params, d)
      np.testing.assert_allclose(out.slope, slope, rtol=RTOL,
                                 err_msg=f"{name} {k}")
      np.testing.assert_allclose(out.curvature, curv, rtol=RTOL,
                                 err_msg=f"{name} {k}")
      assert abs(float(curv)) > 1e-6
      # The public fallback runs on the same program and agrees.
      fb = lrcr.reverse_curvature_fn(loss_fn, *batch)(params, d)
      np.testing.assert_allclose(fb.curvature, curv, rtol=RTOL)


def test_custom_vjp_curvature_under_jit_and_per_layer():
  with jax.enable_x64(True):
    loss_fn, params, batch = _mlp_problem("straight_through", 3)
    d = zoo.random_like(params, 2)
    step = jax.jit(lambda p, d, *b: lrcr.value_grad_and_curvature(
        loss_fn, p, *b, granularity="layer")[2](p, d))
    blocks = step(params, d, *batch)
    index, _ = lrcr.types.group_index(params)
    leaves = jax.tree.leaves(d)
    for j, block in enumerate(jax.tree.leaves(blocks.curvature)):
      masked = jax.tree.unflatten(
          jax.tree.structure(d),
          [x if i == j else jnp.zeros_like(x) for i, x in zip(index, leaves)])
      ref = _custom_reference(loss_fn, params, batch, masked)[3]
      np.testing.assert_allclose(block, ref, rtol=RTOL, atol=1e-14)


def test_a_custom_rule_that_matches_the_true_derivative_gives_the_hessian():
  with jax.enable_x64(True):
    loss_fn, params, batch = _mlp_problem("stable_softplus", 4)
    plain_fn = _mlp_problem("softplus", 4)[0]     # same params, no custom_vjp
    _, hess = zoo.dense(plain_fn, params, batch)
    d = zoo.random_like(params, 1)
    g = ravel_pytree(d)[0]
    out = lrcr.value_grad_and_curvature(loss_fn, params, *batch)[2](params, d)
    np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


@pytest.mark.parametrize("name", ["clip_gradient", "odeint"])
def test_primal_read_quantities_refuse_custom_vjp_by_name(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = _custom_problem(name, 0)
    fn_name = "_odeint" if name == "odeint" else name
    with pytest.raises(lrcr.UnsupportedProgramError, match=fn_name):
      lrcr.hessian_diagonal(loss_fn, params, *batch)
    with pytest.raises(lrcr.UnsupportedProgramError, match=fn_name):
      lrcr.value_grad_and_curvature(loss_fn, params, *batch,
                                    granularity="variable")
    with pytest.raises(lrcr.UnsupportedProgramError, match=fn_name):
      lrcr.per_sample_factors(loss_fn, params, *batch)


# ---------------------------------------------------------------------------
# Complex intermediates and complex weights.
# ---------------------------------------------------------------------------

class Spectral(nn.Module):
  """An FNO-style layer: FFT, complex weights on the low modes, inverse FFT."""
  modes: int = 3

  @nn.compact
  def __call__(self, x):                                  # x [B, N]
    init = nn.initializers.normal(0.5)
    wr = self.param("wr", init, (self.modes,), jnp.float64)
    wi = self.param("wi", init, (self.modes,), jnp.float64)
    spec = jnp.fft.rfft(x, axis=-1)
    low = spec[:, :self.modes] * jax.lax.complex(wr, wi)
    spec = jnp.concatenate([low, jnp.zeros_like(spec[:, self.modes:])], -1)
    h = jnp.fft.irfft(spec, n=x.shape[-1], axis=-1)
    h = jnp.tanh(h + nn.Dense(x.shape[-1], **F64)(x))
    return nn.Dense(3, **F64)(h)


def _realify(tree):
  """Complex leaves as (real, imag) pairs: a real vector for jax.hessian."""
  return jax.tree.map(lambda a: jnp.stack([a.real, a.imag])
                      if jnp.iscomplexobj(a) else a, tree)


def _complexify(tree, like):
  return jax.tree.map(lambda a, l: jax.lax.complex(a[0], a[1])
                      if jnp.iscomplexobj(l) else a, tree, like)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_complex_intermediates_give_a_real_exact_curvature(seed):
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(seed), 3)
    model = Spectral()
    x = jax.random.normal(k[0], (5, 8), jnp.float64)
    y = jax.random.randint(k[1], (5,), 0, 3)
    params = model.init(k[2], x)
    loss_fn = lambda p, x, y: zoo._ce(model.apply(p, x), y)
    _, hess = zoo.dense(loss_fn, params, (x, y))
    for d in (zoo.random_like(params, seed + 1),
              jax.grad(loss_fn)(params, x, y)):
      g = ravel_pytree(d)[0]
      out = lrcr.directional(loss_fn, params, x, y, d)
      assert not jnp.iscomplexobj(out.curvature)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_complex_weights_give_the_second_derivative_along_t(seed):
  """Complex params: slope and curvature are d/dt, d2/dt2 of F(w + t g)."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(seed), 5)
    cplx = lambda a, b: jax.lax.complex(a, b)
    params = {"w": cplx(*jax.random.normal(k[0], (2, 4, 3), jnp.float64)),
              "v": jax.random.normal(k[1], (3,), jnp.float64)}
    x = cplx(*jax.random.normal(k[2], (2, 6, 4), jnp.float64))

    def loss_fn(p, x):
      z = x @ p["w"]                                    # complex [6, 3]
      return jnp.mean(jnp.abs(jnp.tanh(z)) ** 2 @ p["v"]) + jnp.mean(
          jnp.real(z * jnp.conj(z[:, :1])))

    d = {"w": cplx(*jax.random.normal(k[3], (2, 4, 3), jnp.float64)),
         "v": jax.random.normal(k[4], (3,), jnp.float64)}
    flat, unravel = ravel_pytree(_realify(params))
    f = lambda r: loss_fn(_complexify(unravel(r), params), x)
    g = ravel_pytree(_realify(d))[0]
    out = lrcr.directional(loss_fn, params, x, d)
    np.testing.assert_allclose(out.slope, jax.grad(f)(flat) @ g, rtol=RTOL)
    np.testing.assert_allclose(out.curvature, g @ jax.hessian(f)(flat) @ g,
                               rtol=RTOL)
    np.testing.assert_allclose(out.sqnorm, g @ g, rtol=RTOL)
    assert not jnp.iscomplexobj(out.curvature)


def test_complex_or_non_scalar_loss_is_refused():
  params = {"w": jnp.ones((3,))}
  with pytest.raises(ValueError, match="complex"):
    lrcr.value_grad_and_curvature(
        lambda p, x: jnp.sum(x @ p["w"] * 1j), params, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="real scalar"):
    lrcr.value_grad_and_curvature(lambda p, x: x @ p["w"], params,
                                  jnp.ones((2, 3)))


# ---------------------------------------------------------------------------
# Coupled samples: the per-sample quantities refuse, the others stay exact.
# ---------------------------------------------------------------------------

class Scorer(nn.Module):
  outputs: int = 1

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.Dense(6, **F64)(x))
    return nn.Dense(self.outputs, **F64)(h)


def _coupled_problem(name, seed):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (6, 4), jnp.float64)
  if name == "listwise":
    model = Scorer(1)
    relevance = jax.random.uniform(k[1], (6,), jnp.float64)

    def loss(p, x, r):     # ListNet: a softmax over the batch's scores
      scores = model.apply(p, x)[:, 0]
      return -jnp.sum(jax.nn.softmax(r) * jax.nn.log_softmax(scores))

    return loss, zoo._init(model, k[2], x), (x, relevance)
  model = Scorer(3)
  y = jax.random.randint(k[1], (6,), 0, 3)

  def centred(p, x, y):    # logits centred over the batch
    logits = model.apply(p, x)
    return zoo._ce(logits - logits.mean(axis=0), y)

  return centred, zoo._init(model, k[2], x), (x, y)


@pytest.mark.parametrize("name", ["listwise", "centred"])
def test_coupled_samples_are_refused_per_sample_and_exact_globally(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = _coupled_problem(name, 0)
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.hessian_diagonal(loss_fn, params, *batch)
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.value_grad_and_curvature(loss_fn, params, *batch,
                                    granularity="variable")
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.per_sample_factors(loss_fn, params, *batch)
    for averaging in ("mean_alpha", "mean_alpha_g"):
      with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
        lrcr.averaging.averaged_sgd_update(loss_fn, params, *batch,
                                           sigma=1.0, averaging=averaging)
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.averaging.per_sample_own_directional(loss_fn, params, *batch)
    _, hess = zoo.dense(loss_fn, params, batch)
    d = zoo.random_like(params, 3)
    g = ravel_pytree(d)[0]
    out = lrcr.directional(loss_fn, params, *batch, d)
    np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
    blocks = lrcr.value_grad_and_curvature(
        loss_fn, params, *batch, granularity="layer")[2](params, d)
    index, _ = lrcr.types.group_index(params)
    for j, block in enumerate(jax.tree.leaves(blocks.curvature)):
      gk = jnp.concatenate([
          (x if i == j else jnp.zeros_like(x)).ravel()
          for i, x in zip(index, jax.tree.leaves(d))])
      np.testing.assert_allclose(block, gk @ hess @ gk, rtol=RTOL,
                                 atol=1e-14)


def test_separable_losses_keep_their_diagonal():
  """The check does not refuse the per-sample losses the engine covers."""
  with jax.enable_x64(True):
    for name in ("paper_mlp", "cnn", "dense_general"):
      loss_fn, params, batch = zoo.make(name, 0)
      traced = lrcr.engine.trace(loss_fn, params, batch)
      assert lrcr.samples.coupling(traced) is None, name
    for name in ("gru", "attention", "residual_layernorm", "dropout"):
      loss_fn, params, batch = zoo.make(name, 0)
      traced = lrcr.engine.trace(loss_fn, params, batch)
      assert lrcr.samples.coupling(traced) is None, name


# ---------------------------------------------------------------------------
# has_aux: train-mode BatchNorm in the standard way.
# ---------------------------------------------------------------------------

class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dense(6, **F64)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, **F64)(h)
    return nn.Dense(3, **F64)(jnp.tanh(h))


@pytest.mark.parametrize("seed", [0, 1])
def test_has_aux_train_mode_batchnorm_against_the_dense_hessian(seed):
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(seed), 3)
    model = BatchNormNet()
    x = jax.random.normal(k[0], (6, 4), jnp.float64)
    y = jax.random.randint(k[1], (6,), 0, 3)
    variables = model.init(k[2], x)
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(p, x, y):       # one forward pass; new stats through aux
      logits, updates = model.apply({"params": p, "batch_stats": stats}, x,
                                    mutable=["batch_stats"])
      return zoo._ce(logits, y), updates["batch_stats"]

    (loss, aux), grads, cf = lrcr.value_grad_and_curvature(
        loss_fn, params, x, y, has_aux=True)
    (ref_loss, ref_aux), ref_grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(ref_aux)):
      np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(jax.tree.leaves(aux)[0],
                           jax.tree.leaves(stats)[0])
    np.testing.assert_allclose(ravel_pytree(grads)[0],
                               ravel_pytree(ref_grads)[0], rtol=1e-10)
    _, hess = zoo.dense(lambda p, x, y: loss_fn(p, x, y)[0], params, (x, y))
    for d in (zoo.random_like(params, seed), grads):
      g = ravel_pytree(d)[0]
      out = jax.jit(cf)(params, d)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.hessian_diagonal(lambda p, x, y: loss_fn(p, x, y)[0], params,
                            x, y)


def test_a_tuple_returning_loss_points_to_has_aux():
  params = {"w": jnp.ones((3,))}
  loss = lambda p, x: (jnp.sum(x @ p["w"]), x)
  with pytest.raises(ValueError, match="has_aux=True"):
    lrcr.value_grad_and_curvature(loss, params, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="pair"):
    lrcr.value_grad_and_curvature(lambda p, x: jnp.sum(x @ p["w"]), params,
                                  jnp.ones((2, 3)), has_aux=True)


def test_has_aux_with_a_custom_vjp():
  with jax.enable_x64(True):
    loss_fn, params, batch = _mlp_problem("clip_gradient", 0)
    aux_fn = lambda p, *b: (loss_fn(p, *b), {"n": jnp.arange(3)})
    (loss, aux), grads, _ = lrcr.value_grad_and_curvature(
        aux_fn, params, *batch, has_aux=True)
    np.testing.assert_array_equal(aux["n"], jnp.arange(3))
    ref = jax.grad(loss_fn)(params, *batch)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)
    assert loss == loss_fn(params, *batch)


# ---------------------------------------------------------------------------
# Small cases: int leaves, empty params, an empty batch; low precision.
# ---------------------------------------------------------------------------

def test_bad_params_and_batches_are_named():
  loss = lambda p, x: jnp.sum(x @ p["w"])
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match=r"params\['step'\].*int32"):
    lrcr.value_grad_and_curvature(
        loss, {"w": jnp.ones((3,)), "step": jnp.zeros((), jnp.int32)}, x)
  with pytest.raises(ValueError, match="params has no arrays"):
    lrcr.value_grad_and_curvature(lambda p, x: jnp.sum(x), {}, x)
  with pytest.raises(ValueError, match=r"batch\[0\] has shape \(0, 3\)"):
    lrcr.value_grad_and_curvature(loss, {"w": jnp.ones((3,))},
                                  jnp.ones((0, 3)))
  with pytest.raises(ValueError, match=r"batch\[1\]\['y'\]"):
    lrcr.value_grad_and_curvature(
        lambda p, x, b: jnp.sum(x @ p["w"]) + jnp.sum(b["y"]),
        {"w": jnp.ones((3,))}, x, {"y": jnp.ones((0,))})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_accumulate_in_float32(dtype):
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w": jax.random.normal(k[0], (64, 32)).astype(dtype),
            "v": jax.random.normal(k[1], (32, 3)).astype(dtype)}
  x = jax.random.normal(k[2], (16, 64)).astype(dtype)
  loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"]) @ p["v"]) ** 2
  d = jax.tree.map(lambda a: (a * 1.7 + 0.3).astype(dtype), params)
  for granularity in ("global", "layer"):
    out = lrcr.value_grad_and_curvature(loss, params, x,
                                        granularity=granularity)[2](params, d)
    exact = sum(float(np.sum(np.asarray(a, np.float64) ** 2))
                for a in jax.tree.leaves(d))
    for field in out:
      for leaf in jax.tree.leaves(field):
        assert jnp.dtype(leaf.dtype).itemsize >= 4, (granularity, leaf.dtype)
    np.testing.assert_allclose(sum(jax.tree.leaves(out.sqnorm)), exact,
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# per_sample_factors: grouped and depthwise convolutions, tied embeddings.
# ---------------------------------------------------------------------------

class GroupedConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), **F64)(x)
    x = jax.nn.relu(nn.Conv(8, (2, 2), feature_group_count=2, **F64)(x))
    x = jax.nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, **F64)(x))
    return nn.Dense(3, **F64)(x.reshape(x.shape[0], -1))


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 6, **F64)
    h = jnp.tanh(nn.Dense(6, **F64)(embed(tokens)))
    return embed.attend(h)                         # [B, T, vocab]


def _per_sample_grads(loss_fn, params, batch):
  """The reference: one jitted program of vmapped per-sample gradients."""
  def one(*sample):
    return jax.grad(loss_fn)(params, *[s[None] for s in sample])
  return jax.jit(jax.vmap(one))(*batch)


def _names(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_grouped_and_depthwise_conv_factors():
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 3)
    model = GroupedConvs()
    x = jax.random.normal(k[0], (4, 6, 6, 2), jnp.float64)
    y = jax.random.randint(k[1], (4,), 0, 3)
    params = model.init(k[2], x)
    loss_fn = lambda p, x, y: zoo._ce(model.apply(p, x), y)
    found = lrcr.per_sample_factors(loss_fn, params, x, y)
    ref = dict(zip(_names(params),
                   jax.tree.leaves(_per_sample_grads(loss_fn, params, (x, y)))))
    kernels = [n for n in ref if n.endswith("kernel")]
    assert set(kernels) == set(found.factors)
    for name in kernels:
      (f,) = found.factors[name]
      np.testing.assert_allclose(4 * f.sample_gradients(), ref[name],
                                 rtol=1e-10, atol=1e-13, err_msg=name)
    assert set(found.unfactored) == {n for n in ref if n.endswith("bias")}


def test_tied_embedding_is_named_not_dropped():
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 3)
    model = TiedLM()
    tokens = jax.random.randint(k[0], (3, 5), 0, 11)
    target = jax.random.randint(k[1], (3, 5), 0, 11)
    params = model.init(k[2], tokens)
    loss_fn = lambda p, t, y: zoo._ce(model.apply(p, t), y)
    found = lrcr.per_sample_factors(loss_fn, params, tokens, target)
    names = set(_names(params))
    assert set(found.factors) | set(found.unfactored) == names
    assert "params/Embed_0/embedding" in found.unfactored
    assert "params/Dense_0/kernel" in found.factors


def test_the_sample_axis_is_followed_through_the_program():
  """lrcr.samples on small programs: separable ones pass, coupled are named."""
  w = {"w": jnp.ones((4, 3)), "m": jnp.ones((6, 3, 3))}
  x = jnp.arange(24.0).reshape(6, 4) / 24
  y = jnp.arange(6) % 3

  def coupling(loss):
    return lrcr.samples.coupling(lrcr.engine.trace(loss, w, (x, y)))

  ce = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y)
  separable = {
      "mean": lambda p, x, y: ce(x @ p["w"], y).mean(),
      "sum of squares": lambda p, x, y: jnp.sum((x @ p["w"]) ** 2),
      "per-row block": lambda p, x, y: ce(
          jnp.einsum("bi,bij->bj", jnp.tanh(x @ p["w"]), p["m"]), y).mean(),
      "transposed": lambda p, x, y: jnp.sum(jnp.tanh((x @ p["w"]).T) * 2.0),
      "softmax over classes": lambda p, x, y: -jnp.mean(jnp.take_along_axis(
          jax.nn.log_softmax(x @ p["w"], axis=-1), y[:, None], axis=-1)),
  }
  for name, loss in separable.items():
    assert coupling(loss) is None, name
  coupled = {
      "softmax over the batch": (lambda p, x, y: -jnp.sum(
          jax.nn.log_softmax((x @ p["w"])[:, 0])), "reduce_max"),
      "square of a sum": (lambda p, x, y: jnp.sum(x @ p["w"]) ** 2,
                          "integer_pow"),
      "batch statistics": (lambda p, x, y: ce(
          (x @ p["w"]) / jnp.std(x @ p["w"], axis=0), y).mean(), "sub"),
      "sort over samples": (lambda p, x, y: jnp.sum(
          jnp.sort((x @ p["w"])[:, 0]) * jnp.arange(6.0)), "sort"),
      "mixing rows": (lambda p, x, y: jnp.sum(
          jnp.tanh(p["w"].T @ x.T @ x)), "dot_general"),
  }
  for name, (loss, prim) in coupled.items():
    why = coupling(loss)
    assert why is not None and f"`{prim}`" in why, (name, why)


def test_data_only_coupling_is_a_constant_of_the_terms():
  """A masked mean or inputs centred over the batch: separable in params,
  so the diagonal is exact; not the loss on one sample alone, so the
  per-sample averagings (strict) refuse."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 3)
    model = Scorer(3)
    x = jax.random.normal(k[0], (6, 4), jnp.float64)
    y = jax.random.randint(k[1], (6,), 0, 3)
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    params = zoo._init(model, k[2], x)

    def masked(p, x, y, m):
      per = optax.softmax_cross_entropy_with_integer_labels(
          model.apply(p, x - x.mean(axis=0)), y)
      return jnp.sum(per * m) / jnp.sum(m)

    traced = lrcr.engine.trace(masked, params, (x, y, mask))
    assert lrcr.samples.coupling(traced) is None
    assert lrcr.samples.coupling(traced, strict=True) is not None
    _, hess = zoo.dense(masked, params, (x, y, mask))
    diag = lrcr.hessian_diagonal(masked, params, x, y, mask)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(hess),
                               rtol=RTOL, atol=1e-14)
    with pytest.raises(lrcr.UnsupportedProgramError, match="couples"):
      lrcr.averaging.averaged_sgd_update(masked, params, x, y, mask,
                                         sigma=1.0, averaging="mean_alpha")
