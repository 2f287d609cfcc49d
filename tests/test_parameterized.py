"""``generate --parameterization sp|ntk|mup|mfp --alignment ...``: the analysis's per-layer lrs and hyperparameters in
the generated module, on the parameterization's own multipliers and standard init."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from mupderive.cli import main
from mupderive.codegen.generate import generate
from mupderive.derivation import rational
from mupderive.parameterized import parameterized, predicted_slopes
from mupderive.resources import builtin_rule_names
from mupderive.verify.coord.check import run_check
from mupderive.verify.coord.judge import Expect
from mupderive.verify.coord.result import text_report
from mupderive.verify.coord.task import GPTTask, MLPTask
from mupderive.verify.models import GPT
from mupderive.verify.train import import_source

ROOT = Path(__file__).resolve().parents[1]
VOCAB, BASE, WIDTH = 40, 16, 64  # width ratio 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mupderive", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize(("rule", "parameterization", "alignment"),
                         [("adam", "sp", "full"), ("adam", "sp", "none"), ("sgd", "ntk", "full"),
                          ("adamw", "mup", "none")])
def test_group_lrs_and_eps_are_what_analyze_prints(tmp_path, rule, parameterization, alignment):
    out = _cli("analyze", rule, "--parameterization", parameterization, "--alignment", alignment, "--format", "json")
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)["layers"]
    path = tmp_path / "mod.py"
    made = _cli("generate", rule, "--parameterization", parameterization, "--alignment", alignment, "-o", str(path))
    assert made.returncode == 0, made.stderr
    module = import_source(path.read_text())
    assert (parameterization, alignment) == (module.PARAMETERIZATION, module.ALIGNMENT)
    model = GPT(VOCAB, WIDTH, 1, 4, 8)
    p = module.MuP(model, GPT(VOCAB, BASE, 1, 4, 8))
    p.initialize_()
    hypers = {"lr": 0.01, **({"eps": 1e-8} if rule != "sgd" else {})}
    opt = p.optimizer(**hypers)
    seen = set()
    for group in opt.param_groups:
        role = group["mup_role"]
        if role == "fixed":
            continue
        seen.add(role)
        assert group["mup_ratio"] == WIDTH / BASE
        for name, base in hypers.items():
            exponent = layers[role]["lr"] if name == "lr" else layers[role]["hyper"][name]
            want = base * (WIDTH / BASE) ** float(Fraction(exponent))
            assert group[name] == pytest.approx(want, rel=1e-12), (role, name)
    assert seen == {"input", "hidden", "output", "vector"}


def test_sp_keeps_the_standard_init_and_trains():
    module = import_source(generate(parameterized("adam", "sp", "full")))
    torch.manual_seed(0)
    model = GPT(VOCAB, 256, 1, 4, 8)
    p = module.MuP(model, GPT(VOCAB, BASE, 1, 4, 8))
    p.initialize_()
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)  # Embedding N(0, 1)
    for weight in (model.blocks[0].attn.c_attn.weight, model.blocks[0].mlp.c_proj.weight, model.lm_head.weight):
        assert weight.std().item() == pytest.approx(weight.shape[1] ** -0.5, rel=0.05)  # fan_in**-1/2
    assert p.multipliers["lm_head.weight"] == 1.0 and p.multipliers["wte.weight"] == 1.0
    opt = p.optimizer(lr=3e-3)
    x = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_a_tied_model_is_refused_under_an_analysed_parameterization():
    module = import_source(generate(parameterized("adam", "sp", "full")))

    class Tied(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.wte = torch.nn.Embedding(VOCAB, width)
            self.head = torch.nn.Linear(width, VOCAB, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, x):
            return self.head(self.wte(x))

    with pytest.raises(ValueError, match="no tied row"):
        module.MuP(Tied(64), Tied(16))


def test_predicted_slopes_follow_the_tables():
    """Everett's muP starts its readout at n^-1/2 (multiplier n^-1/2, init n^-1/2 on a coherent-free input); SP's
    at 1; every layer at its largest stable lr learns features under full alignment."""
    mup, sp = predicted_slopes(parameterized("adam", "mup").analysis), predicted_slopes(parameterized("adam").analysis)
    assert mup["output"]["init"] == Fraction(-1, 2) and sp["output"]["init"] == 0
    assert all(row["change"] == 0 and row["effect"] == 0 for row in sp.values())
    lazy = predicted_slopes(parameterized("sgd", "mup", "none").analysis)  # SGD's muP readout: lazy when unaligned
    assert lazy["output"]["change"] == Fraction(-1, 2) and lazy["output"]["activation"] == Fraction(-1, 2)


def test_generate_options_that_the_analysis_fixes_are_one_line_errors(tmp_path):
    out = tmp_path / "m.py"
    for args in (("--parameterization", "sp", "--fix", "output.multiplier=-1"),
                 ("--alignment", "none"), ("--parameterization", "foo"),
                 ("--parameterization", "sp", "--alignment", str(tmp_path / "missing.json"))):
        bad = _cli("generate", "adam", *args, "-o", str(out))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
        assert not out.exists()


# -- coord-check --parameterization sp --alignment ... (sizes as tests/test_coord_check.py keeps them) ---------------
CHECK_WIDTHS = (32, 64, 128, 256)
SMALL_GPT = GPTTask(n_layer=1, block_size=16)


def test_sp_with_per_layer_lrs_passes_on_the_gpt_every_slope_at_its_prediction():
    r = run_check("adam", SMALL_GPT, "sp", CHECK_WIDTHS, steps=3, seeds=3, alignment="full")
    assert r.parameterization == "sp-full" and r.passed, text_report(r)
    assert r.exponents["hidden"]["lr"] == "-1" and r.exponents["output"]["init_std"] == "-1/2"
    predicted = predicted_slopes(parameterized("adam", "sp", "full").analysis)
    for c in r.checks:
        if c.role in predicted:  # the target is the analysis's slope for the role (here every one is 0)
            want = predicted[c.role]["init" if c.checkpoint == "init" else c.quantity]
            assert c.target == Expect("=", float(want)) and c.agrees


def test_lrs_of_the_unaligned_analysis_blow_up_on_a_model_whose_updates_align():
    """Under alignment none SP's hidden and readout lrs are n^-1/2: the real (aligned) first step grows as n^1/2."""
    r = run_check("adam", MLPTask(), "sp", CHECK_WIDTHS, steps=3, seeds=3, alignment="none")
    failed = dict(r.failures)
    assert set(failed) == {"hidden.0", "hidden.1", "readout"}, text_report(r)
    assert all("learning rate is too large" in failed[layer] for layer in failed)


def test_a_nonzero_predicted_slope_is_the_target():
    """Everett's muP scales the readout by n^-1/2 at init: the judge expects -1/2 there, not 0, and it passes."""
    r = run_check("adam", MLPTask(), "mup", CHECK_WIDTHS, steps=3, seeds=3, alignment="full")
    init = next(c for c in r.checks if c.layer == "readout" and c.checkpoint == "init")
    assert init.target == Expect("=", -0.5) and init.passed and r.passed, text_report(r)


def test_cli_exit_status(tmp_path, capsys):
    base = ["coord-check", "adam", "--widths", "32,64,128,256", "--steps", "2", "--seeds", "3", "--device", "cpu"]
    assert main([*base, "--parameterization", "sp", "--alignment", "none"]) == 1
    assert "blows up" in capsys.readouterr().out
    for bad in (["--alignment", "none"], ["--parameterization", "foo"],
                ["--parameterization", "sp", "--fix", "output.multiplier=-1"]):
        assert main([*base, *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("rule", builtin_rule_names())
def test_every_builtin_rule_generates_an_sp_module(rule):
    module = import_source(generate(parameterized(rule, "sp", "full")))
    want = parameterized(rule, "sp", "full").analysis.layers
    assert {role: module.EXPONENTS[role]["init_std"] for role in want} == {
        role: str(rational(layer.init_std)) for role, layer in want.items()}
    assert "tied" not in module.EXPONENTS and module.PARAMETERIZATION == "sp"
