"""Run-folder files: strict JSON (no NaN/Infinity), atomic writes, and metrics.json merged so that
no finished result is lost.

A non-finite number is written as null, and the record names it: `nonfinite` lists the dotted
paths (metrics.json) or keys (log lines) whose value was NaN or infinite. Every file of every run
state parses with `json.loads(text, parse_constant=<reject>)` and the csv module.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

from deqrun.errors import WriteError

STATUSES = ("running", "completed", "interrupted", "diverged", "failed")


def sanitize(value: Any, path: str = "", found: list[str] | None = None) -> tuple[Any, list[str]]:
    """`value` with every non-finite float replaced by None, and the paths of those floats."""
    found = [] if found is None else found
    if isinstance(value, dict):
        return {k: sanitize(v, f"{path}.{k}" if path else str(k), found)[0]
                for k, v in value.items()}, found
    if isinstance(value, (list, tuple)):
        return [sanitize(v, f"{path}[{i}]", found)[0] for i, v in enumerate(value)], found
    if isinstance(value, bool):
        return value, found
    if isinstance(value, numbers.Integral):
        return int(value), found
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            found.append(path)
            return None, found
        return float(value), found
    return value, found


def strict_dumps(value: Any, **options: Any) -> str:
    """JSON text that any strict parser reads (non-finite numbers must be sanitized first)."""
    return json.dumps(value, allow_nan=False, default=str, **options)


def _reject(constant: str) -> Any:
    raise ValueError(f"non-standard JSON constant {constant}")


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_reject)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`.

    Raises WriteError naming `path` when the folder is read-only or the disk is full; `path`
    keeps its previous content then.
    """
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _discard(temporary)
        raise WriteError(path, error) from None


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json's content; None when there is none; {} when it is unreadable."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        content = strict_loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def write_metrics(run_dir: Path, /, fresh: bool = False, **fields: Any) -> None:
    """Merge `fields` into run_dir/metrics.json (or start it anew when `fresh`), atomically."""
    content = {} if fresh else (read_metrics(run_dir) or {})
    content.pop("nonfinite", None)
    if fields.get("status") not in ("failed", "diverged", None):
        content.pop("error", None)
    if fields.get("status") not in ("diverged", None):
        content.pop("divergence", None)
    content.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    content, nonfinite = sanitize(content)
    if nonfinite:
        content["nonfinite"] = nonfinite
    atomic_write(run_dir / "metrics.json", strict_dumps(content, indent=1))
