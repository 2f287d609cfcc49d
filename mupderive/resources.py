"""Where the built-in rules and the code templates live: inside the wheel, or beside the package in a checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    installed = _PACKAGE / "_data" / name  # a built wheel (see [tool.hatch...force-include] in pyproject.toml)
    return installed if installed.is_dir() else _PACKAGE.parent / name  # an editable install or a checkout


def rules_dir() -> Path:
    return _data_dir("rules")


def templates_dir() -> Path:
    return _data_dir("templates")


@cache
def builtin_rule_names() -> tuple[str, ...]:
    """Names of the rule files shipped with mupderive, sorted."""
    return tuple(sorted(p.stem for p in rules_dir().glob("*.toml")))


def builtin_rule_path(name: str) -> Path:
    return rules_dir() / f"{name}.toml"
