"""Run-folder files: metrics.json, written atomically and merged, so no finished result is lost."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_metrics(run_dir: Path, /, fresh: bool = False, **fields: Any) -> None:
    """Merge `fields` into run_dir/metrics.json (or start it anew when `fresh`), atomically
    (temporary file, then rename)."""
    path = run_dir / "metrics.json"
    content: dict[str, Any] = {}
    if path.is_file() and not fresh:
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError:
            content = {}
    content.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if fields.get("status") != "failed":
        content.pop("error", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name("metrics.json.tmp")
    temporary.write_text(json.dumps(content, indent=1, default=str))
    os.replace(temporary, path)
