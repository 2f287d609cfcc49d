"""Regenerate mupderive/verify/corpus.txt: docstrings of a fixed list of standard-library modules.

The text is real English prose (with some code), normalized to printable ASCII plus newline so a
character-level vocabulary of 96 symbols covers it. Output is deterministic for a given Python
version (the shipped file was built with CPython 3.11.7): run `python scripts/build_corpus.py`.
"""

import importlib
import inspect
import re
import unicodedata
import warnings
from pathlib import Path

# fmt: off
MODULES = [
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "enum", "fractions", "functools", "heapq", "inspect", "itertools", "json", "logging", "os",
    "pathlib", "pickle", "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "zipfile", "email.message", "http.client", "urllib.parse",
    "socket", "sqlite3", "math", "time", "io", "abc", "copy", "queue", "sched", "calendar", "gzip",
    "configparser", "optparse", "uuid",
]
# fmt: on
OUT = Path(__file__).resolve().parents[1] / "mupderive" / "verify" / "corpus.txt"


def docstring(obj: object) -> str:
    """Return the object's own cleaned docstring (never an inherited one), or ''."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def is_api(obj: object) -> bool:
    """Return True for classes, functions, methods and properties (not constants or submodules)."""
    api_types = property | classmethod | staticmethod
    return inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, api_types)


def module_text(name: str) -> str:
    """Return the module docstring followed by the docstrings of its public classes, methods and functions."""
    module = importlib.import_module(name)
    parts = [f"{name}\n\n{docstring(module)}"]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not is_api(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        if doc := docstring(obj):
            parts.append(f"{name}.{attr}\n\n{doc}")
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                if not member.startswith("_") and is_api(value) and (doc := docstring(value)):
                    parts.append(f"{name}.{attr}.{member}\n\n{doc}")
    return "\n\n".join(parts)


def normalize(text: str) -> str:
    """Map text to printable ASCII plus newline, strip trailing spaces, collapse runs of blank lines."""
    text = unicodedata.normalize("NFKD", text).expandtabs(4)
    text = "".join(c for c in text if c == "\n" or " " <= c <= "~")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main() -> None:
    """Build the corpus and write it next to mupderive/verify/data.py."""
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io / typing.re warn when their docs are read
    text = normalize("\n\n\n".join(module_text(name) for name in MODULES))
    OUT.write_text(text, encoding="ascii")
    print(f"wrote {OUT} ({len(text):,} characters, {len(set(text))} distinct)")


if __name__ == "__main__":
    main()
