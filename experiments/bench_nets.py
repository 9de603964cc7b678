"""CR step against the base step for the convolutional and recurrent nets (app. B.2).

    python -m experiments.bench_nets [--repeats=11]

Times, interleaved in one process, medians of repeated samples, batch 32,
float32, on the models of configs/cifar10_cnn_sgd_plateau.py and
configs/sequence_rnn_sgd.py (random inputs of their shapes), with the
training loop's own steps (`experiments.steps`):

- `sgd`: value_and_grad + SGD update
- `cr_autodiff`: CR-SGD, curvature by forward-over-forward autodiff
- `cr_hvp`: CR-SGD, curvature by a Hessian-vector product

and prints the ratios to `sgd`.
"""

from collections.abc import Sequence
import importlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrcr
from experiments import bench
from experiments import models
from experiments import steps

_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.default_backend()}")
  print("| net (batch 32) | sgd ms | CR forward-over-forward | CR hvp |")
  print("|---|---|---|---|")
  for name in ("cifar10_cnn_sgd_plateau", "sequence_rnn_sgd"):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = models.make_model(config.model, 10)
    x = jax.random.uniform(jax.random.key(0),
                           (32,) + tuple(config.model.input_shape))
    y = jnp.arange(32) % 10
    params = model.init(jax.random.key(1), x)["params"]
    sgd = optax.sgd(0.01)
    cr = lrcr.cubic_sgd(config.optimizer.sigma, 0.01)
    fns = {"sgd": (steps.make_base_step(model, sgd), sgd)}
    for curvature in ("autodiff", "hvp"):
      fns[f"cr_{curvature}"] = (steps.make_cr_step(
          model, cr, steps.CROptions(curvature=curvature)), cr)
    samplers = {
        key: bench.make_sampler(jax.jit(steps.applied(step)),
                                (params, tx.init(params), x, y), 5)
        for key, (step, tx) in fns.items()}
    for sample in samplers.values():
      sample()                                        # compile
    times = bench.interleaved_samples(samplers, _REPEATS.value)
    med = {key: 1e3 * float(np.median(v)) for key, v in times.items()}
    print(f"| {name} | {med['sgd']:.2f} | "
          f"{med['cr_autodiff'] / med['sgd']:.2f}x | "
          f"{med['cr_hvp'] / med['sgd']:.2f}x |")


if __name__ == "__main__":
  app.run(main)
