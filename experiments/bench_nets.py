"""CR step against the base step for the convolutional and recurrent nets (app. B.2).

    python -m experiments.bench_nets [--repeats=11]

Times, interleaved in one process, medians of repeated samples, batch 32,
float32, on the layers of configs/cifar10_cnn_sgd_plateau.py and
configs/sequence_rnn_sgd.py (random inputs of their shapes):

- `sgd`: value_and_grad + SGD update
- `cr_lowrank`: plus the exact curvature by the low-rank engine (lrcr.nets)
- `cr_autodiff`: plus the curvature by forward-over-forward autodiff

and prints the ratios to `sgd` and of autodiff to low-rank.
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
from lrcr import bench
from lrcr import train

_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.default_backend()}")
  print("| net (batch 32) | sgd ms | CR low-rank | CR forward-over-forward "
        "| autodiff / low-rank |")
  print("|---|---|---|---|---|")
  for name in ("cifar10_cnn_sgd_plateau", "sequence_rnn_sgd"):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = train.make_model(config.model, 10)
    shape = (32,) + tuple(config.model.input_shape)
    x = jax.random.uniform(jax.random.key(0), shape)
    y = jnp.arange(32) % 10
    params = model.init(jax.random.key(1), x)
    loss = lambda p, x=x, y=y, m=model: lrcr.cross_entropy_loss(m.apply(p, x), y)
    sgd = optax.sgd(0.01)
    cr = lrcr.cubic_sgd(config.optimizer.sigma, 0.01)

    def step(curvature, p, s, loss=loss, x=x, y=y, model=model):
      value, grads = jax.value_and_grad(loss)(p)
      if curvature is None:
        updates, s = sgd.update(grads, s, p)
      else:
        fn = (lrcr.lowrank_curvature_fn(model, x, y) if curvature == "lowrank"
              else lrcr.autodiff_curvature_fn(lambda q: loss(q)))
        updates, s = cr.update(grads, s, p, curvature_fn=fn)
      return optax.apply_updates(p, updates), s, value

    fns = {
        "sgd": (jax.jit(lambda p, s: step(None, p, s)), (params, sgd.init(params))),
        "cr_lowrank": (jax.jit(lambda p, s: step("lowrank", p, s)),
                       (params, cr.init(params))),
        "cr_autodiff": (jax.jit(lambda p, s: step("autodiff", p, s)),
                        (params, cr.init(params))),
    }
    times = bench.interleaved_samples(
        {key: bench.call_sampler(fn, args, 0.05) for key, (fn, args)
         in fns.items()}, _REPEATS.value)
    times = {key: [1e3 * t for t in ts] for key, ts in times.items()}
    med = {key: float(np.median(v)) for key, v in times.items()}
    print(f"| {name} | {med['sgd']:.2f} | {med['cr_lowrank'] / med['sgd']:.2f}x "
          f"| {med['cr_autodiff'] / med['sgd']:.2f}x "
          f"| {med['cr_autodiff'] / med['cr_lowrank']:.2f}x |")


if __name__ == "__main__":
  app.run(main)
