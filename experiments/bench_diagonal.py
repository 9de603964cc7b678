"""Cost of the exact Hessian diagonal and the per-layer blocks, against C backward passes.

    python -m experiments.bench_diagonal [--repeats=15]

Times, on the paper's 12x128 net, `sgd_grad` (one value_and_grad),
`c_backward` (C backward passes with one-hot cotangents, the budget
BackPACK's DiagHessian is compared with), `hessian_diagonal` and
`layer_blocks` (g_k^T H_kk g_k per layer); prints ms and ratios to
`c_backward`.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import lrcr
from experiments import bench

_REPEATS = flags.DEFINE_integer("repeats", 15, "Timing repeats.")


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}")
  print("| activation, batch | variant | ms (median) | ratio to C backward passes |")
  print("|---|---|---|---|")
  model = bench.paper_mlp(128, 12)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  for batch in (32, 256):
    x = jax.random.uniform(jax.random.key(0), (batch, 784))
    y = jnp.arange(batch) % 10
    params = model.init(jax.random.key(1), x)
    g = jax.tree.map(lambda a: jnp.cos(37.0 * a), params)

    def c_backward(p):
      logits, vjp = jax.vjp(lambda q: model.apply(q, x), p)
      eye = jnp.eye(logits.shape[-1], dtype=logits.dtype)
      return jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(eye)

    fns = {
        "sgd_grad": (jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, y))),
                     (params,)),
        "c_backward": (jax.jit(c_backward), (params,)),
        "hessian_diagonal": (jax.jit(
            lambda p: lrcr.hessian_diagonal(model, p, x, y)), (params,)),
        "layer_blocks": (jax.jit(lambda p, d: lrcr.value_grad_and_curvature(
            loss_fn, p, x, y, granularity="layer")[2](p, d)), (params, g)),
    }
    times = bench.interleaved_samples(
        {name: bench.call_sampler(fn, args) for name, (fn, args)
         in fns.items()}, _REPEATS.value)
    times = {name: [1e3 * t for t in ts] for name, ts in times.items()}
    ref = np.median(times["c_backward"])
    for name in fns:
      med = np.median(times[name])
      print(f"| relu, {batch} | {name} | {med:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
  app.run(main)
