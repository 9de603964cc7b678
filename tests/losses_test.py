"""cross_entropy_loss: F of eqs. 14-16, and what it does with bad labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrcr

LOGITS = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [2.0, -1.0, 0.5]])
LABELS = jnp.array([0, 2, 1])


def test_matches_optax_on_valid_labels():
  loss = lrcr.cross_entropy_loss(LOGITS, LABELS)
  ref = optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS).mean()
  assert float(loss) == float(ref)
  grad = jax.grad(lrcr.cross_entropy_loss)(LOGITS, LABELS)
  ref_grad = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, LABELS).mean())(LOGITS)
  np.testing.assert_array_equal(grad, ref_grad)


@pytest.mark.parametrize("labels, shown", [
    (np.array([0, 3, 1]), "[3]"),            # == C
    (np.array([0, 2, 13]), "[13]"),          # y + 10
    (jnp.array([-1, 2, 1]), "[-1]"),         # used to wrap around to C - 1
])
def test_concrete_out_of_range_labels_are_refused(labels, shown):
  """Issue 4: -1 wrapped around, and >= C gave a NaN loss without a word."""
  with pytest.raises(ValueError) as e:
    lrcr.cross_entropy_loss(LOGITS, labels)
  message = str(e.value)
  assert "[0, 3)" in message and "3 classes" in message and shown in message
  assert "num_classes" in message            # what to do
  # Closed over (concrete) inside grad or jit, the labels are checked too.
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    jax.grad(lambda z: lrcr.cross_entropy_loss(z, labels))(LOGITS)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    jax.jit(lambda z: lrcr.cross_entropy_loss(z, labels))(LOGITS)


def test_empty_batch_and_mismatched_shapes_are_refused():
  # Issue 4: batch size 0 gave NaN. Shapes are static: refused under jit too.
  for fn in (lrcr.cross_entropy_loss, jax.jit(lrcr.cross_entropy_loss)):
    with pytest.raises(ValueError, match="empty batch"):
      fn(jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"expected labels of shape \(3,\)"):
      fn(LOGITS, jnp.zeros((3, 1), jnp.int32))


@pytest.mark.parametrize("bad", [3, 13, -1])
def test_traced_out_of_range_labels_give_nan_everywhere(bad):
  """Documented: under jit labels are not checked; the loss and everything
  differentiated from it is NaN, never a finite wrong number."""
  labels = LABELS.at[1].set(bad)
  loss, grad = jax.jit(jax.value_and_grad(lrcr.cross_entropy_loss))(
      LOGITS, labels)
  assert np.isnan(float(loss))
  assert np.all(np.isnan(np.asarray(grad[1])))          # the bad sample
  # Through a network: every weight's gradient, the slope and the curvature.
  model = lrcr.MLP([4], 3)
  x = jax.random.normal(jax.random.key(0), (3, 2))
  params = model.init(jax.random.key(1), x)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)

  @jax.jit
  def derived(y):
    grads = jax.grad(loss_fn)(params, x, y)
    d = lrcr.autodiff_curvature_fn(loss_fn, x, y)(params, grads)
    return grads, d

  grads, d = derived(labels)
  # The logits' weights see every sample; a ReLU unit that the bad sample
  # leaves off passes it no gradient.
  assert bool(jnp.all(jnp.isnan(grads["params"]["output"]["kernel"])))
  assert np.isnan(float(d.slope)) and np.isnan(float(d.curvature))
  grads, d = derived(LABELS)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert np.isfinite(float(d.slope)) and np.isfinite(float(d.curvature))
