"""Width exponents: exact affine forms ``c0 + sum_k c_k s_k`` with rational coefficients.

Every quantity the calculus tracks scales as ``n^e`` with ``e`` affine in a few symbols: the fan exponents ``o``
and ``i``, the forward-multiplier exponent ``m``, and the unknown exponents of hyperparameters. Coefficients are
:class:`fractions.Fraction` (exact); :meth:`Exp.sympy` converts to sympy at the output boundary. Deciding which of
two exponents is larger uses sign assumptions on the symbols; when they do not settle it, :class:`Undecidable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import sympy


class Undecidable(Exception):
    """The order of two exponents depends on symbols whose signs are not known."""

    def __init__(self, diff: Exp) -> None:
        super().__init__(f"sign of {diff} is not determined")
        self.diff = diff


class Exp:
    """An exact affine exponent. Immutable; supports ``+``, ``-``, scaling by rationals, substitution."""

    __slots__ = ("const", "coef")

    def __init__(self, const: Fraction | int = 0, coef: Mapping[str, Fraction] | None = None) -> None:
        self.const = Fraction(const)
        self.coef: dict[str, Fraction] = {k: Fraction(v) for k, v in (coef or {}).items() if v != 0}

    @staticmethod
    def sym(name: str) -> Exp:
        return Exp(0, {name: Fraction(1)})

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(self.coef)

    def is_const(self) -> bool:
        return not self.coef

    def __add__(self, other: Exp | Fraction | int) -> Exp:
        other = _lift(other)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            coef[k] = coef.get(k, Fraction(0)) + v
        return Exp(self.const + other.const, coef)

    __radd__ = __add__

    def __neg__(self) -> Exp:
        return Exp(-self.const, {k: -v for k, v in self.coef.items()})

    def __sub__(self, other: Exp | Fraction | int) -> Exp:
        return self + (-_lift(other))

    def __rsub__(self, other: Exp | Fraction | int) -> Exp:
        return _lift(other) - self

    def __mul__(self, k: Fraction | int) -> Exp:
        if isinstance(k, Exp):
            if not k.is_const():
                raise TypeError("exponents are affine: cannot multiply two symbolic exponents")
            k = k.const
        k = Fraction(k)
        return Exp(self.const * k, {s: v * k for s, v in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: Fraction | int) -> Exp:
        return self * (1 / Fraction(k))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int | Fraction):
            other = Exp(other)
        return isinstance(other, Exp) and self.const == other.const and self.coef == other.coef

    def __hash__(self) -> int:
        return hash((self.const, tuple(sorted(self.coef.items()))))

    def subs(self, values: Mapping[str, Exp | Fraction | int]) -> Exp:
        out = Exp(self.const, {k: v for k, v in self.coef.items() if k not in values})
        for k, v in self.coef.items():
            if k in values:
                out = out + _lift(values[k]) * v
        return out

    def coefficient(self, name: str) -> Fraction:
        return self.coef.get(name, Fraction(0))

    def sympy(self, symbols: Mapping[str, sympy.Expr] | None = None) -> sympy.Expr:
        """This exponent as an exact sympy expression (Rational when constant)."""
        symbols = symbols or {}
        out: sympy.Expr = sympy.Rational(self.const.numerator, self.const.denominator)
        for k in sorted(self.coef):
            v = self.coef[k]
            out += sympy.Rational(v.numerator, v.denominator) * symbols.get(k, sympy.Symbol(k))
        return out

    def __str__(self) -> str:
        return str(self.sympy())

    __repr__ = __str__


def _lift(value: Exp | Fraction | int) -> Exp:
    return value if isinstance(value, Exp) else Exp(value)


class Signs:
    """Sign assumptions on symbols: each known symbol is ``+`` (positive) or ``0+`` (nonnegative)."""

    def __init__(self, assumptions: Mapping[str, str] | None = None) -> None:
        self.assumptions = dict(assumptions or {})

    def compare(self, a: Exp, b: Exp) -> int:
        """-1, 0 or 1 as ``a`` is smaller than, equal to or larger than ``b`` for all admissible symbols."""
        diff = a - b
        if diff.is_const():
            return (diff.const > 0) - (diff.const < 0)
        kinds = [self.assumptions.get(k) for k in diff.coef]
        if None in kinds:
            raise Undecidable(diff)
        if diff.const >= 0 and all(v > 0 for v in diff.coef.values()):
            if diff.const > 0 or any(kind == "+" for kind in kinds):
                return 1
        if diff.const <= 0 and all(v < 0 for v in diff.coef.values()):
            if diff.const < 0 or any(kind == "+" for kind in kinds):
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


ZERO = Exp(0)
HALF = Fraction(1, 2)
