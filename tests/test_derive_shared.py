"""The derivation of what several layers share: a tied embedding/readout tensor, the attention logit scale, and each
role's gradient norm (what a global clip threshold meets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sympy

from mupderive import derive
from mupderive.calculus.exponent import ZERO, Exp
from mupderive.derivation import attention_scale, rational
from mupderive.explain import explain
from mupderive.render import latex_table, markdown_table, text_table
from mupderive.resources import builtin_rule_names
from mupderive.solver import Fix

ROOT = Path(__file__).resolve().parents[1]
RULES = builtin_rule_names()


@pytest.mark.parametrize("convention", ["spectral", "mup-package"])
@pytest.mark.parametrize("rule", RULES)
def test_tied_tensor_takes_the_embedding_exponents_and_a_readout_multiplier(rule, convention):
    d = derive(rule, convention)
    tied = d.tied
    assert tied is not None and tied.conflicts == ()
    emb = d.layers["input"].exponents()
    got = tied.exponents()
    assert got["readout_multiplier"] == -1  # the output role's spectral init at n^r equals the embedding's iff r = -1
    assert {k: v for k, v in got.items() if k != "readout_multiplier"} == emb
    # the readout use, re-derived at that multiplier, asks for exactly the embedding's lr and hyperparameters
    out = tied.readout.exponents()
    assert out["init_std"] == emb["init_std"] and out["lr"] == emb["lr"]
    assert {k: out[k] for k in emb if k not in ("multiplier",)} == {k: v for k, v in emb.items() if k != "multiplier"}
    assert tied.readout.grad_norm == tied.embedding.grad_norm


def test_the_tie_follows_a_fixed_embedding_multiplier():
    d = derive("adam", fixes=[Fix("input", "multiplier", sympy.Rational(1))])
    got = d.tied.exponents()
    assert (got["multiplier"], got["readout_multiplier"], got["init_std"], got["lr"]) == (1, 0, -1, -1)
    assert d.tied.conflicts == ()


def test_a_tie_across_two_optimizers_is_a_stated_conflict(tmp_path):
    text = (ROOT / "rules" / "signsgd.toml").read_text().replace(
        'name = "signsgd"', 'name = "signsgd_in"\napplies_to = ["input", "hidden", "vector"]\nfallback = "sgd"')
    path = tmp_path / "signsgd_in.toml"
    path.write_text(text)
    d = derive(path)
    conflicts = " ".join(d.tied.conflicts)
    assert "signsgd_in" in conflicts and "sgd" in conflicts
    assert "lr: the embedding use needs n^0, the readout use (multiplier n^-1) n^1" in conflicts
    assert "no single tensor meets both uses" in text_table(d)
    assert "| tied |" not in markdown_table(d)
    assert d.to_json()["tied"]["conflicts"] == list(d.tied.conflicts)


def test_attention_logit_scale_is_derived_from_the_contraction():
    a = derive("adamw").attention
    assert (rational(a.logit_scale), rational(a.at_init), rational(a.standard_drift)) == (-1, sympy.Rational(-1, 2),
                                                                                          sympy.Rational(1, 2))
    heads_only = attention_scale(ZERO)  # more heads of a fixed head_dim change nothing
    assert heads_only.logit_scale == ZERO and heads_only.at_init == ZERO
    assert attention_scale(Exp(1) / 2).logit_scale == Exp(-1) / 2  # head_dim ~ n^(1/2)


@pytest.mark.parametrize(("convention", "output"), [("spectral", "1/2"), ("mup-package", "-1/2")])
def test_gradient_norm_exponents_per_role(convention, output):
    doc = derive("adamw", convention).to_json()
    norms = {role: layer["grad_norm"] for role, layer in doc["layers"].items()}
    assert norms == {"input": "-1/2", "hidden": "0", "output": output, "vector": "-1/2"}
    assert doc["tied"]["grad_norm"] == "-1/2"


def test_json_carries_tied_and_attention():
    doc = derive("sgd", "mup-package").to_json()
    assert doc["tied"] == {"rule": "sgd", "multiplier": "0", "readout_multiplier": "-1", "init_std": "0", "lr": "1",
                           "grad_norm": "-1/2", "hyper": {"weight_decay": "-1"}, "conflicts": []}
    assert doc["attention"] == {"logit_scale": "-1", "at_init": "-1/2"}
    json.dumps(doc)


def test_tables_show_the_tied_row_and_the_attention_scale():
    d = derive("adam")
    assert "  tied    -1          0         0   -1   -1" in text_table(d)
    assert "| tied | n^-1 | n^0 | n^0 | n^-1 | n^-1 |" in markdown_table(d)
    assert "\\textrm{tied} & n^{-1} & n^{0} & n^{0} & n^{-1} & n^{-1}" in latex_table(d)
    assert "head_dim^-1" in text_table(d)


def test_explain_shows_the_tie_and_attention():
    text = explain(derive("sgd"))
    assert "== tied embedding/readout (one tensor, two uses) ==" in text
    assert "the readout use gets the forward multiplier n^-1" in text
    assert "the tie is sound" in text
    assert "== attention logits ==" in text and "head_dim^-1" in text


@pytest.mark.parametrize("layer", ["tied", "attention"])
def test_explain_cli_takes_the_shared_sections(layer):
    out = subprocess.run([sys.executable, "-m", "mupderive", "explain", "lamb", "--layer", layer],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "==" in out.stdout and ("tied" in out.stdout if layer == "tied" else "attention" in out.stdout)
