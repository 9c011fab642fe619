"""Metric loggers behind one small interface: none, jsonl, csv, wandb, tensorboard.

Each logger receives flat dicts of numbers: `log(kind, record)` with kind "step" or "epoch".
Files go into the run folder; a resumed run appends to them, a fresh run starts them anew.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from deqrun.errors import WriteError
from deqrun.results import atomic_write, sanitize, strict_dumps, strict_loads


class Logger:
    """Logs nothing (logger=none); the base of the others."""

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """Record one step or epoch."""

    def summary(self, record: dict[str, Any]) -> None:
        """Record the final numbers."""

    def close(self) -> None:
        """Flush and release files."""


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """The record with non-finite numbers as None, and `nonfinite` naming them (if any)."""
    cleaned, nonfinite = sanitize(record)
    if nonfinite:
        cleaned["nonfinite"] = nonfinite
    return cleaned


def _keep(kind: str, record: dict[str, Any], resume_at: tuple[int, int]) -> bool:
    """Whether a logged record happened before the checkpoint a run resumes from."""
    step, epochs = resume_at
    return record.get("step", 0) <= step if kind == "step" else record.get("epoch", 0) <= epochs


class JsonlLogger(Logger):
    """steps.jsonl and epochs.jsonl, one strict JSON object per line."""

    def __init__(self, run_dir: Path, append: bool,
                 resume_at: tuple[int, int] | None = None) -> None:
        self.paths = {kind: run_dir / f"{kind}s.jsonl" for kind in ("step", "epoch")}
        self.files = {}
        for kind, path in self.paths.items():
            if append and resume_at is not None:
                _trim_jsonl(kind, path, resume_at)
            try:
                self.files[kind] = open(path, "a" if append else "w")
            except OSError as error:
                raise WriteError(path, error) from None

    def log(self, kind: str, record: dict[str, Any]) -> None:
        try:
            self.files[kind].write(strict_dumps(_clean(record)) + "\n")
            self.files[kind].flush()
        except OSError as error:
            raise WriteError(self.paths[kind], error) from None

    def close(self) -> None:
        for handle in self.files.values():
            try:
                handle.close()
            except OSError:
                pass


def _trim_jsonl(kind: str, path: Path, resume_at: tuple[int, int]) -> None:
    """Drop lines logged after the checkpoint (and a torn last line) before appending."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = strict_loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _keep(kind, record, resume_at):
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))


class CsvLogger(Logger):
    """steps.csv and epochs.csv; the header comes from the first record (new keys are dropped),
    plus a `nonfinite` column naming the fields written empty because they were NaN/infinite."""

    def __init__(self, run_dir: Path, append: bool,
                 resume_at: tuple[int, int] | None = None) -> None:
        self.paths = {kind: run_dir / f"{kind}s.csv" for kind in ("step", "epoch")}
        for kind, path in self.paths.items():
            if not append:
                path.unlink(missing_ok=True)
            elif resume_at is not None:
                _trim_csv(kind, path, resume_at)
        self.writers: dict[str, tuple[Any, csv.DictWriter]] = {}

    def log(self, kind: str, record: dict[str, Any]) -> None:
        path = self.paths[kind]
        try:
            self._log(kind, path, record)
        except OSError as error:
            raise WriteError(path, error) from None

    def _log(self, kind: str, path: Path, record: dict[str, Any]) -> None:
        record = _clean(record)
        record["nonfinite"] = ";".join(record.get("nonfinite", []))
        if kind not in self.writers:
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
            try:
                handle.close()
            except OSError:
                pass


def _csv_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as handle:
        return next(csv.reader(handle), None)


def _trim_csv(kind: str, path: Path, resume_at: tuple[int, int]) -> None:
    """Drop rows logged after the checkpoint (and a torn last row) before appending."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    if not text.endswith("\n") and body:
        body = body[:-1]
    kept = [row for row in body if len(row) == len(header) and _keep(
        kind, {k: _number(v) for k, v in zip(header, row)}, resume_at)]
    out = io.StringIO()
    csv.writer(out).writerows([header, *kept])
    atomic_write(path, out.getvalue())


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


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
                 resume_at: tuple[int, int] | None = None, **options: Any) -> Logger:
    """The logger called `name` writing into run_dir (appending to earlier files if `append`,
    after dropping what was logged past `resume_at` = (step, finished epochs))."""
    builders = {
        "none": lambda: Logger(),
        "jsonl": lambda: JsonlLogger(run_dir, append, resume_at),
        "csv": lambda: CsvLogger(run_dir, append, resume_at),
        "wandb": lambda: WandbLogger(run_dir, config, **options),
        "tensorboard": lambda: _tensorboard(run_dir, config, append, resume_at),
    }
    return builders[name]()


def _tensorboard(run_dir: Path, config: dict[str, Any], append: bool,
                 resume_at: tuple[int, int] | None) -> Logger:
    return TensorboardLogger(run_dir, config, append=append,
                             resume_step=resume_at[0] if resume_at else None)


# ---- tensorboard: event files in <run>/tensorboard (scalars per step and epoch on the step axis,
# the config and final numbers as text, figures as images; a resumed run purges the events logged
# after its checkpoint). View with `tensorboard --logdir outputs/`.
def _scalar(value: Any) -> float | None:
    """A loggable scalar (bools as 0/1), or None for text, lists and non-finite values."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _markdown_block(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown renderer (indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorboardLogger(Logger):
    """TensorBoard event files under run_dir/tensorboard."""

    def __init__(self, run_dir: Path, config: dict[str, Any], append: bool = False,
                 resume_step: int | None = None, flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        purge = resume_step + 1 if append and resume_step is not None else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=flush_secs)
        self.writer.add_text("config", _markdown_block(json.dumps(config, indent=2, default=str)),
                             global_step=resume_step or 0)
        self.last_step = resume_step or 0

    def log(self, kind: str, record: dict[str, Any]) -> None:
        step = int(record.get("step", record.get("epoch", self.last_step)))
        self.last_step = max(self.last_step, step)
        for key, value in record.items():
            number = _scalar(value)
            if number is not None and key != "step":
                self.writer.add_scalar(f"{kind}/{key}", number, global_step=step)

    def summary(self, record: dict[str, Any]) -> None:
        lines = ["| metric | value |", "|---|---|"]
        for key, value in record.items():
            number = _scalar(value)
            if number is not None:
                self.writer.add_scalar(f"final/{key}", number, global_step=self.last_step)
            lines.append(f"| {key} | {value} |")
        self.writer.add_text("final", "\n".join(lines), global_step=self.last_step)

    def figure(self, name: str, figure: Any, step: int | None = None) -> None:
        """A matplotlib figure or an image file (PNG, JPEG) as image `name`."""
        step = self.last_step if step is None else step
        if isinstance(figure, (str, Path)):
            from PIL import Image

            with Image.open(figure) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
        else:
            self.writer.add_figure(name, figure, global_step=step, close=False)

    def figures(self, folder: Path, pattern: str = "*.png") -> list[str]:
        """Every image in `folder` matching `pattern`, named by file stem; returns the names."""
        names = []
        for path in sorted(folder.glob(pattern)):
            self.figure(f"figures/{path.stem}", path)
            names.append(path.stem)
        return names

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
