"""The project's own errors: each prints as one line and makes the CLI exit with status 2."""

from __future__ import annotations

from pathlib import Path


class MupError(Exception):
    """A user-facing error: the message is one line, no traceback is shown."""


class RuleError(MupError):
    """A malformed rule file: ``FILE:LINE:COL: what is wrong; what was expected``."""

    def __init__(self, path: str | Path, line: int, col: int, what: str, expected: str = "") -> None:
        self.path, self.line, self.col = str(path), line, col
        self.what, self.expected = what, expected
        super().__init__(str(self))

    def __str__(self) -> str:
        tail = f"; {self.expected}" if self.expected else ""
        return f"{self.path}:{self.line}:{self.col}: {self.what}{tail}"


class CalculusError(MupError):
    """The scaling calculus cannot bound a term or bring the rule to the spectral condition."""
