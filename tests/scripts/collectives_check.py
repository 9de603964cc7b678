"""Run by tests/trust_test.py with 2 host devices (XLA_FLAGS set by the caller).

The engine inside `jax.shard_map` (with and without check_vma, with and
without a `pmean` in the loss), around it, and inside `jax.pmap`, against
float64 dense Hessians of the same losses computed without any mesh. Prints
one JSON line: for each case, per shard, [engine, reference] pairs of the
slope, the curvature and ||g||^2, or the refusal's message.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.getcwd())
# pylint: disable=g-import-not-at-top,wrong-import-position
import lrcr

jax.config.update("jax_enable_x64", True)
SHARDS = 2


def _local(p, x, y):
  h = jnp.tanh(x @ p["w1"])
  return jnp.mean((jnp.sin(h @ p["w2"]) * (x @ p["v"]) - y) ** 2)


@jax.jit
def _dense_jit(params, d, x, y):
  flat, unravel = ravel_pytree(params)
  g = ravel_pytree(d)[0]
  f = lambda w: _local(unravel(w), x, y)
  return g @ jax.grad(f)(flat), g @ jax.hessian(f)(flat) @ g, g @ g


def _dense(params, d, x, y):
  """(slope, curvature, ||g||^2) of `_local` by jax.hessian of the flattened
  loss, without any mesh (one compiled program per batch shape)."""
  return tuple(float(v) for v in _dense_jit(params, d, x, y))


def _references(params, d, x, y):
  """The dense references of the whole batch and of each shard's rows."""
  parts = [(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(SHARDS)]
  return dict(full=_dense(params, d, x, y),
              parts=[_dense(params, d, *part) for part in parts])


def _rows(got, refs):
  """[engine, reference] pairs of slope, curvature and squared norm."""
  return [[float(a[0]), r[0], float(a[1]), r[1], float(a[2]), r[2]]
          for a, r in zip(got, refs)]


def _problem():
  k = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(k[0], (8, 3))
  y = jax.random.normal(k[1], (8,))
  params = {"w1": jax.random.normal(k[2], (3, 4)),
            "w2": jax.random.normal(k[3], (4,)),
            "v": jax.random.normal(k[4], (3,))}
  d = jax.tree.map(lambda a: 0.3 * a + 0.1, params)
  return params, d, x, y


def _shard_map_cases(mesh, params, d, x, y, refs):
  out = {}
  xs = jax.device_put(x, NamedSharding(mesh, P("d")))
  ys = jax.device_put(y, NamedSharding(mesh, P("d")))
  for vma in (True, False):
    for pmean in (True, False):
      def loss(p, x, y, pmean=pmean):
        l = _local(p, x, y)
        return lax.pmean(l, "d") if pmean else l

      def step(p, x, y, loss=loss):
        out = lrcr.value_grad_and_curvature(loss, p, x, y)[2](p, d)
        return jnp.stack([out.slope, out.curvature, out.sqnorm])[None]

      name = f"shard_map vma={vma} pmean={pmean}"
      try:
        got = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                            out_specs=P("d"), check_vma=vma)(params, xs, ys)
      except lrcr.UnsupportedProgramError as e:
        out[name] = str(e)
        continue
      out[name] = _rows(got, [refs["full"]] * SHARDS if pmean else
                        refs["parts"])
  return out


def _outer_shard_map(mesh, params, d, x, y, refs):
  """A loss that holds a shard_map, called from outside it."""
  xs = jax.device_put(x, NamedSharding(mesh, P("d")))
  ys = jax.device_put(y, NamedSharding(mesh, P("d")))

  def loss(p, x, y):
    inner = lambda p, x, y: lax.pmean(_local(p, x, y), "d")
    return jax.shard_map(inner, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                         out_specs=P())(p, x, y)

  got = lrcr.value_grad_and_curvature(loss, params, xs, ys)[2](params, d)
  return _rows([[got.slope, got.curvature, got.sqnorm]], [refs["full"]])


def _pmap_cases(params, d, x, y, refs):
  out = {}
  xr, yr = x.reshape(SHARDS, 4, 3), y.reshape(SHARDS, 4)
  for pmean in (False, True):
    def loss(p, x, y, pmean=pmean):
      l = _local(p, x, y)
      return lax.pmean(l, "i") if pmean else l

    def step(p, x, y, loss=loss):
      out = lrcr.value_grad_and_curvature(loss, p, x, y)[2](p, d)
      # The usual data-parallel step: per-device numbers, averaged after.
      return lax.pmean(jnp.stack([out.slope, out.curvature, out.sqnorm]),
                       "i")

    name = f"pmap pmean={pmean}"
    try:
      got = jax.pmap(step, axis_name="i", in_axes=(None, 0, 0))(params, xr, yr)
    except lrcr.UnsupportedProgramError as e:
      out[name] = str(e)
      continue
    out[name] = _rows(got, [refs["full"]] * SHARDS)
  return out


def main():
  assert jax.device_count() == SHARDS, jax.devices()
  mesh = jax.make_mesh((SHARDS,), ("d",))
  params, d, x, y = _problem()
  refs = _references(params, d, x, y)
  result = _shard_map_cases(mesh, params, d, x, y, refs)
  result["outer shard_map"] = _outer_shard_map(mesh, params, d, x, y, refs)
  result.update(_pmap_cases(params, d, x, y, refs))
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
