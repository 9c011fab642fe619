"""Metric loggers behind one small interface: none, jsonl, csv, wandb.

Each logger receives flat dicts of numbers: `log(kind, record)` with kind "step" or "epoch".
Files go into the run folder; a resumed run appends to them, a fresh run starts them anew.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any


class Logger:
    """Logs nothing (logger=none); the base of the others."""

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """Record one step or epoch."""

    def summary(self, record: dict[str, Any]) -> None:
        """Record the final numbers."""

    def close(self) -> None:
        """Flush and release files."""


class JsonlLogger(Logger):
    """steps.jsonl and epochs.jsonl, one JSON object per line."""

    def __init__(self, run_dir: Path, append: bool) -> None:
        mode = "a" if append else "w"
        self.files = {kind: open(run_dir / f"{kind}s.jsonl", mode) for kind in ("step", "epoch")}

    def log(self, kind: str, record: dict[str, Any]) -> None:
        self.files[kind].write(json.dumps(record) + "\n")
        self.files[kind].flush()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


class CsvLogger(Logger):
    """steps.csv and epochs.csv; the header comes from the first record (new keys are dropped)."""

    def __init__(self, run_dir: Path, append: bool) -> None:
        self.paths = {kind: run_dir / f"{kind}s.csv" for kind in ("step", "epoch")}
        if not append:
            for path in self.paths.values():
                path.unlink(missing_ok=True)
        self.writers: dict[str, tuple[Any, csv.DictWriter]] = {}

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if kind not in self.writers:
            path = self.paths[kind]
            header = _csv_header(path) or list(record)
            handle = open(path, "a", newline="")
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            if path.stat().st_size == 0:
                writer.writeheader()
            self.writers[kind] = (handle, writer)
        handle, writer = self.writers[kind]
        writer.writerow(record)
        handle.flush()

    def close(self) -> None:
        for handle, _ in self.writers.values():
            handle.close()


def _csv_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


class WandbLogger(Logger):
    """Weights & Biases; offline (files under the run folder) unless WANDB_API_KEY is set."""

    def __init__(self, run_dir: Path, config: dict[str, Any], *, project: str,
                 entity: str | None, mode: str, run_name: str, resume: bool) -> None:
        import wandb

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir),
                              config=config, name=run_name, id=_wandb_id(run_dir, resume),
                              resume="allow" if resume else None, reinit="finish_previous")

    def log(self, kind: str, record: dict[str, Any]) -> None:
        self.run.log({f"{kind}/{key}": value for key, value in record.items()})

    def summary(self, record: dict[str, Any]) -> None:
        self.run.summary.update(record)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path, resume: bool) -> str:
    """A run id kept in the run folder, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not (resume and id_file.exists()):
        id_file.write_text(uuid.uuid4().hex[:8])
    return id_file.read_text().strip()


def build_logger(name: str, run_dir: Path, config: dict[str, Any], append: bool,
                 **options: Any) -> Logger:
    """The logger called `name` writing into run_dir (appending to earlier files if `append`)."""
    builders = {
        "none": lambda: Logger(),
        "jsonl": lambda: JsonlLogger(run_dir, append),
        "csv": lambda: CsvLogger(run_dir, append),
        "wandb": lambda: WandbLogger(run_dir, config, **options),
    }
    return builders[name]()
