"""The engine's compiled CR step, counted in XLA kernels (no timing).

Kernels (`experiments.bench.count_kernels`) and XLA's flop count are
deterministic for a given jax/XLA version on a given backend: the levels
below are those of jax 0.10.2 on the CPU. A new XLA may fuse differently:
then measure again (`python -m experiments.bench_parts`) and set the levels
to what it gives, if the comparisons still hold.
"""

import jax
import jax.numpy as jnp
import pytest

import lrcr
from experiments import bench

#: (batch, gradient_direction) -> most kernels of the engine's CR step on the
#: six-layer net below: the Gram form at batch 4 (gradient_direction=True),
#: the dense sweep otherwise.
LEVELS = {(4, True): 79, (4, False): 87, (64, True): 92, (64, False): 97}


def _net(batch):
  model = lrcr.MLP((16,) * 6, 5, kernel_init=lrcr.uniform_init(0.3))
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (batch, 12), jnp.float32)
  y = jax.random.randint(k[1], (batch,), 0, 5)
  params = model.init(k[2], x)["params"]
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(
      model.apply({"params": p}, x), y)
  return loss_fn, params, x, y


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return bench.count_kernels(compiled.as_text()), bench.flops(compiled)


def _steps(loss_fn, gradient_direction):
  """(engine, forward-over-forward): loss, the point moved by g = -0.1 grad F
  (the gradient is consumed, as in a step, not returned), and the three
  scalars along g, as the CR step needs them."""

  def engine(p, x, y):
    loss, g, curvature_fn = lrcr.value_grad_and_curvature(
        loss_fn, p, x, y, gradient_direction=gradient_direction)
    g = jax.tree.map(lambda a: -0.1 * a, g)
    return loss, jax.tree.map(jnp.add, p, g), curvature_fn(p, g)

  def fwd_over_fwd(p, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    g = jax.tree.map(lambda a: -0.1 * a, g)
    return loss, jax.tree.map(jnp.add, p, g), lrcr.autodiff_directional(
        lambda q: loss_fn(q, x, y), p, g)

  return engine, fwd_over_fwd


@pytest.mark.parametrize("batch,gradient_direction", sorted(LEVELS))
def test_engine_kernels_stay_at_their_level(batch, gradient_direction):
  loss_fn, params, x, y = _net(batch)
  engine, _ = _steps(loss_fn, gradient_direction)
  kernels, _ = _compiled(engine, params, x, y)
  level = LEVELS[batch, gradient_direction]
  assert kernels <= level, (
      f"the engine's CR step launches {kernels} kernels, more than the "
      f"{level} it reached (batch {batch}, gradient_direction="
      f"{gradient_direction}); see `python -m experiments.bench_parts`.")


@pytest.mark.parametrize("batch", [4, 64])
def test_engine_launches_fewer_kernels_than_forward_over_forward(batch):
  loss_fn, params, x, y = _net(batch)
  engine, fwd_over_fwd = _steps(loss_fn, True)
  grad = lambda p, x, y: jax.value_and_grad(loss_fn)(p, x, y)
  base, base_flops = _compiled(grad, params, x, y)
  ours, our_flops = _compiled(engine, params, x, y)
  theirs, their_flops = _compiled(fwd_over_fwd, params, x, y)
  # Fewer kernels and no more flops; in the Gram form (batch 4), beyond the
  # gradient pass that both share, at most 36 of forward-over-forward's 55.
  assert ours < theirs, (ours, theirs)
  if batch == 4:
    assert ours - base <= 36 / 55 * (theirs - base), (ours, theirs, base)
  assert our_flops <= their_flops, (our_flops, their_flops)


@pytest.mark.parametrize("gradient_direction", [True, False])
def test_cr_step_writes_no_copy_of_the_direction(gradient_direction):
  """The compiled CR-SGD step's temporary memory over SGD's stays below 1.5x
  the params' bytes on the paper's 12x128 net at batch 32 (XLA's memory
  analysis, deterministic). Reducing ||g||^2 or max |g| over the leaves
  concatenated into one buffer wrote a copy of the direction and took it to
  about 4x."""
  model, params, x, y = bench.make_problem(128, 12, 32)
  name = "cr_sgd_engine_gram" if gradient_direction else "cr_sgd_engine"
  steps = bench.make_steps(model, 32, names=["sgd", name])
  temp = {}
  for key in ("sgd", name):
    v = steps[key]
    compiled = jax.jit(v.step).lower(params, v.tx.init(params), x, y).compile()
    temp[key] = compiled.memory_analysis().temp_size_in_bytes
  size = sum(a.nbytes for a in jax.tree.leaves(params))
  assert temp[name] - temp["sgd"] < 1.5 * size, (temp, size)


#: batch -> most kernels of the whole CR-SGD step on the six-layer net:
#: optax.chain(optax.sgd, scale_by_cubic_step) with gradient_direction=True;
#: lrcr.cubic_sgd (on the engine's own gradient) without it, with it, and
#: with it and stack_layers=True; and the SGD step they extend.
STEP_LEVELS = {4: (81, 78, 78, 74, 47), 64: (92, 89, 89, 82, 47)}


@pytest.mark.parametrize("batch", sorted(STEP_LEVELS))
def test_whole_cr_sgd_step_stays_at_its_level(batch):
  """The curvature_fn picks its own exponent (`autoscaled`): no search for
  the direction's largest entry, and the sweep runs along grad F. After
  cubic_sgd, which hands it its own gradient, no pass over the direction
  for its multiple of grad F either; with stack_layers=True in the Gram
  form (batch 4), the stacked layers' gradients are one batched matmul."""
  import optax   # pylint: disable=import-outside-toplevel
  loss_fn, params, x, y = _net(batch)
  sgd = optax.sgd(0.02)

  def cr_step(tx, gradient_direction, stack_layers=False):
    def step(p, x, y):
      _, g, fn = lrcr.value_grad_and_curvature(
          loss_fn, p, x, y, gradient_direction=gradient_direction,
          stack_layers=stack_layers)
      u, _ = tx.update(g, tx.init(p), p, curvature_fn=fn)
      return optax.apply_updates(p, u)
    return step

  def sgd_step(p, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    return optax.apply_updates(p, sgd.update(g, sgd.init(p), p)[0])

  *levels, sgd_level = STEP_LEVELS[batch]
  assert _compiled(sgd_step, params, x, y)[0] <= sgd_level
  chain = optax.chain(sgd, lrcr.scale_by_cubic_step(100.0))
  fused = lrcr.cubic_sgd(100.0, 0.02)
  steps = (cr_step(chain, True), cr_step(fused, False), cr_step(fused, True),
           cr_step(fused, True, True))
  for step, level in zip(steps, levels):
    kernels = _compiled(step, params, x, y)[0]
    assert kernels <= level, (
        f"the CR-SGD step launches {kernels} kernels, more than the {level} "
        f"it reached (batch {batch}); see `python -m "
        f"experiments.bench_parts`.")
