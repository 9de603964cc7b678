"""The CR step on convolutional, recurrent and attention nets, against SGD.

    python -m experiments.bench_nets [--repeats=11] [--batches=32,256]

Times, interleaved in one process, medians of repeated samples, float32,
the training loop's own steps (`experiments.steps`) on

- the CNN of configs/cifar10_cnn_sgd_plateau.py (32x32x3 inputs),
- the RNN of configs/sequence_rnn_sgd.py (28 steps of 28 features),
- a self-attention classifier (two heads over the 28 rows of an image),

all plain flax modules, with random inputs of their shapes:

- `sgd`: value_and_grad + SGD update
- `cr_engine`: CR-SGD through `lrcr.value_grad_and_curvature` (Gram form)
- `cr_autodiff`: CR-SGD, curvature by forward-over-forward autodiff
- `cr_hvp`: CR-SGD, curvature by a Hessian-vector product

and prints the ratios to `sgd`, the engine's speed-up over forward-over-forward,
and the floor counted in operations: the ratio of XLA's flop counts of the
compiled CR step and SGD step (`compiled.cost_analysis()`).
"""

from collections.abc import Sequence
import importlib

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrcr
from experiments import bench
from experiments import models
from experiments import steps

_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")
_BATCHES = flags.DEFINE_list("batches", ["32", "256"], "Batch sizes.")


class AttentionClassifier(nn.Module):
  """Rows of an image as tokens: embed, one self-attention block, mean-pool."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64)(x)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=64)(h)
    h = h + nn.Dense(64)(jax.nn.relu(nn.Dense(128)(nn.LayerNorm()(h))))
    return nn.Dense(10)(h.mean(axis=1))


def _nets():
  for name in ("cifar10_cnn_sgd_plateau", "sequence_rnn_sgd"):
    config = importlib.import_module(f"configs.{name}").get_config()
    yield (config.model.kind, models.make_model(config.model, 10),
           tuple(config.model.input_shape), config.optimizer.sigma)
  yield "attention", AttentionClassifier(), (28, 28), 100.0


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}")
  print("| net | batch | sgd ms | CR engine | CR forward-over-forward | "
        "CR hvp | engine speed-up over fwd-over-fwd | floor (flops) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, model, shape, sigma in _nets():
    for batch in (int(b) for b in _BATCHES.value):
      x = jax.random.uniform(jax.random.key(0), (batch,) + shape)
      y = jnp.arange(batch) % 10
      params = model.init(jax.random.key(1), x)["params"]
      sgd = optax.sgd(0.01)
      cr = lrcr.cubic_sgd(sigma, 0.01)
      fns = {"sgd": (steps.make_base_step(model, sgd), sgd)}
      for curvature in ("engine", "autodiff", "hvp"):
        fns[f"cr_{curvature}"] = (steps.make_cr_step(
            model, cr, steps.CROptions(curvature=curvature,
                                       gradient_direction=True)), cr)
      args = {key: (params, tx.init(params), x, y)
              for key, (_, tx) in fns.items()}
      compiled = {key: jax.jit(steps.applied(step)).lower(*args[key]).compile()
                  for key, (step, _) in fns.items()}
      flops = {key: bench.flops(c) for key, c in compiled.items()}
      samplers = {key: bench.make_sampler(c, args[key], 3 if batch > 64 else 5)
                  for key, c in compiled.items()}
      for sample in samplers.values():
        sample()                                      # warm-up
      times = bench.interleaved_samples(samplers, _REPEATS.value)
      med = {key: float(np.median(v)) for key, v in times.items()}
      r = {key: med[key] / med["sgd"] for key in med}
      print(f"| {name} | {batch} | {1e3 * med['sgd']:.2f} | "
            f"{r['cr_engine']:.2f}x | {r['cr_autodiff']:.2f}x | "
            f"{r['cr_hvp']:.2f}x | "
            f"{med['cr_autodiff'] / med['cr_engine']:.2f}x | "
            f"{flops['cr_engine'] / flops['sgd']:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
