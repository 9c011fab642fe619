"""Where training stands (saved in every checkpoint), and the sums behind every reported number."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SPEED_KEYS = ("step_ms", "forward_ms", "backward_ms", "nstep", "residual")
COUNT_KEYS = ("samples", "tokens")


def add(sums: dict[str, float], values: dict[str, float], scale: float = 1.0) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + float(value) * scale


@dataclass
class Progress:
    """Epoch and step counters, the running epoch's sums, run totals, peaks and the history.

    epoch_task: the task's metric sums over the epoch's training batches; epoch_solver: forward
    steps and residuals weighted by samples; totals: speed over timed steps (after the first step
    of the process, outside pretraining), and over every step the logged cosines with the exact
    gradient (trainer.precision_every) and SHINE's fallback fractions; history: one record per
    finished epoch; skipped: batches skipped by trainer.on_divergence=skip_batch; recent_losses:
    the last finite training losses (the divergence check's running median).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    epoch_task: dict[str, float] = field(default_factory=dict)
    epoch_solver: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    recent_losses: list[float] = field(default_factory=list)

    def note_loss(self, value: float, window: int = 50) -> None:
        """Remember a finite training loss (the divergence check's running median)."""
        self.recent_losses = [*self.recent_losses, float(value)][-window:]

    def skip_step(self) -> None:
        """Count a batch that was skipped (no optimiser step) as consumed."""
        self.step += 1
        self.step_in_epoch += 1
        self.skipped += 1

    def record_step(self, record: dict[str, Any], task_sums: dict[str, float]) -> None:
        """Add a finished step to the epoch sums, the peaks and (when timed) the totals."""
        self.step += 1
        self.step_in_epoch += 1
        add(self.epoch_task, task_sums)
        samples = record["samples"]
        add(self.epoch_solver, {"nstep": record["nstep"], "residual": record["residual"],
                                "converged": record.get("converged", 0.0), "samples": 1.0},
            scale=samples)
        for key in ("saved_bytes", "peak_memory_bytes"):
            self.peaks[key] = max(self.peaks.get(key, 0), record[key])
        for key, count in (("grad_cosine", "grad_cosine_checks"), ("fallback", "fallback_steps")):
            if key in record:
                add(self.totals, {key: record[key], count: 1})
        if record["pretrain"] or record["warmup"]:
            return
        add(self.totals, {key: record[key] for key in SPEED_KEYS})
        add(self.totals, {"steps": 1, **{unit: record[unit] for unit in COUNT_KEYS
                                         if unit in record}})
        if "backward_nstep" in record:
            add(self.totals, {"backward_nstep": record["backward_nstep"], "backward_steps": 1})

    def start_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_task, self.epoch_solver = {}, {}

    def speed(self, device: torch.device) -> dict[str, Any]:
        """Speed and memory over the timed steps, and the peaks."""
        totals = self.totals
        steps = max(totals.get("steps", 0.0), 1.0)
        seconds = max(totals.get("step_ms", 0.0) / 1e3, 1e-9)
        out: dict[str, Any] = {f"{unit}_per_s": totals[unit] / seconds
                               for unit in COUNT_KEYS if unit in totals}
        out.setdefault("samples_per_s", 0.0)
        out.update(forward_ms=totals.get("forward_ms", 0.0) / steps,
                   backward_ms=totals.get("backward_ms", 0.0) / steps,
                   step_ms=totals.get("step_ms", 0.0) / steps,
                   forward_nstep=totals.get("nstep", 0.0) / steps,
                   forward_residual=totals.get("residual", 0.0) / steps,
                   saved_bytes=int(self.peaks.get("saved_bytes", 0)),
                   peak_memory_bytes=int(self.peaks.get("peak_memory_bytes", 0)),
                   peak_memory_kind="cuda_max_allocated" if device.type == "cuda"
                   else "process_peak_rss",
                   epochs=self.epoch, steps=self.step, timed_steps=int(totals.get("steps", 0)))
        if totals.get("backward_steps"):
            out["backward_nstep"] = totals["backward_nstep"] / totals["backward_steps"]
        if totals.get("grad_cosine_checks"):
            out["grad_cosine"] = totals["grad_cosine"] / totals["grad_cosine_checks"]
            out["grad_cosine_checks"] = int(totals["grad_cosine_checks"])
        if totals.get("fallback_steps"):
            out["fallback_fraction"] = totals["fallback"] / totals["fallback_steps"]
        return out
