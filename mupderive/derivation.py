"""``derive(rule)``: the full derivation of a rule, per layer role and as general formulas in fan_in/fan_out.

The result is exact (sympy Rationals at the boundary), renders in Jupyter (``_repr_latex_``) and serializes to the
stable JSON contract ``mupderive.derivation/1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import sympy

from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs, Undecidable
from mupderive.depth import BRANCH_ROLES, Depth, DepthDerivation, DepthLayer, depth_alpha, derive_depth_layer
from mupderive.errors import CalculusError, MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import ROLES, Rule
from mupderive.literals import literal_notes
from mupderive.solver import (
    CONVENTIONS,
    FANS,
    Balanced,
    Fix,
    Regime,
    balance_layer,
    if_fixed,
    init_bound,
    make_layer,
)

SCHEMA = "mupderive.derivation/1"
ONE = Exp(1)
FAN_IN, FAN_OUT = sympy.symbols("fan_in fan_out", positive=True)


def rational(e: Exp) -> sympy.Rational:
    """A constant exponent as an exact sympy Rational."""
    if not e.is_const():
        raise CalculusError(f"exponent {e} still depends on {', '.join(sorted(e.symbols))}")
    return sympy.Rational(e.const.numerator, e.const.denominator)


@dataclass(frozen=True)
class LayerDerivation:
    """Everything derived for one layer role."""

    role: str
    rule: str  # the rule applied to this role (the fallback where the main rule does not apply)
    fan_out: Exp
    fan_in: Exp
    multiplier: Exp
    init_std: Exp
    lr: Exp
    hyper: dict[str, Exp]
    if_fixed: dict[str, Regime]
    kappa: Exp
    balanced: Balanced
    notes: tuple[str, ...] = ()

    def exponents(self) -> dict[str, sympy.Rational]:
        """Exact exponents of the three knobs and every hyperparameter."""
        out = {"multiplier": rational(self.multiplier), "init_std": rational(self.init_std), "lr": rational(self.lr)}
        return out | {name: rational(e) for name, e in self.hyper.items()}

    @property
    def grad_norm(self) -> Exp:
        """``|G|_F ~ n^{(i - o)/2 + m}``: this layer's share of a global gradient norm (what a clip threshold meets)."""
        return self.balanced.layer.grad_norm


@dataclass(frozen=True)
class TiedDerivation:
    """One tensor used twice: as the embedding (rows looked up, the input role) and, transposed, as the readout
    (logits ``n^r W h``). It has one init, one lr and one set of hyperparameters, the embedding's; the readout
    multiplier ``n^r`` is the one at which the output role's spectral bound equals that init, and the tie is sound
    when the output role derived at ``r`` asks for the same lr, hyperparameters and gradient scale.
    """

    embedding: LayerDerivation
    readout: LayerDerivation  # the output role re-derived at the readout multiplier
    conflicts: tuple[str, ...]  # what no single tensor can meet (empty: the tie is sound)

    @property
    def rule(self) -> str:
        return self.embedding.rule

    @property
    def grad_norm(self) -> Exp:
        """Both uses' gradients are of this order (a conflict otherwise), so their sum is too."""
        return self.embedding.grad_norm

    def exponents(self) -> dict[str, sympy.Rational]:
        """The embedding-side multiplier, the readout multiplier, the tensor's init, lr and hyperparameters."""
        out = self.embedding.exponents()
        return {"multiplier": out.pop("multiplier"), "readout_multiplier": rational(self.readout.multiplier)} | out


@dataclass(frozen=True)
class AttentionDerivation:
    """The attention logit multiplier ``s`` in ``s q.k``, as an exponent of the head_dim ratio.

    q and k are outputs of layers under the spectral condition (entries ~ 1); their dot product sums head_dim terms,
    incoherently at init (~ head_dim^{1/2}) and coherently once training correlates q and k (~ head_dim), so the
    logits stay ~ 1 during training iff ``s ~ head_dim^{-1}``; the usual ``head_dim^{-1/2}`` leaves them growing as
    ``head_dim^{1/2}``. Only a growing head_dim moves it: more heads of a fixed size change nothing.
    """

    logit_scale: Exp  # trained (coherent) sum: the derived scale
    at_init: Exp  # what keeps the logits ~ 1 at init only (the standard parameterization's choice)

    @property
    def standard_drift(self) -> Exp:
        """How the logits grow with head_dim after training under the init-only scale."""
        return self.at_init - self.logit_scale


@dataclass(frozen=True)
class Derivation:
    """A rule's width exponents in one convention (and its depth exponents when asked for)."""

    rule: Rule
    convention: str
    fixes: tuple[Fix, ...]
    layers: dict[str, LayerDerivation]
    cases: dict[str, tuple[Exp, Exp, Exp]] = field(default_factory=dict)  # per quantity: fan_out >, =, < fan_in
    tied: TiedDerivation | None = None
    attention: AttentionDerivation = field(default_factory=lambda: attention_scale())
    depth: DepthDerivation | None = None  # exponents of L / L_base when derived with ``depth=``

    @cached_property
    def formulas(self) -> dict[str, sympy.Expr]:
        """init_std, lr and each hyperparameter as sympy expressions in fan_in and fan_out (multiplier 1)."""
        return {quantity: _combine(list(forms)) for quantity, forms in self.cases.items()}

    @property
    def kappa(self) -> sympy.Rational | dict[str, sympy.Rational]:
        """The abc-symmetry degree: one number when every role agrees, else per role."""
        values = {role: rational(layer.kappa) for role, layer in self.layers.items()}
        distinct = set(values.values())
        return distinct.pop() if len(distinct) == 1 else values

    def to_json(self) -> dict:
        """The ``mupderive.derivation/1`` document (every exponent a string such as ``"-1/2"``)."""
        kappa = self.kappa
        out = {
            "schema": SCHEMA,
            "rule": self.rule.name,
            "rule_sha256": self.rule.digest,
            "convention": self.convention,
            "fixes": [str(f) for f in self.fixes],
            "kappa": {k: str(v) for k, v in kappa.items()} if isinstance(kappa, dict) else str(kappa),
            "formulas": {q: str(f) for q, f in self.formulas.items()},
            "layers": {role: _layer_json(layer) for role, layer in self.layers.items()},
            "tied": _tied_json(self.tied) if self.tied else None,
            "attention": {"logit_scale": str(rational(self.attention.logit_scale)),
                          "at_init": str(rational(self.attention.at_init))},
        }
        if self.depth is not None:  # the contract's keys, then what explains them beside it
            out["depth"], out["depth_detail"] = self.depth.to_json()
            for role, layer in self.depth.layers.items():
                out["layers"][role]["depth"], out["layers"][role]["depth_detail"] = _depth_json(layer)
        return out

    def _repr_latex_(self) -> str:
        from mupderive.render import latex_table

        return latex_table(self, display=True)

    def _repr_markdown_(self) -> str:
        from mupderive.render import markdown_table

        return markdown_table(self)


def _layer_json(layer: LayerDerivation) -> dict:
    out = {
        "rule": layer.rule,
        "fan_out": str(rational(layer.fan_out)),
        "fan_in": str(rational(layer.fan_in)),
        "init_std": str(rational(layer.init_std)),
        "multiplier": str(rational(layer.multiplier)),
        "lr": str(rational(layer.lr)),
        "kappa": str(rational(layer.kappa)),
        "grad_norm": str(rational(layer.grad_norm)),
        "hyper": {name: str(rational(e)) for name, e in layer.hyper.items()},
        "if_fixed": {name: {"regime": r.text, "lr": str(rational(r.lr))} for name, r in layer.if_fixed.items()},
    }
    if layer.notes:
        out["notes"] = list(layer.notes)
    return out


def _depth_json(layer: DepthLayer) -> tuple[dict, dict]:
    """A role's depth exponents where it sits (all 0 outside the branches); beside them its scope, gradient norm,
    fixed-hyperparameter diagnoses and, for a role outside the branches, what it would take inside one."""
    def knobs(exponents: dict[str, sympy.Rational]) -> dict:
        text = {k: str(v) for k, v in exponents.items()}
        return {k: text.pop(k) for k in ("multiplier", "init_std", "lr")} | {"hyper": text}

    inside = layer.scope == "branch"
    detail = {"scope": layer.scope, "grad_norm": str(rational(layer.grad_norm)) if inside else "0",
              "if_fixed": {name: {"regime": r.text, "lr": str(rational(r.lr))} for name, r in layer.if_fixed.items()}
              if inside else {}}
    if not inside:
        detail["in_branch"] = knobs(layer.exponents())
    elif layer.notes:
        detail["notes"] = list(layer.notes)
    return knobs(layer.applied()), detail


def _tied_json(tied: TiedDerivation) -> dict:
    exponents = tied.exponents()
    knobs = {k: str(exponents.pop(k)) for k in ("multiplier", "readout_multiplier", "init_std", "lr")}
    return {"rule": tied.rule, **knobs, "grad_norm": str(rational(tied.grad_norm)),
            "hyper": {name: str(e) for name, e in exponents.items()}, "conflicts": list(tied.conflicts)}


def attention_scale(head_dim: Exp = ONE) -> AttentionDerivation:
    """Logit scale exponents for q.k over ``head_dim ~ n^h``, q and k entries ~ 1: coherent ``-h``, at init ``-h/2``."""
    entries = ZERO  # q and k are layer outputs under the spectral condition
    trained, at_init = entries * 2 + head_dim, entries * 2 + head_dim * HALF
    return AttentionDerivation(ZERO - trained, ZERO - at_init)


def derive(rule: Rule | str | Path, convention: str = "spectral", fixes: tuple[Fix, ...] | list[Fix] = (),
           options: dict[str, bool] | None = None, layers: dict[str, tuple[Fraction, Fraction]] | None = None,
           depth: Depth | None = None, totals: str = "model") -> Derivation:
    """Derive every layer role's exponents for ``rule`` (a :class:`Rule`, built-in name or file path).

    ``layers`` adds matrices with any fan exponents, e.g. ``{"ffn": (1, 1), "bottleneck": (Fraction(1, 2), 1)}``;
    they use the rule that covers hidden matrices (and sit inside residual branches). ``depth`` adds the exponents
    of the depth ratio (:mod:`mupderive.depth`). ``totals="alone"`` derives every layer as the optimizer's only
    parameter (a ``total()`` is its own term: what the oracle runs), the default as one layer of the whole model.
    """
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    if convention not in CONVENTIONS:
        raise MupError(f"unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    fallback = load_rule(rule.fallback) if rule.fallback else None
    fans = {role: (Exp(o), Exp(i)) for role, (o, i) in FANS.items()}
    for name, (o, i) in (layers or {}).items():
        if name in ROLES or Fraction(o) < 0 or Fraction(i) < 0:
            raise MupError(f"layer {name!r} with fans ({o}, {i}): expected a new name and nonnegative exponents")
        fans[name] = (Exp(Fraction(o)), Exp(Fraction(i)))
    results, deep = {}, {}
    alpha, broken = depth_alpha(depth) if depth is not None else (Fraction(0), ())
    for role, role_fans in fans.items():
        covered = role if role in ROLES else "hidden"
        applied = rule if covered in rule.applies_to else fallback
        knobs = {f.knob: Exp(f.value) for f in fixes if f.role == role}
        m0 = CONVENTIONS[convention].get(role, Fraction(0))
        results[role] = _derive_layer(applied, role, m0, knobs, rule_flags(applied, options), role_fans, totals)
        if depth is not None:
            scope = "branch" if covered in BRANCH_ROLES else "outside"
            deep[role] = derive_depth_layer(applied, role, alpha, role == "vector", rule_flags(applied, options),
                                            scope)
    tied = derive_tied(results["input"], rule if "output" in rule.applies_to else fallback, options)
    depth_result = None if depth is None else DepthDerivation(alpha, depth.branch_matrices, depth.alpha is not None,
                                                              broken, deep)
    return Derivation(rule, convention, tuple(fixes), results, general_formulas(rule, rule_flags(rule, options)), tied,
                      depth=depth_result)


def derive_tied(embedding: LayerDerivation, readout_rule: Rule | None, options: dict[str, bool] | None
                ) -> TiedDerivation | None:
    """The tied embedding/readout: the output role at the multiplier whose spectral init is the embedding's.

    ``init_bound(o, i, r) = init_bound(o, i, 0) - r`` for the readout, so ``r = init_bound(0) - init_embedding``;
    then lr, every hyperparameter and the gradient scale of the readout use at ``r`` must equal the embedding's.
    """
    if readout_rule is None:
        return None
    o, i = (Exp(f) for f in FANS["output"])
    r = init_bound(o, i, ZERO, Signs()) - embedding.init_std
    readout = _derive_layer(readout_rule, "output", Fraction(0), {"multiplier": r}, rule_flags(readout_rule, options),
                            (o, i), diagnose=False)
    conflicts = []
    if readout.rule != embedding.rule:
        conflicts.append(f"the embedding uses rule {embedding.rule} and the readout {readout.rule}")
    wanted = {"lr": (embedding.lr, readout.lr), "gradient norm": (embedding.grad_norm, readout.grad_norm)}
    wanted |= {name: (e, readout.hyper.get(name)) for name, e in embedding.hyper.items()}
    for what, (emb, out) in wanted.items():
        if out is not None and emb != out:
            conflicts.append(f"{what}: the embedding use needs n^{emb}, the readout use (multiplier n^{r}) n^{out}")
    return TiedDerivation(embedding, readout, tuple(conflicts))


def rule_flags(rule: Rule, options: dict[str, bool] | None = None) -> dict[str, bool]:
    """The rule's boolean hyperparameters at their defaults, with ``options`` (``--set``) applied."""
    flags = {h.name: h.default for h in rule.hypers if isinstance(h.default, bool)}
    for name, value in (options or {}).items():
        if name in flags:
            flags[name] = bool(value)
    return flags


def _derive_layer(rule: Rule, role: str, m0: Fraction, knobs: dict[str, Exp], flags: dict[str, bool],
                  fans: tuple[Exp, Exp], totals: str = "model", diagnose: bool = True) -> LayerDerivation:
    """One role's knobs and hyperparameters; ``diagnose``: also its ``if_fixed`` regimes and literal notes (the tied
    readout's re-derivation only compares exponents)."""
    signs = Signs()
    probe = make_layer(role, ZERO, fans=fans, totals=totals)
    bound0 = init_bound(probe.o, probe.i, ZERO, signs)
    m = knobs.get("multiplier", Exp(m0))
    init = None
    if "init_std" in knobs:
        if "multiplier" in knobs:
            bound = bound0 - m
            relation = signs.compare(knobs["init_std"], bound)
            if relation > 0 or (relation < 0 and role != "output"):
                smaller = " or smaller" if role == "output" else ""
                raise MupError(f"{role}.init_std=n^{knobs['init_std']} with multiplier n^{m} breaks the spectral "
                               f"condition: it needs init_std = n^{bound}{smaller}")
            init = knobs["init_std"]
        else:
            m = bound0 - knobs["init_std"]  # keep the init at the spectral bound by moving the multiplier
    balanced = balance_layer(rule, make_layer(role, m, init, fans=fans, totals=totals), flags)
    shifted = balance_layer(rule, make_layer(role, m + 1, fans=fans, totals=totals), flags)
    at_bound = balanced if init is None else balance_layer(rule, make_layer(role, m, fans=fans, totals=totals), flags)
    kappa = at_bound.lr - shifted.lr  # abc-symmetry: init moves with the multiplier
    if "lr" in knobs and knobs["lr"] != balanced.lr:
        if "multiplier" in knobs or "init_std" in knobs or kappa == ZERO:
            raise MupError(f"{role}.lr=n^{knobs['lr']} contradicts the other fixed knobs: the spectral condition "
                           f"gives lr = n^{balanced.lr}" + (" (kappa = 0: no multiplier can change it)"
                                                            if kappa == ZERO else ""))
        m = m + (balanced.lr - knobs["lr"]) / kappa.const
        balanced = balance_layer(rule, make_layer(role, m, fans=fans, totals=totals), flags)
        shifted = balance_layer(rule, make_layer(role, m + 1, fans=fans, totals=totals), flags)
    used = [h for h in rule.scale_hypers if h.name in balanced.hyper]  # the others: not read by this role's rule
    regimes = {h.name: if_fixed(rule, balanced, shifted, h.name, flags) for h in used} if diagnose else {}
    notes = list(balanced.notes) + (literal_notes(rule, balanced, shifted, flags) if diagnose else [])
    notes += [f"{h.name} defaults to 0: its exponent applies once you set it" for h in used if h.default == 0]
    layer = balanced.layer
    return LayerDerivation(role, rule.name, layer.o, layer.i, layer.m, layer.init, balanced.lr, balanced.hyper,
                           regimes, kappa, balanced, tuple(notes))


# -- general formulas in fan_in / fan_out ---------------------------------------------------------------------
def general_formulas(rule: Rule, flags: dict[str, bool]) -> dict[str, tuple[Exp, Exp, Exp]]:
    """init_std, lr and each hyperparameter as exponents affine in ``o``, ``i`` (multiplier 1), per fan order.

    The calculus runs with the fan exponents as symbols, once for each order of fan_out and fan_in; where the three
    cases disagree the formula carries a min or max (or a piecewise expression). Empty when a case is undecidable.
    """
    o, i, d = Exp.sym("o"), Exp.sym("i"), Exp.sym("d")
    # fan_out >= fan_in and fan_out <= fan_in; the diagonal is either one at d = 0
    cases = [({"o": i + d}, Signs({"i": "0+", "d": "0+"})), ({"i": o + d}, Signs({"o": "0+", "d": "0+"}))]
    results = []
    for subs, signs in cases:
        fan_o, fan_i = o.subs(subs), i.subs(subs)
        try:
            balanced = balance_layer(rule, make_layer("matrix", ZERO, signs=signs, fans=(fan_o, fan_i)),
                                     flags, signs)
        except (Undecidable, CalculusError):
            return {}
        values = {"init_std": balanced.layer.init, "lr": balanced.lr} | balanced.hyper
        results.append(values)
    above, below = results
    return {q: (above[q].subs({"d": o - i}), above[q].subs({"d": ZERO, "o": i}), below[q].subs({"d": i - o}))
            for q in above}


def _combine(forms: list[Exp]) -> sympy.Expr:
    above, equal, below = forms
    if above == equal == below:
        return _power(above)
    on_diagonal = {"o": Exp.sym("i")}
    if above.subs(on_diagonal) != equal or below.subs(on_diagonal) != equal:
        return sympy.Piecewise((_power(above), FAN_OUT > FAN_IN), (_power(equal), sympy.Eq(FAN_OUT, FAN_IN)),
                               (_power(below), True))
    d = Exp.sym("d")
    gap_above = (above - below).subs({"o": Exp.sym("i") + d})  # sign of above - below where fan_out > fan_in
    gap_below = (above - below).subs({"i": Exp.sym("o") + d})  # ... and where fan_out < fan_in
    try:
        sign_above = Signs({"i": "0+", "d": "+"}).compare(gap_above, ZERO)
        sign_below = Signs({"o": "0+", "d": "+"}).compare(gap_below, ZERO)
    except Undecidable:
        sign_above = sign_below = 0
    if sign_above < 0 < sign_below:
        return sympy.Min(_power(above), _power(below))
    if sign_above > 0 > sign_below:
        return sympy.Max(_power(above), _power(below))
    return sympy.Piecewise((_power(above), FAN_OUT > FAN_IN), (_power(below), True))


def _power(e: Exp) -> sympy.Expr:
    """``n^e`` with ``n^o -> fan_out`` and ``n^i -> fan_in``."""
    out = FAN_OUT ** _r(e.coefficient("o")) * FAN_IN ** _r(e.coefficient("i"))
    if e.const:
        out *= sympy.Symbol("n", positive=True) ** _r(e.const)
    return out


def _r(value: Fraction) -> sympy.Rational:
    return sympy.Rational(value.numerator, value.denominator)
