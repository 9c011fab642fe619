"""Errors caused by user input or the environment, shown as one line without a traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """An error the user can fix; its message is one readable line that the CLI prints as is."""


class ConfigError(UserError):
    """A configuration value is missing, malformed or inconsistent."""


class DataNotFoundError(UserError):
    """A data set is missing or unreadable at the expected location."""


class RunFolderError(UserError):
    """The run folder belongs to another run or process (finished run, lock held)."""


class CheckpointError(UserError):
    """A checkpoint is unreadable or does not belong to the configured run."""


class WriteError(UserError):
    """A file of the run folder could not be written (read-only folder, full disk, ...)."""

    def __init__(self, path: Any, error: Exception) -> None:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        super().__init__(f"cannot write {path}: {reason}; the last good files are kept")
        self.path = path


class Interrupted(Exception):
    """A run stopped on a signal after saving its checkpoint; `signum` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class Diverged(Exception):
    """Training diverged (non-finite or exploding loss, non-finite gradient or weights)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


class Abort(BaseException):
    """A third stop signal: leave at once, without a new checkpoint (not an Exception, so that
    no handler swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
