"""Errors caused by user input or the environment, shown as one line without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one readable line that the CLI prints as is."""


class ConfigError(UserError):
    """A configuration value is missing, malformed or inconsistent."""


class DataNotFoundError(UserError):
    """A data set is missing or unreadable at the expected location."""
