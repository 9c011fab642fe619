"""Random-number state for checkpoints: CPU and CUDA generators, per rank, tolerant of a resumed
job that sees a different number of GPUs than the one that saved it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("deqrun")


def restore_cuda_rng(states: list[torch.Tensor]) -> str | None:
    """Set the saved CUDA generator states on the visible devices, pairing them by index.

    `torch.cuda.set_rng_state_all` raises IndexError when fewer GPUs are visible than states were
    saved (a job requeued on a smaller node, or one rank per GPU under DDP). Here the first
    min(saved, visible) devices get their state back; the rest keep their seeded state. Returns a
    note for the run's notes when the counts differ (the run is then not bit-exact on the extra
    devices), else None.
    """
    if not states or not torch.cuda.is_available():
        return None
    visible = torch.cuda.device_count()
    for index, state in enumerate(states[:visible]):
        torch.cuda.set_rng_state(state.cpu(), device=index)
    if len(states) == visible:
        return None
    note = (f"the checkpoint holds the CUDA random state of {len(states)} GPU(s) but "
            f"{visible} are visible: restored {min(len(states), visible)}, the others keep "
            "their seeded state")
    log.warning(note)
    return note


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's CPU generator and, on a GPU run, the generator of its own device."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Undo capture_rng (the CUDA state goes to this process's device, whatever its index)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device=device)


def rank_rng_path(checkpoint: Path, rank: int) -> Path:
    """Where rank `rank` keeps its generators beside the checkpoint (every rank draws its own
    dropout masks, so each needs its own state for an exact resume)."""
    return checkpoint.with_name(f"rng-rank{rank}.pt")


def save_rank_rng(checkpoint: Path, rank: int, device: torch.device) -> None:
    """Write this rank's generators next to the checkpoint."""
    path = rank_rng_path(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(capture_rng(device), temporary)
    temporary.replace(path)


def load_rank_rng(checkpoint: Path, rank: int, device: torch.device) -> bool:
    """Restore this rank's generators if it saved them; False when there is no file (e.g. the
    run is resumed with more ranks than it had)."""
    path = rank_rng_path(checkpoint, rank)
    if not path.is_file():
        return False
    restore_rng(torch.load(path, map_location="cpu", weights_only=True), device)
    return True
