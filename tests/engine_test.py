"""The engine against a dense jax.hessian in float64, on a zoo of flax models."""

import flax
import jax
import jax.flatten_util  # noqa: F401  (ravel_pytree)
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import lrcr
from tests import reference
from tests import zoo

RTOL = 1e-10


def _directions(params, grads, seed):
  return {"random": zoo.random_like(params, seed),
          "+grad": grads,                               # not a descent direction
          "-grad": jax.tree.map(lambda g: -0.7 * g, grads)}


@pytest.mark.parametrize("name,seed", [(n, 0) for n in zoo.NAMES] +
                         [("paper_mlp", 1), ("cnn", 1), ("gru", 1),
                          ("dense_general", 0)])
def test_slope_curvature_and_blocks_match_dense(name, seed):
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, seed)
    grad_ref, hess = zoo.dense(loss_fn, params, batch)
    fn = jax.jit(lambda p, d, *b: lrcr.value_grad_and_curvature(
        loss_fn, p, *b)[2](p, d))
    layer_fn = jax.jit(lambda p, d, *b: lrcr.value_grad_and_curvature(
        loss_fn, p, *b, granularity="layer")[2](p, d))
    loss, grads, _ = lrcr.value_grad_and_curvature(loss_fn, params, *batch)
    np.testing.assert_allclose(loss, loss_fn(params, *batch), rtol=RTOL)
    np.testing.assert_allclose(ravel_pytree(grads)[0], grad_ref, rtol=RTOL,
                               atol=1e-14)
    for kind, d in _directions(params, grads, seed + 7).items():
      g = ravel_pytree(d)[0]
      out = fn(params, d, *batch)
      exact = g @ hess @ g
      assert abs(float(exact)) > 1e-8, (name, kind)
      np.testing.assert_allclose(out.slope, g @ grad_ref, rtol=RTOL,
                                 err_msg=f"{name} {kind}")
      np.testing.assert_allclose(out.curvature, exact, rtol=RTOL,
                                 err_msg=f"{name} {kind}")
      np.testing.assert_allclose(out.sqnorm, g @ g, rtol=RTOL)
      # Per param group (one flax module): g_k^T H_kk g_k.
      blocks = layer_fn(params, d, *batch)
      index, gtree = lrcr.types.group_index(params)
      leaves = jax.tree.leaves(d)
      for j, block in enumerate(jax.tree.leaves(blocks.curvature)):
        masked = jax.tree.unflatten(
            jax.tree.structure(d),
            [x if i == j else jnp.zeros_like(x) for i, x in zip(index, leaves)])
        gk = ravel_pytree(masked)[0]
        np.testing.assert_allclose(block, gk @ hess @ gk, rtol=1e-9,
                                   atol=1e-13, err_msg=f"{name} block {j}")
      np.testing.assert_allclose(sum(jax.tree.leaves(blocks.slope)),
                                 out.slope, rtol=1e-10)


@pytest.mark.parametrize("name", ["paper_mlp", "cnn", "cnn_mse",
                                  "dense_general"])
def test_hessian_diagonal_matches_dense(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, 3)
    _, hess = zoo.dense(loss_fn, params, batch)
    diag = jax.jit(lambda p, *b: lrcr.hessian_diagonal(loss_fn, p, *b))(
        params, *batch)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(hess),
                               rtol=RTOL, atol=1e-14)
    # The "variable" granularity is built on it.
    d = zoo.random_like(params, 4)
    _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, *batch,
                                                 granularity="variable")
    out = cf(params, d)
    g = ravel_pytree(d)[0]
    np.testing.assert_allclose(ravel_pytree(out.curvature)[0],
                               g * g * jnp.diag(hess), rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(ravel_pytree(out.slope)[0],
                               g * ravel_pytree(grads)[0], rtol=RTOL)


@pytest.mark.parametrize("name", ["smooth_mlp", "attention", "gru",
                                  "smooth_mlp_smoothed_l2"])
def test_diagonal_refuses_what_it_cannot_compute_exactly(name):
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, 0)
    with pytest.raises(lrcr.UnsupportedProgramError,
                       match="granularity 'layer' or 'global'"):
      lrcr.hessian_diagonal(loss_fn, params, *batch)


def _mlp64(hidden, input_dim, batch, seed, activation=jax.nn.relu):
  """(loss_fn, params, x, y): a float64 MLP with biases, 5 classes (call
  under jax.enable_x64)."""
  model = lrcr.MLP(hidden, 5, activation=activation,
                   kernel_init=lrcr.uniform_init(0.6), use_bias=True)
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (batch, input_dim), jnp.float64)
  y = jax.random.randint(k[1], (batch,), 0, 5)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        model.init(k[2], x))["params"]
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(
      model.apply({"params": p}, x), y)
  return loss_fn, params, x, y


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", ["paper_mlp", "residual_layernorm",
                                  "attention", "gru"])
def test_gram_form_for_gradient_directions(name, batch_size):
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import curvature, sweep
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make(name, 2)
    batch = tuple(b[:batch_size] for b in batch)
    if batch_size == 1:     # some weight operation takes the Gram form
      ps = curvature._gradient_pass(lrcr.engine.trace(loss_fn, params, batch), params)
      assert sweep.gram_operations(ps), name
    _, hess = zoo.dense(loss_fn, params, batch)
    _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, *batch,
                                                 gradient_direction=True)
    d = jax.tree.map(lambda g: -0.3 * g, grads)
    g = ravel_pytree(d)[0]
    np.testing.assert_allclose(cf(params, d).curvature, g @ hess @ g,
                               rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_gram_products_against_the_dense_hessian(seed, act):
  """Batch smaller than the widths: the weights go through the Gram form."""
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import curvature, sweep
  with jax.enable_x64(True):
    loss_fn, params, x, y = _mlp64((16, 12), 7, 3, seed,
                                   getattr(jax.nn, act))
    # Every weight operation takes the Gram form here.
    ps = curvature._gradient_pass(lrcr.engine.trace(loss_fn, params, (x, y)), params)
    assert len(sweep.gram_operations(ps)) == 3
    grads, hess = zoo.dense(loss_fn, params, (x, y))
    _, g_tree, cf = lrcr.value_grad_and_curvature(loss_fn, params, x, y,
                                                  gradient_direction=True)
    for c in (-0.7, 2.0**-40, 3.0):
      d = jax.tree.map(lambda g: c * g, g_tree)
      g = ravel_pytree(d)[0]
      out = cf(params, d)
      np.testing.assert_allclose(out.slope, g @ grads, rtol=RTOL)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
      np.testing.assert_allclose(out.sqnorm, g @ g, rtol=RTOL)
      for e in (-3, 7):   # the transform's power-of-two hand-off
        scaled = cf.fn(params, d, e)
        np.testing.assert_allclose(scaled.curvature,
                                   g @ hess @ g * 2.0 ** (-2 * e), rtol=RTOL)
        np.testing.assert_allclose(scaled.slope, g @ grads * 2.0 ** -e,
                                   rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [3, 40])      # Gram form / dense sweep
def test_autoscaled_against_the_dense_hessian(seed, batch):
  """gradient_direction=True: `autoscaled` picks its own exponent e and
  returns the Directional of g 2^-e, exact, for directions c grad F with c
  from 1e-30 to 1e30; |g 2^-e| is of order 1 (||g 2^-e||^2 in [1/16, 1))."""
  with jax.enable_x64(True):
    loss_fn, params, x, y = _mlp64((16, 12), 7, batch, seed)
    grads, hess = zoo.dense(loss_fn, params, (x, y))
    _, g_tree, cf = lrcr.value_grad_and_curvature(loss_fn, params, x, y,
                                                  gradient_direction=True)
    assert cf.autoscaled is not None
    for c in (-0.7, 3.0, -1e-30, 1e30, 2.0**-40):
      d = jax.tree.map(lambda g: c * g, g_tree)
      g = ravel_pytree(d)[0]
      out, e = jax.jit(cf.autoscaled)(params, d)
      e = int(e)
      np.testing.assert_allclose(out.slope * 2.0**e, g @ grads, rtol=RTOL)
      np.testing.assert_allclose(out.curvature * 4.0**e, g @ hess @ g,
                                 rtol=RTOL)
      np.testing.assert_allclose(out.sqnorm * 4.0**e, g @ g, rtol=RTOL)
      assert 1 / 16 <= float(out.sqnorm) < 1, (c, float(out.sqnorm))


def test_checkpointed_blocks_are_read_through():
  """jax.checkpoint (`remat2`) is inlined like a jit: its weights take the
  Gram form, and the curvature stays exact."""
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import curvature, sweep
  with jax.enable_x64(True):
    loss_fn, params, x, y = _mlp64((16, 12), 7, 3, 4)
    ckpt = lambda p, x, y: jax.checkpoint(loss_fn)(p, x, y)
    assert "remat2" in str(jax.make_jaxpr(ckpt)(params, x, y))
    ps = curvature._gradient_pass(lrcr.engine.trace(ckpt, params, (x, y)),
                                  params)
    assert len(sweep.gram_operations(ps)) == 3
    grads, hess = zoo.dense(loss_fn, params, (x, y))
    _, g_tree, cf = lrcr.value_grad_and_curvature(ckpt, params, x, y,
                                                  gradient_direction=True)
    g = ravel_pytree(jax.tree.map(lambda a: -0.5 * a, g_tree))[0]
    out = cf(params, jax.tree.map(lambda a: -0.5 * a, g_tree))
    np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
    np.testing.assert_allclose(out.slope, g @ grads, rtol=RTOL)


def test_autoscaled_is_offered_only_where_it_is_exact():
  """Without gradient_direction only for the returned gradient itself (the
  same arrays, not equal ones), and not for granularity 'layer'."""
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make("paper_mlp", 0)
    _, grads, plain = lrcr.value_grad_and_curvature(loss_fn, params, *batch)
    assert plain.autoscales(grads) and not plain.gradient_direction
    assert not plain.autoscales(jax.tree.map(lambda a: a + 0, grads))
    assert not plain.autoscales(jax.tree.map(lambda a: -0.1 * a, grads))
    promised = lrcr.value_grad_and_curvature(loss_fn, params, *batch,
                                             gradient_direction=True)[2]
    assert promised.autoscales(jax.tree.map(lambda a: -0.1 * a, grads))
    layer = lrcr.value_grad_and_curvature(
        loss_fn, params, *batch, granularity="layer",
        gradient_direction=True)[2]
    assert not isinstance(layer, lrcr.types.ScalableCurvatureFn)


@pytest.mark.parametrize("batch", [3, 40])      # Gram form / dense form
@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_stacked_layers_against_the_dense_hessian(batch, granularity):
  """stack_layers batches equal layers; the numbers stay exact."""
  with jax.enable_x64(True):
    loss_fn, params, x, y = _mlp64((16,) * 4, 16, batch, batch)
    grads, hess = zoo.dense(loss_fn, params, (x, y))
    # hidden_1..3 (16 x 16, each reading a tangent) form one stacked group.
    # pylint: disable=g-import-not-at-top,protected-access
    from lrcr import curvature, sweep
    ps = curvature._gradient_pass(lrcr.engine.trace(loss_fn, params, (x, y)), params)
    flat = jax.tree.leaves(params)
    sizes = sorted(len(g) for g in sweep._WeightPlan(
        ps, flat, None, stack=True).groups)
    assert sizes == [1, 1, 3], sizes
    for gd in (False, True):
      _, g_tree, cf = lrcr.value_grad_and_curvature(
          loss_fn, params, x, y, granularity=granularity,
          gradient_direction=gd and granularity == "global",
          stack_layers=True)
      d = (jax.tree.map(lambda g: -0.4 * g, g_tree) if gd
           else zoo.random_like(params, batch))
      g = ravel_pytree(d)[0]
      out = cf(params, d)
      if granularity == "global":
        np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
        np.testing.assert_allclose(out.slope, g @ grads, rtol=RTOL)
        # The transform's power-of-two hand-off, stacked and not.
        plain = lrcr.value_grad_and_curvature(loss_fn, params, x, y,
                                              gradient_direction=gd)[2]
        for fn in (cf, plain):
          for e in (-3, 7):
            scaled = fn.fn(params, d, e)
            np.testing.assert_allclose(scaled.curvature,
                                       g @ hess @ g * 2.0 ** (-2 * e),
                                       rtol=RTOL)
            np.testing.assert_allclose(scaled.slope, g @ grads * 2.0 ** -e,
                                       rtol=RTOL)
            np.testing.assert_allclose(scaled.sqnorm, g @ g * 2.0 ** (-2 * e),
                                       rtol=RTOL)
        continue
      for name in params:             # each layer's block g_k^T H_kk g_k
        gk = ravel_pytree({m: jax.tree.map(
            lambda v, keep=(m == name): v if keep else jnp.zeros_like(v),
            d[m]) for m in d})[0]
        np.testing.assert_allclose(out.curvature[name], gk @ hess @ gk,
                                   rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [2, 30])      # Gram form / dense form
def test_default_stacking_against_the_dense_hessian(batch, seed):
  """By default, groups of equal weight operations that pay are stacked."""
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import curvature, sweep
  with jax.enable_x64(True):
    model = lrcr.MLP((8,) * 5, 4, kernel_init=lrcr.uniform_init(0.7),
                     use_bias=bool(seed))
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (batch, 6), jnp.float64)
    y = jax.random.randint(k[1], (batch,), 0, 4)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(k[2], x))["params"]
    loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(
        model.apply({"params": p}, x), y)
    grads, hess = zoo.dense(loss_fn, params, (x, y))
    ps = curvature._gradient_pass(
        lrcr.engine.trace(loss_fn, params, (x, y)), params)
    flat = jax.tree.leaves(params)
    gram_ids = sweep.gram_operations(ps)
    # hidden_1..4 (8 x 8, each reading a tangent): one stacked group of 4 in
    # the Gram form; the first and the output layer stay single. The dense
    # form stacks nothing by default.
    assert len(gram_ids) == (6 if batch == 2 else 0), gram_ids
    sizes = sorted(len(g) for g in sweep._WeightPlan(
        ps, flat, 1.0, gram_ids=gram_ids).groups)
    assert sizes == ([1, 1, 4] if gram_ids else [1] * 6), sizes
    for gd in (False, True):
      _, g_tree, cf = lrcr.value_grad_and_curvature(loss_fn, params, x, y,
                                                    gradient_direction=gd)
      d = (jax.tree.map(lambda g: -0.4 * g, g_tree) if gd
           else zoo.random_like(params, batch + seed))
      g = ravel_pytree(d)[0]
      for e in (None, -5, 9):         # the transform's power-of-two hand-off
        out = cf(params, d) if e is None else cf.fn(params, d, e)
        f = 1.0 if e is None else 2.0 ** -e
        np.testing.assert_allclose(out.slope, g @ grads * f, rtol=RTOL)
        np.testing.assert_allclose(out.curvature, g @ hess @ g * f * f,
                                   rtol=RTOL)
        np.testing.assert_allclose(out.sqnorm, g @ g * f * f, rtol=RTOL)


def test_stacking_pays_from_three_gram_operations():
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import sweep
  pays = sweep._stack_pays
  assert [pays(n, True, True) for n in (2, 3)] == [False, True]
  assert [pays(n, True, False) for n in (2, 3)] == [False, True]
  assert not any(pays(n, False, t) for n in (2, 4, 11) for t in (0, 1))


@pytest.mark.parametrize("batch", [1, 6])   # 1: the Gram form would pay
def test_weight_sharing_and_a_parameter_used_twice(batch):
  """A tied weight (used by two matmuls) and an elementwise parameter."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(k[0], (4, 4), jnp.float64),
              "s": jax.random.normal(k[1], (4,), jnp.float64)}
    x = jax.random.normal(k[2], (batch, 4), jnp.float64)

    def loss_fn(p, x):
      h = jnp.tanh(x @ p["w"]) * p["s"]
      return jnp.mean(jnp.sin(h @ p["w"].T) ** 2)

    d = zoo.random_like(params, 5)
    for gd in (False, True):
      _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, x,
                                                   gradient_direction=gd)
      dd = jax.tree.map(lambda g: -g, grads) if gd else d
      _, hess = zoo.dense(loss_fn, params, (x,))
      g = ravel_pytree(dd)[0]
      np.testing.assert_allclose(cf(params, dd).curvature, g @ hess @ g,
                                 rtol=RTOL)


@pytest.mark.parametrize("batch", [2, 8])
def test_a_parameter_read_by_a_scan_and_a_matmul(batch):
  """A weight that a scan also carries is not the matmul's alone: no Gram form."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(batch), 2)
    params = {"w": jax.random.normal(k[0], (6, 6), jnp.float64) * 0.5}
    x = jax.random.normal(k[1], (batch, 6), jnp.float64)

    def loss_fn(p, x):
      z = jnp.tanh(x @ p["w"])
      h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h) * 1.1, None), p["w"],
                          None, length=3)
      return jnp.sum(z ** 2) + jnp.sum(h ** 3)

    grad_ref, hess = zoo.dense(loss_fn, params, (x,))
    for gd in (False, True):
      _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, x,
                                                   gradient_direction=gd)
      d = jax.tree.map(lambda g: -0.5 * g, grads)
      g = ravel_pytree(d)[0]
      out = cf(params, d)
      np.testing.assert_allclose(out.slope, g @ grad_ref, rtol=RTOL)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


def test_scan_is_one_rule_of_the_table():
  """The scan rule reads its body; without it a scan is one operation.

  With the rule (`engine.NESTED_RULES`), the GRU's weights are found inside
  the scan's body. Without it, the scan is an ordinary operation that JAX's
  own rule differentiates whole: the same exact numbers, no weight inside.
  """
  # pylint: disable=g-import-not-at-top
  from lrcr import engine
  with jax.enable_x64(True):
    loss_fn, params, batch = zoo.make("gru", 1)
    grad_ref, hess = zoo.dense(loss_fn, params, batch)
    d = zoo.random_like(params, 5)
    g = ravel_pytree(d)[0]
    inner = lambda t: [n.name for n, outer in t.weight_nodes() if outer]
    nested = lambda t: [n for n, _ in engine.walk(t.program)
                        if n.kind is engine.Kind.NESTED]
    traced = engine.trace(loss_fn, params, batch)
    assert inner(traced) and [n.name for n in nested(traced)] == ["scan"]
    rule = engine.NESTED_RULES.pop("scan")
    try:
      traced = engine.trace(loss_fn, params, batch)
      assert not inner(traced) and not nested(traced)
      without = lrcr.directional(loss_fn, params, *batch, d)
    finally:
      engine.NESTED_RULES["scan"] = rule
    with_rule = lrcr.directional(loss_fn, params, *batch, d)
    for out in (without, with_rule):
      np.testing.assert_allclose(out.slope, g @ grad_ref, rtol=RTOL)
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


def test_float64_curvature_where_only_weight_products_are_second_order():
  """No second-order operation outside the weights' (or outside a scan)."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 4)
    c = jax.random.normal(k[3], (6, 3), jnp.float64)
    linear = ({"a": jax.random.normal(k[0], (4, 5), jnp.float64),
               "b": jax.random.normal(k[1], (5, 3), jnp.float64)},
              lambda p, x: jnp.sum((x @ p["a"] @ p["b"]) * c) / 3.0,
              jax.random.normal(k[2], (6, 4), jnp.float64))

    def scanned(p, xs):
      def step(h, x):
        h = jnp.tanh(h * p["u"] + x @ p["w"])
        return h, h
      return jnp.sum(jax.lax.scan(step, jnp.zeros(3), xs)[1]) / 3.0

    recurrent = ({"w": jax.random.normal(k[0], (3, 3), jnp.float64) * 0.5,
                  "u": jax.random.normal(k[1], (3,), jnp.float64)},
                 scanned, jax.random.normal(k[2], (5, 3), jnp.float64))
    for params, loss_fn, x in (linear, recurrent):
      d = zoo.random_like(params, 3)
      _, hess = zoo.dense(loss_fn, params, (x,))
      g = ravel_pytree(d)[0]
      out = lrcr.directional(loss_fn, params, x, d)
      assert out.curvature.dtype == jnp.float64
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


def test_a_batch_closed_over_is_not_kept_by_the_class_cache():
  """The classification cache keys no large constant (it would copy it)."""
  # pylint: disable=g-import-not-at-top,protected-access
  from lrcr import engine
  params = {"w": jnp.ones((50, 3))}
  for seed in range(3):
    x = jax.random.normal(jax.random.key(seed), (20, 50))
    loss_fn = lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2)  # x: a constant
    out = lrcr.directional(loss_fn, params, params)
    ref = lrcr.autodiff_directional(loss_fn, params, params)
    np.testing.assert_allclose(out.curvature, ref.curvature, rtol=1e-4)
  sizes = [len(b) for key in engine._CLASSES for _, b, _ in key[-1]]
  assert max(sizes, default=0) <= 8 * engine._MAX_KEY_CONSTANT


def test_control_flow_cond_and_stop_gradient():
  with jax.enable_x64(True):
    params = {"a": jnp.array([0.3, -1.2, 0.7]), "b": jnp.array(0.4)}
    x = jnp.linspace(-1, 1, 3)

    def loss_fn(p, x):
      u = jnp.exp(p["a"] * x)
      v = jax.lax.cond(p["b"] > 0, lambda: jnp.sum(u ** 3) * p["b"],
                       lambda: jnp.sum(u))
      return v + jax.lax.stop_gradient(p["b"]) * jnp.sum(p["a"] ** 2)

    d = zoo.random_like(params, 1)
    _, hess = zoo.dense(loss_fn, params, (x,))
    g = ravel_pytree(d)[0]
    np.testing.assert_allclose(lrcr.directional(loss_fn, params, x, d).curvature,
                               g @ hess @ g, rtol=RTOL)


def test_model_forms_for_the_paper_mlp():
  """lowrank_curvature_fn(model, x, y) and directional(model, ...) keep working."""
  with jax.enable_x64(True):
    loss_fn, params, (x, y) = zoo.make("paper_mlp", 4)
    model = lrcr.MLP((6, 5, 4), 3)
    d = zoo.random_like(params, 2)
    _, hess = zoo.dense(loss_fn, params, (x, y))
    g = ravel_pytree(d)[0]
    a = lrcr.lowrank_curvature_fn(model, x, y)(params, d)
    b = lrcr.directional(model, params, x, y, d)
    c = lrcr.autodiff_curvature_fn(loss_fn, x, y)(params, d)
    frozen = lrcr.directional(model, flax.core.freeze(params), x, y,
                              flax.core.freeze(d))
    for out in (a, b, c, frozen):
      np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)
    f, e = lrcr.value_and_directional(model, params, x, y, d)
    np.testing.assert_allclose(f, loss_fn(params, x, y), rtol=RTOL)
    np.testing.assert_allclose(e.slope, a.slope, rtol=RTOL)


def test_paper_net_in_float32_agrees_with_autodiff():
  model = lrcr.MLP([128] * 12, 10, kernel_init=lrcr.uniform_init(0.2))
  x = jax.random.normal(jax.random.key(0), (32, 784))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
  params = model.init(jax.random.key(2), x)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  grads = jax.jit(jax.grad(loss_fn))(params, x, y)
  for gd in (False, True):
    d = jax.tree.map(lambda g: -0.02 * g, grads)
    a = jax.jit(lambda p, d: lrcr.value_grad_and_curvature(
        loss_fn, p, x, y, gradient_direction=gd)[2](p, d))(params, d)
    b = jax.jit(lambda p, d: lrcr.autodiff_directional(
        lambda q: loss_fn(q, x, y), p, d))(params, d)
    np.testing.assert_allclose(a.curvature, b.curvature, rtol=1e-4)
    np.testing.assert_allclose(a.slope, b.slope, rtol=1e-5)


def test_unsupported_primitive_is_named():
  def loss_fn(p, x):
    y = jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          x * p)
    return jnp.sum(y ** 2)

  with pytest.raises(lrcr.UnsupportedProgramError,
                     match="pure_callback.*autodiff_curvature_fn"):
    lrcr.value_grad_and_curvature(loss_fn, jnp.ones(3), jnp.ones(3))


def test_bad_inputs_get_clear_errors():
  loss_fn, params, batch = zoo.make("paper_mlp", 0)
  with pytest.raises(ValueError, match="real scalar"):
    lrcr.value_grad_and_curvature(lambda p, x, y: loss_fn(p, x, y)[None],
                                  params, *batch)
  _, _, cf = lrcr.value_grad_and_curvature(loss_fn, params, *batch)
  with pytest.raises(ValueError, match="tree structure"):
    cf(params, {"params": {}})
  with pytest.raises(ValueError, match="granularity"):
    lrcr.lowrank_curvature_fn(loss_fn, *batch, granularity="block")
  with pytest.raises(TypeError, match="flax module"):
    lrcr.lowrank_curvature_fn(3, *batch)


def test_out_of_range_labels_are_refused_or_give_nan():
  averaging = lrcr.averaging
  model = lrcr.MLP((4,), 3)
  x = jnp.ones((2, 5))
  params = model.init(jax.random.key(0), x)
  for bad in (jnp.array([0, 3]), jnp.array([-1, 0])):
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
      lrcr.lowrank_curvature_fn(model, x, bad)
    # Every entry point that takes a module and its batch checks them.
    for call in (lambda: lrcr.directional(model, params, x, bad, params),
                 lambda: lrcr.value_and_directional(model, params, x, bad,
                                                    params),
                 lambda: lrcr.hessian_diagonal(model, params, x, bad),
                 lambda: lrcr.per_sample_factors(model, params, x, bad),
                 lambda: averaging.per_sample_own_directional(model, params,
                                                              x, bad),
                 lambda: averaging.averaged_sgd_update(model, params, x, bad,
                                                       sigma=1.0)):
      with pytest.raises(ValueError, match=r"labels must be integers in"):
        call()
  # Under jit the labels are not known: loss, slope and curvature are NaN.
  out = jax.jit(lambda p, y: lrcr.lowrank_curvature_fn(model, x, y)(p, p))(
      params, jnp.array([0, 3]))
  assert np.isnan(out.slope) and np.isnan(out.curvature)


def test_a_functional_nnx_model():
  """flax.nnx: the loss of nnx.merge(graphdef, state), differentiated in state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 6, rngs=rngs, param_dtype=jnp.float64)
      self.norm = nnx.LayerNorm(6, rngs=rngs, param_dtype=jnp.float64)
      self.out = nnx.Linear(6, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.out(jax.nn.gelu(self.norm(self.dense(x))))

  with jax.enable_x64(True):
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    y = jnp.array([0, 1, 2, 1, 0])

    def loss_fn(state, x, y):
      logits = nnx.merge(graphdef, state)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    d = zoo.random_like(state, 3)
    _, hess = zoo.dense(loss_fn, state, (x, y))
    g = ravel_pytree(d)[0]
    out = jax.jit(lambda s, d: lrcr.value_grad_and_curvature(
        loss_fn, s, x, y)[2](s, d))(state, d)
    np.testing.assert_allclose(out.curvature, g @ hess @ g, rtol=RTOL)


@pytest.mark.parametrize("lr", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("gd", [False, True])
def test_the_transform_passes_its_rescaling_to_the_engine(lr, gd):
  """The engine's in-function power-of-two scaling = the scaled-copy path."""
  model = lrcr.MLP((16, 16), 4, kernel_init=lrcr.uniform_init(0.5))
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.arange(8) % 4
  params = model.init(jax.random.key(1), x)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  tx = optax.chain(optax.sgd(lr), lrcr.scale_by_cubic_step(10.0))

  @jax.jit
  def both(params):
    _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, x, y,
                                                 gradient_direction=gd)
    assert isinstance(cf, lrcr.types.ScalableCurvatureFn)
    plain = lambda p, d: cf(p, d)        # a plain function: the scaled copy
    a, sa = tx.update(grads, tx.init(params), params, curvature_fn=cf)
    b, sb = tx.update(grads, tx.init(params), params, curvature_fn=plain)
    return a, b, sa[1].info, sb[1].info

  a, b, ia, ib = both(params)
  assert bool(ia.finite) and bool(ib.finite)
  assert float(optax.tree.norm(a)) > 0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=2e-5)
  np.testing.assert_allclose(ia.curvature, ib.curvature, rtol=1e-4)


@pytest.mark.parametrize("seed,batch,depth", [(0, 4, 4), (1, 2, 5),
                                              (2, 6, 4)])
def test_stacked_gradients_are_jax_grads(seed, batch, depth):
  """With gradient_direction=True and stack_layers=True, equally shaped
  Gram-form layers (here three or more 16 x 16 ReLU layers at batch < 8)
  get their gradients from one batched matmul of the stacked operands and
  adjoints: jax.grad's in float64, and the curvature along -lr grad F is
  the dense Hessian's."""
  with jax.enable_x64(True):
    model, params, x, y = reference.make_problem(
        seed, (16,) * depth, 5, batch, 7)
    loss = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
    want = jax.grad(loss)(params, x, y)

    @jax.jit
    def engine(params):
      _, grads, fn = lrcr.value_grad_and_curvature(
          loss, params, x, y, gradient_direction=True, stack_layers=True)
      g = jax.tree.map(lambda a: -0.3 * a, grads)
      return grads, fn(params, g)

    grads, d = engine(params)
    text = jax.jit(engine).lower(params).compile().as_text()
    assert "lni,lnj->lij" in text          # the stacked gradient product
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                         atol=1e-15),
                 grads, want)
    g = jax.tree.map(lambda a: -0.3 * a, want)
    ref = reference.dense_reference(model, params, x, y, g)
    for got, expected in zip(d, ref):
      np.testing.assert_allclose(got, expected, rtol=1e-10)
