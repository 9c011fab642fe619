"""SHINE's bi-level study: hyperparameter optimisation of L2-regularised logistic regression.

    python -m deqrun.studies.bilevel [--out outputs/reference/shine] [--seeds 3] [--quick]

Inner problem: beta*(lam) = argmin_beta mean_i log(1 + exp(-y_i x_i . beta)) + e^lam / 2 ||beta||^2
on the training split, solved by L-BFGS to a tolerance that shrinks along the outer iterations
(warm-started, as HOAG does). Outer problem: the validation logistic loss h(beta*(lam)). The
hypergradient is dh/dlam = -e^lam beta*^T q with q ~ H^-1 grad h (H the inner Hessian), where q
comes from conjugate gradient (HOAG), the inner L-BFGS's own inverse estimate (SHINE), the
identity (JF), SHINE with OPA (extra secant pairs along the L-BFGS direction of grad h every
opa_every inner steps) or SHINE refined by a few CG steps. Baselines: grid and random search.
Recorded: held-out test loss against wall-clock time; one plot per data set.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

LAM_RANGE = (-12.0, 2.0)
LAM0, MAX_STEP = -4.0, 1.0


@dataclass
class LogisticProblem:
    """Train/validation/test splits with labels in {-1, 1}; X dense or scipy sparse."""

    name: str
    X: list
    y: list

    def loss_grad(self, beta: np.ndarray, split: int, lam: float | None = None):
        """Mean logistic loss on a split (+ e^lam/2 ||beta||^2 if lam is given), its gradient."""
        X, y = self.X[split], self.y[split]
        margin = y * (X @ beta)
        value = float(np.mean(np.logaddexp(0.0, -margin)))
        weight = -y * _sigmoid(-margin) / len(y)
        grad = np.asarray(X.T @ weight).ravel()
        if lam is not None:
            value += 0.5 * math.exp(lam) * float(beta @ beta)
            grad = grad + math.exp(lam) * beta
        return value, grad

    def hvp(self, beta: np.ndarray, lam: float, v: np.ndarray) -> np.ndarray:
        """Inner Hessian times v."""
        X, y = self.X[0], self.y[0]
        p = _sigmoid(y * (X @ beta))
        curvature = p * (1 - p) / len(y)
        return np.asarray(X.T @ (curvature * (X @ v))).ravel() + math.exp(lam) * v


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -t))


def lbfgs_inverse_product(s: list, y: list, v: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """H v for the L-BFGS inverse-Hessian estimate of pairs (s_i, y_i), H0 = gamma I (two loops)."""
    q = np.array(v, dtype=float, copy=True)
    rho = [1.0 / float(si @ yi) for si, yi in zip(s, y)]
    alpha = [0.0] * len(s)
    for i in reversed(range(len(s))):
        alpha[i] = rho[i] * float(s[i] @ q)
        q -= alpha[i] * y[i]
    r = gamma * q
    for i in range(len(s)):
        r += s[i] * (alpha[i] - rho[i] * float(y[i] @ r))
    return r


@dataclass
class LBFGSMemory:
    """The m most recent curvature pairs and the initial scaling gamma = s.y / y.y."""

    m: int
    s: list = field(default_factory=list)
    y: list = field(default_factory=list)

    @property
    def gamma(self) -> float:
        return float(self.s[-1] @ self.y[-1] / (self.y[-1] @ self.y[-1])) if self.s else 1.0

    def add(self, s: np.ndarray, y: np.ndarray) -> None:
        if float(s @ y) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y)):
            self.s, self.y = (self.s + [s])[-self.m:], (self.y + [y])[-self.m:]

    def apply(self, v: np.ndarray) -> np.ndarray:
        return lbfgs_inverse_product(self.s, self.y, v, self.gamma)


def lbfgs(fun: Callable, beta: np.ndarray, tol: float, max_iter: int = 500, m: int = 30,
          opa: Callable | None = None, opa_every: int = 5) -> tuple[np.ndarray, LBFGSMemory]:
    """Minimise fun (beta -> value, grad) until ||grad|| <= tol; Armijo backtracking.

    opa(beta) -> direction e: every opa_every steps, the extra pair (d, grad(beta + d) - grad)
    with d = H e (scaled to the last step's length) is added, so that H is right along e.
    """
    memory = LBFGSMemory(m)
    value, grad = fun(beta)
    for k in range(max_iter):
        if np.linalg.norm(grad) <= tol:
            break
        if opa is not None and k > 0 and k % opa_every == 0:
            _opa_pair(fun, beta, grad, memory, opa(beta))
        direction = -memory.apply(grad)
        step, new_value, new_grad = _armijo(fun, beta, value, grad, direction)
        memory.add(step, new_grad - grad)
        beta, value, grad = beta + step, new_value, new_grad
    return beta, memory


def _opa_pair(fun, beta, grad, memory: LBFGSMemory, e: np.ndarray) -> None:
    d = memory.apply(e)
    scale = np.linalg.norm(memory.s[-1]) / max(np.linalg.norm(d), 1e-300) if memory.s else 1e-3
    d = scale * d
    memory.add(d, fun(beta + d)[1] - grad)


def _armijo(fun, beta, value, grad, direction, c1: float = 1e-4):
    slope = float(grad @ direction)
    if slope >= 0:
        direction, slope = -grad, -float(grad @ grad)
    t = 1.0
    for _ in range(30):
        new_value, new_grad = fun(beta + t * direction)
        if new_value <= value + c1 * t * slope:
            break
        t *= 0.5
    return t * direction, new_value, new_grad


def conjugate_gradient(matvec: Callable, b: np.ndarray, x0: np.ndarray, tol: float,
                       max_iter: int) -> np.ndarray:
    """Solve A x = b (A symmetric positive definite) from x0 until ||A x - b|| <= tol."""
    x = x0.copy()
    r = b - matvec(x)
    p, rr = r.copy(), float(r @ r)
    for _ in range(max_iter):
        if math.sqrt(rr) <= tol:
            break
        ap = matvec(p)
        step = rr / float(p @ ap)
        x += step * p
        r -= step * ap
        rr, rr_old = float(r @ r), rr
        p = r + (rr / rr_old) * p
    return x


METHODS = ("HOAG", "SHINE", "SHINE-OPA", "SHINE-refine", "JF")
SEARCHES = ("grid search", "random search")
REFINE_STEPS = 5


def inverse_gradient(method: str, problem: LogisticProblem, beta, lam, memory: LBFGSMemory,
                     grad_h: np.ndarray, tol: float, warm: np.ndarray | None) -> np.ndarray:
    """q ~ H^-1 grad h by the method's rule."""
    if method == "JF":
        return grad_h
    hvp = lambda v: problem.hvp(beta, lam, v)  # noqa: E731
    if method == "HOAG":
        start = warm if warm is not None else np.zeros_like(grad_h)
        return conjugate_gradient(hvp, grad_h, start, tol, 10 * len(grad_h))
    q = memory.apply(grad_h)
    if method == "SHINE-refine":
        q = conjugate_gradient(hvp, grad_h, q, 0.0, REFINE_STEPS)
    return q


def initial_rate(problem: LogisticProblem, lam: float) -> float:
    """The shared first step size: 0.5 / |exact hypergradient at lam| (not timed)."""
    inner = lambda b: problem.loss_grad(b, 0, lam)  # noqa: E731
    zero = np.zeros(problem.X[0].shape[1])
    beta, _ = lbfgs(inner, zero, 1e-8 * np.linalg.norm(inner(zero)[1]))
    grad_h = problem.loss_grad(beta, 1)[1]
    q = conjugate_gradient(lambda v: problem.hvp(beta, lam, v), grad_h, zero, 1e-10, 1000)
    return 0.5 / max(abs(math.exp(lam) * float(beta @ q)), 1e-12)


def hyperoptimise(problem: LogisticProblem, method: str, n_outer: int, lam0: float,
                  lr: float) -> list:
    """Gradient descent on lam with the method's hypergradient; [(seconds, lam, val, test)].

    Step size: lr at first, halved when the validation loss rose, else grown by 5%; a step
    moves lam by at most MAX_STEP.
    """
    beta, lam, q, previous = np.zeros(problem.X[0].shape[1]), lam0, None, math.inf
    tol0 = np.linalg.norm(problem.loss_grad(beta, 0, lam)[1])
    clock, records = 0.0, []
    for k in range(n_outer):
        start = time.perf_counter()
        tol = tol0 * max(0.1 * 0.7**k, 1e-5)
        inner = lambda b, lam=lam: problem.loss_grad(b, 0, lam)  # noqa: E731
        opa = (lambda b: problem.loss_grad(b, 1)[1]) if method == "SHINE-OPA" else None
        beta, memory = lbfgs(inner, beta, tol, opa=opa)
        value, grad_h = problem.loss_grad(beta, 1)
        q = inverse_gradient(method, problem, beta, lam, memory, grad_h, tol, q)
        hypergrad = -math.exp(lam) * float(beta @ q)
        lr = lr * (0.5 if value > previous else 1.05)
        change = float(np.clip(lr * hypergrad, -MAX_STEP, MAX_STEP))
        previous, lam = value, float(np.clip(lam - change, *LAM_RANGE))
        clock += time.perf_counter() - start
        records.append((clock, lam, value, problem.loss_grad(beta, 2)[0]))
    return records


def search(problem: LogisticProblem, kind: str, n_points: int, seed: int,
           tol_rel: float = 1e-5) -> list:
    """Grid (warm-started, strong to weak regularisation) or random search over lam.

    Each record holds the test loss of the best lam so far by validation loss.
    """
    rng = np.random.default_rng(seed)
    lams = (np.linspace(LAM_RANGE[1], LAM_RANGE[0], n_points) if kind == "grid search"
            else rng.uniform(*LAM_RANGE, n_points))
    beta = np.zeros(problem.X[0].shape[1])
    clock, best, records = 0.0, (math.inf, math.nan), []
    for lam in lams:
        start = time.perf_counter()
        beta = beta if kind == "grid search" else np.zeros_like(beta)
        inner = lambda b, lam=lam: problem.loss_grad(b, 0, lam)  # noqa: E731
        tol = tol_rel * np.linalg.norm(inner(np.zeros_like(beta))[1])
        beta, _ = lbfgs(inner, beta, tol)
        value = problem.loss_grad(beta, 1)[0]
        clock += time.perf_counter() - start
        if value < best[0]:
            best = (value, problem.loss_grad(beta, 2)[0])
        records.append((clock, float(lam), best[0], best[1]))
    return records


def load(name: str, seed: int) -> LogisticProblem:
    """A data set split 50/25/25 (train/validation/test) by `seed`; labels in {-1, 1}."""
    from sklearn import datasets

    if name == "breast_cancer":
        X, y = datasets.load_breast_cancer(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
    elif name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        X, y = X / 16.0, (y >= 5)
    elif name == "sparse_synthetic":
        X, y = _sparse_synthetic(seed)
    elif name == "news20":
        X, y = datasets.fetch_20newsgroups_vectorized(subset="all", return_X_y=True)
        y = y < 10
    else:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS + ONLINE)}")
    y = np.where(np.asarray(y) > 0, 1.0, -1.0)
    order = np.random.default_rng(seed).permutation(len(y))
    cuts = np.split(order, [len(y) // 2, 3 * len(y) // 4])
    return LogisticProblem(name, [X[c] for c in cuts], [y[c] for c in cuts])


def _sparse_synthetic(seed: int, n: int = 20000, dim: int = 5000, density: float = 0.01):
    """Sparse design (50 features per row), a sparse true model (20% of the features) and
    10% flipped labels: more features than the training half can pin down without L2."""
    rng = np.random.default_rng(1000 + seed)
    X = sp.random(n, dim, density=density, format="csr", random_state=rng,
                  data_rvs=rng.standard_normal)
    truth = np.where(rng.random(dim) < 0.2, rng.standard_normal(dim), 0.0)
    y = X @ truth > 0
    flip = rng.random(n) < 0.1
    return X, np.where(flip, ~y, y)


DATASETS = ("breast_cancer", "digits", "sparse_synthetic")
ONLINE = ("news20",)


def run_dataset(name: str, seeds: int, n_outer: int, n_search: int) -> dict:
    """{method: [per-seed records]} for every hypergradient method and search."""
    out: dict = {m: [] for m in METHODS + SEARCHES}
    for seed in range(seeds):
        problem = load(name, seed)
        lr = initial_rate(problem, LAM0)
        for method in METHODS:
            out[method].append(hyperoptimise(problem, method, n_outer, LAM0, lr))
        for kind in SEARCHES:
            out[kind].append(search(problem, kind, n_search, seed))
    return out


def time_to_reach(records: list, target: float) -> float:
    """First time the test loss is within 0.1% of target (inf if never)."""
    return next((t for t, _, _, test in records if test <= target * 1.001), math.inf)


def summary(name: str, results: dict) -> list[str]:
    """Per method: median final test loss, median time, median time to HOAG's final test loss."""
    lines = [f"{name}: {'method':<14}{'final test':>11}{'time s':>9}{'to HOAG final s':>17}"]
    targets = [runs[-1][3] for runs in results["HOAG"]]
    for method, runs in results.items():
        final = np.median([r[-1][3] for r in runs])
        total = np.median([r[-1][0] for r in runs])
        reach = np.median([time_to_reach(r, t) for r, t in zip(runs, targets)])
        lines.append(f"  {method:<14}{final:>11.4f}{total:>9.2f}{reach:>17.3f}")
    return lines


def plot(all_results: dict, path: Path) -> None:
    """Test loss against wall-clock time, one panel per data set; thin lines are seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.8))
    axes = np.atleast_1d(axes)
    colours = dict(zip(METHODS + SEARCHES, plt.get_cmap("tab10").colors))
    for ax, (name, results) in zip(axes, all_results.items()):
        for method, runs in results.items():
            for i, records in enumerate(runs):
                times = [r[0] for r in records]
                tests = [r[3] for r in records]
                ax.step(times, tests, where="post", color=colours[method],
                        alpha=1.0 if i == 0 else 0.35, lw=1.4 if i == 0 else 0.8,
                        label=method if i == 0 else None)
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock time (s)")
        ax.set_title(name)
        low = min(min(r[3] for r in runs[0]) for runs in results.values())
        ax.set_ylim(low * 0.98, low * 1.3)
    axes[0].set_ylabel("held-out test loss")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/reference/shine")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated; offline {DATASETS}, online {ONLINE}")
    parser.add_argument("--outer", type=int, default=30, help="hypergradient steps")
    parser.add_argument("--search", type=int, default=20, help="lam values per search")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_results, lines = {}, []
    for name in args.datasets.split(","):
        all_results[name] = run_dataset(name, args.seeds, args.outer, args.search)
        lines += summary(name, all_results[name])
        print("\n".join(summary(name, all_results[name])), flush=True)
    (out / "bilevel.json").write_text(json.dumps(all_results))
    (out / "bilevel.txt").write_text("\n".join(lines) + "\n")
    plot(all_results, out / "bilevel.png")
    print(f"wrote {out}/bilevel.json, bilevel.txt, bilevel.png")


if __name__ == "__main__":
    main()
