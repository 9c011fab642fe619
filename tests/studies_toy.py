"""A toy DEQModel and Task for the studies' tests: z = tanh(W z + dropout(U x)), loss <c, z*>."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from deqrun.core import DEQ, DEQStats
from deqrun.models.base import DEQModel
from deqrun.tasks.base import DatasetTask, ModelSpec


class ToyDEQ(DEQModel):
    """f(z) = tanh(W z + dropout(U x)) in float64, ||W||_2 = spectral_norm; counts its calls."""

    def __init__(self, deq: DEQ, width: int = 8, spectral_norm: float = 0.5, dropout: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(width, width, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter(spectral_norm * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(width, width, generator=gen, dtype=torch.float64)
                              / width**0.5)
        self.unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.deq, self.dropout = deq, dropout

    def f(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + injection)

    def forward(self, inputs: torch.Tensor, pretrain: bool = False) -> tuple[Any, DEQStats]:
        self.calls += 1
        injection = F.dropout(inputs @ self.U.T, self.dropout, self.training)
        return self.deq(lambda z: self.f(z, injection), torch.zeros_like(injection), pretrain)


class ToyTask(DatasetTask):
    """Batches (x, c); the loss is <c, z*> summed over the batch."""

    name, metric, higher_is_better = "toy", "loss", False

    def __init__(self, width: int = 8, samples: int = 12, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, width, generator=gen, dtype=torch.float64)
        c = torch.randn(samples, width, generator=gen, dtype=torch.float64)
        super().__init__(TensorDataset(x, c), TensorDataset(x, c))
        self.width = width

    def model_spec(self) -> ModelSpec:
        return ModelSpec("toy", (self.width,), self.width)

    def model_input(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return (output * batch[1]).sum()

    def metric_sums(self, output: torch.Tensor, batch: Any) -> dict[str, float]:
        return {"loss": float(self.loss(output, batch)), "samples": len(batch[0])}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / sums["samples"]}


def dense_exact(model: ToyDEQ, batch: Any) -> list[torch.Tensor]:
    """d<c, z*>/d(W, U, unused) by a dense solve of (I - J)^T w = c (no dropout)."""
    x, c = batch
    with torch.no_grad():
        injection = x @ model.U.T
        z = torch.zeros_like(c)
        for _ in range(500):
            z = model.f(z, injection)
        slope = 1 - z**2
        J = slope.unsqueeze(2) * model.W.unsqueeze(0)
        eye = torch.eye(J.shape[1], dtype=J.dtype)
        w = torch.linalg.solve((eye - J).transpose(1, 2), c.unsqueeze(2)).squeeze(2)
        s = w * slope
        return [s.T @ z, s.T @ x, torch.zeros_like(model.unused)]
