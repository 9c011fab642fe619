"""Shared fixtures: a small tanh implicit layer with dense exact answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class TanhLayer:
    """f(z) = tanh(W z + U x + b) on (batch, width) states, float64."""

    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor

    def params(self) -> list[torch.Tensor]:
        return [self.W, self.U, self.b, self.x]

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.x @ self.U.T + self.b)

    def fixed_point(self) -> torch.Tensor:
        z = torch.zeros_like(self.x[:, : self.W.shape[0]])
        with torch.no_grad():
            for _ in range(2000):
                z_next = self.f(z)
                if (z_next - z).abs().max() < 1e-15:
                    break
                z = z_next
        return z_next

    def jacobians(self, z_star: torch.Tensor) -> torch.Tensor:
        """J per sample, (batch, width, width): diag(1 - z*^2) W."""
        return (1 - z_star**2).unsqueeze(2) * self.W.detach().unsqueeze(0)

    def param_grads(self, z_star: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """w^T df/d(W, U, b, x) at z in closed form, for per-sample adjoints w."""
        with torch.no_grad():
            s = w * (1 - self.f(z_star) ** 2)
        return [s.T @ z_star, s.T @ self.x.detach(), s.sum(0), s @ self.U.detach()]


def make_tanh_layer(width: int = 40, batch: int = 3, spectral_norm: float = 0.9,
                    seed: int = 0, normal: bool = True) -> TanhLayer:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=gen, dtype=torch.float64)
    if not normal:
        W = torch.triu(W)
    W = spectral_norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5
    b = 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return TanhLayer(*(t.requires_grad_() for t in (W, U, b, x)))


@pytest.fixture
def tanh_layer() -> TanhLayer:
    return make_tanh_layer()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
