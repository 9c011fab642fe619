"""Broyden: stall test, protective break, limited memory, line search, adjoint/OPA updates,
and the classic root problems against scipy and torchdeq."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from deqrun.core import SOLVERS
from deqrun.core.solvers import STALL_WINDOW, _BroydenMemory, _Point
from deqrun.studies.root_problems import PROBLEMS

ALL = sorted(SOLVERS)
# Problems that plain Broyden (ours and torchdeq 0.1.0's, no line search) solves to 1e-8 from the
# standard start; powell_singular (singular Jacobian at the root) only gets to ~1e-6 in 100
# steps, the other three need a line search or a different start.
BROYDEN_SOLVES = ("rosenbrock", "powell_badly_scaled", "trigonometric",
                  "discrete_boundary_value", "brown_almost_linear", "extended_rosenbrock")
UNIQUE_ROOT = ("rosenbrock", "powell_badly_scaled", "discrete_boundary_value",
               "extended_rosenbrock")


def solve(name: str, **options):
    problem = PROBLEMS[name]
    return SOLVERS["broyden"](problem.fixed_point_map(), problem.z0(), max_iter=100, tol=1e-8,
                              stop_mode="abs", **options)


@pytest.mark.parametrize("solver", ALL)
def test_stall_test_stops_a_stalled_solve(solver):
    """g(z) = c is constant at 2.4 tol: no progress is possible, the stall test ends the solve.

    c = 2^-13 keeps every iterate exact, so dg = 0 exactly and Broyden keeps stepping by c.
    """
    c = torch.full((2, 4), 2.0**-13, dtype=torch.float64)
    result = SOLVERS[solver](lambda z: z + c, torch.zeros_like(c), max_iter=200, tol=1e-4,
                             stop_mode="abs")
    assert result.n_f_evals == STALL_WINDOW + 1
    assert not bool(result.converged.any())


@pytest.mark.parametrize("solver", ALL)
def test_no_stall_stop_far_from_tolerance(solver):
    c = torch.full((2, 4), 2.0**-10, dtype=torch.float64)
    result = SOLVERS[solver](lambda z: z + c, torch.zeros_like(c), max_iter=80, tol=1e-4,
                             stop_mode="abs")
    assert result.n_f_evals == 80


@pytest.mark.parametrize("name", BROYDEN_SOLVES)
def test_broyden_solves_classic_problems(name):
    result = solve(name)
    assert bool(result.converged.all()), float(result.abs_residual)
    assert not bool(result.diverged.any())


@pytest.mark.parametrize("name", UNIQUE_ROOT)
def test_broyden_root_matches_scipy(name):
    problem = PROBLEMS[name]
    residual = lambda x: problem.residual(torch.tensor(x).unsqueeze(0))[0].numpy()  # noqa: E731
    reference = scipy.optimize.root(residual, np.array(problem.start), method="hybr", tol=1e-12)
    assert reference.success
    ours = solve(name).z[0].numpy()
    assert np.abs(ours - reference.x).max() < 1e-5 * max(1.0, np.abs(reference.x).max())


@pytest.mark.parametrize("name", ("brown_almost_linear", "powell_singular"))
def test_transient_excursion_does_not_trip_the_explosion_guard(name):
    """Both pass through residuals > 1e6 x the first one, then come down by 1e5 (as torchdeq's
    do); the old one-strike guard froze them at the start."""
    result = solve(name)
    first = float(result.abs_trace[0])
    assert float(result.abs_trace.max()) > 1e6 * first
    assert float(result.abs_residual) < 1e-5 * first
    assert float(solve(name, explode_patience=1).abs_residual) > 1e-3 * first


@pytest.mark.parametrize("name", ("helical_valley", "rosenbrock", "brown_almost_linear"))
def test_line_search_solves_helical_valley_and_keeps_the_easy_ones(name):
    assert bool(solve(name, line_search=True).converged.all())


def test_helical_valley_needs_the_line_search():
    assert not bool(solve("helical_valley").converged.any())


def dense_limited_broyden(f, z, steps: int, mem: int) -> list[float]:
    """Textbook limited-memory good Broyden with an explicit inverse, for comparison."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def inverse() -> torch.Tensor:
        return -torch.eye(z.numel(), dtype=z.dtype) + sum(
            (torch.outer(u, v) for u, v in pairs[-mem:]), torch.zeros(z.numel(), z.numel(),
                                                                     dtype=z.dtype))

    g = f(z) - z
    trace = [float(g.norm())]
    for _ in range(steps - 1):
        B = inverse()
        dz = -B @ g
        z = z + dz
        g_new = f(z) - z
        dg = g_new - g
        v = B.T @ dz
        pairs.append(((dz - B @ dg) / (v @ dg), v))
        g = g_new
        trace.append(float(g.norm()))
    return trace


def test_limited_memory_matches_textbook_after_the_memory_wraps():
    gen = torch.Generator().manual_seed(3)
    W = 0.5 * torch.randn(6, 6, generator=gen, dtype=torch.float64) / 6**0.5
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + b) + 0.3 * z  # noqa: E731
    expected = dense_limited_broyden(lambda z: f(z.unsqueeze(0))[0], torch.zeros(6,
                                     dtype=torch.float64), 12, mem=3)
    result = SOLVERS["broyden"](f, torch.zeros(1, 6, dtype=torch.float64), max_iter=12,
                                tol=1e-14, stop_mode="abs", mem=3)
    assert torch.allclose(result.abs_trace[:, 0], torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-8)


def test_adjoint_update_meets_its_adjoint_secant_condition():
    """(sigma^T J_g) B_new = sigma^T on a dense problem, whatever the pairs already stored."""
    gen = torch.Generator().manual_seed(0)
    dim = 7
    A = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    f = lambda z: z @ (0.3 * A).T + 1.0  # noqa: E731 (J_g = 0.3 A - I)
    z = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    memory = _BroydenMemory(z, 5, None)
    improved = torch.ones(2, dtype=torch.bool)
    for _ in range(3):
        point = _Point.at(f, torch.randn(2, dim, generator=gen, dtype=torch.float64), graph=True)
        sigma = torch.randn(2, dim, generator=gen, dtype=torch.float64)
        memory.adjoint_update(point, sigma, improved)
        J_g = 0.3 * A - torch.eye(dim, dtype=torch.float64)
        assert torch.allclose(memory.rmatvec(sigma @ J_g), sigma, atol=1e-10)


def test_torchdeq_broyden_fails_wherever_ours_does():
    """On the suite, torchdeq 0.1.0's Broyden converges nowhere that ours does not."""
    solver = pytest.importorskip("torchdeq.solver").get_solver("broyden")
    for name, problem in PROBLEMS.items():
        f = problem.fixed_point_map()
        z, _, _ = solver(f, problem.z0(), max_iter=100, tol=1e-8, stop_mode="abs")
        theirs = float((f(z) - z).norm())
        if theirs < 1e-8:
            assert bool(solve(name).converged.all()), name


def test_steps_to_tol_is_the_first_step_under_tol_per_sample():
    """Sample 0 contracts fast, sample 1 slowly: nstep keeps moving for 0, steps_to_tol does not."""
    rate = torch.tensor([[0.1], [0.7]], dtype=torch.float64)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    result = SOLVERS["fixed_point"](lambda z: rate * z + 1.0, z0, max_iter=100, tol=1e-6,
                                    stop_mode="abs")
    under = result.abs_trace <= 1e-6
    assert result.steps_to_tol.tolist() == [int(under[:, i].nonzero()[0]) + 1 for i in range(2)]
    assert int(result.steps_to_tol[0]) < int(result.nstep[0])
    assert int(result.steps_to_tol[1]) == int(result.nstep[1]) == result.n_f_evals


def test_broyden_memory_is_not_filled_in_deterministic_mode(monkeypatch):
    """Deterministic mode fills torch.empty with NaN: Broyden's memory (room for every step the
    solve may take) would be written in full at every solve. It is allocated unfilled, the
    solve is the same, and the global flag is left as it was."""
    from deqrun.core import solvers

    allocated, real = [], solvers.unfilled_empty

    def spy(like, *shape):
        allocated.append(shape)
        return real(like, *shape)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        size = 16 * 2**20  # 64 MB: fresh (zero) pages from the system, NaN only if filled
        assert torch.isnan(torch.zeros(1).new_empty(size)).all()  # what the fill does
        buffer = solvers.unfilled_empty(torch.zeros(1), size)
        assert not torch.isnan(buffer).all()
        assert torch.utils.deterministic.fill_uninitialized_memory  # left as it was
        del buffer
        monkeypatch.setattr(solvers, "unfilled_empty", spy)
        c = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 6)
        f = lambda z: 0.5 * torch.tanh(z) + c  # noqa: E731
        filled = SOLVERS["broyden"](f, torch.zeros_like(c), max_iter=40, tol=1e-10,
                                    stop_mode="abs")
    finally:
        torch.use_deterministic_algorithms(previous)
    plain = SOLVERS["broyden"](f, torch.zeros_like(c), max_iter=40, tol=1e-10, stop_mode="abs")
    torch.testing.assert_close(filled.z, plain.z, atol=0, rtol=0)
    assert bool(filled.converged.all())
    assert len(allocated) >= 2 and allocated[0] == (2, 39, 6)  # u and v of 39 slots
