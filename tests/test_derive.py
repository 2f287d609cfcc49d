"""The derivation engine against published results (TP-V Table 3, the spectral-condition paper) and its own laws."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from mupderive import CalculusError, MupError, derive, load_rule, parse_rule
from mupderive.calculus.exponent import Exp
from mupderive.derivation import FAN_IN, FAN_OUT
from mupderive.resources import builtin_rule_path
from mupderive.solver import FANS, balance_layer, make_layer, parse_fix

ROOT = Path(__file__).resolve().parents[1]

# TP-V (Yang et al. 2022) Table 3, written as the published formulas in fan_in / fan_out.
# Columns: input weights & all biases / hidden / output. Init is the variance.
TABLE3 = {
    "init_var": {"input": 1 / FAN_IN, "vector": 1 / FAN_IN, "hidden": 1 / FAN_IN, "output": 1 / FAN_IN**2},
    "sgd_lr": {"input": FAN_OUT, "vector": FAN_OUT, "hidden": sympy.Integer(1), "output": 1 / FAN_IN},
    "adam_lr": {"input": sympy.Integer(1), "vector": sympy.Integer(1), "hidden": 1 / FAN_IN, "output": 1 / FAN_IN},
}


def exponent_of(formula: sympy.Expr, role: str) -> sympy.Rational:
    """Width exponent of a formula in fan_in/fan_out at a role's fans (fan = n^o or n^i)."""
    n = sympy.Symbol("n", positive=True)
    o, i = FANS[role]
    expr = formula.subs({FAN_OUT: n**o, FAN_IN: n**i})
    return sympy.Rational(sympy.limit(sympy.log(expr) / sympy.log(n), n, sympy.oo))


ROLES = ["input", "hidden", "output", "vector"]


@pytest.mark.parametrize("role", ROLES)
def test_tpv_table3_init_and_lr(role):
    sgd, adam = derive("sgd").layers[role], derive("adam").layers[role]
    assert 2 * sgd.exponents()["init_std"] == exponent_of(TABLE3["init_var"][role], role)
    assert 2 * adam.exponents()["init_std"] == exponent_of(TABLE3["init_var"][role], role)
    assert sgd.lr == Exp(exponent_of(TABLE3["sgd_lr"][role], role))
    assert adam.lr == Exp(exponent_of(TABLE3["adam_lr"][role], role))
    assert sgd.multiplier == adam.multiplier == Exp(0)


def _same_function(a: sympy.Expr, b: sympy.Expr) -> bool:
    points = [(3, 7), (7, 3), (5, 5), (1, 64), (64, 1), (2, 1000)]
    return all(abs(float(a.subs({FAN_IN: i, FAN_OUT: o})) - float(b.subs({FAN_IN: i, FAN_OUT: o}))) < 1e-12
               for i, o in points)


def test_spectral_condition_paper_formulas():
    """Yang, Simon & Bernstein 2023: sigma = fan_in^-1/2 min(1, sqrt(fan_out/fan_in)); SGD lr fan_out/fan_in."""
    sigma = FAN_IN ** sympy.Rational(-1, 2) * sympy.Min(1, sympy.sqrt(FAN_OUT / FAN_IN))
    for name in ("sgd", "adam", "muon", "shampoo", "lion"):
        assert _same_function(derive(name).formulas["init_std"], sigma), name
    assert _same_function(derive("sgd").formulas["lr"], FAN_OUT / FAN_IN)
    assert _same_function(derive("adam").formulas["lr"], 1 / FAN_IN)


@pytest.mark.parametrize("name", ["adam", "adamw", "adam_atan2", "adopt", "lion", "signsgd", "rmsprop"])
def test_sign_like_family_lr_is_one_over_fan_in(name):
    d = derive(name)
    assert _same_function(d.formulas["lr"], 1 / FAN_IN)
    assert d.kappa == 1


def test_shampoo_and_polar_update_lr_is_sqrt_fan_ratio():
    assert _same_function(derive("shampoo").formulas["lr"], sympy.sqrt(FAN_OUT / FAN_IN))
    text = builtin_rule_path("muon").read_text().replace(
        'direction = "sqrt(max(1, fan_out / fan_in)) * o"', 'direction = "o"')
    bare = parse_rule(text, "muon_bare.toml")
    assert _same_function(derive(bare).formulas["lr"], sympy.sqrt(FAN_OUT / FAN_IN))
    # torch's 'original' adjustment multiplies the step by sqrt(max(1, fan_out/fan_in)): the effective step is the same
    muon = derive("muon").formulas["lr"] * sympy.sqrt(sympy.Max(1, FAN_OUT / FAN_IN))
    assert _same_function(muon, sympy.sqrt(FAN_OUT / FAN_IN))


def test_kappa_is_derived_from_the_rule():
    assert derive("sgd").kappa == 2
    assert derive("adam").kappa == 1
    assert derive("adafactor").kappa == 0  # parameter scaling: the update is proportional to rms(W)
    assert derive("muon").layers["hidden"].kappa == Exp(1)


def test_epsilon_follows_the_gradient_entries():
    d = derive("adam")
    assert {r: d.layers[r].hyper["eps"] for r in ROLES} == {
        "input": Exp(-1), "hidden": Exp(-1), "output": Exp(0), "vector": Exp(-1)}
    mup = derive("adam", convention="mup-package")
    assert mup.layers["output"].hyper["eps"] == Exp(-1)  # the readout multiplier 1/n shrinks its gradient


@pytest.mark.parametrize("convention", ["spectral", "mup-package"])
def test_adamw_keeps_lr_times_weight_decay_width_independent(convention):
    d = derive("adamw", convention=convention)
    for layer in d.layers.values():
        assert layer.lr + layer.hyper["weight_decay"] == Exp(0)


def test_mup_package_convention_matches_the_mup_package_layout():
    """MuReadout multiplier 1/width_mult; MuAdam: lr/width_mult on hidden only; MuSGD: lr*width_mult on vector-like."""
    adam, sgd = derive("adam", convention="mup-package"), derive("sgd", convention="mup-package")
    assert adam.layers["output"].multiplier == Exp(-1)
    assert {r: adam.layers[r].lr for r in ROLES} == {"input": Exp(0), "hidden": Exp(-1), "output": Exp(0),
                                                     "vector": Exp(0)}
    assert {r: sgd.layers[r].lr for r in ROLES} == {"input": Exp(1), "hidden": Exp(0), "output": Exp(1),
                                                    "vector": Exp(1)}
    assert adam.layers["output"].init_std == Exp(0)  # the readout init becomes width-independent


def test_abc_symmetry_relates_conventions():
    """(a, b, c) -> (a + theta, b - theta, c - kappa theta) maps one convention onto the other."""
    for name in ("sgd", "adam", "adafactor", "lamb"):
        spectral, mup = derive(name), derive(name, convention="mup-package")
        a, b = spectral.layers["output"], mup.layers["output"]
        theta = a.multiplier - b.multiplier  # multiplier exponent is -a
        assert b.init_std == a.init_std + theta
        assert b.lr == a.lr + theta * a.kappa.const


def test_fixes_solve_the_remaining_knobs():
    fixed = derive("adam", fixes=[parse_fix("output.multiplier=-1")])
    assert fixed.to_json()["layers"] == derive("adam", convention="mup-package").to_json()["layers"]
    by_init = derive("adam", fixes=[parse_fix("output.init_std=0")])
    assert by_init.layers["output"].multiplier == Exp(-1)
    by_lr = derive("adam", fixes=[parse_fix("hidden.lr=0")])
    hidden = by_lr.layers["hidden"]
    assert hidden.lr == Exp(0) and hidden.multiplier == Exp(-1) and hidden.init_std == Exp(Fraction(1, 2))
    with pytest.raises(MupError, match="contradicts"):
        derive("adafactor", fixes=[parse_fix("hidden.lr=0")])  # kappa = 0: no multiplier moves the lr
    with pytest.raises(MupError):
        parse_fix("hidden.speed=1")


def test_if_fixed_diagnosis():
    adamw = derive("adamw").layers["hidden"]
    assert adamw.if_fixed["eps"].lr == Exp(0)  # eps dominates: SGD-like, needs SGD's hidden lr
    assert "eps dominates" in adamw.if_fixed["eps"].text and "SGD-like" in adamw.if_fixed["eps"].text
    assert adamw.if_fixed["weight_decay"].lr == adamw.lr
    lamb = derive("lamb").layers["hidden"]
    assert lamb.lr == Exp(Fraction(-1, 2)) and lamb.if_fixed["clamp"].lr == Exp(0)  # a fixed clamp binds
    assert "binds" in lamb.if_fixed["clamp"].text
    adafactor = derive("adafactor").layers["hidden"]
    assert adafactor.if_fixed["eps2"].lr == Exp(-1)  # parameter scaling switches off: Adam's lr


def test_json_contract():
    doc = derive("lamb").to_json()
    assert doc["schema"] == "mupderive.derivation/1" and doc["rule"] == "lamb" and doc["convention"] == "spectral"
    assert set(doc["layers"]) == set(ROLES)
    rational = re.compile(r"^-?\d+(/\d+)?$")
    for layer in doc["layers"].values():
        for key in ("fan_out", "fan_in", "init_std", "multiplier", "lr"):
            assert rational.match(layer[key]), (key, layer[key])
        assert set(layer["hyper"]) == {"eps", "weight_decay", "clamp"}
        assert all(rational.match(v) for v in layer["hyper"].values())
        assert set(layer["if_fixed"]) == set(layer["hyper"])
        assert all(rational.match(v["lr"]) and v["regime"] for v in layer["if_fixed"].values())
    assert json.loads(json.dumps(doc)) == doc


def test_hybrid_rule_uses_its_fallback():
    doc = derive("muon").to_json()
    assert doc["layers"]["hidden"]["rule"] == "muon"
    assert {doc["layers"][r]["rule"] for r in ("input", "output", "vector")} == {"adamw"}
    assert doc["layers"]["output"]["lr"] == derive("adamw").to_json()["layers"]["output"]["lr"]


def test_derivation_is_deterministic_and_exact():
    a, b = derive("sophia").to_json(), derive("sophia").to_json()
    assert a == b
    layer = derive("sophia").layers["input"]
    assert isinstance(layer.exponents()["lr"], sympy.Rational)


RENAMEABLE = {"adamw": ["m", "v", "m_hat", "v_hat", "beta1", "beta2", "eps", "weight_decay"],
              "lamb": ["m", "v", "u", "trust", "clamp", "eps", "weight_decay"],
              "shampoo": ["L", "R", "g", "U", "buf", "matrix_eps", "momentum"]}


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(RENAMEABLE)), salt=st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6))
def test_results_do_not_depend_on_names(name, salt):
    text = builtin_rule_path(name).read_text()
    mapping = {old: f"q{salt}_{k}" for k, old in enumerate(RENAMEABLE[name])}
    renamed = re.sub(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b", lambda m: mapping[m.group(1)], text)
    renamed = renamed.replace('"betas[0]"', '"betas[0]"')
    original, other = derive(load_rule(name)), derive(parse_rule(renamed, "renamed.toml"))
    for role in ROLES:
        a, b = original.layers[role], other.layers[role]
        assert (a.lr, a.init_std, a.multiplier, a.kappa) == (b.lr, b.init_std, b.multiplier, b.kappa)
        assert {mapping.get(k, k): v for k, v in a.hyper.items()} == b.hyper


@settings(max_examples=30, deadline=None)
@given(k=st.fractions(min_value=-2, max_value=2, max_denominator=4), role=st.sampled_from(ROLES),
       name=st.sampled_from(["adam", "adamw", "lion", "signsgd", "adam_atan2", "sgd", "rmsprop"]))
def test_rescaling_the_gradient(k, role, name):
    """Scaling G by n^k leaves sign-like updates alone and shifts SGD-like ones by k (kappa - 1 = d|U|/dk)."""
    rule = load_rule(name)
    base = balance_layer(rule, make_layer(role, Exp(0)), {"nesterov": False, "amsgrad": False, "centered": False})
    layer = make_layer(role, Exp(0))
    shifted_layer = type(layer)(layer.role, layer.o, layer.i, layer.m, layer.init, layer.vector, Exp(k))
    shifted = balance_layer(rule, shifted_layer, {"nesterov": False, "amsgrad": False, "centered": False})
    expected = -k if name == "sgd" else 0
    assert shifted.lr - base.lr == Exp(expected)


def _rule(direction: str, compute: str = "", extra: str = "") -> str:
    return f'''name = "probe"
title = "probe"
paper = "none"
applies_to = ["input", "hidden", "output"]
fallback = "sgd"
[implementation]
[hyperparameters]
lr = {{ role = "lr", default = 0.1 }}
eps = {{ role = "scale", default = 1e-8 }}
{extra}
[update]
compute = """
{compute or "q = G"}
"""
direction = "{direction}"
'''


@pytest.mark.parametrize(("direction", "message"), [
    ("W @ G.T @ G", "cannot bound a matrix product"),
    ("G * mean(G) + eps * G", "mean() of a quantity that can be negative"),
    ("G / (rms(G) + eps) * min(fro_norm(G), eps)", "contradiction"),
    ("W / (rms(W) + eps)", "does not depend on the gradient"),
])
def test_unboundable_rules_are_reported_with_the_term(direction, message, tmp_path):
    rule = parse_rule(_rule(direction), tmp_path / "probe.toml")
    with pytest.raises(CalculusError, match=re.escape(message)):
        derive(rule)
    path = tmp_path / "probe.toml"
    path.write_text(_rule(direction))
    proc = subprocess.run([sys.executable, "-m", "mupderive", "derive", str(path)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_renderings(tmp_path):
    from mupderive.explain import explain
    from mupderive.render import latex_table, markdown_table, text_table

    d = derive("adamw")
    assert "hidden" in text_table(d) and "1/fan_in" in text_table(d)
    assert all(f"\n| {role} |" in markdown_table(d) for role in ROLES)
    assert latex_table(d).startswith("\\begin{tabular}") and "n^{- \\frac{1}{2}}" in latex_table(d)
    assert d._repr_latex_().startswith("$$")
    text = explain(d, ["hidden"])
    assert "eps ~ n^-1" in text and "lr ~ n^-1" in text and "kappa = 1" in text


def test_cli_derive_formats():
    for fmt in ("table", "json", "markdown", "latex"):
        proc = subprocess.run([sys.executable, "-m", "mupderive", "derive", "adam", "--format", fmt,
                               "--convention", "mup-package"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    doc = json.loads(subprocess.run([sys.executable, "-m", "mupderive", "derive", "sgd", "--format", "json",
                                     "--fix", "output.multiplier=-1"], capture_output=True, text=True,
                                    cwd=ROOT).stdout)
    assert doc["layers"]["output"]["lr"] == "1" and doc["fixes"] == ["output.multiplier=-1"]
    proc = subprocess.run([sys.executable, "-m", "mupderive", "explain", "adamw", "--layer", "sideways"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "expected one of" in proc.stderr


LR_RULE = '''
name = "lrinside"
title = "lr inside"
paper = "none"
[implementation]
[hyperparameters]
lr = {{ role = "lr", default = 0.1 }}
eps = {{ role = "scale", default = 1e-8 }}
[update]
state = {{ m = "zeros(G)" }}
compute = """
m = ema(m, G, 0.9)
c = lr**2 / (t * lr**2)
u = {u}
"""
direction = "u"
'''


def test_lr_inside_expressions_is_the_unknown_solved_for(tmp_path):
    """U = lr * Adam's direction: |U|_* = n^(lr + a), so lr = (o - i)/2 - lr - a gives half of Adam's exponent;
    c = lr^2 / (t lr^2) (schedule-free's weight at a constant lr) is width-free. The oracle (interpreter) measures
    |dW|_* flat at that lr."""
    from mupderive.verify.oracle import run_oracle

    path = tmp_path / "lrinside.toml"
    path.write_text(LR_RULE.format(u="(1 - c) * lr * m / (sqrt(m**2) + eps)"), encoding="utf-8")
    d = derive(str(path))
    assert d.layers["hidden"].lr == Fraction(-1, 2) and d.layers["output"].lr == Fraction(-1, 2)
    assert d.layers["input"].lr == 0
    rep = run_oracle(path, widths=(64, 128, 256), steps=3, seeds=1, roles=("hidden",))
    assert rep.check("hidden", "|dW|_*").passed and rep.passed


def test_a_comparison_ordered_by_the_lr_exponent_is_diagnosed_where_it_sits(tmp_path):
    path = tmp_path / "lrinside.toml"
    path.write_text(LR_RULE.format(u="m / (sqrt(m**2) + eps) + lr * sign(G)"), encoding="utf-8")
    with pytest.raises(CalculusError) as info:
        derive(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:14:5: in m / (sqrt(m**2) + eps) + lr * sign(G):") and "lr:" not in message
    assert "assuming a constant lr" in message
