"""Mixed precision and the numerics policy of a run: autocast, loss scaling, TF32, determinism.

trainer.precision = 32 | bf16 | fp16
    32: everything in float32. bf16 / fp16: the model's forward runs under torch.autocast
    (convolutions and matmuls in the low precision, reductions and norms in float32); fp16 also
    scales the loss (GradScaler) so small gradients do not underflow. bf16 needs no scaling.
    The fixed-point solver stays in float32 either way: `float32_map(f)` hands the solver f's
    output cast back to float32, so its state, residuals, Anderson's Gram matrix and least-squares
    solve and Broyden's low-rank updates are float32 (in bf16, 8 bits of mantissa, the residual
    cannot go below about 4e-3 and Anderson's Gram solve becomes singular).

trainer.tf32 = auto | true | false
    TF32 (10-bit mantissa matmuls and convolutions on Ampere and later GPUs) is coarser than the
    backward solver's tolerance and than the exact-gradient checks. Policy: off unless asked;
    `auto` turns it on only for bf16/fp16 runs without gradient checks (their convolutions are
    already in low precision). Gradient checks (trainer.precision_every > 0, the precision study)
    refuse tf32=true.

trainer.deterministic / cudnn_benchmark per scale
    smoke and test scale: deterministic algorithms on, cuDNN autotuning off (exact reruns);
    paper scale: deterministic off, cuDNN benchmark on (both reference codes' setting, faster).

Every run records the policy it used (`describe()`) in metrics.json.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deqrun.errors import ConfigError

DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE_DEFAULTS = {"smoke": dict(deterministic=True, cudnn_benchmark=False),
                  "test": dict(deterministic=True, cudnn_benchmark=False),
                  "paper": dict(deterministic=False, cudnn_benchmark=True)}


@dataclass(frozen=True)
class NumericsPolicy:
    """How a run computes: autocast precision, TF32, determinism, cuDNN autotuning."""

    precision: str = "32"
    tf32: bool = False
    deterministic: bool = True
    cudnn_benchmark: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full float32."""
        return DTYPES[self.precision]

    def describe(self) -> dict[str, Any]:
        """What metrics.json records under `numerics`."""
        return dict(asdict(self), solver_dtype="float32",
                    matmul_precision="high" if self.tf32 else "highest")


def check_precision(precision: Any) -> str:
    """'32', 'bf16' or 'fp16' (32 may come as an int from YAML), or ConfigError."""
    value = "32" if str(precision) == "fp32" else str(precision)
    if value not in DTYPES:
        raise ConfigError(f"trainer.precision must be 32, bf16 or fp16, got {precision!r}")
    return value


def resolve_policy(precision: Any = "32", tf32: Any = "auto", deterministic: bool | None = None,
                   cudnn_benchmark: bool | None = None, scale: str = "smoke",
                   exact_checks: bool = False) -> NumericsPolicy:
    """The policy from the trainer options; None/auto take the scale's and precision's defaults."""
    precision = check_precision(precision)
    if scale not in SCALE_DEFAULTS:
        raise ConfigError(f"scale must be one of {', '.join(SCALE_DEFAULTS)}, got {scale!r}")
    defaults = SCALE_DEFAULTS[scale]
    deterministic = defaults["deterministic"] if deterministic is None else bool(deterministic)
    if cudnn_benchmark is None:
        cudnn_benchmark = defaults["cudnn_benchmark"] and not deterministic
    if str(tf32).lower() == "auto":
        tf32 = precision != "32" and not exact_checks and not deterministic
    elif str(tf32).lower() not in ("true", "false"):
        raise ConfigError(f"trainer.tf32 must be auto, true or false, got {tf32!r}")
    else:
        tf32 = str(tf32).lower() == "true"
    if tf32 and exact_checks:
        raise ConfigError("trainer.tf32=true with gradient checks (trainer.precision_every > 0): "
                          "the exact-gradient check needs full float32; use trainer.tf32=false")
    return NumericsPolicy(precision, bool(tf32), deterministic, bool(cudnn_benchmark))


def apply_policy(policy: NumericsPolicy, device: torch.device) -> None:
    """Set torch's global switches for the policy (before building the model)."""
    torch.backends.cuda.matmul.allow_tf32 = policy.tf32
    torch.backends.cudnn.allow_tf32 = policy.tf32
    torch.set_float32_matmul_precision("high" if policy.tf32 else "highest")
    torch.backends.cudnn.benchmark = policy.cudnn_benchmark
    torch.backends.cudnn.deterministic = policy.deterministic
    if policy.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(policy.deterministic, warn_only=True)


def autocast(policy: NumericsPolicy, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context (a no-op at precision 32)."""
    if policy.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=policy.dtype)


def grad_scaler(policy: NumericsPolicy, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (disabled, i.e. a pass-through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=policy.precision == "fp16")


def _to_float32(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.float() if state.is_floating_point() else state
    return type(state)(_to_float32(s) for s in state)


def float32_map(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """f with its output cast to float32: under autocast the layer computes in low precision,
    while the solver's state, residuals and linear algebra stay in float32."""

    def mapped(z: Any) -> Any:
        return _to_float32(f(z))

    return mapped
