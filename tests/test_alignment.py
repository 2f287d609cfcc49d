"""``coord-check --measure-alignment``: Everett et al.'s alignment exponents fitted on a real model, read by analyze."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mupderive.analysis import analyze
from mupderive.cli import main
from mupderive.derivation import rational
from mupderive.verify.coord.alignment import QUANTITIES, fit_alignment, role_table, term_rms
from mupderive.verify.coord.check import run_check
from mupderive.verify.coord.task import MLPTask

WIDTHS = (32, 64, 128, 256)
TOLERANCE = 0.15


def test_term_rms_normalizes_a_coherent_sum_to_fan_in_and_an_incoherent_one_to_its_root():
    n, g = 512, torch.Generator().manual_seed(0)
    z0 = torch.randn(1, n, generator=g)
    w0 = torch.randn(n, n, generator=g) / n**0.5
    aligned = w0 + torch.randn(n, 1, generator=g) @ z0 * 1e-3  # dW = u z0^T: dW z0 sums coherently
    dz = 0.3 * z0  # along dW's row space (dW dz coherent), independent of W0 (W0 dz incoherent)
    values = dict(zip(QUANTITIES, term_rms(torch.nn.functional.linear, w0, aligned, z0, z0 + dz).tolist(),
                      strict=True))
    assert values["own"] / (values["dW"] * values["z0"]) == pytest.approx(n, rel=0.01)
    assert values["propagated"] / (values["W0"] * values["dz"]) == pytest.approx(n**0.5, rel=0.15)
    assert values["cross"] / (values["dW"] * values["dz"]) == pytest.approx(n, rel=0.01)


def test_fit_recovers_the_exponents_and_subtracts_the_multiplier():
    widths, k = [32, 64, 128, 256], {"own": 0.9, "propagated": 0.5, "cross": 0.7}
    n = np.array(widths, dtype=float)
    terms = np.ones((2, len(widths), 2, 1, len(QUANTITIES)))
    for term in k:  # norms all 1: the term itself is n^(k + m), m = 1/2 the forward multiplier's exponent
        terms[:, :, 1, 0, QUANTITIES.index(term)] = n ** (k[term] + 0.5)
    fits = fit_alignment(terms, widths, {"h": "hidden"}, {"first": [1], "last": [1]}, {"hidden": 0.5})
    assert {t: round(s.value, 6) for t, s in fits[0].last.items()} == k
    assert role_table(fits) == {"hidden": {"own": "1", "propagated": "1/2", "cross": "3/4"}}


@pytest.fixture(scope="module")
def measured():
    return run_check("adam", MLPTask(), "derived", WIDTHS, steps=3, seeds=2, measure_alignment=True)


def test_derived_mup_updates_are_fully_aligned_and_initial_weights_are_not(measured):
    """Full alignment of the updates (dW z0 a coherent sum, k = 1) on every hidden layer and the readout, and
    incoherent W0 dz (k = 1/2) on the hidden layers, within the check's tolerance, at the first step and the last.

    The readout's W0 dz is not held to 1/2: dz there has a part backpropagated through W0 itself (W0^T dL/dlogits),
    which W0 sums coherently (measured 0.55 at widths 32-256, 0.70 at 64-512: docs/coord_check/sp)."""
    assert {f.layer for f in measured.alignment} == {"hidden.0", "hidden.1", "readout"}
    for f in measured.alignment:
        for fit in (f.first, f.last):
            assert abs(fit["own"].value - 1) <= TOLERANCE + fit["own"].ci, (f.layer, fit["own"])
            low, high = (0.5, 0.5) if f.role == "hidden" else (0.5, 1.0)
            assert low - TOLERANCE - fit["propagated"].ci <= fit["propagated"].value <= \
                high + TOLERANCE + fit["propagated"].ci, (f.layer, fit)
            assert 0.5 - TOLERANCE - fit["cross"].ci <= fit["cross"].value <= 1 + TOLERANCE + fit["cross"].ci
    assert all(math.isfinite(s.ci) for f in measured.alignment for s in f.last.values())


def test_cli_writes_a_table_that_analyze_reads(tmp_path, capsys):
    path = tmp_path / "alignment.json"
    code = main(["coord-check", "adam", "--widths", ",".join(map(str, WIDTHS)), "--steps", "2", "--seeds", "2",
                 "--device", "cpu", "--measure-alignment", str(path)])
    out = capsys.readouterr().out
    assert code in (0, 1) and "per role (what analyze --alignment reads)" in out, out  # the table whatever the verdict
    doc = json.loads(path.read_text())
    assert doc["schema"] == "mupderive.alignment/1" and set(doc["roles"]) == {"hidden", "output"}
    assert doc["roles"]["hidden"]["own"] == "1" and doc["roles"]["hidden"]["propagated"] == "1/2"
    assert main(["analyze", "adam", "--alignment", str(path), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["alignment"] == "table"
    want = analyze("adam", "sp", doc["roles"])
    assert {r: result["layers"][r]["lr"] for r in ("input", "hidden", "output")} == {
        r: str(rational(want.layers[r].lr)) for r in ("input", "hidden", "output")}


def test_a_document_of_another_schema_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "mupderive.analysis/1", "roles": {}}))
    assert main(["analyze", "adam", "--alignment", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mupderive.alignment/1" in err and len(err.strip().splitlines()) == 1
    assert main(["coord-check", "adam", "--measure-alignment", str(tmp_path / "x.txt")]) == 2


def test_a_transformers_model_with_conv1d_layers_is_measured_too():
    """GPT-2 stores its matrices (in, out) in Conv1D modules: the terms come from re-running the module, whatever its
    layout, so every projection and the readout get a finite fit; the updates sum more coherently than an incoherent
    sum there too (c_attn, reading the first LayerNorm, 0.76 at these tiny widths; the rest 0.98-1.05)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mupderive.verify.user import UserTask

    def gpt2(width: int) -> GPT2LMHeadModel:
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=width, n_layer=1, n_head=4,
                                          tie_word_embeddings=False, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0))

    r = run_check("adam", UserTask(gpt2), "derived", (32, 64, 128), steps=2, seeds=2, measure_alignment=True)
    fitted = {f.layer: f for f in r.alignment}
    assert set(fitted) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                           "transformer.h.0.mlp.c_proj", "lm_head"}
    for f in fitted.values():
        assert all(math.isfinite(s.value) for s in f.last.values())
        assert f.last["own"].value > 0.5 + TOLERANCE - f.last["own"].ci, f
        assert abs(f.last["propagated"].value - 0.5) <= TOLERANCE + f.last["propagated"].ci or f.role == "output"
