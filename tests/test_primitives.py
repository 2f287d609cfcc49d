"""Each primitive of the scaling calculus against measurement: apply it to synthetic tensors with the structure the
calculus assumes (low-rank aligned, dense, identity, scalar) at several widths and compare the fitted log-log slope of
the output's RMS and spectral norm with :class:`~mupderive.calculus.value.Frame`'s prediction. A failure names the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

from mupderive.calculus.exponent import Exp, Signs
from mupderive.calculus.value import Frame, Part, Value, scalar
from mupderive.language.load import load_rule
from mupderive.solver import global_statistics, make_layer
from mupderive.verify.fit import fit_slope
from mupderive.verify.interpret import eigbasis, matpow, orthogonalize, singular_basis
from mupderive.verify.synthetic import spectral_norm

WIDTHS = (64, 128, 256, 512)
SEEDS = (0, 1)
RANK = 4
SINGULAR = torch.tensor([1.0, 0.6, 0.4, 0.2], dtype=torch.float64) / math.sqrt(1.56)  # Frobenius norm 1
FIXED = 4  # the fixed side of a "tall" (fan_in fixed) matrix: |Z|_* ~ sqrt(n) + sqrt(FIXED) for iid Z
TOLERANCE = 0.1
HALF = Fraction(1, 2)
ZERO = Fraction(0)
SQUARE = ("o", "i")
MEAN_LOG = "G / (abs(Z) + eps), Z ~ n^-1/2, eps ~ n^-1"


class Gen:
    """Structured random tensors at width ``n``: a matrix's exponent is what the calculus' Part means by it."""

    def __init__(self, n: int, seed: int, tall: bool = False) -> None:
        self.n, self.rows, self.cols = n, n, (FIXED if tall else n)
        self.gen = torch.Generator().manual_seed(seed * 7919 + n)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def outer(self, e: float) -> torch.Tensor:
        """Rank RANK, random singular vectors, fixed singular values, Frobenius norm ``n^e``: a gradient-like matrix
        (fixed singular values keep seed-to-seed noise out of its spectral norm)."""
        U = torch.linalg.qr(self.normal(self.rows, RANK)).Q
        V = torch.linalg.qr(self.normal(self.cols, RANK)).Q
        return (U * SINGULAR) @ V.T * self.n**e

    def dense(self, e: float) -> torch.Tensor:
        """iid Gaussian entries of RMS ``n^e``."""
        return self.normal(self.rows, self.cols) * self.n**e

    def vector(self, e: float) -> torch.Tensor:
        """A vector of norm ``n^e`` (aligned: the calculus' outer part of a 1-D value)."""
        v = self.normal(self.rows)
        return v / torch.linalg.vector_norm(v) * self.n**e


def outer(e: Fraction, shape=SQUARE, nonneg: bool = False) -> Value:
    return Value(shape, (Part("outer", Exp(e), nonneg),))


def dense(e: Fraction, shape=SQUARE, nonneg: bool = False) -> Value:
    return Value(shape, (Part("dense", Exp(e), nonneg),))


def const(e: Fraction) -> Value:
    return scalar(Exp(e), True)


@dataclass(frozen=True)
class Case:
    """``measure(gen, n)`` computes the op on tensors; ``predict(frame)`` the calculus' Value for the same op."""

    name: str
    measure: Callable[[Gen], torch.Tensor]
    predict: Callable[[Frame], Value]
    metrics: tuple[str, ...] = ("rms", "spec")
    tall: bool = False


def frame(tall: bool) -> Frame:
    return Frame({"o": Exp(1), "i": Exp(0 if tall else 1), "r": Exp(0)}, Signs())


CASES = [
    # elementwise powers of a gradient-like matrix G (|G|_F = 1, entries ~ 1/n)
    Case("G**2", lambda g: g.outer(0) ** 2, lambda f: f.power(outer(ZERO), Fraction(2), "even")),
    Case("sqrt(G**2)", lambda g: (g.outer(0) ** 2).sqrt(),
         lambda f: f.power(f.power(outer(ZERO), Fraction(2), "even"), HALF, "pos")),
    Case("abs(G)", lambda g: g.outer(0).abs(), lambda f: f.power(outer(ZERO), Fraction(1), "even")),
    Case("sign(G)", lambda g: g.outer(0).sign(), lambda f: f.power(outer(ZERO), Fraction(0), "odd")),
    Case("sign(G) tall", lambda g: g.outer(0).sign(), lambda f: f.power(outer(ZERO, SQUARE), Fraction(0), "odd"),
         tall=True),
    Case("sign(Z)", lambda g: g.dense(0).sign(), lambda f: f.power(dense(ZERO), Fraction(0), "odd")),
    Case("sqrt(G**2 + Z**2)", lambda g: (g.outer(0) ** 2 + g.dense(-1) ** 2).sqrt(),
         lambda f: f.power(f.add(f.power(outer(ZERO), Fraction(2), "even"),
                                 f.power(dense(Fraction(-1)), Fraction(2), "even")), HALF, "pos")),
    # products and sums with dense noise
    Case("G * Z", lambda g: g.outer(0) * g.dense(0), lambda f: f.mul(outer(ZERO), dense(ZERO))),
    Case("G * abs(Z)", lambda g: g.outer(0) * g.dense(0).abs(), lambda f: f.mul(outer(ZERO), dense(ZERO, nonneg=True))),
    Case("G + Z", lambda g: g.outer(0) + g.dense(-1), lambda f: f.add(outer(ZERO), dense(Fraction(-1)))),
    Case("abs(Z)", lambda g: g.dense(0).abs(), lambda f: f.power(dense(ZERO), Fraction(1), "even")),
    Case("1 / (abs(Z) + eps), Z ~ n^-1/2, eps ~ n^-1", lambda g: 1 / (g.dense(-0.5).abs() + 1.0 / g.n),
         lambda f: _reciprocal_magnitude(f), ("rms",)),
    Case(MEAN_LOG, lambda g: g.outer(0) / (g.dense(-0.5).abs() + 1.0 / g.n),
         lambda f: f.mul(outer(ZERO), _reciprocal_magnitude(f)), ("spec",)),
    Case("Z spectral, tall", lambda g: g.dense(0), lambda f: dense(ZERO), tall=True),
    Case("G + Z tall", lambda g: g.outer(0) + g.dense(Fraction(-1, 2)),
         lambda f: f.add(outer(ZERO), dense(Fraction(-1, 2))), tall=True),
    Case("ema(G1, G2, 0.9)", lambda g: 0.9 * g.outer(0) + 0.1 * g.outer(0), lambda f: f.add(outer(ZERO), outer(ZERO))),
    # comparisons with a scalar threshold
    Case("max(G**2, c ~ n^-2)", lambda g: torch.clamp_min(g.outer(0) ** 2, g.n ** -2.0),
         lambda f: f.maximum(f.power(outer(ZERO), Fraction(2), "even"), const(Fraction(-2)))),
    Case("max(G**2, c ~ n^-1)", lambda g: torch.clamp_min(g.outer(0) ** 2, g.n ** -1.0),
         lambda f: f.maximum(f.power(outer(ZERO), Fraction(2), "even"), const(Fraction(-1)))),
    Case("min(abs(G), c ~ n^-2)", lambda g: torch.clamp_max(g.outer(0).abs(), g.n ** -2.0),
         lambda f: f.minimum(f.power(outer(ZERO), Fraction(1), "even"), const(Fraction(-2)))),
    Case("clip(G, -c, c), c ~ n^-2", lambda g: torch.clamp(g.outer(0), -(g.n ** -2.0), g.n ** -2.0),
         lambda f: f.clip(outer(ZERO), const(Fraction(-2)))),
    Case("clip(G, -c, c), c ~ 1", lambda g: torch.clamp(g.outer(0), -1.0, 1.0),
         lambda f: f.clip(outer(ZERO), const(ZERO))),
    Case("atan2(G, c ~ n^-1)", lambda g: torch.atan2(g.outer(0), torch.tensor(1.0 / g.n, dtype=torch.float64)),
         lambda f: f.clip(f.mul(outer(ZERO), f.power(const(Fraction(-1)), Fraction(-1), "odd")), const(ZERO))),
    Case("G / (sqrt(G**2) + eps ~ n^-1)", lambda g: (lambda G: G / (G.abs() + 1.0 / g.n))(g.outer(0)),
         lambda f: f.mul(outer(ZERO), f.power(f.add(f.power(outer(ZERO), Fraction(1), "even"),
                                                     const(Fraction(-1))), Fraction(-1), "odd"))),
    # linear algebra
    Case("G @ G.T", lambda g: (lambda G: G @ G.T)(g.outer(0)),
         lambda f: f.matmul(outer(ZERO), f.transpose(outer(ZERO)), ("o", "o"))),
    Case("eye * n^-1", lambda g: torch.eye(g.n, dtype=torch.float64) / g.n,
         lambda f: Value(("o", "o"), (Part("eye", Exp(-1), True),))),
    Case("matpow(G G^T + eps I, -1/4) @ G, eps ~ 1", lambda g: _shampoo_left(g, 1.0),
         lambda f: _shampoo_left_value(f, ZERO)),
    Case("matpow(G G^T + eps I, -1/4) @ G, eps ~ n^-2", lambda g: _shampoo_left(g, g.n ** -2.0),
         lambda f: _shampoo_left_value(f, Fraction(-2))),
    Case("matpow(G G^T + eps I, -1/4) (perp part)", lambda g: matpow(_gram(g) + g.n ** -2.0 * _eye(g), -0.25),
         lambda f: f.matpow(f.add(_gram_value(f), f.mul(const(Fraction(-2)), Value(("o", "o"), (Part("eye", ZERO),)))),
                            Fraction(-1, 4))),
    Case("orthogonalize(G)", lambda g: orthogonalize(g.outer(0)), lambda f: f.orthogonalize(outer(ZERO))),
    Case("orthogonalize(G) tall", lambda g: orthogonalize(g.outer(0)), lambda f: f.orthogonalize(outer(ZERO)),
         tall=True),
    Case("orthogonalize(Z)", lambda g: orthogonalize(g.dense(0)), lambda f: f.orthogonalize(dense(ZERO))),
    # reductions
    Case("fro_norm(Z)", lambda g: torch.linalg.vector_norm(g.dense(0)), lambda f: f.norm(dense(ZERO), "fro"),
         ("rms",)),
    Case("spectral_norm(Z)", lambda g: torch.linalg.matrix_norm(g.dense(0), ord=2),
         lambda f: f.norm(dense(ZERO), "spec"), ("rms",)),
    Case("rms(G)", lambda g: g.outer(0).square().mean().sqrt(), lambda f: f.norm(outer(ZERO), "rms"), ("rms",)),
    Case("mean(G**2)", lambda g: (g.outer(0) ** 2).mean(),
         lambda f: f.norm(f.power(outer(ZERO), Fraction(2), "even"), "mean"), ("rms",)),
    Case("row_mean(G**2)", lambda g: (g.outer(0) ** 2).mean(dim=1),
         lambda f: f.axis_mean(f.power(outer(ZERO), Fraction(2), "even"), 1), ("rms", "fro")),
    Case("col_mean(abs(Z))", lambda g: g.dense(0).abs().mean(dim=0),
         lambda f: f.axis_mean(dense(ZERO, nonneg=True), 0), ("rms", "fro")),
    Case("sum(abs(G))", lambda g: g.outer(0).abs().sum(),
         lambda f: f.entry_sum(f.power(outer(ZERO), Fraction(1), "even")), ("rms",)),
    Case("sum(abs(G)) tall", lambda g: g.outer(0).abs().sum(),
         lambda f: f.entry_sum(f.power(outer(ZERO), Fraction(1), "even")), ("rms",), tall=True),
    Case("sum(abs(Z))", lambda g: g.dense(0).abs().sum(), lambda f: f.entry_sum(dense(ZERO, nonneg=True)), ("rms",)),
    Case("dot(G, sign(G))", lambda g: (lambda G: (G * G.sign()).sum())(g.outer(0)),
         lambda f: f.dot(outer(ZERO), f.power(outer(ZERO), Fraction(0), "odd")), ("rms",)),
    Case("dot(G, Z)", lambda g: (g.outer(0) * g.dense(0)).sum(), lambda f: f.dot(outer(ZERO), dense(ZERO)), ("rms",)),
    Case("dot(Z, Z')", lambda g: (g.dense(0) * g.dense(0)).sum(), lambda f: f.dot(dense(ZERO), dense(ZERO)), ("rms",)),
    Case("outer(u, v)", lambda g: torch.outer(g.vector(Fraction(-1, 2)), g.vector(Fraction(-1, 2))),
         lambda f: f.outer(outer(Fraction(-1, 2), ("o",)), outer(Fraction(-1, 2), ("o",)))),
    Case("matpow(outer(g, g) + eps I, -1/2) @ g", lambda g: _shampoo_vector(g),
         lambda f: f.matmul(f.matpow(f.add(f.outer(outer(Fraction(-1, 2), ("o",)), outer(Fraction(-1, 2), ("o",))),
                                           Value(("o", "o"), (Part("eye", Exp(-1)),))), Fraction(-1, 2)),
                            outer(Fraction(-1, 2), ("o",)), ("o",)), ("rms", "fro")),
]

# Rotations into eigen/singular bases of gradient statistics (SOAP, GaLore): measured on the real eigh/svd bases.
RANK_KEPT = 8  # a truncated basis' rank, fixed in width (larger than the gradient's rank 4)


def _sign(X: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = 0 for the entries a rotation leaves at rounding level (outside the batch's coordinates)."""
    return X.sign() * (X.abs() > 1e-9 * X.abs().max())


def _rotated(g: Gen, X: torch.Tensor | None = None) -> torch.Tensor:
    """``QL^T X QR`` in the eigenbases of G's statistics ``G G^T``, ``G^T G`` (X defaults to G itself)."""
    G = g.outer(0)
    QL, QR = eigbasis(G @ G.T), eigbasis(G.T @ G)
    return QL.T @ (G if X is None else X) @ QR


def _rotated_value(f: Frame, x: Value) -> Value:
    basis = f.basis(_gram_value(f), ("o", "o"))
    return f.matmul(f.matmul(f.transpose(basis), x, SQUARE), basis, SQUARE)


def _soap_u(g: Gen) -> torch.Tensor:
    """SOAP's direction: Adam's G / (|G| + eps) in the eigenbasis (eps ~ the rotated entries, |G|_F = 1), back."""
    G = g.outer(0)
    QL, QR = eigbasis(G @ G.T), eigbasis(G.T @ G)
    R = QL.T @ G @ QR
    return QL @ (R / (R.abs() + 1.0)) @ QR.T


def _soap_u_value(f: Frame) -> Value:
    basis = f.basis(_gram_value(f), ("o", "o"))
    R = _rotated_value(f, outer(ZERO))
    u = f.mul(R, f.power(f.add(f.power(R, Fraction(1), "even"), const(ZERO)), Fraction(-1), "odd"))
    return f.matmul(f.matmul(basis, u, SQUARE), f.transpose(basis), SQUARE)


def _galore_u(g: Gen) -> torch.Tensor:
    """GaLore's direction for fan_out >= fan_in: sign of G P (P the leading right singular vectors), back by P^T."""
    G = g.outer(0)
    P = singular_basis(G, RANK_KEPT, left=False)
    return _sign(G @ P) @ P.T


def _galore_u_value(f: Frame) -> Value:
    P = f.basis(outer(ZERO), ("i", "r"))
    low = f.matmul(outer(ZERO), P, ("o", "r"))
    return f.matmul(f.power(low, Fraction(0), "odd"), f.transpose(P), SQUARE)


CASES += [
    Case("QL.T @ G @ QR", lambda g: _rotated(g), lambda f: _rotated_value(f, outer(ZERO)), ("entry", "rms", "spec")),
    Case("sign(QL.T @ G @ QR)", lambda g: _sign(_rotated(g)),
         lambda f: f.power(_rotated_value(f, outer(ZERO)), Fraction(0), "odd"), ("entry", "rms", "spec")),
    Case("QL.T @ Z @ QR", lambda g: _rotated(g, g.dense(0)), lambda f: _rotated_value(f, dense(ZERO))),
    Case("QL (R / (|R| + eps ~ 1)) QR^T, R = QL.T G QR", _soap_u, _soap_u_value, ("rms", "spec", "entry")),
    Case("G @ P, P = right_singular(G, 8)", lambda g: (lambda G: G @ singular_basis(G, RANK_KEPT, False))(g.outer(0)),
         lambda f: f.matmul(outer(ZERO), f.basis(outer(ZERO), ("i", "r")), ("o", "r")), ("entry", "spec")),
    Case("sign(G @ P) @ P.T", _galore_u, _galore_u_value),
]


def _reciprocal_magnitude(f: Frame) -> Value:
    """``1 / (|Z| + eps)`` with ``Z`` dense of RMS n^-1/2 and ``eps`` ~ n^-1."""
    magnitude = f.power(dense(Fraction(-1, 2)), Fraction(1), "even")
    return f.power(f.add(magnitude, const(Fraction(-1))), Fraction(-1), "odd")


# Known disagreements between the calculus and measurement (reported to the calculus' owner); each states the numbers.
KNOWN: dict[str, str] = {
    "G * Z": "spectral slope measured -0.37 +- 0.07, predicted -0.50: G * Z has a variance profile concentrated on "
             "G's heavy rows and columns, so its spectral norm follows the largest row energy (~ log n / n), a log "
             "factor the dense rule |M|_* = rms sqrt(max dim) drops",
    "1 / (abs(Z) + eps), Z ~ n^-1/2, eps ~ n^-1":
        "rms slope measured +0.76, predicted +0.50: for Gaussian z of scale s, E[1/(|z| + eps)^2] ~ "
        "2 phi(0) / (s eps), so 1/(|Z| + eps) has RMS (s eps)^-1/2 = n^3/4, not the s^-1 = n^1/2 the calculus "
        "takes for a negative power of a magnitude with mass near zero and a much smaller floor",
}


def _eye(g: Gen) -> torch.Tensor:
    return torch.eye(g.rows, dtype=torch.float64)


def _gram(g: Gen) -> torch.Tensor:
    G = g.outer(0)
    return G @ G.T


def _gram_value(f: Frame) -> Value:
    return f.matmul(outer(ZERO), f.transpose(outer(ZERO)), ("o", "o"))


def _shampoo_left(g: Gen, eps: float) -> torch.Tensor:
    G = g.outer(0)
    return matpow(G @ G.T + eps * _eye(g), -0.25) @ G


def _shampoo_left_value(f: Frame, eps: Fraction) -> Value:
    damped = f.add(_gram_value(f), f.mul(const(eps), Value(("o", "o"), (Part("eye", ZERO),))))
    return f.matmul(f.matpow(damped, Fraction(-1, 4)), outer(ZERO), SQUARE)


def _shampoo_vector(g: Gen) -> torch.Tensor:
    v = g.vector(-0.5)
    return matpow(torch.outer(v, v) + _eye(g) / g.n, -0.5) @ v


def measured(value: torch.Tensor, metric: str) -> float:
    if metric == "rms":
        return float(value.square().mean().sqrt())
    if metric == "entry":  # the typical nonzero entry, as the oracle measures it
        return float((value.square().square().sum() / value.square().sum()).sqrt())
    if metric == "fro" or value.dim() < 2:
        return float(torch.linalg.vector_norm(value))
    return spectral_norm(value)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=pytest.mark.xfail(reason=KNOWN[c.name], strict=True))
                                  if c.name in KNOWN else pytest.param(c, id=c.name) for c in CASES])
def test_primitive_scaling(case: Case):
    f = frame(case.tall)
    predicted_value = case.predict(f)
    for metric in case.metrics:
        e = f.metric(predicted_value, metric)
        assert e is not None, f"{case.name}: the calculus predicts zero"
        xs, ys = [], []
        for n in WIDTHS:
            for seed in SEEDS:
                xs.append(n)
                ys.append(measured(case.measure(Gen(n, seed, case.tall)), metric))
        fit = fit_slope(xs, ys)
        predicted, slack = float(e.const), max(TOLERANCE, fit.ci)
        allowance = float(f.metric_log(predicted_value, metric)) / math.log(WIDTHS[0])  # n^e (log n)^k
        assert -slack + min(allowance, 0) <= fit.slope - predicted <= slack + max(allowance, 0), (
            f"{case.name}: {metric} slope measured {fit.slope:+.3f} +- {fit.ci:.3f}, "
            f"calculus predicts {predicted:+.3f}" + (f" times a log (up to +{allowance:.2f})" if allowance else ""))


def test_the_mean_of_a_reciprocal_magnitude_carries_a_log():
    """G / (|Z| + eps): the aligned part is G times the mean of 1/(|Z| + eps), (2 phi(0)/s) ln(s/eps) for Z of scale
    s = n^-1/2 cut off at eps = n^-1. The calculus marks the log; measured, the spectral slope exceeds the bare
    exponent by more than the tolerance (so the allowance is needed), and within what one log factor allows."""
    case = next(c for c in CASES if c.name == MEAN_LOG)
    f = frame(case.tall)
    value = case.predict(f)
    assert f.metric_log(value, "spec") == 1
    assert f.metric_log(f.mul(outer(ZERO), dense(Fraction(-1, 2), nonneg=True)), "spec") == 0  # no mass near zero
    fit = fit_slope([n for n in WIDTHS for _ in SEEDS], [measured(case.measure(Gen(n, s)), "spec")
                                                         for n in WIDTHS for s in SEEDS])
    excess = fit.slope - float(f.metric(value, "spec").const)
    assert TOLERANCE < excess <= TOLERANCE + 1 / math.log(WIDTHS[0]), excess


def test_fit_recovers_a_known_slope_and_rejects_one_width():
    widths = [64, 128, 256, 512] * 3
    values = [n ** -0.75 * (1 + 0.01 * k) for k, n in enumerate(widths)]
    fit = fit_slope(widths, values)
    assert abs(fit.slope + 0.75) < 0.02 and fit.ci < 0.05
    with pytest.raises(ValueError):
        fit_slope([64, 64], [1.0, 2.0])
    assert math.isinf(fit_slope([64, 128], [1.0, 2.0]).ci)


TOTAL_RULE = '''name = "probe_total"
title = "probe"
paper = "none"
[implementation]
[hyperparameters]
lr = { role = "lr", default = 0.1 }
[update]
compute = """
a = total(sum(abs(G)))
"""
direction = "G / a"
'''
FANS_AT = {"input": (1, 0), "hidden": (1, 1), "output": (0, 1), "vector": (1, 0)}


def _spectral_gradient(role: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """A batch-built gradient of the role at width n: rank one, |G|_F = sqrt(fan_in / fan_out) (fixed sides 4)."""
    o, i = (n if e else FIXED for e in FANS_AT[role])
    if role == "vector":
        o, i = n, 1
    u, v = torch.randn(o, generator=gen, dtype=torch.float64), torch.randn(i, generator=gen, dtype=torch.float64)
    G = torch.outer(u / u.norm(), v / v.norm()) * math.sqrt(i / o)
    return G[:, 0] if role == "vector" else G


def test_total_scales_as_its_largest_contribution(tmp_path):
    """total(x) over a model's parameters: measured on spectral-condition gradients of the four roles, the sum of
    sum(abs(G)) scales as its largest terms (hidden and output, n^1), as the solver states; each role's own term
    scales as its contribution (the input layer's n^0), and the gap the solver scales it by closes the difference."""
    path = tmp_path / "probe_total.toml"
    path.write_text(TOTAL_RULE)
    rule = load_rule(path)
    predicted = {}
    for role in FANS_AT:
        layer = make_layer(role, Exp(0))
        ((gap, note),) = global_statistics(rule, layer, {}, Signs()).values()
        own = Frame({"o": layer.o, "i": layer.i, "r": Exp(0)}, Signs())
        grad = Value(layer.shape, (Part("outer", layer.grad_norm),))
        mine = own.metric(own.entry_sum(own.power(grad, Fraction(1), "even")), "rms")
        predicted[role] = (mine, mine + gap)
        assert "from the hidden and output layer" in note or "from the output and hidden layer" in note, note
    assert {top for _, top in predicted.values()} == {Exp(1)}, predicted
    assert predicted["input"][0] == Exp(0) and predicted["hidden"][0] == Exp(1)
    xs, totals, own_terms = [], [], {role: [] for role in FANS_AT}
    for n in WIDTHS:
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(seed * 31 + n)
            terms = {role: float(_spectral_gradient(role, n, gen).abs().sum()) for role in FANS_AT}
            xs.append(n)
            totals.append(sum(terms.values()))
            for role, value in terms.items():
                own_terms[role].append(value)
    fit = fit_slope(xs, totals)
    assert abs(fit.slope - 1) <= max(TOLERANCE, fit.ci), fit
    for role, values in own_terms.items():
        mine = fit_slope(xs, values)
        assert abs(mine.slope - float(predicted[role][0].const)) <= max(TOLERANCE, mine.ci), (role, mine)
