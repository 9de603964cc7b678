"""Measures lrcr's curvature against a dense jax.hessian, and eq. 39's gap.

    python -m experiments.exactness

Prints a markdown table: for random float64 problems (depths 1-6, uneven
widths, 2-10 classes, four activations, with and without bias), the relative
error of lrcr.directional's slope and curvature against g . grad F and
g^T (jax.hessian F) g of the flattened loss, and, for ReLU nets without
biases, the relative gap of eq. 39 as printed. Then the same for the zoo of
flax models in tests/zoo.py (residual + LayerNorm, CNN, GRU, LSTM,
attention, dropout; cross-entropy, MSE, label smoothing, an L2 term), with
random, +grad and -grad directions, for `lrcr.value_grad_and_curvature`.
"""

import itertools

from absl import app
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import lrcr
from experiments import eq39
from tests import reference
from tests import zoo

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh,
               "softplus": jax.nn.softplus, "gelu": jax.nn.gelu}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows, gaps = [], []
  with jax.enable_x64(True):
    for i, (act, bias) in enumerate(itertools.product(ACTIVATIONS, (False, True))):
      for depth in range(1, 7):
        hidden = tuple(int(w) for w in rng.integers(2, 9, size=depth))
        classes = int(rng.integers(2, 11))
        seed = 100 * i + depth
        model, params, x, y = reference.make_problem(
            seed, hidden, classes, 7, 5, activation=ACTIVATIONS[act],
            use_bias=bias, scale=0.8)
        g = reference.random_direction(seed + 1, params)
        s, h, _ = reference.dense_reference(model, params, x, y, g)
        d = lrcr.directional(model, params, x, y, g)
        if min(abs(float(s)), abs(float(h))) < 1e-12:
          continue  # a dead ReLU net: both sides are exactly zero
        rows.append((act, bias, depth, abs(float(d.slope - s)) / abs(float(s)),
                     abs(float(d.curvature - h)) / abs(float(h))))
        if act == "relu" and not bias and depth > 1 and abs(float(h)) > 1e-8:
          r = eq39.eq39(model, params, x, y, g)
          gaps.append(abs(float(r.as_printed - h)) / abs(float(h)))
  errs = np.array([r[3:] for r in rows])
  print(f"cases: {len(rows)} (4 activations x bias on/off x depth 1-6), float64")
  print("| quantity | max relative error vs dense | median |")
  print("|---|---|---|")
  print(f"| slope g.grad F | {errs[:, 0].max():.2e} | {np.median(errs[:, 0]):.2e} |")
  print(f"| curvature g^T H g | {errs[:, 1].max():.2e} | {np.median(errs[:, 1]):.2e} |")
  print(f"| eq. 39 as printed (ReLU, depth 2-6) | {max(gaps):.2e} | {np.median(gaps):.2e} |")
  print()
  print("| zoo model | params | max rel. error, slope | curvature | Gram form |")
  print("|---|---|---|---|---|")
  with jax.enable_x64(True):
    for name in zoo.NAMES:
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
          out = cf(params, d)
          h = g @ hess @ g
          rel = lambda a, b: abs(float(a - b)) / max(abs(float(b)), 1e-300)
          errs.append((rel(out.slope, g @ grad_ref), rel(out.curvature, h),
                       rel(gram(params, d).curvature, h) if k else 0.0))
      e = np.max(np.array(errs), axis=0)
      size = jax.flatten_util.ravel_pytree(params)[0].size
      print(f"| {name} | {size} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} |")


if __name__ == "__main__":
  app.run(main)
