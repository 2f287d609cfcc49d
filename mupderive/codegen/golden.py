"""Regenerate (or check) the golden modules ``tests/golden/<rule>.py``: every built-in rule, convention spectral,
default depth.

    python -m mupderive.codegen.golden           # rewrite the files after an intended change, then review the diff
    python -m mupderive.codegen.golden --check   # exit 1 and name the stale files (what tests/test_codegen.py asserts)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mupderive.codegen.generate import generate, write_atomically
from mupderive.depth import Depth
from mupderive.derivation import derive
from mupderive.resources import builtin_rule_names

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"


def golden_source(rule: str) -> str:
    """The module the golden file of ``rule`` must hold (with the default depth tables, as ``generate`` writes)."""
    return generate(derive(rule, depth=Depth()))


def stale(directory: Path = GOLDEN_DIR) -> list[str]:
    """Built-in rules whose golden file is missing or differs from what generate() gives now."""
    return list(_outdated(directory))


def _outdated(directory: Path) -> dict[str, str]:
    """``{rule: the source its golden file must hold}`` for the stale ones."""
    out = {}
    for rule in builtin_rule_names():
        path, source = directory / f"{rule}.py", golden_source(rule)
        if not path.is_file() or path.read_text(encoding="utf-8") != source:
            out[rule] = source
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mupderive.codegen.golden", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale golden files (exit 1 if any)")
    parser.add_argument("--dir", type=Path, default=GOLDEN_DIR, help=f"golden directory (default: {GOLDEN_DIR})")
    args = parser.parse_args(argv)
    outdated = _outdated(args.dir)
    if args.check:
        print("\n".join(f"stale: {args.dir / f'{rule}.py'}" for rule in outdated) or "golden files are current")
        return 1 if outdated else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for rule, source in outdated.items():
        write_atomically(args.dir / f"{rule}.py", source)
        print(f"wrote {args.dir / f'{rule}.py'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
