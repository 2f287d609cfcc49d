"""From scales to prescriptions: init, multiplier, learning rate and every scale-carrying hyperparameter per layer.

Per layer with multiplier ``n^m``, spectral condition (THEORY section 2) on the effective weight ``n^m W``::

    init:  m + init + max(o, i)/2 = (o - i)/2          (|W_eff|_* = sqrt(fan_out / fan_in))
    lr:    m + lr + s(U) = (o - i)/2                   (|dW_eff|_* = sqrt(fan_out / fan_in))

with the hyperparameter exponents inside ``U`` fixed by regime preservation (the balance points of
:mod:`mupderive.calculus.evaluate`). The abc-symmetry degree is ``kappa = lr(m) - lr(m + 1)``; an ``if_fixed`` scenario
pins one hyperparameter at exponent 0, the others at the rule's defaults (one that defaults to 0 is absent), and lets
the larger term win everywhere. A ``total(x)``, summed over all parameters, scales as its largest contribution among
the model's layers (:func:`global_statistics`, stated as a note).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

from mupderive.calculus.evaluate import (
    LR_SYMBOL,
    Comparison,
    Conflict,
    Evaluator,
    Layer,
    Outcome,
    Term,
    hyper_symbol,
    reads_lr,
)
from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs, Undecidable
from mupderive.calculus.value import Frame
from mupderive.errors import CalculusError, MupError
from mupderive.language.ir import names
from mupderive.language.printer import show_expr
from mupderive.language.rule import ROLES, Body, Rule

FANS: dict[str, tuple[int, int]] = {"input": (1, 0), "hidden": (1, 1), "output": (0, 1), "vector": (1, 0)}
CONVENTIONS: dict[str, dict[str, Fraction]] = {
    "spectral": {},  # all multipliers 1: TP-V Table 3 exponents
    "mup-package": {"output": Fraction(-1)},  # the mup package's MuReadout: multiplier 1/width_mult
}
KNOBS = ("multiplier", "init_std", "lr")
_FLOORS = {"sum", "max", "damping"}  # a larger hyperparameter is more active here (eps-like)
CEILINGS = {"min", "clip"}  # a smaller hyperparameter is more active here (clamp-like)


@dataclass(frozen=True)
class Fix:
    """A user-fixed knob: ``ROLE.KNOB=EXPONENT``."""

    role: str
    knob: str
    value: Fraction

    def __str__(self) -> str:
        return f"{self.role}.{self.knob}={self.value}"


def parse_fix(text: str) -> Fix:
    """Parse ``output.multiplier=-1`` (the exponent of width; rationals like ``-1/2`` allowed)."""
    match = re.fullmatch(r"\s*([a-z]+)\.([a-z_]+)\s*=\s*(-?\d+(?:/\d+)?)\s*", text)
    if not match:
        raise MupError(f"--fix {text!r}: expected ROLE.KNOB=EXPONENT, e.g. output.multiplier=-1")
    role, knob, value = match.groups()
    if role not in ROLES:
        raise MupError(f"--fix {text!r}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if knob not in KNOBS:
        raise MupError(f"--fix {text!r}: unknown knob {knob!r}; expected one of {', '.join(KNOBS)}")
    return Fix(role, knob, Fraction(value))


@dataclass
class Balanced:
    """A layer evaluated with every hyperparameter at its regime-preserving exponent."""

    layer: Layer
    outcome: Outcome
    hyper: dict[str, Exp]
    lr: Exp
    notes: list[str]


def init_bound(o: Exp, i: Exp, m: Exp, signs: Signs) -> Exp:
    """Largest init std exponent meeting the spectral condition: ``sigma (sqrt(fan_out) + sqrt(fan_in))``."""
    return (o - i) * HALF - m - signs.max(o, i) * HALF


def update_norm(outcome: Outcome, layer: Layer, signs: Signs) -> Exp:
    """Spectral-norm exponent of the direction ``U`` (the decay term is balanced against it separately)."""
    spec = Frame({"o": layer.o, "i": layer.i}, signs).metric(outcome.direction, "spec")
    if spec is None:
        raise CalculusError(f"the update of the {layer.role} layer is identically zero")
    return spec


def spectral_lr(layer: Layer, spec: Exp, path: str) -> Exp:
    """``lr = (o - i)/2 - m - spec(U)``; where the rule reads lr, ``spec(U) = a + b lr`` and the fixed point is
    ``lr = ((o - i)/2 - m - a) / (1 + b)`` (lr assumed constant over steps)."""
    b = spec.coefficient(LR_SYMBOL)
    if b == 0:
        return layer.target - layer.m - spec
    if b == -1:
        raise CalculusError(f"{path}: the {layer.role} update's spectral norm scales as 1/lr: no learning rate "
                            f"meets the spectral condition")
    return (layer.target - layer.m - spec.subs({LR_SYMBOL: ZERO})) / (1 + b)


_MEMO: dict[tuple, Outcome] = {}


def evaluate(rule: Rule, layer: Layer, flags: dict[str, bool], pins: dict[str, Exp], balance: bool,
             signs: Signs | None = None, lr: Exp | None = None) -> Outcome:
    """Scales of one layer's step (memoized for numeric layers: fallbacks and conventions share evaluations). Where
    the rule reads lr, its exponent is ``lr`` if given, else first a symbol, solved from the spectral condition, then
    substituted."""
    if lr is not None and not reads_lr(rule.body(layer.role if layer.vector else "matrix"), rule.lr.name):
        lr = None  # the step does not depend on it: one memo entry
    outcome = _evaluate(rule, layer, flags, pins, balance, signs, lr)
    spec = Frame({"o": layer.o, "i": layer.i}, signs or Signs()).metric(outcome.direction, "spec")
    if spec is None or LR_SYMBOL not in spec.symbols:
        return outcome
    return _evaluate(rule, layer, flags, pins, balance, signs, spectral_lr(layer, spec, rule.path or rule.name))


def _evaluate(rule: Rule, layer: Layer, flags: dict[str, bool], pins: dict[str, Exp], balance: bool,
              signs: Signs | None, lr: Exp | None) -> Outcome:
    body = rule.body(layer.role if layer.vector else "matrix")
    if signs is not None and signs.assumptions:
        totals = global_statistics(rule, layer, flags, signs)
        return Evaluator(rule.path or rule.name, body, rule.hypers, layer, signs, pins, flags, balance, lr,
                         totals).run()
    key = (rule.digest, layer, tuple(sorted(flags.items())), tuple(sorted(pins.items(), key=str)),
           balance, lr)
    if key not in _MEMO:
        if len(_MEMO) > 4096:
            _MEMO.clear()
        _MEMO[key] = Evaluator(rule.path or rule.name, body, rule.hypers, layer, Signs(), pins, flags,
                               balance, lr, global_statistics(rule, layer, flags, Signs())).run()
    return _MEMO[key]


def _contributions(rule: Rule, layer: Layer, flags: dict[str, bool], signs: Signs) -> dict[str, Exp]:
    """Each ``total(x)``'s own term ``x`` in ``layer``, with every scale hyperparameter at exponent 0 (so a scalar
    shared by all layers, like Prodigy's ``d``, has one exponent in all of them); ``dW`` at the spectral scale."""
    body = rule.body(layer.role if layer.vector else "matrix")
    pins = {h.name: ZERO for h in rule.scale_hypers}
    found = Evaluator(rule.path or rule.name, body, rule.hypers, layer, signs, pins, flags, False).run().contributions
    for call in body.totals:
        e = found.get(show_expr(call.args[0]))
        if e is not None and LR_SYMBOL in e.symbols:
            raise CalculusError(f"{rule.path or rule.name}:{call.loc.line}:{call.loc.col}: {show_expr(call)} reads "
                                f"the learning rate, whose exponent differs between layers: its largest "
                                f"contribution cannot be told; move lr out of total()")
    return found


def global_statistics(rule: Rule, layer: Layer, flags: dict[str, bool], signs: Signs
                      ) -> dict[str, tuple[Exp, str]] | None:
    """``total(x)`` sums ``x`` over every parameter; it scales as its largest contribution (THEORY section 6).
    Returns, per ``x``, the gap from this layer's ``x`` to the largest of the model's layers (input, hidden, output,
    vector at the spectral condition, multipliers 1, this layer as it is) and the note that states it; None where
    the rule has no total() or the layer is the optimizer's only parameter (``totals="alone"``)."""
    body = rule.body(layer.role if layer.vector else "matrix")
    if not body.totals:
        return None
    if layer.totals == "alone" or layer.variable != "n":
        return None
    key = (rule.digest, layer, tuple(sorted(flags.items())), tuple(sorted(signs.assumptions.items())))
    if key in _STATS:
        return _STATS[key]
    own = _contributions(rule, layer, flags, signs)
    others = {role: _standard_contributions(rule, role, tuple(sorted(flags.items())))
              for role in ROLES if role in rule.applies_to and role != layer.role}
    out = {}
    for text, mine in own.items():
        terms = {role: c[text] for role, c in others.items() if text in c}
        try:
            top = signs.max(*terms.values(), mine)
            terms[layer.role], beyond = mine, ""
        except Undecidable:  # symbolic fans (general formulas): this layer joins a model of the standard roles
            if not terms:
                raise
            top = Signs().max(*terms.values())
            beyond = f"; this layer's own n^{mine} is taken not to exceed it"
        leaders = [role for role, e in terms.items() if signs.compare(e, top) == 0]
        who = "every layer" if len(leaders) == len(terms) else (
            f"the {' and '.join(leaders)} layer{'s' if len(leaders) > 1 else ''}")
        listed = ", ".join(f"{role} n^{e}" for role, e in terms.items())
        where = next(n.loc for n in body.totals if show_expr(n.args[0]) == text)
        note = (f"{rule.path or rule.name}:{where.line}:{where.col}: total({text}) sums over all parameters and is "
                f"taken at its largest contribution, n^{top} from {who} ({listed}; "
                f"each at the spectral condition with multipliers 1 and the scale hyperparameters at n^0, the "
                f"{layer.role} layer as derived here{beyond}), so this layer's own term is scaled by "
                f"n^{top - mine}; a model whose largest layer differs changes this exponent")
        out[text] = (top - mine, note)
    _STATS[key] = out
    return out


_STATS: dict[tuple, dict[str, tuple[Exp, str]]] = {}
_STANDARD: dict[tuple, dict[str, Exp]] = {}


def _standard_contributions(rule: Rule, role: str, flags: tuple[tuple[str, bool], ...]) -> dict[str, Exp]:
    """:func:`_contributions` of a standard layer of ``role`` (memoized: every layer's totals compare with them)."""
    key = (rule.digest, role, flags)
    if key not in _STANDARD:
        _STANDARD[key] = _contributions(rule, make_layer(role, ZERO), dict(flags), Signs())
    return _STANDARD[key]


def gradient_inputs(body: Body) -> set[str]:
    """Which of G and H the direction depends on, following locals and states back to the inputs."""
    defs: dict[str, set[str]] = {name: names(init) for name, init in body.state}
    for stmt in body.compute:
        defs[stmt.target] = defs.get(stmt.target, set()) | names(stmt.value)
    seen, todo = set(), list(names(body.direction))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(defs.get(name, ()))
    return seen & {"G", "H"}


def balance_layer(rule: Rule, layer: Layer, flags: dict[str, bool], signs: Signs | None = None) -> Balanced:
    """Solve every scale-carrying hyperparameter by regime preservation, then the learning rate."""
    body = rule.body(layer.role if layer.vector else "matrix")
    if not gradient_inputs(body):
        raise CalculusError(f"{rule.path or rule.name}:{body.direction.loc.line}:{body.direction.loc.col}: the "
                            f"direction {show_expr(body.direction)} does not depend on the gradient: no learning "
                            f"rate makes it learn features")
    signs = signs or Signs()
    unused = [h.name for h in rule.scale_hypers if h.name not in body.reads]  # '-' in tables: not this rule's
    pins: dict[str, Exp | None] = dict.fromkeys(unused)
    notes: list[str] = []
    for _ in range(len(rule.hypers) + 2):
        try:
            outcome = evaluate(rule, layer, flags, pins, True, signs)
        except Conflict as clash:
            pins[clash.hyper] = _resolve(clash, signs, notes, layer.variable)
            continue
        if outcome.free:
            for name in outcome.free:
                pins[name] = ZERO
                notes.append(f"{name} enters no comparison that fixes its scale (only an overall factor the "
                             f"learning rate absorbs): kept {independent(layer.variable)}")
            continue
        hyper = {h.name: outcome.solved.get(hyper_symbol(h.name), pins.get(h.name, ZERO))
                 for h in rule.scale_hypers if h.name not in unused}
        lr = layer.target - layer.m - update_norm(outcome, layer, signs)
        return Balanced(layer, outcome, hyper, lr, notes + [f"assumed: {a}" for a in outcome.assumed])
    raise CalculusError(f"{rule.name}: could not settle the hyperparameters of the {layer.role} layer")


def independent(variable: str) -> str:
    """How a message says "scales as variable^0"."""
    return {"n": "width-independent", "L": "depth-independent"}.get(variable, f"independent of {variable}")


def _resolve(clash: Conflict, signs: Signs, notes: list[str], v: str = "n") -> Exp:
    have = dict(clash.first.solved)[clash.hyper]
    ops = {clash.first.op, clash.second.op}
    if ops <= _FLOORS:
        chosen, why = signs.min(have, clash.need), "the smaller exponent keeps it from dominating either"
    elif ops <= CEILINGS:
        chosen, why = signs.max(have, clash.need), "the larger exponent keeps it from binding in either"
    else:
        raise CalculusError(f"contradiction: {clash.hyper} must scale as {v}^{have} to balance {clash.first.text} "
                            f"but as {v}^{clash.need} to balance {clash.second.text}")
    notes.append(f"{clash.hyper} enters two balance points needing {v}^{have} ({clash.first.text}) and "
                 f"{v}^{clash.need} ({clash.second.text}); both cannot hold, so {v}^{chosen}: {why}")
    return chosen


def make_layer(role: str, m: Exp, init: Exp | None = None, signs: Signs | None = None,
               fans: tuple[Exp, Exp] | None = None, totals: str = "model") -> Layer:
    """A layer with multiplier ``n^m``; ``init`` defaults to the spectral bound; ``totals`` says what a total()
    sums over (the model's layers, or this parameter ``"alone"``)."""
    o, i = fans or (Exp(FANS[role][0]), Exp(FANS[role][1]))
    signs = signs or Signs()
    return Layer(role, o, i, m, init_bound(o, i, m, signs) if init is None else init, vector=role == "vector",
                 totals=totals)


@dataclass(frozen=True)
class Regime:
    """What happens when one hyperparameter is kept independent of the scaling variable, the others at the rule's
    defaults: those that default to 0 (``absent``) are left out, the rest scaled as derived. ``with_set`` is the same
    scenario with the absent ones set and scaled as derived (None when there are none)."""

    text: str
    lr: Exp
    kappa: Exp
    comparisons: tuple[Comparison, ...]
    outcome: Outcome | None = field(default=None, compare=False, repr=False)  # the pinned step (None: nothing moved)
    absent: tuple[str, ...] = ()
    with_set: Regime | None = field(default=None, compare=False, repr=False)


def if_fixed(rule: Rule, balanced: Balanced, shifted: Balanced, name: str, flags: dict[str, bool]) -> Regime:
    """Pin ``name`` at exponent 0, at the rule's defaults (hyperparameters defaulting to 0 absent, others as
    derived), and see which terms win at large width (or depth); where it differs, also say what happens with those
    set."""
    layer, derived = balanced.layer, balanced.hyper[name]
    if derived == ZERO:
        step = (shifted.layer.m - layer.m).const
        return Regime(_regime_text(name, derived, (), balanced.lr, balanced.lr, ZERO, layer.variable), balanced.lr,
                      (balanced.lr - shifted.lr) / step, ())
    absent = tuple(h.name for h in rule.scale_hypers if h.default == 0 and h.name != name and h.name in balanced.hyper)
    with_set = _pinned(rule, balanced, shifted, name, flags, ())
    if not absent:
        return with_set
    try:
        at_defaults = _pinned(rule, balanced, shifted, name, flags, absent)
    except CalculusError as exc:
        return replace(with_set, text=f"{with_set.text} (with {', '.join(absent)} set; at the default 0 the step "
                                      f"cannot be bounded: {exc})")
    text, listed = at_defaults.text, ", ".join(absent)
    if (at_defaults.lr, at_defaults.kappa) != (with_set.lr, with_set.kappa):
        setting = "the default 0" if len(absent) == 1 else "their default 0"
        text += (f" (with {listed} at {setting}; with {listed} set and scaled as derived instead, "
                 f"{_lr_text(with_set.lr, balanced.lr, with_set.kappa, layer.variable)})")
    return replace(at_defaults, text=text, absent=absent, with_set=with_set)


def _pinned(rule: Rule, balanced: Balanced, shifted: Balanced, name: str, flags: dict[str, bool],
            absent: tuple[str, ...]) -> Regime:
    """The step with ``name`` at exponent 0, ``absent`` set to 0 and the other hyperparameters as derived."""
    layer, derived = balanced.layer, balanced.hyper[name]
    step = (shifted.layer.m - layer.m).const  # kappa per unit of multiplier exponent (a small step stays in regime)
    zeroed: dict[str, Exp | None] = dict.fromkeys(absent)
    pins = dict(balanced.hyper) | {name: ZERO} | zeroed
    lr = layer.target - layer.m - update_norm(evaluate(rule, layer, flags, pins, False), layer, Signs())
    outcome = evaluate(rule, layer, flags, pins, False, lr=balanced.lr)  # the step at the derived lr (what is run)
    kappa = (balanced.lr - shifted.lr) / step
    if lr != balanced.lr:  # a new regime: how does the update respond to rescaling the gradient there?
        shifted_pins = dict(shifted.hyper) | {name: ZERO} | zeroed
        kappa = (lr - (shifted.layer.target - shifted.layer.m - update_norm(
            evaluate(rule, shifted.layer, flags, shifted_pins, False), shifted.layer, Signs()))) / step
    touched = tuple(c for c in outcome.comparisons if name in c.direct) or tuple(
        c for c in outcome.comparisons  # e.g. a state whose initial value carries the hyperparameter
        if c.op != "decay" and any(name in t.hypers for t in c.terms) and not all(name in t.hypers for t in c.terms))
    return Regime(_regime_text(name, derived, touched, lr, balanced.lr, kappa, layer.variable), lr, kappa, touched,
                  outcome)


def _regime_text(name: str, derived: Exp, touched: tuple[Comparison, ...], lr: Exp, lr_derived: Exp,
                 kappa: Exp, v: str = "n") -> str:
    if derived == ZERO:
        return f"unchanged: {name} is already {independent(v)} in this layer"
    parts = []
    for comparison in _unique(touched):
        mine = [t for t in comparison.terms if name in t.hypers and t.e is not None]
        other = [t for t in comparison.terms if name not in t.hypers and t.e is not None]
        if mine and other:
            parts.append(_dominance(comparison, mine[0], max(other, key=lambda t: t.e.const), v))
    where = "; ".join(parts) or f"{name} drifts away from its balance point"
    grows = "grows" if derived.const < 0 else "shrinks"
    return f"{name} {grows} relative to what it is compared with: {where}; {_lr_text(lr, lr_derived, kappa, v)}"


def _lr_text(lr: Exp, lr_derived: Exp, kappa: Exp, v: str = "n") -> str:
    if lr == lr_derived:
        return "the learning-rate exponent is unchanged"
    return f"the update becomes {behaviour(kappa)} and needs lr ~ {v}^{lr} instead of {v}^{lr_derived}"


def _dominance(comparison: Comparison, mine: Term, other: Term, v: str = "n") -> str:
    """How a fixed hyperparameter's term relates to its counterpart at large width (or depth)."""
    sizes = f"({v}^{mine.e} vs {v}^{other.e})"
    if mine.e.const == other.e.const:
        return f"{mine.text} stays balanced with {other.text}"
    larger = mine.e.const > other.e.const
    if comparison.op in CEILINGS:
        if larger:
            return f"{mine.text} no longer binds in {comparison.text} {sizes}"
        return f"{mine.text} always binds in {comparison.text}: it saturates at {mine.text} {sizes}"
    if larger:
        return f"{mine.text} dominates {other.text} {sizes}"
    return f"{mine.text} becomes negligible next to {other.text} {sizes}"


def behaviour(kappa: Exp) -> str:
    """Name the update's response to rescaling the gradient, from the symmetry degree kappa."""
    names = {Fraction(2): "proportional to the gradient (SGD-like)",
             Fraction(1): "independent of the gradient's scale (sign/Adam-like)",
             Fraction(0): "proportional to the weights (parameter-scaled)"}
    return names.get(kappa.const, f"homogeneous with symmetry degree kappa = {kappa}") if kappa.is_const() else \
        f"homogeneous with symmetry degree {kappa}"


def _unique(comparisons: tuple[Comparison, ...]) -> list[Comparison]:
    seen, out = set(), []
    for c in comparisons:
        if (c.text, c.op) not in seen:
            seen.add((c.text, c.op))
            out.append(c)
    return out
