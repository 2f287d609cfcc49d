"""The only doors from a rule file into generated code: identifiers are checked, values are written as literals, and
free text is reduced to characters that cannot end a comment or a docstring.

A rule loaded from a file has already been validated by the loader; these checks hold for any :class:`Rule`, including
one built by hand, so a hostile rule can make generation fail (``MupError``) but never make it emit code.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
import shlex
import textwrap
import unicodedata
from fractions import Fraction

from mupderive.errors import MupError

# Names the generated module itself uses; a rule name equal to one of them would shadow it.
GENERATED_NAMES = frozenset({
    "torch", "math", "nn", "self", "params", "grads", "states", "param", "grad", "state", "group", "options",
    "foreach", "t", "fan_in", "fan_out", "mup_role", "mup_ratio", "mup_depth", "multiplier", "init_std", "step", "base",
    "groups", "optimizers", "defaults", "value", "decay_vectors",
})
# Module-level names of the generated module; a generated optimizer class must not take one.
MODULE_NAMES = frozenset({
    "MuP", "HybridOptimizer", "Any", "Callable", "ChainMap", "Fraction", "Iterable", "Mapping", "Sequence", "EXPONENTS",
    "RULE", "RULE_SHA256", "CONVENTION", "FIXES", "RULE_OF_ROLE", "PARAMETERIZATION", "ALIGNMENT", "DEPTH",
    "DEPTH_ALPHA", "DEPTH_BRANCH_MATRICES", "DEPTH_BRANCH_MULTIPLIER", "DEPTH_BREAKS", "DEPTH_GRAD_NORM",
})
RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | GENERATED_NAMES

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
_RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_ARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,39})(?:\[([0-9])\])?")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def identifier(name: object, what: str) -> str:
    """``name`` if it can be a variable or keyword argument of generated code, else a ``MupError``."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or name in RESERVED:
        raise MupError(f"{what} {name!r} cannot appear in generated code: expected an ASCII identifier that starts "
                       f"with a letter (at most 40 characters) and is not a Python keyword, builtin or one of "
                       f"{', '.join(sorted(GENERATED_NAMES))}")
    return name


def rule_name(name: object) -> str:
    """A rule's name: lowercase letters, digits and ``_`` (it names generated functions and classes)."""
    if not isinstance(name, str) or not _RULE_NAME.fullmatch(name) or keyword.iskeyword(name):
        raise MupError(f"rule name {name!r} cannot appear in generated code: expected lowercase letters, digits, _ "
                       f"(not a Python keyword)")
    return name


def constructor_arg(arg: object, what: str) -> tuple[str, int | None]:
    """``"betas[1]"`` -> ``("betas", 1)``; ``"eps"`` -> ``("eps", None)``."""
    match = _ARG.fullmatch(arg) if isinstance(arg, str) else None
    if match is None or keyword.iskeyword(match.group(1)) or match.group(1) in ("self", "params") \
            or match.group(1).startswith("__"):
        raise MupError(f"{what}: constructor argument {arg!r} cannot appear in generated code: expected an "
                       f"identifier (not a dunder name), optionally indexed like \"betas[0]\"")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def class_path(path: object) -> tuple[str, str]:
    """``"torch.optim.AdamW"`` -> (module to import, dotted expression naming the class)."""
    if not isinstance(path, str) or not _DOTTED.fullmatch(path) or any(
            keyword.iskeyword(part) or part.startswith("__") for part in path.split(".")):
        raise MupError(f"implementation class {path!r} cannot appear in generated code: expected a dotted path of "
                       f"identifiers (no keywords or dunder names) such as \"torch.optim.AdamW\"")
    return path.rpartition(".")[0], path


def literal(value: object) -> str:
    """Python source for a hyperparameter or fixed-argument value (bool, int, float or str)."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MupError(f"value {value!r} is not finite")
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    raise MupError(f"value {value!r} of type {type(value).__name__} cannot appear in generated code")


def number(value: Fraction) -> str:
    """Python source for an exact rational: ``2``, ``0.25``, or ``(1 / 3)`` when no float is exact."""
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    return repr(as_float) if Fraction(as_float) == value else f"({value.numerator} / {value.denominator})"


def text(value: object) -> str:
    """One line of printable ASCII without backslashes or double quotes: safe in a comment and a docstring."""
    decomposed = unicodedata.normalize("NFKD", str(value))
    out = []
    for ch in decomposed:
        if unicodedata.combining(ch):
            continue
        if ch == "\\":
            out.append("/")
        elif ch == '"':
            out.append("'")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(" " if ch.isspace() else "?")
    return " ".join("".join(out).split())


def shell_word(value: str, limit: int = 100) -> str | None:
    """``value`` quoted for a POSIX shell (``shlex.quote``) when the result is also :func:`text` (no double quotes,
    backslashes or non-ASCII) and at most ``limit`` characters; else None."""
    quoted = shlex.quote(value)
    return quoted if value and text(quoted) == quoted and len(quoted) <= limit else None


def wrap(value: object, width: int, indent: str = "") -> list[str]:
    """:func:`text` wrapped into lines of at most ``width`` characters (indent included)."""
    return textwrap.wrap(text(value), width, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [indent.rstrip()]
