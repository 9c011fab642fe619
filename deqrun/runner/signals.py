"""Stop signals: SIGINT/SIGTERM become a flag that the loop checks at safe points."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("deqrun")


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
