"""One download per data set when many jobs start at once (a SLURM array, several DDP ranks).

    with download_lock(root):
        if not present(root):
            download(root)

The first job to take the lock downloads; the others wait, then find the files. The lock is an
advisory `flock` on `<root>/.deqrun-download.lock`, so it works across processes and nodes that
share the file system (NFS and Lustre with flock support); where fcntl does not exist (Windows)
the block runs unlocked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("deqrun")
LOCK_NAME = ".deqrun-download.lock"


@contextlib.contextmanager
def download_lock(root: str | Path, timeout_s: float = 3600.0,
                  poll_s: float = 1.0) -> Iterator[Path]:
    """Hold the data folder's download lock for the block; TimeoutError after `timeout_s`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    if fcntl is None:
        yield path
        return
    with open(path, "a") as handle:
        deadline, told = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for {path}; another job is "
                                       "still downloading (or remove the stale lock)") from None
                if not told:
                    log.info("waiting for another job's download into %s", root)
                    told = True
                time.sleep(poll_s)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
