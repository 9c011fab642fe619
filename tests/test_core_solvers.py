"""Solvers against known fixed points, budgets, list states, divergence and dtype handling."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tanh_layer

from deqrun.core import DEQ, SOLVERS, StateLayout

ALL = ["fixed_point", "anderson", "broyden"]


def linear_map(width: int = 30, batch: int = 4, radius: float = 0.8, dtype=torch.float64):
    """f(z) = A z + c with ||A||_2 = radius and its exact fixed point (I - A)^-1 c."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(width, width, generator=gen, dtype=dtype)
    A = radius * A / torch.linalg.matrix_norm(A, 2)
    c = torch.randn(batch, width, generator=gen, dtype=dtype)
    exact = torch.linalg.solve(torch.eye(width, dtype=dtype) - A, c.T).T
    return (lambda z: z @ A.T + c), exact


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_reaches_known_fixed_point_of_linear_map(solver, stop_mode):
    f, exact = linear_map()
    result = SOLVERS[solver](f, torch.zeros_like(exact), max_iter=300, tol=1e-10,
                             stop_mode=stop_mode)
    assert bool(result.converged.all()) and not bool(result.diverged.any())
    assert float(result.residual.max()) <= 1e-10
    assert float((result.z - exact).norm() / exact.norm()) < 1e-8
    assert result.n_f_evals < 300


@pytest.mark.parametrize("solver", ALL)
def test_reaches_tol_on_tanh_map(solver):
    layer = make_tanh_layer(width=50, batch=5, spectral_norm=0.95)
    with torch.no_grad():
        result = SOLVERS[solver](layer.f, torch.zeros(5, 50, dtype=torch.float64), max_iter=200,
                                 tol=1e-8, stop_mode="rel")
        z_star = layer.fixed_point()
    assert bool(result.converged.all())
    assert float((result.z - z_star).norm(dim=1).max()) < 1e-6


def test_accelerated_solvers_beat_plain_iteration_on_slow_map():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.0, 0.98, 30, dtype=torch.float64)) @ Q.T
    c = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(30, dtype=torch.float64) - A, c.T).T

    def f(z):
        return z @ A.T + c

    steps = {s: SOLVERS[s](f, torch.zeros_like(exact), max_iter=500, tol=1e-8).n_f_evals
             for s in ALL}
    assert steps["anderson"] < steps["fixed_point"] / 2
    assert steps["broyden"] < steps["fixed_point"] / 2


@pytest.mark.parametrize("solver", ALL)
def test_budget_end_returns_best_iterate_with_its_own_residual(solver):
    layer = make_tanh_layer(width=40, batch=3, spectral_norm=1.3, normal=False, seed=3)
    with torch.no_grad():
        result = SOLVERS[solver](layer.f, torch.zeros(3, 40, dtype=torch.float64), max_iter=7,
                                 tol=1e-12, stop_mode="abs")
        z = result.z
        recomputed = (layer.f(z) - z).norm(dim=1)
    assert result.n_f_evals == 7 and result.abs_trace.shape == (7, 3)
    assert torch.allclose(result.abs_residual, result.abs_trace.min(dim=0).values)
    assert torch.allclose(recomputed, result.abs_residual, rtol=1e-10)
    best_step = result.abs_trace.argmin(dim=0) + 1
    assert torch.equal(result.nstep, best_step)
    assert not bool(result.converged.any())


def test_best_iterate_is_not_the_last_when_residual_rises():
    """Undamped iteration on z -> -1.2 z + 1 grows the residual: the best iterate is z0."""
    f = lambda z: 1.0 - 1.2 * z  # noqa: E731
    result = SOLVERS["fixed_point"](f, torch.zeros(2, 3), max_iter=6, tol=1e-9)
    assert torch.equal(result.nstep, torch.tensor([1, 1]))
    assert torch.equal(result.z, torch.zeros(2, 3))


@pytest.mark.parametrize("solver", ALL)
def test_list_of_tensor_states(solver):
    gen = torch.Generator().manual_seed(1)
    a = 0.5 * torch.randn(4, 3, 8, 8, generator=gen)
    b = torch.randn(4, 5, 4, 4, generator=gen)

    def f(z):
        coarse = z[0][:, :, ::2, ::2].mean(1, True)
        return [0.5 * torch.tanh(z[0]) + a, 0.3 * z[1] + 0.1 * coarse + b]

    z0 = [torch.zeros_like(a), torch.zeros_like(b)]
    result = SOLVERS[solver](f, z0, max_iter=100, tol=1e-6, stop_mode="abs")
    assert isinstance(result.z, list) and [t.shape for t in result.z] == [a.shape, b.shape]
    fz = f(result.z)
    assert max(float((x - y).abs().max()) for x, y in zip(fz, result.z)) < 1e-5
    assert bool(result.converged.all())


@pytest.mark.parametrize("solver", ALL)
def test_nan_is_reported_as_diverged_without_exception(solver):
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.9 * torch.tanh(z) + 1.0
        if calls["n"] >= 4:
            out = out.clone()
            out[1] = float("nan")
        return out

    result = SOLVERS[solver](f, torch.zeros(3, 5), max_iter=50, tol=1e-12)
    assert result.diverged.tolist() == [False, True, False]
    assert bool(torch.isfinite(result.z).all())
    assert result.n_f_evals == 4


def test_broyden_protective_break_freezes_an_exploding_sample():
    """Sample 0 explodes (first step lands where exp(20 z) is huge); sample 1 converges."""
    scale = torch.tensor([[20.0], [0.0]])

    def f(z):
        return torch.where(scale > 0, torch.exp(scale * z), 0.5 * z + 1.0)

    result = SOLVERS["broyden"](f, torch.zeros(2, 3), max_iter=40, tol=1e-6)
    assert result.diverged.tolist() == [True, False]
    assert result.converged.tolist() == [False, True]
    assert torch.equal(result.z[0], torch.zeros(3))
    assert float(result.abs_trace[1, 0]) > 1e6 * float(result.abs_trace[0, 0])
    assert result.n_f_evals < 40


def test_anderson_singular_system_does_not_raise():
    """With lam = 0 and one-dimensional states the Gram matrix has rank 1."""
    result = SOLVERS["anderson"](lambda z: 0.5 * torch.cos(z), torch.zeros(3, 1), max_iter=30,
                                 tol=1e-10, m=5, lam=0.0)
    assert bool(torch.isfinite(result.z).all())
    assert float(result.abs_residual.max()) < 1e-8


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_float32_and_float64(solver, dtype, tol):
    f, exact = linear_map(dtype=dtype)
    result = SOLVERS[solver](f, torch.zeros_like(exact), max_iter=200, tol=tol, stop_mode="rel")
    assert result.z.dtype == dtype and result.abs_residual.dtype == dtype
    assert bool(result.converged.all())


def test_broyden_memory_is_bounded_and_circular():
    f, exact = linear_map(radius=0.95)
    result = SOLVERS["broyden"](f, torch.zeros_like(exact), max_iter=60, tol=1e-12, mem=6)
    assert result.lowrank.u.shape[1] == 6
    assert float((result.z - exact).norm() / exact.norm()) < 1e-8


def test_state_layout_roundtrip():
    z = [torch.randn(2, 3, 4), torch.randn(2, 5)]
    layout = StateLayout.of(z)
    flat = layout.flatten(z)
    assert flat.shape == (2, 17)
    assert all(torch.equal(x, y) for x, y in zip(layout.unflatten(flat), z))


def test_deq_rejects_unknown_options_with_suggestion():
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        DEQ(solver="anderson", grad="upg", bta=0.1)
    with pytest.raises(ValueError, match="unknown option 'b_max_itr'"):
        DEQ(solver="anderson", grad="implicit", b_max_itr=3)
    with pytest.raises(ValueError, match="must be int"):
        DEQ(solver="anderson", grad="upg", k=2.5)
    with pytest.raises(ValueError, match="needs solver=broyden"):
        DEQ(solver="anderson", grad="shine")
    with pytest.raises(ValueError, match="unknown solver"):
        DEQ(solver="newton")


def test_deq_eval_mode_uses_eval_budget_and_builds_no_graph():
    layer = make_tanh_layer(width=20, batch=2, spectral_norm=0.99)
    deq = DEQ(solver="fixed_point", grad="implicit", f_max_iter=3, eval_f_max_iter=20,
              f_tol=1e-15)
    z0 = torch.zeros(2, 20, dtype=torch.float64)
    z_train, stats_train = deq(layer.f, z0)
    assert z_train.requires_grad and stats_train.forward.n_f_evals == 3
    deq.eval()
    z_eval, stats_eval = deq(layer.f, z0)
    assert not z_eval.requires_grad and stats_eval.forward.n_f_evals == 20


def test_jacobian_penalty_matches_dense_frobenius_norm():
    from deqrun.core import jacobian_penalty

    layer = make_tanh_layer(width=20, batch=2)
    z = layer.fixed_point().detach().requires_grad_()
    torch.manual_seed(0)
    estimates = torch.stack([jacobian_penalty(layer.f(z), z, n_samples=50) for _ in range(20)])
    dense = layer.jacobians(z.detach()).pow(2).sum(dim=(1, 2)).mean() / 20
    estimates = estimates.detach()
    assert abs(float(estimates.mean()) - float(dense)) < 0.05 * float(dense)


def test_spectral_radius_matches_dense_eigenvalues():
    from deqrun.core import spectral_radius

    layer = make_tanh_layer(width=20, batch=2, spectral_norm=0.9)
    z = layer.fixed_point().detach()
    estimate = spectral_radius(layer.f, z, n_iter=200)
    dense = torch.linalg.eigvals(layer.jacobians(z)).abs().max(dim=1).values
    assert torch.allclose(estimate, dense, rtol=2e-2)
