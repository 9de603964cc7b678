"""Per-sample low-rank factors (eqs. 19, 23, 27-28) against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcr
from tests import reference


def _forward_with_offsets(model, params, x, offsets):
  """Logits of one sample with `offsets[k]` added to z_k: an independent forward."""
  inner = params["params"]
  v = x
  for k in range(len(model.hidden_sizes)):
    layer = inner[f"hidden_{k}"]
    z = v @ layer["kernel"] + layer.get("bias", 0.0) + offsets[k]
    v = model.activation(z)
  out = inner["output"]
  return v @ out["kernel"] + out.get("bias", 0.0)


@pytest.mark.parametrize("act,bias,hidden", [
    (jax.nn.relu, False, (5, 3, 4)), (jnp.tanh, True, (4, 6)),
    (jax.nn.softplus, False, (3,)), (jax.nn.gelu, True, (2, 5, 3, 4))])
def test_factors_match_autodiff(act, bias, hidden):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(4, hidden, 5, 6, 3,
                                                 activation=act, use_bias=bias)
    fac = lrcr.per_sample_factors(model, params, x, y)
    zeros = [jnp.zeros(w) for w in hidden]
    for i in range(x.shape[0]):
      jac = jax.jacfwd(lambda o: _forward_with_offsets(model, params, x[i], o))(zeros)
      for k in range(len(hidden)):
        np.testing.assert_allclose(fac.jacobians[k][i], jac[k], rtol=1e-12,
                                   atol=1e-14)
      p = _forward_with_offsets(model, params, x[i], zeros)
      f = lambda p: -jax.nn.log_softmax(p)[y[i]]
      np.testing.assert_allclose(fac.loss_grad[i], jax.grad(f)(p), atol=1e-14)
      np.testing.assert_allclose(fac.loss_hess[i], jax.hessian(f)(p), atol=1e-14)
    # gamma (eq. 19) and A'' against elementwise autodiff of A at z_k.
    v = x
    for k in range(len(hidden)):
      np.testing.assert_allclose(fac.inputs[k], v, atol=1e-14)
      layer = params["params"][f"hidden_{k}"]
      z = v @ layer["kernel"] + layer.get("bias", 0.0)
      d1 = jax.vmap(jax.vmap(jax.grad(act)))(z)
      d2 = jax.vmap(jax.vmap(jax.grad(jax.grad(act))))(z)
      np.testing.assert_allclose(fac.act_grads[k], d1, atol=1e-14)
      np.testing.assert_allclose(fac.act_second[k], d2, atol=1e-12)
      v = act(z)


@pytest.mark.parametrize("bias", [False, True])
def test_per_sample_gradients_are_rank_one_outer_products(bias):
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(7, (6, 5, 7), 4, 9, 8,
                                                 use_bias=bias)
    fac = lrcr.per_sample_factors(model, params, x, y)
    rebuilt = lrcr.factor_gradients(fac, use_bias=bias)
    loss_i = lambda p, xi, yi: lrcr.cross_entropy_loss(model.apply(p, xi[None]),
                                                       yi[None])
    per_sample = jax.vmap(jax.grad(loss_i), in_axes=(None, 0, 0))(params, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13),
                 rebuilt, per_sample["params"])
    for name, g in per_sample["params"].items():
      ranks = np.linalg.matrix_rank(np.asarray(g["kernel"]), tol=1e-10)
      assert np.all(ranks <= 1), (name, ranks)          # eqs. 27-28
      assert np.sum(ranks == 1) >= 5
      batch = np.asarray(g["kernel"]).mean(0)           # grad of F = E[f]
      assert np.linalg.matrix_rank(batch, tol=1e-10) > 1, name


def test_factors_under_jit_and_float32_paper_shapes():
  model = lrcr.MLP([128] * 12, 10, kernel_init=lrcr.uniform_init(0.1))
  x = jax.random.uniform(jax.random.key(0), (4, 784))
  y = jnp.arange(4)
  params = model.init(jax.random.key(1), x)
  fac = lrcr.per_sample_factors(model, params, x, y)
  assert len(fac.inputs) == 13 and len(fac.jacobians) == 12
  assert fac.jacobians[0].shape == (4, 10, 128)
  assert fac.loss_hess.shape == (4, 10, 10)
  assert fac.inputs[0].dtype == jnp.float32
