"""Forward fixed-point solvers: fixed_point, anderson, broyden.

Each solver is a plain function `solve(f, z0, *, max_iter, tol, stop_mode, **options)` returning a
`SolverResult`. The residual of an iterate z is ||f(z) - z|| per sample (abs) or that divided by
||f(z)|| (rel); every sample returns its own lowest-residual iterate, not the last one.
`max_iter` counts evaluations of f (line-search trials included).

Every solver also stops a stalled solve (the reference codes' test): after STALL_WINDOW steps, a
sample whose last residual is under STALL_TOL_FACTOR x tol and whose last STALL_WINDOW residuals
lie within a factor STALL_RATIO of each other counts as done.
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
STALL_WINDOW, STALL_TOL_FACTOR, STALL_RATIO = 30, 3.0, 1.3


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

    @property
    def steps_to_tol(self) -> torch.Tensor:
        """Per sample, the first f evaluation (1-based) whose residual is <= tol; the number of
        evaluations made when none is. Unlike nstep (the best iterate's index, which keeps moving
        while the rest of the batch iterates), this is the work the sample itself needed."""
        under = self.trace <= self.tol
        return torch.where(under.any(dim=0), under.to(torch.uint8).argmax(dim=0) + 1,
                           self.trace.shape[0])


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
        self.above = torch.zeros(batch, dtype=torch.long, device=z0.device)

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
        done = (self.best() <= self.tol) | self.diverged | self.stalled()
        all_done, any_nonfinite = torch.stack([done.all(), (~finite).any()]).tolist()
        return bool(all_done or any_nonfinite)

    def stalled(self) -> torch.Tensor:
        """Samples near tol (< STALL_TOL_FACTOR tol) that made no progress in STALL_WINDOW steps."""
        trace = self.rel_trace if self.stop_mode == "rel" else self.abs_trace
        if len(trace) <= STALL_WINDOW:
            return torch.zeros_like(self.diverged)
        recent = torch.stack(trace[-STALL_WINDOW:])
        flat = recent.max(dim=0).values < STALL_RATIO * recent.min(dim=0).values
        return flat & (recent[-1] < STALL_TOL_FACTOR * self.tol)

    def exploded(self, patience: int = 1) -> torch.Tensor:
        """Samples whose last `patience` residuals all exceed EXPLODE_FACTOR x the first one."""
        last = self.abs_trace[-1] if self.stop_mode == "abs" else self.rel_trace[-1]
        above = last > EXPLODE_FACTOR * self.first.clamp_min(torch.finfo(last.dtype).tiny)
        self.above = torch.where(above, self.above + 1, 0)
        return self.above >= patience

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

    The registered function accepts a tensor or a list of tensors and flattens them itself
    (and the run-time `outer_grad` callable, state -> dL/dz, when given).
    """

    def wrap(flat_solver: Callable[..., SolverResult]) -> Callable[..., SolverResult]:
        @functools.wraps(flat_solver)
        def solve(f: Callable[[State], State], z0: State, *, max_iter: int, tol: float,
                  stop_mode: str = "abs", **options) -> SolverResult:
            if int(max_iter) < 1:
                raise ValueError(f"max_iter must be >= 1, got {max_iter}")
            layout = StateLayout.of(z0)
            tracker = _Tracker(layout.flatten(z0).detach(), tol, stop_mode)
            if options.get("outer_grad") is not None:
                options["outer_grad"] = layout.flat_map(options["outer_grad"])
            return flat_solver(layout.flat_map(f), tracker.best_z.clone(), int(max_iter),
                               tracker, layout, **options)

        SOLVERS[name] = solve
        return solve

    return wrap


def solver_option_names(name: str) -> list[str]:
    """The options a user may set for a registered solver (beyond max_iter, tol, stop_mode)."""
    internal = ("f", "z", "max_iter", "tracker", "layout", "init_lowrank", "outer_grad")
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
def broyden(f, z, max_iter, tracker, layout, *, mem: int | None = None, line_search: bool = False,
            update: str = "good", opa_every: int = 0, explode_patience: int = 3,
            init_lowrank: tuple | None = None, outer_grad: Callable | None = None) -> SolverResult:
    """Broyden's method on g(z) = f(z) - z with a circular memory of `mem` rank-one pairs
    (default: room for every update of the solve, OPA ones included).

    update: "good" (secant B dg = dz) or "adjoint" (Schlenkrich et al.'s type C: one VJP per step,
    adjoint secant (sigma^T J_g) B = sigma^T along the residual sigma = g).
    opa_every > 0 (outer-problem awareness): given the run-time `outer_grad(z) -> dL/dz`, every
    opa_every steps an extra adjoint update along sigma = B^T dL/dz, so that SHINE's -dL/dz^T B
    is right in that direction (without outer_grad, e.g. in evaluation, there is none).
    line_search: per-sample backtracking (Armijo on ||g||^2).
    `init_lowrank=(u, v)` starts from B = -I + sum u_j v_j^T (pairs kept for the whole solve).
    A sample whose residual stays above 1e6 x the first for `explode_patience` consecutive steps
    is frozen and marked diverged (protective break); the solve ends when every sample is done.
    """
    _check_broyden(mem, update, opa_every, explode_patience, line_search)
    opa_every = opa_every if outer_grad is not None else 0
    most = max(max_iter - 1, 1) + (max_iter // opa_every if opa_every else 0)
    memory = _BroydenMemory(z, most if mem is None else min(int(mem), most), init_lowrank)
    def graph(step_index: int) -> bool:
        """Whether the iterate reached at this step needs VJPs (adjoint or OPA update there)."""
        return update == "adjoint" or (opa_every > 0 and (step_index + 1) % opa_every == 0)

    point = _Point.at(f, z, graph(0))
    done = tracker.update(point.z, point.fz, point.g)
    step = memory.matvec(point.g).neg_()
    frozen = torch.zeros_like(tracker.diverged)
    steps = 0
    while not done and len(tracker.abs_trace) < max_iter:
        steps += 1
        if opa_every and steps % opa_every == 0:
            step = memory.opa_update(point, outer_grad(point.z), tracker.improved, frozen)
        new, scale, done = _advance(f, point, step, tracker, max_iter, line_search, graph(steps))
        tracker.diverged |= tracker.exploded(explode_patience)
        frozen |= tracker.diverged
        all_done = bool((frozen | (tracker.best() <= tracker.tol)).all())
        done = done or all_done
        if update == "good":
            step = memory.update(step, scale, new.g - point.g, new.g, tracker.improved)
        else:
            step = memory.adjoint_update(new, new.g, tracker.improved)
        step.masked_fill_(frozen.unsqueeze(1), 0.0)
        point = new
    return tracker.result(layout, len(tracker.abs_trace), memory.lowrank())


def _check_broyden(mem, update, opa_every, explode_patience, line_search) -> None:
    if mem is not None and int(mem) < 1:
        raise ValueError(f"broyden mem must be >= 1, got {mem}")
    if update not in ("good", "adjoint"):
        raise ValueError(f"broyden update must be 'good' or 'adjoint', got {update!r}")
    if opa_every < 0 or explode_patience < 1:
        raise ValueError("broyden needs opa_every >= 0 and explode_patience >= 1")
    if line_search and (update == "adjoint" or opa_every > 0):
        raise ValueError("broyden line_search works with update='good' and no OPA only")


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class _Point:
    """An iterate z with fz = f(z), g = fz - z, and, when built with a graph, w -> w^T J_g."""

    z: torch.Tensor
    fz: torch.Tensor
    g: torch.Tensor
    vjp: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def at(cls, f: Callable, z: torch.Tensor, graph: bool = False) -> _Point:
        if not graph:
            fz = f(z)
            return cls(z, fz, fz - z)
        z_in = z.detach().requires_grad_()
        # Saved tensors packed detached: the graph serves first-order VJPs only and is dropped
        # without a backward. Under an outer identity pack hook (e.g. measure.SavedTensorMeter),
        # a saved output would hold its own grad_fn, a cycle that leaked every solve's graph.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_detached, _same):
            fz = f(z_in)

        def vjp(w: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(fz, z_in, w, retain_graph=True)[0] - w

        fz_value = fz.detach()
        return cls(z, fz_value, fz_value - z, vjp if fz.requires_grad else (lambda w: -w))


def _advance(f, point: _Point, step, tracker, max_iter, line_search, graph):
    """The next iterate along `step` (full step, or backtracked per sample); (point, scale, done).

    scale is None for the full step, else the (batch, 1) step lengths taken.
    """
    new = _Point.at(f, point.z + step, graph)
    done = tracker.update(new.z, new.fz, new.g)
    if not line_search:
        return new, None, done
    return _backtrack(f, point, step, new, tracker, max_iter, done)


ARMIJO_C1, MIN_STEP = 1e-4, 1e-2


def _backtrack(f, point: _Point, step, new: _Point, tracker, max_iter, done):
    """Armijo backtracking on phi(s) = ||g(z + s step)||^2 with phi'(0) taken as -phi(0).

    Failing samples move to the minimiser of the quadratic through phi(0), phi'(0), phi(s),
    kept within [0.1 s, 0.5 s], until the test passes; a sample whose s falls under MIN_STEP (or
    whose budget ends first) takes the full step, as the reference codes do (keeping the shortest
    trial instead stalls Broyden on 4 of the 10 classic problems). Every trial is recorded by the
    tracker.
    """
    phi0 = point.g.square().sum(dim=1, keepdim=True)
    scale, full = torch.ones_like(phi0), new
    phi = new.g.square().sum(dim=1, keepdim=True)
    improved = tracker.improved.clone()
    failing = phi > (1 - ARMIJO_C1) * phi0
    while bool(failing.any()) and not done and len(tracker.abs_trace) < max_iter:
        quadratic = phi0 * scale**2 / (2 * (phi - phi0 + phi0 * scale)).clamp_min(1e-300)
        trial_scale = torch.minimum(torch.maximum(quadratic, 0.1 * scale), 0.5 * scale)
        scale = torch.where(failing, torch.nan_to_num(trial_scale, nan=0.1), scale)
        trial = _Point.at(f, point.z + scale * step, False)
        done = tracker.update(trial.z, trial.fz, trial.g)
        improved |= tracker.improved
        new = _merge(failing, trial, new)
        phi = torch.where(failing, trial.g.square().sum(dim=1, keepdim=True), phi)
        failing = failing & (phi > (1 - ARMIJO_C1 * scale) * phi0)
        give_up = failing & (scale < MIN_STEP)
        new, scale = _merge(give_up, full, new), torch.where(give_up, 1.0, scale)
        failing = failing & ~give_up
    tracker.improved = improved
    return _merge(failing, full, new), torch.where(failing, 1.0, scale), done


def _merge(mask: torch.Tensor, a: _Point, b: _Point) -> _Point:
    """Per sample, a where mask (batch, 1) else b."""
    return _Point(*(torch.where(mask, x, y) for x, y in ((a.z, b.z), (a.fz, b.fz), (a.g, b.g))))


def unfilled_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """like.new_empty(shape) without deterministic mode's fill of uninitialised memory
    (torch.use_deterministic_algorithms fills torch.empty with NaN). For buffers whose slots
    are written before they are read, such as Broyden's memory: allocated for every step the
    solve may take, it is touched only as far as the solve goes (a 65 536 x 256 state with
    f_max_iter=30 would otherwise fill 3.7 GB per solve)."""
    deterministic = torch.utils.deterministic
    fill = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        return like.new_empty(shape)
    finally:
        deterministic.fill_uninitialized_memory = fill


class _BroydenMemory:
    """Rank-one pairs of the inverse estimate: fixed initial ones, then `mem` circular slots."""

    def __init__(self, z: torch.Tensor, mem: int, init_lowrank: tuple | None) -> None:
        batch, dim = z.shape
        n_init = 0 if init_lowrank is None else init_lowrank[0].shape[1]
        self.u = unfilled_empty(z, batch, n_init + mem, dim)
        self.v = unfilled_empty(z, batch, n_init + mem, dim)
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

    def _store(self, u: torch.Tensor, v: torch.Tensor, improved: torch.Tensor) -> bool:
        """Write the pair into the next circular slot; True when it replaced an active pair."""
        slot = self.n_init + self.count % self.mem
        replaced = self.count >= self.mem
        self.u[:, slot], self.v[:, slot] = u, v
        self.count += 1
        self.slot_update[slot] = self.count
        self.count_at_best = torch.where(improved, self.count, self.count_at_best)
        return replaced

    def update(self, step, scale, dg, g_new, improved) -> torch.Tensor:
        """Good-Broyden pair of the step just taken (dz = scale step, step = -B g); next step.

        B dg = B g_new + step, so with q = B g_new and v = B^T dz:
        u = (dz - B dg) / (v . dg) = ((scale - 1) step - q) / (v . dg), and
        B_new g_new = q + u (v . g_new) (when no older pair was dropped from the memory).
        """
        q = self.matvec(g_new)
        v = self.rmatvec(step if scale is None else scale * step)
        denom = _safe_denominator(_rowdot(v, dg))
        u = torch.div(q if scale is None else q - (scale - 1) * step, denom.neg())
        coefficient = _rowdot(v, g_new)
        if self._store(u, v, improved):
            return self.matvec(g_new).neg_()
        if scale is None:
            return q.mul_(coefficient.div_(denom).sub_(1.0))
        return q.add_(u * coefficient).neg_()

    def adjoint_update(self, point: _Point, sigma: torch.Tensor, improved) -> torch.Tensor:
        """Adjoint (type C) pair along sigma at point: afterwards (sigma^T J_g) B = sigma^T.

        With a = B sigma and b = (sigma^T J_g) B: B_new = B + a (sigma - b)^T / (b . sigma).
        Returns the next step -B_new g at point.
        """
        a = self.matvec(sigma)
        b = self.rmatvec(point.vjp(sigma))
        denom = _safe_denominator(_rowdot(b, sigma))
        self._store(a, (sigma - b).div_(denom), improved)
        return self.matvec(point.g).neg_()

    def opa_update(self, point: _Point, outer_grad: torch.Tensor, improved, frozen) -> torch.Tensor:
        """The extra OPA pair along sigma = B^T dL/dz (scaled to ||g||); the next step -B g."""
        sigma = self.rmatvec(outer_grad.detach().reshape(point.g.shape))
        norm = sigma.norm(dim=1, keepdim=True)
        sigma = sigma * (point.g.norm(dim=1, keepdim=True) / norm.clamp_min(1e-30))
        step = self.adjoint_update(point, sigma.masked_fill(frozen.unsqueeze(1), 0.0), improved)
        return step.masked_fill_(frozen.unsqueeze(1), 0.0)

    def lowrank(self) -> LowRankInverse:
        s = self.active()
        stamp = self.slot_update[s].unsqueeze(0)
        valid = (stamp <= self.count_at_best.unsqueeze(1)) & (stamp > 0)
        valid[:, : self.n_init] = True
        return LowRankInverse(self.u[:, s], self.v[:, s], valid)


def _safe_denominator(denom: torch.Tensor) -> torch.Tensor:
    """denom where it is safely away from 0, inf elsewhere (so that pair becomes 0)."""
    tiny = torch.finfo(denom.dtype).tiny ** 0.5
    return torch.where(denom.abs() > tiny, denom, torch.inf)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of (batch, dim) tensors, as (batch, 1)."""
    return torch.linalg.vecdot(a, b).unsqueeze(1)


def _minus_plus_lowrank(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """-x + sum_j left_j (right_j . x), fused in one batched multiply-add."""
    if left.shape[1] == 0:
        return x.neg()
    return torch.baddbmm(x.unsqueeze(1), _coefficients(x, right), left, beta=-1).squeeze(1)
