"""JIIO against closed-form answers: a linear f with a quadratic objective, in float64."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from deqrun.core import DEQ, GRADIENTS, JIIO, InputProblem, JIIOOptions, joint_solve
from deqrun.core.jiio import project

DZ, DX, DY, BATCH = 6, 3, 4, 5


@dataclass
class LinearProblem:
    """f(z, x) = A z + B x + c, L(z, x) = 0.5 ||C z - y||^2 + 0.5 r ||x||^2, per sample."""

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    c: torch.Tensor
    y: torch.Tensor
    r: float

    def f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x @ self.B.T + self.c

    def objective(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((z @ self.C.T - self.y) ** 2).sum(1) + 0.5 * self.r * (x**2).sum(1)

    def solve_z(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(DZ, dtype=x.dtype)
        return torch.linalg.solve(eye - self.A, (x @ self.B.T + self.c).T).T

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L as a function of x alone: 0.5 ||K x + d||^2 + 0.5 r ||x||^2; returns (K, d)."""
        M = torch.linalg.inv(torch.eye(DZ, dtype=self.A.dtype) - self.A)
        return self.C @ M @ self.B, (self.C @ M @ self.c) - self.y

    def optimum(self, shift: float = 0.0) -> torch.Tensor:
        """argmin_x of L + 0.5 shift ||x||^2 (shift > 0: the trust-region multiplier)."""
        K, d = self.reduced()
        H = K.T @ K + (self.r + shift) * torch.eye(DX, dtype=K.dtype)
        return -torch.linalg.solve(H, K.T @ d.T).T

    def adjoint(self, z: torch.Tensor) -> torch.Tensor:
        """(I - A^T)^-1 dL/dz at z."""
        eye = torch.eye(DZ, dtype=z.dtype)
        return torch.linalg.solve(eye - self.A.T, ((z @ self.C.T - self.y) @ self.C).T).T

    def step_size(self) -> float:
        K, _ = self.reduced()
        return 1.0 / float(torch.linalg.eigvalsh(K.T @ K).max() + self.r)


def make_problem(seed: int = 0, r: float = 0.1) -> LinearProblem:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    A = randn(DZ, DZ)
    A = 0.6 * A / torch.linalg.matrix_norm(A, 2)
    return LinearProblem(A, randn(DZ, DX), randn(DY, DZ), randn(DZ), randn(BATCH, DY), r)


def start(problem: LinearProblem) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(BATCH, DZ, dtype=torch.float64), torch.zeros(BATCH, DX, dtype=torch.float64)


def options(problem: LinearProblem, fraction: float = 1.0, **changes) -> JIIOOptions:
    """fraction: the input step as a fraction of 1 / (largest curvature of L in x)."""
    alpha = fraction * problem.step_size()
    settings = dict(T=80, m=12, alpha0=[alpha, alpha], best_rel_residual=1e-12)
    settings.update(changes)
    return JIIOOptions(**settings)


@pytest.mark.parametrize("m, T, fraction", [(12, 120, 1.0), (0, 3000, 0.3)])
def test_jiio_finds_the_exact_optimum_and_adjoint(m: int, T: int, fraction: float) -> None:
    problem = make_problem()
    result = joint_solve(problem.f, problem.objective, *start(problem),
                         options(problem, fraction, m=m, T=T))
    x_exact = problem.optimum()
    z_exact = problem.solve_z(x_exact)
    torch.testing.assert_close(result.x, x_exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(result.z, z_exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(result.mu, problem.adjoint(z_exact), atol=1e-8, rtol=0)
    torch.testing.assert_close(result.objective, problem.objective(z_exact, x_exact),
                               atol=1e-12, rtol=0)
    assert result.objective_trace.shape == (T, BATCH)
    assert (result.nstep >= 1).all() and (result.nstep <= T).all()


def test_anderson_needs_far_fewer_iterations_than_plain_steps() -> None:
    problem = make_problem(seed=1)
    x_exact = problem.optimum()
    errors = {}
    for m in (0, 12):
        result = joint_solve(problem.f, problem.objective, *start(problem),
                             options(problem, 0.3, m=m, T=60))
        errors[m] = float((result.x - x_exact).abs().max())
    assert errors[12] < 1e-5 * errors[0]


def test_samples_are_solved_independently() -> None:
    problem = make_problem(seed=2)
    opts = options(problem, T=40)
    batch = joint_solve(problem.f, problem.objective, *start(problem), opts)
    single = LinearProblem(problem.A, problem.B, problem.C, problem.c, problem.y[:1], problem.r)
    z0, x0 = start(problem)
    alone = joint_solve(single.f, single.objective, z0[:1], x0[:1], opts)
    torch.testing.assert_close(alone.x, batch.x[:1], atol=1e-12, rtol=0)


def trust_region_optimum(problem: LinearProblem, eps: float) -> torch.Tensor:
    """argmin L over ||x|| <= eps per sample: x(shift) with ||x(shift)|| = eps, by bisection."""
    lo = torch.zeros(BATCH, dtype=torch.float64)
    hi = torch.full((BATCH,), 1e6, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        norms = torch.stack([problem.optimum(float(s))[i].norm() for i, s in enumerate(mid)])
        lo, hi = torch.where(norms > eps, mid, lo), torch.where(norms > eps, hi, mid)
    return torch.stack([problem.optimum(float(s))[i] for i, s in enumerate(hi)])


def test_l2_projection_matches_the_constrained_optimum() -> None:
    problem = make_problem(seed=3, r=0.0)
    eps = 0.5 * float(problem.optimum().norm(dim=1).min())
    result = joint_solve(problem.f, problem.objective, *start(problem),
                         options(problem, 0.3, projection="l2", eps=eps, m=0, T=3000))
    assert (result.x.norm(dim=1) <= eps * (1 + 1e-12)).all()
    torch.testing.assert_close(result.x, trust_region_optimum(problem, eps), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind, normalized", [("l2", True), ("linf", True), ("linf", False)])
def test_projection_keeps_x_in_the_ball(kind: str, normalized: bool) -> None:
    problem = make_problem(seed=4)
    z0, x0 = start(problem)
    center = x0 + 0.3
    eps = 0.05
    result = joint_solve(problem.f, problem.objective, z0, center.clone(),
                         options(problem, projection=kind, eps=eps, normalized_step=normalized,
                                 alpha0=[0.2, 0.1], T=60, best_rel_residual=1e-6))
    delta = result.x - center
    size = delta.norm(dim=1) if kind == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-12)).all()
    assert (size >= 0.99 * eps).all()  # the unconstrained optimum lies far outside this ball
    z_center = problem.solve_z(center)
    assert (result.objective < problem.objective(z_center, center)).all()


def test_project_l2_and_linf_in_closed_form() -> None:
    x = torch.tensor([[3.0, 4.0], [0.1, 0.0]], dtype=torch.float64)
    center = torch.zeros_like(x)
    torch.testing.assert_close(project(x, center, "l2", 1.0),
                               torch.tensor([[0.6, 0.8], [0.1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(project(x, center, "linf", 0.5),
                               torch.tensor([[0.5, 0.5], [0.1, 0.0]], dtype=torch.float64))


def tanh_problem(seed: int = 0):
    """f(z, x) = tanh(W z + U x + b), L = 0.5 ||V z - y||^2 + 0.05 ||x||^2; parameters leaves."""
    gen = torch.Generator().manual_seed(seed)
    width, latent, out, batch = 8, 3, 5, 4
    W = torch.randn(width, width, generator=gen, dtype=torch.float64)
    W = (0.8 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    U = torch.randn(width, latent, generator=gen, dtype=torch.float64).requires_grad_()
    b = (0.1 * torch.randn(width, generator=gen, dtype=torch.float64)).requires_grad_()
    V = torch.randn(out, width, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, out, generator=gen, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ W.T + x @ U.T + b)

    def objective(z, x):
        return 0.5 * ((z @ V.T - y) ** 2).sum(1) + 0.05 * (x**2).sum(1)

    z0 = torch.zeros(batch, width, dtype=torch.float64)
    x0 = torch.zeros(batch, latent, dtype=torch.float64)
    return f, objective, z0, x0, (W, U, b)


def exact_parameter_gradient(f, objective, z_star, x_star, params) -> list[torch.Tensor]:
    """d/dparams of mean_i L_i(f(z*), x*), f's dependence on z* through (I - J(z*))^-1, dense."""
    batch, width = z_star.shape
    z = f(z_star, x_star).detach().requires_grad_()
    grad_z = torch.autograd.grad(objective(z, x_star).mean(), z)[0]
    jac = torch.autograd.functional.jacobian(lambda v: f(v, x_star), z_star.detach())
    w = torch.stack([torch.linalg.solve(torch.eye(width, dtype=z.dtype) - jac[i, :, i].T,
                                        grad_z[i]) for i in range(batch)])
    out = f(z_star.detach(), x_star)
    return list(torch.autograd.grad(out, params, w))


@pytest.mark.parametrize("warm", [True, False])
def test_training_gradient_is_exact_warm_or_cold(warm: bool) -> None:
    f, objective, z0, x0, params = tanh_problem()
    jiio = JIIO(T=100, m=10, alpha0=[0.3, 0.3], b_tol=1e-12, b_max_iter=200,
                        best_rel_residual=1e-9)
    result = jiio.solve(f, objective, z0, x0)
    z, stats = jiio.equilibrium(f, result, loss_scale=1.0 / len(x0), warm_start=warm)
    loss = objective(z, result.x.detach()).mean()
    grads = torch.autograd.grad(loss, params)
    exact = exact_parameter_gradient(f, objective, result.z, result.x.detach(), params)
    for got, want in zip(grads, exact):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-8)
    assert stats.backward is not None and stats.forward.n_f_evals == 100


def test_warm_start_from_mu_saves_backward_steps() -> None:
    f, objective, z0, x0, params = tanh_problem(seed=1)
    jiio = JIIO(T=100, m=10, alpha0=[0.3, 0.3], b_tol=1e-10, b_max_iter=200,
                        best_rel_residual=1e-9)
    result = jiio.solve(f, objective, z0, x0)
    steps = {}
    for warm in (True, False):
        z, stats = jiio.equilibrium(f, result, loss_scale=1.0 / len(x0), warm_start=warm)
        objective(z, result.x.detach()).mean().backward()
        steps[warm] = int(stats.backward.n_f_evals)
    assert steps[True] * 3 <= steps[False]


def test_jacobian_penalty_in_training_is_the_frobenius_norm_at_z_star() -> None:
    f, objective, z0, x0, params = tanh_problem(seed=2)
    jiio = JIIO(T=100, m=10, alpha0=[0.3, 0.3], best_rel_residual=1e-9)
    result = jiio.solve(f, objective, z0, x0)
    _, off = jiio.equilibrium(f, result, loss_scale=1.0 / len(x0))
    assert off.jac_loss is None
    torch.manual_seed(0)
    z, stats = jiio.equilibrium(f, result, loss_scale=1.0 / len(x0), jac_samples=4000)
    jac = torch.autograd.functional.jacobian(lambda v: f(v, result.x.detach()), result.z)
    width = z0.shape[1]
    exact = sum(jac[i, :, i].pow(2).sum() for i in range(len(x0))) / len(x0) / width
    assert abs(float(stats.jac_loss.detach()) - float(exact)) < 0.05 * float(exact)
    # differentiable in the parameters, beside the (unchanged, exact) implicit gradient
    (grad_w,) = torch.autograd.grad(stats.jac_loss, params[0], retain_graph=True)
    assert grad_w.abs().sum() > 0
    grads = torch.autograd.grad(objective(z, result.x.detach()).mean(), params)
    exact_grads = exact_parameter_gradient(f, objective, result.z, result.x.detach(), params)
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_z_init_solve_starts_at_the_equilibrium_and_reaches_the_same_optimum() -> None:
    problem = make_problem(seed=3)
    z0, x0 = start(problem)
    x0 = x0 + 0.5
    deq = DEQ("anderson", f_max_iter=200, f_tol=1e-13, stop_mode="abs")
    calls = []

    def forward(g, z):
        calls.append(1)
        return deq.solve(g, z, 200, 1e-13)

    results = {}
    for z_init in ("zeros", "solve"):
        jiio = JIIO(**vars(options(problem, T=120, z_init=z_init)))
        results[z_init] = jiio.solve(problem.f, problem.objective, z0, x0, forward=forward)
    assert len(calls) == 1  # only z_init=solve calls the forward solver
    # the first iterate is the equilibrium at x0 with z_init=solve, zeros (far off) otherwise
    assert float(results["solve"].abs_trace[0].max()) < 1e-10
    assert float(results["zeros"].abs_trace[0].min()) > 0.1
    x_exact = problem.optimum()
    for result in results.values():
        torch.testing.assert_close(result.x, x_exact, atol=1e-8, rtol=0)
        torch.testing.assert_close(result.z, problem.solve_z(x_exact), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="z_init=solve needs the model's forward solver"):
        JIIO(z_init="solve").solve(problem.f, problem.objective, z0, x0)


def test_options_are_checked() -> None:
    assert JIIOOptions(T=40).switch_at == 50 and JIIOOptions(T=160).switch_at == 100
    assert JIIOOptions(T=160, switch_iter=7).switch_at == 7
    with pytest.raises(ValueError, match="alpha0"):
        JIIOOptions(alpha0=[0.1]).check()
    with pytest.raises(ValueError, match="projection"):
        JIIO(projection="l1")
    with pytest.raises(ValueError, match="z_init"):
        JIIO(z_init="ones")
    assert "jiio" not in GRADIENTS  # an input-optimisation mode, not a gradient of the DEQ layer


def test_a_problem_overrides_options_for_its_own_solve_only() -> None:
    base = JIIOOptions(T=80, m=20, alpha0=[0.6, 0.2])
    x0 = torch.zeros(2, 3)
    assert InputProblem(x0=x0, objective=None).options(base) is base
    own = InputProblem(x0=x0, objective=None, T=10, step_scale=2.0,
                       overrides={"m": 5, "z_damping": 1.0, "alpha0": [1.0, 0.3], "T": 99})
    opts = own.options(base)
    # the problem's own T wins over an override; step_scale scales the overriding alpha0
    assert (opts.m, opts.z_damping, opts.T, opts.alpha0) == (5, 1.0, 10, [2.0, 0.6])
    assert (base.m, base.z_damping, base.T) == (20, 0.8, 80)
    with pytest.raises(ValueError, match="unknown JIIO option"):
        InputProblem(x0=x0, objective=None, overrides={"mm": 5}).options(base)
    with pytest.raises(ValueError, match="mu_damping"):
        InputProblem(x0=x0, objective=None, overrides={"mu_damping": 2.0}).options(base)

