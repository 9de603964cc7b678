"""Measures lrcr's curvature against references: dense float64, and float32.

    python -m experiments.exactness

`main` prints the relative errors of slope and curvature against g . grad F
and g^T (jax.hessian F) g in float64: random MLPs (depths 1-6, four
activations, bias on/off; eq. 39's printed gap for ReLU nets without bias),
then the flax models of tests/zoo.py. `float32_errors` measures the float32
engine on the default device against a float64 reference on the CPU;
`float32_lines` renders its result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import lrcr
import experiments
from experiments import bench
from experiments import report
from experiments import steps

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh,
               "softplus": jax.nn.softplus, "gelu": jax.nn.gelu}


def _directionals(loss_fn, params, x, y, direction, lr):
  """([slope, curvature] by the engine (dense sweep; Gram form along g) and
  forward-over-forward, g, g_gram) along g = -lr grad F and `direction`."""
  _, grads, curv = lrcr.value_grad_and_curvature(loss_fn, params, x, y)
  _, grads_g, curv_gram = lrcr.value_grad_and_curvature(
      loss_fn, params, x, y, gradient_direction=True)
  g = jax.tree.map(lambda a: -lr * a, grads)
  g_gram = jax.tree.map(lambda a: -lr * a, grads_g)
  fof = lambda d: lrcr.autodiff_directional(  # noqa: E731
      lambda p: loss_fn(p, x, y), params, d)
  pick = lambda d: jnp.stack([d.slope, d.curvature])  # noqa: E731
  out = {"grad/engine": pick(curv(params, g)),
         "grad/engine_gram": pick(curv_gram(params, g_gram)),
         "grad/fof": pick(fof(g)),
         "random/engine": pick(curv(params, direction)),
         "random/fof": pick(fof(direction))}
  return out, g, g_gram


def _reference(loss_fn, params, x, y, direction):
  """[slope, curvature] by f-o-f (the reference) and by the engine."""
  fof = lrcr.autodiff_directional(lambda p: loss_fn(p, x, y), params,
                                  direction)
  _, _, curv = lrcr.value_grad_and_curvature(loss_fn, params, x, y)
  eng = curv(params, direction)
  return (jnp.stack([fof.slope, fof.curvature]),
          jnp.stack([eng.slope, eng.curvature]))


def _problems(width, depth, input_dim, init_scales):
  """(init scale, params, a random direction) per scale."""
  out = []
  for scale in init_scales:
    model = lrcr.MLP((width,) * depth, 10,
                     kernel_init=lrcr.uniform_init(scale))
    params = model.init(jax.random.key(2),
                        jnp.zeros((1, input_dim)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(treedef, [
        0.01 * jax.random.normal(k, a.shape, a.dtype)
        for a, k in zip(leaves, keys)])
    out.append((scale, params, direction))
  return out


def _cases(loss_fn, runs, x, y) -> tuple[list[dict[str, Any]], str, str]:
  """The float32 runs against float64 on the CPU; (cases, device, dtype)."""
  cpu = jax.devices("cpu")[0]
  cases, where = [], ("", "")
  with jax.enable_x64(True), jax.default_device(cpu):
    to64 = lambda t: jax.device_put(  # noqa: E731
        jax.tree.map(lambda a: np.asarray(a, np.float64), t), cpu)
    x64, y64 = to64(x), jax.device_put(np.asarray(y), cpu)
    ref_fn = jax.jit(lambda p, d: _reference(loss_fn, p, x64, y64, d))
    for scale, prec, params, direction, f32, g, g_gram in runs:
      refs = {}
      for name, d in (("grad", g), ("grad_gram", g_gram),
                      ("random", direction)):
        fof, eng = ref_fn(to64(params), to64(d))
        where = (str(list(fof.devices())[0]), str(fof.dtype))
        refs[name] = (np.asarray(fof, np.float64), np.asarray(eng, np.float64))
      for key, value in f32.items():
        dname, method = key.split("/")
        ref, eng64 = refs["grad_gram" if method == "engine_gram" else dname]
        value = np.asarray(value, np.float64)
        cases.append(dict(
            init_scale=scale, precision=prec, direction=dname,
            method=method, slope=value[0], curvature=value[1],
            ref_slope=ref[0], ref_curvature=ref[1],
            rel_err_slope=report.rel_err(value[0], ref[0]),
            rel_err_curvature=report.rel_err(value[1], ref[1]),
            f64_engine_vs_fof=max(report.rel_err(eng64[0], ref[0]),
                                  report.rel_err(eng64[1], ref[1]))))
  return cases, *where


def float32_errors(width: int, depth: int, batch: int, *,
                   init_scales: Sequence[float] = (0.1, 0.2),
                   precisions: Sequence[str] = ("default", "highest")
                   ) -> dict[str, Any]:
  """The float32 engine and f-o-f against a float64 f-o-f reference on CPU.

  The width x depth paper MLP, initialized U(-s, s) for each s of
  `init_scales`, on a random batch, traced under each matmul precision
  ("default" or a `jax.default_matmul_precision` name).

  Returns:
    network, batch, learning_rate, compile_s, reference_device and _dtype,
    cases (per scale, precision, direction and method), max_rel_err
    [precision] = {engine, fof} and f64_engine_vs_fof_max.
  """
  lr = bench.SGD_LR
  loss_fn = steps.cross_entropy_loss_fn(bench.paper_mlp(width, depth))
  _, _, x, y = bench.make_problem(width, depth, batch, seed=1)
  problems = _problems(width, depth, x.shape[1], init_scales)
  compiled, compile_s = {}, {}
  for prec in precisions:
    compiled[prec], compile_s[prec] = bench.compile_step(
        lambda p, xx, yy, d: _directionals(loss_fn, p, xx, yy, d, lr),
        (problems[0][1], x, y, problems[0][2]), prec)
  runs = []                           # float32 first, outside x64
  for scale, params, direction in problems:
    for prec in precisions:
      f32, g, g_gram = jax.device_get(compiled[prec](params, x, y, direction))
      runs.append((scale, prec, jax.device_get(params),
                   jax.device_get(direction), f32, g, g_gram))
  cases, device, dtype = _cases(loss_fn, runs, np.asarray(x), y)

  def worst(prec, methods):
    errs = [max(c["rel_err_slope"], c["rel_err_curvature"]) for c in cases
            if c["precision"] == prec and c["method"] in methods]
    return max(errs) if errs else None

  return dict(
      network=f"{depth}x{width}", batch=batch, learning_rate=lr,
      compile_s=compile_s, reference_device=device, reference_dtype=dtype,
      cases=cases, f64_engine_vs_fof_max=max(
          c["f64_engine_vs_fof"] for c in cases),
      max_rel_err={p: dict(engine=worst(p, ("engine", "engine_gram")),
                           fof=worst(p, ("fof",))) for p in precisions})


def float32_lines(r: dict[str, Any]) -> list[str]:
  """A `float32_errors` result as markdown: its setting and two tables."""
  g = report.fmt
  return [
      "", f"{r['network']} net, batch {r['batch']}, random data; reference: "
      f"forward-over-forward in {r['reference_dtype']} on "
      f"{r['reference_device']} (the float64 engine agrees with it to "
      f"{g(r['f64_engine_vs_fof_max'], '.1e')}). Directions: -lr grad F "
      "(SGD) and a random one.", ""] + report.table(
          ["precision", "max rel err, engine", "max rel err, f-o-f"],
          [(p, g(e["engine"], ".2e"), g(e["fof"], ".2e"))
           for p, e in r["max_rel_err"].items()]) + [""] + report.table(
              ["init", "precision", "direction", "method", "slope",
               "rel err", "curvature", "rel err"],
              [(f"U(±{c['init_scale']})", c["precision"], c["direction"],
                c["method"], g(c["slope"], ".6e"),
                g(c["rel_err_slope"], ".1e"), g(c["curvature"], ".6e"),
                g(c["rel_err_curvature"], ".1e")) for c in r["cases"]])


def _mlp_rows(rng) -> tuple[np.ndarray, list[float]]:
  """[slope, curvature] relative errors of random MLPs; eq. 39's gaps."""
  from experiments import eq39  # pylint: disable=import-outside-toplevel
  from tests import reference  # pylint: disable=import-outside-toplevel
  rows, gaps = [], []
  for i, (act, bias) in enumerate(itertools.product(ACTIVATIONS,
                                                    (False, True))):
    for depth in range(1, 7):
      hidden = tuple(int(w) for w in rng.integers(2, 9, size=depth))
      seed = 100 * i + depth
      model, params, x, y = reference.make_problem(
          seed, hidden, int(rng.integers(2, 11)), 7, 5,
          activation=ACTIVATIONS[act], use_bias=bias, scale=0.8)
      g = reference.random_direction(seed + 1, params)
      s, h, _ = reference.dense_reference(model, params, x, y, g)
      d = lrcr.directional(model, params, x, y, g)
      if min(abs(float(s)), abs(float(h))) < 1e-12:
        continue  # a dead ReLU net: both sides are exactly zero
      rows.append((report.rel_err(float(d.slope), float(s)),
                   report.rel_err(float(d.curvature), float(h))))
      if act == "relu" and not bias and depth > 1 and abs(float(h)) > 1e-8:
        r = eq39.eq39(model, params, x, y, g)
        gaps.append(report.rel_err(float(r.as_printed), float(h)))
  return np.array(rows), gaps


def _zoo_row(name: str) -> list[Any]:
  """Max relative errors (slope, curvature, Gram form) of a zoo model."""
  from tests import zoo  # pylint: disable=import-outside-toplevel
  errs = []
  for seed in range(3):
    loss_fn, params, batch = zoo.make(name, seed)
    grad_ref, hess = zoo.dense(loss_fn, params, batch)
    _, grads, cf = lrcr.value_grad_and_curvature(loss_fn, params, *batch)
    _, _, gram = lrcr.value_grad_and_curvature(
        loss_fn, params, *batch, gradient_direction=True)
    dirs = [zoo.random_like(params, seed + 10), grads,
            jax.tree.map(lambda a: -0.5 * a, grads)]
    for k, d in enumerate(dirs):
      g = jax.flatten_util.ravel_pytree(d)[0]
      out, h = cf(params, d), float(g @ hess @ g)
      errs.append((report.rel_err(float(out.slope), float(g @ grad_ref)),
                   report.rel_err(float(out.curvature), h),
                   report.rel_err(float(gram(params, d).curvature), h)
                   if k else 0.0))
  size = jax.flatten_util.ravel_pytree(params)[0].size
  return [name, size] + [f"{e:.1e}" for e in np.max(np.array(errs), axis=0)]


def main(argv):
  del argv
  from tests import zoo  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    errs, gaps = _mlp_rows(np.random.default_rng(0))
    zoo_rows = [_zoo_row(name) for name in zoo.NAMES]
  print(f"cases: {len(errs)} (4 activations x bias on/off x depth 1-6), "
        "float64")
  e = lambda v: f"{v:.2e}"  # noqa: E731
  print("\n".join(report.table(
      ["quantity", "max relative error vs dense", "median"],
      [("slope g.grad F", e(errs[:, 0].max()), e(np.median(errs[:, 0]))),
       ("curvature g^T H g", e(errs[:, 1].max()), e(np.median(errs[:, 1]))),
       ("eq. 39 as printed (ReLU, depth 2-6)", e(max(gaps)),
        e(np.median(gaps)))])))
  print()
  print("\n".join(report.table(
      ["zoo model", "params", "max rel. error, slope", "curvature",
       "Gram form"], zoo_rows)))


if __name__ == "__main__":
  experiments.run(main)
