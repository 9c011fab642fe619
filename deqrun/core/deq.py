"""The DEQ layer: solve z = f(z) without a graph, then attach the chosen gradient method."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .gradients import GRADIENTS
from .jacobian import jacobian_penalty
from .solvers import (
    REL_EPS,
    SOLVERS,
    STOP_MODES,
    SolverResult,
    _Tracker,
    check_solver_options,
    solver_option_names,
)
from .state import State, StateLayout

_PY_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}


@dataclass
class DEQStats:
    """What one DEQ call reports: the forward solve, and the backward solve once backward ran."""

    forward: SolverResult
    backward: SolverResult | None = None
    jac_loss: torch.Tensor | None = None
    pretrain: bool = False
    # grad=shine with fallback, once backward ran: per sample, whether it fell back to w = grad.
    fallback: torch.Tensor | None = None

    @property
    def nstep(self) -> torch.Tensor:
        return self.forward.nstep

    @property
    def abs_residual(self) -> torch.Tensor:
        return self.forward.abs_residual

    @property
    def rel_residual(self) -> torch.Tensor:
        return self.forward.rel_residual

    @property
    def residual(self) -> torch.Tensor:
        return self.forward.residual

    @property
    def trace(self) -> torch.Tensor:
        return self.forward.trace

    @property
    def converged(self) -> torch.Tensor:
        return self.forward.converged

    @property
    def diverged(self) -> torch.Tensor:
        return self.forward.diverged


def _unknown(name: str, valid: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(valid))
    return ValueError(f"unknown option {name!r} for {where}{hint} valid: {listing}")


def _check_type(owner: str, name: str, value: Any, type_name: Any) -> None:
    expected = _PY_TYPES.get(str(type_name))
    bad_bool = isinstance(value, bool) and str(type_name) in ("int", "float")
    if expected is not None and (bad_bool or not isinstance(value, expected)):
        raise ValueError(f"{owner} option {name!r} must be {type_name}, got {value!r}")


def _choose(registry: dict, kind: str, name: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return name


def _autocast_of(z0: State) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast active for the state's device, or None."""
    first = z0 if isinstance(z0, torch.Tensor) else z0[0]
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _to_float32(state: Any) -> Any:
    """Floating tensors of a state (a tensor or a list/tuple of them) in float32."""
    if isinstance(state, torch.Tensor):
        return state.float() if state.is_floating_point() else state
    return type(state)(_to_float32(s) for s in state)


def _low_precision_layer(f: Callable[[State], State], device_type: str,
                         dtype: torch.dtype) -> Callable[[State], State]:
    """f under autocast (its convolutions and matmuls in `dtype`), its output in float32."""

    def layer(z: State) -> State:
        with torch.autocast(device_type, dtype=dtype):
            return _to_float32(f(z))

    return layer


class DEQ(nn.Module):
    """Deep equilibrium layer: `z_star, stats = deq(f, z0)`.

    f maps a state (a tensor or a list of tensors) to a state of the same shapes and closes over
    its parameters and injection. In training mode (and with grad enabled) the returned z carries
    the gradient of `grad`; otherwise the solve uses the eval budget and nothing is recorded.
    Unknown option names raise ValueError.
    """

    def __init__(self, solver: str = "anderson", grad: str = "implicit", *, f_max_iter: int = 30,
                 f_tol: float = 1e-3, stop_mode: str = "rel", eval_f_max_iter: int | None = None,
                 eval_f_tol: float | None = None, pretrain_depth: int = 4, jac_reg: bool = False,
                 jac_samples: int = 1, **options: Any) -> None:
        super().__init__()
        self.solver_name = _choose(SOLVERS, "solver", solver)
        self.grad_name = _choose(GRADIENTS, "grad", grad)
        if stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
        if f_max_iter < 1 or f_tol <= 0 or pretrain_depth < 1 or jac_samples < 1:
            raise ValueError("f_max_iter, pretrain_depth, jac_samples must be >= 1 and f_tol > 0")
        self.f_max_iter, self.f_tol, self.stop_mode = int(f_max_iter), float(f_tol), stop_mode
        self.eval_f_max_iter = int(eval_f_max_iter or f_max_iter)
        self.eval_f_tol = float(eval_f_tol or f_tol)
        self.pretrain_depth, self.jac_reg, self.jac_samples = pretrain_depth, jac_reg, jac_samples
        self.solver_options, grad_options = self._split_options(options)
        check_solver_options(self.solver_name, self.solver_options)
        self.gradient = GRADIENTS[grad](**grad_options)
        if getattr(self.gradient, "needs_lowrank", False) and solver != "broyden":
            raise ValueError(f"grad={grad} needs solver=broyden (got solver={solver})")
        self._reused: list[tuple[Callable, State, SolverResult]] | None = None

    def budget(self, training: bool) -> tuple[int, float]:
        """(max_iter, tol) of the forward solve in training, or in evaluation."""
        if training:
            return self.f_max_iter, self.f_tol
        return self.eval_f_max_iter, self.eval_f_tol

    @property
    def penalty_samples(self) -> int:
        """Hutchinson probes of the Jacobian penalty this step: jac_samples when on, else 0."""
        return self.jac_samples if self.jac_reg else 0

    @property
    def wants_outer_grad(self) -> bool:
        """Whether training solves use the outer-loss gradient (broyden with opa_every > 0)."""
        return self.solver_options.get("opa_every", 0) > 0

    def _split_options(self, options: dict) -> tuple[dict, dict]:
        solver_names = solver_option_names(self.solver_name)
        grad_fields = {f.name: f.type for f in fields(GRADIENTS[self.grad_name])}
        where = f"DEQ(solver={self.solver_name!r}, grad={self.grad_name!r})"
        solver_options, grad_options = {}, {}
        for name, value in options.items():
            if name in grad_fields:
                _check_type(f"grad={self.grad_name}", name, value, grad_fields[name])
                grad_options[name] = value
            elif name in solver_names:
                solver_options[name] = value
            else:
                raise _unknown(name, solver_names + list(grad_fields), where)
        return solver_options, grad_options

    def solve(self, f: Callable[[State], State], z0: State, max_iter: int,
              tol: float, outer_grad: Callable[[State], State] | None = None) -> SolverResult:
        """The forward solve alone (no graph); inside reuse_forward(), the first solve's result.

        outer_grad (state -> dL/dz) reaches solvers that use it (broyden with opa_every > 0).
        """
        if self._reused:
            return self._reused[0][2]
        options = dict(self.solver_options)
        if outer_grad is not None and "outer_grad" in inspect.signature(
                SOLVERS[self.solver_name].__wrapped__).parameters:
            options["outer_grad"] = outer_grad
        with torch.no_grad():
            result = SOLVERS[self.solver_name](f, z0, max_iter=max_iter, tol=tol,
                                               stop_mode=self.stop_mode, **options)
        if self._reused is not None:
            self._reused.append((f, z0, result))
        return result

    @contextmanager
    def use_gradient(self, method: Any) -> Iterator[None]:
        """Within the block, attach `method` (a gradient-method instance) instead of the
        configured one, e.g. the exact gradient for a precision check."""
        previous, self.gradient = self.gradient, method
        try:
            yield
        finally:
            self.gradient = previous

    @contextmanager
    def reuse_forward(self) -> Iterator[list[tuple[Callable, State, SolverResult]]]:
        """Within the block the layer solves once; later solves return that first result.

        Yields a list that holds (f, z0, result) of the first solve. Valid when every forward in
        the block sees the same input, weights and random masks (the solves would be identical):
        it lets several gradient methods share one forward solve.
        """
        self._reused = []
        try:
            yield self._reused
        finally:
            self._reused = None

    def forward(self, f: Callable[[State], State], z0: State, pretrain: bool = False,
                outer_grad: Callable[[State], State] | None = None,
                max_iter: int | None = None) -> tuple[State, DEQStats]:
        """Solve (and in training attach the gradient method); outer_grad: see solve().

        max_iter, if given, replaces this call's forward budget. A smaller budget serves
        amortised solves: warm-started at the previous training step's fixed point, a few solver
        steps per training step follow the moving fixed point. max_iter=0 (training only) takes
        z0 as the fixed point without any solver step: the gradient method's own call f(z0)
        (with graph) is then the only f evaluation of the step, and the residual reported is
        that of z0, ||out - z0|| with `out` the method's output (f(z0) for every method but
        upg with k > 1).
        """
        autocast = _autocast_of(z0)
        if autocast is not None:
            # Mixed precision: f computes under the caller's autocast, its output comes back in
            # float32, and the solver (state, residuals, Anderson's Gram solve, Broyden's updates)
            # runs with autocast off, in float32. Backward hooks re-enter f through its graph.
            device_type, dtype = autocast
            f, z0 = _low_precision_layer(f, device_type, dtype), _to_float32(z0)
            with torch.autocast(device_type, enabled=False):
                return self._forward(f, z0, pretrain, outer_grad, max_iter)
        return self._forward(f, z0, pretrain, outer_grad, max_iter)

    def _forward(self, f: Callable[[State], State], z0: State, pretrain: bool,
                 outer_grad: Callable[[State], State] | None,
                 max_iter: int | None) -> tuple[State, DEQStats]:
        if pretrain:
            return self.unrolled(f, z0)
        training = self.training and torch.is_grad_enabled()
        if max_iter is not None and int(max_iter) < (0 if training else 1):
            raise ValueError(f"max_iter must be >= {0 if training else 1}"
                             f"{' in training' if training else ' outside training'}, "
                             f"got {max_iter}")
        if not training:
            result = self.solve(f, z0, int(max_iter or self.eval_f_max_iter), self.eval_f_tol)
            return result.z, DEQStats(result)
        if max_iter is not None and int(max_iter) == 0:
            return self._taken_as_fixed_point(f, z0)
        if self.wants_outer_grad and outer_grad is None:
            raise ValueError("opa_every > 0 needs the outer-loss gradient: "
                             "deq(f, z0, outer_grad=...)")
        result = self.solve(f, z0, int(max_iter or self.f_max_iter), self.f_tol, outer_grad)
        layout = StateLayout.of(z0)
        flat_f = layout.flat_map(f)
        z_star = layout.flatten(result.z)
        stats = DEQStats(result)
        if self.jac_reg:
            stats.jac_loss = self._jacobian_loss(flat_f, z_star)
        z_out = self.gradient.attach(flat_f, z_star, result, stats)
        return layout.unflatten(z_out), stats

    def _taken_as_fixed_point(self, f: Callable[[State], State], z0: State,
                              ) -> tuple[State, DEQStats]:
        """Training with max_iter=0: attach the gradient method at z0 itself (see forward)."""
        layout = StateLayout.of(z0)
        flat_f = layout.flat_map(f)
        z_star = layout.flatten(z0).detach()
        batch = z_star.shape[0]
        nan = z_star.new_full((batch,), float("nan"))
        no = torch.zeros(batch, dtype=torch.bool, device=z_star.device)
        stats = DEQStats(SolverResult(
            z=z0, nstep=torch.zeros(batch, dtype=torch.long, device=z_star.device),
            abs_residual=nan, rel_residual=nan, abs_trace=nan[None], rel_trace=nan[None],
            converged=no, diverged=no, n_f_evals=0, stop_mode=self.stop_mode, tol=self.f_tol))
        if self.jac_reg:
            stats.jac_loss = self._jacobian_loss(flat_f, z_star)
        z_out = self.gradient.attach(flat_f, z_star, stats.forward, stats)
        with torch.no_grad():
            abs_res = (z_out.detach() - z_star).norm(dim=1)
            rel_res = abs_res / (z_out.detach().norm(dim=1) + REL_EPS)
        result = stats.forward
        result.abs_residual, result.rel_residual = abs_res, rel_res
        result.abs_trace, result.rel_trace = abs_res[None], rel_res[None]
        result.converged = (rel_res if self.stop_mode == "rel" else abs_res) <= self.f_tol
        result.diverged = ~torch.isfinite(abs_res)
        return layout.unflatten(z_out), stats

    def _jacobian_loss(self, flat_f: Callable, z_star: torch.Tensor) -> torch.Tensor:
        z_in = z_star.detach().requires_grad_()
        return jacobian_penalty(flat_f(z_in), z_in, n_samples=self.jac_samples)

    def unrolled(self, f: Callable[[State], State], z0: State) -> tuple[State, DEQStats]:
        """Pretraining: pretrain_depth plain steps z <- f(z) with full backprop."""
        layout = StateLayout.of(z0)
        flat_f = layout.flat_map(f)
        z_prev = layout.flatten(z0)
        for _ in range(self.pretrain_depth - 1):
            z_prev = flat_f(z_prev)
        z = flat_f(z_prev)
        tracker = _Tracker(z_prev.detach(), self.f_tol, self.stop_mode)
        tracker.update(z_prev.detach(), z.detach(), (z - z_prev).detach())
        result = tracker.result(layout, self.pretrain_depth)
        result.nstep.fill_(self.pretrain_depth)
        return layout.unflatten(z), DEQStats(result, pretrain=True)

    def extra_repr(self) -> str:
        return (f"solver={self.solver_name}, grad={self.grad_name}, f_max_iter={self.f_max_iter}, "
                f"f_tol={self.f_tol}, stop_mode={self.stop_mode}")
