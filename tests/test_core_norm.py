"""Weight norm and spectral norm: values, gradients, once-per-step recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqrun.core import DEQ, apply_spectral_norm, apply_weight_norm, reset_norms
from deqrun.core import norm as norm_module


def test_weight_norm_starts_at_the_original_weight_and_trains_g_and_v():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3)
    original = layer.weight.detach().clone()
    apply_weight_norm(layer)
    assert {n for n, _ in layer.named_parameters()} == {"bias", "weight_g", "weight_v"}
    assert torch.allclose(layer.weight, original, atol=1e-6)
    reset_norms(layer)
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    assert layer.weight_g.grad is not None and layer.weight_v.grad is not None
    assert layer.weight_g.shape == (6, 1, 1, 1)


def test_weight_norm_scales_with_g():
    layer = apply_weight_norm(nn.Linear(5, 3))
    with torch.no_grad():
        layer.weight_g.mul_(2.0)
    reset_norms(layer)
    norms = layer.weight.norm(dim=1)
    assert torch.allclose(norms, layer.weight_g.squeeze(1))


def test_norms_recomputed_once_per_deq_call_not_per_iteration(monkeypatch):
    calls = {"n": 0}
    compute = norm_module._WeightNorm.compute

    def counting(self, module):
        calls["n"] += 1
        return compute(self, module)

    monkeypatch.setattr(norm_module._WeightNorm, "compute", counting)
    layer = apply_weight_norm(nn.Linear(8, 8))
    calls["n"] = 0
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=20, f_tol=1e-12)
    x = torch.randn(3, 8)
    reset_norms(layer)
    z, stats = deq(lambda z: torch.tanh(0.5 * layer(z) + x), torch.zeros(3, 8))
    z.sum().backward()
    assert calls["n"] == 1 and stats.forward.n_f_evals > 5
    assert layer.weight_v.grad is not None and layer.weight_v.grad.abs().sum() > 0


def test_spectral_norm_clips_large_and_keeps_small_weights():
    torch.manual_seed(0)
    big, small = nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        big.weight.mul_(3.0 / torch.linalg.matrix_norm(big.weight, 2))
        small.weight.mul_(0.5 / torch.linalg.matrix_norm(small.weight, 2))
    original_small = small.weight.detach().clone()
    apply_spectral_norm(big, clip=0.97, n_power_iterations=5)
    apply_spectral_norm(small, clip=0.97, n_power_iterations=5)
    for _ in range(10):
        reset_norms(big)
        reset_norms(small)
    assert float(torch.linalg.matrix_norm(big.weight.detach(), 2)) == pytest.approx(0.97, rel=1e-3)
    assert torch.allclose(small.weight, original_small)


def test_spectral_norm_gradient_reaches_the_raw_weight():
    layer = apply_spectral_norm(nn.Linear(6, 6), clip=0.5)
    reset_norms(layer)
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    assert layer.weight_orig.grad is not None and layer.weight_orig.grad.abs().sum() > 0


def test_state_dict_round_trip_restores_the_normalised_weight():
    a = apply_weight_norm(nn.Linear(4, 4))
    b = apply_weight_norm(nn.Linear(4, 4))
    b.load_state_dict(a.state_dict())
    reset_norms(b)
    assert "weight" not in a.state_dict()
    assert torch.allclose(a.weight, b.weight)


def test_applying_a_norm_twice_is_refused():
    layer = apply_weight_norm(nn.Linear(3, 3))
    with pytest.raises((ValueError, AttributeError, KeyError)):
        apply_weight_norm(layer)
