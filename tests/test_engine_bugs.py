"""Regressions for the engine and oracle bugs new rule files hit (issue 13): each test failed before its fix."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
from fractions import Fraction
from pathlib import Path

import pytest

from mupderive import CalculusError, RuleError, __version__, derive, load_rule, parse_rule
from mupderive.calculus.evaluate import hyper_symbol
from mupderive.calculus.exponent import Exp, Undecidable
from mupderive.cli import main
from mupderive.codegen.generate import generate, write_atomically
from mupderive.render import text_table as render_text
from mupderive.verify.oracle import plan_role, render_table, run_oracle

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "tests" / "rules"
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


# -- 2. if_fixed diagnoses hold at the rule's defaults ---------------------------------------------------------
@pytest.mark.parametrize(("rule", "name"), [("schedulefree_adamw.toml", "eps"),
                                            ("shampoo_grafted.toml", "diagonal_eps")])
def test_a_fixed_eps_is_diagnosed_at_the_default_weight_decay_0(rule, name):
    """weight_decay defaults to 0, so keeping eps fixed at the defaults makes the update G / eps (SGD-like, lr n^0);
    only with weight_decay set and scaled does the lr exponent stay (before: "unchanged" at every setting)."""
    hidden = derive(load_rule(RULES / rule)).layers["hidden"]
    regime = hidden.if_fixed[name]
    assert regime.absent == ("weight_decay",)
    assert regime.lr == hidden.lr + 1 and regime.kappa == 2
    assert regime.with_set is not None and regime.with_set.lr == hidden.lr
    assert "SGD-like" in regime.text and "weight_decay at the default 0" in regime.text


def test_the_oracle_runs_a_fixed_hyperparameter_at_the_rules_defaults():
    """The real ScheduleFreeAdamW with eps fixed at its default weight_decay 0 follows the new diagnosis
    (|dW|_* ~ n^-1 at the derived lr), with weight_decay set the old one (n^0); an oracle given the old diagnosis
    (unchanged) fails at the defaults."""
    path = RULES / "schedulefree_adamw.toml"
    derivation = derive(load_rule(path))
    report = run_oracle(path, derivation, widths=(64, 128, 256, 512), steps=3, seeds=2, roles=("hidden",))
    at_defaults = report.check("hidden", "|dW|_*", "eps fixed")
    with_set = report.check("hidden", "|dW|_*", "eps fixed, weight_decay set")
    assert (at_defaults.quantity.predicted, with_set.quantity.predicted) == (-1, 0)
    assert report.passed, render_table(report)
    hidden = derivation.layers["hidden"]
    old = dataclasses.replace(hidden, if_fixed=hidden.if_fixed | {"eps": hidden.if_fixed["eps"].with_set})
    wrong = dataclasses.replace(derivation, layers=derivation.layers | {"hidden": old})
    caught = run_oracle(path, wrong, widths=(64, 128, 256), steps=3, seeds=1, roles=("hidden",))
    assert not caught.check("hidden", "|dW|_*", "eps fixed").passed


# -- 4. a term exactly zero behind a false flag is not compared --------------------------------------------------
def test_a_decay_that_is_zero_behind_a_false_flag_is_not_checked():
    """decay = weight_decay if decoupled else 0 is exactly zero at the default: its comparison with the direction has
    one live term, which the oracle must not check as a compared term (before: checked, without the update's log)."""
    rule = load_rule(RULES / "adam_decoupled_flag.toml")
    derivation = derive(rule)
    for role in ("hidden", "input"):
        plan = plan_role(rule, derivation.layers[role], 64)
        labels = [q.label for s in plan.scenarios for q in s.quantities if q.source == "term"]
        assert labels and not [label for label in labels if "(weight_decay if decoupled else 0) * W" in label]
    coupled = plan_role(rule, derivation.layers["hidden"], 64).scenarios[0].quantities
    assert any("(0 if decoupled else weight_decay) * W in" in q.label for q in coupled)


# -- 3. an eps a state accumulates is calibrated --------------------------------------------------------------
def test_the_oracle_calibrates_an_eps_inside_a_states_recursion():
    """AdaBelief adds eps to s at every step (s = ema(s, r**2) + eps), so every term of that sum carries eps; the
    term that adds it is balanced against the one that reaches it only through s (before: "cannot be balanced",
    the default 1e-16 kept, and the eps-fixed scenario never left the derived regime)."""
    path = RULES / "adabelief.toml"
    report = run_oracle(path, widths=(64, 128, 256, 512), steps=3, seeds=2, roles=("hidden",))
    (role,) = report.roles
    assert any(note.startswith("eps = ") and "balances ema(s, r**2, beta2)" in note for note in role.notes), role.notes
    fixed = report.check("hidden", "|dW|_*", "eps fixed")
    assert fixed.quantity.predicted == -1 and fixed.passed, render_table(report)
    assert report.passed, render_table(report)


# -- 5. a literal compared with a width-scaled term is a fixed hyperparameter, and the derivation says so ---------
def test_a_literal_eps_is_reported_with_the_regime_it_forces():
    """AdamW with a hard-coded 1e-8 in place of eps derives as a fixed eps would (SGD-like, kappa 2), and every
    layer it changes carries a note naming file:line:col, the literal and what scaling it would give instead."""
    text = (ROOT / "rules" / "adamw.toml").read_text(encoding="utf-8")
    old = 'direction = "m_hat / (sqrt(v_hat) + eps)"'
    literal_text = text.replace(old, old.replace("eps)", "1e-8)"))
    line = literal_text.splitlines().index(old.replace("eps)", "1e-8)")) + 1
    col = literal_text.splitlines()[line - 1].index("1e-8") + 1
    derivation = derive(parse_rule(literal_text, "literal.toml"))
    hidden = derivation.layers["hidden"]
    assert hidden.lr == 0 and hidden.kappa == 2  # the literal's meaning is kept: a width-independent 1e-8
    (note,) = [n for n in hidden.notes if "literal" in n]
    assert note.startswith(f"literal.toml:{line}:{col}: the literal 1e-08 is a width-independent constant")
    assert "1e-08 dominates sqrt(v_hat)" in note and "SGD-like" in note
    assert "it would scale as n^-1, with lr ~ n^-1" in note
    assert not [n for n in derivation.layers["output"].notes if "literal" in n]  # sqrt(v_hat) ~ n^0 there


def test_literals_next_to_width_free_terms_are_not_reported():
    """1 - beta1**t, 1 - c with c = 1/t and the like compare width-free scalars: no note."""
    for path in [*sorted((ROOT / "rules").glob("*.toml")), RULES / "schedulefree_adamw.toml"]:
        derivation = derive(load_rule(path))
        assert not [n for layer in derivation.layers.values() for n in layer.notes if "literal" in n], path.name


# -- 6. a hyperparameter a role's rule never reads is '-', not 0 -----------------------------------------------
def test_a_hyperparameter_the_vector_rule_never_reads_is_not_derived_for_it():
    """The grafted Shampoo's vector rule has no matrix_eps: no exponent (JSON omits it, tables and the generated
    module show '-'), no if_fixed entry and no note claiming it enters no comparison."""
    derivation = derive(load_rule(RULES / "shampoo_grafted.toml"))
    vector = derivation.layers["vector"]
    assert "matrix_eps" not in vector.hyper and "matrix_eps" not in vector.if_fixed
    assert not [n for n in vector.notes if "matrix_eps" in n]
    assert "matrix_eps" in derivation.layers["hidden"].hyper
    document = derivation.to_json()
    assert "matrix_eps" not in document["layers"]["vector"]["hyper"]
    assert "matrix_eps" in document["layers"]["hidden"]["hyper"]
    table = render_text(derivation).splitlines()
    columns = table[2].split()
    row = next(line.split() for line in table if line.split()[:1] == ["vector"])
    assert row[columns.index("matrix_eps")] == "-"
    source = generate(derivation)
    exponents = next(line for line in source.splitlines() if line.lstrip().startswith('"vector": {"multiplier"'))
    assert '"matrix_eps"' not in exponents and '"diagonal_eps"' in exponents


# -- 7. a fractional power of a signed tensor is refused -----------------------------------------------------------
def test_a_fractional_power_of_a_signed_quantity_is_refused():
    """m ** 0.5 is NaN wherever m < 0: a one-line error at the power's file:line:col suggesting abs(); v ** 0.5 of a
    nonnegative v derives exactly as sqrt(v) (before: m ** 0.5 derived as |m|^(1/2), silently)."""
    text = (ROOT / "rules" / "adamw.toml").read_text(encoding="utf-8")
    old = 'direction = "m_hat / (sqrt(v_hat) + eps)"'
    as_power = derive(parse_rule(text.replace(old, old.replace("sqrt(v_hat)", "v_hat ** 0.5")), "power.toml"))
    assert _exponents(as_power) == _exponents(derive("adamw"))
    bad = text.replace(old, old.replace("sqrt(v_hat)", "m_hat ** 0.5"))
    line = bad.splitlines().index(old.replace("sqrt(v_hat)", "m_hat ** 0.5")) + 1
    col = bad.splitlines()[line - 1].index("m_hat ** 0.5") + 1
    with pytest.raises(RuleError) as err:
        derive(parse_rule(bad, "signed.toml"))
    assert str(err.value).startswith(f"signed.toml:{line}:{col}: m_hat**0.5: a fractional power of a quantity that "
                                     f"can be negative; abs(m_hat) ** 0.5")
    assert "\n" not in str(err.value)


# -- 8. the docstring's regenerate command works for a rule file -------------------------------------------------
def test_the_regenerate_command_of_a_rule_file_gives_the_same_module(tmp_path, monkeypatch):
    """The command names the rule file by its resolved path, shell-quoted (before: the rule's name, which only a
    built-in has); run from another directory it writes the same module."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my rules").mkdir()
    (tmp_path / "my rules" / "ada belief.toml").write_text((RULES / "adabelief.toml").read_text(encoding="utf-8"),
                                                           encoding="utf-8")
    assert main(["generate", "my rules/ada belief.toml", "-o", "first.py"]) == 0
    first = (tmp_path / "first.py").read_text(encoding="utf-8")
    lines = first.splitlines()
    start = lines.index(f"Generated by mupderive {__version__}; do not edit. Regenerate with:") + 2
    command = " ".join(line.strip() for line in lines[start:lines.index("", start)])
    path = shlex.quote(str((tmp_path / "my rules" / "ada belief.toml").resolve()))
    assert command == f"mupderive generate {path} -o mup_adabelief.py"
    monkeypatch.chdir(tmp_path / "my rules")
    assert main(shlex.split(command)[1:]) == 0
    assert (tmp_path / "my rules" / "mup_adabelief.py").read_text(encoding="utf-8") == first
    assert "mupderive generate adamw -o mup_adamw.py" in generate(derive("adamw"))  # built-ins keep their name


def test_a_path_that_cannot_be_written_in_the_docstring_gets_a_placeholder(tmp_path):
    """A file whose path no docstring can hold (a double quote), a rule without a file, a file that is gone."""
    rule = load_rule(RULES / "adabelief.toml")
    odd = tmp_path / 'odd"name.toml'
    odd.write_text(rule.source, encoding="utf-8")
    for path in (str(odd), "", str(tmp_path / "gone.toml")):
        source = generate(derive(dataclasses.replace(rule, path=path)))
        assert "mupderive generate PATH/TO/adabelief.toml -o mup_adabelief.py" in source, path
        assert "whose path cannot be written here" in source and 'odd"' not in source


# -- 9. generated files get the permissions a plain open() gives ---------------------------------------------------
def test_generated_files_have_normal_permissions(tmp_path):
    """0o666 less the umask for a new file, an existing file's own mode when it is replaced (before: 0o600)."""
    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "new.py", "x = 1\n")
        assert stat.S_IMODE((tmp_path / "new.py").stat().st_mode) == 0o644
        os.umask(0o077)
        write_atomically(tmp_path / "private.py", "x = 1\n")
        assert stat.S_IMODE((tmp_path / "private.py").stat().st_mode) == 0o600
        (tmp_path / "new.py").chmod(0o640)
        write_atomically(tmp_path / "new.py", "x = 2\n")
        assert stat.S_IMODE((tmp_path / "new.py").stat().st_mode) == 0o640
        assert (tmp_path / "new.py").read_text() == "x = 2\n" and sorted(p.name for p in tmp_path.iterdir()) == [
            "new.py", "private.py"]
    finally:
        os.umask(umask)


def test_a_literal_factor_of_a_compared_term_is_reported():
    """Adam with coupled decay hard-coded as G + 0.01 * W: 0.01 is a weight decay kept fixed."""
    text = (ROOT / "rules" / "adam.toml").read_text(encoding="utf-8").replace("g = G + weight_decay * W",
                                                                                "g = G + 0.01 * W")
    hidden = derive(parse_rule(text, "factor.toml")).layers["hidden"]
    (note,) = [n for n in hidden.notes if "literal" in n]
    assert "the literal 0.01 is a width-independent constant" in note and "0.01 * W dominates G" in note
    assert "it would scale as n^-1/2, with lr ~ n^-1" in note and hidden.lr == Fraction(-1, 2)
