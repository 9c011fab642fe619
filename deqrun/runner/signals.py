"""Stop signals: SIGINT/SIGTERM become a flag that the loop checks at safe points.

The first signal asks the run to stop at the next safe point (after the current training step,
or at once inside an evaluation, which is abandoned), where it saves a checkpoint. A second signal
does not interrupt that: the checkpoint and metrics.json are written atomically first, then the
run exits. Only a third signal outside those writes abandons the run at once (the last checkpoint
written is kept).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deqrun.errors import Abort

log = logging.getLogger("deqrun")


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks at safe points; see the module doc."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.signum: int | None = None
        self.count = 0
        self.writing = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping at the next safe point with a checkpoint", name)
        elif self.writing:
            log.warning("%s received again: finishing the checkpoint being written, then "
                        "exiting", name)
        elif self.count == 2:
            log.warning("%s received again: still stopping at the next safe point; a third "
                        "signal leaves at once without a new checkpoint", name)
        else:
            raise Abort(signum)

    @contextmanager
    def protect(self) -> Iterator[None]:
        """A section (checkpoint and metrics writes) that signals never interrupt."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
