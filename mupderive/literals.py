"""Numeric literals compared with width-scaled terms: each is a hyperparameter kept fixed, and the derivation says so.

A literal (``sqrt(v) + 1e-8``) has no width exponent: it is the constant ``n^0``, exactly a scale-carrying
hyperparameter kept width-independent. Where it is a term of a sum or comparison whose other terms scale with width
or carry hyperparameters, it decides the regime at large width. :func:`literal_notes` re-derives the layer with each
such literal declared as a scale hyperparameter and reports, at file:line:col, the ``if_fixed`` diagnosis of that
hyperparameter: what keeping the literal fixed does. The derivation itself keeps the literal's meaning.
"""

from __future__ import annotations

from dataclasses import replace

from mupderive.calculus.evaluate import Comparison, Outcome
from mupderive.errors import MupError
from mupderive.language.ir import Assign, BinOp, Call, Cond, Expr, Name, Neg, Transpose, const_value
from mupderive.language.printer import show_expr
from mupderive.language.rule import Body, Hyper, Rule
from mupderive.solver import Balanced, balance_layer, if_fixed

Key = tuple[int, int, str]  # a literal's line, column and text (nodes of a memoized outcome may be another load's)


def _key(expr: Expr) -> Key:
    return expr.loc.line, expr.loc.col, show_expr(expr)


def compared_literals(outcome: Outcome) -> list[Expr]:
    """Literals that set the scale of a compared term (the term itself, ``sqrt(v) + 1e-8``, or a factor of a term
    without hyperparameters, ``G + 0.01 * W``) where another term is of another order or carries a hyperparameter."""
    found: dict[Key, Expr] = {}
    for c in outcome.comparisons:
        for index, group in enumerate(_term_operands(c)):
            own, hypers = c.sizes[index] if index < len(c.sizes) else (None, frozenset())
            values = [const_value(x) for x in group]
            if None not in values:
                literals = list(group) if any(values) else []
            else:
                literals = [] if hypers or len(group) != 1 else _factors(group[0])
            others = [(e, h) for j, (e, h) in enumerate(c.sizes) if j != index and e is not None]
            if own is not None and literals and any(e != own or h for e, h in others):
                found.update((_key(x), x) for x in literals)
    return list(found.values())


def _factors(expr: Expr) -> list[Expr]:
    """Nonzero literal factors of a product or quotient (through unary minus)."""
    if isinstance(expr, Neg):
        return _factors(expr.arg)
    if isinstance(expr, BinOp) and expr.op in "*/":
        return [*_factors(expr.left), *_factors(expr.right)]
    value = const_value(expr)
    return [expr] if value is not None and value != 0 else []


def _term_operands(c: Comparison) -> list[tuple[Expr, ...]]:
    """The operand expressions behind each term of ``c`` (clip's bound is its two limits)."""
    node = c.node
    if isinstance(node, BinOp):
        return [(node.left,), (node.right,)]
    if not isinstance(node, Call):
        return []
    args = node.args
    if node.fn == "clip":
        return [(args[0],), args[1:]] if c.op == "clip" else [(args[1],), (args[2],)]
    if node.fn == "matpow":
        return [(args[0],), (args[2],)] if len(args) == 3 else []
    return [(a,) for a in args[:2]]


def literal_notes(rule: Rule, balanced: Balanced, shifted: Balanced, flags: dict[str, bool]) -> list[str]:
    """One note per literal compared with a width-scaled term: where it is and the regime keeping it fixed forces."""
    literals = compared_literals(balanced.outcome)
    if not literals:
        return []
    names = _names(rule, literals)
    declared = _declared(rule, names)
    notes = []
    try:
        scaled = balance_layer(declared, balanced.layer, flags)
        if all(scaled.hyper[names[_key(x)]] == 0 for x in literals):
            return []  # each is compared with width-independent terms here: kept fixed is what scaling gives
        scaled_shift = balance_layer(declared, shifted.layer, flags)
    except MupError as exc:
        scaled, failure = None, exc
    for expr in literals:
        name = names[_key(expr)]
        where = f"{rule.path or rule.name}:{expr.loc.line}:{expr.loc.col}"
        head = (f"{where}: the literal {show_expr(expr)} is a width-independent constant, i.e. a hyperparameter kept "
                f"fixed")
        try:
            if scaled is None:
                raise failure
            exponent = scaled.hyper[name]
            if exponent == 0:
                continue  # what it is compared with is width-independent here: kept fixed is what scaling gives
            regime = if_fixed(declared, scaled, scaled_shift, name, flags)
        except MupError as exc:
            notes.append(f"{head}, compared with a term of another width scale ({exc}); declare it as a "
                         f"role = \"scale\" hyperparameter to derive its exponent")
            continue
        notes.append(f"{head}: {regime.text}. The derivation keeps it fixed (lr ~ n^{balanced.lr}); declared as a "
                     f"role = \"scale\" hyperparameter it would scale as n^{exponent}, with lr ~ n^{scaled.lr}")
    return notes


def _names(rule: Rule, literals: list[Expr]) -> dict[Key, str]:
    """A hyperparameter name per literal: its text, with its position where several literals read alike."""
    texts = [show_expr(x) for x in literals]
    taken = {h.name for h in rule.hypers}
    return {_key(x): text if texts.count(text) == 1 and text not in taken else f"{text}@{x.loc.line}:{x.loc.col}"
            for x, text in zip(literals, texts, strict=True)}


def _declared(rule: Rule, names: dict[Key, str]) -> Rule:
    """``rule`` with each named literal replaced by a scale hyperparameter of that name defaulting to its value."""
    values = {}

    def swap(expr: Expr) -> Expr:
        if const_value(expr) is not None and (key := _key(expr)) in names:
            values[names[key]] = float(const_value(expr))
            return Name(names[key], loc=expr.loc)
        if isinstance(expr, Neg | Transpose):
            return replace(expr, arg=swap(expr.arg))
        if isinstance(expr, BinOp):
            return replace(expr, left=swap(expr.left), right=swap(expr.right))
        if isinstance(expr, Call):
            return replace(expr, args=tuple(swap(a) for a in expr.args))
        if isinstance(expr, Cond):
            return replace(expr, then=swap(expr.then), orelse=swap(expr.orelse))
        return expr

    def body(b: Body | None) -> Body | None:
        if b is None:
            return None
        return replace(b, state=tuple((n, swap(e)) for n, e in b.state),
                       compute=tuple(Assign(a.target, swap(a.value), a.loc) for a in b.compute),
                       direction=swap(b.direction), decay=None if b.decay is None else swap(b.decay))

    matrix, vector = body(rule.matrix), body(rule.vector)
    hypers = rule.hypers + tuple(Hyper(name, "scale", value, "a literal of the rule") for name, value in values.items())
    marker = "\n# literals declared as hyperparameters: " + ", ".join(sorted(values))
    return replace(rule, hypers=hypers, matrix=matrix, vector=vector, source=rule.source + marker)

