"""Width exponents: exact affine forms ``c0 + sum_k c_k s_k`` with rational coefficients.

Every quantity the calculus tracks scales as ``n^e`` with ``e`` affine in a few symbols: the fan exponents ``o``
and ``i``, the forward-multiplier exponent ``m``, and the unknown exponents of hyperparameters. Coefficients are
sympy's exact rationals (``MPQ``, the ground type under ``sympy.Rational``), kept in a flat affine form because the
calculus does only linear arithmetic and must be fast (results leave as sympy ``Rational``s and expressions, see
:mod:`mupderive.derivation`). Deciding which of two exponents is larger uses sign assumptions on the symbols; when they
do not settle it, :class:`Undecidable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import sympy
from sympy.external.gmpy import MPQ

Rational = Fraction | int | MPQ


def q(value: Rational) -> MPQ:
    """An exact rational as sympy's ground rational type."""
    if isinstance(value, MPQ):
        return value
    if isinstance(value, Fraction):
        return MPQ(value.numerator, value.denominator)
    if isinstance(value, sympy.Rational):
        return MPQ(int(value.p), int(value.q))
    return MPQ(value)


class Undecidable(Exception):
    """The order of two exponents depends on symbols whose signs are not known."""

    def __init__(self, diff: Exp) -> None:
        super().__init__(f"sign of {diff} is not determined")
        self.diff = diff


class Exp:
    """An exact affine exponent. Immutable; supports ``+``, ``-``, scaling by rationals, substitution."""

    __slots__ = ("const", "coef")

    def __init__(self, const: Rational = 0, coef: Mapping[str, Rational] | None = None) -> None:
        self.const = q(const)
        self.coef: dict[str, MPQ] = {k: q(v) for k, v in (coef or {}).items() if v != 0}

    @staticmethod
    def _raw(const: MPQ, coef: dict[str, MPQ]) -> Exp:
        """Trusted constructor: ``const`` an MPQ, ``coef`` MPQs without zeros (the hot path)."""
        out = object.__new__(Exp)
        out.const, out.coef = const, coef
        return out

    @staticmethod
    def sym(name: str) -> Exp:
        return Exp._raw(_ZERO_Q, {name: _ONE_Q})

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(self.coef)

    def is_const(self) -> bool:
        return not self.coef

    def fraction(self) -> Fraction:
        """A constant exponent as a :class:`fractions.Fraction`."""
        if self.coef:
            raise Undecidable(self)
        return Fraction(self.const.numerator, self.const.denominator)

    def __add__(self, other: Exp | Rational) -> Exp:
        if not isinstance(other, Exp):
            return Exp._raw(self.const + q(other), self.coef)
        if not other.coef:
            return Exp._raw(self.const + other.const, self.coef)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            total = coef.get(k, 0) + v
            if total:
                coef[k] = total
            else:
                coef.pop(k, None)
        return Exp._raw(self.const + other.const, coef)

    __radd__ = __add__

    def __neg__(self) -> Exp:
        return Exp._raw(-self.const, {k: -v for k, v in self.coef.items()})

    def __sub__(self, other: Exp | Rational) -> Exp:
        if not isinstance(other, Exp):
            return Exp._raw(self.const - q(other), self.coef)
        if not other.coef:
            return Exp._raw(self.const - other.const, self.coef)
        return self + (-other)

    def __rsub__(self, other: Exp | Rational) -> Exp:
        return _lift(other) - self

    def __mul__(self, k: Rational | Exp) -> Exp:
        if isinstance(k, Exp):
            if not k.is_const():
                raise TypeError("exponents are affine: cannot multiply two symbolic exponents")
            k = k.const
        k = q(k)
        if not k:
            return ZERO
        return Exp._raw(self.const * k, {s: v * k for s, v in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: Rational | Exp) -> Exp:
        k = k.const if isinstance(k, Exp) and k.is_const() else k
        return self * (_ONE_Q / q(k))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int | Fraction | MPQ):
            return not self.coef and self.const == other
        return isinstance(other, Exp) and self.const == other.const and self.coef == other.coef

    def __hash__(self) -> int:
        return hash((self.const, tuple(sorted(self.coef.items()))))

    def subs(self, values: Mapping[str, Exp | Rational]) -> Exp:
        if not self.coef or not any(k in values for k in self.coef):
            return self
        out = Exp._raw(self.const, {k: v for k, v in self.coef.items() if k not in values})
        for k, v in self.coef.items():
            if k in values:
                out = out + _lift(values[k]) * v
        return out

    def coefficient(self, name: str) -> MPQ:
        return self.coef.get(name, _ZERO_Q)

    def __str__(self) -> str:
        """Compact text such as ``-1/2`` or ``1/2*o - i`` (no sympy round-trip: it is on hot paths)."""
        pieces = []
        for name in sorted(self.coef):
            v = self.coef[name]
            head = "-" if v < 0 else "+"
            mag, shown = abs(v), show_symbol(name)
            pieces.append(f"{head} {shown}" if mag == 1 else f"{head} {mag}*{shown}")
        if self.const or not pieces:
            c = self.const
            pieces.append(f"{'-' if c < 0 else '+'} {abs(c)}")
        text = " ".join(pieces)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]

    __repr__ = __str__


def show_symbol(name: str) -> str:
    """A symbol as users read it: ``kind:name`` (the unknown width exponent of hyperparameter ``name``) is ``e(name)``;
    fan and multiplier exponents (``o``, ``i``, ``m``, ...) are shown as they are."""
    return f"e({name.split(':', 1)[1]})" if ":" in name else name


def _lift(value: Exp | Rational) -> Exp:
    return value if isinstance(value, Exp) else Exp(value)


class Signs:
    """Sign assumptions on symbols: every symbol named here is nonnegative (``"0+"``)."""

    def __init__(self, assumptions: Mapping[str, str] | None = None) -> None:
        self.assumptions = dict(assumptions or {})

    def compare(self, a: Exp, b: Exp) -> int:
        """-1, 0 or 1 as ``a`` is smaller than, equal to or larger than ``b`` for all admissible symbols.

        Symbolic differences are settled when every term has one sign given the assumptions. A difference that is
        only weakly signed (zero on a boundary such as fan_in = n^0) counts as strict: the larger side is never
        smaller, so it can stand for the maximum, and structure decisions treat the boundary like the interior.
        """
        diff = a - b
        if diff.is_const():
            return (diff.const > 0) - (diff.const < 0)
        if any(k not in self.assumptions for k in diff.coef):
            raise Undecidable(diff)
        if diff.const >= 0 and all(v > 0 for v in diff.coef.values()):
            return 1
        if diff.const <= 0 and all(v < 0 for v in diff.coef.values()):
            return -1
        raise Undecidable(diff)

    def max(self, *exps: Exp) -> Exp:
        best = exps[0]
        for e in exps[1:]:
            if self.compare(e, best) > 0:
                best = e
        return best

    def min(self, *exps: Exp) -> Exp:
        best = exps[0]
        for e in exps[1:]:
            if self.compare(e, best) < 0:
                best = e
        return best


_ZERO_Q, _ONE_Q = MPQ(0), MPQ(1)
ZERO = Exp(0)
HALF = MPQ(1, 2)
