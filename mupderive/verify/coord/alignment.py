"""Measured alignment (Everett et al. 2024): how coherently each of a layer's three output-change terms sums over its
fan_in, fitted across widths on a real model (``coord-check --measure-alignment FILE.json``).

A layer ``h = c W z`` (multiplier ``c = n^m``) changes after training by ``c (dW z0 + W0 dz + dW dz)``. On the fixed
evaluation batch, with ``z0`` the layer's input at init and ``dz = z_t - z0``, each term is measured by re-running the
module with its weight swapped (biases and hooks as they are now, so a bias cancels):

    own         c dW z0 = f(z0; W_t) - f(z0; W_0)
    propagated  c W0 dz = f(z_t; W_0) - f(z0; W_0)
    cross       c dW dz = f(z_t; W_t) - f(z_t; W_0) - own

and normalized by the entry sizes it multiplies: ``A = rms(term) / (rms(matrix) rms(vector))`` is ``fan_in`` for a
coherent sum and ``sqrt(fan_in)`` for an incoherent one. With ``fan_in ~ n^i`` the alignment exponent is
``k = (slope of log A against log n - m) / i``: 1 is full alignment, 1/2 none. Layers whose fan_in does not grow
(the input role: k cannot be seen) and weights that are not matrices are not measured.

The table ``analyze --alignment`` reads (schema ``mupderive.alignment/1``) gives each role the largest k over its
layers (the most coherent one bounds the stable lr), clipped to [1/2, 1] and rounded to the nearest 1/4; the fitted
slopes of every layer come with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from mupderive.analysis import ALIGNMENT_SCHEMA
from mupderive.verify.coord.attention import rms as _rms
from mupderive.verify.coord.fit import Slope, fit_slope

SCHEMA = ALIGNMENT_SCHEMA
TERMS = ("own", "propagated", "cross")
QUANTITIES = ("own", "propagated", "cross", "dW", "W0", "z0", "dz")
NORMS = {"own": ("dW", "z0"), "propagated": ("W0", "dz"), "cross": ("dW", "dz")}
FAN_IN = {"hidden": 1, "output": 1}  # width exponent of fan_in for the roles whose alignment can be fitted
STEP = Fraction(1, 4)


def measurable(module: torch.nn.Module) -> bool:
    """A module holding a weight matrix applied to a floating-point input (not an Embedding's lookup)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 2 and not isinstance(module, torch.nn.Embedding)


def term_rms(call, w0: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The seven rms values of one layer (:data:`QUANTITIES`); ``call(input, weight)`` runs the module."""
    base = call(z0, w0)
    own = call(z0, w) - base
    propagated = call(z, w0) - base
    cross = call(z, w) - call(z, w0) - own
    return torch.stack([_rms(own), _rms(propagated), _rms(cross), _rms(w - w0), _rms(w0), _rms(z0), _rms(z - z0)])


@dataclass(frozen=True)
class LayerAlignment:
    """One layer's fitted alignment exponent per term, at the first step and over the last steps."""

    layer: str
    role: str
    first: dict[str, Slope]
    last: dict[str, Slope]

    def to_json(self) -> dict:
        return {"role": self.role, **{term: {"first": self.first[term].to_json(), "last": self.last[term].to_json()}
                                      for term in TERMS}}


def fit_alignment(terms: np.ndarray, widths: list[int], layers: dict[str, str], marks: dict[str, list[int]],
                  multipliers: dict[str, float]) -> list[LayerAlignment]:
    """``terms[seed, width, step, layer, QUANTITIES]`` -> each measurable layer's k per term at the ``first`` and
    ``last`` steps of ``marks`` (``judge.checkpoints``); ``multipliers``: the width exponent m of each role's
    forward multiplier (0 where absent)."""
    out = []
    for index, (layer, role) in enumerate(layers.items()):
        if role not in FAN_IN or not np.any(terms[:, :, 1:, index, 0] > 0):
            continue
        fits = {}
        for mark in ("first", "last"):
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.exp(np.log(terms[:, :, marks[mark], index]).mean(axis=2))  # [seed, width, quantity]
            fits[mark] = {}
            for term in TERMS:
                a, b = (QUANTITIES.index(q) for q in NORMS[term])
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = values[:, :, QUANTITIES.index(term)] / (values[:, :, a] * values[:, :, b])
                s = fit_slope(widths, ratio)
                m = multipliers.get(role, 0.0)
                fits[mark][term] = Slope((s.value - m) / FAN_IN[role], s.ci / FAN_IN[role])
        out.append(LayerAlignment(layer, role, fits["first"], fits["last"]))
    return out


def role_table(fits: list[LayerAlignment], checkpoint: str = "last") -> dict[str, dict[str, str]]:
    """{role: {term: k}}: the largest k over the role's layers, clipped to [1/2, 1], rounded to a multiple of 1/4."""
    table: dict[str, dict[str, str]] = {}
    for role in dict.fromkeys(f.role for f in fits):
        row = {}
        for term in TERMS:
            values = [getattr(f, checkpoint)[term].value for f in fits if f.role == role]
            values = [v for v in values if math.isfinite(v)]
            if values:
                row[term] = str(_snap(max(values)))
        if row:
            table[role] = row
    return table


def _snap(value: float) -> Fraction:
    k = Fraction(round(value / STEP)) * STEP
    return min(max(k, Fraction(1, 2)), Fraction(1))


def document(fits: list[LayerAlignment], about: dict) -> dict:
    """The ``mupderive.alignment/1`` table: ``roles`` (what analyze reads), ``layers`` (every fit), ``about``."""
    return {"schema": SCHEMA, **about, "checkpoint": "last", "rounding": "largest k per role, clipped to [1/2, 1], "
            "nearest multiple of 1/4", "roles": role_table(fits), "layers": {f.layer: f.to_json() for f in fits}}


def text_table(fits: list[LayerAlignment]) -> str:
    """Per layer and term the fitted k (first step, last steps); 1 = full alignment, 1/2 = none."""
    head = f"{'layer':<28} {'role':<7} " + " ".join(f"{t + ' (first/last)':<27}" for t in TERMS)
    lines = ["alignment exponent k per term (1: coherent sum over fan_in, 1/2: incoherent), +- 95% CI", head,
             "-" * len(head)]
    for f in fits:
        cells = [f"{_num(f.first[t])} / {_num(f.last[t])}" for t in TERMS]
        lines.append(f"{f.layer:<28} {f.role:<7} " + " ".join(f"{c:<27}" for c in cells))
    table = role_table(fits)
    lines.append("per role (what analyze --alignment reads): " + "; ".join(
        f"{role} " + ", ".join(f"{t} {k}" for t, k in row.items()) for role, row in table.items()))
    return "\n".join(lines)


def _num(s: Slope) -> str:
    return f"{s.value:.2f}±{s.ci:.2f}" if s.finite else "n/a"
