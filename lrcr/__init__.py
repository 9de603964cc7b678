"""lrcr: exact curvature along a direction and Cubic-Regularization steps.

Implements "Understanding and exploiting the low-rank structure of deep
networks": the exact slope and curvature of the batch loss along any search
direction (section 2, appendix B), the Cubic-Regularization (CR) step length
(section 3) as an optax transformation that chains after any base optimizer,
and the paper's network. The engine (`lrcr.engine`) reads the loss's own JAX
program, so it serves any model, not only the paper's.

Modules, in dependency order: `types` (shared types), `cubic` (the step
length), `engine` (a program's second-order adjoint: reading, forward
pass), `sweep` (its tangent sweep and rules), `samples` (whether a loss is
a sum of per-sample terms), `losses` (the paper's loss), `mlp` (the
paper's network), `reference` (autodiff references and fallbacks),
`curvature` (the public engine API), `transform` (the optax
transformation), `averaging` (section 3.1's options).
"""

from lrcr.types import CurvatureFn, Directional, param_groups
from lrcr.cubic import CubicStep, cubic_model, cubic_step, cubic_step_length
from lrcr.engine import UnsupportedProgramError
from lrcr.losses import cross_entropy_loss
from lrcr.mlp import MLP, num_params, uniform_init
from lrcr.reference import (autodiff_curvature_fn, autodiff_directional,
                            reverse_curvature_fn)
from lrcr.curvature import (SampleFactors, WeightFactors, directional,
                            hessian_diagonal, lowrank_curvature_fn,
                            per_sample_factors, value_and_directional,
                            value_grad_and_curvature)
from lrcr.transform import (CubicStepInfo, CubicStepState, cubic_adadelta,
                            cubic_adagrad, cubic_adam, cubic_rmsprop,
                            cubic_sgd, scale_by_cubic_step)
from lrcr import averaging

__version__ = "0.1.0"

__all__ = [
    "CubicStep", "CubicStepInfo", "CubicStepState", "CurvatureFn",
    "Directional", "MLP", "SampleFactors", "UnsupportedProgramError",
    "WeightFactors",
    "autodiff_curvature_fn", "autodiff_directional", "averaging",
    "cross_entropy_loss", "cubic_adadelta", "cubic_adagrad", "cubic_adam",
    "cubic_model", "cubic_rmsprop", "cubic_sgd", "cubic_step",
    "cubic_step_length", "directional", "hessian_diagonal",
    "lowrank_curvature_fn", "num_params", "param_groups",
    "per_sample_factors", "reverse_curvature_fn", "scale_by_cubic_step",
    "uniform_init",
    "value_and_directional", "value_grad_and_curvature",
]
