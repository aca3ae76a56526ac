"""User-facing errors: one line, naming the file (and line) at fault.

The CLI prints `str(error)` on stderr and exits with status 2; anything else that escapes is a bug.
"""
from __future__ import annotations

import os


class WsolbenchError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


class InputError(WsolbenchError):
    """Bad content in a file the user gave us: `<path>:<line>: <what is wrong>`."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = os.fspath(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")
