"""Where data sets live when the user gives no `task.root`."""

from __future__ import annotations

from pathlib import Path

DATA_CACHE = "~/.cache/deqrun/data"


def data_root(root: str | Path | None, name: str) -> Path:
    """`root` (user-expanded) if given, else ~/.cache/deqrun/data/<name>."""
    return Path(root if root else Path(DATA_CACHE, name)).expanduser()
