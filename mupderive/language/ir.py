"""The rule IR: a small typed expression tree that every later stage walks.

An optimizer's step is a list of assignments followed by a direction ``U``; the optimizer then does
``W <- W - lr * U``. Expressions are built from names, exact rational numbers and a fixed set of primitives.
Locations are kept for error messages but never compared, so equal rules are equal IR.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class Loc:
    """A position in the rule file (1-based line and column)."""

    line: int = 1
    col: int = 1


_NOWHERE = Loc()


@dataclass(frozen=True)
class Expr:
    """Base class of expression nodes."""

    loc: Loc = field(default=_NOWHERE, compare=False, repr=False, kw_only=True)

    def children(self) -> tuple[Expr, ...]:
        return ()


@dataclass(frozen=True)
class Num(Expr):
    """An exact rational literal."""

    value: Fraction


@dataclass(frozen=True)
class Name(Expr):
    """A reference: builtin input (G, W, H, t, fan_in, fan_out), hyperparameter, state or local."""

    id: str


@dataclass(frozen=True)
class Neg(Expr):
    """Unary minus."""

    arg: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)


@dataclass(frozen=True)
class BinOp(Expr):
    """``left op right`` with op one of ``+ - * / ** @`` (all elementwise except ``@``)."""

    op: str
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class Call(Expr):
    """A primitive applied to positional arguments, e.g. ``sqrt(v)``."""

    fn: str
    args: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.args


@dataclass(frozen=True)
class Transpose(Expr):
    """``x.T``."""

    arg: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)


@dataclass(frozen=True)
class Cond(Expr):
    """``then if flag else orelse`` where ``flag`` is a boolean hyperparameter."""

    flag: str
    then: Expr
    orelse: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.then, self.orelse)


@dataclass(frozen=True)
class When(Expr):
    """``then if left op right else orelse``: a condition on the step count, e.g. ``t % k == 0`` or ``t < k``
    (``op`` one of ``== != < <= > >=``; the operands are built from ``t``, numbers and width-free
    hyperparameters, with ``%`` allowed only here)."""

    op: str
    left: Expr
    right: Expr
    then: Expr
    orelse: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right, self.then, self.orelse)


COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


@dataclass(frozen=True)
class Assign:
    """``target = value`` inside a rule's compute block."""

    target: str
    value: Expr
    loc: Loc = field(default=_NOWHERE, compare=False, repr=False)


BINOPS = ("+", "-", "*", "/", "**", "@", "%")  # % only inside a step condition (When)

# name -> (min arity, max arity, one-line meaning). The single list of primitives of the rule language.
FUNCTIONS: dict[str, tuple[int, int, str]] = {
    "sqrt": (1, 1, "elementwise square root"),
    "abs": (1, 1, "elementwise absolute value"),
    "sign": (1, 1, "elementwise sign"),
    "max": (2, 2, "elementwise maximum"),
    "min": (2, 2, "elementwise minimum"),
    "clip": (3, 3, "clip(x, lo, hi): elementwise clamp of x to [lo, hi]"),
    "atan2": (2, 2, "elementwise atan2(y, x)"),
    "trust_ratio": (2, 2, "trust_ratio(a, b) = a / b where both are positive, else 1 (the guard of LAMB and LARS)"),
    "ema": (3, 3, "ema(old, x, beta) = beta * old + (1 - beta) * x"),
    "matpow": (2, 3, "matpow(A, p[, damping]) = (A + damping * I)^p for symmetric PSD A, rational p"),
    "orthogonalize": (1, 1, "polar factor U V^T of X = U S V^T (what Newton-Schulz approximates)"),
    "fro_norm": (1, 1, "Frobenius norm (scalar)"),
    "spectral_norm": (1, 1, "largest singular value (scalar)"),
    "rms": (1, 1, "root mean square of the entries (scalar)"),
    "mean": (1, 1, "mean of all entries (scalar)"),
    "row_mean": (1, 1, "mean over the fan_in axis: (fan_out x fan_in) -> (fan_out,)"),
    "col_mean": (1, 1, "mean over the fan_out axis: (fan_out x fan_in) -> (fan_in,)"),
    "outer": (2, 2, "outer(u, v) = u v^T"),
    "eye": (1, 1, "eye(A): identity with the shape of the square matrix A"),
    "eigbasis": (1, 1, "eigbasis(A): orthonormal eigenvectors of the symmetric A as columns, eigenvalues descending"),
    "left_singular": (2, 2, "left_singular(X, k): the k leading left singular vectors of X as columns (rows x rank)"),
    "right_singular": (2, 2, "right_singular(X, k): the k leading right singular vectors of X as columns "
                             "(columns x rank)"),
    "zeros": (1, 1, "zeros(X): zeros with the shape of X (state initial values only)"),
    "sum": (1, 1, "sum of all entries of a nonnegative quantity (scalar)"),
    "dot": (2, 2, "dot(a, b): sum of the entries of a * b, the Frobenius inner product (scalar)"),
    "total": (1, 1, "total(x): the scalar x summed over all parameters of the optimizer (a global statistic)"),
}

# Inputs every rule may read. G: gradient; W: weight; H: Hutchinson Hessian-diagonal estimate z*(Hz);
# t: step count (1 at the first step); fan_in/fan_out: the layer's dimensions.
BUILTINS: dict[str, str] = {
    "G": "gradient of the loss with respect to W",
    "W": "the parameter before this step",
    "dW": "W - W0: the parameter's change since the first step (W0: its value at the first step)",
    "H": "Hutchinson estimate z * (Hessian z) of the Hessian diagonal (z random signs)",
    "t": "step count, 1 at the first step",
    "fan_in": "input dimension of the layer (1 for vectors)",
    "fan_out": "output dimension of the layer",
}


def walk(expr: Expr) -> Iterator[Expr]:
    """All nodes of ``expr``, parents before children."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children()))


def names(expr: Expr) -> set[str]:
    """The names an expression reads (a conditional's flag included)."""
    found = set()
    for node in walk(expr):
        if isinstance(node, Name):
            found.add(node.id)
        elif isinstance(node, Cond):
            found.add(node.flag)
    return found


def const_value(expr: Expr) -> Fraction | None:
    """The exact value of a constant expression (numbers only), or None; integer powers up to 64 only."""
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Neg):
        inner = const_value(expr.arg)
        return None if inner is None else -inner
    if isinstance(expr, BinOp) and expr.op != "@":
        a, b = const_value(expr.left), const_value(expr.right)
        if a is None or b is None:
            return None
        if expr.op == "+":
            return a + b
        if expr.op == "-":
            return a - b
        if expr.op == "*":
            return a * b
        if expr.op == "/":
            return None if b == 0 else a / b
        if expr.op == "%":
            return None if b == 0 else a % b
        if b.denominator == 1 and abs(b) <= 64 and (a != 0 or b > 0):
            return a ** int(b)
    return None
