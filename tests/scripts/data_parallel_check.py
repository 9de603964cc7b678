"""Run by tests/parallel_test.py with 4 host devices (XLA_FLAGS set by the caller).

Trains the tiny config on 4 devices and on 1 device and prints both metric
streams, plus lrcr.directional on a sharded and an unsharded batch, as JSON.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import lrcr
from lrcr import fused


def _config(num_devices, workdir):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.source = "mnist_5k"
  config.training.num_steps = 30
  config.training.batch_size = 16
  config.training.num_devices = num_devices
  return config


def main(out_dir):
  sys.path.insert(0, os.getcwd())
  from experiments import summary, train_lib as train  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  result = {"devices": jax.device_count()}
  for n in (4, 1):
    workdir = os.path.join(out_dir, f"run_{n}")
    train.train_and_evaluate(_config(n, workdir), workdir)
    records = summary.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    result[f"metrics_{n}"] = [
        [r[k] for k in ("loss_base", "loss_cr", "alpha", "slope", "curvature")]
        for r in records]

  # The engine itself on a batch sharded over the 4 devices.
  model = lrcr.MLP((32, 32, 32), 10, kernel_init=lrcr.uniform_init(0.2))
  x = jax.random.uniform(jax.random.key(0), (16, 784))
  y = jnp.arange(16) % 10
  params = model.init(jax.random.key(1), x)
  g = jax.tree.map(lambda a: jnp.cos(a * 37.0), params)
  mesh = jax.make_mesh((4,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
  ps, gs = jax.device_put((params, g), rep)
  single = lrcr.directional(model, params, x, y, g)
  sharded = lrcr.directional(model, ps, xs, ys, gs)
  _, grads, cache = fused.value_grad_and_cache(model, ps, xs, ys)
  gram = fused.cached_directional(model, ps, cache,
                                  jax.tree.map(lambda a: -0.1 * a, grads), True)
  _, grads1, cache1 = fused.value_grad_and_cache(model, params, x, y)
  gram1 = fused.cached_directional(model, params, cache1,
                                   jax.tree.map(lambda a: -0.1 * a, grads1), True)
  result["directional"] = [list(map(float, single)), list(map(float, sharded))]
  result["gram"] = [list(map(float, gram1)), list(map(float, gram))]
  result["input_sharding"] = str(xs.sharding)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1])
