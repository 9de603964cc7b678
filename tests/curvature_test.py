"""Per-sample factors found in the program, against per-sample autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcr
from tests import zoo


def _per_sample_grads(loss_fn, params, batch, size):
  """vmap(grad) of the loss on a batch of one: the independent reference."""
  axes = [0 if getattr(b, "ndim", 0) and b.shape[0] == size else None
          for b in batch]

  def one(*sample):
    single = [s[None] if a == 0 else s for s, a in zip(sample, axes)]
    return jax.grad(loss_fn)(params, *single)

  return jax.vmap(one, in_axes=axes)(*batch)


@pytest.mark.parametrize("name", ["paper_mlp", "smooth_mlp", "cnn",
                                  "residual_layernorm", "gru", "attention"])
def test_factors_rebuild_per_sample_gradients(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, 1)
    size = batch[0].shape[0]
    factors = lrcr.per_sample_factors(loss_fn, params, *batch).factors
    ref = _per_sample_grads(loss_fn, params, batch, size)
    flat_ref = dict(zip(
        ["/".join(str(getattr(k, "key", k)) for k in path)
         for path, _ in jax.tree_util.tree_flatten_with_path(ref)[0]],
        jax.tree.leaves(ref)))
    assert factors, name
    for path, entries in factors.items():
      # A mean loss: the per-sample gradient is B times the sample's term;
      # a weight read by several operations sums their terms.
      rebuilt = size * sum(f.sample_gradients() for f in entries)
      np.testing.assert_allclose(rebuilt, flat_ref[path], rtol=1e-10,
                                 atol=1e-13, err_msg=f"{name} {path}")
      for f in entries:
        assert f.inputs.shape[:2] == f.adjoints.shape[:2]
        assert f.inputs.shape[0] == size
    # Every dense and convolution kernel of the model is found.
    kernels = [p for p in flat_ref if p.endswith("kernel")]
    assert set(kernels) <= set(factors), (name, set(kernels) - set(factors))


class _WideConv(nn.Module):
  """16 channels out of 8 on 3x3 images: 4 output pixels."""

  @nn.compact
  def __call__(self, x):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    h = jax.nn.relu(nn.Conv(16, (2, 2), padding="VALID", **f64)(x))
    return nn.Dense(3, **f64)(h.reshape(x.shape[0], -1))


def test_dense_factors_are_rank_one_and_conv_factors_rank_bounded():
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make("cnn", 0)
    factors = lrcr.per_sample_factors(loss_fn, params, *batch).factors
    for path, (f,) in factors.items():
      g = f.sample_gradients()
      positions = f.inputs.shape[1]
      flat = g.reshape(g.shape[0], -1, g.shape[-1])
      ranks = [np.linalg.matrix_rank(np.asarray(m), tol=1e-10) for m in flat]
      assert max(ranks) <= positions, path
      if "Dense" in path:
        assert positions == 1 and max(ranks) == 1
    # Above, each convolution's P exceeds min(d_in, d_out) and cannot bind.
    # A wide convolution on a 3x3 image has P = 4 output pixels < min(d_in,
    # d_out) = 16: each sample's kernel gradient (by per-sample autodiff,
    # which the factors rebuild) has rank 4, the factors' number of rank-1
    # terms.
    model = _WideConv()
    x = jax.random.normal(jax.random.key(0), (3, 3, 3, 8), jnp.float64)
    y = jnp.arange(3)
    params = model.init(jax.random.key(1), x)
    loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
    (f,) = lrcr.per_sample_factors(loss_fn, params, x, y).factors[
        "params/Conv_0/kernel"]
    ref = _per_sample_grads(loss_fn, params, (x, y), 3)
    ref = ref["params"]["Conv_0"]["kernel"]             # [B, 2, 2, 8, 16]
    np.testing.assert_allclose(3 * f.sample_gradients(), ref, rtol=1e-10,
                               atol=1e-13)
    assert f.inputs.shape[1] == 4
    ranks = [np.linalg.matrix_rank(np.asarray(m).reshape(-1, 16), tol=1e-10)
             for m in ref]
    assert ranks == [4, 4, 4]


def test_recurrent_factors_run_over_time():
  """Inside nn.RNN's scan the factors are stacked over the time steps."""
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make("gru", 0)
    factors = lrcr.per_sample_factors(loss_fn, params, *batch).factors
    steps = batch[0].shape[1]
    cell = [p for p in factors if "GRUCell" in p or "RNN" in p]
    assert cell
    for path in cell:
      for f in factors[path]:
        assert f.inputs.shape[1] == steps, path


def test_model_form_for_the_paper_mlp():
  with jax.enable_x64(True):
    loss_fn, params, (x, y) = zoo.make("paper_mlp", 2)
    model = lrcr.MLP((6, 5, 4), 3)
    a = lrcr.per_sample_factors(model, params, x, y).factors
    b = lrcr.per_sample_factors(loss_fn, params, x, y).factors
    assert list(a) == ["params/hidden_0/kernel", "params/hidden_1/kernel",
                       "params/hidden_2/kernel", "params/output/kernel"]
    for k in a:
      np.testing.assert_allclose(a[k][0].adjoints, b[k][0].adjoints)


@pytest.mark.parametrize("name,seed", [("paper_mlp", 0), ("cnn", 1)])
def test_directional_and_autodiff_directional_share_one_argument_order(
    name, seed):
  """(loss_fn, params, *batch, direction) for both, against the dense Hessian."""
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, seed)
    d = zoo.random_like(params, seed + 7)
    grads, hess = zoo.dense(loss_fn, params, batch)
    g = jax.flatten_util.ravel_pytree(d)[0]
    for fn in (lrcr.directional, lrcr.autodiff_directional):
      out = fn(loss_fn, params, *batch, d)
      np.testing.assert_allclose(out.slope, g @ grads, rtol=1e-10)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=1e-10)
      np.testing.assert_allclose(out.sqnorm, g @ g, rtol=1e-10)
    with pytest.raises(TypeError, match="needs a direction"):
      lrcr.autodiff_directional(loss_fn, params)
