"""The bi-level study's pieces: L-BFGS inverse products, OPA pairs, hypergradients."""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize

from deqrun.studies import bilevel


def random_pairs(dim: int = 9, count: int = 6, seed: int = 0):
    """Curvature pairs of a positive definite quadratic (so s . y > 0)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((dim, dim))
    A = A @ A.T + dim * np.eye(dim)
    s = [rng.standard_normal(dim) for _ in range(count)]
    return s, [A @ si for si in s], A


def test_lbfgs_inverse_product_matches_scipy():
    s, y, _ = random_pairs()
    v = np.random.default_rng(1).standard_normal(9)
    ours = bilevel.lbfgs_inverse_product(s, y, v)
    theirs = scipy.optimize.LbfgsInvHessProduct(np.array(s), np.array(y)).matvec(v)
    assert np.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_lbfgs_inverse_meets_the_last_secant_condition_with_scaling():
    s, y, _ = random_pairs(seed=2)
    assert np.allclose(bilevel.lbfgs_inverse_product(s, y, y[-1], gamma=0.3), s[-1])


def test_opa_pair_makes_the_inverse_better_along_the_outer_direction():
    """On a quadratic, the OPA pair (d, A d) with d ~ H e meets H_new A d = d, and H_new e is
    closer to A^-1 e than before."""
    s, y, A = random_pairs(seed=3)
    fun = lambda b: (0.5 * float(b @ A @ b), A @ b)  # noqa: E731
    memory = bilevel.LBFGSMemory(m=10)
    memory.add(s[0], y[0])
    e = np.random.default_rng(4).standard_normal(9)
    exact = np.linalg.solve(A, e)
    before = np.linalg.norm(memory.apply(e) - exact)
    beta = np.ones(9)
    bilevel._opa_pair(fun, beta, fun(beta)[1], memory, e)
    d = memory.s[-1]
    assert np.allclose(memory.apply(A @ d), d)
    assert np.linalg.norm(memory.apply(e) - exact) < 0.5 * before


def test_lbfgs_minimises_the_inner_problem():
    problem = bilevel.load("breast_cancer", 0)
    inner = lambda b: problem.loss_grad(b, 0, -3.0)  # noqa: E731
    beta, _ = bilevel.lbfgs(inner, np.zeros(30), 1e-8)
    reference = scipy.optimize.minimize(inner, np.zeros(30), jac=True, method="L-BFGS-B",
                                        options=dict(gtol=1e-10, maxiter=5000))
    assert np.linalg.norm(inner(beta)[1]) <= 1e-8
    assert inner(beta)[0] <= reference.fun + 1e-12
    assert np.allclose(beta, reference.x, atol=1e-3)


def test_hoag_hypergradient_matches_finite_differences():
    problem = bilevel.load("breast_cancer", 0)
    lam, zero = -3.0, np.zeros(30)

    def solved(lam_value):
        inner = lambda b: problem.loss_grad(b, 0, lam_value)  # noqa: E731
        return bilevel.lbfgs(inner, zero, 1e-11)

    beta, memory = solved(lam)
    grad_h = problem.loss_grad(beta, 1)[1]
    q = bilevel.inverse_gradient("HOAG", problem, beta, lam, memory, grad_h, 1e-12, None)
    hypergrad = -math.exp(lam) * float(beta @ q)
    h = 1e-5
    numeric = (problem.loss_grad(solved(lam + h)[0], 1)[0]
               - problem.loss_grad(solved(lam - h)[0], 1)[0]) / (2 * h)
    assert abs(hypergrad - numeric) < 1e-5 * max(1.0, abs(numeric))


def test_every_method_lowers_the_validation_loss_on_breast_cancer():
    problem = bilevel.load("breast_cancer", 0)
    lr = bilevel.initial_rate(problem, bilevel.LAM0)
    for method in bilevel.METHODS:
        records = bilevel.hyperoptimise(problem, method, 8, bilevel.LAM0, lr)
        assert records[-1][2] < records[0][2], method


def test_the_study_runs_end_to_end_and_writes_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bilevel", "--out", str(tmp_path), "--seeds", "1",
                                     "--datasets", "breast_cancer", "--outer", "3",
                                     "--search", "3"])
    bilevel.main()
    assert {p.name for p in tmp_path.iterdir()} == {"bilevel.json", "bilevel.txt", "bilevel.png"}
    assert "HOAG" in (tmp_path / "bilevel.txt").read_text()
