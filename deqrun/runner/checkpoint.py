"""Checkpoints: everything needed to continue a run exactly (weights, optimiser, schedule, RNG,
progress), written atomically."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deqrun.errors import ConfigError
from deqrun.runner.progress import Progress

log = logging.getLogger("deqrun")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress) -> None:
    """Write the checkpoint to a temporary file, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), progress=asdict(progress),
                 rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, device: torch.device) -> Progress:
    """Restore a checkpoint into the built objects; return the progress it was saved at."""
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; trainer.resume_from must name a checkpoint "
                          "file (or use run_name=<run> trainer.resume=true)")
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    progress = Progress(**state["progress"])
    log.info("resumed from %s at epoch %d, step %d", path, progress.epoch + 1, progress.step)
    return progress
