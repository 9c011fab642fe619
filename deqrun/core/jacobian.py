"""Jacobian regularisation (Hutchinson) and spectral-radius estimates of J = df/dz."""

from __future__ import annotations

from collections.abc import Callable

import torch


def jacobian_penalty(f_out: torch.Tensor, z_in: torch.Tensor, n_samples: int = 1) -> torch.Tensor:
    """Hutchinson estimate of ||J||_F^2 / dim, averaged over the batch, differentiable.

    f_out = f(z_in) for flat (batch, dim) tensors, z_in requiring grad; uses n_samples Gaussian
    probes eps with E ||eps^T J||^2 = ||J||_F^2.
    """
    dim = f_out.shape[1]
    total = f_out.new_zeros(())
    for _ in range(n_samples):
        eps = torch.randn_like(f_out)
        (vjp,) = torch.autograd.grad(f_out, z_in, eps, create_graph=True, retain_graph=True)
        total = total + vjp.pow(2).sum(dim=1).mean() / dim
    return total / n_samples


def spectral_radius(f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor,
                    n_iter: int = 30, seed: int = 0) -> torch.Tensor:
    """Power-method estimate of the largest |eigenvalue| of J at z*, per sample (flat states)."""
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        f_out = f(z_in)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(z_in.shape, generator=generator, dtype=z_in.dtype).to(z_in.device)
    v = v / v.norm(dim=1, keepdim=True)
    radius = torch.zeros(z_in.shape[0], dtype=z_in.dtype, device=z_in.device)
    for _ in range(n_iter):
        (w,) = torch.autograd.grad(f_out, z_in, v, retain_graph=True)
        radius = w.norm(dim=1)
        v = w / radius.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(1)
    return radius.detach()
