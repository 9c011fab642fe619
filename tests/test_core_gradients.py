"""Every gradient method against its exact dense counterpart on f(z) = tanh(W z + U x + b)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tanh_layer

from deqrun.core import DEQ

TIGHT = dict(f_max_iter=400, f_tol=1e-13, stop_mode="abs")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


def deq_grads(layer, deq: DEQ, cotangent: torch.Tensor):
    """Gradients of <cotangent, z*> w.r.t. W, U, b, x through the DEQ layer, and z*."""
    z_star, stats = deq(layer.f, torch.zeros_like(cotangent))
    grads = torch.autograd.grad((z_star * cotangent).sum(), layer.params())
    return list(grads), stats


def dense_adjoint(J: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """w = (I - J)^-T grad per sample."""
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    return torch.linalg.solve((eye - J).transpose(1, 2), grad.unsqueeze(2)).squeeze(2)


def dense_neumann(J: torch.Tensor, grad: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """lambda sum_{t<k} (B^T)^t grad with B = lambda J + (1 - lambda) I."""
    B_T = lam * J.transpose(1, 2) + (1 - lam) * torch.eye(J.shape[1], dtype=J.dtype)
    term, total = grad, torch.zeros_like(grad)
    for _ in range(k):
        total = total + term
        term = (B_T @ term.unsqueeze(2)).squeeze(2)
    return lam * total


@pytest.fixture
def setup():
    layer = make_tanh_layer(width=40, batch=3)
    z_star = layer.fixed_point().detach()
    cot = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return layer, z_star, layer.jacobians(z_star), cot


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("b_solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_matches_dense_ift(setup, solver, b_solver):
    layer, z_star, J, cot = setup
    deq = DEQ(solver=solver, grad="implicit", b_solver=b_solver, b_max_iter=400, b_tol=1e-13,
              **TIGHT)
    grads, stats = deq_grads(layer, deq, cot)
    exact = layer.param_grads(z_star, dense_adjoint(J, cot))
    assert bool(stats.converged.all())
    assert stats.backward is not None and bool(stats.backward.converged.all())
    for name, g, e in zip("WUbx", grads, exact):
        assert rel_err(g, e) <= 1e-6, name


def test_implicit_is_not_jacobian_free(setup):
    """The exact gradient differs from JFB here, so the implicit test above can fail."""
    layer, z_star, J, cot = setup
    exact = layer.param_grads(z_star, dense_adjoint(J, cot))
    jfb = layer.param_grads(z_star, cot)
    assert rel_err(jfb[0], exact[0]) > 0.05


@pytest.mark.parametrize("k,lam", [(1, 1.0), (3, 0.5), (5, 0.8), (10, 1.0)])
def test_npg_matches_truncated_series(setup, k, lam):
    layer, z_star, J, cot = setup
    grads, _ = deq_grads(layer, DEQ(solver="anderson", grad="npg", k=k, lambda_=lam, **TIGHT), cot)
    exact = layer.param_grads(z_star, dense_neumann(J, cot, k, lam))
    for name, g, e in zip("WUbx", grads, exact):
        assert rel_err(g, e) <= 1e-8, name


@pytest.mark.parametrize("k,lam", [(1, 1.0), (2, 0.3), (5, 0.5), (8, 0.8)])
def test_upg_from_exact_fixed_point_matches_series(setup, k, lam):
    layer, z_star, J, cot = setup
    grads, _ = deq_grads(layer, DEQ(solver="broyden", grad="upg", k=k, lambda_=lam, **TIGHT), cot)
    exact = layer.param_grads(z_star, dense_neumann(J, cot, k, lam))
    for name, g, e in zip("WUbx", grads, exact):
        assert rel_err(g, e) <= 1e-8, name


def test_jacobian_free_is_npg_k1_lambda1(setup):
    layer, z_star, _, cot = setup
    jfb, _ = deq_grads(layer, DEQ(solver="anderson", grad="jacobian_free", **TIGHT), cot)
    npg, _ = deq_grads(layer, DEQ(solver="anderson", grad="npg", k=1, lambda_=1.0, **TIGHT), cot)
    exact = layer.param_grads(z_star, cot)
    for g, n, e in zip(jfb, npg, exact):
        assert rel_err(g, e) <= 1e-8 and rel_err(g, n) <= 1e-12


def dense_broyden_inverse(lowrank, sample: int) -> torch.Tensor:
    u, v = lowrank.u[sample], lowrank.v[sample]
    keep = lowrank.valid[sample]
    return -torch.eye(u.shape[1], dtype=u.dtype) + u[keep].T @ v[keep]


def test_shine_is_minus_grad_times_forward_inverse():
    layer = make_tanh_layer(width=30, batch=4)
    cot = torch.randn(4, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    deq = DEQ(solver="broyden", grad="shine", fallback=False, f_max_iter=12, f_tol=1e-9,
              stop_mode="abs")
    grads, stats = deq_grads(layer, deq, cot)
    lowrank = stats.forward.lowrank
    assert int(lowrank.valid.sum()) > 0
    z_star = stats.forward.z.detach()
    w = torch.stack([-(cot[i] @ dense_broyden_inverse(lowrank, i)) for i in range(4)])
    exact = layer.param_grads(z_star, w)
    for name, g, e in zip("WUbx", grads, exact):
        assert rel_err(g, e) <= 1e-10, name


def test_shine_fallback_switches_per_sample():
    layer = make_tanh_layer(width=30, batch=6, spectral_norm=0.95, normal=False)
    cot = torch.randn(6, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    deq = DEQ(solver="broyden", grad="shine", fallback=False, f_max_iter=30, f_tol=1e-10,
              stop_mode="abs")
    _, stats = deq(layer.f, torch.zeros_like(cot))
    shine = deq.gradient
    w_plain = -stats.forward.lowrank.rmatvec(cot)
    ratio = w_plain.norm(dim=1) / cot.norm(dim=1)
    threshold = float(ratio.median())
    shine.fallback, shine.fallback_threshold = True, threshold
    w = shine.estimate(cot, stats.forward)
    switched = ratio > threshold
    assert 0 < int(switched.sum()) < 6
    assert torch.equal(w[switched], cot[switched])
    assert torch.equal(w[~switched], w_plain[~switched])


def test_shine_close_to_exact_on_width_60():
    layer = make_tanh_layer(width=60, batch=4, spectral_norm=0.9, seed=4)
    z_star = layer.fixed_point().detach()
    cot = torch.randn(4, 60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    deq = DEQ(solver="broyden", grad="shine", f_max_iter=40, f_tol=1e-10, stop_mode="abs")
    grads, _ = deq_grads(layer, deq, cot)
    exact = layer.param_grads(z_star, dense_adjoint(layer.jacobians(z_star), cot))
    assert cosine(grads, exact) >= 0.9


def test_shine_refine_moves_towards_exact():
    layer = make_tanh_layer(width=60, batch=4, spectral_norm=0.95, seed=6, normal=False)
    z_star = layer.fixed_point().detach()
    cot = torch.randn(4, 60, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = layer.param_grads(z_star, dense_adjoint(layer.jacobians(z_star), cot))
    opts = dict(solver="broyden", grad="shine", fallback=False, f_max_iter=25, f_tol=1e-8,
                stop_mode="abs")
    plain, _ = deq_grads(layer, DEQ(**opts), cot)
    refined, stats = deq_grads(layer, DEQ(refine=10, refine_tol=1e-12, **opts), cot)
    assert stats.backward is not None
    assert cosine(refined, exact) > max(cosine(plain, exact), 0.999)


def test_implicit_warm_start_reuses_the_previous_backward_solution(setup):
    layer, z_star, J, cot = setup
    deq = DEQ(solver="anderson", grad="implicit", b_max_iter=400, b_tol=1e-11, b_warm_start=True,
              **TIGHT)
    _, first = deq_grads(layer, deq, cot)
    grads, second = deq_grads(layer, deq, cot)
    assert int(second.backward.nstep.max()) < int(first.backward.nstep.max())
    exact = layer.param_grads(z_star, dense_adjoint(J, cot))
    assert rel_err(grads[0], exact[0]) <= 1e-6


def test_jacobian_penalty_is_reported_and_differentiable(setup):
    layer, _, _, cot = setup
    deq = DEQ(solver="anderson", grad="upg", jac_reg=True, jac_samples=2, **TIGHT)
    z, stats = deq(layer.f, torch.zeros_like(cot))
    assert stats.jac_loss is not None and stats.jac_loss.ndim == 0
    (grad_W,) = torch.autograd.grad(stats.jac_loss, [layer.W])
    assert float(grad_W.abs().sum()) > 0


def test_jacobian_free_refine_moves_towards_exact():
    layer = make_tanh_layer(width=60, batch=4, spectral_norm=0.95, seed=6, normal=False)
    z_star = layer.fixed_point().detach()
    cot = torch.randn(4, 60, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = layer.param_grads(z_star, dense_adjoint(layer.jacobians(z_star), cot))
    opts = dict(solver="broyden", grad="jacobian_free", f_max_iter=25, f_tol=1e-8,
                stop_mode="abs")
    plain, _ = deq_grads(layer, DEQ(**opts), cot)
    refined, stats = deq_grads(layer, DEQ(refine=2, **opts), cot)
    long, _ = deq_grads(layer, DEQ(refine=30, refine_tol=1e-12, **opts), cot)
    assert stats.backward is not None and stats.backward.n_f_evals == 3
    assert cosine(plain, exact) < cosine(refined, exact) < cosine(long, exact)
    assert cosine(long, exact) > 0.99999


@pytest.mark.parametrize("grad, options", [("upg", dict(k=1, lambda_=1.0)),
                                           ("npg", dict(k=3, lambda_=0.8)),
                                           ("jacobian_free", {})])
def test_zero_budget_attaches_the_gradient_at_the_given_state(grad, options):
    """max_iter=0 (amortised training): no solver step, the method's f call is made at z0 and
    its gradient is the one the method gives with z* = z0; the residual is that of z0."""
    layer = make_tanh_layer(width=6, batch=2)
    z0 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cotangent = torch.randn_like(z0)
    calls = []

    def counted(z):
        calls.append(1)
        return layer.f(z)

    deq = DEQ("fixed_point", grad, **TIGHT, **options).train()
    out, stats = deq(counted, z0, max_iter=0)
    got = torch.autograd.grad((out * cotangent).sum(), layer.params())
    assert len(calls) == 1 and stats.nstep.tolist() == [0, 0]
    torch.testing.assert_close(out, layer.f(z0), atol=1e-12, rtol=0)
    torch.testing.assert_close(stats.abs_residual, (layer.f(z0) - z0).norm(dim=1).detach())

    # the same method attached at z0 by hand: a solve whose result is z0
    from deqrun.core.solvers import SolverResult
    fixed = SolverResult(z=z0, nstep=torch.zeros(2, dtype=torch.long),
                         abs_residual=torch.zeros(2), rel_residual=torch.zeros(2),
                         abs_trace=torch.zeros(1, 2), rel_trace=torch.zeros(1, 2),
                         converged=torch.ones(2, dtype=torch.bool),
                         diverged=torch.zeros(2, dtype=torch.bool), n_f_evals=0,
                         stop_mode="abs", tol=1e-13)
    expected_out = deq.gradient.attach(layer.f, z0, fixed, stats)
    expected = torch.autograd.grad((expected_out * cotangent).sum(), layer.params())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="max_iter"):
        deq.eval()(layer.f, z0, max_iter=0)
