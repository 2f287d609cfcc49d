"""Positions of keys and values in TOML text, for ``FILE:LINE:COL`` messages (``tomllib`` keeps none).

A line scanner that understands the subset of TOML rule files use: ``[table]`` headers, ``key = value`` with dotted or
quoted keys, inline tables ``{ k = v, ... }`` on one line, and multi-line strings and arrays (whose bodies it skips).
It maps each key path to the (line, col) of its value; unknown paths fall back to their nearest known parent.
"""

from __future__ import annotations

import re

from mupderive.language.ir import Loc

_KEY = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]")  # [table] and [[array-of-tables]]
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=\s*")


def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in re.findall(_KEY, dotted))


class Locator:
    """Maps TOML key paths, e.g. ``("hyperparameters", "eps", "role")``, to the location of their value."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], Loc] = {}
        self._scan(text.split("\n"))

    def __call__(self, *path: str) -> Loc:
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return Loc(1, 1)

    def _scan(self, lines: list[str]) -> None:
        table: tuple[str, ...] = ()
        skip_until: str | None = None
        for number, line in enumerate(lines, start=1):
            if skip_until is not None:
                if skip_until in line:
                    skip_until = None
                continue
            header = _HEADER.match(line)
            if header:
                table = _split_key(header.group(1))
                self.where.setdefault(table, Loc(number, line.index("[") + 1))
                continue
            skip_until = self._assignments(line, number, table, 0)

    def _assignments(self, line: str, number: int, prefix: tuple[str, ...], start: int) -> str | None:
        """Record ``key = value`` pairs from ``start``; returns a closing delimiter if a value spans lines."""
        match = _ASSIGN.match(line, start)
        if not match:
            return None
        path = prefix + _split_key(match.group(1))
        col = match.end()
        self.where.setdefault(path, Loc(number, col + 1))
        rest = line[col:]
        for quote in ('"""', "'''"):
            if rest.startswith(quote):
                return None if rest.count(quote) >= 2 else quote
        if rest.startswith("{"):
            self._inline_table(line, number, path, col + 1)
        elif rest.startswith("[") and rest.count("[") > rest.count("]"):
            return "]"
        return None

    def _inline_table(self, line: str, number: int, prefix: tuple[str, ...], start: int) -> None:
        pos = start
        while pos < len(line):
            match = _ASSIGN.match(line, pos)
            if not match:
                return
            self._assignments(line, number, prefix, pos)
            pos = _value_end(line, match.end())
            if pos < len(line) and line[pos] == ",":
                pos += 1
            else:
                return


def _value_end(line: str, pos: int) -> int:
    """Index just past the value starting at ``pos`` (a string, inline table, array or bare word)."""
    depth, quote = 0, ""
    i = pos
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            if depth == 0:
                return i
            depth -= 1
        elif ch == "," and depth == 0:
            return i
        i += 1
    return i
