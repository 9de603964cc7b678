"""Where the CR step's time goes: its parts, timed and counted in XLA kernels.

    python -m experiments.bench_parts [--batch=32] [--repeats=11]

On the paper's 12x128 net, float32, each jitted part's median ms over
interleaved samples (`bench.measure`) and its ratio to `grad`'s, its kernels
(`bench.count_kernels`) and its flops (XLA's cost analysis: what the step
would cost if kernels were free) over `grad`'s. The parts:

- `grad`: `jax.value_and_grad` of the loss
- `engine_pass`: `lrcr.value_grad_and_curvature` without calling its
  `curvature_fn` (the gradient pass with the adjoints exposed)
- `engine`: the same plus slope and curvature along -0.1 grad (dense sweep)
- `engine_gram`: the same with `gradient_direction=True` (Gram form)
- `engine_known`: the same called as `lrcr.cubic_sgd` calls it: on the
  gradient itself, its multiple -0.1 given (`autoscaled`, no pass for it)
- `engine_stacked`, `engine_gram_stacked`: the two with `stack_layers=True`
- `fwd_over_fwd`: `value_and_grad` plus forward-over-forward along -0.1 grad
- `transform`, `apply_only`, `transform_own`, `sgd_update`: the transform
  alone (`bench.transform_parts`)
"""

from collections.abc import Sequence

from absl import flags
import jax

import lrcr
import experiments
from experiments import bench
from experiments import report

_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")


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

  def engine_known(p):
    loss, g, curvature_fn = lrcr.value_grad_and_curvature(
        loss_fn, p, x, y, gradient_direction=True)
    return loss, g, curvature_fn.autoscaled(p, g, -0.1)

  def fwd_over_fwd(p):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    return loss, g, lrcr.autodiff_directional(lambda q: loss_fn(q, x, y), p,
                                              step(g))

  fns = {"grad": grad, "engine_pass": engine_pass, "engine": engine(),
         "engine_gram": engine(gram=True), "engine_known": engine_known,
         "engine_stacked": engine(stack=True),
         "engine_gram_stacked": engine(gram=True, stack=True),
         "fwd_over_fwd": fwd_over_fwd,
         **bench.transform_parts(params)}
  rows = bench.measure(
      {k: dict(compiled=bench.compile_step(f, (params,))[0], args=(params,),
               base="grad", chained=False) for k, f in fns.items()},
      repeats=_REPEATS.value, sample_s=0.03)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"batch {_BATCH.value}")
  print("\n".join(report.table(
      ["part", "ms", "ratio to grad", "XLA kernels", "flops ratio to grad"],
      [(k, report.fmt(r.get("ms_per_step"), ".3f"),
        report.fmt(r.get("ratio_of_medians"), ".2f") + "x", r["kernels"],
        report.fmt(r["flops_ratio"], ".2f") + "x") for k, r in rows.items()])))


if __name__ == "__main__":
  experiments.run(main)
