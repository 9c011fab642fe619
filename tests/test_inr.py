"""iSIREN / iMFN (implicit coordinate networks) and the signal-fitting tasks."""

from __future__ import annotations

import math

import pytest
import torch

from deqrun.core import DEQ, reset_norms
from deqrun.models.inr import (
    CoordinateDEQ,
    IMFNConfig,
    ISirenConfig,
    build_imfn,
    build_isiren,
    parse_size,
)
from deqrun.tasks.base import ModelSpec

FILTERS = ["fourier", "gabor", "siren"]
SPEC = ModelSpec(kind="signal", in_shape=(2,), out_features=3,
                 extra={"input_scale": 8.0, "siren_input_scale": 4.0})


def tiny_model(filter_kind: str = "fourier", *, layers: int = 2, width: int = 8,
               deq: DEQ | None = None, dtype=torch.float64, seed: int = 0,
               **options) -> CoordinateDEQ:
    torch.manual_seed(seed)
    deq = deq or DEQ("anderson", "implicit", f_max_iter=200, f_tol=1e-12, stop_mode="abs",
                     b_max_iter=200, b_tol=1e-12)
    model = CoordinateDEQ(deq, in_features=2, out_features=3, layers=layers, width=width,
                          filter_kind=filter_kind, input_scale=8.0, **options)
    return model.to(dtype)


def coords(n: int = 5, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def dense_jacobian(model: CoordinateDEQ, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """df/dz at z for states (1, N, D), as an (N D) x (N D) matrix."""
    g0, *layers = model.injection(x)
    injected = [g0.detach(), *(tuple(None if t is None else t.detach() for t in layer)
                               for layer in layers)]
    flat = z.detach().reshape(-1)
    jac = torch.autograd.functional.jacobian(
        lambda v: model.f(v.reshape(z.shape), injected).reshape(-1), flat)
    return jac


# ---- architecture --------------------------------------------------------------------------------
def test_sizes_parse_and_refuse_nonsense():
    assert parse_size("4L-256D") == (4, 256) and parse_size("1L1024D") == (1, 1024)
    with pytest.raises(ValueError, match="1L-256D"):
        parse_size("256")
    with pytest.raises(ValueError, match="filter"):
        IMFNConfig(filter="siren").check()


@pytest.mark.parametrize("filter_kind", FILTERS)
@pytest.mark.parametrize("size", ["1L-16D", "3L-8D"])
def test_explicit_and_implicit_have_identical_parameters(filter_kind, size):
    options = (ISirenConfig(size=size) if filter_kind == "siren"
               else IMFNConfig(size=size, filter=filter_kind))
    build = build_isiren if filter_kind == "siren" else build_imfn
    counts = []
    for implicit in (True, False):
        options.implicit = implicit
        model = build(options, DEQ("fixed_point", "jacobian_free"), SPEC)
        counts.append([(n, p.shape) for n, p in model.named_parameters()])
    assert counts[0] == counts[1]


@pytest.mark.parametrize("filter_kind", FILTERS)
def test_explicit_is_the_network_run_once_from_zero(filter_kind):
    model = tiny_model(filter_kind, implicit=False)
    x = coords()
    output, stats = model(x)
    injected = model.injection(x)
    expected = model.head(model.f(torch.zeros(1, len(x), 8, dtype=x.dtype), injected)[0])
    torch.testing.assert_close(output, expected)
    assert int(stats.nstep) == 1
    model.implicit = True
    assert (model(x)[0] - output).abs().max() > 1e-3


@pytest.mark.parametrize("filter_kind", ["fourier", "siren"])
@pytest.mark.parametrize("layers", [1, 3])
def test_input_scale_is_divided_by_sqrt_layers_plus_one(filter_kind, layers):
    """Filter weights are nn.Linear's U(-1/sqrt(d), 1/sqrt(d)) times 8 / sqrt(n + 1)."""
    model = tiny_model(filter_kind, layers=layers, width=64)
    bound = 8.0 / math.sqrt(layers + 1) / math.sqrt(2)
    for flt in model.filters:
        largest = float(flt.x_map.weight.detach().abs().max())
        assert 0.9 * bound < largest <= bound * (1 + 1e-9)


# ---- spectral norm ------------------------------------------------------------------------------
def layer_lipschitz(model: CoordinateDEQ, x: torch.Tensor) -> float:
    """Largest spectral norm of the per-coordinate Jacobians df/dz at random states."""
    worst = 0.0
    width = model.width
    for seed in range(3):
        z = torch.randn(1, len(x), width, generator=torch.Generator().manual_seed(seed),
                        dtype=x.dtype)
        jac = dense_jacobian(model, x, z).reshape(len(x), width, len(x), width)
        for i in range(len(x)):
            worst = max(worst, float(torch.linalg.matrix_norm(jac[i, :, i, :], 2)))
    return worst


@pytest.mark.parametrize("filter_kind", FILTERS)
def test_spectral_clip_bounds_the_lipschitz_constant(filter_kind):
    model = tiny_model(filter_kind, layers=2, spectral_clip=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    x = coords()
    for _ in range(5):  # large steps: the raw weights grow far beyond the clip
        output, _ = model(x)
        opt.zero_grad()
        (-output.square().sum()).backward()
        opt.step()
    model.train()
    reset_norms(model.recurrent)
    for layer in model.recurrent:
        assert float(torch.linalg.matrix_norm(layer.weight_orig.detach(), 2)) > 1.0
        assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) <= 0.5 * 1.02
    # two layers, each Lipschitz <= 0.5 in z (|sin'| <= 1, |filter| <= 1)
    assert layer_lipschitz(model, x) <= 0.25 * 1.03


def test_without_clip_the_same_weights_are_not_contractive():
    model = tiny_model("fourier", layers=1, spectral_clip=None)
    with torch.no_grad():
        model.recurrent[0].weight.mul_(20)
    assert layer_lipschitz(model, coords()) > 1.0


# ---- amortised fixed points ---------------------------------------------------------------------
@pytest.mark.parametrize("filter_kind", FILTERS)
def test_warm_eval_solve_matches_cold_solve(filter_kind):
    deq = DEQ("anderson", "implicit", f_max_iter=100, f_tol=1e-10, stop_mode="abs")
    model = tiny_model(filter_kind, deq=deq).eval()
    x = coords(20)
    cold, _ = model({"coords": x, "key": None})
    model({"coords": x, "key": "grid"})  # fills the eval cache
    with torch.no_grad():
        model.filters[1].x_map.bias.add_(0.05)  # the fixed point moves a little
    warm, warm_stats = model({"coords": x, "key": "grid"})
    cold, cold_stats = model({"coords": x, "key": None})
    torch.testing.assert_close(warm, cold, atol=1e-8, rtol=0)
    assert bool(warm_stats.converged.all()) and bool(cold_stats.converged.all())
    assert int(warm_stats.nstep) < int(cold_stats.nstep)


@pytest.mark.parametrize("filter_kind", FILTERS)
def test_amortised_training_steps_follow_the_fixed_point(filter_kind):
    deq = DEQ("fixed_point", "npg", f_max_iter=200, f_tol=1e-12, stop_mode="abs", k=2,
              lambda_=1.0)
    model = tiny_model(filter_kind, deq=deq).train()
    x = coords(10)
    batch = {"coords": x, "key": "train"}
    first, stats = model(batch)
    assert int(stats.nstep) > 3  # the first step solves from z = 0
    with torch.no_grad():
        model.filters[0].x_map.bias.add_(0.1)
    steps = []
    for _ in range(60):
        output, stats = model(batch)
        steps.append(int(stats.nstep))
    assert set(steps) == {0}  # no solver step: the gradient's f(z_cached) moves the state
    model.clear_cache()
    cold, _ = model.eval()(x)
    torch.testing.assert_close(output, cold, atol=1e-8, rtol=0)


def test_amortised_step_is_one_f_evaluation_from_the_cached_state():
    deq = DEQ("fixed_point", "npg", f_max_iter=200, f_tol=1e-12, stop_mode="abs", k=2,
              lambda_=1.0)
    model = tiny_model("siren", deq=deq).train()
    x = coords(7)
    batch = {"coords": x, "key": "train"}
    model(batch)
    cached = model._caches[("train", "train")].z.clone()
    with torch.no_grad():
        model.filters[1].x_map.bias.add_(0.2)  # the fixed point moves
    calls = []
    f = model.f
    model.f = lambda z, injected: calls.append(1) or f(z, injected)
    output, stats = model(batch)
    del model.f
    expected = model.head(f(cached[None], model.injection(x))[0])
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=0)
    assert len(calls) == 1 and int(stats.nstep) == 0
    moved = model._caches[("train", "train")].z - cached
    torch.testing.assert_close(float(stats.abs_residual), float(moved.norm()))
    stepped = tiny_model("siren", deq=deq, amortised_steps=2).train()
    stepped(batch)
    with torch.no_grad():
        stepped.filters[1].x_map.bias.add_(0.2)
    assert stepped(batch)[1].forward.n_f_evals == 2


def test_cache_survives_reset_state_and_can_be_switched_off():
    model = tiny_model("fourier").train()
    batch = {"coords": coords(), "key": "train"}
    model(batch)
    model.reset_state()
    assert int(model(batch)[1].nstep) == 0
    off = tiny_model("fourier", amortise=False).train()
    off(batch)
    assert int(off(batch)[1].nstep) > 1


def test_minibatch_cache_by_index():
    model = tiny_model("gabor").train()
    x = coords(12)
    first = {"coords": x[:6], "key": "train", "index": torch.arange(6)}
    second = {"coords": x[6:], "key": "train", "index": torch.arange(6, 12)}
    model(first)
    assert int(model(second)[1].nstep) > 1  # rows 6..11 never seen: a full solve
    assert int(model(first)[1].nstep) == 0
    model.eval()
    full, _ = model(x)
    part, _ = model({"coords": x[6:], "key": None})
    torch.testing.assert_close(full[6:], part, atol=1e-9, rtol=0)


# ---- gradients ----------------------------------------------------------------------------------
def exact_gradients(model: CoordinateDEQ, x: torch.Tensor, target: torch.Tensor):
    """dL/dtheta by dense implicit differentiation: w = (I - J)^-T dL/dz*."""
    model.eval()
    with torch.no_grad():
        z_star, _ = model({"coords": x, "key": None})
        z_star = model.deq.solve(lambda z: model.f(z, model.injection(x)),
                                 torch.zeros(1, len(x), model.width, dtype=x.dtype), 500,
                                 1e-14).z
    z_leaf = z_star.detach().requires_grad_()
    loss = ((model.head(z_leaf[0]) - target) ** 2).sum()
    head_grads = torch.autograd.grad(loss, [z_leaf, *model.head.parameters()])
    jac = dense_jacobian(model, x, z_star)
    eye = torch.eye(len(jac), dtype=jac.dtype)
    w = torch.linalg.solve((eye - jac).T, head_grads[0].reshape(-1)).reshape(z_star.shape)
    implicit = [p for p in model.parameters() if all(p is not q for q in model.head.parameters())]
    f_out = model.f(z_star.detach(), model.injection(x))
    body = torch.autograd.grad(f_out, implicit, w, allow_unused=True)
    grads = dict(zip([id(p) for p in implicit], body))
    grads.update(zip([id(p) for p in model.head.parameters()], head_grads[1:]))
    return [grads[id(p)] for p in model.parameters()]


def method_gradients(model: CoordinateDEQ, x: torch.Tensor, target: torch.Tensor):
    model.train()
    output, _ = model({"coords": x, "key": None})
    return torch.autograd.grad(((output - target) ** 2).sum(), list(model.parameters()))


TIGHT = dict(f_max_iter=500, f_tol=1e-14, stop_mode="abs")
METHODS = {
    "implicit": dict(solver="anderson", grad="implicit", b_max_iter=500, b_tol=1e-14),
    "upg": dict(solver="anderson", grad="upg", k=400, lambda_=1.0),
    "npg": dict(solver="anderson", grad="npg", k=400, lambda_=0.8),
    "shine": dict(solver="broyden", grad="shine", refine=200, refine_tol=1e-14,
                  fallback=False),
}


@pytest.mark.parametrize("filter_kind", FILTERS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_methods_match_the_exact_gradient(filter_kind, method):
    """Methods that converge to the exact gradient (enough steps / a refined SHINE) do."""
    model = tiny_model(filter_kind, layers=1, width=6, spectral_clip=None,
                       deq=DEQ(**METHODS[method], **TIGHT))
    with torch.no_grad():
        model.recurrent[0].weight.mul_(0.6)  # a contraction (no spectral norm here)
    x, target = coords(4), torch.randn(4, 3, dtype=torch.float64)
    exact = exact_gradients(model, x, target)
    got = method_gradients(model, x, target)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("filter_kind", FILTERS)
@pytest.mark.parametrize("k, lam", [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_truncated_gradients_match_their_dense_formula(filter_kind, k, lam):
    """NPG A_{k,lambda} (k=2, lambda=1: the reference's Neumann backward of order 1,
    w = (I + J^T) grad; k=1: Jacobian-free) against lambda sum_{t<k} (B^T)^t grad."""
    deq = DEQ("anderson", "npg", k=k, lambda_=lam, **TIGHT)
    model = tiny_model(filter_kind, layers=1, width=6, deq=deq, spectral_clip=None)
    with torch.no_grad():
        model.recurrent[0].weight.mul_(0.6)
    x, target = coords(4), torch.randn(4, 3, dtype=torch.float64)
    got = method_gradients(model, x, target)
    model.eval()
    with torch.no_grad():
        z_star = model.deq.solve(lambda z: model.f(z, model.injection(x)),
                                 torch.zeros(1, 4, 6, dtype=x.dtype), 500, 1e-14).z
    z_leaf = z_star.detach().requires_grad_()
    grad_z = torch.autograd.grad(((model.head(z_leaf[0]) - target) ** 2).sum(), z_leaf)[0]
    jac = dense_jacobian(model, x, z_star)
    b_t = lam * jac.T + (1 - lam) * torch.eye(len(jac), dtype=jac.dtype)
    term, total = grad_z.reshape(-1), torch.zeros(jac.shape[0], dtype=jac.dtype)
    for _ in range(k):
        total, term = total + term, b_t @ term
    w = (lam * total).reshape(z_star.shape)
    expected = torch.autograd.grad(model.f(z_star, model.injection(x)),
                                   list(model.recurrent.parameters()), w)
    recurrent_ids = {id(p) for p in model.recurrent.parameters()}
    got_recurrent = [g for g, p in zip(got, model.parameters()) if id(p) in recurrent_ids]
    for g, e in zip(got_recurrent, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-7)


def test_jacobian_free_equals_npg_k1():
    grads = []
    for grad, options in (("jacobian_free", {}), ("npg", dict(k=1, lambda_=1.0))):
        model = tiny_model("fourier", deq=DEQ("anderson", grad, **TIGHT, **options))
        grads.append(method_gradients(model, coords(), torch.zeros(5, 3, dtype=torch.float64)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_model_runs_in_float32_with_a_mixed_deq():
    model = tiny_model("gabor", dtype=torch.float32,
                       deq=DEQ("fixed_point", "npg", f_max_iter=50, f_tol=1e-3, k=2,
                               lambda_=1.0))
    output, stats = model(coords(dtype=torch.float32))
    output.sum().backward()
    assert output.dtype == torch.float32 and bool(stats.converged.all())


def test_options_out_of_range_are_refused():
    with pytest.raises(ValueError, match="input_scale"):
        ISirenConfig(input_scale=-1.0).check()
    with pytest.raises(ValueError, match="amortised_steps"):
        ISirenConfig(amortised_steps=-1).check()
