"""Compile a rule's update program (the IR) into the Python source of an optimizer step.

Two layouts share one compiler. ``tensor``: one parameter at a time, ``torch.*`` calls. ``foreach``: all parameters
of a bucket at once, ``torch._foreach_*`` kernels, a list comprehension where no kernel exists.

Values that depend only on hyperparameters and ``t`` stay Python numbers. A scalar factor of a tensor is carried
symbolically and folded into the next kernel's ``alpha``/``value`` (``m / (1 - beta1**t)`` costs no kernel); fresh
temporaries, and locals at their last use, are updated in place; ``s = ema(s, x, beta)`` on a state becomes
``lerp_`` (``mul_`` + ``addcmul_`` when ``x = y**2``); and the final ``W <- W - lr * (a / b)`` is one ``addcdiv_``.
So an elementwise rule costs the kernels a hand-written optimizer would.

Semantics, for one parameter at step ``t = 1, 2, ...``: at the first step every state's initial value is evaluated;
with ``skip_first`` the first step stops there; the compute assignments run top to bottom; then
``W <- W (1 - lr decay) - lr direction`` (with ``decay_first`` the decay comes right after the initial values and the
program sees the decayed ``W``). This is the semantics of :mod:`mupderive.verify.interpret`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction

from mupderive.codegen import safe
from mupderive.codegen.lines import WIDTH, fit
from mupderive.errors import MupError
from mupderive.language.ir import (
    COMPARISONS,
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
    names,
)
from mupderive.language.rule import Body, Rule

# Tensor-only primitives, per tensor: {0}, {1}, ... are the arguments.
TENSOR_CALLS = {
    "atan2": "torch.atan2({0}, {1})",
    "matmul": "{0} @ {1}",
    "transpose": "{0}.T",
    "outer": "torch.outer({0}, {1})",
    "eye": "torch.eye({0}.shape[0], dtype={0}.dtype, device={0}.device)",
    "zeros": "torch.zeros_like({0})",
    "clone": "{0}.clone()",
    "mean": "{0}.mean()",
    "row_mean": "{0}.mean(dim=-1)",
    "col_mean": "{0}.mean(dim=0)",
    "fro_norm": "torch.linalg.vector_norm({0})",
    "rms": "torch.linalg.vector_norm({0}) / math.sqrt({0}.numel())",
    "spectral_norm": "torch.linalg.matrix_norm({0}, ord=2)",
    "orthogonalize": "_orthogonalize({0})",
    "matpow": "_matpow({0}, {1}, {2})",
    "trust_ratio": "_trust_ratio({0}, {1})",
    "eigbasis": "torch.flip(torch.linalg.eigh({0})[1], dims=[1])",
    "left_singular": "_singular_basis({0}, {1}, True)",
    "right_singular": "_singular_basis({0}, {1}, False)",
    "sum": "{0}.sum()",
    "dot": "torch.dot({0}.flatten(), {1}.flatten())",
}
_REDUCTIONS = ("fro_norm", "rms", "spectral_norm", "mean", "row_mean", "col_mean", "sum")
# Primitives on Python numbers.
SCALAR_CALLS = {
    "sqrt": "math.sqrt({0})",
    "abs": "abs({0})",
    "sign": "(({0} > 0) - ({0} < 0))",
    "max": "max({0}, {1})",
    "min": "min({0}, {1})",
    "clip": "min(max({0}, {1}), {2})",
    "atan2": "math.atan2({0}, {1})",
    "ema": "{2} * {0} + (1 - {2}) * {1}",
    "trust_ratio": "({0} / {1} if {0} > 0 and {1} > 0 else 1.0)",
}
# Module-level helpers the generated code defines when a rule uses them.
HELPERS = {
    "orthogonalize": '''def _orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """Polar factor U V^T of x = U S V^T (what Newton-Schulz iterations approximate)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh''',
    "trust_ratio": '''def _trust_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where both are positive, else 1 (the layerwise trust-ratio guard of LAMB and LARS)."""
    return torch.where((a > 0) & (b > 0), a / b, torch.ones_like(a))


def _trust_ratios(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """_trust_ratio of each pair, computed once on the stacked scalars."""
    return list(_trust_ratio(torch.stack(a), torch.stack(b)).unbind())''',
    "left_singular": '''def _singular_basis(x: torch.Tensor, k: int, left: bool) -> torch.Tensor:
    """The k leading left (U[:, :k]) or right (V[:, :k]) singular vectors of x as columns."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :int(k)] if left else vh[:int(k)].T''',
    "total": '''def _step_together(runs: list[Generator[torch.Tensor, torch.Tensor, None]]) -> None:
    """Run the parameters' steps side by side: at each total() every step yields its own term and is sent the sum
    over all parameters (a statistic shared by all of them); a step that returns early drops out."""
    terms = {}
    for run in runs:
        with contextlib.suppress(StopIteration):
            terms[run] = next(run)
    while terms:
        total = sum(terms.values())
        done = []
        for run in terms:
            try:
                terms[run] = run.send(total)
            except StopIteration:
                done.append(run)
        for run in done:
            del terms[run]''',
    "matpow": '''def _matpow(a: torch.Tensor, p: float, damping: float) -> torch.Tensor:
    """(a + damping I)^p of a symmetric PSD matrix, from its eigendecomposition."""
    evals, evecs = torch.linalg.eigh(a + damping * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
    return (evecs * evals.clamp_min(0).pow(p)) @ evecs.T''',
}

ATOM, POW, UNARY, MUL, ADD, COND = 9, 7, 6, 5, 4, 1  # Python precedence, tightest first


@dataclass(frozen=True)
class Val:
    """A compiled value. ``py``: a Python number; ``pl``: per-tensor Python numbers (foreach); ``t``: tensor(s).

    ``code`` is Python source (for ``t``: the variable holding the tensor, or the list of them) with precedence
    ``prec``. A tensor's value is ``scale * code`` (``scale``: Python source, None for 1); ``fresh`` says nothing else
    refers to the variable, so it may be updated in place; ``bufs`` names every variable whose storage it may share;
    ``shape`` tells whether an in-place op can hold its result.
    """

    kind: str
    code: str
    prec: int = ATOM
    scale: str | None = None
    fresh: bool = False
    bufs: frozenset[str] = frozenset()
    shape: str = "0"  # a token: equal tokens are equal shapes; "0" is a scalar, "W" the parameter's shape


def broadcast(a: str, b: str) -> str | None:
    """The shape token of an elementwise result, or None when the tokens do not say."""
    if a == b or b == "0":
        return a
    return b if a == "0" else None


def paren(v: Val, need: int) -> str:
    """``v``'s code, parenthesized unless it binds at least as tightly as ``need``."""
    return v.code if v.prec >= need else f"({v.code})"


def times(a: str | None, b: str | None) -> str | None:
    """Product of two optional scale expressions (None is 1); ``a * (1 / x)`` is written ``a / x``."""
    if a is None or b is None:
        return a if b is None else b
    if _reciprocal(a) and not _reciprocal(b):
        a, b = b, a
    if _reciprocal(b):
        return f"{_factor(a)} / {b[4:]}"
    return f"{_factor(a)} * {_factor(b)}"


def _reciprocal(s: str) -> bool:
    """True for ``1 / x`` with ``x`` an operand (as :func:`times` and the emitter write it)."""
    return s.startswith("1 / ") and _top_level(s) == ["/"]


def _factor(s: str) -> str:
    """``s`` safe as an operand of ``*``: parenthesized unless its top-level operators are all ``*`` or ``**``."""
    return s if all(op in ("*", "**") for op in _top_level(s)) else f"({s})"


def _bare(s: str) -> str:
    """``s`` without parentheses around all of it (it stands alone as a call argument)."""
    while s.startswith("(") and s.endswith(")") and _closes_at_end(s):
        s = s[1:-1]
    return s


def _closes_at_end(s: str) -> bool:
    """True when the bracket opening ``s`` is the one closing it."""
    depth = 0
    for i, ch in enumerate(s):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if depth == 0:
            return i == len(s) - 1
    return False


def _top_level(s: str) -> list[str]:
    """The binary operators of ``s`` outside brackets (spelled with spaces around them, as the emitter writes)."""
    depth, ops = 0, []
    for i, ch in enumerate(s):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch == " ":
            token = s[i + 1:].split(" ", 1)[0]
            if token in ("*", "/", "+", "-", "**", "if") and s[i + 1 + len(token):i + 2 + len(token)] == " ":
                ops.append(token)
    return ops


class Emitter:
    """Compiles one body in one layout into lines of Python (see the module docstring)."""

    def __init__(self, rule: Rule, body: Body, layout: str) -> None:
        self.rule, self.body = rule, body
        self.foreach = layout == "foreach"
        self.param, self.grad = ("params", "grads") if self.foreach else ("param", "grad")
        self.lines: list[str] = []
        self.depth = 0
        self.count = 0
        self.assigned: set[str] = set()  # Python variables bound so far
        self.rebound: list[str] = []  # states now held by a new variable (written back to the state at the end)
        self.helpers: set[str] = set()
        self.env: dict[str, Val] = {}
        self.dying: set[str] = set()  # locals read for the last time by the statement being compiled
        self.hoist = True

    # -- output ----------------------------------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        self.lines.extend(fit("    " * self.depth + line))

    def comment(self, content: str) -> None:
        for line in safe.wrap(content, WIDTH - 4 * self.depth, "# "):
            self.emit(line)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.emit(header)
        self.depth += 1
        yield
        self.depth -= 1

    def temp(self, code: str, prefix: str = "_t") -> str:
        self.count += 1
        name = f"{prefix}{self.count}"
        self.emit(f"{name} = {code}")
        self.assigned.add(name)
        return name

    def new(self, code: str, shape: str | None, scale: str | None = None) -> Val:
        """A fresh tensor value computed by ``code`` (an unknown shape gets a token of its own)."""
        name = self.temp(code)
        return Val("t", name, scale=scale, fresh=True, bufs=frozenset({name}), shape=shape or f"?{name}")

    # -- op spelling -----------------------------------------------------------------------------------------------
    def kernel(self, op: str, *args: str, **kw: str) -> str:
        """An out-of-place elementwise op: ``torch.op`` or ``torch._foreach_op``."""
        args = tuple(_bare(a) for a in args)
        extra = "".join(f", {k}={_bare(v)}" for k, v in kw.items())
        return f"torch.{'_foreach_' if self.foreach else ''}{op}({', '.join(args)}{extra})"

    def kernel_(self, op: str, target: str, *args: str, **kw: str) -> None:
        """An in-place elementwise op on ``target``."""
        args = tuple(_bare(a) for a in args)
        extra = "".join(f", {k}={_bare(v)}" for k, v in kw.items())
        if self.foreach:
            self.emit(f"torch._foreach_{op}_({', '.join((target, *args))}{extra})")
        elif op in ("maximum", "minimum"):
            self.emit(f"torch.{op}({', '.join((target, *args))}{extra}, out={target})")
        else:
            self.emit(f"{target}.{op}_({', '.join(args)}{extra})")

    def mapped(self, template: str, args: list[Val]) -> str:
        """``template`` applied per tensor; foreach: a comprehension over the list arguments (``t`` and ``pl``)."""
        if not self.foreach:
            return template.format(*(paren(a, POW) for a in args))
        lists = list(dict.fromkeys(a.code for a in args if a.kind != "py"))
        loop = {code: f"_{chr(ord('a') + i)}" for i, code in enumerate(lists)}
        body = template.format(*(loop[a.code] if a.kind != "py" else paren(a, POW) for a in args))
        source = lists[0] if len(lists) == 1 else f"zip({', '.join(lists)}, strict=True)"
        return f"[{body} for {', '.join(loop.values())} in {source}]"

    # -- scalars ---------------------------------------------------------------------------------------------------
    def scalar(self, template: str, prec: int, args: list[Val], need: tuple[int, ...] = ()) -> Val:
        """A Python-number result of ``template``; per tensor when an argument is; long code gets a name."""
        if any(a.kind == "pl" for a in args):
            return Val("pl", self.temp(self.mapped(template, args), "_s"))
        code = template.format(*(paren(a, need[i] if i < len(need) else POW) for i, a in enumerate(args)))
        if self.hoist and len(code) > 40:
            return Val("py", self.temp(code, "_s"))
        return Val("py", code, prec)

    def py_op(self, op: str, a: Val, b: Val) -> Val:
        """``a op b`` on Python numbers (either may be per tensor)."""
        if op == "**":
            return self.scalar("{0} ** {1}", POW, [a, b], (POW + 1, UNARY))
        if op == "*" and b.kind == "py" and _reciprocal(b.code):  # a * (1 / x) is a / x
            op, b = "/", Val("py", b.code[4:], POW)
        prec = ADD if op in "+-" else MUL
        return self.scalar(f"{{0}} {op} {{1}}", prec, [a, b], (prec, prec + 1))

    # -- tensors ---------------------------------------------------------------------------------------------------
    def materialized(self, v: Val) -> Val:
        """``v`` with its scale applied (in place when fresh)."""
        if v.scale is None:
            return v
        op, factor = ("div", v.scale[4:]) if _reciprocal(v.scale) else ("mul", v.scale)
        if v.fresh:
            self.kernel_(op, v.code, factor)
            return replace(v, scale=None)
        return self.new(self.kernel(op, v.code, factor), v.shape)

    def owned(self, v: Val) -> Val:
        """A fresh tensor equal to ``v`` (a copy unless ``v`` is fresh)."""
        v = self.materialized(v)
        return v if v.fresh else self.new(self.mapped(TENSOR_CALLS["clone"], [v]), v.shape)

    def unary(self, op: str, v: Val) -> Val:
        v = self.materialized(v)
        if v.fresh:
            self.kernel_(op, v.code)
            return v
        return self.new(self.kernel(op, v.code), v.shape)

    def binary(self, op: str, a: Val, b: Val, scale: str | None = None, **kw: str) -> Val:
        """``op(a, b)`` on unscaled ``a`` (b: unscaled tensor or a number), in place when ``a`` is fresh and can
        hold the result."""
        shape = broadcast(a.shape, b.shape)
        if a.fresh and shape == a.shape:
            self.kernel_(op, a.code, b.code, **kw)
            return replace(a, scale=scale)
        return self.new(self.kernel(op, a.code, b.code, **kw), shape, scale)

    def call_tensor(self, fn: str, args: list[Val], scale: str | None = None) -> Val:
        """A tensor-only primitive of materialized arguments (a transpose is a view of its argument)."""
        args = [self.materialized(a) if a.kind == "t" else a for a in args]
        self.helpers |= {"left_singular" if fn == "right_singular" else fn} & HELPERS.keys()
        shape = _result_shape(fn, [a.shape for a in args])
        if fn == "fro_norm" and self.foreach:
            return self.new(f"torch._foreach_norm({args[0].code})", shape, scale)
        if fn == "trust_ratio" and self.foreach and all(a.kind == "t" for a in args):
            return self.new(f"_trust_ratios({args[0].code}, {args[1].code})", shape, scale)
        code = self.mapped(TENSOR_CALLS[fn], args)
        if fn == "transpose":
            name = self.temp(code)
            return Val("t", name, scale=scale, bufs=args[0].bufs | {name}, shape=shape)
        return self.new(code, shape, scale)

    def need_tensor(self, v: Val, what: str) -> Val:
        if v.kind != "t":
            raise MupError(f"rule {self.rule.name!r}: {what} needs a tensor, not a scalar")
        return v

    # -- expressions -----------------------------------------------------------------------------------------------
    def expr(self, e: Expr) -> Val:
        value = const_value(e)
        if value is not None:
            text = safe.number(value)
            return Val("py", text, UNARY if text.startswith("-") else ATOM)
        if isinstance(e, Name):
            return self.name(e.id)
        if isinstance(e, Neg):
            v = self.expr(e.arg)
            if v.kind == "t":
                return replace(v, scale=times(v.scale, "-1"))
            return self.scalar("-{0}", UNARY, [v], (UNARY,))
        if isinstance(e, BinOp):
            return self.binop(e)
        if isinstance(e, Call):
            return self.call(e)
        if isinstance(e, Transpose):
            v = self.need_tensor(self.expr(e.arg), "a transpose")
            return self.call_tensor("transpose", [replace(v, scale=None)], v.scale)
        if isinstance(e, Cond):
            return self.cond(self.env[e.flag].code, e.then, e.orelse)
        if isinstance(e, When):
            return self.cond(self.step_test(e), e.then, e.orelse)
        raise MupError(f"rule {self.rule.name!r}: cannot compile {e!r}")

    def name(self, name: str) -> Val:
        """A read of ``name``; a local read for the last time that owns its tensor may be updated in place."""
        if name not in self.env:
            raise MupError(f"rule {self.rule.name!r}: {name!r} is not available here")
        v = self.env[name]
        owns = v.kind == "t" and v.bufs == {v.code} and name in self.dying and not any(
            v.code in other.bufs for key, other in self.env.items() if key != name)
        if owns:
            self.dying.discard(name)
        return replace(v, fresh=owns)

    def binop(self, e: BinOp) -> Val:
        if e.op == "**":
            return self.power(e)
        a, b = self.expr(e.left), self.expr(e.right)
        if e.op == "@":
            a, b = self.need_tensor(a, "@"), self.need_tensor(b, "@")
            return self.call_tensor("matmul", [replace(a, scale=None), replace(b, scale=None)], times(a.scale, b.scale))
        if a.kind != "t" and b.kind != "t":
            return self.py_op(e.op, a, b)
        return {"+": self.add, "-": self.sub, "*": self.mul, "/": self.div}[e.op](a, b)

    def add(self, a: Val, b: Val) -> Val:
        """``a + b``, b's scale folded into ``alpha``."""
        if a.kind != "t":
            a, b = b, a
        if b.kind != "t":
            return self.binary("add", self.materialized(a), b)
        if a.scale is not None and b.scale is None and not a.fresh:
            a, b = b, a
        kw = {"alpha": b.scale} if b.scale is not None else {}
        return self.binary("add", self.materialized(a), replace(b, scale=None), **kw)

    def sub(self, a: Val, b: Val) -> Val:
        if b.kind == "t":
            return self.add(a, replace(b, scale=times(b.scale, "-1")))
        return self.add(a, self.scalar("-{0}", UNARY, [b], (UNARY,)))

    def mul(self, a: Val, b: Val) -> Val:
        if a.kind != "t":
            a, b = b, a
        if b.kind == "py":
            return replace(a, scale=times(a.scale, paren(b, MUL)))
        if b.kind == "pl":
            return self.binary("mul", replace(a, scale=None), b, a.scale)
        if b.fresh and not a.fresh:
            a, b = b, a
        return self.binary("mul", replace(a, scale=None), replace(b, scale=None), times(a.scale, b.scale))

    def div(self, a: Val, b: Val) -> Val:
        if b.kind == "py":
            return replace(a, scale=times(a.scale, f"1 / {paren(b, MUL + 1)}"))
        if b.kind == "pl":
            return self.binary("div", replace(a, scale=None), b, a.scale)
        inverse_scale = None if b.scale is None else f"1 / {_factor(b.scale)}"
        if a.kind != "t":  # number / tensor
            inverse = self.unary("reciprocal", replace(b, scale=None))
            return self.mul(replace(inverse, scale=inverse_scale), a)
        return self.binary("div", replace(a, scale=None), replace(b, scale=None), times(a.scale, inverse_scale))

    def power(self, e: BinOp) -> Val:
        base, exponent = self.expr(e.left), self.expr(e.right)
        if base.kind != "t" and exponent.kind != "t":
            return self.py_op("**", base, exponent)
        if base.kind != "t" or exponent.kind == "t":
            base, exponent = (self.materialized(v) if v.kind == "t" else v for v in (base, exponent))
            return self.new(self.kernel("pow", base.code, exponent.code), broadcast(base.shape, exponent.shape))
        k = const_value(e.right)
        if k == 2:
            v = replace(base, scale=None)
            square = self.binary("mul", v, replace(v, fresh=False))
            return replace(square, scale=None if base.scale is None else f"{_factor(base.scale)} ** 2")
        if k == Fraction(1, 2):
            return self.unary("sqrt", base)
        if k == -1:
            return self.unary("reciprocal", base)
        return self.binary("pow", self.materialized(base), exponent)

    def call(self, e: Call) -> Val:
        fn, args = e.fn, [self.expr(a) for a in e.args]
        if fn in SCALAR_CALLS and all(a.kind != "t" for a in args):
            template = SCALAR_CALLS[fn]
            call = re.fullmatch(r"[\w.]+\((\{\d\}(, )?)+\)", template)  # bare call arguments need no parentheses
            return self.scalar(template, ADD if fn == "ema" else ATOM, args, (COND,) * len(args) if call else ())
        if fn in ("sqrt", "abs", "sign"):
            return self.unary(fn, self.need_tensor(args[0], fn))
        if fn in ("max", "min"):
            return self.extremum(fn, *args)
        if fn == "clip":
            return self.extremum("min", self.extremum("max", args[0], args[1]), args[2])
        if fn == "ema":
            return self.ema(*args)
        if fn in _REDUCTIONS:
            v = self.need_tensor(args[0], fn)
            linear = fn in ("mean", "row_mean", "col_mean", "sum") or v.scale is None
            return self.call_tensor(fn, [replace(v, scale=None)], v.scale if linear else f"abs({v.scale})")
        if fn == "dot":
            a, b = (self.need_tensor(x, fn) for x in args)
            return self.call_tensor(fn, [replace(a, scale=None), replace(b, scale=None)], times(a.scale, b.scale))
        if fn == "total":
            return self.total(e, self.need_tensor(args[0], fn))
        if fn == "outer":
            a, b = (self.need_tensor(x, fn) for x in args)
            return self.call_tensor(fn, [replace(a, scale=None), replace(b, scale=None)], times(a.scale, b.scale))
        if fn == "matpow":
            if any(x.kind != "py" for x in args[1:]):
                raise MupError(f"rule {self.rule.name!r}: matpow() needs a scalar power and damping")
            damping = args[2] if len(args) == 3 else Val("py", "0.0")
            return self.call_tensor(fn, [self.need_tensor(args[0], fn), args[1], damping])
        if fn in ("eye", "zeros", "orthogonalize", "atan2", "trust_ratio", "eigbasis"):
            return self.call_tensor(fn, [self.need_tensor(x, fn) for x in args])
        if fn in ("left_singular", "right_singular"):
            if args[1].kind != "py":
                raise MupError(f"rule {self.rule.name!r}: {fn}() needs a number for the rank")
            return self.call_tensor(fn, [self.need_tensor(args[0], fn), args[1]])
        raise MupError(f"rule {self.rule.name!r}: {fn}() is not supported on these arguments")

    def total(self, e: Call, v: Val) -> Val:
        """``total(x)``: the step yields this parameter's ``x`` and is sent back the sum over all parameters (the
        optimizer runs every parameter's step side by side, see ``_step_together``)."""
        if self.foreach:
            raise MupError(f"rule {self.rule.name!r}: total() runs one tensor at a time (no foreach layout)")
        self.helpers.add("total")
        self.count += 1
        name = f"_t{self.count}"
        self.emit(f"{name} = yield {self.materialized(v).code}")
        self.assigned.add(name)
        return Val("t", name, bufs=frozenset({name}), shape="0")  # shared by all parameters: never updated in place

    def extremum(self, fn: str, a: Val, b: Val) -> Val:
        """Elementwise ``max``/``min``: ``clamp_min``/``clamp_max`` against a number."""
        if a.kind != "t" and b.kind != "t":
            return self.scalar(SCALAR_CALLS[fn], ATOM, [a, b])
        if a.kind != "t":
            a, b = b, a
        if b.kind != "t":
            return self.binary("clamp_min" if fn == "max" else "clamp_max", self.materialized(a), b)
        a, b = self.materialized(a), self.materialized(b)
        if b.fresh and not a.fresh:
            a, b = b, a
        return self.binary("maximum" if fn == "max" else "minimum", a, b)

    def ema(self, old: Val, x: Val, beta: Val) -> Val:
        """``beta * old + (1 - beta) * x``: a ``lerp`` when ``beta`` is a number."""
        if beta.kind != "py":
            raise MupError(f"rule {self.rule.name!r}: ema() needs a scalar coefficient")
        weight = self.py_op("-", Val("py", "1"), beta)
        if old.kind != "t" or x.kind != "t":
            return self.add(self.mul(old, beta), self.mul(x, weight))
        old, x = self.materialized(old), self.materialized(x)
        shape = broadcast(old.shape, x.shape)
        if old.fresh and shape == old.shape:
            self.kernel_("lerp", old.code, x.code, weight.code)
            return old
        return self.new(self.kernel("lerp", old.code, x.code, weight.code), shape)

    def step_test(self, e: When) -> str:
        """The Python test of a step condition: numbers and names of t and hyperparameters, a whitelisted op."""
        if e.op not in COMPARISONS:
            raise MupError(f"rule {self.rule.name!r}: unknown comparison {e.op!r}")
        left, right = self.expr(e.left), self.expr(e.right)
        if left.kind != "py" or right.kind != "py":
            raise MupError(f"rule {self.rule.name!r}: a step condition must be a number (t and hyperparameters)")
        return f"({paren(left, ADD)} {e.op} {paren(right, ADD)})"

    def cond(self, flag: str, then_expr: Expr, orelse_expr: Expr) -> Val:
        """``a if flag else b``: inline for numbers, an if/else block for tensors (both branches fresh or views)."""
        if self.kind(then_expr) == self.kind(orelse_expr) == "py":
            hoist, self.hoist = self.hoist, False
            then, orelse = self.expr(then_expr), self.expr(orelse_expr)
            self.hoist = hoist
            return Val("py", f"{paren(then, COND + 1)} if {flag} else {paren(orelse, COND)}", COND)
        if self.kind(then_expr) != "t" or self.kind(orelse_expr) != "t":
            raise MupError(f"rule {self.rule.name!r}: the branches of a conditional must both be tensors or both "
                           f"numbers")
        self.count += 1
        name = f"_c{self.count}"
        start, branches = len(self.lines), []
        for header, branch in ((f"if {flag}:", then_expr), ("else:", orelse_expr)):
            with self.block(header):
                v = self.materialized(self.expr(branch))
                self.emit(f"{name} = {v.code}")
                branches.append(v)
        if len(self.lines) == start + 4:  # both branches are plain values: one conditional expression
            del self.lines[start:]
            self.emit(f"{name} = {branches[0].code} if {flag} else {branches[1].code}")
        self.assigned.add(name)
        then, orelse = branches
        shape = then.shape if then.shape == orelse.shape else f"?{name}"
        if then.fresh and orelse.fresh:
            return Val("t", name, fresh=True, bufs=frozenset({name}), shape=shape)
        return Val("t", name, bufs=frozenset({name}) | then.bufs | orelse.bufs, shape=shape)

    def shape(self, e: Expr) -> str | None:
        """The shape token of ``e`` without compiling it (None when unknown)."""
        if const_value(e) is not None:
            return "0"
        if isinstance(e, Name):
            return self.env[e.id].shape
        if isinstance(e, Neg):
            return self.shape(e.arg)
        if isinstance(e, When):
            then, orelse = self.shape(e.then), self.shape(e.orelse)
            return then if then == orelse else None
        shapes = [self.shape(c) for c in e.children()]
        if None in shapes:
            return None
        if isinstance(e, Transpose):
            return _result_shape("transpose", shapes)
        if isinstance(e, Cond):
            return shapes[0] if shapes[0] == shapes[1] else None
        if isinstance(e, BinOp) and e.op in ("**", "@"):
            return shapes[0] if e.op == "**" else _result_shape("matmul", shapes)
        if isinstance(e, Call) and e.fn in TENSOR_CALLS:
            return _result_shape(e.fn, shapes)
        out = "0"
        for shape in shapes:
            out = broadcast(out, shape)
            if out is None:
                return None
        return out

    def fits(self, state: str, e: Expr) -> bool:
        """True when ``state`` can hold ``e`` combined elementwise with it (an in-place update keeps its shape)."""
        return self.kind(e) == "t" and broadcast(self.env[state].shape, self.shape(e) or "?") == self.env[state].shape

    def kind(self, e: Expr) -> str:
        """The kind of ``e`` without compiling it."""
        if const_value(e) is not None:
            return "py"
        if isinstance(e, Name):
            return self.env[e.id].kind
        if isinstance(e, Transpose) or isinstance(e, Call) and e.fn in TENSOR_CALLS:
            return "t"
        if isinstance(e, Cond | When):
            return self.kind(e.then)
        kinds = {self.kind(c) for c in e.children()}
        return "t" if "t" in kinds else "pl" if "pl" in kinds else "py"

    # -- statements ------------------------------------------------------------------------------------------------
    def protect(self, buf: str, *keep: Val) -> tuple[Val, ...]:
        """Before ``buf`` changes in place, copy every local (and each of ``keep``) that shares its storage."""
        for key, v in list(self.env.items()):
            if v.kind == "t" and buf in v.bufs and key not in self.body.state_names:
                self.env[key] = replace(self.owned(replace(v, fresh=False)), fresh=False)
        return tuple(self.owned(replace(v, fresh=False)) if v.kind == "t" and buf in v.bufs else v for v in keep)

    def assign_state(self, target: str, value: Expr) -> None:
        """Update a state in place when the statement is an EMA, an accumulation or a running max/min."""
        state = self.env[target].code
        if isinstance(value, Call) and value.fn == "ema" and value.args[0] == Name(target) \
                and self.kind(value.args[2]) == "py" and self.fits(target, value.args[1]) \
                and target not in names(value.args[1]):
            return self.ema_state(state, value.args[1], self.expr(value.args[2]))
        if isinstance(value, Call) and value.fn in ("max", "min") and value.args[0] == Name(target) \
                and self.fits(target, value.args[1]) and target not in names(value.args[1]):
            (other,) = self.protect(state, self.materialized(self.expr(value.args[1])))
            return self.kernel_("maximum" if value.fn == "max" else "minimum", state, other.code)
        accumulation = self.accumulation(target, value)
        if accumulation is not None:
            factor, increment = accumulation
            factor_val = None if factor is None else self.expr(factor)
            (v,) = self.protect(state, self.expr(increment))
            if factor_val is not None:
                self.kernel_("mul", state, factor_val.code)
            return self.kernel_("add", state, v.code, **({"alpha": v.scale} if v.scale is not None else {}))
        return self.rebind_state(target, self.expr(value))

    def ema_state(self, state: str, x: Expr, beta: Val) -> None:
        weight = self.py_op("-", Val("py", "1"), beta)
        if isinstance(x, BinOp) and x.op == "**" and const_value(x.right) == 2 and self.kind(x.left) == "t":
            (y,) = self.protect(state, self.expr(x.left))
            value = weight.code if y.scale is None else f"{paren(weight, MUL)} * {_factor(y.scale)} ** 2"
            self.kernel_("mul", state, beta.code)
            return self.kernel_("addcmul", state, y.code, y.code, value=value)
        (v,) = self.protect(state, self.expr(x))
        if v.scale is None:
            return self.kernel_("lerp", state, v.code, weight.code)
        self.kernel_("mul", state, beta.code)
        return self.kernel_("add", state, v.code, alpha=times(paren(weight, MUL), v.scale))

    def accumulation(self, target: str, value: Expr) -> tuple[Expr | None, Expr] | None:
        """``s + x`` -> (None, x) and ``k * s + x`` -> (k, x) for a number ``k`` and a tensor ``x``; else None."""
        if not (isinstance(value, BinOp) and value.op == "+"):
            return None
        for first, second in ((value.left, value.right), (value.right, value.left)):
            if target in names(second) or not self.fits(target, second):
                continue
            if first == Name(target):
                return None, second
            if isinstance(first, BinOp) and first.op == "*":
                for k, s in ((first.left, first.right), (first.right, first.left)):
                    if s == Name(target) and self.kind(k) == "py":
                        return k, second
        return None

    def rebind_state(self, target: str, v: Val) -> None:
        """Give a state a new tensor: owned, bound to the state's variable, written back at the end of the step."""
        v = self.materialized(self.need_tensor(v, f"state {target!r}"))
        inputs = {self.param, self.grad} | {self.env[s].code for s in self.body.state_names}
        if not v.fresh and v.bufs & inputs:
            v = self.owned(v)
        for key, other in list(self.env.items()):  # values still reading the old state keep the old tensors
            if key != target and other.kind == "t" and other.code == target:
                alias = self.temp(target, "_old")
                self.env[key] = replace(other, code=alias, bufs=other.bufs | {alias})
        self.emit(f"{target} = {v.code}")
        self.env[target] = Val("t", target, bufs=v.bufs | {target}, shape=v.shape)
        if target not in self.rebound:
            self.rebound.append(target)

    def assign_local(self, target: str, value: Expr) -> None:
        v = self.expr(value)
        if v.kind == "t":
            if v.fresh:
                v = self.materialized(v)
                if target not in self.assigned:
                    self.rename(v.code, target)
                    v = replace(v, code=target, bufs=frozenset({target}))
            self.env[target] = replace(v, fresh=False)
            return
        self.emit(f"{target} = {v.code}")
        self.assigned.add(target)
        self.env[target] = Val(v.kind, target)

    def rename(self, old: str, new: str) -> None:
        pattern = re.compile(rf"\b{re.escape(old)}\b")
        self.lines = [pattern.sub(new, line) for line in self.lines]
        self.assigned.add(new)

    def update(self, lr: Val, direction: Expr, decay: Val | None) -> None:
        """``W <- W (1 - lr decay) - lr direction``, the last step one ``add_``, ``addcmul_`` or ``addcdiv_``."""
        factor, core = self.peel(direction)
        step = self.scalar("-{0}", UNARY, [lr], (UNARY,))
        if factor is not None:
            step = self.py_op("*", step, self.expr(factor))
        if isinstance(core, BinOp) and core.op in ("*", "/") and self.kind(core.left) == self.kind(core.right) == "t":
            a, b = self.before_decay(decay, self.expr(core.left), self.expr(core.right))
            inverse = None if b.scale is None else f"1 / {_factor(b.scale)}"
            scale = times(a.scale, b.scale if core.op == "*" else inverse)
            self.decay(lr, decay)
            op = "addcmul" if core.op == "*" else "addcdiv"
            return self.kernel_(op, self.param, a.code, b.code, value=times(step.code, scale))
        (d,) = self.before_decay(decay, self.need_tensor(self.expr(core), "the direction"))
        self.decay(lr, decay)
        return self.kernel_("add", self.param, d.code, alpha=times(step.code, d.scale))

    def peel(self, e: Expr) -> tuple[Expr | None, Expr]:
        """Split Python-number factors off the direction: ``c * (a / b) / k`` -> (c / k, a / b)."""
        if isinstance(e, Neg):
            factor, core = self.peel(e.arg)
            return (Num(Fraction(-1)) if factor is None else Neg(factor)), core
        if isinstance(e, BinOp) and e.op == "/" and self.kind(e.right) == "py":
            factor, core = self.peel(e.left)
            inverse = BinOp("/", Num(Fraction(1)), e.right)
            return (inverse if factor is None else BinOp("*", factor, inverse)), core
        if isinstance(e, BinOp) and e.op == "*":
            for s, rest in ((e.left, e.right), (e.right, e.left)):
                if self.kind(s) == "py":
                    factor, core = self.peel(rest)
                    return (s if factor is None else BinOp("*", s, factor)), core
        return None, e

    def before_decay(self, decay: Val | None, *values: Val) -> tuple[Val, ...]:
        """Copy direction operands that read ``W`` before the decay changes it in place."""
        if decay is None:
            return values
        return tuple(self.owned(v) if self.param in v.bufs else v for v in values)

    def decay_updated(self, lr: Val, decay: Val, form: str) -> None:
        """Decay of the updated weight: ``W <- W (1 - lr decay)`` (after) or ``W / (1 + lr decay)`` (proximal)."""
        rate = self.temp(self.py_op("*", lr, decay).code, "_decay")
        with self.block(f"if {rate}:"):
            if form == "after":
                self.kernel_("mul", self.param, f"1 - {rate}")
            else:
                self.kernel_("div", self.param, f"1 + {rate}")

    def decay(self, lr: Val, decay: Val | None) -> None:
        """``W <- W (1 - lr decay)``, skipped when ``lr * decay`` is 0."""
        if decay is None:
            return
        rate = self.temp(self.py_op("*", lr, decay).code, "_decay")
        with self.block(f"if {rate}:"):
            self.kernel_("mul", self.param, f"1 - {rate}")


def _result_shape(fn: str, shapes: list[str]) -> str | None:
    """The shape token of a tensor primitive's result."""
    if fn in ("fro_norm", "rms", "spectral_norm", "mean", "sum", "dot"):
        return "0"
    if fn in ("zeros", "clone", "orthogonalize", "matpow", "eye"):
        return shapes[0]
    if fn in ("atan2", "trust_ratio"):
        return broadcast(*shapes)
    return f"{fn}({','.join(shapes)})"
