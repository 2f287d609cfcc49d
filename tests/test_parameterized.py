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

from mupderive.codegen.generate import generate
from mupderive.parameterized import parameterized, predicted_slopes
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
