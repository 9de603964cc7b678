"""The exact Hessian diagonal and per-layer blocks against C backward passes.

    python -m experiments.bench_diagonal [--repeats=15]

Times, on the paper's 12x128 net, `sgd_grad` (one value_and_grad),
`c_backward` (C backward passes with one-hot cotangents, the budget
BackPACK's DiagHessian is compared with), `hessian_diagonal` and
`layer_blocks` (g_k^T H_kk g_k per layer); prints the median ms and the
ratio of medians to `c_backward`.
"""

from collections.abc import Sequence

from absl import flags
import jax
import jax.numpy as jnp

import lrcr
import experiments
from experiments import bench
from experiments import report

_REPEATS = flags.DEFINE_integer("repeats", 15, "Timing repeats.")


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}")
  model = bench.paper_mlp(128, 12)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(model.apply(p, x), y)
  rows = []
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
        "sgd_grad": (jax.value_and_grad(lambda p: loss_fn(p, x, y)),
                     (params,)),
        "c_backward": (c_backward, (params,)),
        "hessian_diagonal": (
            lambda p: lrcr.hessian_diagonal(model, p, x, y), (params,)),
        "layer_blocks": (lambda p, d: lrcr.value_grad_and_curvature(
            loss_fn, p, x, y, granularity="layer")[2](p, d), (params, g)),
    }
    measured = bench.measure(
        {name: dict(compiled=bench.compile_step(fn, args)[0], args=args,
                    base="c_backward", chained=False)
         for name, (fn, args) in fns.items()},
        repeats=_REPEATS.value, sample_s=0.03)
    rows += [(f"relu, {batch}", name, report.fmt(r.get("ms_per_step"), ".3f"),
              report.fmt(r.get("ratio_of_medians"), ".2f") + "x")
             for name, r in measured.items()]
  print("\n".join(report.table(["activation, batch", "variant", "ms (median)",
                                "ratio to C backward passes"], rows)))


if __name__ == "__main__":
  experiments.run(main)
