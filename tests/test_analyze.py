"""``mupderive analyze``: Everett et al.'s largest stable learning rates from the calculus, for any rule."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from mupderive.analysis import EVERETT, analyze
from mupderive.derivation import rational
from mupderive.resources import builtin_rule_names

ROOT = Path(__file__).resolve().parents[1]

# Everett et al. 2024's lr exponents c (lr ~ n^-c), embedding / hidden / readout. Their printed tables could not be
# read here: SGD and Adam are a published reimplementation's table (m-wojnar/maxP), which an independent solve of the
# paper's constraint table agrees with; Adafactor is that solve alone. Held as oracles, not inputs.
CELLS = {
    ("sgd", "full"): {"sp": "-1/2 1/2 1", "ntk": "-1/2 -1/2 0", "mup": "0 0 0", "mfp": "-1 -1 -1"},
    ("sgd", "none"): {"sp": "-1/2 0 1/2", "ntk": "-1/2 -1 -1/2", "mup": "0 -1/2 0", "mfp": "-1 -3/2 -1"},
    ("adam", "full"): {"sp": "0 1 1", "ntk": "0 1/2 1/2", "mup": "1/2 1 1/2", "mfp": "0 1/2 0"},
    ("adam", "none"): {"sp": "0 1/2 1/2", "ntk": "0 0 0", "mup": "1/2 1/2 0", "mfp": "0 0 -1/2"},
    ("adafactor", "full"): {"sp": "0 1/2 1/2", "ntk": "0 1/2 1/2", "mup": "0 1/2 0", "mfp": "0 1/2 0"},
    ("adafactor", "none"): {"sp": "0 0 0", "ntk": "0 0 0", "mup": "0 0 0", "mfp": "0 0 0"},
}
PARAMS = [(rule, alignment, p, want) for (rule, alignment), row in CELLS.items() for p, want in row.items()]


def _c(result) -> str:
    return " ".join(str(-rational(result.layers[r].lr)) for r in ("input", "hidden", "output"))


@pytest.mark.parametrize(("rule", "alignment", "parameterization", "want"), PARAMS,
                         ids=[f"{r}-{a}-{p}" for r, a, p, _ in PARAMS])
def test_published_cells(rule, alignment, parameterization, want):
    assert _c(analyze(rule, parameterization, alignment)) == want


def test_a_parameter_scaled_update_cannot_outgrow_the_weights_it_scales_with():
    """Adafactor's step is rms(W) times a normalized direction: past lr ~ n^0 the update outgrows W0 and W grows by a
    width-dependent factor every step, so the unaligned muP/MFP readout stays at n^0; Adam's (not parameter-scaled)
    MFP readout takes its n^1/2."""
    for p in ("mup", "mfp"):
        layer = analyze("adafactor", p, "none").layers["output"]
        assert rational(layer.lr) == 0 and rational(layer.terms["own"]) < 0  # the cap binds below the own term's
    assert rational(analyze("adam", "mfp", "none").layers["output"].lr) == Fraction(1, 2)


@pytest.mark.parametrize("rule", ["sgd", "adam", "adafactor"])
def test_mup_and_mfp_are_mup_equivalent_under_full_alignment_only(rule):
    for p in EVERETT:
        assert analyze(rule, p, "full").mup_equivalent == (p in ("mup", "mfp"))
        assert not analyze(rule, p, "none").mup_equivalent


def test_the_symmetry_moves_lrs_by_kappa():
    """muP -> MFP is theta = 1/2 on every layer: c moves by kappa theta (SGD 1, Adam 1/2, Adafactor 0)."""
    for rule, kappa in (("sgd", 2), ("adam", 1), ("adafactor", 0)):
        mup, mfp = analyze(rule, "mup"), analyze(rule, "mfp")
        for role in ("input", "hidden", "output"):
            assert rational(mfp.layers[role].lr - mup.layers[role].lr) == Fraction(kappa, 2)


def test_epsilon_follows_the_gradient_of_the_parameterization():
    sp, mup = analyze("adam", "sp"), analyze("adam", "mup")
    assert sp.layers["hidden"].gradient == sp.layers["hidden"].hyper["eps"]  # SP: gradient entries n^-1/2
    assert rational(sp.layers["hidden"].hyper["eps"]) == Fraction(-1, 2)
    assert rational(mup.layers["hidden"].hyper["eps"]) == -1


def test_one_lr_for_all_leaves_sp_adam_embedding_lazy():
    result = analyze("adam", "sp", "full")
    assert rational(result.global_lr) == -1
    assert rational(result.layers["input"].at_global_lr) == -1 and rational(result.layers["hidden"].at_global_lr) == 0


@pytest.mark.parametrize("rule", builtin_rule_names())
def test_every_builtin_rule_analyzes(rule):
    for p in EVERETT:
        for alignment in ("full", "none"):
            doc = analyze(rule, p, alignment).to_json()
            assert doc["schema"] == "mupderive.analysis/1" and set(doc["layers"]) >= {"input", "hidden", "output"}


def test_a_table_parameterization_and_alignment():
    table = {role: {"multiplier": str(m), "init_std": str(s)} for role, (m, s) in EVERETT["sp"].items()}
    assert _c(analyze("adam", table, {"hidden": {"own": "1/2", "cross": "1/2"}})) == "0 1/2 1"  # hidden unaligned
    # an unaligned own term alone does not help: the coherent dW dz term (the input changes by Theta(1)) binds
    limited = analyze("adam", table, {"hidden": {"own": "1/2"}})
    assert _c(limited) == "0 1 1" and rational(limited.layers["hidden"].terms["cross"]) == 0


def test_cli_json_tables_and_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "mupderive", "analyze", *args], capture_output=True, text=True,
                              cwd=ROOT)

    out = run("adam", "--parameterization", "sp", "--alignment", "none", "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {r: doc["layers"][r]["lr"] for r in ("input", "hidden", "output")} == {"input": "0", "hidden": "-1/2",
                                                                                   "output": "-1/2"}
    table = tmp_path / "p.json"
    table.write_text(json.dumps({"input": {"multiplier": 0, "init_std": 0}}))
    for args in (("adam", "--parameterization", "foo"), ("adam", "--parameterization", str(table)),
                 ("adam", "--alignment", str(tmp_path / "missing.json"))):
        bad = run(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    for fmt in ("table", "markdown", "latex"):
        assert "hidden" in run("sgd", "--format", fmt).stdout


def test_a_parameterization_the_one_layer_chain_cannot_speak_for_says_so():
    """Hidden weights with entries ~ 1: unstable at init, and the backward pass grows through every hidden layer."""
    table = {"input": {"multiplier": 0, "init_std": 0}, "hidden": {"multiplier": 0, "init_std": 0},
             "output": {"multiplier": 0, "init_std": "-1/2"}}
    notes = " ".join(analyze("sgd", table).notes)
    assert "each hidden layer scales the backward gradient by n^1/2" in notes
    assert "hidden: the initial weights alone grow its output change as n^1/2" in notes
    assert all(not analyze("adam", p, a).notes for p in EVERETT for a in ("full", "none"))
