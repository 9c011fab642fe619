"""Part 1: a synthetic layer f(z) = tanh(W z + U x) in float64, with a dense exact gradient."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from deqrun.core import DEQ
from deqrun.studies.gradcheck import cosine

from .methods import Method

WIDTHS = (32, 64, 128)
SPECTRAL_NORMS = (0.5, 0.7, 0.9, 0.95)
SEEDS = 5
SYNTHETIC_BATCH = 16
SYNTHETIC_FORWARD = dict(solver="broyden", f_max_iter=60, f_tol=1e-10, stop_mode="abs")
TIGHT_FORWARD = dict(solver="anderson", f_max_iter=500, f_tol=1e-13, stop_mode="abs")
SYNTHETIC_FIELDS = ["width", "spectral_norm", "seed", "method", "k", "lambda", "cosine",
                    "forward_residual", "w_spectral_radius"]


@dataclass
class SyntheticLayer:
    """f(z) = tanh(W z + U x) on (batch, width) states in float64, with a linear loss <c, z*>."""

    W: torch.Tensor
    U: torch.Tensor
    x: torch.Tensor
    cotangent: torch.Tensor

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """The layer map."""
        return torch.tanh(z @ self.W.T + self.x @ self.U.T)

    def params(self) -> list[torch.Tensor]:
        """The parameters whose gradient is compared."""
        return [self.W, self.U]


def make_layer(width: int, spectral_norm: float, seed: int,
               batch: int = SYNTHETIC_BATCH) -> SyntheticLayer:
    """A random layer whose W has exactly the given spectral norm (the seed fixes its direction)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=gen, dtype=torch.float64)
    W = spectral_norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    cotangent = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return SyntheticLayer(W.requires_grad_(), U.requires_grad_(), x, cotangent)


def tight_fixed_point(layer: SyntheticLayer) -> torch.Tensor:
    """z* to about machine precision (Anderson, abs tol 1e-13)."""
    deq = DEQ(**TIGHT_FORWARD)
    result = deq.solve(layer.f, torch.zeros_like(layer.cotangent), TIGHT_FORWARD["f_max_iter"],
                       TIGHT_FORWARD["f_tol"])
    return result.z.detach()


def exact_gradient(layer: SyntheticLayer, z_star: torch.Tensor) -> list[torch.Tensor]:
    """Dense IFT: w = (I - J)^-T c per sample, then w^T df/d(W, U)."""
    with torch.no_grad():
        slope = 1 - z_star**2
        J = slope.unsqueeze(2) * layer.W.unsqueeze(0)
        eye = torch.eye(J.shape[1], dtype=J.dtype)
        w = torch.linalg.solve((eye - J).transpose(1, 2), layer.cotangent.unsqueeze(2))
        s = w.squeeze(2) * slope
        return [s.T @ z_star, s.T @ layer.x]


def method_gradient(layer: SyntheticLayer, method: Method) -> tuple[list[torch.Tensor], float]:
    """d<c, z*>/d(W, U) with `method` through deqrun.core.DEQ, and the forward residual reached."""
    deq = DEQ(grad=method.grad, **SYNTHETIC_FORWARD, **dict(method.options))
    z, stats = deq(layer.f, torch.zeros_like(layer.cotangent))
    grads = torch.autograd.grad((z * layer.cotangent).sum(), layer.params())
    return list(grads), float(stats.abs_residual.max())


def synthetic_rows(width: int, spectral_norm: float, seed: int, methods: list[Method],
                   batch: int = SYNTHETIC_BATCH) -> list[dict[str, Any]]:
    """One CSV row per method for one random layer."""
    layer = make_layer(width, spectral_norm, seed, batch)
    exact = exact_gradient(layer, tight_fixed_point(layer))
    radius = float(torch.linalg.eigvals(layer.W.detach()).abs().max())
    rows = []
    for method in methods:
        grads, residual = method_gradient(layer, method)
        rows.append(dict(width=width, spectral_norm=spectral_norm, seed=seed, **method.columns(),
                         cosine=cosine(grads, exact), forward_residual=residual,
                         w_spectral_radius=radius))
    return rows


def synthetic_study(widths: Iterable[int], spectral_norms: Iterable[float], seeds: int,
                    methods: list[Method], batch: int = SYNTHETIC_BATCH) -> list[dict[str, Any]]:
    """Rows for every (width, spectral norm, seed, method)."""
    return [row for width in widths for norm in spectral_norms for seed in range(seeds)
            for row in synthetic_rows(width, norm, seed, methods, batch)]
