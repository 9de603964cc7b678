"""experiments.models: the CNN and RNN compute what their docstrings say."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import lrcr
from experiments import models


def _model_config(**values):
  config = ml_collections.ConfigDict(dict(
      kind="mlp", depth=2, width=8, init_scale=0.3, use_bias=False,
      activation="relu", input_shape=()))
  config.update(values)
  return config


def test_rnn_is_the_recurrence_of_eq_58():
  model = models.make_model(_model_config(kind="rnn", activation="tanh",
                                          use_bias=True), 10)
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))          # [B, T, d]
  params = model.init(jax.random.key(1), x)["params"]
  cell = params["SimpleCell_0"]
  v, w, b = cell["i"]["kernel"], cell["h"]["kernel"], cell["i"]["bias"]
  state = jnp.zeros((3, 8))
  for t in range(5):            # v_t = tanh(x_t V + b + v_{t-1} W)
    state = jnp.tanh(x[:, t] @ v + b + state @ w)
  dense = params["Dense_0"]
  expected = state @ dense["kernel"] + dense["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), expected,
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(v).max()) <= 0.3   # U(-init_scale, init_scale)


def test_cnn_pools_where_told():
  model = models.make_model(_model_config(
      kind="cnn", conv_features=(2, 3, 4), pool_after=(0, 2),
      dense_features=(5,)), 10)
  x = jnp.ones((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x).shape == (2, 10)
  # 8x8 pooled twice is 2x2: the first dense layer takes 2 * 2 * 4 inputs.
  assert params["Dense_0"]["kernel"].shape == (16, 5)
  assert "bias" not in params["Conv_0"]


def test_mlp_is_the_papers_network():
  model = models.make_model(_model_config(), 10)
  assert isinstance(model, lrcr.MLP)
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  assert lrcr.num_params(params) == 6 * 8 + 8 * 8 + 8 * 10


@pytest.mark.parametrize("values", [{"kind": "sequential"},
                                    {"activation": "swish"}])
def test_unknown_kinds_are_refused(values):
  with pytest.raises(ValueError, match="expected a kind among mlp, cnn, rnn"):
    models.make_model(_model_config(**values), 10)
