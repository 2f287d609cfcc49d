"""A derivation whose knobs come from an analysis: what ``generate`` and ``coord-check`` apply for
``--parameterization sp|ntk|mup|mfp|TABLE.json --alignment full|none|TABLE.json``.

Each role keeps the parameterization's multiplier ``n^m`` and init std ``n^s`` (Everett et al.'s table or the user's)
and takes from :func:`mupderive.analysis.analyze` its largest stable learning rate and every scale-carrying
hyperparameter balanced at that parameterization's gradient (eps follows the gradient entries). The attention logit
scale stays the derived one (``1/head_dim``: aligned q and k grow ``1/sqrt(head_dim)`` logits in any
parameterization), and there is no tied row: the analysis gives the embedding and the readout separate inits and
learning rates, which one tensor cannot take.

The coordinate check's predictions follow from the same analysis, per role (exponents of the width):

    init activation  a0 = m + s + i/2 + a0(previous)        (the initial weights on Theta(1) inputs: incoherent)
    change           r  = feature_update                     (max of the three output-change terms at that lr)
    activation       max(a0, r)
    effect           own term m + c + |U|                    (the update's own effect on the layer's input)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from mupderive.analysis import CHAIN, Analysis, analyze
from mupderive.calculus.exponent import HALF, ZERO, Exp
from mupderive.derivation import Derivation, LayerDerivation, derive, rational
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule
from mupderive.solver import FANS

Spec = str | Mapping[str, Mapping[str, object]]


@dataclass(frozen=True)
class ParameterizedDerivation(Derivation):
    """A derivation whose per-role multiplier, init, lr and hyperparameters are an analysis's (``analysis``)."""

    analysis: Analysis | None = None

    @property
    def label(self) -> str:
        """``sp, full alignment``: the parameterization and the alignment assumption."""
        return f"{self.analysis.parameterization}, {self.analysis.alignment} alignment"

    @property
    def tag(self) -> str:
        """``sp-full``: how reports and file names call it."""
        return f"{self.analysis.parameterization}-{self.analysis.alignment}"


def parameterized(rule: Rule | str, parameterization: Spec = "sp", alignment: Spec = "full",
                  name: str | None = None) -> ParameterizedDerivation:
    """The derivation of ``rule`` (spectral convention) with every role's knobs replaced by the analysis's."""
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    derived = derive(rule)
    result = analyze(rule, parameterization, alignment, name)
    layers = {}
    for role, layer in derived.layers.items():
        a = result.layers[role]
        if set(a.hyper) != set(layer.hyper):
            raise MupError(f"{role}: the analysis balanced {sorted(a.hyper)}, the derivation {sorted(layer.hyper)}")
        layers[role] = LayerDerivation(role, layer.rule, layer.fan_out, layer.fan_in, a.multiplier, a.init_std, a.lr,
                                       dict(a.hyper), {}, layer.kappa, a.balanced, (*layer.notes,))
    return ParameterizedDerivation(rule, derived.convention, (), layers, {}, None, derived.attention, analysis=result)


def analysed(rule: Rule | str, parameterization: Spec, alignment: Spec | None = None) -> ParameterizedDerivation:
    """:func:`parameterized` from what a command line gives: names, tables, or paths to JSON tables (``.json``);
    alignment full by default."""
    from mupderive.commands import _table_arg

    def table(spec: Spec, what: str) -> Spec:
        return _table_arg(spec, what) if isinstance(spec, str) else spec

    return parameterized(rule, table(parameterization, "parameterization"), table(alignment or "full", "alignment"))


def predicted_slopes(analysis: Analysis) -> dict[str, dict[str, Fraction]]:
    """Per role, the coordinate check's predicted slopes: ``init`` (activation at step 0), ``activation``,
    ``change`` and ``effect`` after the first steps (exact fractions; see the module docstring)."""
    out: dict[str, dict[str, Fraction]] = {}
    previous = ZERO
    for role in CHAIN:
        a = analysis.layers[role]
        init = a.multiplier + a.init_std + Exp(FANS[role][1]) * HALF + previous
        out[role] = _row(init, a.feature_update, a.terms["own"])
        previous = init
    v = analysis.layers["vector"]
    out["vector"] = _row(ZERO, v.feature_update, v.terms["own"])
    return out


def _row(init: Exp, change: Exp, effect: Exp) -> dict[str, Fraction]:
    def f(e: Exp) -> Fraction:
        return Fraction(str(rational(e)))

    return {"init": f(init), "activation": max(f(init), f(change)), "change": f(change), "effect": f(effect)}
