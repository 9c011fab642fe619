"""Run folders: one run per folder, claimed with a lock, never lost to a typo.

A process claims outputs/runs/<run_name> before it writes anything there: it creates `.lock`
(its pid and host; a lock whose process is gone on this host is stale and taken over), then reads
the folder's state. A folder holding a run's work (a checkpoint, or status completed, diverged,
interrupted, or running by a process that is gone) is only continued with trainer.resume=true or
replaced with trainer.overwrite=true; otherwise the claim is refused and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deqrun.config import RunConfig
from deqrun.errors import RunFolderError, WriteError
from deqrun.results import atomic_write, read_metrics

LOCK = ".lock"
HELD_STATES = ("completed", "diverged", "interrupted", "running")
YOUNG_LOCK_SECONDS = 10.0


@dataclass
class Claim:
    """A run folder held by this process; `previous` is its metrics.json before (None: new)."""

    run_dir: Path
    previous: dict[str, Any] | None
    lock: Path | None = None

    @property
    def may_record_failure(self) -> bool:
        """Whether a failure may be written here: the folder holds no other run's work."""
        return self.previous is None or self.previous.get("status") == "failed"

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        if self.lock is not None and _owner(self.lock) == _me():
            self.lock.unlink(missing_ok=True)
        self.lock = None


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _owner(lock: Path) -> dict[str, Any] | None:
    """The lock's {pid, host}, or None when it is unreadable (being written, or torn)."""
    try:
        content = json.loads(lock.read_text())
        return {"pid": int(content["pid"]), "host": str(content["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale(lock: Path, owner: dict[str, Any] | None) -> bool:
    """Whether the lock's process is gone (only knowable on this host)."""
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > YOUNG_LOCK_SECONDS
        except OSError:
            return True
    if owner["host"] != socket.gethostname():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire_lock(run_dir: Path) -> Path:
    """Create run_dir/.lock for this process; RunFolderError if a live process holds it."""
    lock = run_dir / LOCK
    for _ in range(3):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if not _stale(lock, owner):
                who = f"pid {owner['pid']} on {owner['host']}" if owner else "another process"
                raise RunFolderError(f"run folder {run_dir} is in use by {who} (lock {lock}); "
                                     "wait for it or choose another run_name; delete the lock "
                                     "only if that process is gone") from None
            lock.unlink(missing_ok=True)
            continue
        except OSError as error:
            raise WriteError(lock, error) from None
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps({**_me(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return lock
    raise RunFolderError(f"could not take the lock {lock}: other processes keep taking it")


def claim(run_dir: Path, config: RunConfig) -> Claim:
    """Lock the run folder and check that this run may write into it (see the module doc)."""
    lock = acquire_lock(run_dir)
    held = Claim(run_dir, read_metrics(run_dir), lock)
    try:
        _check_reuse(held, config)
    except BaseException:
        held.release()
        raise
    return held


def _check_reuse(held: Claim, config: RunConfig) -> None:
    """Refuse to reuse a folder holding a run unless resuming or overwriting it."""
    trainer, run_dir = config.trainer, held.run_dir
    status = None if held.previous is None else held.previous.get("status", "unreadable")
    checkpoint = (run_dir / "checkpoints" / "last.pt").exists()
    if not (checkpoint or status in HELD_STATES or status == "unreadable"):
        return
    state = "killed" if status == "running" else status or "checkpointed"
    if trainer.overwrite:
        clear(run_dir)
        held.previous = None
        return
    if trainer.resume and not trainer.resume_from:
        return
    raise RunFolderError(f"run_name={config.run_name} already holds a {state} run in {run_dir}; "
                         "continue it with trainer.resume=true, choose another run_name, or "
                         "replace it with trainer.overwrite=true")


def clear(run_dir: Path) -> None:
    """Delete a previous run's files (trainer.overwrite=true), keeping the lock."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as error:
            raise WriteError(entry, error) from None


def write_job_config(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """The composed config and the overrides in run_dir/.hydra/ (what Hydra would write)."""
    atomic_write(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write(run_dir / ".hydra" / "overrides.yaml",
                 OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
