"""Predicted coordinate-check slopes of a parameterization after one step, for a chain of layers.

A parameterization gives each role a multiplier ``n^m``, an init std ``n^b`` and a learning rate ``n^c``
(hyperparameters either at their derived exponents or fixed). For each layer of a chain
``input -> hidden ... -> output`` the first update changes its output features by

    own:         m + c + effect(U) - (o - i)/2         (the layer's own update on its batch-aligned input)
    propagated:  m + b + i/2 + change of the layer's input   (its initial weights acting on the changed input)

in entry exponents relative to Theta(1) features; the change is the larger of the two. The gradient each layer sees
follows from the readout: ``delta`` at the last hidden layer is ``W_out^T dL/dz``, so every layer below the readout gets
its gradient shifted by ``m_out + b_out + 1`` relative to muP. Under the derived parameterization every slope is 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from mupderive.calculus.evaluate import Layer
from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs
from mupderive.calculus.value import Frame, Value
from mupderive.derivation import LayerDerivation, derive, rational, rule_flags
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule
from mupderive.solver import FANS, Balanced, balance_layer, evaluate, make_layer

PARAMETERIZATIONS = ("derived", "standard")


@dataclass(frozen=True)
class Knobs:
    """Width exponents of one role's multiplier, init std and learning rate, and its hyperparameters."""

    multiplier: Exp
    init_std: Exp
    lr: Exp
    hyper: dict[str, Exp]


@dataclass(frozen=True)
class Coordinate:
    """Predicted exponents (of width) of a layer's feature change after one step."""

    layer: str
    role: str
    own: Exp
    propagated: Exp | None
    change: Exp  # max(own, propagated): slope of rms(h_1 - h_0) against log width
    activation: Exp  # slope of rms(h_1): max(0, change)


def knobs(rule: Rule, parameterization: str, convention: str = "spectral") -> dict[str, Knobs]:
    """Per role: the derived exponents, or the standard parameterization.

    Standard: multipliers 1, init std ``fan_in^-1/2``, one learning rate for all layers; every other hyperparameter
    stays in its base-width regime (its derived exponent), since the defaults (eps = 1e-8, ...) sit deep inside one
    regime at every practical width.
    """
    d = derive(rule, convention)
    if parameterization == "derived":
        return {role: Knobs(layer.multiplier, layer.init_std, layer.lr, dict(layer.hyper))
                for role, layer in d.layers.items()}
    if parameterization != "standard":
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}")
    out = {}
    for role, layer in d.layers.items():
        fan_in = Exp(FANS[role][1])
        out[role] = Knobs(ZERO, -fan_in * HALF, ZERO, dict(layer.hyper))
    return out


def first_step(rule: Rule | str, chain: list[tuple[str, str]], parameterization: str = "standard",
               convention: str = "spectral") -> list[Coordinate]:
    """Predict each layer's feature-change exponent after the first step; ``chain`` is [(layer name, role), ...]."""
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    fallback = load_rule(rule.fallback) if rule.fallback else None
    table = knobs(rule, parameterization, convention)
    readout = table["output"]
    shift = readout.multiplier + readout.init_std + 1  # delta below the readout, relative to muP's 1/fan_out
    out: list[Coordinate] = []
    previous: Exp | None = None
    for name, role in chain:
        k = table[role]
        o, i = (Exp(v) for v in FANS[role])
        applied = rule if role in rule.applies_to else fallback
        layer = make_layer(role, k.multiplier, k.init_std)
        layer = Layer(layer.role, o, i, k.multiplier, k.init_std, layer.vector, ZERO if role == "output" else shift)
        flags = rule_flags(applied)
        pins = {name: None if applied.hyper(name).default == 0 else e for name, e in k.hyper.items()}
        outcome = evaluate(applied, layer, flags, pins, balance=False)  # a hyperparameter set to 0 is absent
        effect = Frame({"o": o, "i": i}, Signs()).metric(outcome.direction, "effect")
        own = k.multiplier + k.lr + effect - (o - i) * HALF
        propagated = None if previous is None or role == "vector" else \
            k.multiplier + k.init_std + i * HALF + previous
        change = own if propagated is None else Signs().max(own, propagated)
        out.append(Coordinate(name, role, own, propagated, change, Signs().max(ZERO, change)))
        previous = change
    return out


def slopes(rule: Rule | str, chain: list[tuple[str, str]], parameterization: str = "standard",
           convention: str = "spectral") -> dict[str, dict[str, Fraction]]:
    """``{layer: {"change": slope, "activation": slope}}`` as exact fractions (for coordinate checks)."""
    return {c.layer: {"change": Fraction(str(rational(c.change))), "activation": Fraction(str(rational(c.activation)))}
            for c in first_step(rule, chain, parameterization, convention)}


# -- any parameterization under any alignment (Everett et al. 2024) ------------------------------------------------
EVERETT: dict[str, dict[str, tuple[Fraction, Fraction]]] = {
    # Everett et al. 2024, Table 1: multiplier n^-a and init std n^-b per layer, written here as (m, s) = (-a, -b)
    "sp": {"input": (Fraction(0), Fraction(0)), "hidden": (Fraction(0), Fraction(-1, 2)),
           "output": (Fraction(0), Fraction(-1, 2))},
    "ntk": {"input": (Fraction(0), Fraction(0)), "hidden": (Fraction(-1, 2), Fraction(0)),
            "output": (Fraction(-1, 2), Fraction(0))},
    "mup": {"input": (Fraction(1, 2), Fraction(-1, 2)), "hidden": (Fraction(0), Fraction(-1, 2)),
            "output": (Fraction(-1, 2), Fraction(-1, 2))},
    "mfp": {"input": (Fraction(0), Fraction(0)), "hidden": (Fraction(-1, 2), Fraction(0)),
            "output": (Fraction(-1), Fraction(0))},
}
CHAIN = ("input", "hidden", "output")  # forward order; vectors (biases, gains) ride on the hidden layers' gradient


@dataclass(frozen=True)
class Alignment:
    """How coherently each of a layer's three output-change terms sums over its fan_in ~ n^i: ``n^{k i}`` with k = 1
    (full alignment, a coherent sum) down to 1/2 (none: an incoherent one).

    own: ``dW z0`` (the update on the layer's input); propagated: ``W0 dz`` (the initial weights on the changed
    input); cross: ``dW dz``.
    """

    own: Exp
    propagated: Exp
    cross: Exp


ALIGNMENTS = {"full": Alignment(Exp(1), Exp(1) / 2, Exp(1)), "none": Alignment(Exp(1) / 2, Exp(1) / 2, Exp(1) / 2)}


@dataclass(frozen=True)
class LayerAnalysis:
    """One role under a parameterization: the largest stable lr and what the layer does there (exponents of n)."""

    role: str
    multiplier: Exp
    init_std: Exp
    lr: Exp  # the largest learning rate keeping the layer's output change O(1)
    feature_update: Exp  # the output change at that lr: 0 learns features, below 0 lazy
    terms: dict[str, Exp | None]  # own / propagated / cross at that lr
    gradient: Exp  # entry exponent of the gradient the layer sees
    hyper: dict[str, Exp]  # every scale-carrying hyperparameter kept in its regime at this gradient scale
    at_global_lr: Exp  # the output change when one lr (the smallest stable one) serves every layer
    mup_shift: Exp | None  # theta with (m, s, lr) = (m, s, lr) of muP moved by the abc-symmetry; None: no such theta
    balanced: Balanced | None = field(default=None, repr=False, compare=False)  # the rule's step at this gradient


@dataclass(frozen=True)
class Analysis:
    """A rule under one parameterization and alignment assumption (``mupderive analyze``)."""

    rule: Rule
    parameterization: str
    alignment: str
    layers: dict[str, LayerAnalysis]
    global_lr: Exp
    notes: tuple[str, ...] = ()

    @property
    def mup_equivalent(self) -> bool:
        """Every role is muP's (m, s, lr) moved along the abc-symmetry (so training is the same in exact arithmetic)."""
        return all(layer.mup_shift is not None for layer in self.layers.values())

    def to_json(self) -> dict:
        """The ``mupderive.analysis/1`` document: lr ~ n^E per role, exponents as strings such as ``"-1/2"``."""
        def e(x: Exp | None) -> str | None:
            return None if x is None else str(rational(x))

        return {"schema": ANALYSIS_SCHEMA, "rule": self.rule.name, "rule_sha256": self.rule.digest,
                "parameterization": self.parameterization, "alignment": self.alignment,
                "global_lr": e(self.global_lr), "mup_equivalent": self.mup_equivalent,
                "layers": {role: {"multiplier": e(x.multiplier), "init_std": e(x.init_std), "lr": e(x.lr),
                                  "feature_update": e(x.feature_update), "gradient": e(x.gradient),
                                  "terms": {k: e(v) for k, v in x.terms.items()},
                                  "hyper": {k: e(v) for k, v in x.hyper.items()},
                                  "at_global_lr": e(x.at_global_lr), "mup_shift": e(x.mup_shift)}
                           for role, x in self.layers.items()},
                "notes": list(self.notes)}


ANALYSIS_SCHEMA = "mupderive.analysis/1"
ALIGNMENT_SCHEMA = "mupderive.alignment/1"  # a measured table (mupderive.verify.coord.alignment)


def analyze(rule: Rule | str, parameterization: str | Mapping[str, Mapping[str, object]] = "sp",
            alignment: str | Mapping[str, Mapping[str, object]] = "full", name: str | None = None) -> Analysis:
    """The largest stable learning rate of every role under a parameterization and an alignment assumption.

    Per layer with multiplier n^m, init n^s and lr n^c, its output change has three terms (entries, relative to
    Theta(1) features), each a sum over fan_in ~ n^i with the alignment's coherence k:

        own = m + c + |U|(k_own),   propagated = m + s + k_prop i + r_prev,   cross = m + c + |U|(k_cross) + r_prev

    where |U|(k) = min(effect(U) + (i - o)/2, rms(U) + k i) is the update direction's action on its input (the
    calculus' coherent effect is the most a full alignment can give) and r_prev the change of the layer's input.
    The largest stable c keeps own and cross <= 0 and, for an update that scales with W itself (parameter scaling),
    the update's entries below W0's (``c + rms(U) <= s``); the layer learns features when its change r is 0.
    U comes from the rule at this parameterization's gradient: dL/dlogits has entries ~ 1, and each layer passes
    back ``m (W0 + dW)^T delta``. Every scale-carrying hyperparameter is balanced at that gradient (the epsilon
    underflow diagnosis). ``parameterization``: sp, ntk, mup, mfp (Everett et al.'s tables) or
    {role: {"multiplier": E, "init_std": E}}; ``alignment``: full, none or {role: {"own": k, "propagated": k,
    "cross": k}}.
    """
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    fallback = load_rule(rule.fallback) if rule.fallback else None
    table, p_name = _parameterization(parameterization)
    aligns, a_name = _alignments(alignment)
    signs, notes = Signs(), []
    derived = derive(rule)

    def applied(role: str) -> Rule:
        return rule if role in rule.applies_to else fallback

    # backward, for every choice of which layers above keep their initial weights dominant in the backward pass;
    # the largest stable lrs are the choice with the largest total (the LP over exponents: a larger readout lr
    # grows the gradient of every layer below it)
    choices = [_backward(table, aligns, applied, caps) for caps in itertools.product((False, True), repeat=2)]
    delta, bound, steps = max(choices, key=lambda c: sum(rational(c[1][r]) for r in CHAIN))
    if (through := delta["input"] - delta["hidden"]) != ZERO:
        notes.append(f"hidden: each hidden layer scales the backward gradient by n^{through}; this analysis has one "
                     f"hidden layer, so deeper networks compound it")
    # forward: each layer's change with its own largest stable lr, and with one lr for all
    global_lr = signs.min(*bound.values())
    layers: dict[str, LayerAnalysis] = {}
    previous: tuple[Exp, Exp] | None = None
    for role in CHAIN:
        m, s = table[role]
        i = Exp(FANS[role][1])
        balanced, direction, rms, act = steps[role]
        k = aligns[role]
        cross_act = _action(direction, role, rms, k.cross)
        lr = bound[role]
        if previous is not None:  # the cross term dW dz binds too
            lr = signs.min(lr, ZERO - m - cross_act - previous[0])
        terms, change = _terms(m, s, i, lr, act, cross_act, k, previous[0] if previous else None, signs)
        _, at_global = _terms(m, s, i, global_lr, act, cross_act, k, previous[1] if previous else None, signs)
        if terms["propagated"] is not None and signs.compare(terms["propagated"], ZERO) > 0:
            notes.append(f"{role}: the initial weights alone grow its output change as n^{terms['propagated']} "
                         f"(m + s + {k.propagated} i > 0): no learning rate is stable")
        layers[role] = LayerAnalysis(role, m, s, lr, change, terms, m + delta[role], dict(balanced.hyper),
                                     at_global, _mup_shift(derived.layers[role], m, s, lr), balanced)
        previous = (change, at_global)
    m, s = table["vector"]
    balanced, _, rms, act = _step(applied("vector"), "vector", m, s, delta["hidden"], Exp(0))
    lr = ZERO - m - act
    layers["vector"] = LayerAnalysis("vector", m, s, lr, ZERO, {"own": ZERO, "propagated": None, "cross": None},
                                     m + delta["hidden"], dict(balanced.hyper), global_lr - lr,
                                     _mup_shift(derived.layers["vector"], m, s, lr), balanced)
    return Analysis(rule, name or p_name, a_name, layers, global_lr, tuple(notes))


def _backward(table: dict[str, tuple[Exp, Exp]], aligns: dict[str, Alignment], applied: Callable[[str], Rule],
              caps: tuple[bool, ...]) -> tuple[dict[str, Exp], dict[str, Exp], dict[str, tuple]]:
    """From the readout down: the gradient entering each layer's output, its largest stable lr and its step.

    The backward pass multiplies by ``m (W0 + dW)^T``; ``caps`` (output, hidden) holds a layer's lr where its dW
    stops dominating W0 there (so the layers below see the smaller gradient), when that is below its own bound.
    """
    signs, below = Signs(), ZERO  # dL/dlogits
    delta, bound, steps = {}, {}, {}
    for role, cap in zip(reversed(CHAIN), (*caps, False), strict=True):
        m, s = table[role]
        o = Exp(FANS[role][0])
        delta[role] = below
        steps[role] = step = _step(applied(role), role, m, s, below, aligns[role].own)
        rms, act = step[2], step[3]
        bound[role] = ZERO - m - act
        if (scaled := _self_scaled(applied(role), role, m, s, below, rms)) is not None:
            bound[role] = signs.min(bound[role], scaled)
        if cap:
            bound[role] = signs.min(bound[role], s + o * HALF - o * aligns[role].own - rms)
        moved = bound[role] + rms  # entries of dW at that lr
        below = m + signs.max(s + o * HALF, moved + o * aligns[role].own) + below
    return delta, bound, steps


def _self_scaled(rule: Rule, role: str, m: Exp, s: Exp, delta: Exp, rms: Exp) -> Exp | None:
    """The lr bound of an update that scales with the weights it updates (parameter scaling, as Adafactor's
    ``RMS(W)`` factor; found by moving the init and seeing the update's entries move): ``lr + rms(U) <= s``.

    Beyond it the update outgrows W0, so W is its own accumulated update and each step multiplies it by a factor
    that grows with width. None when the update does not scale with W."""
    moved = _step(rule, role, m, s + 1, delta, Exp(1))[2]
    return None if moved == rms else s - rms


def _step(rule: Rule, role: str, m: Exp, s: Exp, delta: Exp, k: Exp) -> tuple[Balanced, Value, Exp, Exp]:
    """The rule's step at this gradient (entries ``m + delta``: grad_shift ``delta + o``): its hyperparameters
    balanced, and its direction with those that default to 0 absent (as the optimizer runs by default), the
    direction's entries and its action."""
    o, i = (Exp(v) for v in FANS[role])
    layer = Layer(role, o, i, m, s, role == "vector", delta + o)
    flags = rule_flags(rule)
    balanced = balance_layer(rule, layer, flags)
    pins = {name: None if rule.hyper(name).default == 0 else e for name, e in balanced.hyper.items()}
    direction = evaluate(rule, layer, flags, pins, balance=False).direction
    rms = Frame({"o": o, "i": i}, Signs()).metric(direction, "rms")
    return balanced, direction, rms, _action(direction, role, rms, k)


def _action(direction: Value, role: str, rms: Exp, k: Exp) -> Exp:
    """``|U|(k)``: U's action on an input with Theta(1) entries, summed over fan_in with coherence at most k."""
    o, i = (Exp(v) for v in FANS[role])
    effect = Frame({"o": o, "i": i}, Signs()).metric(direction, "effect")
    incoherent = rms + k * i
    return incoherent if effect is None else Signs().min(effect + (i - o) * HALF, incoherent)


def _terms(m: Exp, s: Exp, i: Exp, lr: Exp, act: Exp, cross_act: Exp, k: Alignment, previous: Exp | None,
           signs: Signs) -> tuple[dict[str, Exp | None], Exp]:
    """The three terms of a layer's output change at ``lr`` and the change itself (their max)."""
    own = m + lr + act
    if previous is None:
        return {"own": own, "propagated": None, "cross": None}, own
    propagated, cross = m + s + k.propagated * i + previous, m + lr + cross_act + previous
    return {"own": own, "propagated": propagated, "cross": cross}, signs.max(own, propagated, cross)


def _mup_shift(mup: LayerDerivation, m: Exp, s: Exp, lr: Exp) -> Exp | None:
    """theta with (m, s, lr) = (m_mu + theta, s_mu - theta, lr_mu - kappa theta), else None."""
    theta = m - mup.multiplier
    return theta if s == mup.init_std - theta and lr == mup.lr - mup.kappa * theta else None


def _exponent(value: object, where: str) -> Exp:
    """An exponent given as a number or a string such as "-1/2"."""
    try:
        return Exp(Fraction(str(value)))
    except (ValueError, ZeroDivisionError):
        raise MupError(f"{where}: expected an exponent such as -1/2, got {value!r}") from None


def _parameterization(spec: str | Mapping[str, Mapping[str, object]]) -> tuple[dict[str, tuple[Exp, Exp]], str]:
    """{role: (multiplier, init std)} exponents; vectors (biases, gains) get (0, 0) unless given."""
    if isinstance(spec, str):
        if spec not in EVERETT:
            raise MupError(f"unknown parameterization {spec!r}; expected one of {', '.join(EVERETT)} or a table")
        rows, name = {role: {"multiplier": m, "init_std": s} for role, (m, s) in EVERETT[spec].items()}, spec
    else:
        rows, name = spec, "table"
    out = {}
    for role in (*CHAIN, "vector"):
        row = rows.get(role, {"multiplier": 0, "init_std": 0} if role == "vector" else None)
        if not isinstance(row, Mapping) or set(row) - {"multiplier", "init_std"} or len(row) != 2:
            raise MupError(f"parameterization {role}: expected {{\"multiplier\": E, \"init_std\": E}}, got {row!r}")
        out[role] = (_exponent(row["multiplier"], f"parameterization {role}.multiplier"),
                     _exponent(row["init_std"], f"parameterization {role}.init_std"))
    if unknown := set(rows) - {*CHAIN, "vector"}:
        raise MupError(f"parameterization: unknown role {sorted(unknown)[0]!r}; expected input, hidden, output, vector")
    return out, name


def _alignments(spec: str | Mapping[str, Mapping[str, object]]) -> tuple[dict[str, Alignment], str]:
    """{role: Alignment}: a named assumption for every role, or a table (missing roles and terms: full), bare or
    the ``roles`` of a ``mupderive.alignment/1`` document (what ``coord-check --measure-alignment`` writes)."""
    if isinstance(spec, str):
        if spec not in ALIGNMENTS:
            raise MupError(f"unknown alignment {spec!r}; expected one of {', '.join(ALIGNMENTS)} or a table")
        return dict.fromkeys((*CHAIN, "vector"), ALIGNMENTS[spec]), spec
    if "schema" in spec:
        if spec["schema"] != ALIGNMENT_SCHEMA or not isinstance(spec.get("roles"), Mapping):
            raise MupError(f"alignment: expected a {ALIGNMENT_SCHEMA} document with a \"roles\" table, got schema "
                           f"{spec['schema']!r}")
        spec = spec["roles"]
    full = ALIGNMENTS["full"]
    out = {}
    for role in (*CHAIN, "vector"):
        row = spec.get(role, {})
        if not isinstance(row, Mapping) or set(row) - {"own", "propagated", "cross"}:
            raise MupError(f"alignment {role}: expected {{\"own\": k, \"propagated\": k, \"cross\": k}}, got {row!r}")
        values = {t: _exponent(row[t], f"alignment {role}.{t}") if t in row else getattr(full, t)
                  for t in ("own", "propagated", "cross")}
        for term, v in values.items():
            if not Fraction(1, 2) <= v.const <= 1:
                raise MupError(f"alignment {role}.{term} = {v}: expected a coherence between 1/2 and 1")
        out[role] = Alignment(**values)
    if unknown := set(spec) - {*CHAIN, "vector"}:
        raise MupError(f"alignment: unknown role {sorted(unknown)[0]!r}; expected input, hidden, output, vector")
    return out, "table"
