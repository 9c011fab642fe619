"""Checkpoints: everything needed to continue a run exactly (weights, optimiser, schedule, RNG,
progress), the resolved config and a fingerprint of what a resume must match; written atomically.

Resume reads and checks a checkpoint before anything is built or written: an unreadable file is
refused in one line naming it, and a fingerprint that differs from the configured run is refused
in one line naming the differing keys (unless trainer.resume_force=true).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deqrun.errors import CheckpointError, ConfigError, WriteError
from deqrun.runner.progress import Progress
from deqrun.runner.rng import restore_cuda_rng

# Options a resumed run must share with the checkpoint: they define the parameters, the state the
# solver or gradient carries, the optimiser state, and the order of the training data.
FINGERPRINT_GROUPS = ("model", "task", "grad", "optim")
FINGERPRINT_KEYS = ("solver.name", "trainer.batch_size", "trainer.seed",
                    "trainer.pretrain_steps", "trainer.jac_reg_weight")
NOT_FINGERPRINTED = ("task.root",)  # where the data lives may differ between machines
DATA_ORDER_KEYS = ("trainer.batch_size", "trainer.seed", "task.subset")


def fingerprint(resolved: dict[str, Any]) -> dict[str, Any]:
    """The flattened `group.key` values of the resolved config that a resume must match."""
    out: dict[str, Any] = {}
    for group in FINGERPRINT_GROUPS:
        for key, value in (resolved.get(group) or {}).items():
            out[f"{group}.{key}"] = value
    for dotted in FINGERPRINT_KEYS:
        group, key = dotted.split(".")
        out[dotted] = (resolved.get(group) or {}).get(key)
    for dotted in NOT_FINGERPRINTED:
        out.pop(dotted, None)
    return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key (saved -> now)` for every fingerprint key whose value differs."""
    keys = sorted(set(saved) | set(current))
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    renamed = {k.split(".")[0] for k in changed if k.endswith(".name")}
    shown = [k for k in changed if k.endswith(".name") or k.split(".")[0] not in renamed]
    return [f"{k} ({saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r})"
            for k in shown]


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, resolved: dict[str, Any]) -> None:
    """Write the checkpoint to a temporary file, then rename it over `path` (kept on failure)."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), progress=asdict(progress),
                 rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 config=resolved, fingerprint=fingerprint(resolved))
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(path, error) from None


def read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint's content, or CheckpointError in one line naming the file."""
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; trainer.resume_from must name a checkpoint "
                          "file (or use run_name=<run> trainer.resume=true)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the run folder was left "
                              "as it is")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError, KeyError, AttributeError, TypeError):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete "
                              "deqrun checkpoint); the run folder was left as it is") from None
    missing = [k for k in ("model", "optimizer", "scheduler", "progress", "rng_cpu")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a deqrun checkpoint (missing "
                              f"{', '.join(missing)})")
    return state


def check_compatible(path: Path, state: dict[str, Any], resolved: dict[str, Any],
                     force: bool) -> list[str]:
    """The differing fingerprint keys; CheckpointError unless they are none or `force`."""
    saved = state.get("fingerprint")
    if saved is None:
        changed = ["fingerprint (the checkpoint has none)"]
    else:
        changed = differences(saved, fingerprint(resolved))
    if changed and not force:
        raise CheckpointError(f"cannot resume from {path}: the run differs in "
                              f"{'; '.join(changed)}; use the original values, or "
                              "trainer.resume_force=true to continue anyway")
    return changed


def restore(path: Path, state: dict[str, Any], model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, changed: list[str]) -> Progress:
    """Load a checked checkpoint into the built objects; return the progress it was saved at.

    With forced differences (`changed`): the weights, progress, history and RNG are kept; the
    optimiser state and schedule are reset (schedule advanced to the step) when an optim key
    changed; the current epoch restarts from its first batch when the data order changed.
    """
    _load_weights(path, state["model"], model)
    progress = Progress(**{k: v for k, v in state["progress"].items()
                           if k in Progress.__dataclass_fields__})
    if any(key.startswith("optim.") for key in changed):
        _advance(scheduler, progress.step)
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path}: the optimiser state does not fit "
                                  f"({error})") from None
    torch.set_rng_state(state["rng_cpu"].cpu())
    restore_cuda_rng(state.get("rng_cuda") or [])  # tolerates another number of GPUs
    if any(key.split(" ")[0] in DATA_ORDER_KEYS for key in changed) and progress.step_in_epoch:
        progress.step_in_epoch = 0
        progress.epoch_task, progress.epoch_solver = {}, {}
    return progress


def init_weights(source: str | Path, model: nn.Module, device: torch.device) -> Path:
    """Load another run's weights into a fresh model (trainer.init_from): a checkpoint file or a
    run folder holding checkpoints/last.pt. Returns the checkpoint's path."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ConfigError(f"trainer.init_from={source}: no checkpoint there (give a checkpoint "
                          "file or a run folder with checkpoints/last.pt)")
    state = read_checkpoint(path, device)
    _load_weights(path, state["model"], model)
    return path


def _load_weights(path: Path, saved: dict[str, Any], model: nn.Module) -> None:
    """Load the weights, or one line saying which parameters do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("other shape", shapes)) if keys]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the configured model "
                              f"({'; '.join(problems)}); resume with the model options it was "
                              "trained with")
    model.load_state_dict(saved)


def _advance(scheduler: Any, steps: int) -> None:
    """Put a freshly built schedule at `steps` without touching the optimiser."""
    scheduler.last_epoch = steps - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.step()
