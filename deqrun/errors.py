"""Errors caused by user input or the environment, shown as one line without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one readable line that the CLI prints as is."""


class ConfigError(UserError):
    """A configuration value is missing, malformed or inconsistent."""


class DataNotFoundError(UserError):
    """A data set is missing or unreadable at the expected location."""


class Interrupted(Exception):
    """A run stopped on a signal after saving its checkpoint; `signum` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
