"""Forward fixed-point solvers: fixed_point, anderson, broyden.

Each solver is a plain function `solve(f, z0, *, max_iter, tol, stop_mode, **options)` returning a
`SolverResult`. The residual of an iterate z is ||f(z) - z|| per sample (abs) or that divided by
||f(z)|| (rel); every sample returns its own lowest-residual iterate, not the last one.
`max_iter` counts evaluations of f.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .state import State, StateLayout

SOLVERS: dict[str, Callable[..., SolverResult]] = {}
STOP_MODES = ("abs", "rel")
REL_EPS = 1e-8
EXPLODE_FACTOR = 1e6


@dataclass
class LowRankInverse:
    """Broyden's inverse-Jacobian estimate of g(z) = f(z) - z: B = -I + sum_j u_j v_j^T.

    `u`, `v` are (batch, slots, dim); `valid` (batch, slots) marks, per sample, the pairs gathered
    up to that sample's returned iterate.
    """

    u: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor

    @property
    def count(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def masked(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.valid.unsqueeze(-1).to(self.u.dtype)
        return self.u * mask, self.v

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """B x for flat x (batch, dim)."""
        u, v = self.masked()
        return -x + _lowrank_apply(u, v, x)

    def rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        """x^T B for flat x (batch, dim)."""
        u, v = self.masked()
        return -x + _lowrank_apply(v, u, x)


@dataclass
class SolverResult:
    """Outcome of a solve, per sample unless noted."""

    z: State
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    n_f_evals: int
    stop_mode: str
    tol: float
    lowrank: LowRankInverse | None = None

    @property
    def residual(self) -> torch.Tensor:
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual

    @property
    def trace(self) -> torch.Tensor:
        return self.rel_trace if self.stop_mode == "rel" else self.abs_trace


def _lowrank_apply(left: torch.Tensor, right: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j left_j (right_j . x) for (batch, n, dim) pairs; zero when n == 0."""
    if left.shape[1] == 0:
        return torch.zeros_like(x)
    return torch.bmm(_coefficients(x, right), left).squeeze(1)


def _coefficients(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(rows_j . x) for (batch, n, dim) rows, as (batch, 1, n).

    Written as x^T rows^T: CPU BLAS runs this product several times faster than rows @ x.
    """
    return torch.bmm(x.unsqueeze(1), rows.transpose(1, 2))


class _Tracker:
    """Residuals, best iterate, traces and stopping decisions shared by all solvers."""

    def __init__(self, z0: torch.Tensor, tol: float, stop_mode: str) -> None:
        if stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        batch = z0.shape[0]
        self.tol, self.stop_mode = tol, stop_mode
        self.best_z = z0.clone()
        inf = torch.full((batch,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.best_abs, self.best_rel = inf.clone(), inf.clone()
        self.nstep = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.first: torch.Tensor | None = None
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []
        self.improved = torch.zeros(batch, dtype=torch.bool, device=z0.device)

    def best(self) -> torch.Tensor:
        return self.best_rel if self.stop_mode == "rel" else self.best_abs

    def update(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor,
               abs_res: torch.Tensor | None = None) -> bool:
        """Record iterate z with f(z) and g = f(z) - z; return True when the solve should stop.

        abs_res = ||g|| per sample may be passed when the solver has it already.
        """
        abs_res = g.norm(dim=1) if abs_res is None else abs_res
        rel_res = abs_res / (fz.norm(dim=1) + REL_EPS)
        res = rel_res if self.stop_mode == "rel" else abs_res
        finite = torch.isfinite(res)
        self.diverged |= ~finite
        self.improved = finite & (res < self.best())
        torch.where(self.improved.unsqueeze(1), z, self.best_z, out=self.best_z)
        self.best_abs = torch.where(self.improved, abs_res, self.best_abs)
        self.best_rel = torch.where(self.improved, rel_res, self.best_rel)
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        self.nstep = torch.where(self.improved, len(self.abs_trace), self.nstep)
        if self.first is None:
            self.first = res
        done = (self.best() <= self.tol) | self.diverged
        all_done, any_nonfinite = torch.stack([done.all(), (~finite).any()]).tolist()
        return bool(all_done or any_nonfinite)

    def exploded(self) -> torch.Tensor:
        """Samples whose last residual exceeds EXPLODE_FACTOR x the first one."""
        last = self.abs_trace[-1] if self.stop_mode == "abs" else self.rel_trace[-1]
        return last > EXPLODE_FACTOR * self.first.clamp_min(torch.finfo(last.dtype).tiny)

    def result(self, layout: StateLayout, n_f_evals: int,
               lowrank: LowRankInverse | None = None) -> SolverResult:
        converged = (self.best() <= self.tol) & ~self.diverged
        return SolverResult(
            z=layout.unflatten(self.best_z), nstep=self.nstep, abs_residual=self.best_abs,
            rel_residual=self.best_rel, abs_trace=torch.stack(self.abs_trace),
            rel_trace=torch.stack(self.rel_trace), converged=converged, diverged=self.diverged,
            n_f_evals=n_f_evals, stop_mode=self.stop_mode, tol=self.tol, lowrank=lowrank)


def register_solver(name: str):
    """Register a solver written on flat (batch, dim) states under `name`.

    The registered function accepts a tensor or a list of tensors and flattens them itself.
    """

    def wrap(flat_solver: Callable[..., SolverResult]) -> Callable[..., SolverResult]:
        @functools.wraps(flat_solver)
        def solve(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float,
                  stop_mode: str = "abs", **options) -> SolverResult:
            if int(max_iter) < 1:
                raise ValueError(f"max_iter must be >= 1, got {max_iter}")
            layout = StateLayout.of(z0)
            tracker = _Tracker(layout.flatten(z0).detach(), tol, stop_mode)
            return flat_solver(layout.flat_map(f), tracker.best_z.clone(), int(max_iter),
                               tracker, layout, **options)

        SOLVERS[name] = solve
        return solve

    return wrap


def solver_option_names(name: str) -> list[str]:
    """The options a user may set for a registered solver (beyond max_iter, tol, stop_mode)."""
    internal = ("f", "z", "max_iter", "tracker", "layout", "init_lowrank")
    return [p for p in inspect.signature(SOLVERS[name].__wrapped__).parameters if p not in internal]


def check_solver_options(name: str, options: dict) -> None:
    """Raise ValueError now for an unknown solver, option name or option value.

    Values are checked by running the solver for one step on a one-dimensional contraction, so
    a bad value fails at construction, not in the middle of training.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(sorted(SOLVERS))}")
    valid = solver_option_names(name)
    for option in options:
        if option not in valid:
            raise ValueError(f"unknown option {option!r} for solver {name!r}; valid: "
                             f"{', '.join(valid) or 'none'}")
    SOLVERS[name](lambda z: 0.5 * z, torch.ones(1, 1), max_iter=2, tol=1.0, **options)


@register_solver("fixed_point")
def fixed_point(f, z, max_iter, tracker, layout, *, tau: float = 1.0) -> SolverResult:
    """Damped fixed-point iteration z <- tau f(z) + (1 - tau) z."""
    if not 0 < tau <= 1:
        raise ValueError(f"fixed_point tau must be in (0, 1], got {tau}")
    for _ in range(max_iter):
        fz = f(z)
        g = fz - z
        if tracker.update(z, fz, g):
            break
        z = z + tau * g
    return tracker.result(layout, len(tracker.abs_trace))


@register_solver("anderson")
def anderson(f, z, max_iter, tracker, layout, *, m: int = 5, lam: float = 1e-4,
             beta: float = 1.0) -> SolverResult:
    """Anderson acceleration with history m, ridge lam and mixing beta."""
    if m < 1 or lam < 0 or not 0 < beta <= 1:
        raise ValueError(f"anderson needs m >= 1, lam >= 0, 0 < beta <= 1; got {m}, {lam}, {beta}")
    batch, dim = z.shape
    f_hist, g_hist = z.new_empty(batch, m, dim), z.new_empty(batch, m, dim)
    iterates = (z, z.new_empty(batch, dim))
    gram = torch.zeros(batch, m, m, dtype=torch.float64, device=z.device)
    for k in range(max_iter):
        fz = f(z)
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fz, z, out=g_hist[:, slot])
        row = _coefficients(g, g_hist[:, :n]).squeeze(1)
        if tracker.update(z, fz, g, abs_res=row[:, slot].clamp_min(0).sqrt()):
            break
        f_hist[:, slot] = fz
        gram[:, slot, :n], gram[:, :n, slot] = row, row
        alpha = _anderson_weights(gram[:, :n, :n], lam).to(z.dtype).unsqueeze(1)
        z = iterates[(k + 1) % 2]
        torch.bmm(alpha, f_hist[:, :n], out=z.unsqueeze(1))
        if beta != 1.0:
            z.sub_((1 - beta) * torch.bmm(alpha, g_hist[:, :n]).squeeze(1))
    return tracker.result(layout, len(tracker.abs_trace))


def _anderson_weights(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """Mixing weights alpha (summing to 1) minimising ||sum alpha_i g_i||^2 + lam s ||alpha||^2.

    s is the mean squared residual norm in the history, so the ridge is scale-free: a fixed
    absolute lam swamps G G^T once residuals are small and stalls tight solves.
    Solves the bordered system [[0, 1^T], [1, G G^T + lam I]] [nu, alpha] = [1, 0] in float64;
    samples whose system is singular or non-finite get a least-squares (pseudo-inverse) solution.
    """
    batch, n, _ = gram.shape
    system = gram.new_zeros(batch, n + 1, n + 1)
    system[:, 0, 1:], system[:, 1:, 0] = 1.0, 1.0
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    ridge = (lam * scale).view(batch, 1, 1) * torch.eye(n, dtype=gram.dtype, device=gram.device)
    system[:, 1:, 1:] = gram + ridge
    rhs = gram.new_zeros(batch, n + 1, 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    bad = (info != 0) | ~torch.isfinite(solution).all(dim=(1, 2))
    if bool(bad.any()):
        safe = torch.nan_to_num(system[bad], nan=0.0, posinf=0.0, neginf=0.0)
        solution[bad] = torch.linalg.pinv(safe) @ rhs[bad]
    return solution[:, 1:, 0]


@register_solver("broyden")
def broyden(f, z, max_iter, tracker, layout, *, mem: int | None = None,
            init_lowrank: tuple | None = None) -> SolverResult:
    """'Good' Broyden on g(z) = f(z) - z with a circular memory of `mem` rank-one pairs.

    `init_lowrank=(u, v)` ((batch, r, dim) each) starts from B = -I + sum u_j v_j^T instead of -I
    (those r pairs are kept for the whole solve). Samples whose residual explodes (> 1e6 x the
    first) are frozen and marked diverged (protective break); the solve ends when every sample
    is done.

    Every step is the full quasi-Newton step p = -B g, so the update needs one product with B
    and one with B^T: with q = B g_new and v = B^T p, the new pair is u = -q / (v . dg), and the
    next step is a multiple of q (see _BroydenMemory.update).
    """
    mem = max_iter - 1 if mem is None else int(mem)
    if mem < 1:
        raise ValueError(f"broyden mem must be >= 1, got {mem}")
    memory = _BroydenMemory(z, min(mem, max(max_iter - 1, 1)), init_lowrank)
    fz = f(z)
    g = fz - z
    done = tracker.update(z, fz, g)
    step = memory.matvec(g).neg_()
    frozen = torch.zeros_like(tracker.diverged)
    for _ in range(max_iter - 1):
        if done:
            break
        z = z + step
        fz = f(z)
        g_new = fz - z
        done = tracker.update(z, fz, g_new)
        tracker.diverged |= tracker.exploded()
        frozen |= tracker.diverged
        any_frozen, all_done = torch.stack(
            [frozen.any(), (frozen | (tracker.best() <= tracker.tol)).all()]).tolist()
        done = done or all_done
        step = memory.update(step, g.sub_(g_new).neg_(), g_new, tracker.improved)
        if any_frozen:
            step.masked_fill_(frozen.unsqueeze(1), 0.0)
        g = g_new
    lowrank = memory.lowrank()
    return tracker.result(layout, len(tracker.abs_trace), lowrank)


class _BroydenMemory:
    """Rank-one pairs of the inverse estimate: fixed initial ones, then `mem` circular slots."""

    def __init__(self, z: torch.Tensor, mem: int, init_lowrank: tuple | None) -> None:
        batch, dim = z.shape
        n_init = 0 if init_lowrank is None else init_lowrank[0].shape[1]
        self.u = z.new_empty(batch, n_init + mem, dim)
        self.v = z.new_empty(batch, n_init + mem, dim)
        if n_init:
            self.u[:, :n_init], self.v[:, :n_init] = init_lowrank[0], init_lowrank[1]
        self.n_init, self.mem, self.count = n_init, mem, 0
        self.slot_update = torch.zeros(n_init + mem, dtype=torch.long, device=z.device)
        self.count_at_best = torch.zeros(batch, dtype=torch.long, device=z.device)

    def active(self) -> slice:
        return slice(0, self.n_init + min(self.count, self.mem))

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """B x = -x + sum_j u_j (v_j . x)."""
        return _minus_plus_lowrank(x, self.u[:, self.active()], self.v[:, self.active()])

    def rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        """x^T B = -x + sum_j v_j (u_j . x)."""
        return _minus_plus_lowrank(x, self.v[:, self.active()], self.u[:, self.active()])

    def update(self, step, dg, g_new, improved) -> torch.Tensor:
        """Add the pair of the step just taken (dz = step, dg); return the next step -B_new g_new.

        With dz = -B g: B dg = B g_new + dz, so u = (dz - B dg) / (v . dg) = -q / (v . dg) with
        q = B g_new, and B_new g_new = q + u (v . g_new) = q (1 - v . g_new / v . dg).
        """
        q = self.matvec(g_new)
        v = self.rmatvec(step)
        denom = _rowdot(v, dg)
        tiny = torch.finfo(denom.dtype).tiny ** 0.5
        denom = torch.where(denom.abs() > tiny, denom, torch.inf)
        slot = self.n_init + self.count % self.mem
        torch.div(q, denom.neg(), out=self.u[:, slot])
        self.v[:, slot] = v
        self.count += 1
        self.slot_update[slot] = self.count
        self.count_at_best = torch.where(improved, self.count, self.count_at_best)
        return q.mul_(_rowdot(v, g_new).div_(denom).sub_(1.0))

    def lowrank(self) -> LowRankInverse:
        s = self.active()
        stamp = self.slot_update[s].unsqueeze(0)
        valid = (stamp <= self.count_at_best.unsqueeze(1)) & (stamp > 0)
        valid[:, : self.n_init] = True
        return LowRankInverse(self.u[:, s], self.v[:, s], valid)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of (batch, dim) tensors, as (batch, 1)."""
    return torch.linalg.vecdot(a, b).unsqueeze(1)


def _minus_plus_lowrank(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """-x + sum_j left_j (right_j . x), fused in one batched multiply-add."""
    if left.shape[1] == 0:
        return x.neg()
    return torch.baddbmm(x.unsqueeze(1), _coefficients(x, right), left, beta=-1).squeeze(1)
