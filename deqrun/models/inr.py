# ruff: noqa: UP006, UP007, UP045
"""iSIREN and iMFN: implicit neural representations as equilibrium layers ((Implicit)^2).

A coordinate network maps x in [-1, 1]^d to a signal value. Its hidden state solves

    z = f(z; x) = L_n(... L_1(z + g0(x)))

with n layers and an input filter g0. An MFN layer is L_i(z) = s_i(x) * (W_i z + b_i) with a
Fourier filter s_i(x) = sin(Omega_i x + c_i) or a Gabor one (the same times a Gaussian window
exp(-gamma_i / 2 ||x - mu_i||^2)); g0 is the filter s_0(x). An iSIREN layer is
L_i(z) = sin(W_i z + b_i + Omega_i x + c_i) and g0(x) = sin(Omega_0 x + c_0). Every Omega is
scaled by input_scale / sqrt(n + 1); the recurrent weights W_i have their spectral norm clipped
(0.97 by default), so f is a contraction in z (|sin'| <= 1, |s_i| <= 1). The output is linear.

`implicit=false` is the explicit baseline with the very same parameters: the network run once
from z = 0, i.e. a plain n-layer MFN / SIREN.

The state of one coordinate set is one DEQ sample, shape (1, N, width): residuals and stopping
are those of the whole signal, as in the reference code.

Amortised fixed points (on by default): with full-batch training each training step starts from
the previous step's output, cached per coordinate set (the input's `key`), and runs
`amortised_steps` solver steps. With 0 (the default, the reference's amortisation) the cached
state is taken as the fixed point: the gradient method's differentiable call f(z_cached) is the
step's only f evaluation and its output is the next cached state, so each training step moves
the state by one application of f. (A budget of 1 costs one more f evaluation for nothing: a
solver returns its best iterate, and after one evaluation that is its starting point.) The
DEQ's nstep reports the solver steps per training step (0 after the first). Evaluation keeps
its own cache and always solves to its tolerance. The caches are warm starts only, so they are
not cleared by reset_state (which the runner calls at every epoch, i.e. every step of a
full-batch task); clear_cache() drops them, and they are not saved in checkpoints (a resumed
run's first step solves from z = 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from deqrun.core import DEQ, DEQStats, SolverResult, apply_spectral_norm, reset_norms
from deqrun.models.base import DEQModel
from deqrun.registry import register_model
from deqrun.tasks.base import ModelSpec

SIZE_PATTERN = re.compile(r"^(\d+)L-?(\d+)D$")
PAPER_SIZES = ("1L-256D", "1L-512D", "4L-256D", "1L-1024D", "1L-2048D", "4L-1024D")
FILTERS = ("fourier", "gabor", "siren")


@dataclass
class ISirenConfig:
    """Options of model=isiren (and, with a filter, of model=imfn)."""

    name: str = "isiren"
    # "<layers>L-<width>D"; the paper's: 1L-256D, 1L-512D, 4L-256D, video 1L-1024D, ...
    size: str = "1L-256D"
    implicit: bool = True
    # None: the task's default (image 256, generalisation 128, audio 25000, video 128; the
    # reference halves it for SIREN on images)
    input_scale: Optional[float] = None
    # clip of the recurrent weights' spectral norm; None: no spectral norm
    spectral_clip: Optional[float] = 0.97
    power_iterations: int = 5
    amortise: bool = True
    # solver steps per warm-started training step; 0: none, the gradient method's call f(z) is
    # the step's only f evaluation (the reference's amortisation)
    amortised_steps: int = 0

    def check(self) -> None:
        parse_size(self.size)
        if self.input_scale is not None and self.input_scale <= 0:
            raise ValueError(f"model.input_scale must be > 0, got {self.input_scale}")
        if self.spectral_clip is not None and self.spectral_clip <= 0:
            raise ValueError(f"model.spectral_clip must be > 0, got {self.spectral_clip}")
        if self.power_iterations < 1:
            raise ValueError(f"model.power_iterations must be >= 1, got {self.power_iterations}")
        if self.amortised_steps < 0:
            raise ValueError(f"model.amortised_steps must be >= 0, got {self.amortised_steps}")


@dataclass
class IMFNConfig(ISirenConfig):
    """Options of model=imfn: an MFN with Fourier or Gabor filters."""

    name: str = "imfn"
    filter: str = "fourier"
    # shape of the Gamma prior of the Gabor windows' inverse widths (divided by n + 1)
    gabor_alpha: float = 3.0

    def check(self) -> None:
        super().check()
        if self.filter not in ("fourier", "gabor"):
            raise ValueError(f"model.filter must be fourier or gabor, got {self.filter!r}")
        if self.gabor_alpha <= 0:
            raise ValueError(f"model.gabor_alpha must be > 0, got {self.gabor_alpha}")


def parse_size(size: str) -> tuple[int, int]:
    """'4L-256D' -> (4 layers, width 256)."""
    match = SIZE_PATTERN.match(str(size))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"model.size must look like 1L-256D (layers, width), got {size!r}; "
                         f"the paper's: {', '.join(PAPER_SIZES)}")
    return int(match.group(1)), int(match.group(2))


class CoordinateFilter(nn.Module):
    """One filter of x: sin(Omega x + c) (fourier), times a Gaussian window (gabor), or the
    pre-activation Omega x + c (siren, added inside the layer's sine)."""

    def __init__(self, kind: str, in_features: int, width: int, scale: float,
                 gabor_alpha: float = 3.0) -> None:
        super().__init__()
        if kind not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {kind!r}")
        self.kind = kind
        self.x_map = nn.Linear(in_features, width)
        with torch.no_grad():
            self.x_map.weight.mul_(scale)
            self.x_map.bias.uniform_(-math.pi, math.pi)
        if kind == "gabor":
            gamma = torch.distributions.Gamma(gabor_alpha, 1.0).sample((width,))
            self.mu = nn.Parameter(torch.rand(width, in_features) * 2 - 1)
            self.gamma = nn.Parameter(gamma)
            with torch.no_grad():
                self.x_map.weight.mul_(gamma.sqrt().unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = self.x_map(x)
        if self.kind == "siren":
            return phase
        if self.kind == "fourier":
            return torch.sin(phase)
        distance = ((x**2).sum(1, keepdim=True) + (self.mu**2).sum(1) - 2 * x @ self.mu.T)
        distance = distance.clamp_min(0)
        return torch.sin(phase) * torch.exp(-0.5 * torch.relu(self.gamma) * distance)


@dataclass
class _CacheEntry:
    """Cached states of a coordinate set: (N, width) rows and which rows were ever stored."""

    z: torch.Tensor
    seen: torch.Tensor


class CoordinateDEQ(DEQModel):
    """An iMFN / iSIREN: filters, n recurrent layers solved for their fixed point, linear head.

    forward(inputs) takes coordinates (N, d), or a dict {"coords", "key", "index"}: `key` names
    the coordinate set (for the amortisation cache), `index` (N,) says which rows of that set
    the coordinates are (mini-batches of coordinates); returns ((N, out), DEQStats).
    """

    def __init__(self, deq: DEQ, *, in_features: int, out_features: int, layers: int,
                 width: int, filter_kind: str, input_scale: float, implicit: bool = True,
                 spectral_clip: float | None = 0.97, power_iterations: int = 5,
                 amortise: bool = True, amortised_steps: int = 0,
                 gabor_alpha: float = 3.0) -> None:
        super().__init__()
        self.deq, self.width, self.filter_kind = deq, width, filter_kind
        self.implicit, self.amortise, self.amortised_steps = implicit, amortise, amortised_steps
        scale = input_scale / math.sqrt(layers + 1)
        alpha = gabor_alpha / (layers + 1)
        self.filters = nn.ModuleList(
            CoordinateFilter(filter_kind, in_features, width, scale, alpha)
            for _ in range(layers + 1))
        self.recurrent = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        bound = math.sqrt(1.0 / width)
        for layer in self.recurrent:
            nn.init.uniform_(layer.weight, -bound, bound)
        if spectral_clip is not None:
            apply_spectral_norm(self.recurrent, clip=spectral_clip,
                                n_power_iterations=power_iterations)
        self.head = nn.Linear(width, out_features)
        self._caches: dict[tuple[str, Any], _CacheEntry] = {}

    def injection(self, x: torch.Tensor) -> list[Any]:
        """What f needs of coordinates x (N, d), computed once per forward (after reset_norms):
        the input filter g0(x) and per layer (offset_i, scale_i) with layer i =
        sin(h W_i^T + offset_i) (SIREN) or scale_i * (h W_i^T + offset_i) (MFN), h = z + g0(x)
        for the first. (Folding W_1 g0(x) into the first offset instead would save an addition
        per f evaluation but cost a full matrix product per forward and two per backward: more
        than it saves when amortised steps make about one f evaluation per training step.)"""
        siren = self.filter_kind == "siren"
        filtered = [flt(x) for flt in self.filters]
        g0 = torch.sin(filtered[0]) if siren else filtered[0]
        layers = [(layer.bias + s, None) if siren else (layer.bias, s)
                  for layer, s in zip(self.recurrent, filtered[1:])]
        return [g0, *layers]

    def f(self, z: torch.Tensor, injected: list[Any]) -> torch.Tensor:
        """One application of the equilibrium layer on states (1, N, width)."""
        g0, *layers = injected
        h = z.reshape(-1, self.width) + g0
        for layer, (offset, scale) in zip(self.recurrent, layers):
            pre = torch.addmm(offset, h, layer.weight.T)
            h = torch.sin(pre) if scale is None else scale * pre
        return h.view_as(z)

    def implicit_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient passes through the fixed point (all but the head's)."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def reset_state(self) -> None:
        """Nothing to forget: the caches are warm starts only (see the module docstring)."""

    def clear_cache(self) -> None:
        """Drop every cached fixed point (the next solves start from z = 0)."""
        self._caches.clear()

    def forward(self, inputs: Any, pretrain: bool = False) -> tuple[torch.Tensor, DEQStats]:
        coords, key, index = unpack_coordinates(inputs)
        reset_norms(self.recurrent)
        filtered = self.injection(coords)

        def f(z: torch.Tensor) -> torch.Tensor:
            return self.f(z, filtered)

        z0 = coords.new_zeros(1, coords.shape[0], self.width)
        if not self.implicit:
            z, stats = explicit_pass(f, z0)
            return self.head(z[0]), stats
        z0, warm = self._warm_start(z0, key, index)
        amortised = warm and self.training and torch.is_grad_enabled() and not pretrain
        budget = self.amortised_steps if amortised else None
        z_star, stats = self.deq(f, z0, pretrain=pretrain, max_iter=budget)
        self._store(z_star, key, index)
        return self.head(z_star[0]), stats

    def _cache_key(self, key: Any) -> tuple[str, Any] | None:
        if key is None or not self.amortise:
            return None
        return ("train" if self.training else "eval", key)

    def _warm_start(self, z0: torch.Tensor, key: Any,
                    index: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """z0 from the cache where rows were stored; whether every row was (a warm start)."""
        entry = self._caches.get(self._cache_key(key))
        if entry is None or entry.z.device != z0.device or entry.z.dtype != z0.dtype:
            return z0, False
        if index is None:
            if entry.z.shape != z0.shape[1:]:
                return z0, False
            return entry.z.unsqueeze(0), True
        size = int(index.max()) + 1
        if len(entry.z) < size:
            entry = self._caches[self._cache_key(key)] = self._grown(entry, size, entry.z)
        rows, seen = entry.z[index], entry.seen[index]
        return torch.where(seen.unsqueeze(1), rows, z0[0]).unsqueeze(0), bool(seen.all())

    def _store(self, z_star: torch.Tensor, key: Any, index: torch.Tensor | None) -> None:
        cache_key = self._cache_key(key)
        if cache_key is None:
            return
        z = z_star[0].detach()
        if index is None:
            self._caches[cache_key] = _CacheEntry(z, z.new_ones(len(z), dtype=torch.bool))
            return
        entry = self._caches.get(cache_key)
        size = int(index.max()) + 1
        if entry is None or entry.z.device != z.device or len(entry.z) < size:
            entry = self._grown(entry, size, z)
            self._caches[cache_key] = entry
        entry.z[index] = z
        entry.seen[index] = True

    @staticmethod
    def _grown(entry: _CacheEntry | None, size: int, like: torch.Tensor) -> _CacheEntry:
        """A cache entry with at least `size` rows, keeping the old rows."""
        z = like.new_zeros(size, like.shape[1])
        seen = torch.zeros(size, dtype=torch.bool, device=like.device)
        if entry is not None and entry.z.device == like.device:
            z[: len(entry.z)], seen[: len(entry.seen)] = entry.z, entry.seen
        return _CacheEntry(z, seen)


def unpack_coordinates(inputs: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """(coords, key, index) from a tensor or a dict with keys coords, key, index."""
    if isinstance(inputs, torch.Tensor):
        return inputs, None, None
    if isinstance(inputs, dict) and "coords" in inputs:
        return inputs["coords"], inputs.get("key"), inputs.get("index")
    raise TypeError("a coordinate network takes a tensor (N, d) or a dict with 'coords'")


def explicit_pass(f, z0: torch.Tensor) -> tuple[torch.Tensor, DEQStats]:
    """z = f(0) with full backprop; stats of the single step (nstep 1, residual of z = 0)."""
    z = f(z0)
    with torch.no_grad():
        abs_res = (z - z0).flatten(1).norm(dim=1)
        rel_res = abs_res / (z.flatten(1).norm(dim=1) + 1e-8)
    ones = torch.ones(1, dtype=torch.long, device=z.device)
    result = SolverResult(
        z=z.detach(), nstep=ones, abs_residual=abs_res, rel_residual=rel_res,
        abs_trace=abs_res.unsqueeze(0), rel_trace=rel_res.unsqueeze(0),
        converged=torch.zeros(1, dtype=torch.bool, device=z.device),
        diverged=torch.zeros(1, dtype=torch.bool, device=z.device), n_f_evals=1,
        stop_mode="rel", tol=float("inf"))
    return z, DEQStats(result)


def _input_scale(options: ISirenConfig, spec: ModelSpec, siren: bool) -> float:
    if options.input_scale is not None:
        return float(options.input_scale)
    key = "siren_input_scale" if siren else "input_scale"
    value = spec.get(key, spec.get("input_scale"))
    if value is None:
        raise ValueError("model.input_scale is not set and the task suggests none")
    return float(value)


def build_coordinate_deq(options: ISirenConfig, deq: DEQ, spec: ModelSpec) -> CoordinateDEQ:
    """A CoordinateDEQ from model options and the task's ModelSpec (in_shape (d,), outputs)."""
    options.check()
    layers, width = parse_size(options.size)
    filter_kind = getattr(options, "filter", "siren")
    return CoordinateDEQ(
        deq, in_features=int(spec.in_shape[0]), out_features=int(spec.out_features),
        layers=layers, width=width, filter_kind=filter_kind,
        input_scale=_input_scale(options, spec, filter_kind == "siren"),
        implicit=options.implicit, spectral_clip=options.spectral_clip,
        power_iterations=options.power_iterations, amortise=options.amortise,
        amortised_steps=options.amortised_steps,
        gabor_alpha=getattr(options, "gabor_alpha", 3.0))


@register_model("isiren", schema=ISirenConfig, tasks=("signal",),
                description="implicit SIREN: sin(W z + b + Omega x + c) layers at equilibrium")
def build_isiren(options: ISirenConfig, deq: DEQ, spec: ModelSpec) -> CoordinateDEQ:
    """model=isiren."""
    return build_coordinate_deq(options, deq, spec)


@register_model("imfn", schema=IMFNConfig, tasks=("signal",),
                description="implicit multiplicative filter network (Fourier or Gabor filters)")
def build_imfn(options: IMFNConfig, deq: DEQ, spec: ModelSpec) -> CoordinateDEQ:
    """model=imfn."""
    return build_coordinate_deq(options, deq, spec)
