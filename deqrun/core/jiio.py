# ruff: noqa: UP006, UP007, UP035, UP045
"""JIIO: joint inference and input optimisation, one fixed point over (z, x, mu).

Problem, per sample (row of the batch): min_x L(z, x) subject to z = f(z, x), where L usually
reads the model's head, L(h(z), y). Instead of an outer optimiser around full DEQ solves, JIIO
iterates on the stacked state s = (z, x, mu):

    z_out = f(z, x)
    (mu_out, g_x) = VJP of [sum_i L_i(z, x), z_out] w.r.t. [z, x] with cotangents [1, mu]
    mu <- mu + mu_damping (mu_out - mu);  z <- z + z_damping (z_out - z)
    x  <- P(x - alpha_x step(g_x)),  alpha_x = alpha0[0] before switch_iter, alpha0[1] after

At a joint fixed point z = f(z, x), mu = dL/dz + J_z^T mu is the adjoint (I - J_z^T)^-1 dL/dz
and g_x = dL/dx + J_x^T mu is the total gradient dL/dx, which vanishes (or, with a projection
P onto a ball around the clean input, is stationary over the ball). Anderson acceleration mixes
the last m stacked states. Each iteration costs one call of f and one VJP; T is fixed.

Training through JIIO (`JIIO.equilibrium`): one differentiable call f(z*, x*) with x*
detached, and the implicit backward w = J^T w + grad started from mu* (scaled to the training
loss), which already solves it when the training loss is the inner objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch

from .deq import DEQStats
from .gradients import Implicit, _hooked, _vjp
from .jacobian import jacobian_penalty
from .solvers import REL_EPS, SolverResult, _anderson_weights
from .state import State, StateLayout

PROJECTIONS = ("none", "l2", "linf")
Z_INITS = ("zeros", "solve")
StateMap = Callable[[State, torch.Tensor], State]
Objective = Callable[[State, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]
ForwardSolve = Callable[[Callable[[State], State], State], SolverResult]


@dataclass
class JIIOOptions:
    """Settings of the joint (z, x, mu) solve and of the warm-started backward.

    Defaults: the reference's MNIST setting (T=80, m=20, alpha0=[0.6, 0.2]).
    T: iterations (each one f call and one VJP). m: Anderson memory (0: plain damped steps).
    alpha0: the input step before and after switch_iter (None: max(50, 5T/8), the paper's).
    projection: none, l2 or linf ball of radius eps around the clean input (x_center).
    normalized_step: step along g/||g|| (l2, none) or sign(g) (linf), as attacks do.
    lam: Anderson's ridge. balance: Anderson weighs the z, x and mu parts of the residual by the
    inverse RMS of their first residual (per sample), so no part's units dominate the mixing.
    best_rel_residual: only iterates with ||f(z,x) - z|| / ||f(z,x)|| at
    most this are candidates for the per-sample best objective (else the lowest-residual one):
    an iterate off the equilibrium can score below the true optimum, so keep it tight.
    b_*: the implicit backward of training; b_warm_start starts it from mu*.
    resolve: in training, the model re-solves z = f(z, x*) with its own forward solver, warm-started
    from z*, before the differentiable f call: a few joint iterations (an attack's training
    budget) leave z* off the equilibrium at x*, and a model trained at such points is not the one
    a full solve deploys.
    z_init: where z starts. zeros (the paper's); solve: at the equilibrium z = f(z, x0), found
    by the model's forward solver (its budget), so the first input steps already follow the
    gradient at (nearly) the equilibrium instead of at a z that trails x by a full forward solve
    (matters when T is small, e.g. a training attack of a few iterations).
    """

    T: int = 80
    m: int = 20
    alpha0: List[float] = field(default_factory=lambda: [0.6, 0.2])
    switch_iter: Optional[int] = None
    mu_damping: float = 0.6
    z_damping: float = 0.8
    projection: str = "none"
    eps: float = 1.0
    normalized_step: bool = False
    lam: float = 1e-4
    balance: bool = False
    best_rel_residual: float = 1e-3
    b_solver: str = "anderson"
    b_max_iter: int = 40
    b_tol: float = 1e-6
    b_warm_start: bool = True
    resolve: bool = True
    z_init: str = "zeros"

    def check(self) -> None:
        """Raise ValueError with one line for a value out of range."""
        _require(self.T >= 1 and self.m >= 0,
                 f"JIIO needs T >= 1 and m >= 0, got T={self.T}, m={self.m}")
        _require(len(self.alpha0) == 2 and all(a > 0 for a in self.alpha0),
                 f"JIIO alpha0 must be two positive floats, got {list(self.alpha0)}")
        _require(self.switch_iter is None or self.switch_iter >= 0,
                 f"JIIO switch_iter must be >= 0 or null, got {self.switch_iter}")
        for name in ("mu_damping", "z_damping"):
            _require(0 < getattr(self, name) <= 1, f"JIIO {name} must be in (0, 1]")
        _require(self.projection in PROJECTIONS,
                 f"JIIO projection must be one of {PROJECTIONS}, got {self.projection!r}")
        _require(self.eps > 0, f"JIIO eps must be > 0, got {self.eps}")
        _require(self.z_init in Z_INITS,
                 f"JIIO z_init must be one of {Z_INITS}, got {self.z_init!r}")
        _require(self.lam >= 0 and self.best_rel_residual > 0,
                 "JIIO lam must be >= 0 and best_rel_residual > 0")

    @classmethod
    def names(cls) -> list[str]:
        """The option names, sorted (what overrides and config dicts may set)."""
        return sorted(f.name for f in dataclasses.fields(JIIOOptions))

    @property
    def switch_at(self) -> int:
        """The iteration (0-based) from which alpha0[1] is used."""
        if self.switch_iter is not None:
            return int(self.switch_iter)
        return max(50, (5 * self.T) // 8)

    def alpha(self, iteration: int) -> float:
        return float(self.alpha0[0] if iteration < self.switch_at else self.alpha0[1])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class InputProblem:
    """An input-optimisation problem a task hands to a model (the task owns the objective).

    objective(output, x) -> per-sample loss (batch,), output being the model's head at z.
    x0: the starting input (latent, or the clean image of an attack); x_center: the ball's
    centre when the options project (default x0). loss_scale: d(training loss)/d(objective_i),
    e.g. 1/batch for a mean of the objective, -1/batch when training on a maximised objective;
    it scales mu* into the warm start of the backward.
    """

    x0: torch.Tensor
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x_center: Optional[torch.Tensor] = None
    loss_scale: float = 1.0
    # The problem's own geometry, when it has one (an attack's threat model): each set field
    # replaces the grad=jiio option of that name for this solve; step_scale multiplies alpha0
    # (the input's units, e.g. 1/std of a normalised image, so alpha0 and eps read in pixels).
    projection: Optional[str] = None
    eps: Optional[float] = None
    normalized_step: Optional[bool] = None
    T: Optional[int] = None
    step_scale: float = 1.0
    # callback(k, x): sees the input iterate after each iteration (timing, traces)
    callback: Optional[Callable[[int, torch.Tensor], None]] = None
    # any other JIIO options for this solve only (e.g. an evaluation attack's own m, dampings
    # or alpha0), applied before the geometry above; alpha0 here is then scaled by step_scale
    overrides: Optional[Dict[str, Any]] = None

    def options(self, base: JIIOOptions) -> JIIOOptions:
        """base with this problem's overrides and geometry applied (base itself when it sets
        nothing)."""
        fields = {name: getattr(base, name) for name in JIIOOptions.names()}
        unknown = sorted(set(self.overrides or {}) - set(fields))
        _require(not unknown, f"unknown JIIO option(s) {unknown}; known: {sorted(fields)}")
        changes = dict(self.overrides or {})
        if "alpha0" in changes:  # e.g. a config's list type
            changes["alpha0"] = list(changes["alpha0"])
        changes.update({name: getattr(self, name) for name in ("projection", "eps",
                        "normalized_step", "T") if getattr(self, name) is not None})
        if self.step_scale != 1.0:
            alpha0 = changes.get("alpha0", base.alpha0)
            changes["alpha0"] = [a * self.step_scale for a in alpha0]
        if not changes:
            return base
        fields.update(changes)
        options = type(base)(**fields)
        options.check()
        return options


@dataclass
class JIIOResult:
    """Outcome of a joint solve; per-sample tensors are (batch,), traces (T, batch).

    z, x, mu: each sample's best iterate (mu flat, (batch, dim of z)); objective: L there;
    nstep: its 1-based iteration; objective_trace / rel_trace / abs_trace: L and the fixed-point
    residuals of every iterate.
    """

    z: State
    x: torch.Tensor
    mu: torch.Tensor
    objective: torch.Tensor
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    objective_trace: torch.Tensor
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    T: int
    tol: float

    def solver_result(self) -> SolverResult:
        """The forward part as a SolverResult, so DEQStats and the loggers can report it."""
        finite = torch.isfinite(self.abs_residual) & torch.isfinite(self.objective)
        return SolverResult(
            z=self.z, nstep=self.nstep, abs_residual=self.abs_residual,
            rel_residual=self.rel_residual, abs_trace=self.abs_trace, rel_trace=self.rel_trace,
            converged=finite & (self.rel_residual <= self.tol), diverged=~finite,
            n_f_evals=self.T, stop_mode="rel", tol=self.tol)


def project(x: torch.Tensor, center: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """x projected onto the `kind` ball of radius eps around center, per sample (none: x)."""
    if kind == "none":
        return x
    delta = x - center
    if kind == "linf":
        return center + delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = (eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return center + delta * scale


def step_direction(grad: torch.Tensor, kind: str, normalized: bool) -> torch.Tensor:
    """The input step: grad, or grad/||grad|| per sample (sign(grad) for linf) when normalised."""
    if not normalized:
        return grad
    if kind == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-30)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


class _JointMap:
    """One damped JIIO step on flat stacked states s = [z | x | mu] (batch, 2 dz + dx)."""

    def __init__(self, f: StateMap, objective: Objective, z0: State, x0: torch.Tensor,
                 x_center: torch.Tensor, options: JIIOOptions) -> None:
        self.layout, self.x_shape = StateLayout.of(z0), x0.shape
        self.f, self.objective, self.options = f, objective, options
        self.dz, self.dx = sum(self.layout.sizes), x0[0].numel()
        self.center = x_center.detach()

    def stack(self, z: State, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layout.flatten(z), x.reshape(len(x), -1), mu], dim=1).detach()

    def split(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, x, mu = torch.split(s, [self.dz, self.dx, self.dz], dim=1)
        return z, x.reshape(self.x_shape), mu

    def evaluate(self, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """z_out = f(z, x), L(z, x), and the VJP (mu_out, g_x), all without a graph after."""
        z, x, mu = self.split(s)
        with torch.enable_grad():
            z_in, x_in = z.detach().requires_grad_(), x.detach().requires_grad_()
            state = self.layout.unflatten(z_in)
            z_out = self.layout.flatten(self.f(state, x_in))
            loss = self.objective(state, x_in)
            if loss.shape != (len(s),):
                raise ValueError(f"JIIO objective must return one value per sample, shape "
                                 f"({len(s)},); got {tuple(loss.shape)}")
            grads = torch.autograd.grad((loss.sum(), z_out), (z_in, x_in),
                                        (torch.ones_like(loss.sum()), mu), allow_unused=True)
        mu_out, g_x = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, (z, x)))
        return z_out.detach(), loss.detach(), mu_out, g_x

    def __call__(self, s: torch.Tensor, iteration: int) -> tuple[torch.Tensor, ...]:
        """G(s) with the per-sample objective and absolute / relative fixed-point residuals."""
        o = self.options
        z, x, mu = self.split(s)
        z_out, loss, mu_out, g_x = self.evaluate(s)
        step = step_direction(g_x, o.projection, o.normalized_step)
        x_new = self.project(x - o.alpha(iteration) * step)
        z_new = z + o.z_damping * (z_out - z)
        mu_new = mu + o.mu_damping * (mu_out - mu)
        abs_res = (z_out - z).norm(dim=1)
        rel_res = abs_res / (z_out.norm(dim=1) + REL_EPS)
        return self.stack_flat(z_new, x_new, mu_new), loss, abs_res, rel_res

    def stack_flat(self, z: torch.Tensor, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, x.reshape(len(x), -1), mu], dim=1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.center, self.options.projection, self.options.eps)

    def project_stacked(self, s: torch.Tensor) -> torch.Tensor:
        """s with its x part projected back onto the ball (after Anderson's mixing)."""
        if self.options.projection == "none":
            return s
        z, x, mu = self.split(s)
        return self.stack_flat(z, self.project(x), mu)


class _BestIterate:
    """Per sample: the lowest-objective iterate among those with rel residual <= tol, and the
    lowest-residual iterate as the fallback for samples where none qualifies."""

    def __init__(self, s0: torch.Tensor, tol: float) -> None:
        batch, self.tol = len(s0), tol
        inf = torch.full((batch,), float("inf"), dtype=s0.dtype, device=s0.device)
        self.s = {"best": s0.clone(), "low": s0.clone()}
        self.loss = {"best": inf.clone(), "low": inf.clone()}
        self.abs = {"best": inf.clone(), "low": inf.clone()}
        self.rel = {"best": inf.clone(), "low": inf.clone()}
        self.n = {key: torch.zeros(batch, dtype=torch.long, device=s0.device)
                  for key in ("best", "low")}
        self.traces: tuple[list, list, list] = ([], [], [])

    def update(self, s: torch.Tensor, loss: torch.Tensor, abs_res: torch.Tensor,
               rel_res: torch.Tensor) -> None:
        for trace, value in zip(self.traces, (loss, abs_res, rel_res)):
            trace.append(value)
        finite = torch.isfinite(loss) & torch.isfinite(rel_res)
        better = {"best": finite & (rel_res <= self.tol) & (loss < self.loss["best"]),
                  "low": finite & (rel_res < self.rel["low"])}
        for key, mask in better.items():
            self.s[key] = torch.where(mask.unsqueeze(1), s, self.s[key])
            for store, value in ((self.loss, loss), (self.abs, abs_res), (self.rel, rel_res)):
                store[key] = torch.where(mask, value, store[key])
            self.n[key] = torch.where(mask, len(self.traces[0]), self.n[key])

    def pick(self, key: str) -> torch.Tensor:
        """The best-objective entry where one qualified, else the lowest-residual entry."""
        store = {"s": self.s, "loss": self.loss, "abs": self.abs, "rel": self.rel,
                 "n": self.n}[key]
        found = torch.isfinite(self.loss["best"])
        if key == "s":
            found = found.unsqueeze(1)
        return torch.where(found, store["best"], store["low"])


class _AndersonMixer:
    """Anderson acceleration on stacked states: s <- sum_i a_i G(s_i), min ||sum_i a_i g_i||.

    With `blocks` (the sizes of z, x and mu), the residual norm weighs each block by the inverse
    RMS of its first residual per sample, so that no block's units dominate the mixing.
    """

    def __init__(self, m: int, lam: float, s: torch.Tensor,
                 blocks: list[int] | None = None) -> None:
        batch, dim = s.shape
        self.m, self.lam, self.count, self.blocks = m, lam, 0, blocks
        self.f_hist, self.g_hist = s.new_empty(batch, m, dim), s.new_empty(batch, m, dim)
        self.gram = torch.zeros(batch, m, m, dtype=torch.float64, device=s.device)
        self.scale: torch.Tensor | None = None

    def reset(self) -> None:
        self.count = 0

    def _weights(self, g: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return torch.ones_like(g)
        parts = torch.split(g, self.blocks, dim=1)
        rms = [p.pow(2).mean(1, keepdim=True).sqrt() for p in parts]
        floor = torch.cat(rms, 1).amax(1, keepdim=True) * 1e-6 + torch.finfo(g.dtype).tiny
        return torch.cat([(1 / r.clamp_min(floor)).expand_as(p) for r, p in zip(rms, parts)], 1)

    def mix(self, s: torch.Tensor, g_s: torch.Tensor) -> torch.Tensor:
        slot, n = self.count % self.m, min(self.count + 1, self.m)
        self.count += 1
        self.f_hist[:, slot] = g_s
        if self.scale is None:
            self.scale = self._weights(g_s - s)
        torch.mul(g_s - s, self.scale, out=self.g_hist[:, slot])
        row = torch.bmm(self.g_hist[:, slot:slot + 1], self.g_hist[:, :n].transpose(1, 2))
        self.gram[:, slot, :n] = row.squeeze(1)
        self.gram[:, :n, slot] = row.squeeze(1)
        weights = _anderson_weights(self.gram[:, :n, :n], self.lam).to(s.dtype)
        return torch.bmm(weights.unsqueeze(1), self.f_hist[:, :n]).squeeze(1)


def joint_solve(f: StateMap, objective: Objective, z0: State, x0: torch.Tensor,
                options: JIIOOptions, x_center: torch.Tensor | None = None,
                callback: Callback | None = None) -> JIIOResult:
    """Solve min_x L(z, x) s.t. z = f(z, x) by T joint JIIO iterations from (z0, x0, mu = 0).

    f(z, x) -> state like z0; objective(z, x) -> per-sample loss (batch,). Nothing is recorded
    for autograd across iterations; parameters receive no gradient. callback(k, x), if given,
    sees the input iterate after k iterations (k = 1..T), e.g. to time and record the path.
    """
    options.check()
    center = x0 if x_center is None else x_center
    joint = _JointMap(f, objective, z0, x0, center, options)
    mu0 = x0.new_zeros(len(x0), joint.dz)
    s = joint.project_stacked(joint.stack(z0, x0.detach(), mu0))
    tracker = _BestIterate(s, options.best_rel_residual)
    blocks = [joint.dz, joint.dx, joint.dz] if options.balance else None
    mixer = _AndersonMixer(options.m, options.lam, s, blocks) if options.m > 0 else None
    for iteration in range(options.T):
        if mixer is not None and iteration == options.switch_at:
            mixer.reset()
        g_s, loss, abs_res, rel_res = joint(s, iteration)
        tracker.update(s, loss, abs_res, rel_res)
        s = g_s if mixer is None else joint.project_stacked(mixer.mix(s, g_s))
        if callback is not None:
            callback(iteration + 1, joint.split(s)[1])
    return _result(joint, tracker, options)


def _result(joint: _JointMap, tracker: _BestIterate, options: JIIOOptions) -> JIIOResult:
    z, x, mu = joint.split(tracker.pick("s"))
    losses, abs_trace, rel_trace = (torch.stack(t) for t in tracker.traces)
    return JIIOResult(
        z=joint.layout.unflatten(z), x=x, mu=mu, objective=tracker.pick("loss"),
        nstep=tracker.pick("n"), abs_residual=tracker.pick("abs"),
        rel_residual=tracker.pick("rel"), objective_trace=losses, abs_trace=abs_trace,
        rel_trace=rel_trace, T=options.T, tol=options.best_rel_residual)


@dataclass
class JIIO(JIIOOptions):
    """grad=jiio: the joint solve, and training through its solution.

    Built from the grad=jiio options (`JIIO(**options)`) and handed to a model that serves an
    input-optimisation task (DEQModel.input_optimiser); the model's DEQ keeps its own solver and
    gradient for plain forwards. equilibrium() wires a JIIO solution into autograd with the
    implicit backward warm-started from mu*.
    """

    def __post_init__(self) -> None:
        self.check()
        self.backward = Implicit(b_solver=self.b_solver, b_max_iter=self.b_max_iter,
                                 b_tol=self.b_tol)

    def solve(self, f: StateMap, objective: Objective, z0: State, x0: torch.Tensor,
              x_center: torch.Tensor | None = None, callback: Callback | None = None,
              forward: ForwardSolve | None = None) -> JIIOResult:
        """The joint solve with these options. With z_init=solve, `forward` (the model's forward
        solver: (z -> f(z, x0), z0) -> SolverResult) first moves z0 to the equilibrium at x0."""
        if self.z_init == "solve":
            if forward is None:
                raise ValueError("JIIO z_init=solve needs the model's forward solver")
            x_start = x0.detach()
            with torch.no_grad():
                z0 = forward(lambda z: f(z, x_start), z0).z
        return joint_solve(f, objective, z0, x0, self, x_center, callback)

    def equilibrium(self, f: StateMap, result: JIIOResult, loss_scale: float = 1.0,
                    warm_start: bool | None = None,
                    solve: ForwardSolve | None = None, jac_samples: int = 0,
                    ) -> tuple[State, DEQStats]:
        """One differentiable f(z*, x*) (x* detached) whose backward solves w = J^T w + grad.

        With `solve` (the model's forward solver: (z -> f(z, x*), z0) -> SolverResult) and
        resolve set, z* is first replaced by the solution of z = f(z, x*) started from z*, and
        stats.forward reports that solve. The backward starts from loss_scale * mu* when
        warm_start (default b_warm_start), from grad otherwise; stats.backward records its steps
        once backward ran. jac_samples > 0 (the model's DEQ has its Jacobian penalty on for this
        step) sets stats.jac_loss, the Hutchinson estimate of ||df/dz||_F^2 / dim at that z, with
        this many probes, from the same f call (the paper trains its generator with it).
        """
        warm = self.b_warm_start if warm_start is None else warm_start
        x_star = result.x.detach()
        forward = result.solver_result()
        if solve is not None and self.resolve:
            forward = solve(lambda z: f(z, x_star), result.z)
            result = replace(result, z=forward.z)
        layout = StateLayout.of(result.z)
        z_in = layout.flatten(result.z).detach().requires_grad_()
        z_out = layout.flatten(f(layout.unflatten(z_in), x_star))
        vjp, stats = _vjp(z_out, z_in), DEQStats(forward)
        if jac_samples > 0:
            stats.jac_loss = jacobian_penalty(z_out, z_in, n_samples=jac_samples)
        w0 = loss_scale * result.mu if warm else None

        def hook(grad: torch.Tensor) -> torch.Tensor:
            stats.backward = self.backward.solve_adjoint(vjp, grad, w0=w0)
            return stats.backward.z

        return layout.unflatten(_hooked(z_out, hook)), stats

