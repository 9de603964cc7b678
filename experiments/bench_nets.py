"""The CR step on convolutional, recurrent and attention nets, against SGD.

    python -m experiments.bench_nets [--repeats=11] [--batches=32,256] \
        [--out=DIR]

Measures (`bench.measure`, float32, random inputs; `--repeats=0` counts
without timing) the loop's own steps, `STEPS`: SGD, and CR-SGD by the
engine's Gram form, forward-over-forward and a Hessian-vector product, on
the CNN of configs/cifar10_cnn_sgd_plateau.py, the RNN of
configs/sequence_rnn_sgd.py, a self-attention classifier and the paper's
12x128 MLP, and judges `GOAL`.
"""

from collections.abc import Sequence
import importlib
from typing import Any

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lrcr
import experiments
from experiments import bench
from experiments import models
from experiments import report
from experiments import steps
from experiments.report import Goal

_REPEATS = flags.DEFINE_integer("repeats", 11, "Timing repeats.")
_BATCHES = flags.DEFINE_list("batches", ["32", "256"], "Batch sizes.")
_OUT = flags.DEFINE_string("out", "", "Directory for bench_nets.{md,json} "
                           "('' for stdout only).")

STEPS = ("sgd", "cr_engine", "cr_autodiff", "cr_hvp")
#: The performance target: the engine CR step launches fewer kernels than
#: forward-over-forward on every net (bar), at most 0.6x as many (goal).
GOAL = Goal("engine CR step's kernels / forward-over-forward's, every net "
            "and batch (worst)", "<", 1.0, 0.6, "performance target", "<=")


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
  yield "mlp 12x128 (paper)", bench.paper_mlp(128, 12), (784,), 100.0


def measure_net(model, shape: tuple[int, ...], sigma: float, batch: int, *,
                repeats: int, sample_s: float = 0.03) -> dict[str, Any]:
  """`bench.measure` of the `STEPS` of one net, each against SGD's; and
  engine_over_fof_kernels."""
  x = jax.random.uniform(jax.random.key(0), (batch,) + shape)
  y = jnp.arange(batch) % 10
  params = model.init(jax.random.key(1), x)["params"]
  sgd, cr = optax.sgd(0.01), lrcr.cubic_sgd(sigma, 0.01)
  fns = {"sgd": (steps.make_base_step(model, sgd), sgd)}
  for name in STEPS[1:]:
    fns[name] = (steps.make_cr_step(model, cr, steps.CROptions(
        curvature=name[3:], gradient_direction=True)), cr)
  entries = {}
  for name, (step, tx) in fns.items():
    args = (params, tx.init(params), x, y)
    entries[name] = dict(compiled=bench.compile_step(steps.applied(step),
                                                     args)[0],
                         args=args, base="sgd")
  v = bench.measure(entries, repeats=repeats, sample_s=sample_s)
  return dict(batch=batch, variants=v, engine_over_fof_kernels=(
      v["cr_engine"]["kernels"] / v["cr_autodiff"]["kernels"]))


def evaluate_goal(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`GOAL` judged on the worst net and batch of `rows`."""
  if not rows:
    return report.judge(GOAL, None)
  worst = max(rows, key=lambda r: r["engine_over_fof_kernels"])
  kernels = {k: worst["variants"][k]["kernels"] for k in STEPS}
  return report.judge(GOAL, worst["engine_over_fof_kernels"], (
      f"worst: {worst['net']} b{worst['batch']}: {kernels['cr_engine']} vs "
      f"{kernels['cr_autodiff']} = {worst['engine_over_fof_kernels']:.2f}x; "
      + ", ".join(f"{r['net']} b{r['batch']} "
                  f"{r['engine_over_fof_kernels']:.2f}x" for r in rows)))


def _row(r: dict[str, Any]) -> list[Any]:
  v = r["variants"]
  times = lambda x: report.fmt(x, ".2f") + ("x" if x is not None else "")
  ms = {k: v[k].get("ms_per_step") for k in STEPS}
  return [r["net"], r["batch"], report.fmt(ms["sgd"], ".2f"),
          *(times(v[k].get("ratio")) for k in STEPS[1:]),
          times(report.ratio(ms["cr_autodiff"], ms["cr_engine"])),
          f"{v['cr_engine']['flops_ratio']:.2f}x",
          " / ".join(str(v[k]["kernels"]) for k in STEPS),
          f"{v['cr_engine']['kernel_ratio']:.2f}x, "
          f"{v['cr_autodiff']['kernel_ratio']:.2f}x",
          f"{r['engine_over_fof_kernels']:.2f}x"]


def _markdown(env_line: str, rows, goal) -> str:
  lines = [f"- {env_line}", ""] + report.table(
      ["net", "batch", "sgd ms", "CR engine", "CR forward-over-forward",
       "CR hvp", "engine speed-up over fwd-over-fwd", "floor (flops)",
       "kernels: sgd / engine / fwd-over-fwd / hvp",
       "kernels / sgd: engine, fwd-over-fwd", "engine / fwd-over-fwd kernels"],
      [_row(r) for r in rows])
  return "\n".join(lines + ["", "Goal:", ""] + report.goals_table([goal]))


def main(argv: Sequence[str]) -> None:
  del argv
  rows = []
  for name, model, shape, sigma in _nets():
    for batch in (int(b) for b in _BATCHES.value):
      rows.append(dict(net=name, **measure_net(model, shape, sigma, batch,
                                               repeats=_REPEATS.value)))
      print(f"[bench_nets] {name} b{batch} done", flush=True)
  goal = evaluate_goal(rows)
  stamp = report.stamp(report.command_line("experiments.bench_nets"))
  markdown = "# lrcr on other nets\n\n" + _markdown(
      report.environment_line(stamp["environment"]), rows, goal)
  print(markdown, flush=True)
  if _OUT.value:
    report.write(_OUT.value, "bench_nets", dict(stamp, nets=rows, goal=goal),
                 markdown)


if __name__ == "__main__":
  experiments.run(main)
