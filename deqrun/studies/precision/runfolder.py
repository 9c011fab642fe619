"""What the study reads from a deqrun run folder, checked up front with one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deqrun.errors import UserError

from .dynamic import read_grad_cosines


class PrecisionError(UserError):
    """The study cannot run as asked (e.g. the run folder lacks a file); one readable line."""


@dataclass
class RunFolder:
    """A run folder's metrics.json, its last checkpoint and its logged grad_cosine values."""

    path: Path
    metrics: dict[str, Any]
    checkpoint: Path
    cosines: list[tuple[int, float]] = field(default_factory=list)


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json of the run folder, with its resolved config."""
    metrics_path = path / "metrics.json"
    if not path.is_dir():
        raise PrecisionError(f"run folder {path} does not exist")
    if not metrics_path.is_file():
        raise PrecisionError(f"{path} has no metrics.json; pass a deqrun run folder")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as error:
        raise PrecisionError(f"{metrics_path} is not valid JSON ({error})") from None
    if not isinstance(metrics, dict) or "config" not in metrics:
        raise PrecisionError(f"{metrics_path} has no 'config'; the run did not start properly")
    return metrics


def open_run(path: Path) -> RunFolder:
    """Check the run folder has its config, checkpoint and logged grad_cosine values."""
    metrics = read_metrics(path)
    checkpoint = path / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        raise PrecisionError(f"{path} has no checkpoints/last.pt; let the run finish an epoch")
    cosines = read_grad_cosines(path / "steps.jsonl")
    if not cosines:
        raise PrecisionError(f"{path}/steps.jsonl has no grad_cosine values; train with "
                             "trainer.precision_every=N and logger=jsonl")
    return RunFolder(path, metrics, checkpoint, cosines)
