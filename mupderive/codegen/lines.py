"""Generated lines stay under ruff's limit: a long line is broken inside its brackets (implicit continuation)."""

from __future__ import annotations

WIDTH = 116  # longest generated line before it is broken (ruff allows 120; the module pass uses 120)


def fit(line: str, hang: int = 4, width: int = WIDTH) -> list[str]:
    """Break a long line inside brackets (implicit continuation), after a comma where possible; continuation lines
    are indented by ``hang`` more than the first."""
    if len(line) <= width or line.lstrip().startswith("#"):
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + hang)
    commas, spaces = _break_points(line)
    out, start, prefix = [], 0, ""
    while len(prefix) + len(line) - start > width:
        room = start + width - len(prefix)
        cut = max((p for p in commas if start < p <= room), default=None) or \
            max((p for p in spaces if start < p <= room), default=None)
        if cut is None:
            break
        out.append(prefix + line[start:cut].rstrip())
        start, prefix = cut, indent
    return [*out, prefix + line[start:].lstrip()] if out else [line]


def _break_points(line: str) -> tuple[list[int], list[int]]:
    """Where ``line`` may break inside brackets and outside strings: after ", ", and after any space or bracket."""
    depth, quote, commas, spaces = 0, None, [], []
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
            spaces.append(i + 1)
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth > 0:
            spaces.append(i + 1)
            if line[i - 1] == ",":
                commas.append(i + 1)
    return commas, spaces
