"""Mixed precision and numerics policy on CPU (bf16 autocast runs on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqrun.core import DEQ
from deqrun.errors import ConfigError
from deqrun.runner.precision_policy import (
    NumericsPolicy,
    apply_policy,
    autocast,
    float32_map,
    grad_scaler,
    resolve_policy,
)

CPU = torch.device("cpu")


@pytest.fixture
def restore_switches():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3:5]
    torch.use_deterministic_algorithms(saved[5], warn_only=True)


def test_scale_defaults_and_the_tf32_policy():
    smoke = resolve_policy(scale="smoke")
    assert smoke == NumericsPolicy("32", tf32=False, deterministic=True, cudnn_benchmark=False)
    paper = resolve_policy(scale="paper")
    assert (paper.deterministic, paper.cudnn_benchmark, paper.tf32) == (False, True, False)
    assert resolve_policy("bf16", scale="paper").tf32
    assert not resolve_policy("bf16", scale="paper", exact_checks=True).tf32
    assert not resolve_policy("bf16", scale="smoke").tf32  # deterministic runs keep float32
    assert resolve_policy(32, tf32="true", scale="paper").tf32
    assert not resolve_policy("32", deterministic=True, scale="paper").cudnn_benchmark


@pytest.mark.parametrize("options, message", [
    (dict(precision="fp8"), "32, bf16 or fp16"),
    (dict(tf32="maybe"), "auto, true or false"),
    (dict(tf32="true", exact_checks=True), "full float32"),
    (dict(scale="huge"), "scale must be"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        resolve_policy(**options)


def test_apply_sets_the_switches_and_describe_records_them(restore_switches):
    policy = resolve_policy("bf16", tf32="true", deterministic=False, cudnn_benchmark=True)
    apply_policy(policy, CPU)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    apply_policy(resolve_policy("32"), CPU)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.deterministic
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.are_deterministic_algorithms_enabled()
    assert policy.describe() == dict(precision="bf16", tf32=True, deterministic=False,
                                     cudnn_benchmark=True, solver_dtype="float32",
                                     matmul_precision="high")


def test_bf16_autocast_on_cpu_and_float32_at_32():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with autocast(resolve_policy("bf16"), CPU):
        assert layer(x).dtype == torch.bfloat16
    with autocast(resolve_policy("32"), CPU):
        assert layer(x).dtype == torch.float32


def test_the_grad_scaler_scales_only_fp16():
    assert not grad_scaler(resolve_policy("bf16"), CPU).is_enabled()
    scaler = grad_scaler(resolve_policy("fp16"), CPU)
    assert scaler.is_enabled()
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale((weight * 2).sum()).backward()
    assert weight.grad[0] > 2  # scaled loss
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.8))  # unscaled update


def test_the_solver_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    inject, mix = nn.Linear(6, 16), nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        mix.weight.mul_(0.6 / torch.linalg.matrix_norm(mix.weight, 2))
    x = torch.randn(5, 6)
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=60, f_tol=1e-5,
              stop_mode="rel").eval()
    with torch.no_grad():
        exact, _ = deq(lambda z: torch.tanh(mix(z) + inject(x)), torch.zeros(5, 16))
        with autocast(resolve_policy("bf16"), CPU):
            u = inject(x)
            z, stats = deq(float32_map(lambda z: torch.tanh(mix(z) + u)), torch.zeros(5, 16))
    assert z.dtype == torch.float32 and u.dtype == torch.bfloat16
    assert (z - exact).abs().max() < 3e-2  # bf16 layer, float32 solve
    assert float(stats.residual.max()) < 5e-2
    listed = float32_map(lambda zs: [zs[0].bfloat16(), zs[1].long()])
    out = listed([torch.zeros(2), torch.zeros(2)])
    assert (out[0].dtype, out[1].dtype) == (torch.float32, torch.int64)
