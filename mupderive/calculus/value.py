"""Scales of tensors at width ``n`` and how every primitive transforms them.

A value is a sum of *parts*, each with a structure and one exponent:

- ``outer``  low-rank and aligned with the batch (gradient-built: ``G = sum_b delta_b x_b^T``); exponent = spectral
  norm = Frobenius norm; acting on a layer input it is a coherent sum (``|M x| = |M|_* |x|``);
- ``dense``  full-rank and independent of the inputs (``W`` at init, Hutchinson noise); exponent = entry RMS;
  ``|M|_* = rms * sqrt(max dim)`` (``rms * sqrt(p q)`` when its entries share a sign: the mean is rank one), and
  acting on an input it is an incoherent sum;
- ``eye``    a multiple of the identity; exponent = eigenvalue;
- ``perp``   a multiple of the identity on the complement of the batch span (what ``(L + eps I)^-p`` leaves
  outside the range of ``L``); it annihilates batch-aligned vectors;
- ``scalar`` a scalar; exponent = magnitude.

Vectors are ``(p x 1)`` matrices. An empty part list is exactly zero. Elementwise functions of a sum are linearised
around the dominant part (``phi(a + b) ~ phi(a) + phi'(a) b``), so subdominant structure survives where it should.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs
from mupderive.errors import CalculusError

Shape = tuple[str, ...]


@dataclass(frozen=True)
class Part:
    """One structured component of a value (see the module docstring for what ``e`` measures per kind)."""

    kind: str
    e: Exp
    nonneg: bool = False  # entries share one sign, so sums over them are coherent
    hypers: frozenset[str] = frozenset()  # hyperparameters this part's scale depends on


@dataclass(frozen=True)
class Value:
    """A quantity of the rule: its shape (dimension tags) and its parts."""

    shape: Shape
    parts: tuple[Part, ...]

    @property
    def is_zero(self) -> bool:
        return not self.parts

    @property
    def nonneg(self) -> bool:
        return all(p.nonneg for p in self.parts)

    @property
    def hypers(self) -> frozenset[str]:
        return frozenset().union(*(p.hypers for p in self.parts))


def scalar(e: Exp, nonneg: bool = False, hypers: frozenset[str] = frozenset()) -> Value:
    return Value((), (Part("scalar", e, nonneg, hypers),))


class Frame:
    """The dimension exponents of one layer plus sign assumptions: knows every norm and primitive rule."""

    def __init__(self, dims: dict[str, Exp], signs: Signs) -> None:
        self.dims = dims
        self.signs = signs
        self._halves: dict[Shape, tuple[Exp, Exp, Exp]] = {}

    # -- norms of one part -------------------------------------------------------------------------------------
    def pq(self, shape: Shape) -> tuple[Exp, Exp]:
        if not shape:
            return ZERO, ZERO
        if len(shape) == 1:
            return self.dims[shape[0]], ZERO
        return self.dims[shape[0]], self.dims[shape[1]]

    def halves(self, shape: Shape) -> tuple[Exp, Exp, Exp]:
        """``(p + q)/2``, ``max(p, q)/2`` and ``p/2`` for a ``p x q`` shape (cached)."""
        cached = self._halves.get(shape)
        if cached is None:
            p, q = self.pq(shape)
            cached = self._halves[shape] = ((p + q) * HALF, self.signs.max(p, q) * HALF, p * HALF)
        return cached

    def part_metric(self, part: Part, shape: Shape, metric: str) -> Exp | None:
        """Exponent of ``metric`` (rms, fro, spec, effect) of one part; None when the part contributes nothing."""
        kind = part.kind
        if kind == "scalar":
            return part.e
        if kind == "outer":
            return part.e - self.halves(shape)[0] if metric == "rms" else part.e
        half_sum, half_max, half_p = self.halves(shape)
        if kind == "dense":
            if metric == "rms":
                return part.e
            if metric == "spec" and part.nonneg:  # its mean is a rank-one part: |mean 1 1^T|_* = rms sqrt(p q)
                return part.e + half_sum
            return part.e + (half_sum if metric == "fro" else half_max if metric == "spec" else half_p)
        # eye / perp: eigenvalue e on a p-dimensional space
        if metric == "effect" and kind == "perp":
            return None
        if metric == "rms":
            return part.e - half_p
        return part.e + half_p if metric == "fro" else part.e

    def metric(self, value: Value, metric: str) -> Exp | None:
        """Exponent of ``metric`` of a value (the largest over its parts); None for zero."""
        exps = [e for part in value.parts if (e := self.part_metric(part, value.shape, metric)) is not None]
        return self.signs.max(*exps) if exps else None

    # -- building blocks ---------------------------------------------------------------------------------------
    def merge(self, shape: Shape, parts: list[Part]) -> Value:
        """Combine parts of equal kind (a sum of same-structure parts scales as the largest)."""
        merged: dict[str, Part] = {}
        for part in parts:
            old = merged.get(part.kind)
            if old is None:
                merged[part.kind] = part
            else:
                merged[part.kind] = Part(part.kind, self.signs.max(old.e, part.e), old.nonneg and part.nonneg,
                                         old.hypers | part.hypers)
        return Value(shape, tuple(merged[k] for k in sorted(merged)))

    def broadcast(self, value: Value, shape: Shape) -> Value:
        """A scalar spread over ``shape``: the constant matrix ``c 1 1^T`` (rank one, like an outer part)."""
        if value.shape == shape or not value.parts:
            return Value(shape, value.parts)
        p, q = self.pq(shape)
        (part,) = value.parts
        return Value(shape, (Part("outer", part.e + (p + q) * HALF, part.nonneg, part.hypers),))

    def scale(self, value: Value, e: Exp, hypers: frozenset[str] = frozenset()) -> Value:
        """Multiply by a scalar of magnitude ``n^e`` (entries keep sharing a sign if they did)."""
        return Value(value.shape, tuple(Part(p.kind, p.e + e, p.nonneg, p.hypers | hypers) for p in value.parts))

    def from_rms(self, kind: str, rms: Exp, shape: Shape, nonneg: bool, hypers: frozenset[str]) -> Part:
        if kind == "outer":
            p, q = self.pq(shape)
            return Part("outer", rms + (p + q) * HALF, nonneg, hypers)
        return Part(kind, rms, nonneg, hypers)

    # -- elementwise -------------------------------------------------------------------------------------------
    def add(self, a: Value, b: Value, negate: bool = False) -> Value:
        shape = a.shape or b.shape
        a, b = self.broadcast(a, shape), self.broadcast(b, shape)
        parts = list(a.parts) + list(b.parts)
        if negate:
            parts = [replace(p, nonneg=False) for p in parts]
        return self.merge(shape, parts)

    def neg(self, a: Value) -> Value:
        return Value(a.shape, tuple(replace(p, nonneg=False) for p in a.parts))

    def _elementwise_parts(self, value: Value, what: str) -> None:
        for part in value.parts:
            if part.kind in ("eye", "perp"):
                raise CalculusError(f"{what} of an identity-like matrix cannot be bounded elementwise")

    def mul(self, a: Value, b: Value) -> Value:
        """Elementwise product."""
        if a.is_zero or b.is_zero:
            return Value(a.shape or b.shape, ())
        if not a.shape or not b.shape:
            s, v = (a, b) if not a.shape else (b, a)
            (part,) = s.parts
            return self.scale(v, part.e, part.hypers)
        self._elementwise_parts(a, "a product")
        self._elementwise_parts(b, "a product")
        shape = a.shape
        parts = []
        for x in a.parts:
            for y in b.parts:
                rms = self.part_metric(x, shape, "rms") + self.part_metric(y, shape, "rms")
                nonneg, hypers = x.nonneg and y.nonneg, x.hypers | y.hypers
                kinds = {x.kind, y.kind}
                if kinds == {"outer"}:
                    parts.append(self.from_rms("outer", rms, shape, nonneg, hypers))
                elif kinds == {"outer", "dense"} and (y if x.kind == "outer" else x).nonneg:
                    # outer * (positive dense) = outer * mean + outer * fluctuation
                    parts.append(self.from_rms("outer", rms, shape, nonneg, hypers))
                    parts.append(Part("dense", rms, nonneg, hypers))
                else:
                    parts.append(Part("dense", rms, nonneg, hypers))
        return self.merge(shape, parts)

    def power(self, a: Value, degree: Fraction, parity: str) -> Value:
        """An elementwise function homogeneous of ``degree``; parity ``odd``, ``even`` or ``pos`` (of a magnitude)."""
        if a.is_zero:
            if degree <= 0:
                raise CalculusError("a non-positive power of an exactly-zero quantity")
            return a
        if not a.shape:
            (part,) = a.parts
            return scalar(part.e * degree, parity != "odd" or part.nonneg, part.hypers)
        self._elementwise_parts(a, "an elementwise function")
        shape = a.shape
        rms = {id(p): self.part_metric(p, shape, "rms") for p in a.parts}
        top = self.signs.max(*rms.values())
        signed_dense_on_top = any(p.kind == "dense" and not p.nonneg and self.signs.compare(rms[id(p)], top) == 0
                                  for p in a.parts)
        parts = []
        for p in a.parts:
            new_rms = rms[id(p)] + top * (degree - 1)
            kind = p.kind
            if kind == "outer" and parity == "even" and signed_dense_on_top and self.signs.compare(rms[id(p)], top) < 0:
                kind = "dense"  # phi'(signed noise) has random sign: the aligned part loses its coherence
            nonneg = parity != "odd" or a.nonneg
            parts.append(self.from_rms(kind, new_rms, shape, nonneg, p.hypers))
        return self.merge(shape, parts)

    def dominance(self, a: Value, b: Value) -> int:
        """+1 if ``a``'s entries dominate ``b``'s, -1 if ``b``'s do, 0 if they are of the same order."""
        if a.is_zero or b.is_zero:
            return (not a.is_zero) - (not b.is_zero)
        shape = a.shape or b.shape
        return self.signs.compare(self.metric(self.broadcast(a, shape), "rms"),
                                  self.metric(self.broadcast(b, shape), "rms"))

    def maximum(self, a: Value, b: Value) -> Value:
        """Elementwise max: the larger magnitude wins; equal orders mix; a nonnegative operand makes it nonnegative."""
        order = self.dominance(a, b)
        shape = a.shape or b.shape
        out = self.broadcast(a, shape) if order > 0 else self.broadcast(b, shape) if order < 0 else self.add(a, b)
        return Value(out.shape, tuple(replace(p, nonneg=a.nonneg or b.nonneg) for p in out.parts))

    def minimum(self, a: Value, b: Value) -> Value:
        """Elementwise min of magnitudes: the smaller wins; equal orders mix."""
        order = self.dominance(a, b)
        shape = a.shape or b.shape
        if order < 0:
            return self.broadcast(a, shape)
        if order > 0:
            return self.broadcast(b, shape)
        return self.add(a, b)

    def clip(self, x: Value, bound: Value) -> Value:
        """``clip(x, -c, c)``: ``x`` where ``|x| << c``, ``c sign(x)`` where ``|x| >> c``, a mix at equal order."""
        if bound.is_zero:
            return Value(x.shape, ())
        order = self.dominance(x, bound)
        if order < 0:
            return x
        saturated = self.mul(self.power(x, Fraction(0), "odd"), bound)
        return saturated if order > 0 else self.add(x, saturated)

    # -- linear algebra ----------------------------------------------------------------------------------------
    def transpose(self, a: Value) -> Value:
        return Value(a.shape[::-1], a.parts)

    def matmul(self, a: Value, b: Value, shape: Shape) -> Value:
        parts = []
        for x in a.parts:
            for y in b.parts:
                part = self._matmul_part(x, y, a.shape, b.shape)
                if part is not None:
                    parts.append(part)
        return self.merge(shape, parts)

    def _matmul_part(self, x: Part, y: Part, xs: Shape, ys: Shape) -> Part | None:
        hypers = x.hypers | y.hypers
        if x.kind == "eye":
            return Part(y.kind, y.e + x.e, False, hypers)
        if y.kind == "eye":
            return Part(x.kind, x.e + y.e, False, hypers)
        if {x.kind, y.kind} == {"perp", "outer"}:
            return None  # the complement of the batch span meets batch-aligned vectors in zero
        if x.kind == y.kind == "perp":
            return Part("perp", x.e + y.e, False, hypers)
        if x.kind == y.kind == "outer":
            return Part("outer", x.e + y.e, False, hypers)
        if "perp" in (x.kind, y.kind) and "dense" in (x.kind, y.kind):
            dense = x if x.kind == "dense" else y
            other = y if dense is x else x
            return Part("dense", dense.e + other.e, False, hypers)
        raise CalculusError(f"cannot bound a matrix product of a {x.kind} and a {y.kind} (weight-like) matrix")

    def matpow(self, a: Value, p: Fraction) -> Value:
        """``A^p`` for symmetric PSD ``A``: acts on the spectrum inside and outside the batch span separately."""
        kinds = {part.kind for part in a.parts}
        if "dense" in kinds or "scalar" in kinds:
            raise CalculusError("matpow() of a matrix that is not built from the batch and the identity")
        hypers = a.hypers
        inside = [part.e for part in a.parts if part.kind in ("outer", "eye")]
        outside = [part.e for part in a.parts if part.kind in ("eye", "perp")]
        if not inside:
            raise CalculusError("matpow() of an exactly-zero matrix")
        parts = []
        if "outer" in kinds:
            parts.append(Part("outer", self.signs.max(*inside) * p, True, hypers))
        if outside:
            parts.append(Part("perp" if "outer" in kinds else "eye", self.signs.max(*outside) * p, True, hypers))
        elif p < 0:
            raise CalculusError("negative matpow() of a low-rank matrix without damping (add eps * eye(A))")
        return self.merge(a.shape, parts)

    def orthogonalize(self, a: Value) -> Value:
        """Polar factor: every nonzero singular value becomes 1."""
        if a.is_zero:
            return a
        p, q = self.pq(a.shape)
        parts = []
        for part in a.parts:
            if part.kind == "outer":
                parts.append(Part("outer", ZERO, False, part.hypers))
            elif part.kind == "dense":
                parts.append(Part("dense", -self.signs.max(p, q) * HALF, False, part.hypers))
            else:
                parts.append(Part("eye", ZERO, True, part.hypers))
        return self.merge(a.shape, parts)

    def norm(self, a: Value, metric: str) -> Value:
        """A norm as a scalar: ``fro``, ``spec`` or ``rms``; ``mean`` needs nonnegative entries."""
        if metric == "mean":
            if not a.nonneg:
                raise CalculusError("mean() of a quantity that can be negative: its size depends on the data's mean")
            metric = "rms"
        e = self.metric(a, metric)
        if e is None:
            return Value((), ())
        return scalar(e, True, a.hypers)

    def axis_mean(self, a: Value, axis: int) -> Value:
        """row_mean (axis 1, over fan_in) or col_mean (axis 0, over fan_out) of a nonnegative matrix."""
        if not a.nonneg:
            raise CalculusError("row/col mean of a quantity that can be negative: its size depends on the data")
        shape = (a.shape[0],) if axis == 1 else (a.shape[1],)
        parts = []
        for part in a.parts:
            rms = self.part_metric(part, a.shape, "rms")
            kind = "outer" if part.kind == "outer" else "dense"
            parts.append(self.from_rms(kind, rms, shape, True, part.hypers))
        return self.merge(shape, parts)

    def outer(self, u: Value, v: Value) -> Value:
        shape = u.shape + v.shape
        parts = []
        for x in u.parts:
            for y in v.parts:
                hypers, nonneg = x.hypers | y.hypers, x.nonneg and y.nonneg
                if x.kind == y.kind == "outer":
                    parts.append(Part("outer", x.e + y.e, nonneg, hypers))
                else:
                    rms = self.part_metric(x, u.shape, "rms") + self.part_metric(y, v.shape, "rms")
                    parts.append(Part("dense", rms, nonneg, hypers))
        return self.merge(shape, parts)


def describe(frame: Frame, value: Value) -> str:
    """One-line summary: structure and the exponents of rms and spectral norm."""
    if value.is_zero:
        return "0"
    if not value.shape:
        return f"scalar n^{frame.metric(value, 'rms')}"
    names = {"outer": "low-rank/aligned", "dense": "dense", "eye": "identity", "perp": "identity off the batch span"}
    kinds = "+".join(names[p.kind] for p in value.parts)
    return f"{kinds}: rms n^{frame.metric(value, 'rms')}, spectral n^{frame.metric(value, 'spec')}"
