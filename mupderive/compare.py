"""Check a published (or proposed) table of exponents against the derivation, modulo the abc-symmetry.

A table gives, per role, some of: the multiplier, init std and learning-rate exponents and hyperparameter exponents.
Tables that differ by ``(a, b, c) -> (a + theta, b - theta, c - kappa theta)`` are the same parameterization, so the
table is compared with the derivation *in its own multiplier convention*: the rule is re-derived with each role's
multiplier fixed to the table's, and every other exponent must then agree (a readout init may be smaller than the
spectral bound).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mupderive.derivation import Derivation, derive, rational
from mupderive.errors import MupError
from mupderive.language.rule import ROLES, Rule
from mupderive.solver import Fix

_RATIONAL = re.compile(r"^\s*-?\d+(/\d+)?\s*$")


@dataclass(frozen=True)
class Entry:
    """One exponent of the table against the derivation."""

    role: str
    quantity: str
    table: Fraction
    derived: Fraction | None
    agrees: bool
    note: str = ""


def read_table(path: str | Path) -> dict[str, dict[str, Fraction]]:
    """``{role: {quantity: exponent}}`` from JSON shaped like ``derive --format json`` (``layers``; ``hyper`` nested
    or flat), each exponent a rational string such as ``"-1/2"``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MupError(f"{path}: cannot read the table ({exc})") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise MupError(f"{path}: expected {{\"layers\": {{ROLE: {{\"lr\": \"-1\", ...}}}}}}")
    table: dict[str, dict[str, Fraction]] = {}
    for role, row in layers.items():
        if role not in ROLES or not isinstance(row, dict):
            raise MupError(f"{path}: layer {role!r}: expected one of {', '.join(ROLES)} with a table of exponents")
        flat = {k: v for k, v in row.items() if k not in ("hyper", "if_fixed", "rule", "fan_in", "fan_out", "kappa",
                                                           "notes")}
        flat |= row.get("hyper", {})
        table[role] = {}
        for quantity, value in flat.items():
            if not isinstance(value, str | int) or not _RATIONAL.match(str(value)):
                raise MupError(f"{path}: {role}.{quantity} = {value!r}: expected an exponent such as \"-1/2\"")
            table[role][quantity] = Fraction(str(value).strip())
    return table


def compare(rule: Rule | str, table: dict[str, dict[str, Fraction]], convention: str = "spectral"
            ) -> tuple[Derivation, list[Entry]]:
    """Derive ``rule`` in the table's multiplier convention and compare every exponent the table gives."""
    fixes = [Fix(role, "multiplier", row["multiplier"]) for role, row in table.items() if "multiplier" in row]
    d = derive(rule, convention, fixes)
    entries = []
    for role, row in table.items():
        derived = {k: Fraction(str(v)) for k, v in d.layers[role].exponents().items()}
        for quantity, value in row.items():
            if quantity == "multiplier":
                continue
            mine = derived.get(quantity)
            if mine is None:
                entries.append(Entry(role, quantity, value, None, False, "not a quantity of this rule"))
            elif quantity == "init_std" and role == "output" and value < mine:
                entries.append(Entry(role, quantity, value, mine, True, "below the spectral bound (allowed)"))
            else:
                entries.append(Entry(role, quantity, value, mine, value == mine,
                                     _meaning(role, quantity, value, mine)))
    return d, entries


def _meaning(role: str, quantity: str, table: Fraction, derived: Fraction) -> str:
    if table == derived:
        return ""
    if quantity == "lr":
        return "too large: updates blow up with width" if table > derived else \
            "too small: the layer stops learning features at large width"
    if quantity == "init_std" and role == "output":
        return "too large: the logits blow up once the features align with the readout"
    if quantity == "init_std":
        return "too large: activations blow up with width" if table > derived else "too small: features vanish"
    return f"off by n^{table - derived} (see the rule's if_fixed diagnosis for what that regime does)"


def report(d: Derivation, entries: list[Entry]) -> str:
    """Plain text: per role the multiplier used, then each compared exponent."""
    lines = [f"{d.rule.name}: table against the derivation in the table's multiplier convention "
             f"(kappa = {d.kappa})"]
    for role in dict.fromkeys(e.role for e in entries):
        lines.append(f"  {role} (multiplier n^{rational(d.layers[role].multiplier)}):")
        for e in (x for x in entries if x.role == role):
            derived = "-" if e.derived is None else str(e.derived)
            verdict = "ok" if e.agrees else "DIFFERS"
            note = f"  ({e.note})" if e.note else ""
            lines.append(f"    {e.quantity:<14} table n^{e.table!s:<6} derived n^{derived:<6} {verdict}{note}")
    agree = all(e.agrees for e in entries)
    lines.append("same parameterization" if agree else "not the same parameterization")
    return "\n".join(lines)
