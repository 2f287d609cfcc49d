"""Which norm matters for each sum in a rule, decided by how the sum is consumed downstream.

Regime preservation compares the terms of a sum, but "of the same order" depends on the consumer: a sum fed to an
elementwise nonlinearity (``sqrt(v) + eps`` in a denominator, ``G + wd W`` before Adam's normalisation) compares
entries; one fed to a matrix function compares spectra; the update itself compares effects on the features.
Demands flow backwards through linear operations and through variables (to a fixed point, as states feed themselves).
"""

from __future__ import annotations

from mupderive.language.check import SCALAR, Checker
from mupderive.language.ir import BinOp, Call, Cond, Expr, Name, Neg, Transpose, When
from mupderive.language.rule import Body

PRIORITY = ("rms", "effect", "spec", "fro")  # entries first: an elementwise consumer sees every entry
_ELEMENTWISE = {"sqrt", "abs", "sign", "max", "min", "clip", "atan2", "rms", "mean", "row_mean", "col_mean", "outer"}


def sum_metrics(body: Body, checker: Checker) -> dict[int, str]:
    """``id(node) -> metric`` for every ``+``/``-`` and ``ema`` node of ``body`` (nodes must stay alive while used)."""
    var: dict[str, set[str]] = {}
    node_demand: dict[int, set[str]] = {}

    def visit(expr: Expr, demand: frozenset[str]) -> None:
        if isinstance(expr, Name):
            var.setdefault(expr.id, set()).update(demand)
        elif isinstance(expr, Neg | Transpose):
            visit(expr.arg, demand)
        elif isinstance(expr, Cond | When):
            visit(expr.then, demand)
            visit(expr.orelse, demand)
        elif isinstance(expr, BinOp):
            binop(expr, demand)
        elif isinstance(expr, Call):
            call(expr, demand)

    def binop(expr: BinOp, demand: frozenset[str]) -> None:
        entry = frozenset({"rms"})
        if expr.op in "+-":
            node_demand.setdefault(id(expr), set()).update(demand)
            visit(expr.left, demand)
            visit(expr.right, demand)
        elif expr.op == "@":
            visit(expr.left, frozenset({"spec"}))
            visit(expr.right, frozenset({"spec"}))
        elif expr.op == "*":
            scalar_left = checker.shape(expr.left) == SCALAR
            scalar_right = checker.shape(expr.right) == SCALAR
            visit(expr.left, demand if scalar_right else entry)
            visit(expr.right, demand if scalar_left else entry)
        elif expr.op == "/":
            visit(expr.left, demand if checker.shape(expr.right) == SCALAR else entry)
            visit(expr.right, entry)
        else:  # **
            visit(expr.left, entry)
            visit(expr.right, entry)

    def call(expr: Call, demand: frozenset[str]) -> None:
        fn, args = expr.fn, expr.args
        if fn == "ema":  # beta * old + (1 - beta) * x: a sum
            node_demand.setdefault(id(expr), set()).update(demand)
            visit(args[0], demand)
            visit(args[1], demand)
        elif fn in ("matpow", "orthogonalize", "spectral_norm", "eigbasis", "left_singular", "right_singular"):
            for arg in args:
                visit(arg, frozenset({"spec"}))
        elif fn == "fro_norm":
            visit(args[0], frozenset({"fro"}))
        elif fn in _ELEMENTWISE:
            for arg in args:
                visit(arg, frozenset({"rms"}))

    for _ in range(len(body.compute) + 2):
        before = {k: set(v) for k, v in var.items()}
        visit(body.direction, frozenset({"effect"}))
        for stmt in reversed(body.compute):
            visit(stmt.value, frozenset(var.get(stmt.target, set())))
        for name, init in body.state:
            visit(init, frozenset(var.get(name, set())))
        if var == before:
            break
    return {key: next((m for m in PRIORITY if m in demand), "rms") for key, demand in node_demand.items()}
