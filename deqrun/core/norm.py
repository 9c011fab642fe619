"""Weight norm and spectral norm for the layers of f, recomputed once per training step.

torch's parametrizations recompute the normalised weight at every access, i.e. once per solver
iteration. Here the normalised weight is a plain tensor attribute that `reset_norms` recomputes
once (with autograd on, so gradients reach the raw parameters); every call of f in that step
reuses it.
"""

from __future__ import annotations

import torch
from torch import nn

NORMED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _WeightNorm:
    """w = g * v / ||v|| with the norm over every dimension but `dim`."""

    def __init__(self, module: nn.Module, name: str, dim: int) -> None:
        self.name, self.dim = name, dim
        weight = getattr(module, name).detach()
        del module._parameters[name]
        module.register_parameter(name + "_g", nn.Parameter(_norm_except(weight, dim)))
        module.register_parameter(name + "_v", nn.Parameter(weight.clone()))

    def compute(self, module: nn.Module) -> torch.Tensor:
        g, v = getattr(module, self.name + "_g"), getattr(module, self.name + "_v")
        return v * (g / _norm_except(v, self.dim).clamp_min(1e-12))


class _SpectralNorm:
    """w = w_orig / max(1, sigma / clip); sigma by power iteration on w_orig viewed as (out, -1)."""

    def __init__(self, module: nn.Module, name: str, clip: float, n_power_iterations: int) -> None:
        if clip <= 0:
            raise ValueError(f"spectral norm clip must be > 0, got {clip}")
        self.name, self.clip, self.n_power_iterations = name, clip, n_power_iterations
        weight = getattr(module, name).detach()
        del module._parameters[name]
        module.register_parameter(name + "_orig", nn.Parameter(weight.clone()))
        matrix = weight.reshape(weight.shape[0], -1)
        generator = torch.Generator().manual_seed(0)
        u = torch.randn(matrix.shape[0], generator=generator, dtype=weight.dtype)
        v = torch.randn(matrix.shape[1], generator=generator, dtype=weight.dtype)
        module.register_buffer(name + "_u", nn.functional.normalize(u, dim=0).to(weight.device))
        module.register_buffer(name + "_v", nn.functional.normalize(v, dim=0).to(weight.device))
        self.power_iterate(module, 15)

    def power_iterate(self, module: nn.Module, n: int) -> None:
        matrix = getattr(module, self.name + "_orig").detach().reshape(
            getattr(module, self.name + "_u").shape[0], -1)
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        with torch.no_grad():
            for _ in range(n):
                v.copy_(nn.functional.normalize(matrix.t() @ u, dim=0))
                u.copy_(nn.functional.normalize(matrix @ v, dim=0))

    def compute(self, module: nn.Module) -> torch.Tensor:
        if module.training and torch.is_grad_enabled():
            self.power_iterate(module, self.n_power_iterations)
        weight = getattr(module, self.name + "_orig")
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        sigma = torch.dot(u, weight.reshape(u.shape[0], -1) @ v)
        return weight / torch.clamp(sigma / self.clip, min=1.0)


def _norm_except(weight: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(weight.dim()) if d != dim]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def _normed_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, NORMED_TYPES)]


def _attach(layer: nn.Module, name: str, norm) -> None:
    if hasattr(layer, "_deqrun_norms") and name in layer._deqrun_norms:
        raise ValueError(f"{type(layer).__name__}.{name} already has a norm")
    layer.__dict__.setdefault("_deqrun_norms", {})[name] = norm
    with torch.no_grad():
        setattr(layer, name, norm.compute(layer))


def apply_weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Weight-normalise every conv/linear layer inside `module` (in place; returns it)."""
    for layer in _normed_layers(module):
        _attach(layer, name, _WeightNorm(layer, name, dim))
    return module


def apply_spectral_norm(module: nn.Module, clip: float = 1.0, name: str = "weight",
                        n_power_iterations: int = 1) -> nn.Module:
    """Clip the spectral norm of every conv/linear layer inside `module` at `clip` (in place)."""
    for layer in _normed_layers(module):
        _attach(layer, name, _SpectralNorm(layer, name, clip, n_power_iterations))
    return module


def reset_norms(module: nn.Module) -> None:
    """Recompute every normalised weight inside `module`; call once per forward/training step."""
    for layer in module.modules():
        for name, norm in getattr(layer, "_deqrun_norms", {}).items():
            setattr(layer, name, norm.compute(layer))
