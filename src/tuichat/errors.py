"""Exceptions that carry a sentence for the user: what went wrong, where, and what to do about it."""

from __future__ import annotations

from pathlib import Path


class TuichatError(Exception):
    """Base for errors shown to the user as a message, never as a traceback."""


class ConfigError(TuichatError):
    """A config file (or a value in it) is wrong; names the file and the dotted key."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {message}")
