"""A parsed optimizer rule: hyperparameters, the mirrored implementation, and the update program per parameter kind."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from mupderive.language.ir import Assign, BinOp, Call, Expr, Name, names, walk

ROLES = ("input", "hidden", "output", "vector")
HYPER_ROLES = ("lr", "scale", "width-free")
DECAY_FORMS = ("decoupled", "after", "proximal")

Value = float | int | bool | str


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: ``lr`` (the step size), ``scale`` (carries a width scale) or ``width-free``."""

    name: str
    role: str
    default: Value
    doc: str = ""


@dataclass(frozen=True)
class Body:
    """One step of the optimizer for a parameter: ``W <- W (1 - lr decay) - lr direction``.

    ``state`` holds initial values (evaluated at the first step); ``compute`` runs top to bottom each step, a state
    name read before its assignment meaning its previous value. With ``skip_first`` the first step only sets state.
    The decoupled ``decay`` acts after the direction is computed, unless ``decay_first`` (then ``W`` in the
    direction is the already-decayed weight, as in pytorch_optimizer's Lamb). ``decay_form`` says how it acts:
    ``decoupled`` ``W (1 - lr d) - lr U``, ``after`` ``(W - lr U)(1 - lr d)`` (on the updated weight), ``proximal``
    ``(W - lr U) / (1 + lr d)``. With ``transpose_wide`` a matrix with fan_out < fan_in runs the body on its
    transpose (``G.T``, ``W.T`` in, the direction transposed back), so the body's rows are the longer side.
    """

    state: tuple[tuple[str, Expr], ...]
    compute: tuple[Assign, ...]
    direction: Expr
    decay: Expr | None = None
    skip_first: bool = False
    decay_first: bool = False
    decay_form: str = "decoupled"
    transpose_wide: bool = False

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.state)

    @cached_property
    def reads(self) -> frozenset[str]:
        """Every name the body reads (initial values, compute, direction, decay)."""
        exprs = [e for _, e in self.state] + [a.value for a in self.compute] + [self.direction]
        return frozenset().union(*(names(e) for e in exprs + ([self.decay] if self.decay is not None else [])))

    @cached_property
    def totals(self) -> tuple[Call, ...]:
        """The body's ``total(x)`` calls (statistics summed over all parameters), in source order."""
        exprs = [e for _, e in self.state] + [a.value for a in self.compute] + [self.direction]
        exprs += [self.decay] if self.decay is not None else []
        return tuple(n for e in exprs for n in walk(e) if isinstance(n, Call) and n.fn == "total")

    @cached_property
    def decay_sum(self) -> Expr | None:
        """``direction + decay * W``, the sum the decay is compared in (one node, so the calculus and the
        interpreter key that comparison alike); None without a decay."""
        if self.decay is None:
            return None
        return BinOp("+", self.direction, BinOp("*", self.decay, Name("W")), loc=self.direction.loc)


@dataclass(frozen=True)
class Implementation:
    """The real optimizer a rule mirrors and how rule hyperparameters become its constructor arguments."""

    cls: str | None
    args: tuple[tuple[str, str], ...] = ()
    fixed: tuple[tuple[str, Value], ...] = ()
    class_level: tuple[str, ...] = ()
    note: str = ""

    def arg(self, hyper: str) -> str | None:
        return dict(self.args).get(hyper)


@dataclass(frozen=True)
class Rule:
    """An optimizer rule file, parsed and checked."""

    name: str
    title: str
    paper: str
    implementation: Implementation
    hypers: tuple[Hyper, ...]
    matrix: Body
    vector: Body | None = None
    applies_to: tuple[str, ...] = ROLES
    fallback: str | None = None
    path: str = ""
    source: str = ""

    def body(self, role: str) -> Body:
        """The program used for parameters of ``role`` (the vector override applies to 1-D parameters)."""
        return self.vector if role == "vector" and self.vector is not None else self.matrix

    def hyper(self, name: str) -> Hyper:
        return next(h for h in self.hypers if h.name == name)

    @property
    def lr(self) -> Hyper:
        return next(h for h in self.hypers if h.role == "lr")

    @property
    def scale_hypers(self) -> tuple[Hyper, ...]:
        return tuple(h for h in self.hypers if h.role == "scale")

    @cached_property
    def digest(self) -> str:
        """sha256 of the rule file's text: identifies exactly which rule a result came from."""
        return hashlib.sha256(self.source.encode()).hexdigest()
