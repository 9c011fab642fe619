"""Classic small root problems (Moré, Garbow & Hillstrom) written as z = z + F(z): our Broyden
(plain and with line search) against torchdeq 0.1.0's Broyden (when installed) and scipy.

    python scripts/solver_suite.py [--max-iter 100] [--tol 1e-8]

Prints, per problem, the final ||F(z)|| and f evaluations of each solver (float64, abs tol).
scipy's broyden1 runs through scipy.optimize.root (its own line search); hybr (MINPACK's
Powell hybrid method, with a Jacobian by finite differences) is the reference root finder.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import scipy.optimize
import torch

from deqrun.core import SOLVERS
from deqrun.studies.root_problems import PROBLEMS, RootProblem


def ours(problem: RootProblem, args, **options) -> tuple[float, int]:
    result = SOLVERS["broyden"](problem.fixed_point_map(), problem.z0(), max_iter=args.max_iter,
                                tol=args.tol, stop_mode="abs", **options)
    return float(result.abs_residual), result.n_f_evals


def torchdeq(problem: RootProblem, args) -> tuple[float, int] | None:
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return None
    f = problem.fixed_point_map()
    z, _, info = get_solver("broyden")(f, problem.z0(), max_iter=args.max_iter, tol=args.tol,
                                        stop_mode="abs")
    return float((f(z) - z).norm()), int(info["nstep"].max())


def scipy_root(problem: RootProblem, args, method: str) -> tuple[float, int]:
    residual = lambda x: problem.residual(torch.tensor(x).unsqueeze(0))[0].numpy()  # noqa: E731
    options = dict(maxiter=args.max_iter, fatol=args.tol) if method == "broyden1" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            solution = scipy.optimize.root(residual, np.array(problem.start), method=method,
                                           options=options)
        except (ValueError, OverflowError, np.linalg.LinAlgError):
            return float("nan"), 0
    return float(np.linalg.norm(residual(solution.x))), int(solution.get("nfev", 0))


def cell(value: tuple[float, int] | None) -> str:
    return f"{'-':>20}" if value is None else f"{value[0]:>12.1e} ({value[1]:>4})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args()
    columns = ("ours", "ours + line search", "torchdeq", "scipy broyden1", "scipy hybr")
    print(f"{'problem':<26}" + "".join(f"{c:>20}" for c in columns))
    for name, problem in PROBLEMS.items():
        row = (ours(problem, args), ours(problem, args, line_search=True),
               torchdeq(problem, args), scipy_root(problem, args, "broyden1"),
               scipy_root(problem, args, "hybr"))
        print(f"{name:<26}" + "".join(cell(v) for v in row))
    print("cells: final ||F(z)|| (f evaluations)")


if __name__ == "__main__":
    main()
