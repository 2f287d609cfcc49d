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

from dataclasses import dataclass
from fractions import Fraction

from mupderive.calculus.evaluate import Layer
from mupderive.calculus.exponent import HALF, ZERO, Exp, Signs
from mupderive.calculus.value import Frame
from mupderive.derivation import derive, rational
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule
from mupderive.solver import FANS, evaluate, make_layer

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
        flags = {h.name: h.default for h in applied.hypers if isinstance(h.default, bool)}
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
