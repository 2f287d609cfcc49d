"""Static checks of a rule body: every name defined, every primitive applied to operands of the right shape.

Shapes are tuples of dimension tags: ``()`` scalar, ``("o",)`` a fan_out vector, ``("o", "i")`` a
fan_out x fan_in matrix. Tags, not sizes, are compared, so ``G @ G`` is rejected even though a hidden layer is square.
"""

from __future__ import annotations

from mupderive.errors import RuleError
from mupderive.language.ir import (
    BUILTINS,
    FUNCTIONS,
    BinOp,
    Call,
    Cond,
    Expr,
    Name,
    Neg,
    Num,
    Transpose,
    When,
    const_value,
    walk,
)
from mupderive.language.rule import Body, Hyper

Shape = tuple[str, ...]
SCALAR: Shape = ()
PARAM_SHAPES: dict[str, Shape] = {"matrix": ("o", "i"), "vector": ("o",)}
MAX_POWER = 16  # largest |p| and denominator accepted in x ** p and matpow(A, p)


def show(shape: Shape) -> str:
    names = {"o": "fan_out", "i": "fan_in", "r": "rank"}
    return "scalar" if not shape else "(" + " x ".join(names[d] for d in shape) + ")"


class Checker:
    """Checks one body for one parameter kind; ``shapes`` afterwards maps every defined name to its shape."""

    def __init__(self, path: str, hypers: tuple[Hyper, ...], kind: str) -> None:
        self.path = path
        self.kind = kind
        param = PARAM_SHAPES[kind]
        self.hypers = {h.name: h for h in hypers}
        self.shapes: dict[str, Shape] = {"G": param, "W": param, "dW": param, "H": param, "t": SCALAR,
                                          "fan_in": SCALAR, "fan_out": SCALAR}
        for h in hypers:
            if not isinstance(h.default, bool | str):
                self.shapes[h.name] = SCALAR
        self.rank: str | None = None  # the text of the rank argument of left_singular/right_singular (dimension r)
        self.in_test = False  # inside a step condition's test, where % is allowed

    def fail(self, node: Expr, what: str, expected: str = "") -> RuleError:
        return RuleError(self.path, node.loc.line, node.loc.col, what, expected)

    def body(self, body: Body) -> None:
        param = PARAM_SHAPES[self.kind]
        states = dict(body.state)
        for name, init in body.state:
            self._no_reads(init, states, "state initial values may use only G, W, H, fan_in, fan_out and "
                                         "hyperparameters")
            self.shapes[name] = self.shape(init, in_init=True)
        assigned: set[str] = set()
        for stmt in body.compute:
            target = stmt.target
            where = RuleError(self.path, stmt.loc.line, stmt.loc.col, "", "")
            if target in BUILTINS or target in self.hypers or target in FUNCTIONS:
                raise RuleError(where.path, where.line, where.col, f"cannot assign to {target!r}",
                                "a new local name or a declared state")
            if target in assigned:
                raise RuleError(where.path, where.line, where.col, f"{target!r} is assigned twice",
                                "each name assigned at most once per step")
            value_shape = self.shape(stmt.value)
            if target in states and value_shape != self.shapes[target]:
                raise RuleError(where.path, where.line, where.col,
                                f"state {target!r} has shape {show(self.shapes[target])} but is assigned "
                                f"{show(value_shape)}", "the shape of its initial value")
            self.shapes[target] = value_shape
            assigned.add(target)
        for name, init in body.state:
            if name not in assigned:
                raise self.fail(init, f"state {name!r} is never updated", "an assignment in the compute block")
        direction = self.shape(body.direction)
        if direction != param:
            raise self.fail(body.direction, f"direction has shape {show(direction)}", f"{show(param)} like W")
        if body.decay is not None and self.shape(body.decay) != SCALAR:
            raise self.fail(body.decay, "decay must be a scalar", "a scalar coefficient such as weight_decay")

    def _no_reads(self, expr: Expr, states: dict[str, Expr], expected: str) -> None:
        for node in walk(expr):
            if isinstance(node, Name) and (node.id in states or node.id == "t"):
                raise self.fail(node, f"initial value reads {node.id!r}", expected)

    def shape(self, node: Expr, in_init: bool = False) -> Shape:
        """Shape of ``node``; raises on undefined names and shape mismatches."""
        if isinstance(node, Num):
            return SCALAR
        if isinstance(node, Name):
            return self.name(node)
        if isinstance(node, Neg):
            return self.shape(node.arg, in_init)
        if isinstance(node, Transpose):
            inner = self.shape(node.arg, in_init)
            if len(inner) != 2:
                raise self.fail(node, f".T of a {show(inner)} value", "a matrix")
            return inner[::-1]
        if isinstance(node, When):
            self.step_test(node)
            a, b = self.shape(node.then, in_init), self.shape(node.orelse, in_init)
            if a != b:
                raise self.fail(node, f"branches have shapes {show(a)} and {show(b)}", "equal shapes")
            return a
        if isinstance(node, Cond):
            hyper = self.hypers.get(node.flag)
            if hyper is None or not isinstance(hyper.default, bool):
                raise self.fail(node, f"condition {node.flag!r} is not a boolean hyperparameter",
                                "a hyperparameter with default true or false")
            a, b = self.shape(node.then, in_init), self.shape(node.orelse, in_init)
            if a != b:
                raise self.fail(node, f"branches have shapes {show(a)} and {show(b)}", "equal shapes")
            return a
        if isinstance(node, BinOp):
            return self.binop(node, in_init)
        if isinstance(node, Call):
            return self.call(node, in_init)
        raise self.fail(node, f"unsupported node {type(node).__name__}")

    def step_test(self, node: When) -> None:
        """A step condition reads only ``t``, numbers and width-free numeric hyperparameters (``%`` allowed)."""
        for side in (node.left, node.right):
            for sub in walk(side):
                if isinstance(sub, Name) and sub.id != "t" and (
                        sub.id not in self.hypers or self.hypers[sub.id].role != "width-free"):
                    raise self.fail(sub, f"step condition reads {sub.id!r}",
                                    "t, numbers and width-free hyperparameters such as an update interval")
                if isinstance(sub, Call | Cond | When):
                    raise self.fail(sub, "a step condition is arithmetic on t", "e.g. t % k == 0 or t < k")
            self.in_test = True
            try:
                self.shape(side)
            finally:
                self.in_test = False

    def rank_argument(self, node: Expr) -> None:
        """The rank of a truncated basis: a positive integer or width-free integer hyperparameter, fixed in width
        (the state dimension ``r``); one rank per rule body."""
        text = _rank_text(node)
        hyper = self.hypers.get(text or "")
        literal = text is not None and text.isdigit()
        if not literal and (hyper is None or hyper.role != "width-free" or isinstance(hyper.default, bool)
                            or not isinstance(hyper.default, int) or hyper.default < 1):
            raise self.fail(node, "the rank must be a positive integer or a width-free integer hyperparameter",
                            "left_singular(G, rank) with rank = { role = \"width-free\", default = 128 }")
        if self.rank is not None and self.rank != text:
            raise self.fail(node, f"a second rank {text!r} (the body already uses {self.rank!r})",
                            "one rank per body: the state dimension r")
        self.rank = text

    def name(self, node: Name) -> Shape:
        hyper = self.hypers.get(node.id)
        if hyper is not None and isinstance(hyper.default, bool | str):
            raise self.fail(node, f"option {node.id!r} cannot be used as a number",
                            "use it as a condition: `a if flag else b`")
        if node.id not in self.shapes:
            known = sorted(self.shapes)
            raise self.fail(node, f"unknown name {node.id!r}", f"one of: {', '.join(known)}")
        return self.shapes[node.id]

    def binop(self, node: BinOp, in_init: bool) -> Shape:
        a, b = self.shape(node.left, in_init), self.shape(node.right, in_init)
        if node.op == "@":
            if a and b and a[-1] == b[0] and len(a) + len(b) >= 3:
                return a[:-1] + b[1:]
            raise self.fail(node, f"shape mismatch: {show(a)} @ {show(b)}",
                            "inner dimensions that agree, e.g. G @ G.T")
        if node.op == "%":
            if not self.in_test:
                raise self.fail(node, "% outside a step condition", "`a if t % k == 0 else b`")
            return SCALAR
        if node.op == "**":
            if b != SCALAR:
                raise self.fail(node.right, "exponent must be a scalar", "x ** p with p a number")
            if not _small_rational(node.right) and not (a == SCALAR and const_value(node.right) is None):
                raise self.fail(node.right, "exponent must be a small rational constant",
                                f"|p| <= {MAX_POWER} with denominator <= {MAX_POWER}")
            return a
        return self.broadcast(node, a, b)

    def broadcast(self, node: Expr, a: Shape, b: Shape) -> Shape:
        if a == b or b == SCALAR:
            return a
        if a == SCALAR:
            return b
        raise self.fail(node, f"shape mismatch: {show(a)} and {show(b)}", "equal shapes or a scalar")

    def call(self, node: Call, in_init: bool) -> Shape:
        fn = node.fn
        if fn == "zeros" and not in_init:
            raise self.fail(node, "zeros() outside a state's initial value", "zeros(G) in [update.state]")
        shapes = [self.shape(a, in_init) for a in node.args]
        if fn in ("sqrt", "abs", "sign", "zeros"):
            return shapes[0]
        if fn in ("max", "min", "atan2"):
            return self.broadcast(node, shapes[0], shapes[1])
        if fn == "trust_ratio":
            if shapes != [SCALAR, SCALAR]:
                raise self.fail(node, "trust_ratio() of non-scalars", "two scalars such as fro_norm(W), fro_norm(u)")
            return SCALAR
        if fn == "clip":
            for bound in shapes[1:]:
                self.broadcast(node, shapes[0], bound)
            return shapes[0]
        if fn == "ema":
            if shapes[2] != SCALAR:
                raise self.fail(node.args[2], "ema's beta must be a scalar", "ema(old, x, beta)")
            return self.broadcast(node, shapes[0], shapes[1])
        if fn in ("fro_norm", "spectral_norm", "rms", "mean"):
            if shapes[0] == SCALAR:
                raise self.fail(node, f"{fn}() of a scalar", "a vector or matrix")
            return SCALAR
        if fn == "sum":
            if shapes[0] == SCALAR:
                raise self.fail(node, "sum() of a scalar", "a vector or matrix, e.g. sum(abs(s))")
            return SCALAR
        if fn == "dot":
            if shapes[0] == SCALAR or shapes[0] != shapes[1]:
                raise self.fail(node, f"dot() of {show(shapes[0])} and {show(shapes[1])}",
                                "two vectors or matrices of one shape, e.g. dot(G, dW)")
            return SCALAR
        if fn == "total":
            if shapes[0] != SCALAR:
                raise self.fail(node, f"total() of a {show(shapes[0])} value",
                                "a per-parameter scalar such as sum(abs(s)) or dot(G, dW)")
            if any(isinstance(n, Call) and n.fn == "total" for n in walk(node.args[0])):
                raise self.fail(node, "total() inside total()", "one global sum of a per-parameter scalar")
            return SCALAR
        if fn in ("row_mean", "col_mean"):
            if len(shapes[0]) != 2:
                raise self.fail(node, f"{fn}() of a {show(shapes[0])} value", "a matrix")
            return shapes[0][:1] if fn == "row_mean" else shapes[0][1:]
        if fn == "outer":
            if len(shapes[0]) != 1 or len(shapes[1]) != 1:
                raise self.fail(node, f"outer() of {show(shapes[0])} and {show(shapes[1])}", "two vectors")
            return shapes[0] + shapes[1]
        if fn in ("eye", "matpow"):
            square = shapes[0]
            if len(square) != 2 or square[0] != square[1]:
                raise self.fail(node, f"{fn}() of a {show(square)} value",
                                "a square matrix such as G @ G.T or G.T @ G")
            if fn == "matpow":
                if not _small_rational(node.args[1]):
                    raise self.fail(node.args[1], "matpow exponent must be a small rational constant",
                                    f"|p| <= {MAX_POWER} with denominator <= {MAX_POWER}")
                if len(shapes) == 3 and shapes[2] != SCALAR:
                    raise self.fail(node.args[2], "matpow damping must be a scalar", "matpow(A, p, eps)")
            return square
        if fn == "eigbasis":
            if len(shapes[0]) != 2 or shapes[0][0] != shapes[0][1]:
                raise self.fail(node, f"eigbasis() of a {show(shapes[0])} value",
                                "a symmetric matrix such as L built from G @ G.T")
            return shapes[0]
        if fn in ("left_singular", "right_singular"):
            if len(shapes[0]) != 2:
                raise self.fail(node, f"{fn}() of a {show(shapes[0])} value", "a matrix")
            self.rank_argument(node.args[1])
            return (shapes[0][0] if fn == "left_singular" else shapes[0][1], "r")
        if fn == "orthogonalize":
            if len(shapes[0]) != 2:
                raise self.fail(node, f"orthogonalize() of a {show(shapes[0])} value", "a matrix")
            return shapes[0]
        raise self.fail(node, f"unknown function {fn!r}")  # unreachable: the parser whitelists FUNCTIONS


def _rank_text(node: Expr) -> str | None:
    value = const_value(node)
    if value is not None and value.denominator == 1 and value >= 1:
        return str(value)
    return node.id if isinstance(node, Name) else None


def _small_rational(node: Expr) -> bool:
    value = const_value(node)
    return value is not None and abs(value) <= MAX_POWER and value.denominator <= MAX_POWER
