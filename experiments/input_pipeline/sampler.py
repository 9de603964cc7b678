"""Batches: a stateless sampler.

Epoch e is the permutation of the N example indices drawn from (key, e), cut
into N // B batches of B (the last N mod B indices of each permutation are
left out that epoch). The batch of step t is therefore a function of t alone:
slice t mod (N // B) of epoch t // (N // B), and a resumed run sees the
batches an uninterrupted one would.
"""

from typing import Any

import jax
import jax.numpy as jnp


def batch_indices(data_key: Any, step: Any, num_examples: int,
                  batch_size: int) -> Any:
  """The example indices [B] of the batch of `step` (a Python or traced int)."""
  epoch, offset = epoch_and_offset(step, num_examples, batch_size)
  perm = permutation(data_key, epoch, num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)


def epoch_and_offset(step: Any, num_examples: int, batch_size: int):
  """(epoch, first row in its permutation) of the batch of `step`."""
  steps_per_epoch = num_examples // batch_size
  step = jnp.asarray(step, jnp.int32)
  return step // steps_per_epoch, (step % steps_per_epoch) * batch_size


def permutation(data_key: Any, epoch: Any, num_examples: int) -> Any:
  """The int32 permutation [N] of `epoch`."""
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples).astype(jnp.int32)
