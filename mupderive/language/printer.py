"""IR -> canonical rule-language text, with only the parentheses precedence needs (``parse(show(e)) == e``)."""

from __future__ import annotations

from fractions import Fraction

from mupderive.language.ir import BinOp, Call, Cond, Expr, Name, Neg, Num, Transpose, When
from mupderive.language.rule import Body, Rule

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "@": 2, "%": 2, "**": 4}
_UNARY, _ATOM = 3, 5


def number(value: Fraction) -> str:
    """Shortest text that parses back to exactly ``value`` (literals are decimal, so this always exists)."""
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    if Fraction(repr(as_float)) == value:
        return repr(as_float)
    return f"({value.numerator} / {value.denominator})"


def show_expr(expr: Expr) -> str:
    """Rule-language text of ``expr``."""
    return _show(expr)[0]


def _show(expr: Expr) -> tuple[str, int]:
    if isinstance(expr, Num):
        text = number(expr.value)
        return text, (_UNARY if text.startswith("-") else _ATOM)
    if isinstance(expr, Name):
        return expr.id, _ATOM
    if isinstance(expr, Call):
        return f"{expr.fn}({', '.join(show_expr(a) for a in expr.args)})", _ATOM
    if isinstance(expr, Transpose):  # an integer literal needs parentheses: `1.T` would lex as the float `1.`
        inner = _wrap(expr.arg, _ATOM)
        return (f"({inner}).T" if inner.isdigit() else f"{inner}.T"), _ATOM
    if isinstance(expr, Neg):
        return f"-{_wrap(expr.arg, _UNARY + 1)}", _UNARY
    if isinstance(expr, Cond):
        return f"{_wrap(expr.then, 1)} if {expr.flag} else {_wrap(expr.orelse, 0)}", 0
    if isinstance(expr, When):
        test = f"{_wrap(expr.left, 1)} {expr.op} {_wrap(expr.right, 1)}"
        return f"{_wrap(expr.then, 1)} if {test} else {_wrap(expr.orelse, 0)}", 0
    if isinstance(expr, BinOp):
        prec = _PREC[expr.op]
        if expr.op == "**":  # right-associative, and binds tighter than a unary minus on its left
            return f"{_wrap(expr.left, _ATOM)}**{_wrap(expr.right, _UNARY)}", prec
        return f"{_wrap(expr.left, prec)} {expr.op} {_wrap(expr.right, prec + 1)}", prec
    raise TypeError(f"not an expression: {expr!r}")


def _wrap(expr: Expr, need: int) -> str:
    text, prec = _show(expr)
    return text if prec >= need else f"({text})"


def show_body(body: Body, indent: str = "  ") -> list[str]:
    """Readable lines for one update program."""
    lines = [f"{indent}state {name} = {show_expr(init)}" for name, init in body.state]
    if body.skip_first:
        lines.append(f"{indent}(the first step only initializes state)")
    if body.transpose_wide:
        lines.append(f"{indent}(a parameter with fan_out < fan_in runs this on its transpose)")
    if body.decay_first:
        lines.append(f"{indent}W <- W (1 - lr * {show_expr(body.decay)})  (decay first: the step below sees it)")
    lines += [f"{indent}{a.target} = {show_expr(a.value)}" for a in body.compute]
    lines.append(f"{indent}U = {show_expr(body.direction)}")
    decay = f" (1 - lr * {show_expr(body.decay)})" if body.decay is not None and not body.decay_first else ""
    if body.decay is not None and body.decay_form == "after":
        lines.append(f"{indent}W <- (W - lr * U) (1 - lr * {show_expr(body.decay)})")
    elif body.decay is not None and body.decay_form == "proximal":
        lines.append(f"{indent}W <- (W - lr * U) / (1 + lr * {show_expr(body.decay)})")
    else:
        lines.append(f"{indent}W <- W{decay} - lr * U")
    return lines


def show_rule(rule: Rule) -> str:
    """The parsed rule, pretty-printed (what ``mupderive show`` prints)."""
    impl = rule.implementation
    lines = [f"{rule.name}: {rule.title}", f"  paper: {rule.paper}",
             f"  mirrors: {impl.cls or '(no library implementation; mupderive generates one)'}"]
    if impl.note:
        lines.append(f"  note: {impl.note}")
    lines.append("hyperparameters:")
    for h in rule.hypers:
        arg = impl.arg(h.name)
        where = f" -> {arg}" if arg else ""
        level = " (class-level)" if h.name in impl.class_level else ""
        doc = f"  # {h.doc}" if h.doc else ""
        lines.append(f"  {h.name} = {h.default!r}  [{h.role}]{where}{level}{doc}")
    if impl.fixed:
        lines.append("fixed constructor arguments: " + ", ".join(f"{k}={v!r}" for k, v in impl.fixed))
    roles = ", ".join(rule.applies_to)
    lines.append(f"applies to: {roles}" + (f"; other roles use {rule.fallback}" if rule.fallback else ""))
    lines.append("update (matrices):" if rule.vector else "update:")
    lines += show_body(rule.matrix)
    if rule.vector is not None:
        lines.append("update (vectors):")
        lines += show_body(rule.vector)
    return "\n".join(lines)
