"""Unit laws of the scaling calculus: exact exponents, ordering under assumptions, and the primitive rules."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mupderive.calculus.exponent import Exp, Signs, Undecidable
from mupderive.calculus.value import Frame, Part, Value, scalar
from mupderive.errors import CalculusError

FAN = Exp(1)  # a hidden layer: fan_out ~ fan_in ~ n
HIDDEN = Frame({"o": FAN, "i": FAN}, Signs())
MATRIX = ("o", "i")
fractions = st.fractions(min_value=-4, max_value=4, max_denominator=8)


def outer(e) -> Value:
    return Value(MATRIX, (Part("outer", Exp(e)),))


def dense(e, nonneg=False) -> Value:
    return Value(MATRIX, (Part("dense", Exp(e), nonneg),))


@given(a=fractions, b=fractions, c=fractions)
def test_exponents_are_exact_affine_forms(a, b, c):
    x = Exp(a, {"o": b}) + Exp(c, {"i": a})
    assert x.const == a + c and x.coefficient("o") == b and x.coefficient("i") == a
    assert (x - x) == Exp(0)
    assert (x * Fraction(1, 3)) * 3 == x
    assert x.subs({"o": Exp(2)}).coefficient("o") == 0


def test_order_needs_assumptions():
    o, i = Exp.sym("o"), Exp.sym("i")
    with pytest.raises(Undecidable):
        Signs().compare(o, i)
    signs = Signs({"o": "0+", "i": "0+"})
    assert signs.compare(o + i, o) == 1
    assert signs.max(o * Fraction(1, 2), o) == o
    with pytest.raises(Undecidable):
        signs.compare(o, i)


def test_norms_of_structures():
    g = outer(0)  # a hidden gradient: |G|_* = |G|_F = n^0, entries n^-1
    assert HIDDEN.metric(g, "rms") == Exp(-1) and HIDDEN.metric(g, "spec") == Exp(0)
    w = dense(Fraction(-1, 2))  # iid init 1/sqrt(fan_in)
    assert HIDDEN.metric(w, "spec") == Exp(0) and HIDDEN.metric(w, "fro") == Exp(Fraction(1, 2))
    assert HIDDEN.metric(w, "effect") == Exp(0)  # incoherent on an aligned input: Theta(1) features
    eye = Value(MATRIX[:1] * 2, (Part("eye", Exp(0)),))
    assert HIDDEN.metric(eye, "rms") == Exp(Fraction(-1, 2))


def test_sign_of_a_low_rank_gradient_is_low_rank_with_unit_entries():
    u = HIDDEN.power(outer(0), Fraction(0), "odd")
    assert u.parts[0].kind == "outer" and HIDDEN.metric(u, "rms") == Exp(0)
    assert HIDDEN.metric(u, "spec") == Exp(1)  # sqrt(fan_in fan_out): why Adam's lr is 1/fan_in


def test_ratio_m_over_sqrt_v_is_sign_like():
    m, v = outer(0), HIDDEN.power(outer(0), Fraction(2), "even")
    ratio = HIDDEN.mul(m, HIDDEN.power(HIDDEN.power(v, Fraction(1, 2), "pos"), Fraction(-1), "odd"))
    assert HIDDEN.metric(ratio, "rms") == Exp(0) and ratio.parts[0].kind == "outer"


def test_elementwise_product_with_noise():
    signed, positive = dense(0), dense(0, nonneg=True)
    assert {p.kind for p in HIDDEN.mul(outer(0), signed).parts} == {"dense"}  # random signs kill coherence
    assert {p.kind for p in HIDDEN.mul(outer(0), positive).parts} == {"outer", "dense"}  # the mean survives


def test_linearisation_keeps_a_subdominant_aligned_part():
    mix = HIDDEN.add(outer(-1), dense(Fraction(-1, 2)))  # noise dominates the entries
    out = HIDDEN.power(mix, Fraction(0), "odd")  # sign(noise + signal) = sign(noise) + signal/|noise| ...
    kinds = {p.kind: p for p in out.parts}
    assert HIDDEN.part_metric(kinds["outer"], MATRIX, "rms") == Exp(Fraction(-3, 2))
    assert HIDDEN.part_metric(kinds["dense"], MATRIX, "rms") == Exp(0)


def test_clip_regimes():
    x = outer(0)  # entries n^-1
    assert HIDDEN.clip(x, scalar(Exp(0))) == x  # the bound never binds
    saturated = HIDDEN.clip(x, scalar(Exp(-2)))  # binds everywhere: c sign(x)
    assert HIDDEN.metric(saturated, "rms") == Exp(-2)


def test_matrix_power_acts_inside_and_outside_the_batch_span():
    gram = HIDDEN.matmul(outer(0), HIDDEN.transpose(outer(0)), ("o", "o"))
    damped = HIDDEN.add(gram, Value(("o", "o"), (Part("eye", Exp(-3)),)))
    root = HIDDEN.matpow(damped, Fraction(-1, 4))
    kinds = {p.kind: p.e for p in root.parts}
    assert kinds == {"outer": Exp(0), "perp": Exp(Fraction(3, 4))}
    preconditioned = HIDDEN.matmul(root, outer(0), MATRIX)  # the complement annihilates the gradient
    assert [p.kind for p in preconditioned.parts] == ["outer"] and preconditioned.parts[0].e == Exp(0)
    with pytest.raises(CalculusError, match="damping"):
        HIDDEN.matpow(gram, Fraction(-1, 2))


def test_orthogonalize_sends_singular_values_to_one():
    assert HIDDEN.orthogonalize(outer(-7)).parts[0].e == Exp(0)


def test_products_with_weight_like_matrices_are_refused():
    with pytest.raises(CalculusError, match="cannot bound"):
        HIDDEN.matmul(dense(0), outer(0), MATRIX)


def test_means_need_one_signed_entries():
    with pytest.raises(CalculusError):
        HIDDEN.axis_mean(outer(0), 1)
    squares = HIDDEN.power(outer(0), Fraction(2), "even")
    rows = HIDDEN.axis_mean(squares, 1)
    assert rows.shape == ("o",) and HIDDEN.metric(rows, "rms") == Exp(-2)
