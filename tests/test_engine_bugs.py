"""Regressions for the engine and oracle bugs new rule files hit (issue 13): each test failed before its fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mupderive import CalculusError, derive, load_rule, parse_rule
from mupderive.calculus.evaluate import hyper_symbol
from mupderive.calculus.exponent import Exp, Undecidable

RULES = Path(__file__).resolve().parent / "rules"
# atan2 records its operands without balancing them: the order of m and damp * |m| stays open
OPEN_ORDER = """\
name = "open"
title = "atan2 with a scale-carrying divisor"
paper = "none (a test fixture)"

[implementation]
note = "no library class: the interpreter is the reference"

[hyperparameters]
lr = { role = "lr", default = 1e-3, doc = "step size" }
damp = { role = "scale", default = 1.0, doc = "scale of the divisor" }

[update]
state = { m = "zeros(G)" }
compute = '''
m = ema(m, G, 0.9)
'''
direction = "atan2(m, damp * abs(m))"
"""


def _exponents(derivation) -> dict:
    """Every exponent of a derivation (texts of comparisons left out: they name the operands as written)."""
    return {role: (layer.lr, layer.init_std, layer.kappa, dict(layer.hyper),
                   {name: regime.lr for name, regime in layer.if_fixed.items()})
            for role, layer in derivation.layers.items()}


# -- 1. ema(...) balances exactly like the written-out sum -----------------------------------------------------
def test_ema_of_a_state_balances_like_the_written_out_sum():
    """Shampoo with statistics ema(L, g g^T, beta) started at matrix_eps * I derives, and exactly as with
    beta * L + (1 - beta) * g g^T (before: "sign of -hyper:matrix_eps - 1 is not determined")."""
    path = RULES / "shampoo_ema.toml"
    text = path.read_text(encoding="utf-8")
    written = re.sub(r"(\w+) = ema\((\w+), (.+), beta\)", r"\1 = beta * \2 + (1 - beta) * (\3)", text)
    assert written.count("= beta * ") == 3
    with_ema, with_sum = derive(load_rule(path)), derive(parse_rule(written, "written.toml"))
    assert _exponents(with_ema) == _exponents(with_sum)
    assert with_ema.layers["hidden"].hyper["matrix_eps"] != with_ema.layers["input"].hyper["matrix_eps"]
    sums = [c for c in with_ema.layers["hidden"].balanced.outcome.comparisons if c.text.startswith("ema(")]
    assert {t.text for c in sums for t in c.terms} >= {"L", "g @ g.T", "R", "g.T @ g"}


def test_an_open_order_never_shows_an_internal_symbol():
    """Undecidable texts name hyperparameters as users write them: e(name), never hyper:name."""
    diff = -Exp.sym(hyper_symbol("matrix_eps")) - 1
    text = str(Undecidable(diff))
    assert "hyper:" not in text and "e(matrix_eps)" in text
    assert "hyper:" not in str(diff + Exp.sym("o"))


def test_a_user_message_of_an_open_order_names_the_hyperparameter(tmp_path):
    """A rule whose comparison order stays open reports it with the hyperparameter's name and file:line:col."""
    path = tmp_path / "open.toml"
    path.write_text(OPEN_ORDER, encoding="utf-8")
    with pytest.raises(CalculusError) as err:
        derive(load_rule(path))
    message = str(err.value)
    assert "hyper:" not in message and "e(damp)" in message and re.search(r"open\.toml:\d+:\d+", message)
