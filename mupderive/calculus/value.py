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
- ``scalar`` a scalar; exponent = magnitude;
- ``basis``  an orthonormal basis (eigen- or singular vectors of a matrix built from the batch and the identity, as
  columns); exponent 0. Its ``local`` axis is the one indexing basis vectors.

A matrix part may be *local* on some axes: written in the coordinates of such a basis (``Q_L^T G Q_R``), where a
batch-aligned quantity occupies the O(1) leading coordinates instead of being spread over the whole axis. Norms are
those of the part (a rotation preserves them); its nonzero entries are ``|X|_F`` spread over the nonlocal axes only,
and elementwise functions act on them there and leave the rest of the matrix zero (``entry`` metric). Rotating back
(``Q_L X Q_R^T``) makes it batch-aligned again.

Vectors are ``(p x 1)`` matrices. An empty part list is exactly zero. Elementwise functions of a sum are linearised
around the dominant part (``phi(a + b) ~ phi(a) + phi'(a) b``), so subdominant structure survives where it should.

Exponents are exact; a part also records a power of ``log n`` that multiplies its scale. One rule makes such a
factor: the mean of ``1/|w|`` over dense noise ``w`` of scale ``s`` whose entries are cut off near zero at a floor
``f << s`` is ``(2 phi(0) / s) ln(s/f)``, a log n when ``s/f`` is a power of n. A low-rank part multiplied by it
(RMSprop's ``G / |g|`` when coupled weight decay ``wd W`` dominates ``g = G + wd W``) inherits the factor. Logs never
decide a comparison (the solver sees exponents only); they widen what a measurement of the part may show.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs, Undecidable
from mupderive.errors import CalculusError

Shape = tuple[str, ...]


@dataclass(frozen=True)
class Part:
    """One structured component of a value (see the module docstring for what ``e`` measures per kind)."""

    kind: str
    e: Exp
    nonneg: bool = False  # entries share one sign, so sums over them are coherent
    hypers: frozenset[str] = frozenset()  # hyperparameters this part's scale depends on
    log: Fraction = Fraction(0)  # the scale carries (log n)^log
    zeros: bool = False  # nonnegative dense: a magnitude of noise, with mass near zero ...
    floor: Exp | None = None  # ... down to this entry scale (None: no floor known)
    mean_log: Fraction = Fraction(0)  # nonnegative dense: its mean exceeds its rms scale by (log n)^mean_log
    local: frozenset[int] = frozenset()  # axes written in a basis' coordinates (see the module docstring)
    off: bool = False  # a spread part that lives off the local parts' coordinates only (phi of a local sum)


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


def scalar(e: Exp, nonneg: bool = False, hypers: frozenset[str] = frozenset(), log: Fraction = Fraction(0)) -> Value:
    return Value((), (Part("scalar", e, nonneg, hypers, log),))


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
        if kind == "basis":
            raise CalculusError("a basis from eigbasis()/left_singular()/right_singular() enters only through @")
        if metric == "entry":
            return self.entry(part, shape)
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

    def entry(self, part: Part, shape: Shape) -> Exp:
        """Exponent of a part's typical nonzero entry: its rms, except where it is local (an outer part written in a
        basis has ``|X|_F`` spread over its nonlocal axes only) and for eye/perp (the eigenvalue on the diagonal)."""
        if part.kind == "outer":
            dims = [d for axis, d in enumerate(self.pq(shape)[:len(shape)]) if axis not in part.local]
            return part.e - sum(dims, ZERO) * HALF
        if part.kind in ("eye", "perp"):
            return part.e
        return part.e

    def metric(self, value: Value, metric: str) -> Exp | None:
        """Exponent of ``metric`` of a value (the largest over its parts); None for zero."""
        exps = [e for part in value.parts if (e := self.part_metric(part, value.shape, metric)) is not None]
        return self.signs.max(*exps) if exps else None

    def metric_log(self, value: Value, metric: str) -> Fraction:
        """The power of log n on ``metric`` of a value: the largest among the parts that attain its exponent."""
        top = self.metric(value, metric)
        logs = [p.log for p in value.parts
                if (e := self.part_metric(p, value.shape, metric)) is not None and self._order(e, top) == 0]
        return max(logs, default=Fraction(0))

    # Log factors and floors are bookkeeping for measurements: where symbols leave an order open they are dropped,
    # so they never raise Undecidable, which the solver reads as a case to split.
    def _order(self, a: Exp, b: Exp) -> int | None:
        try:
            return self.signs.compare(a, b)
        except Undecidable:
            return None

    def _largest(self, exps: list[Exp]) -> Exp | None:
        try:
            return self.signs.max(*exps) if exps else None
        except Undecidable:
            return None

    # -- building blocks ---------------------------------------------------------------------------------------
    def merge(self, shape: Shape, parts: list[Part]) -> Value:
        """Combine parts of equal kind (a sum of same-structure parts scales as the largest)."""
        merged: dict[tuple[str, tuple[int, ...]], Part] = {}
        for part in parts:
            key = (part.kind, tuple(sorted(part.local)), part.off)
            old = merged.get(key)
            merged[key] = part if old is None else self._merge_two(old, part)
        return Value(shape, tuple(merged[k] for k in sorted(merged)))

    def _merge_two(self, a: Part, b: Part) -> Part:
        """The sum of two parts of one kind: the larger's scale and log; mass near zero only if the larger has it,
        cut off at the largest floor, which a smaller part without mass near zero raises to its own scale."""
        order = self.signs.compare(a.e, b.e)
        top, low = (a, b) if order >= 0 else (b, a)
        log = max(a.log, b.log) if order == 0 else top.log
        zeros = top.zeros and (low.zeros or order != 0)
        floors = [f for f in (top.floor, low.floor if low.zeros else low.e) if f is not None]
        floor = self._largest(floors) if zeros else None
        zeros = zeros and not (floors and floor is None)  # an open order: forget the mass near zero
        return Part(a.kind, top.e, a.nonneg and b.nonneg, a.hypers | b.hypers, log, zeros, floor,
                    max(a.mean_log, b.mean_log) if order == 0 else top.mean_log, a.local, a.off)

    def broadcast(self, value: Value, shape: Shape) -> Value:
        """A scalar spread over ``shape``: the constant matrix ``c 1 1^T`` (rank one, like an outer part)."""
        if value.shape == shape or not value.parts:
            return Value(shape, value.parts)
        p, q = self.pq(shape)
        (part,) = value.parts
        return Value(shape, (Part("outer", part.e + (p + q) * HALF, part.nonneg, part.hypers, part.log),))

    def scale(self, value: Value, e: Exp, hypers: frozenset[str] = frozenset(), log: Fraction = Fraction(0)) -> Value:
        """Multiply by a scalar of magnitude ``n^e (log n)^log`` (entries keep sharing a sign if they did)."""
        return Value(value.shape, tuple(replace(p, e=p.e + e, hypers=p.hypers | hypers, log=p.log + log,
                                                floor=None if p.floor is None else p.floor + e) for p in value.parts))

    def from_rms(self, kind: str, rms: Exp, shape: Shape, nonneg: bool, hypers: frozenset[str],
                 log: Fraction = Fraction(0)) -> Part:
        if kind == "outer":
            p, q = self.pq(shape)
            return Part("outer", rms + (p + q) * HALF, nonneg, hypers, log)
        return Part(kind, rms, nonneg, hypers, log)

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
            if part.kind == "basis":
                raise CalculusError(f"{what} of a basis (eigbasis/left_singular/right_singular): bases enter only "
                                    f"through @")

    def mul(self, a: Value, b: Value) -> Value:
        """Elementwise product."""
        if a.is_zero or b.is_zero:
            return Value(a.shape or b.shape, ())
        if not a.shape or not b.shape:
            s, v = (a, b) if not a.shape else (b, a)
            (part,) = s.parts
            return self.scale(v, part.e, part.hypers, part.log)
        self._elementwise_parts(a, "a product")
        self._elementwise_parts(b, "a product")
        shape = a.shape
        parts = []
        for x in a.parts:
            for y in b.parts:
                rms = self.part_metric(x, shape, "rms") + self.part_metric(y, shape, "rms")
                nonneg, hypers, log = x.nonneg and y.nonneg, x.hypers | y.hypers, x.log + y.log
                kinds = {x.kind, y.kind}
                if x.local or y.local:
                    if not (x.off or y.off):  # a part off the local coordinates meets a local one nowhere
                        parts.append(self._local_product(x, y, shape, nonneg, hypers, log))
                elif kinds == {"outer"}:
                    parts.append(self.from_rms("outer", rms, shape, nonneg, hypers, log))
                elif kinds == {"outer", "dense"} and (dense := y if x.kind == "outer" else x).nonneg:
                    # outer * (positive dense) = outer * mean + outer * fluctuation
                    parts.append(self.from_rms("outer", rms, shape, nonneg, hypers, log + dense.mean_log))
                    parts.append(Part("dense", rms, nonneg, hypers, log))
                else:
                    parts.append(Part("dense", rms, nonneg, hypers, log))
        return self.merge(shape, parts)

    def _local_product(self, x: Part, y: Part, shape: Shape, nonneg: bool, hypers: frozenset[str],
                       log: Fraction) -> Part:
        """Elementwise product with a local part: it lives on the local part's O(1) leading coordinates, where the
        other factor's entries are its typical entries (both local: the same coordinates, entries multiply)."""
        if x.local and y.local and x.local != y.local:
            raise CalculusError("an elementwise product of quantities written in different bases")
        local = x if x.local else y
        other = y if local is x else x
        entry = self.entry(local, shape) + self.part_metric(other, shape, "entry")
        return self._from_entry(entry, local.local, shape, nonneg, hypers, log)

    def _from_entry(self, entry: Exp, local: frozenset[int], shape: Shape, nonneg: bool, hypers: frozenset[str],
                    log: Fraction) -> Part:
        """The local outer part whose nonzero entries are ``n^entry``."""
        dims = [d for axis, d in enumerate(self.pq(shape)[:len(shape)]) if axis not in local]
        return Part("outer", entry + sum(dims, ZERO) * HALF, nonneg, hypers, log, local=local)

    def power(self, a: Value, degree: Fraction, parity: str) -> Value:
        """An elementwise function homogeneous of ``degree``; parity ``odd``, ``even`` or ``pos`` (of a magnitude)."""
        if a.is_zero:
            if degree <= 0:
                raise CalculusError("a non-positive power of an exactly-zero quantity")
            return a
        log_degree = Fraction(int(degree.numerator), int(degree.denominator))
        if not a.shape:
            (part,) = a.parts
            return scalar(part.e * degree, parity != "odd" or part.nonneg, part.hypers, part.log * log_degree)
        self._elementwise_parts(a, "an elementwise function")
        shape = a.shape
        local = [p for p in a.parts if p.local]
        if local:
            return self._local_power(a, local, degree, parity)
        rms = {id(p): self.part_metric(p, shape, "rms") for p in a.parts}
        top = self.signs.max(*rms.values())
        on_top = {id(p): self.signs.compare(rms[id(p)], top) == 0 for p in a.parts}
        signed_dense_on_top = any(p.kind == "dense" and not p.nonneg and on_top[id(p)] for p in a.parts)
        parts = []
        for p in a.parts:
            new_rms = rms[id(p)] + top * (degree - 1)
            kind = p.kind
            if kind == "outer" and parity == "even" and signed_dense_on_top and not on_top[id(p)]:
                kind = "dense"  # phi'(signed noise) has random sign: the aligned part loses its coherence
            nonneg = parity != "odd" or a.nonneg
            part = self.from_rms(kind, new_rms, shape, nonneg, p.hypers, p.log * log_degree)
            if part.kind == "dense" and part.nonneg and degree != 0:
                others = [rms[id(q)] for q in a.parts if q is not p]
                part = self._near_zero(part, p, on_top[id(p)], others, degree)
            parts.append(part)
        return self.merge(shape, parts)

    def _local_power(self, a: Value, local: list[Part], degree: Fraction, parity: str) -> Value:
        """``phi`` of a value with local parts, on two supports: the local parts' leading coordinates, where the
        largest entry there (theirs or the spread parts') is linearised around, and the rest of the matrix, where
        only the spread parts are (and are mapped as usual)."""
        shape = a.shape
        if len({p.local for p in local}) > 1:
            raise CalculusError("an elementwise function of a sum of quantities written in different bases")
        spread = Value(shape, tuple(p for p in a.parts if not p.local))
        entries = [self.entry(p, shape) for p in a.parts]
        top = self.signs.max(*entries)
        nonneg = parity != "odd" or a.nonneg
        axes = local[0].local  # on those coordinates every part contributes phi'(top) part (phi(top) for the top)
        parts = [self._from_entry(self.entry(p, shape) + top * (degree - 1), axes, shape, nonneg, p.hypers,
                                  p.log * Fraction(int(degree.numerator), int(degree.denominator)))
                 for p in a.parts if not p.off]
        if spread.parts:  # on the local coordinates the local parts above stand for phi of the whole sum
            parts.extend(replace(p, off=True) for p in self.power(spread, degree, parity).parts)
        return self.merge(shape, parts)

    def _near_zero(self, new: Part, old: Part, top: bool, others: list[Exp], degree: Fraction) -> Part:
        """Mass near zero of ``|x|^degree`` (dense, nonnegative) made from part ``old`` of ``x``.

        A magnitude of signed noise, or of a sum whose dominant noise is signed, has entries near zero down to the
        floor the other parts set: an average over steps of ``(w + G_t)^2`` stays above the spread of ``G_t``, of
        the order of ``G`` when batches differ; positive powers keep the floor (scaled by the degree). The
        reciprocal's mean is then ``ln(scale/floor)`` times its scale: a log n when the floor is a power of n
        smaller (no floor known: counted as such).
        """
        signed = old.kind == "dense" and not old.nonneg
        if not top:
            return replace(new, zeros=True)  # a correction phi'(w) p to the dominant part (2 w G): it vanishes with w
        if not (signed or old.zeros):
            return new
        floors = [f for f in [old.floor, *others] if f is not None]
        floor = self._largest(floors)
        if floors and floor is None:
            return new  # the floor's order is open: forget the mass near zero rather than guess
        if degree > 0:
            return replace(new, zeros=True, floor=None if floor is None else floor * degree)
        if degree == -1 and (floor is None or self._order(floor, old.e) == -1):
            return replace(new, mean_log=Fraction(1))
        return new

    def dominance(self, a: Value, b: Value) -> int:
        """+1 if ``a``'s entries dominate ``b``'s, -1 if ``b``'s do, 0 if they are of the same order."""
        if a.is_zero or b.is_zero:
            return (not a.is_zero) - (not b.is_zero)
        shape = a.shape or b.shape
        return self.signs.compare(self.metric(self.broadcast(a, shape), "entry"),
                                  self.metric(self.broadcast(b, shape), "entry"))

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
        if len(a.shape) < 2:
            return Value(a.shape[::-1], a.parts)
        return Value(a.shape[::-1], tuple(replace(p, local=frozenset(1 - x for x in p.local)) for p in a.parts))

    def matmul(self, a: Value, b: Value, shape: Shape) -> Value:
        parts = []
        for x in a.parts:
            for y in b.parts:
                part = self._matmul_part(x, y, a.shape, b.shape)
                if part is not None:
                    parts.append(part)
        return self.merge(shape, parts)

    def _matmul_part(self, x: Part, y: Part, xs: Shape, ys: Shape) -> Part | None:
        hypers, log = x.hypers | y.hypers, x.log + y.log
        if "basis" in (x.kind, y.kind) or x.local or y.local:
            return self._rotate(x, y, len(xs), len(ys))
        if x.kind == "eye":
            return Part(y.kind, y.e + x.e, False, hypers, log)
        if y.kind == "eye":
            return Part(x.kind, x.e + y.e, False, hypers, log)
        if {x.kind, y.kind} == {"perp", "outer"}:
            return None  # the complement of the batch span meets batch-aligned vectors in zero
        if x.kind == y.kind == "perp":
            return Part("perp", x.e + y.e, False, hypers, log)
        if x.kind == y.kind == "outer":
            return Part("outer", x.e + y.e, False, hypers, log)
        if "perp" in (x.kind, y.kind) and "dense" in (x.kind, y.kind):
            dense = x if x.kind == "dense" else y
            other = y if dense is x else x
            return Part("dense", dense.e + other.e, False, hypers, log)
        raise CalculusError(f"cannot bound a matrix product of a {x.kind} and a {y.kind} (weight-like) matrix")

    def _rotate(self, x: Part, y: Part, xdim: int, ydim: int) -> Part:
        """A product with a basis ``Q`` (its local axis indexes the basis vectors). ``Q^T X`` and ``X Q`` write a
        side of ``X`` in the basis: a batch-aligned (outer) ``X`` becomes local there, dense noise stays dense (a
        rotation of iid noise is iid noise); ``Q Y`` and ``Y Q^T`` rotate a local side back, where ``Y`` is
        batch-aligned again. Norms are preserved either way (the basis is orthonormal)."""
        hypers, log = x.hypers | y.hypers, x.log + y.log
        if (x.kind == "basis") == (y.kind == "basis"):
            raise CalculusError("a product of two bases, or of a rotated quantity with an unrotated one: rotate one "
                                "quantity at a time, Q.T @ X @ Q, and back, Q @ Y @ Q.T")
        if x.kind == "basis":
            other, touched, into = y, 0, 0 in x.local  # Q^T @ Y rotates Y's rows in; Q @ Y rotates them back
            kept = {1} & other.local if ydim == 2 else set()
            out_axis = 0
        else:
            other, touched, into = x, xdim - 1, 1 in y.local  # X @ Q rotates X's columns in; X @ Q^T back
            kept = {0} & other.local if xdim == 2 else set()
            out_axis = xdim - 1
        if other.kind not in ("outer", "dense"):
            raise CalculusError(f"a basis applied to a {other.kind} matrix: rotate batch-built or dense quantities")
        if other.kind == "dense":
            return Part("dense", other.e, False, hypers, log)
        if into and touched in other.local:
            raise CalculusError("rotating a side that is already written in a basis")
        if not into and touched not in other.local:
            raise CalculusError("a basis applied to a side that is not in its coordinates (Q.T @ X rotates into "
                                "the basis, Q @ Y back)")
        return Part("outer", other.e, False, hypers, log, local=frozenset(kept | ({out_axis} if into else set())))

    def basis(self, a: Value, shape: Shape) -> Value:
        """Eigenvectors of a symmetric ``A`` or singular vectors of ``X`` as the columns of ``shape``: for a matrix
        built from the batch and the identity, the leading ones span the batch span and the rest complete it."""
        if a.is_zero:
            raise CalculusError("the eigen/singular basis of an exactly-zero matrix is arbitrary")
        for part in a.parts:
            if part.kind not in ("outer", "eye", "perp") or part.local:
                raise CalculusError(f"the basis of a matrix with a {part.kind if not part.local else 'rotated'} "
                                    f"part: its vectors are not aligned with the batch")
        return Value(shape, (Part("basis", ZERO, local=frozenset({1})),))

    def matpow(self, a: Value, p: Fraction) -> Value:
        """``A^p`` for symmetric PSD ``A``: acts on the spectrum inside and outside the batch span separately."""
        kinds = {part.kind for part in a.parts}
        if any(part.local for part in a.parts):
            raise CalculusError("matpow() of a matrix written in a basis' coordinates: rotate it back first")
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
            if part.kind == "outer":  # the polar factor commutes with rotations: a local part stays local
                parts.append(Part("outer", ZERO, False, part.hypers, local=part.local))
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
        return scalar(e, True, a.hypers, self.metric_log(a, metric))

    def entry_sum(self, a: Value) -> Value:
        """``sum(x)`` of a nonnegative ``x``: its mean times its number of entries, ``n^{rms + p + q}``."""
        if not a.nonneg:
            raise CalculusError("sum() of a quantity that can be negative: its size depends on how its signs cancel "
                                "(sum(abs(x)) or dot(a, b) state it)")
        p, q = self.pq(a.shape)
        return self.scale(self.norm(a, "mean"), p + q)

    def dot(self, a: Value, b: Value) -> Value:
        """``<a, b> = sum(a * b)``: ``|a|_F |b|_F`` between batch-built (outer) parts, which share the batch's
        directions and add coherently, and between parts of one sign; ``|a|_F |b|_F / sqrt(pq)`` (an incoherent sum
        of ``pq`` products) otherwise."""
        shape = a.shape
        sizes = []
        for x in a.parts:
            for y in b.parts:
                for part in (x, y):
                    if part.kind not in ("outer", "dense") or part.local:
                        raise CalculusError("dot() of an identity-like, basis or rotated quantity cannot be bounded")
                e = self.part_metric(x, shape, "fro") + self.part_metric(y, shape, "fro")
                coherent = {x.kind, y.kind} == {"outer"} or (x.nonneg and y.nonneg)
                sizes.append((e if coherent else e - self.halves(shape)[0], x.hypers | y.hypers, x.log + y.log))
        if not sizes:
            return Value((), ())
        e = self.signs.max(*(s[0] for s in sizes))
        top = [s for s in sizes if s[0] == e] or sizes
        return scalar(e, False, frozenset().union(*(s[1] for s in sizes)), max(s[2] for s in top))

    def axis_mean(self, a: Value, axis: int) -> Value:
        """row_mean (axis 1, over fan_in) or col_mean (axis 0, over fan_out) of a nonnegative matrix."""
        if not a.nonneg:
            raise CalculusError("row/col mean of a quantity that can be negative: its size depends on the data")
        if any(part.local for part in a.parts):
            raise CalculusError("row/col mean of a matrix written in a basis' coordinates")
        shape = (a.shape[0],) if axis == 1 else (a.shape[1],)
        parts = []
        for part in a.parts:
            rms = self.part_metric(part, a.shape, "rms")
            kind = "outer" if part.kind == "outer" else "dense"
            parts.append(self.from_rms(kind, rms, shape, True, part.hypers, part.log))
        return self.merge(shape, parts)

    def outer(self, u: Value, v: Value) -> Value:
        shape = u.shape + v.shape
        if any(part.local for part in u.parts + v.parts):
            raise CalculusError("outer() of vectors written in a basis' coordinates")
        parts = []
        for x in u.parts:
            for y in v.parts:
                hypers, nonneg, log = x.hypers | y.hypers, x.nonneg and y.nonneg, x.log + y.log
                if x.kind == y.kind == "outer":
                    parts.append(Part("outer", x.e + y.e, nonneg, hypers, log))
                else:
                    rms = self.part_metric(x, u.shape, "rms") + self.part_metric(y, v.shape, "rms")
                    parts.append(Part("dense", rms, nonneg, hypers, log))
        return self.merge(shape, parts)


def describe(frame: Frame, value: Value, v: str = "n") -> str:
    """One-line summary: structure and the exponents (of the scaling variable ``v``) of rms and spectral norm."""
    if value.is_zero:
        return "0"
    if not value.shape:
        return f"scalar {v}^{frame.metric(value, 'rms')}"
    names = {"outer": "low-rank/aligned", "dense": "dense", "eye": "identity", "perp": "identity off the batch span",
             "basis": "orthonormal basis"}
    kinds = "+".join(names[p.kind] + (" (in a basis)" if p.local else "") for p in value.parts)
    if any(p.kind == "basis" for p in value.parts):
        return kinds
    return f"{kinds}: rms {v}^{frame.metric(value, 'rms')}, spectral {v}^{frame.metric(value, 'spec')}"
