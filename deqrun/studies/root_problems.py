"""Classic small root problems F(z) = 0 (Moré, Garbow & Hillstrom 1981), as DEQ maps z + F(z).

Each problem is batched: F maps (batch, n) to (batch, n). Written as the fixed point of
f(z) = z + F(z), most of them are neither contractive nor well scaled: a hard test for the
forward solvers, compared against scipy's nonlinear solvers and torchdeq in
scripts/solver_suite.py and tests/test_core_solvers.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Residual = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RootProblem:
    """A named system F(z) = 0 with its standard starting point."""

    name: str
    residual: Residual
    start: tuple

    def z0(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(self.start, dtype=dtype).unsqueeze(0)

    def fixed_point_map(self) -> Residual:
        """f(z) = z + F(z), whose fixed points are the roots of F."""
        return lambda z: z + self.residual(z)


def rosenbrock(z: torch.Tensor) -> torch.Tensor:
    x1, x2 = z.unbind(1)
    return torch.stack([10 * (x2 - x1**2), 1 - x1], dim=1)


def powell_badly_scaled(z: torch.Tensor) -> torch.Tensor:
    x1, x2 = z.unbind(1)
    return torch.stack([1e4 * x1 * x2 - 1, torch.exp(-x1) + torch.exp(-x2) - 1.0001], dim=1)


def helical_valley(z: torch.Tensor) -> torch.Tensor:
    x1, x2, x3 = z.unbind(1)
    theta = torch.atan2(x2, x1) / (2 * math.pi)
    radius = torch.sqrt(x1**2 + x2**2)
    return torch.stack([10 * (x3 - 10 * theta), 10 * (radius - 1), x3], dim=1)


def powell_singular(z: torch.Tensor) -> torch.Tensor:
    x1, x2, x3, x4 = z.unbind(1)
    return torch.stack([x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2,
                        math.sqrt(10) * (x1 - x4) ** 2], dim=1)


def trigonometric(z: torch.Tensor) -> torch.Tensor:
    n = z.shape[1]
    index = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    return n - torch.cos(z).sum(1, keepdim=True) + index * (1 - torch.cos(z)) - torch.sin(z)


def _shift(z: torch.Tensor, by: int) -> torch.Tensor:
    """z_{i-by} with zeros outside 1..n (by > 0: previous entries, by < 0: next ones)."""
    out = torch.zeros_like(z)
    if by > 0:
        out[:, by:] = z[:, :-by]
    else:
        out[:, :by] = z[:, -by:]
    return out


def broyden_tridiagonal(z: torch.Tensor) -> torch.Tensor:
    return (3 - 2 * z) * z - _shift(z, 1) - 2 * _shift(z, -1) + 1


def broyden_banded(z: torch.Tensor) -> torch.Tensor:
    terms = z * (1 + z)
    band = sum(_shift(terms, k) for k in range(1, 6)) + _shift(terms, -1)
    return z * (2 + 5 * z**2) + 1 - band


def discrete_boundary_value(z: torch.Tensor) -> torch.Tensor:
    n = z.shape[1]
    h = 1.0 / (n + 1)
    t = torch.arange(1, n + 1, dtype=z.dtype, device=z.device) * h
    return 2 * z - _shift(z, 1) - _shift(z, -1) + h**2 * (z + t + 1) ** 3 / 2


def brown_almost_linear(z: torch.Tensor) -> torch.Tensor:
    n = z.shape[1]
    linear = z + z.sum(1, keepdim=True) - (n + 1)
    return torch.cat([linear[:, :-1], z.prod(1, keepdim=True) - 1], dim=1)


def extended_rosenbrock(z: torch.Tensor) -> torch.Tensor:
    odd, even = z[:, 0::2], z[:, 1::2]
    return torch.stack([10 * (even - odd**2), 1 - odd], dim=2).reshape(z.shape)


def _boundary_start(n: int) -> tuple:
    h = 1.0 / (n + 1)
    return tuple(i * h * (i * h - 1) for i in range(1, n + 1))


PROBLEMS: dict[str, RootProblem] = {p.name: p for p in (
    RootProblem("rosenbrock", rosenbrock, (-1.2, 1.0)),
    RootProblem("powell_badly_scaled", powell_badly_scaled, (0.0, 1.0)),
    RootProblem("helical_valley", helical_valley, (-1.0, 0.0, 0.0)),
    RootProblem("powell_singular", powell_singular, (3.0, -1.0, 0.0, 1.0)),
    RootProblem("trigonometric", trigonometric, (0.1,) * 10),
    RootProblem("broyden_tridiagonal", broyden_tridiagonal, (-1.0,) * 10),
    RootProblem("broyden_banded", broyden_banded, (-1.0,) * 10),
    RootProblem("discrete_boundary_value", discrete_boundary_value, _boundary_start(10)),
    RootProblem("brown_almost_linear", brown_almost_linear, (0.5,) * 10),
    RootProblem("extended_rosenbrock", extended_rosenbrock, (-1.2, 1.0) * 5),
)}
