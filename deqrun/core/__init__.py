"""deqrun's implicit-layer engine: solvers, gradient methods, the DEQ layer, norms, Jacobian tools.

It knows nothing of data, tasks, models, Hydra or loggers.
"""

from .deq import DEQ, DEQStats
from .gradients import GRADIENTS, outer_gradient, register_gradient
from .jacobian import jacobian_penalty, spectral_radius
from .jiio import JIIO, InputProblem, JIIOOptions, JIIOResult, joint_solve
from .norm import apply_spectral_norm, apply_weight_norm, reset_norms
from .solvers import (
    SOLVERS,
    LowRankInverse,
    SolverResult,
    check_solver_options,
    register_solver,
    solver_option_names,
)
from .state import StateLayout

__all__ = [
    "DEQ", "DEQStats", "GRADIENTS", "InputProblem", "JIIO", "JIIOOptions", "JIIOResult",
    "SOLVERS", "LowRankInverse", "SolverResult", "StateLayout",
    "apply_spectral_norm", "apply_weight_norm", "check_solver_options", "jacobian_penalty",
    "register_gradient", "register_solver", "reset_norms", "solver_option_names",
    "joint_solve", "outer_gradient", "spectral_radius",
]
