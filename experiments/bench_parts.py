"""Where the CR step's time goes: its parts, timed and counted in XLA kernels.

    python -m experiments.bench_parts [--batch=32] [--repeats=11]

On the paper's 12x128 net, float32, jitted, interleaved medians of repeated
samples (ratio to `grad`), the number of kernels in each compiled program
(`bench.count_kernels`), and its flops from XLA's cost analysis (the
matmuls' count, what the step would cost if kernels were free):

- `grad`: `jax.value_and_grad` of the loss
- `engine_pass`: `lrcr.value_grad_and_curvature` without calling its
  `curvature_fn` (the gradient pass with the adjoints exposed)
- `engine`: the same plus slope and curvature along -0.1 grad (dense sweep)
- `engine_gram`: the same with `gradient_direction=True` (Gram form)
- `engine_stacked`, `engine_gram_stacked`: the two with `stack_layers=True`
- `fwd_over_fwd`: `value_and_grad` plus forward-over-forward along -0.1 grad
- `transform`: `scale_by_cubic_step`'s update with a stub `curvature_fn`
  (one tree norm), against `apply_only`, the SGD update applied alone
- `transform_own`: `scale_by_cubic_step`'s update applied, on the gradient
  as given, with a stub that reads one entry of the direction (the
  transform's own kernels), against `sgd_update`, `optax.sgd`'s update applied
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import numpy as np

import lrcr
from experiments import bench

_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")


def _kernels_and_flops(fn, args) -> tuple[int, float]:
  compiled = jax.jit(fn).lower(*args).compile()
  return bench.count_kernels(compiled.as_text()), bench.flops(compiled)


def main(argv: Sequence[str]) -> None:
  del argv
  model = bench.paper_mlp(128, 12)
  _, params, x, y = bench.make_problem(128, 12, _BATCH.value)
  loss_fn = lambda p, x, y: lrcr.cross_entropy_loss(
      model.apply({"params": p}, x), y)          # params: the inner dict
  step = lambda g: jax.tree.map(lambda a: -0.1 * a, g)

  def grad(p):
    return jax.value_and_grad(loss_fn)(p, x, y)

  def engine_pass(p):
    return lrcr.value_grad_and_curvature(loss_fn, p, x, y)[:2]

  def engine(gram=False, stack=False):
    def part(p):
      loss, g, curvature_fn = lrcr.value_grad_and_curvature(
          loss_fn, p, x, y, gradient_direction=gram, stack_layers=stack)
      return loss, g, curvature_fn(p, step(g))
    return part

  def fwd_over_fwd(p):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    return loss, g, lrcr.autodiff_directional(lambda q: loss_fn(q, x, y), p,
                                              step(g))

  fns = {"grad": grad, "engine_pass": engine_pass, "engine": engine(),
         "engine_gram": engine(gram=True),
         "engine_stacked": engine(stack=True),
         "engine_gram_stacked": engine(gram=True, stack=True),
         "fwd_over_fwd": fwd_over_fwd,
         **bench.transform_parts(params)}
  samplers = {k: bench.call_sampler(jax.jit(f), (params,))
              for k, f in fns.items()}
  times = bench.interleaved_samples(samplers, _REPEATS.value)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"batch {_BATCH.value}")
  print("| part | ms | ratio to grad | XLA kernels | flops ratio to grad |")
  print("|---|---|---|---|---|")
  counted = {k: _kernels_and_flops(f, (params,)) for k, f in fns.items()}
  for k in fns:
    kernels, flops = counted[k]
    print(f"| {k} | {1e3 * med[k]:.3f} | {med[k] / med['grad']:.2f}x | "
          f"{kernels} | {flops / counted['grad'][1]:.2f}x |")


if __name__ == "__main__":
  app.run(main)
