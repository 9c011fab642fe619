"""MDEQ: a multiscale deep equilibrium model for image classification.

The equilibrium layer f keeps one state tensor per resolution branch (branch i at H / 2^i).
Each branch runs a residual block (with the input injected into the highest resolution only),
then a fusion step sums every branch into every other one. Only f is solved for a fixed point;
the stem (input injection) and the classification head are ordinary feed-forward layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deqrun.core import (
    DEQ,
    DEQStats,
    InputProblem,
    JIIOResult,
    SolverResult,
    apply_weight_norm,
    outer_gradient,
    reset_norms,
)
from deqrun.errors import ConfigError
from deqrun.models.base import DEQModel
from deqrun.registry import register_model
from deqrun.tasks.base import ModelSpec

# The config schema uses typing.Optional / List: OmegaConf reads these annotations at run time.
# ruff: noqa: UP006, UP035, UP045

Tensors = list[torch.Tensor]
HEAD_EXPANSION = 4


@dataclass
class MDEQSpec:
    """The architecture of an MDEQ; the lists have one entry per branch."""

    num_branches: int
    branch_channels: list[int]
    head_channels: list[int]
    final_channels: int
    stem_channels: int
    downsample_times: int = 0
    expansion: int = 5
    num_groups: int = 8
    dropout: float = 0.0
    weight_norm: bool = True


MDEQ_SIZES: dict[str, MDEQSpec] = {
    "tiny": MDEQSpec(num_branches=2, branch_channels=[24, 24], head_channels=[8, 16],
                     final_channels=200, stem_channels=24, dropout=0.25),
    "small": MDEQSpec(num_branches=4, branch_channels=[32, 64, 128, 256],
                      head_channels=[28, 56, 112, 224], final_channels=2048, stem_channels=32,
                      downsample_times=2, expansion=4, dropout=0.0),
    "large": MDEQSpec(num_branches=4, branch_channels=[32, 64, 128, 256],
                      head_channels=[14, 28, 56, 112], final_channels=1680, stem_channels=32,
                      dropout=0.3),
}

PER_BRANCH_FIELDS = ("branch_channels", "head_channels")
_SCALARS = {"int": int, "float": (int, float), "bool": bool}


def _spec_fields() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(MDEQSpec)}


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """Check one override against its field type; lists (also Hydra's ListConfig) become lists."""
    if type_name == "list[int]":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"MDEQ option {name!r} must be a list of ints, got {value!r}")
        items = list(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ValueError(f"MDEQ option {name!r} must be a list of ints, got {items!r}")
        return items
    bad_bool = isinstance(value, bool) and type_name != "bool"
    if bad_bool or not isinstance(value, _SCALARS[type_name]):
        raise ValueError(f"MDEQ option {name!r} must be {type_name}, got {value!r}")
    return float(value) if type_name == "float" else value


def check_mdeq_spec(spec: MDEQSpec) -> None:
    """Raise ValueError, naming the field, if the spec is inconsistent or out of range."""
    for name in PER_BRANCH_FIELDS:
        if len(getattr(spec, name)) != spec.num_branches:
            raise ValueError(f"MDEQ {name} has {len(getattr(spec, name))} entries but "
                             f"num_branches={spec.num_branches}; give one per branch")
    positive = {"num_branches": spec.num_branches, "final_channels": spec.final_channels,
                "stem_channels": spec.stem_channels, "expansion": spec.expansion,
                "num_groups": spec.num_groups,
                "branch_channels": min(spec.branch_channels, default=0),
                "head_channels": min(spec.head_channels, default=0)}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"MDEQ {name} must be >= 1, got {getattr(spec, name)!r}")
    if spec.downsample_times < 0:
        raise ValueError(f"MDEQ downsample_times must be >= 0, got {spec.downsample_times}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"MDEQ dropout must be in [0, 1), got {spec.dropout}")


def resolve_mdeq_spec(size: str, **overrides: Any) -> MDEQSpec:
    """The preset `size` with the given fields replaced (None values are ignored)."""
    if size not in MDEQ_SIZES:
        raise ValueError(f"unknown MDEQ size {size!r}; valid: {', '.join(sorted(MDEQ_SIZES))}")
    types = _spec_fields()
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ValueError(f"unknown MDEQ option(s) {', '.join(map(repr, unknown))}; "
                         f"valid: size, {', '.join(sorted(types))}")
    changes = {name: _coerce(name, value, types[name])
               for name, value in overrides.items() if value is not None}
    spec = replace(copy.deepcopy(MDEQ_SIZES[size]), **changes)
    check_mdeq_spec(spec)
    return spec


def group_norm(channels: int, num_groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= num_groups that divides channels."""
    groups = max(g for g in range(1, num_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, affine=affine)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=bias)


def halved(size: int, times: int) -> int:
    """Spatial size after `times` stride-2 3x3 convolutions with padding 1."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class ResidualBlock(nn.Module):
    """One branch of f: conv-GN-ReLU-conv, dropout, + injection, GN, + residual, ReLU, GN."""

    def __init__(self, channels: int, expansion: int, num_groups: int) -> None:
        super().__init__()
        hidden = expansion * channels
        self.conv1 = conv3x3(channels, hidden)
        self.norm1 = group_norm(hidden, num_groups)
        self.conv2 = conv3x3(hidden, channels)
        self.norm2 = group_norm(channels, num_groups)
        self.norm3 = group_norm(channels, num_groups)

    def forward(self, z: torch.Tensor, injection: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv2(F.relu(self.norm1(self.conv1(z))))
        if mask is not None:
            out = out * mask
        out = self.norm2(out + injection)
        return self.norm3(F.relu(out + z))


def _downsample_path(in_channels: int, out_channels: int, steps: int,
                     num_groups: int) -> nn.Sequential:
    """`steps` stride-2 conv3x3 + GN (ReLU between them); the last one changes the width."""
    layers: list[nn.Module] = []
    for step in range(steps):
        last = step == steps - 1
        width = out_channels if last else in_channels
        layers += [conv3x3(in_channels, width, stride=2), group_norm(width, num_groups)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _upsample_path(in_channels: int, out_channels: int, steps: int,
                   num_groups: int) -> nn.Sequential:
    """conv1x1 + GN, then nearest-neighbour upsampling by 2^steps."""
    return nn.Sequential(conv1x1(in_channels, out_channels), group_norm(out_channels, num_groups),
                         nn.Upsample(scale_factor=2**steps, mode="nearest"))


def _fusion_path(spec: MDEQSpec, source: int, target: int) -> nn.Module:
    channels, groups = spec.branch_channels, spec.num_groups
    if source < target:
        return _downsample_path(channels[source], channels[target], target - source, groups)
    if source > target:
        return _upsample_path(channels[source], channels[target], source - target, groups)
    return nn.Identity()


class MultiscaleFusion(nn.Module):
    """Every branch i receives the sum of all branches resampled to its resolution."""

    def __init__(self, spec: MDEQSpec) -> None:
        super().__init__()
        n = spec.num_branches
        self.paths = nn.ModuleList(
            nn.ModuleList(_fusion_path(spec, j, i) for j in range(n)) for i in range(n))
        self.post = nn.ModuleList(
            nn.Sequential(nn.ReLU(), conv1x1(c, c), group_norm(c, spec.num_groups))
            for c in spec.branch_channels)

    def forward(self, branches: Tensors) -> Tensors:
        fused = []
        for paths, post, target in zip(self.paths, self.post, branches):
            height, width = target.shape[-2:]
            total = sum(path(x)[..., :height, :width] for path, x in zip(paths, branches))
            fused.append(post(total))
        return fused


class MultiscaleLayer(nn.Module):
    """The equilibrium layer f(z, injection): per-branch residual blocks, then fusion."""

    def __init__(self, spec: MDEQSpec) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(c, spec.expansion, spec.num_groups)
                                    for c in spec.branch_channels)
        self.fusion = MultiscaleFusion(spec)

    def forward(self, z: Tensors, injection: Tensors,
                dropout_masks: Tensors | None = None) -> Tensors:
        masks = dropout_masks if dropout_masks is not None else [None] * len(z)
        return self.fusion([block(z_i, x_i, m_i) for block, z_i, x_i, m_i
                            in zip(self.blocks, z, injection, masks)])


def _stem(in_channels: int, spec: MDEQSpec) -> nn.Sequential:
    """Two conv3x3-BN-ReLU layers or more, exactly downsample_times of them with stride 2."""
    times = spec.downsample_times
    strides = [2 if times >= 1 else 1, 2 if times >= 2 else 1] + [2] * max(0, times - 2)
    layers: list[nn.Module] = []
    width = in_channels
    for stride in strides:
        layers += [conv3x3(width, spec.stem_channels, stride), nn.BatchNorm2d(spec.stem_channels),
                   nn.ReLU()]
        width = spec.stem_channels
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Head bottleneck: 1x1 -> 3x3 -> 1x1 to 4 x planes channels, with a projected shortcut."""

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        out_channels = HEAD_EXPANSION * planes
        self.body = nn.Sequential(
            conv1x1(in_channels, planes), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            conv3x3(planes, planes), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            conv1x1(planes, out_channels), nn.BatchNorm2d(out_channels, affine=False))
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ClassificationHead(nn.Module):
    """Widen each branch, merge from high to low resolution, 1x1 conv, global pool, linear."""

    def __init__(self, spec: MDEQSpec, num_classes: int) -> None:
        super().__init__()
        widths = [HEAD_EXPANSION * h for h in spec.head_channels]
        self.widen = nn.ModuleList(Bottleneck(c, h)
                                   for c, h in zip(spec.branch_channels, spec.head_channels))
        self.merge = nn.ModuleList(
            nn.Sequential(conv3x3(w_in, w_out, stride=2, bias=True), nn.BatchNorm2d(w_out),
                          nn.ReLU())
            for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.final = nn.Sequential(nn.Conv2d(widths[-1], spec.final_channels, 1),
                                   nn.BatchNorm2d(spec.final_channels), nn.ReLU())
        self.classifier = nn.Linear(spec.final_channels, num_classes)

    def forward(self, z: Tensors) -> torch.Tensor:
        y = self.widen[0](z[0])
        for widen, merge, z_i in zip(self.widen[1:], self.merge, z[1:]):
            y = widen(z_i) + merge(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


def _init_convs(*modules: nn.Module, std: float = 0.01) -> None:
    """The reference initialisation of the explicit layers: conv weights and biases ~ N(0, std)."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, 0.0, std)
                if layer.bias is not None:
                    nn.init.normal_(layer.bias, 0.0, std)


class MDEQ(DEQModel):
    """Multiscale DEQ classifier: `logits, stats = model(x)` (or `model(x, pretrain=True)`).

    The state is a list of per-branch tensors solved jointly by `deq`. Weight norm (on the convs
    of f) is recomputed once per forward, and one variational-dropout mask per branch is drawn
    per forward (training mode only) and shared by every evaluation of f in that forward.
    """

    def __init__(self, spec: MDEQSpec, deq: DEQ, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        check_mdeq_spec(spec)
        self.spec, self.deq = spec, deq
        self.stem = _stem(in_channels, spec)
        width = spec.branch_channels[0]
        self.injection_layer = nn.Sequential(conv1x1(spec.stem_channels, width),
                                             nn.BatchNorm2d(width), nn.ReLU())
        self.equilibrium = MultiscaleLayer(spec)
        self.classifier = ClassificationHead(spec, num_classes)
        _init_convs(self.stem, self.injection_layer, self.classifier)
        if spec.weight_norm:
            apply_weight_norm(self.equilibrium)

    def injection(self, x: torch.Tensor) -> Tensors:
        """The stem's features for branch 0 and zeros at the lower resolutions."""
        first = self.injection_layer(self.stem(x))
        batch, _, height, width = first.shape
        zeros = [first.new_zeros(batch, c, halved(height, i), halved(width, i))
                 for i, c in enumerate(self.spec.branch_channels) if i > 0]
        return [first, *zeros]

    def initial_state(self, injection: Tensors) -> Tensors:
        return [torch.zeros_like(x) for x in injection]

    def f(self, z: Tensors, injection: Tensors,
          dropout_masks: Tensors | None = None) -> Tensors:
        """One application of the equilibrium layer (weights as of the last reset_norms)."""
        return self.equilibrium(z, injection, dropout_masks)

    def dropout_masks(self, state: Tensors) -> Tensors | None:
        """Fresh per-sample, per-channel masks (scaled by 1/keep), or None when dropout is off."""
        if not self.training or self.spec.dropout == 0:
            return None
        keep = 1.0 - self.spec.dropout
        return [torch.empty_like(z[:, :, :1, :1]).bernoulli_(keep) / keep for z in state]

    def implicit_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient passes through the fixed point (all but the head's)."""
        head = {id(p) for p in self.classifier.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def head(self, z: Tensors) -> torch.Tensor:
        return self.classifier(z)

    def outer_grad(self) -> Callable[[Tensors], Tensors] | None:
        """z -> dL/dz of the batch's training loss through the head, for OPA; None when the DEQ
        does not use it or no outer loss is set. The head's BatchNorm statistics are those of the
        iterate's batch, as in the training loss, and its running statistics are left untouched."""
        if not (self.deq.wants_outer_grad and self.training and self.outer_loss is not None):
            return None
        loss = self.outer_loss

        def outer(z: Tensors) -> torch.Tensor:
            with frozen_buffers(self.classifier):
                return loss(self.head(z))

        return outer_gradient(outer)

    def forward(self, x: torch.Tensor | InputProblem, pretrain: bool = False,
                ) -> tuple[torch.Tensor | AttackedLogits, DEQStats]:
        if isinstance(x, InputProblem):
            return self.attack(x)
        injection = self.injection(x)
        reset_norms(self.equilibrium)
        masks = self.dropout_masks(injection)

        def f(z: Tensors) -> Tensors:
            return self.f(z, injection, masks)

        outer = self.outer_grad()
        extra = {} if outer is None else {"outer_grad": outer}
        z_star, stats = self.deq(f, self.initial_state(injection), pretrain=pretrain, **extra)
        return self.head(z_star), stats


    def attack(self, problem: InputProblem) -> tuple[AttackedLogits, DEQStats]:
        """Solve the input problem (an attack: maximise a loss in a ball) jointly with the
        equilibrium by JIIO (grad=jiio). In training (grad enabled), the logits at x* come from
        one differentiable f(z*, x*) with the implicit backward warm-started from mu*
        (problem.loss_scale maps the objective to the training loss); otherwise from a plain
        solve at x*. Batch-norm statistics are not updated by the attack's iterations. With
        grad.resolve (default), training first re-solves the equilibrium at x* from z* with the
        model's forward solver, so that it trains at the point a deployed solve reaches."""
        if self.input_optimiser is None:
            raise ConfigError("model=mdeq attacks its input with JIIO: run it with grad=jiio "
                              "(no input optimiser was given)")
        jiio = problem.options(self.input_optimiser)
        reset_norms(self.equilibrium)
        x0 = problem.x0.detach()
        with frozen_batch_stats(self):
            injection0 = self.injection(x0)
        masks = self.dropout_masks(injection0)

        def f(z: Tensors, x: torch.Tensor) -> Tensors:
            return self.f(z, self.injection(x), masks)

        def solve(g: Callable[[Tensors], Tensors], z0: Tensors) -> SolverResult:
            with frozen_batch_stats(self):
                return self.deq.solve(g, z0, *self.deq.budget(self.training))

        with frozen_batch_stats(self):
            result = jiio.solve(f, lambda z, x: problem.objective(self.head(z), x),
                                self.initial_state(injection0), x0, problem.x_center,
                                problem.callback, forward=solve)
        if self.training and torch.is_grad_enabled():
            z, stats = jiio.equilibrium(f, result, problem.loss_scale, solve=solve,
                                        jac_samples=self.deq.penalty_samples)
            return AttackedLogits(self.head(z), result.x, result), stats
        with torch.no_grad():
            logits, decoded = self.forward(result.x)
        return AttackedLogits(logits, result.x, result), replace(
            decoded, forward=result.solver_result())


@dataclass
class AttackedLogits:
    """The classifier's logits at an attacked input x (and the JIIO solve that found it)."""

    logits: torch.Tensor
    x: torch.Tensor
    jiio: Optional[JIIOResult] = None


@contextmanager
def frozen_batch_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms keep their running statistics (momentum 0) inside the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


@contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Within the block the module's buffers (BatchNorm running statistics) are copies, so that
    what the block's forward updates in place is dropped; the originals are put back after.

    Copies rather than a restore in place: BatchNorm's graph saves its running statistics, and
    a backward after an in-place restore would fail the version check."""
    owners = [(m, name, buffer) for m in module.modules()
              for name, buffer in m.named_buffers(recurse=False) if buffer is not None]
    for owner, name, buffer in owners:
        setattr(owner, name, buffer.clone())
    try:
        yield
    finally:
        for owner, name, buffer in owners:
            setattr(owner, name, buffer)


@dataclass
class MDEQConfig:
    """model=mdeq: `size` picks a preset (tiny/small/large); any field set here overrides it."""

    name: str = "mdeq"
    size: str = "tiny"
    num_branches: Optional[int] = None
    branch_channels: Optional[List[int]] = None
    head_channels: Optional[List[int]] = None
    final_channels: Optional[int] = None
    stem_channels: Optional[int] = None
    downsample_times: Optional[int] = None
    expansion: Optional[int] = None
    num_groups: Optional[int] = None
    dropout: Optional[float] = None
    weight_norm: Optional[bool] = None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}

    def check(self) -> None:
        resolve_mdeq_spec(**self.options())


@register_model("mdeq", schema=MDEQConfig, tasks=("image_classification",),
                description="multiscale DEQ (Bai et al. 2020), sizes tiny/small/large")
def build_mdeq_model(options: MDEQConfig, deq: DEQ, spec: ModelSpec) -> MDEQ:
    """The registered builder: an MDEQ for the task's image channels and classes."""
    return build_mdeq(options.options(), deq=deq, in_channels=spec.in_shape[0],
                      num_classes=spec.out_features)


def build_mdeq(options: Mapping[str, Any], *, deq: DEQ, in_channels: int,
               num_classes: int) -> MDEQ:
    """An MDEQ from options {"size": preset, **MDEQSpec field overrides}."""
    options = dict(options)
    if "size" not in options:
        raise ValueError(f"model=mdeq needs the option 'size'; valid: {', '.join(MDEQ_SIZES)}")
    spec = resolve_mdeq_spec(options.pop("size"), **options)
    return MDEQ(spec, deq, in_channels=in_channels, num_classes=num_classes)
