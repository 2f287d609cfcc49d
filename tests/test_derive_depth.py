"""Depth exponents: the branch multiplier from the stream conditions, and every knob of a parameter inside a branch
from the calculus run in the depth variable. Oracles: Depth-muP (Yang et al. 2023, TP-VI: K = 1, alpha = 1/2),
CompleteP (Dey et al. 2025: alpha = 1) and the homogeneity laws of Zheng et al. 2026 / THEORY section 6."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest
import sympy

from mupderive.depth import Depth, branch_alpha, breaks
from mupderive.derivation import derive
from mupderive.errors import MupError


def _depth(rule: str, **kw) -> dict:
    return derive(rule, depth=Depth(**kw)).to_json()


@pytest.mark.parametrize(("k", "alpha"), [(1, Fraction(1, 2)), (2, Fraction(1)), (3, Fraction(1)), (8, Fraction(1))])
def test_alpha_from_branch_matrices(k, alpha):
    assert branch_alpha(k) == alpha
    assert breaks(alpha, k)[:0] == () and not [b for b in breaks(alpha, k) if "vanishes as" in b and "lazy" in b]


def test_depth_mup_tp6_cells():
    """TP-VI: one matrix per branch, multiplier L^-1/2; SGD's lr is depth-independent, Adam's L^-1/2."""
    sgd, adam = _depth("sgd", branch_matrices=1), _depth("adam", branch_matrices=1)
    assert sgd["depth"]["branch_multiplier"] == "-1/2" and adam["depth"]["alpha"] == "1/2"
    assert sgd["layers"]["hidden"]["depth"]["lr"] == "0"
    assert adam["layers"]["hidden"]["depth"]["lr"] == "-1/2"
    assert adam["layers"]["hidden"]["depth"]["hyper"]["eps"] == "-1/2"


def test_completep_cells():
    """CompleteP (alpha = 1): AdamW's hidden lr is depth-independent, eps ~ L^-1; embedding and readout untouched."""
    d = _depth("adamw")
    assert d["depth"] == {"alpha": "1", "branch_matrices": "2", "branch_multiplier": "-1"}
    assert d["depth_detail"] == {"imposed": False, "breaks": []}
    hidden = d["layers"]["hidden"]["depth"]
    assert hidden == {"multiplier": "0", "init_std": "0", "lr": "0", "hyper": {"eps": "-1", "weight_decay": "0"}}
    assert d["layers"]["hidden"]["depth_detail"]["scope"] == "branch"
    for role in ("input", "output"):
        outside = d["layers"][role]["depth"]
        assert d["layers"][role]["depth_detail"]["scope"] == "outside" and outside["lr"] == "0"
        assert set(outside["hyper"].values()) == {"0"}
        assert d["layers"][role]["depth_detail"]["in_branch"]["hyper"]["eps"] == "-1"


@pytest.mark.parametrize("alpha", [Fraction(1, 2), Fraction(3, 4), Fraction(1)])
def test_homogeneity_laws(alpha):
    """Update homogeneous of degree p in the gradient: lr ~ L^(alpha (1 + p) - 1); eps ~ L^-alpha; Shampoo's
    damping, compared with G G^T, ~ L^-2alpha. Derived from each rule, at imposed alphas."""
    def cell(rule, key="lr", role="hidden"):
        layer = derive(rule, depth=Depth(alpha=alpha)).depth.layers[role]
        return layer.lr if key == "lr" else layer.hyper[key]

    assert cell("adamw") == alpha - 1  # p = 0
    assert cell("muon") == alpha - 1
    assert cell("lion") == alpha - 1
    assert cell("sgd") == 2 * alpha - 1  # p = 1
    assert cell("sophia") == -1  # m / h: p = -1
    assert cell("adamw", "eps") == -alpha
    assert cell("shampoo", "matrix_eps") == -2 * alpha
    assert cell("adamw", "lr", "vector") == alpha - 1


def test_imposed_alpha_says_what_breaks():
    lazy = derive("adamw", depth=Depth(alpha=Fraction(1, 2))).depth
    assert lazy.imposed and any("order-2" in b and "L^-1/2" in b and "lazy" in b for b in lazy.breaks)
    blowup = derive("adamw", depth=Depth(branch_matrices=1, alpha=Fraction(1, 4))).depth
    assert any("at init" in b and "L^1/4" in b for b in blowup.breaks)
    assert derive("adamw", depth=Depth(alpha=Fraction(1))).depth.breaks == ()


def test_fixed_eps_at_depth_diagnosed():
    """A depth-independent eps dominates sqrt(v) ~ L^-alpha: Adam turns SGD-like and needs L^(2 alpha - 1)."""
    regime = derive("adamw", depth=Depth(branch_matrices=1)).depth.layers["hidden"].if_fixed["eps"]
    assert regime.lr == Fraction(0) and "SGD-like" in regime.text and "L^" in regime.text and "n^" not in regime.text


def test_width_only_unchanged():
    assert "depth" not in derive("adamw").to_json()
    assert derive("adamw", depth=Depth()).to_json()["layers"]["hidden"]["lr"] == derive("adamw").to_json()[
        "layers"]["hidden"]["lr"]


def test_custom_layer_sits_in_a_branch():
    d = derive("adam", layers={"ffn": (Fraction(1), Fraction(1))}, depth=Depth(branch_matrices=1))
    assert d.depth.layers["ffn"].scope == "branch" and d.depth.layers["ffn"].lr == Fraction(-1, 2)


def test_exponents_are_exact():
    x = derive("adam", depth=Depth(branch_matrices=1)).depth.layers["hidden"].exponents()
    assert x["lr"] == sympy.Rational(-1, 2) and isinstance(x["lr"], sympy.Rational)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mupderive", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_and_tables():
    out = _cli("derive", "adamw", "--branch-matrices", "1", "--format", "json")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["depth"]["alpha"] == "1/2" and doc["layers"]["hidden"]["depth"]["lr"] == "-1/2"
    text = _cli("derive", "adamw", "--depth").stdout
    assert "depth exponents D" in text and "(L/L_base)^-1" in text
    assert "n^-1 L^-1/2" in _cli("derive", "adamw", "--alpha", "1/2", "--format", "markdown").stdout
    assert "L^{- \\frac{1}{2}}" in _cli("derive", "adamw", "--alpha", "1/2", "--format", "latex").stdout
    explained = _cli("explain", "adamw", "--layer", "hidden", "--alpha", "1/2").stdout
    assert "inside a residual branch" in explained and "Imposed alpha breaks" in explained


@pytest.mark.parametrize("args", [("--branch-matrices", "0"), ("--alpha", "x"), ("--alpha", "0")])
def test_cli_bad_depth_options(args):
    out = _cli("derive", "adamw", *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_bad_spec_is_a_mup_error():
    with pytest.raises(MupError):
        Depth(branch_matrices=0)


def test_depth_pass_states_its_assumptions():
    """A global statistic in depth is taken as the layer's own term: said in the JSON and the table, not silent."""
    doc = derive("prodigy", depth=Depth()).to_json()
    notes = doc["layers"]["hidden"]["depth_detail"]["notes"]
    assert any("total(" in n and "not analysed" in n for n in notes)
    assert "depth notes:" in _cli("derive", "prodigy", "--depth").stdout
