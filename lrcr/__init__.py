"""lrcr: exact low-rank curvature and Cubic-Regularization step lengths in JAX.

Implements "Understanding and exploiting the low-rank structure of deep
networks": per-sample low-rank factors of the gradient and Hessian of a
feedforward network, the exact slope and curvature of the batch loss along any
search direction in time linear in depth, and the Cubic-Regularization (CR)
step length as an optax transformation that chains after any base optimizer.
"""

from lrcr.blocks import (hessian_diagonal, layer_directional,
                         variable_directional)
from lrcr.cubic import CubicStep, cubic_model, cubic_step, cubic_step_length
from lrcr.directional import (Directional, autodiff_curvature_fn,
                              autodiff_directional, directional,
                              lowrank_curvature_fn, value_and_directional)
from lrcr.fused import (cached_curvature_fn, cached_directional,
                        value_grad_and_cache)
from lrcr.factors import Factors, factor_gradients, per_sample_factors
from lrcr.mlp import MLP, cross_entropy_loss, num_params, uniform_init
from lrcr.nets import (Activation, AvgPool, Conv, Dense, Flatten, MaxPool,
                       Recurrent, Sequential)
from lrcr.transform import (CubicStepInfo, CubicStepState, cubic_adadelta,
                            cubic_adagrad, cubic_adam, cubic_rmsprop,
                            cubic_sgd, layer_prefix, scale_by_cubic_step)

from lrcr import averaging, eq39  # submodules named in the docs: lrcr.averaging...

__version__ = "0.1.0"

__all__ = [
    "CubicStep", "CubicStepInfo", "CubicStepState", "Directional", "Factors",
    "MLP", "autodiff_curvature_fn", "autodiff_directional", "cross_entropy_loss",
    "cubic_adadelta", "cubic_adagrad", "cubic_adam", "cubic_model",
    "cubic_rmsprop", "cubic_sgd", "cubic_step", "cubic_step_length",
    "directional", "factor_gradients", "lowrank_curvature_fn", "num_params",
    "per_sample_factors", "scale_by_cubic_step", "uniform_init",
    "value_and_directional", "hessian_diagonal", "layer_directional",
    "variable_directional", "cached_curvature_fn", "cached_directional",
    "value_grad_and_cache", "layer_prefix", "Sequential", "Dense", "Conv",
    "Activation", "AvgPool", "MaxPool", "Flatten", "Recurrent",
]
