"""Walk a rule body for one layer and compute the scale of everything in it.

The layer's inputs come from the spectral condition (THEORY section 3): the gradient is low-rank with
``|G|_* = n^{(i-o)/2 + m}``; the weight is its init (dense, entry RMS ``n^init``) plus accumulated updates at the
spectral scale; the Hutchinson estimate is dense noise of size ``|G|_F`` times ``G``'s entries; ``dW = W - W0`` is
those accumulated updates alone (for a step run at a given lr: ``lr`` times the step). ``total(x)`` is this layer's
``x`` scaled by the gap to the largest layer's, which the solver supplies.

Every sum or comparison whose terms depend on different scale-carrying hyperparameters is a *balance point*: with
``balance=True`` the evaluator solves for the unknown hyperparameter exponent that keeps the terms of the same
order (regime preservation); otherwise (hyperparameters pinned, as in an ``if_fixed`` scenario) the larger term
simply wins. Either way each comparison is recorded, for the explanation and the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property

from mupderive.calculus.demand import sum_metrics
from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs, Undecidable
from mupderive.calculus.value import Frame, Part, Value, scalar
from mupderive.errors import CalculusError, RuleError
from mupderive.language.check import PARAM_SHAPES, Checker
from mupderive.language.ir import BinOp, Call, Cond, Expr, Loc, Name, Neg, Num, Transpose, When, const_value
from mupderive.language.printer import show_expr
from mupderive.language.rule import Body, Hyper

MAX_STEPS = 8  # steps simulated before states must have reached their steady scale


LR_SYMBOL = "lr:"  # the learning-rate exponent, where a rule reads lr (solved for by the solver)


def reads_lr(body: Body, lr_name: str) -> bool:
    """Whether a step of ``body`` depends on the learning rate: it reads ``lr``, or ``dW`` (the steps taken at it)."""
    return bool({lr_name, "dW"} & body.reads)


def hyper_symbol(name: str) -> str:
    return f"hyper:{name}"


@dataclass(frozen=True)
class Layer:
    """A layer's exponents of one scaling variable (the width ``n`` or the depth ``L``): fans ``(o, i)``, forward
    multiplier ``m`` and init std; the depth pass (:mod:`mupderive.depth`) shifts the gradient and the update target."""

    role: str
    o: Exp
    i: Exp
    m: Exp
    init: Exp | None  # None: zero init
    vector: bool = False
    grad_shift: Exp = ZERO  # extra exponent of the backpropagated gradient (0 under the spectral condition)
    target_shift: Exp = ZERO  # extra exponent of the update target |dW_eff|_* (0: the spectral condition's)
    variable: str = "n"  # the scaling variable the exponents are powers of, as messages name it
    totals: str = "model"  # total(): summed over the model's layers ("model") or this parameter only ("alone")

    @property
    def shape(self) -> tuple[str, ...]:
        return PARAM_SHAPES["vector" if self.vector else "matrix"]

    @property
    def grad_norm(self) -> Exp:
        """``|G|_*`` (= ``|G|_F``): ``|delta| |x| = n^{-o/2} n^{i/2}``, times the multiplier."""
        return (self.i - self.o) * HALF + self.m + self.grad_shift

    @property
    def target(self) -> Exp:
        """The spectral condition's ``|dW_eff|_*`` (and ``|W_eff|_*`` when unshifted): ``sqrt(fan_out / fan_in)``."""
        return (self.o - self.i) * HALF + self.target_shift


@dataclass(frozen=True)
class Term:
    text: str
    e: Exp | None
    hypers: frozenset[str]


@dataclass(eq=False)
class Comparison:
    """A sum or comparison inside the rule: its terms' exponents under ``metric``, and what it decided.

    Texts are rendered lazily: most comparisons are never printed.
    """

    node: Expr
    op: str  # sum | max | min | clip | atan2 | damping | decay
    metric: str
    sizes: tuple[tuple[Exp | None, frozenset[str]], ...]
    solved: tuple[tuple[str, Exp], ...] = ()
    labels: tuple[str, ...] | None = None  # term texts, when they are not simply the operands

    @property
    def loc(self) -> Loc:
        return self.node.loc

    @cached_property
    def text(self) -> str:
        return show_expr(self.node)

    @cached_property
    def terms(self) -> tuple[Term, ...]:
        labels = self.labels or tuple(show_expr(x) for x in _operands(self.node))
        return tuple(Term(text, e, hypers) for text, (e, hypers) in zip(labels, self.sizes, strict=False))

    @cached_property
    def direct(self) -> frozenset[str]:
        """Names appearing in the operands outside any nested comparison."""
        return frozenset().union(*(_direct_names(x) for x in _operands(self.node)))

    @cached_property
    def direct_by_term(self) -> tuple[frozenset[str], ...] | None:
        """Per term, the names its operand reads outside nested comparisons (None where the terms are not the
        operands one to one: clip's bound, a damping's ``eps * eye``)."""
        operands = _operands(self.node)
        if len(operands) != len(self.sizes):
            return None
        return tuple(_direct_names(x) for x in operands)


@dataclass
class Outcome:
    """The scales of one layer's step: direction ``U``, total ``U + decay W``, and every comparison made."""

    values: dict[str, Value]
    direction: Value
    total: Value
    comparisons: list[Comparison]
    solved: dict[str, Exp]
    free: list[str] = field(default_factory=list)
    assumed: tuple[str, ...] = ()  # what the calculus took for granted (e.g. the span a basis rotates)
    contributions: dict[str, Exp] = field(default_factory=dict)  # total(x): this layer's x, by the text of x


class Conflict(Exception):
    """A hyperparameter enters two balance points that need different exponents."""

    def __init__(self, hyper: str, first: Comparison, second: Comparison, need: Exp) -> None:
        super().__init__(hyper)
        self.hyper, self.first, self.second, self.need = hyper, first, second, need


_ANALYSES: dict[tuple[int, int, str], tuple[Body, tuple[Hyper, ...], Checker, dict[int, str]]] = {}


def _analysis(path: str, body: Body, hypers: tuple[Hyper, ...], kind: str) -> tuple[Checker, dict[int, str]]:
    """Shapes and sum metrics of a body, computed once per body (the body is kept alive with its entry)."""
    key = (id(body), id(hypers), kind)
    if key not in _ANALYSES:
        checker = Checker(path, hypers, kind)
        checker.body(body)
        _ANALYSES[key] = (body, hypers, checker, sum_metrics(body, checker))
    _, _, checker, metrics = _ANALYSES[key]
    return checker, metrics


class Evaluator:
    """One evaluation of a body for one layer; see the module docstring."""

    def __init__(self, path: str, body: Body, hypers: tuple[Hyper, ...], layer: Layer, signs: Signs,
                 pinned: dict[str, Exp | None], flags: dict[str, bool], balance: bool, lr: Exp | None = None,
                 totals: dict[str, tuple[Exp, str]] | None = None) -> None:
        self.path, self.body, self.layer, self.signs = path, body, layer, signs
        self.lr = Exp.sym(LR_SYMBOL) if lr is None else lr  # lr read in expressions: constant over steps
        self.hypers = {h.name: h for h in hypers}
        self.order = [h.name for h in hypers]
        self.pinned, self.flags, self.balance = pinned, flags, balance
        self.param_frame = Frame({"o": layer.o, "i": layer.i, "r": ZERO}, signs)
        # transpose_wide: a wider-than-tall matrix runs the body on its transpose (rows = the longer side)
        self.transposed = body.transpose_wide and not layer.vector and signs.compare(layer.o, layer.i) < 0
        self.frame = Frame({"o": layer.i, "i": layer.o, "r": ZERO}, signs) if self.transposed else self.param_frame
        self.checker, self.metrics = _analysis(path, body, hypers, "vector" if layer.vector else "matrix")
        self.solved: dict[str, Exp] = {}
        self.solved_by: dict[str, Comparison] = {}
        self.comparisons: list[Comparison] = []
        self.assumed: dict[str, str] = {}  # basis primitive -> the assumption made, at its first use
        # total(x): the exponent gap from this layer's x to the largest contribution, and the note stating it
        self.totals = totals or {}
        self.contributions: dict[str, Exp] = {}

    # -- the layer's inputs ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Value]:
        layer, shape = self.layer, self.layer.shape
        g = layer.grad_norm
        g_rms = g - (layer.o + layer.i) * HALF
        weight = [Part("outer", layer.target - layer.m)]
        if layer.init is not None:
            weight.append(Part("dense", layer.init))
        env = {
            "G": Value(shape, (Part("outer", g),)),
            "W": self.frame.merge(shape, weight),
            # the accumulated updates: batch-aligned at the spectral condition's scale (zero only at the first step)
            "dW": Value(shape, (Part("outer", layer.target - layer.m),)),
            "H": Value(shape, (Part("dense", g_rms + g),)),
            "t": scalar(ZERO, True),
            "fan_in": scalar(layer.o if self.transposed else layer.i, True),
            "fan_out": scalar(layer.i if self.transposed else layer.o, True),
        }
        for name, hyper in self.hypers.items():
            if hyper.role == "lr":
                env[name] = scalar(self.lr, hyper.default >= 0)
            elif hyper.role == "width-free" and not isinstance(hyper.default, bool | str):
                env[name] = scalar(ZERO, hyper.default >= 0) if hyper.default != 0 else Value((), ())
            elif hyper.role == "scale" and name in self.pinned and self.pinned[name] is None:
                env[name] = Value((), ())  # pinned absent: the hyperparameter is set to 0
            elif hyper.role == "scale":
                e = self.pinned.get(name, Exp.sym(hyper_symbol(name)))
                env[name] = scalar(e, hyper.default >= 0, frozenset({name}))
        return env

    # -- the whole step --------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        base = self.inputs()
        states = {name: self.expr(init, base) for name, init in self.body.state}
        previous = None
        for _ in range(MAX_STEPS):
            self.comparisons = []  # solutions persist: a state carries its solved scale into the next step
            env = dict(base) | states
            for stmt in self.body.compute:
                env[stmt.target] = self.guard(stmt.value, env)
            direction = self.guard(self.body.direction, env)
            if self.transposed:  # back to the parameter's orientation (norms and entries are unchanged)
                direction = self.frame.transpose(Value(direction.shape[::-1], direction.parts))
            total = direction
            if self.body.decay is not None:
                # after/proximal decay act on the updated weight: (W - lr U)(1 - lr d) = W(1 - lr d) - lr U (1 - lr d)
                # and 1/(1 + lr d) likewise; lr d is width-independent at balance, so the factor on U is Theta(1)
                # and the balance is that of decoupled decay
                decay = self.guard(self.body.decay, env)
                body_frame, self.frame = self.frame, self.param_frame
                try:
                    weight = self.frame.mul(decay, base["W"])
                    total = self.compare(self.body.decay_sum, "decay", "effect", [direction, weight])
                finally:
                    self.frame = body_frame
            new_states = {name: self.settle(env[name]) for name in states}
            if "dW" in self.body.reads and LR_SYMBOL not in self.lr.symbols:
                # a step run at a given lr moves W by lr (U + decay W) each step, on or off the spectral scale
                # (its parts name no hyperparameter: the whole step sets them, none is compared through them)
                moved = self.settle(self.frame.scale(self.param_frame.broadcast(total, self.layer.shape), self.lr))
                moved = Value(moved.shape, tuple(replace(p, hypers=frozenset()) for p in moved.parts))
                base["dW"] = self.frame.transpose(Value(moved.shape[::-1], moved.parts)) if self.transposed else moved
            snapshot = new_states | {"dW": base["dW"]}
            if snapshot == previous:
                free = sorted({s for v in env.values() for p in self.settle(v).parts for s in p.e.symbols})
                values = {name: self.settle(value) for name, value in env.items()}
                return Outcome(values, self.settle(direction), self.settle(total), self.comparisons,
                               dict(self.solved), [s.split(":", 1)[1] for s in free if s.startswith("hyper:")],
                               tuple(self.assumed.values()), dict(self.contributions))
            previous, states = snapshot, new_states
        grown = [n for n in states if previous and previous.get(n) != states.get(n)]
        raise CalculusError(f"{self.path}: state {', '.join(grown) or '?'} has no steady width scale: it keeps "
                            f"growing with width step after step")

    def settle(self, value: Value) -> Value:
        """``value`` with every solved hyperparameter exponent substituted."""
        if not self.solved or all(not p.e.coef and (p.floor is None or not p.floor.coef) for p in value.parts):
            return value
        return Value(value.shape, tuple(replace(p, e=p.e.subs(self.solved),
                                                floor=None if p.floor is None else p.floor.subs(self.solved))
                                        for p in value.parts))

    def guard(self, expr: Expr, env: dict[str, Value]) -> Value:
        """Evaluate, turning calculus failures into messages that name the responsible term."""
        try:
            return self.expr(expr, env)
        except (CalculusError, Undecidable) as exc:
            if isinstance(exc, Undecidable) and LR_SYMBOL in exc.diff.symbols:
                raise CalculusError(f"{self.path}:{expr.loc.line}:{expr.loc.col}: in {show_expr(expr)}: which term "
                                    f"is larger depends on the learning rate's own width exponent (lr is read "
                                    f"here; mupderive solves for that exponent, assuming a constant lr), so this "
                                    f"comparison cannot be closed before the learning rate is known") from None
            if isinstance(exc, Undecidable) and self.signs.assumptions:
                raise  # symbolic fans: the caller splits cases
            what = _undecided(exc) if isinstance(exc, Undecidable) else str(exc)
            raise CalculusError(f"{self.path}:{expr.loc.line}:{expr.loc.col}: in {show_expr(expr)}: {what}") from None

    # -- expressions -----------------------------------------------------------------------------------------
    def expr(self, node: Expr, env: dict[str, Value]) -> Value:
        f = self.frame
        if isinstance(node, Num):
            return Value((), ()) if node.value == 0 else scalar(ZERO, node.value > 0)
        if isinstance(node, Name):
            return env[node.id]
        if isinstance(node, Neg):
            return f.neg(self.expr(node.arg, env))
        if isinstance(node, Transpose):
            return f.transpose(self.expr(node.arg, env))
        if isinstance(node, Cond):
            chosen = node.then if self.flags[node.flag] else node.orelse
            return self.expr(chosen, env)
        if isinstance(node, When):  # steady scale: the larger of the two branches, whichever steps take which
            return f.add(self.expr(node.then, env), self.expr(node.orelse, env))
        if isinstance(node, BinOp):
            return self.binop(node, env)
        assert isinstance(node, Call)
        return self.call(node, env)

    def binop(self, node: BinOp, env: dict[str, Value]) -> Value:
        f = self.frame
        a, b = self.expr(node.left, env), self.expr(node.right, env)
        if node.op in "+-":
            metric = self.metrics.get(id(node), "rms")
            out = self.compare(node, "sum", metric, [a, b], [show_expr(node.left), show_expr(node.right)])
            return f.neg(out) if node.op == "-" and not b.is_zero else out
        if node.op == "*":
            return f.mul(a, b)
        if node.op == "/":
            if b.is_zero:
                raise CalculusError("division by an exactly-zero quantity")
            return f.mul(a, f.power(b, Fraction(-1), "odd"))
        if node.op == "@":
            shape = a.shape[:-1] + b.shape[1:]
            return f.matmul(a, b, shape)
        exponent = const_value(node.right)
        if exponent is None:  # width-free base to a step-dependent power, e.g. beta1 ** t
            base = self.settle(a)
            if a.shape or a.is_zero or f.metric(base, "rms") != ZERO:
                raise CalculusError("a non-constant power needs a width-independent scalar base (like beta ** t)")
            return scalar(ZERO, True)
        if exponent.denominator != 1 and a.shape and not a.nonneg:  # torch.pow gives NaN at negative entries
            raise RuleError(self.path, node.loc.line, node.loc.col,
                            f"{show_expr(node)}: a fractional power of a quantity that can be negative",
                            f"abs({show_expr(node.left)}) ** {show_expr(node.right)}, or sqrt() of a quantity "
                            f"known to be nonnegative such as a variance")
        parity = "pos" if exponent.denominator != 1 else ("even" if exponent.numerator % 2 == 0 else "odd")
        return f.power(a, exponent, parity)

    def call(self, node: Call, env: dict[str, Value]) -> Value:
        f, fn = self.frame, node.fn
        if fn == "zeros":  # only the argument's shape matters
            return Value(self.checker.shape(node.args[0], in_init=True), ())
        if fn == "eye":
            return Value(self.checker.shape(node.args[0], in_init=True), (Part("eye", ZERO, True),))
        args = [self.expr(a, env) for a in node.args]
        texts = [show_expr(a) for a in node.args]
        if fn == "sqrt":
            return f.power(args[0], HALF, "pos")
        if fn == "abs":
            return f.power(args[0], Fraction(1), "even")
        if fn == "sign":
            return f.power(args[0], Fraction(0), "odd")
        if fn in ("max", "min"):
            return self.compare(node, fn, "rms", args, texts)
        if fn == "clip":
            bounds = [b for b in args[1:] if not b.is_zero]
            bound = bounds[0] if len(bounds) == 1 else self.compare(node, "max", "rms", bounds, texts[1:])
            return self.compare(node, "clip", "rms", [args[0], bound], [texts[0], "|".join(texts[1:])])
        if fn == "trust_ratio":  # the guard only matters for exactly-zero norms: the generic branch is a / b
            return f.mul(args[0], f.power(args[1], Fraction(-1), "odd"))
        if fn == "atan2":
            ratio = f.mul(args[0], f.power(args[1], Fraction(-1), "odd"))
            self.record(node, "atan2", "rms", args, texts)
            return f.clip(ratio, scalar(ZERO, True))
        if fn == "ema":  # beta * old + (1 - beta) * x with beta width-free: balanced as that sum is
            if f.metric(self.settle(args[2]), "rms") not in (ZERO, None):
                raise CalculusError("ema's beta must be width-independent")
            return self.compare(node, "sum", self.metrics.get(id(node), "rms"), args[:2], texts[:2])
        if fn == "matpow":
            a = args[0]
            if len(args) == 3:
                a = self.compare(node, "damping", "spec", [a, f.mul(args[2], Value(a.shape, (Part("eye", ZERO),)))],
                                 [texts[0], f"{texts[2]} * eye"])
            return f.matpow(self.settle(a), const_value(node.args[1]))
        if fn in ("eigbasis", "left_singular", "right_singular"):
            self.assumed.setdefault(fn, f"{self.path}:{node.loc.line}:{node.loc.col}: "
                                    f"{show_expr(node)} is taken to span the gradients it rotates (its leading "
                                    f"vectors hold the batch span, as when every batch comes from one span like the "
                                    f"oracle's synthetic layer); a gradient component outside them would spread over "
                                    f"the other basis vectors and be normalised Adam-like there")
        if fn == "eigbasis":
            return f.basis(self.settle(args[0]), args[0].shape)
        if fn in ("left_singular", "right_singular"):
            side = args[0].shape[0] if fn == "left_singular" else args[0].shape[1]
            return f.basis(self.settle(args[0]), (side, "r"))
        if fn == "orthogonalize":
            return f.orthogonalize(args[0])
        if fn in ("fro_norm", "spectral_norm", "rms", "mean"):
            metric = {"fro_norm": "fro", "spectral_norm": "spec", "rms": "rms", "mean": "mean"}[fn]
            return f.norm(self.settle(args[0]), metric)
        if fn in ("row_mean", "col_mean"):
            return f.axis_mean(args[0], 1 if fn == "row_mean" else 0)
        if fn == "sum":
            return f.entry_sum(self.settle(args[0]))
        if fn == "dot":
            self.assumed.setdefault(fn, f"{self.path}:{node.loc.line}:{node.loc.col}: {show_expr(node)}: two "
                                    f"batch-built quantities are taken aligned, their inner product a coherent sum "
                                    f"|a|_F |b|_F (as when the updates follow the gradients' directions)")
            return f.dot(self.settle(args[0]), self.settle(args[1]))
        if fn == "total":
            own = self.settle(args[0])
            if own.is_zero:
                return own
            text = texts[0]
            self.contributions[text] = f.metric(own, "rms")
            alone = ("the only parameter" if self.layer.variable == "n" else
                     f"the sum over the blocks as {self.layer.variable} grows is not analysed")
            gap, note = self.totals.get(text, (ZERO, f"{self.path}:{node.loc.line}:{node.loc.col}: {show_expr(node)} "
                                                     f"is taken as this parameter's own {text} ({alone})"))
            self.assumed.setdefault(f"total:{text}", note)
            return f.scale(own, gap)
        if fn == "outer":
            return f.outer(args[0], args[1])
        raise CalculusError(f"no scaling rule for {fn}()")

    # -- balance points --------------------------------------------------------------------------------------
    def record(self, node: Expr, op: str, metric: str, values: list[Value], texts: list[str] | None = None,
               solved: tuple[tuple[str, Exp], ...] = ()) -> Comparison:
        shape = next((v.shape for v in values if v.shape), ())
        sizes = tuple((self.frame.metric(self.settle(self.frame.broadcast(v, shape)), metric), v.hypers)
                      for v in values)
        comparison = Comparison(node, op, metric, sizes, solved, tuple(texts) if texts else None)
        self.comparisons.append(comparison)
        return comparison

    def compare(self, node: Expr, op: str, metric: str, values: list[Value], texts: list[str] | None = None
                ) -> Value:
        """Combine ``values`` (a sum, max, min or clip), first balancing them if hyperparameters set them apart."""
        f = self.frame
        if metric == "rms" and any(p.local for v in values for p in v.parts):
            metric = "entry"  # a quantity in a basis' coordinates: compare its nonzero entries
        live = [v for v in values if not v.is_zero]
        if len(live) >= 2 and self.balance:
            self.balance_terms(node, op, metric, values, texts)
        else:
            self.record(node, op, metric, values, texts)
        settled = [self.settle(v) for v in values]
        if op in ("sum", "decay"):
            out = settled[0]
            for v in settled[1:]:
                out = f.add(out, v)
            return out
        if op == "max":
            return f.maximum(settled[0], settled[1])
        if op == "min":
            return f.minimum(settled[0], settled[1])
        if op == "clip":
            return f.clip(settled[0], settled[1])
        return f.add(settled[0], settled[1])  # damping: A + eps I

    def balance_terms(self, node: Expr, op: str, metric: str, values: list[Value], texts: list[str] | None
                      ) -> None:
        shape = next((v.shape for v in values if v.shape), ())
        live = [v for v in values if not v.is_zero]
        raw = [self.frame.metric(self.frame.broadcast(v, shape), metric) for v in live]
        if not any(s.startswith("hyper:") for e in raw[1:] for s in (e - raw[0]).symbols):
            self.record(node, op, metric, values, texts)  # no hyperparameter sets the terms apart
            return
        solved: list[tuple[str, Exp]] = []
        for e in raw[1:]:
            diff = (e - raw[0]).subs(self.solved)
            unknown = [n for n in reversed(self.order) if hyper_symbol(n) in diff.symbols]
            if unknown:
                name = unknown[0]
                sym = hyper_symbol(name)
                value = -(diff.subs({sym: ZERO})) / diff.coefficient(sym)
                self.solved = {k: v.subs({sym: value}) for k, v in self.solved.items()} | {sym: value}
                solved.append((name, value))
            elif diff != ZERO:
                self.conflict(node, op, metric, values, texts, e, raw[0])
        comparison = self.record(node, op, metric, values, texts, tuple(solved))
        for name, _ in solved:
            self.solved_by[name] = comparison

    def conflict(self, node: Expr, op: str, metric: str, values: list[Value], texts: list[str] | None,
                 e: Exp, first: Exp) -> None:
        """The terms cannot all be balanced: some hyperparameter was already fixed by another balance point."""
        diff = e - first
        for name in reversed(self.order):
            sym = hyper_symbol(name)
            if name in self.solved_by and sym in diff.symbols:
                others = {k: v for k, v in self.solved.items() if k != sym}
                reduced = diff.subs(others)
                need = -(reduced.subs({sym: ZERO})) / reduced.coefficient(sym)
                here = self.record(node, op, metric, values, texts)
                raise Conflict(name, self.solved_by[name], here, need)
        comparison = self.record(node, op, metric, values, texts)
        raise CalculusError(f"{self.path}:{node.loc.line}:{node.loc.col}: the terms of {comparison.text} cannot be "
                            f"balanced: " + ", ".join(f"{t.text} ~ {self.layer.variable}^{t.e}"
                                                       for t in comparison.terms))


def _undecided(exc: Undecidable) -> str:
    """An open order in user terms: which hyperparameters' width exponents ``e(name)`` it depends on."""
    unknown = sorted(s.split(":", 1)[1] for s in exc.diff.symbols if s.startswith("hyper:"))
    if not unknown:
        return str(exc)
    return (f"which term is larger depends on the width exponent e({'), e('.join(unknown)}) of {', '.join(unknown)} "
            f"(the sign of {exc.diff} is open) and no sum or comparison fixes it before this point")


_NESTED = {"max", "min", "clip", "atan2", "matpow", "ema"}


def _operands(node: Expr) -> tuple[Expr, ...]:
    """The compared operands of a comparison node (a sum's two sides, a call's arguments)."""
    if isinstance(node, BinOp):
        return (node.left, node.right)
    if isinstance(node, Call) and node.fn == "ema":
        return node.args[:2]  # beta is a width-free weight, not a compared term
    return node.children()


def _direct_names(expr: Expr) -> frozenset[str]:
    """Names in ``expr`` that are not inside a nested sum or comparison."""
    if isinstance(expr, Name):
        return frozenset({expr.id})
    if isinstance(expr, BinOp) and expr.op in "+-" or isinstance(expr, Call) and expr.fn in _NESTED:
        return frozenset()
    return frozenset().union(*(_direct_names(c) for c in expr.children()))
