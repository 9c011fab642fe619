"""MDEQ: presets and sizes, shapes, gradients, weight-norm resets, dropout masks, independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqrun.models.mdeq as mdeq_module
from deqrun import registry
from deqrun.core import DEQ, reset_norms
from deqrun.core.norm import _WeightNorm
from deqrun.models import MDEQ, MDEQ_SIZES, MDEQConfig, build_mdeq, resolve_mdeq_spec
from deqrun.models.mdeq import group_norm
from deqrun.tasks import ModelSpec

FAST = dict(solver="anderson", f_max_iter=4, f_tol=1e-6)


def make_model(size: str = "tiny", *, in_channels: int = 3, num_classes: int = 10,
               deq: DEQ | None = None, seed: int = 0, **overrides) -> MDEQ:
    torch.manual_seed(seed)
    deq = deq if deq is not None else DEQ(**FAST)
    options = {"size": size, **overrides}
    return build_mdeq(options, deq=deq, in_channels=in_channels, num_classes=num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spy_on_f(model: MDEQ) -> list[dict]:
    """Replace model.f by a wrapper that records each call's masks and grad mode."""
    calls, real_f = [], model.f

    def f(z, injection, dropout_masks=None):
        calls.append({"masks": dropout_masks, "grad": torch.is_grad_enabled()})
        return real_f(z, injection, dropout_masks)

    model.f = f
    return calls


@pytest.mark.parametrize("size, num_classes, expected", [
    ("tiny", 10, 170e3), ("large", 10, 10e6), ("small", 1000, 18e6)])
def test_param_counts_near_the_papers(size, num_classes, expected):
    model = make_model(size, num_classes=num_classes)
    assert abs(n_params(model) - expected) < 0.25 * expected, n_params(model)


def test_presets_are_the_reference_sizes():
    tiny, large, small = MDEQ_SIZES["tiny"], MDEQ_SIZES["large"], MDEQ_SIZES["small"]
    assert (tiny.branch_channels, tiny.head_channels) == ([24, 24], [8, 16])
    assert (tiny.final_channels, tiny.num_branches, tiny.downsample_times) == (200, 2, 0)
    assert (large.branch_channels, large.head_channels) == ([32, 64, 128, 256], [14, 28, 56, 112])
    assert (large.final_channels, large.dropout, tiny.dropout) == (1680, 0.3, 0.25)
    assert (small.num_branches, small.downsample_times, small.final_channels) == (4, 2, 2048)


def test_resolve_applies_overrides_and_ignores_none():
    spec = resolve_mdeq_spec("tiny", dropout=0.0, final_channels=None, num_branches=3,
                             branch_channels=[8, 16, 32], head_channels=(4, 8, 16))
    assert spec.dropout == 0.0 and spec.final_channels == 200
    assert spec.branch_channels == [8, 16, 32] and spec.head_channels == [4, 8, 16]
    spec.branch_channels.append(64)
    assert resolve_mdeq_spec("tiny").branch_channels == [24, 24]
    assert MDEQ_SIZES["tiny"].branch_channels == [24, 24]


@pytest.mark.parametrize("size, overrides, message", [
    ("huge", {}, "valid: large, small, tiny"),
    ("tiny", {"dropuot": 0.1}, "valid: size, branch_channels"),
    ("tiny", {"num_branches": 3}, "num_branches=3"),
    ("tiny", {"head_channels": [8]}, "head_channels has 1 entries"),
    ("tiny", {"dropout": 1.0}, "dropout must be in [0, 1)"),
    ("tiny", {"expansion": "5"}, "'expansion' must be int"),
])
def test_resolve_refuses_bad_options(size, overrides, message):
    with pytest.raises(ValueError) as info:
        resolve_mdeq_spec(size, **overrides)
    assert message in str(info.value)


def test_registered_builder_reads_the_task_spec():
    entry = registry.model_entry("mdeq")
    assert entry.schema is MDEQConfig and "image_classification" in entry.tasks
    spec = ModelSpec(kind="image_classification", in_shape=(1, 8, 8), out_features=7)
    model = entry.build(MDEQConfig(dropout=0.0, num_groups=4), DEQ(**FAST), spec)
    assert isinstance(model, MDEQ) and model.spec.dropout == 0.0 and model.spec.num_groups == 4
    assert model.stem[0].in_channels == 1 and model(torch.randn(2, 1, 8, 8))[0].shape == (2, 7)
    with pytest.raises(ValueError, match="'size'"):
        build_mdeq({}, deq=DEQ(), in_channels=3, num_classes=10)


@pytest.mark.parametrize("channels, groups", [(24, 8), (12, 6), (7, 7), (20, 5), (32, 8)])
def test_group_norm_uses_largest_divisor(channels, groups):
    assert group_norm(channels, 8).num_groups == groups


@pytest.mark.parametrize("in_channels, size, overrides, branch_sizes", [
    (1, 8, {}, [8, 4]),
    (3, 32, {}, [32, 16]),
    (3, 7, {"num_branches": 3, "branch_channels": [8, 12, 16], "head_channels": [4, 4, 8]},
     [7, 4, 2]),
    (3, 32, {"downsample_times": 2}, [8, 4]),
])
def test_forward_shapes_and_state(monkeypatch, in_channels, size, overrides, branch_sizes):
    model = make_model(in_channels=in_channels, **overrides)
    seen = {}
    real_forward = model.deq.forward

    def deq_forward(f, z0, pretrain=False):
        seen["z0"] = z0
        seen["z_star"], stats = real_forward(f, z0, pretrain=pretrain)
        return seen["z_star"], stats

    monkeypatch.setattr(model.deq, "forward", deq_forward)
    logits, stats = model(torch.randn(5, in_channels, size, size))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    assert stats.nstep.shape == (5,) and stats.rel_residual.shape == (5,)
    widths = model.spec.branch_channels
    for key in ("z0", "z_star"):
        assert [tuple(t.shape) for t in seen[key]] == [(5, c, s, s)
                                                       for c, s in zip(widths, branch_sizes)]
    assert all(float(t.abs().max()) == 0.0 for t in seen["z0"])


@pytest.mark.parametrize("grad, options", [
    ("implicit", dict(b_max_iter=3)), ("upg", dict(k=2, lambda_=0.5)), ("jacobian_free", {})])
def test_gradients_reach_every_parameter(grad, options):
    model = make_model(deq=DEQ(grad=grad, **FAST, **options))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 4, 7])
    logits, _ = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_weight_norm_is_on_the_convs_of_f_only():
    model = make_model()
    f_convs = [m for m in model.equilibrium.modules() if isinstance(m, nn.Conv2d)]
    assert f_convs and all(hasattr(m, "weight_g") and hasattr(m, "weight_v") for m in f_convs)
    explicit = [model.stem, model.injection_layer, model.classifier]
    assert not any(hasattr(m, "weight_g") for part in explicit for m in part.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in model.equilibrium.modules())


def test_reset_norms_runs_once_per_forward(monkeypatch):
    model = make_model(deq=DEQ(grad="upg", k=3, **FAST))
    resets, computes = [], []
    real_compute = _WeightNorm.compute

    def counting_compute(self, module):
        computes.append(module)
        return real_compute(self, module)

    def counting_reset(module):
        resets.append(module)
        reset_norms(module)

    monkeypatch.setattr(_WeightNorm, "compute", counting_compute)
    monkeypatch.setattr(mdeq_module, "reset_norms", counting_reset)
    calls = spy_on_f(model)
    n_normed = sum(isinstance(m, nn.Conv2d) for m in model.equilibrium.modules())
    for forward in range(1, 3):
        model(torch.randn(2, 3, 8, 8))[0].sum().backward()
        assert len(resets) == forward and resets[-1] is model.equilibrium
        assert len(computes) == forward * n_normed
    assert len(calls) > 2 * 2


def test_dropout_mask_fixed_within_a_forward_and_fresh_across():
    model = make_model(deq=DEQ(grad="upg", k=2, **FAST))
    calls = spy_on_f(model)
    x = torch.randn(4, 3, 8, 8)
    model(x)
    first = [c["masks"] for c in calls]
    assert len(first) > 3 and all(m is not None for m in first)
    for masks in first[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first[0], masks))
    keep = 1 - model.spec.dropout
    for mask, width in zip(first[0], model.spec.branch_channels):
        assert mask.shape == (4, width, 1, 1)
        assert torch.isclose(mask, torch.tensor(0.0)).logical_or(
            torch.isclose(mask, torch.tensor(1 / keep))).all()
    calls.clear()
    model(x)
    assert not all(torch.equal(a, b) for a, b in zip(first[0], calls[0]["masks"]))


def test_dropout_rate_and_effect():
    model = make_model()
    state = [torch.zeros(256, 24, 2, 2)]
    masks = model.dropout_masks(state)
    assert abs(float((masks[0] == 0).float().mean()) - 0.25) < 0.03
    z, injection = [torch.randn(2, 24, 8, 8), torch.randn(2, 24, 4, 4)], model.injection(
        torch.randn(2, 3, 8, 8))
    reset_norms(model.equilibrium)
    with_mask = model.f(z, injection, model.dropout_masks(z))
    without = model.f(z, injection)
    assert not torch.allclose(with_mask[0], without[0])
    model.eval()
    assert model.dropout_masks(z) is None


def test_eval_mode_builds_no_graph():
    model = make_model().eval()
    calls = spy_on_f(model)
    x = torch.randn(2, 3, 8, 8)
    logits_a, _ = model(x)
    assert calls and not any(c["grad"] for c in calls)
    assert all(c["masks"] is None for c in calls)
    with torch.no_grad():
        logits_b, _ = model(x)
    assert logits_b.grad_fn is None
    torch.testing.assert_close(logits_a.detach(), logits_b)


def test_pretrain_backprops_through_the_unrolled_steps():
    model = make_model(deq=DEQ(pretrain_depth=3, **FAST), dropout=0.0)
    x = torch.randn(2, 3, 8, 8)
    logits, stats = model(x, pretrain=True)
    assert stats.pretrain and stats.nstep.tolist() == [3, 3]
    params = list(model.parameters())
    grads = torch.autograd.grad(logits.square().sum(), params)

    reset_norms(model.equilibrium)
    injection = model.injection(x)
    z = model.initial_state(injection)
    for _ in range(3):
        z = model.f(z, injection)
    manual = model.head(z)
    manual_grads = torch.autograd.grad(manual.square().sum(), params)
    torch.testing.assert_close(logits, manual)
    for g, h in zip(grads, manual_grads):
        torch.testing.assert_close(g, h)


def test_deterministic_under_a_fixed_seed():
    def run(seed: int) -> torch.Tensor:
        model = make_model(seed=seed)
        torch.manual_seed(seed + 1)
        return model(torch.randn(2, 3, 8, 8))[0]

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_f_is_independent_across_samples():
    model = make_model().train()
    reset_norms(model.equilibrium)
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(3, 24, 8, 8, generator=gen), torch.randn(3, 24, 4, 4, generator=gen)]
    injection = [torch.randn(3, 24, 8, 8, generator=gen), torch.zeros(3, 24, 4, 4)]
    masks = model.dropout_masks(z)
    out = model.f(z, injection, masks)
    z2 = [t.clone() for t in z]
    injection2 = [t.clone() for t in injection]
    for t in z2 + injection2[:1]:
        t[1:] = 5 * torch.randn(t[1:].shape, generator=gen)
    out2 = model.f(z2, injection2, masks)
    for a, b in zip(out, out2):
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
        assert not torch.allclose(a[1:], b[1:])


def test_runs_in_float64_on_the_input_dtype():
    model = make_model().double()
    logits, _ = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert logits.dtype == torch.float64
