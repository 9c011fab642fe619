"""Gradient methods: how z* is wired into autograd after a graph-free solve.

Each method is a small dataclass (its fields are its options) registered by name, with
`attach(f, z_star, result, stats) -> z`: f maps flat (batch, dim) states to flat states and closes
over the parameters and the injection; z_star is the detached solution; the returned tensor has
the value f(z*) (or the unrolled iterate for upg) and carries the method's gradient.

Notation: J = df/dz at z*, grad = dL/dz*; the exact gradient needs w = (I - J)^-T grad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from .solvers import SOLVERS, STOP_MODES, SolverResult, check_solver_options
from .state import State

GRADIENTS: dict[str, type] = {}
FlatMap = Callable[[torch.Tensor], torch.Tensor]


def register_gradient(name: str):
    """Class decorator: make the class a dataclass and register it under `name`."""

    def wrap(cls: type) -> type:
        cls = dataclass(cls)
        cls.name = name
        GRADIENTS[name] = cls
        return cls

    return wrap


def option_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _f_with_graph(f: FlatMap, z_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One differentiable call f(z*) with z* a fresh leaf, for VJPs with J."""
    z_in = z_star.detach().requires_grad_()
    return z_in, f(z_in)


def _hooked(z_out: torch.Tensor, hook: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A view of z_out whose incoming gradient `hook` replaces.

    The hook sits on a view so that the VJPs the hook itself runs from z_out do not re-enter it.
    """
    out = z_out.view_as(z_out)
    out.register_hook(hook)
    return out


def _vjp(z_out: torch.Tensor, z_in: torch.Tensor) -> FlatMap:
    """w -> w^T J, reusing the graph of one f call."""
    return lambda w: torch.autograd.grad(z_out, z_in, w, retain_graph=True)[0]


@register_gradient("implicit")
class Implicit:
    """Exact implicit differentiation: solve w = J^T w + grad with a backward solver.

    b_warm_start starts the backward solve from the previous call's w when the shapes agree
    (useful when the same samples recur, as in full-batch training); otherwise from grad.
    """

    b_solver: str = "anderson"
    b_max_iter: int = 40
    b_tol: float = 1e-6
    b_stop_mode: str = "abs"
    b_solver_options: dict = field(default_factory=dict)
    b_warm_start: bool = False

    def __post_init__(self) -> None:
        _check(self.b_solver in SOLVERS, f"b_solver must be one of {sorted(SOLVERS)}")
        _check(self.b_max_iter >= 1, f"b_max_iter must be >= 1, got {self.b_max_iter}")
        _check(self.b_tol > 0, f"b_tol must be > 0, got {self.b_tol}")
        _check(self.b_stop_mode in STOP_MODES, f"b_stop_mode must be one of {STOP_MODES}")
        check_solver_options(self.b_solver, dict(self.b_solver_options))
        self._last_w: torch.Tensor | None = None

    def solve_adjoint(self, vjp: FlatMap, grad: torch.Tensor,
                      w0: torch.Tensor | None = None) -> SolverResult:
        """Solve w = vjp(w) + grad, from w0 when given (e.g. JIIO's adjoint estimate)."""
        warm = self._last_w is not None and self._last_w.shape == grad.shape
        if w0 is None:
            w0 = self._last_w if (self.b_warm_start and warm) else grad
        result = SOLVERS[self.b_solver](
            lambda w: vjp(w) + grad, w0, max_iter=self.b_max_iter, tol=self.b_tol,
            stop_mode=self.b_stop_mode, **self.b_solver_options)
        self._last_w = result.z.detach()
        return result

    def attach(self, f: FlatMap, z_star: torch.Tensor, result: SolverResult, stats) -> torch.Tensor:
        z_in, z_out = _f_with_graph(f, z_star)
        vjp = _vjp(z_out, z_in)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            stats.backward = self.solve_adjoint(vjp, grad)
            return stats.backward.z

        return _hooked(z_out, hook)


@register_gradient("upg")
class UPG:
    """Unrolled phantom gradient A_{k,lambda}: k damped steps from z* with autograd on."""

    k: int = 5
    lambda_: float = 0.5

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"k must be >= 1, got {self.k}")
        _check(0 < self.lambda_ <= 1, f"lambda_ must be in (0, 1], got {self.lambda_}")

    def attach(self, f: FlatMap, z_star: torch.Tensor, result: SolverResult, stats) -> torch.Tensor:
        z = z_star.detach()
        for _ in range(self.k):
            z = self.lambda_ * f(z) + (1 - self.lambda_) * z
        return z


@register_gradient("npg")
class NPG:
    """Neumann phantom gradient: w = lambda sum_{t<k} (B^T)^t grad, B = lambda J + (1-lambda) I."""

    k: int = 5
    lambda_: float = 0.5

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"k must be >= 1, got {self.k}")
        _check(0 < self.lambda_ <= 1, f"lambda_ must be in (0, 1], got {self.lambda_}")

    def attach(self, f: FlatMap, z_star: torch.Tensor, result: SolverResult, stats) -> torch.Tensor:
        z_in, z_out = _f_with_graph(f, z_star)
        vjp = _vjp(z_out, z_in)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            term, total = grad, grad
            for _ in range(self.k - 1):
                term = self.lambda_ * vjp(term) + (1 - self.lambda_) * term
                total = total + term
            return self.lambda_ * total

        return _hooked(z_out, hook)


@register_gradient("jacobian_free")
class JacobianFree:
    """Jacobian-free backprop (JFB): w = grad, i.e. backpropagate through one call f(z*).

    refine > 0: that many backward Broyden steps on w = J^T w + grad, warm-started at w = grad
    (SHINE's "JF refine" rows).
    """

    refine: int = 0
    refine_tol: float = 1e-6

    def __post_init__(self) -> None:
        _check(self.refine >= 0, f"refine must be >= 0, got {self.refine}")
        _check(self.refine_tol > 0, f"refine_tol must be > 0, got {self.refine_tol}")

    def attach(self, f: FlatMap, z_star: torch.Tensor, result: SolverResult, stats) -> torch.Tensor:
        if self.refine == 0:
            return f(z_star.detach())
        z_in, z_out = _f_with_graph(f, z_star)
        vjp = _vjp(z_out, z_in)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            stats.backward = _refine(vjp, grad, grad, self.refine, self.refine_tol)
            return stats.backward.z

        return _hooked(z_out, hook)


def _refine(vjp: FlatMap, grad: torch.Tensor, w0: torch.Tensor, steps: int, tol: float,
            init_lowrank: tuple | None = None) -> SolverResult:
    """`steps` backward Broyden steps on w = vjp(w) + grad from w0 (steps + 1 VJPs)."""
    return SOLVERS["broyden"](lambda x: vjp(x) + grad, w0, max_iter=steps + 1, tol=tol,
                              stop_mode="rel", init_lowrank=init_lowrank)


@register_gradient("shine")
class Shine:
    """SHINE: w = -grad^T B with B Broyden's forward inverse estimate of (J - I)^-1.

    fallback: per sample, use w = grad where ||w|| > fallback_threshold ||grad||.
    refine: that many backward Broyden steps warm-started at the SHINE w, starting from B^T.
    """

    fallback: bool = True
    fallback_threshold: float = 1.8
    refine: int = 0
    refine_tol: float = 1e-6
    needs_lowrank = True

    def __post_init__(self) -> None:
        _check(self.fallback_threshold > 0, "fallback_threshold must be > 0")
        _check(self.refine >= 0, f"refine must be >= 0, got {self.refine}")
        _check(self.refine_tol > 0, f"refine_tol must be > 0, got {self.refine_tol}")

    def estimate(self, grad: torch.Tensor, result: SolverResult) -> torch.Tensor:
        """The SHINE w for flat grad, with the per-sample fallback applied."""
        return self.estimate_and_fallback(grad, result)[0]

    def estimate_and_fallback(self, grad: torch.Tensor,
                              result: SolverResult) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w, the per-sample booleans of the samples that fell back to w = grad); None for the
        booleans when fallback is off."""
        w = -result.lowrank.rmatvec(grad)
        if not self.fallback:
            return w, None
        too_big = w.norm(dim=1) > self.fallback_threshold * grad.norm(dim=1)
        return torch.where(too_big.unsqueeze(1), grad, w), too_big

    def attach(self, f: FlatMap, z_star: torch.Tensor, result: SolverResult, stats) -> torch.Tensor:
        if result.lowrank is None:
            raise ValueError("grad=shine needs the forward solver broyden (it reuses its inverse)")
        z_in, z_out = _f_with_graph(f, z_star)
        vjp = _vjp(z_out, z_in)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            w, stats.fallback = self.estimate_and_fallback(grad, result)
            if self.refine == 0:
                return w
            u, v = result.lowrank.masked()
            stats.backward = _refine(vjp, grad, w, self.refine, self.refine_tol, (v, u))
            return stats.backward.z

        return _hooked(z_out, hook)


def outer_gradient(loss: Callable[[State], torch.Tensor]) -> Callable[[State], State]:
    """Turn a scalar outer loss of the DEQ state into z -> dL/dz, for DEQ(..., outer_grad=...).

    The returned callable runs with autograd on (even inside the graph-free forward solve) and
    returns detached gradients, shaped like the state (a tensor or a list of tensors).
    """

    def grad_of(z: State) -> State:
        leaves = [t.detach().requires_grad_() for t in (z if isinstance(z, list) else [z])]
        with torch.enable_grad():
            value = loss(leaves if isinstance(z, list) else leaves[0])
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        return grads if isinstance(z, list) else grads[0]

    return grad_of
