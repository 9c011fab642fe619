"""Outer-problem awareness (OPA) and adjoint Broyden: secant conditions and SHINE's inversion."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tanh_layer

from deqrun.core import DEQ, SOLVERS
from deqrun.core.gradients import outer_gradient

DIM = 12


def linear_problem(seed: int = 0):
    """f(z) = W z + b with a dense W (||W|| = 0.8): J_g = W - I is constant."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(1, DIM, generator=gen, dtype=torch.float64)
    return W, b


def recorded_solve(W, b, outer, **options):
    """Solve z = W z + b, returning the result and every point f was evaluated at."""
    points = []

    def f(z):
        points.append(z.detach().clone())
        return z @ W.T + b

    result = SOLVERS["broyden"](f, torch.zeros_like(b), max_iter=9, tol=1e-30, stop_mode="abs",
                                outer_grad=lambda z: outer, **options)
    return result, points


def full_inverse(result) -> torch.Tensor:
    u, v = result.lowrank.u[0], result.lowrank.v[0]
    return -torch.eye(DIM, dtype=torch.float64) + u.T @ v


def test_good_broyden_with_opa_keeps_the_last_secant_condition():
    W, b = linear_problem()
    outer = torch.randn(1, DIM, dtype=torch.float64)
    result, points = recorded_solve(W, b, outer, opa_every=2)
    J_g = W - torch.eye(DIM, dtype=torch.float64)
    dz = points[-1][0] - points[-2][0]
    assert torch.allclose(full_inverse(result) @ (J_g @ dz), dz, atol=1e-9)


def test_adjoint_broyden_with_opa_keeps_the_adjoint_secant_condition():
    W, b = linear_problem(1)
    outer = torch.randn(1, DIM, dtype=torch.float64)
    result, points = recorded_solve(W, b, outer, opa_every=2, update="adjoint")
    J_g = W - torch.eye(DIM, dtype=torch.float64)
    sigma = (points[-1] @ W.T + b - points[-1])[0]
    assert torch.allclose((sigma @ J_g) @ full_inverse(result), sigma, atol=1e-9)


def test_opa_converges_like_plain_broyden():
    W, b = linear_problem(2)
    outer = torch.randn(1, DIM, dtype=torch.float64)
    for options in ({}, dict(opa_every=3), dict(update="adjoint", opa_every=3)):
        result = SOLVERS["broyden"](lambda z: z @ W.T + b, torch.zeros_like(b), max_iter=40,
                                    tol=1e-10, stop_mode="abs", outer_grad=lambda z: outer,
                                    **options)
        assert bool(result.converged.all()), options


def inverse_cosines(update: str, opa_every: int) -> tuple[float, float]:
    """Mean cosine of SHINE's -v^T B with the exact -v^T (J - I)^-1, prescribed and random v."""
    layer = make_tanh_layer(width=60, batch=4, spectral_norm=0.99, seed=1, normal=False)
    gen = torch.Generator().manual_seed(5)
    prescribed, random = (torch.randn(4, 60, generator=gen, dtype=torch.float64)
                          for _ in range(2))
    with torch.no_grad():
        result = SOLVERS["broyden"](layer.f, torch.zeros(4, 60, dtype=torch.float64),
                                    max_iter=40, tol=1e-10, stop_mode="abs", update=update,
                                    opa_every=opa_every, outer_grad=lambda z: prescribed)
        system = torch.eye(60, dtype=torch.float64) - layer.jacobians(layer.fixed_point())
    cosines = []
    for v in (prescribed, random):
        exact = torch.linalg.solve(system.transpose(1, 2), v.unsqueeze(2)).squeeze(2)
        shine = -result.lowrank.rmatvec(v)
        cosines.append(float(torch.cosine_similarity(shine, exact, dim=1).mean()))
    return cosines[0], cosines[1]


@pytest.mark.parametrize("update", ["good", "adjoint"])
def test_opa_makes_shine_exact_in_the_prescribed_direction(update):
    plain_prescribed, plain_random = inverse_cosines(update, 0)
    opa_prescribed, opa_random = inverse_cosines(update, 5)
    assert plain_prescribed < 0.99
    assert opa_prescribed > 0.999
    assert opa_random > plain_random - 0.01


def test_deq_passes_outer_grad_and_shine_opa_gradient_is_closer_to_exact():
    """End to end: L = p . z*, the input gradient of SHINE with OPA vs without, vs exact."""
    layer = make_tanh_layer(width=60, batch=4, spectral_norm=0.99, seed=1, normal=False)
    p = torch.randn(4, 60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_star = layer.fixed_point()
    system = torch.eye(60, dtype=torch.float64) - layer.jacobians(z_star)
    w = torch.linalg.solve(system.transpose(1, 2), p.unsqueeze(2)).squeeze(2)
    exact = layer.param_grads(z_star, w)[3]
    grads = {}
    for opa_every in (0, 5):
        deq = DEQ(solver="broyden", grad="shine", f_max_iter=40, f_tol=1e-10, stop_mode="abs",
                  fallback=False, opa_every=opa_every)
        z, _ = deq(layer.f, torch.zeros(4, 60, dtype=torch.float64),
                   outer_grad=outer_gradient(lambda z: (z * p).sum()))
        grads[opa_every] = torch.autograd.grad((z * p).sum(), layer.x)[0]
    errors = {k: float((g - exact).norm() / exact.norm()) for k, g in grads.items()}
    assert errors[5] < 0.3 * errors[0]


def test_deq_with_opa_refuses_a_training_call_without_outer_grad():
    layer = make_tanh_layer(width=8, batch=2)
    deq = DEQ(solver="broyden", grad="shine", opa_every=5)
    with pytest.raises(ValueError, match="outer_grad"):
        deq(layer.f, torch.zeros(2, 8, dtype=torch.float64))


def test_inversion_study_shows_opa_exact_in_the_prescribed_direction():
    from deqrun.studies import inversion

    f, system = inversion.tanh_problem(0, normal=False)
    plain = inversion.cosines(f, system, inversion.METHODS["Broyden"], 0)
    opa = inversion.cosines(f, system, inversion.METHODS["Broyden + OPA"], 0)
    assert opa["prescribed"] > 0.999 > plain["prescribed"]
