"""Run by tests/parallel_test.py with 4 host devices (XLA_FLAGS set by the caller).

Trains the tiny config on 4 devices and on 1 device and prints both metric
streams, plus the CR step's slope and curvature (experiments.steps, the
autodiff and the fused Gram paths) on a sharded and an unsharded batch, as
JSON.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.getcwd())   # the checkout: experiments/, configs/
# pylint: disable=g-import-not-at-top,wrong-import-position
import lrcr
from experiments import steps


def _config(num_devices, workdir):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.source = "mnist_5k"
  config.training.num_steps = 30
  config.training.batch_size = 16
  config.training.num_devices = num_devices
  return config


def main(out_dir):
  from experiments import metrics, train_lib as train
  assert jax.device_count() == 4, jax.devices()
  result = {"devices": jax.device_count()}
  for n in (4, 1):
    workdir = os.path.join(out_dir, f"run_{n}")
    train.train_and_evaluate(_config(n, workdir), workdir)
    records = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
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
  params, g = params["params"], g["params"]
  ps, gs = ps["params"], gs["params"]
  loss_fn = steps.cross_entropy_loss_fn(model)

  def slope_and_curvature(options, p, xb, yb, direction=None):
    _, grads, curvature_fn = steps._value_grad_and_curvature(  # pylint: disable=protected-access
        loss_fn, p, xb, yb, options)
    if direction is None:    # the SGD direction, for the Gram form
      direction = jax.tree.map(lambda a: -0.1 * a, grads)
    d = curvature_fn(p, direction)
    return [float(d.slope), float(d.curvature), float(d.sqnorm)]

  exact = steps.CROptions(curvature="autodiff")
  gram = steps.CROptions(curvature="engine", gradient_direction=True)
  result["directional"] = [slope_and_curvature(exact, params, x, y, g),
                           slope_and_curvature(exact, ps, xs, ys, gs)]
  result["gram"] = [slope_and_curvature(gram, params, x, y),
                    slope_and_curvature(gram, ps, xs, ys)]
  result["input_sharding"] = str(xs.sharding)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1])
