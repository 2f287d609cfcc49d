"""``mupderive coord-check --depths``: the GPT at one width across depths, the residual stream judged (bounded at
init, a Theta(1) one-step change), the layers matched across depths; the width-only module (--no-depth-scaling)
fails on the stream, which grows as L^1/2 at init and changes as ~L. Small: width 32, depths 2-8, 3 steps, 3 seeds,
Muon (its stream margins are the widest of the seven rules in docs/coord_check/depth)."""

from __future__ import annotations

import json

import pytest
import torch

from mupderive.cli import main
from mupderive.errors import MupError
from mupderive.verify.coord import depth as depth_module
from mupderive.verify.coord.check import run_check
from mupderive.verify.coord.task import GPTTask, MLPTask
from mupderive.verify.user import UserTask

GPT = GPTTask(block_size=16)
DEPTHS = (2, 4, 8)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def streams(result):
    return [layer for layer, role in result.layers.items() if role == "stream"]


def slope(result, layer, quantity, checkpoint):
    return next(c for c in result.checks if (c.layer, c.quantity, c.checkpoint) == (layer, quantity, checkpoint))


def test_matching_follows_the_end_of_each_segment():
    assert [depth_module.matched_block(j, 2, 16) for j in (0, 1)] == [7, 15]
    assert [depth_module.matched_block(j, 2, 2) for j in (0, 1)] == [0, 1]
    names = ["wte", "blocks.0.ln_1", "attention_logits.0", "blocks.1.attn.c_proj", "attention_logits.1", "ln_f"]
    with_streams = depth_module.with_streams(names, "blocks", 2)
    assert with_streams == ["wte", "blocks.0.ln_1", "blocks.0", "attention_logits.0", "blocks.1.attn.c_proj",
                            "blocks.1", "attention_logits.1", "ln_f"]
    assert depth_module.names_at(with_streams, "blocks", 2, 8, 2) == [
        "wte", "blocks.3.ln_1", "blocks.3", "attention_logits.3", "blocks.7.attn.c_proj", "blocks.7",
        "attention_logits.7", "ln_f"]


def test_derived_keeps_the_stream_and_width_only_does_not():
    derived = run_check("muon", GPT, widths=[32], depths=DEPTHS, steps=3, seeds=3)
    width_only = run_check("muon", GPT, widths=[32], depths=DEPTHS, steps=3, seeds=3, depth_scaling=False)
    assert derived.passed, derived.failures
    assert streams(derived) == ["blocks.0", "blocks.1"] and derived.axis == "depth" and derived.widths == [32]
    last = streams(derived)[-1]
    assert slope(derived, last, "activation", "init").slope.value < 0.15  # bounded: 1/2 - alpha <= 0
    assert abs(slope(derived, last, "change", "first").slope.value) < 0.3
    assert not width_only.passed
    assert {layer for layer, _ in width_only.failures} >= set(streams(width_only))
    assert slope(width_only, last, "activation", "init").slope.value > 0.35  # independent branches: ~L^1/2
    assert slope(width_only, last, "change", "first").slope.value > 0.7  # coherent updates: ~L
    assert any("residual stream" in message or "(stream) blows up as L^" in message
               for _, message in width_only.failures)
    # the per-layer changes are reported, not judged (see DepthTargets)
    reported = slope(derived, "blocks.1.mlp.c_fc", "change", "first")
    assert str(reported.target) == "reported" and reported.passed


def test_cli_depths_exit_codes_and_json(tmp_path, capsys):
    argv = ["coord-check", "muon", "--model", "gpt", "--widths", "32", "--depths", "2,4,8", "--steps", "3",
            "--seeds", "3", "--device", "cpu"]
    assert main([*argv, "--no-depth-scaling", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "depths 2,4,8 at width 32 (width-only: --no-depth-scaling)" in out and "blows up as L^" in out
    document = json.loads((tmp_path / "muon_gpt_derived_depth_width-only.json").read_text())
    assert document["depths"] == [2, 4, 8] and document["depth_scaling"] is False
    assert document["rms_layout"] == "rms[layer][quantity][step][seed][depth index]"
    assert (tmp_path / "muon_gpt_derived_depth_width-only.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(task=MLPTask()), "the MLP has no residual blocks"),
    (dict(task=GPT, parameterization="standard"), "a depth check compares the derived parameterization"),
    (dict(task=GPT, depths=(2, 4)), "at least 3 distinct"),
    (dict(task=UserTask(build=lambda width: GPTTask().build(width))), "takes no depth keyword"),
])
def test_bad_depth_checks_are_one_line_errors(kwargs, message):
    options = dict(widths=[32], depths=DEPTHS, steps=1, seeds=1) | kwargs
    with pytest.raises(MupError, match=message):
        run_check("adamw", **options)


def test_no_depth_scaling_without_depths_is_refused():
    with pytest.raises(MupError, match="--no-depth-scaling applies to a depth check"):
        run_check("adamw", GPT, widths=[32, 64, 128], steps=1, seeds=1, depth_scaling=False)


@pytest.mark.slow
def test_a_transformers_model_of_your_own_across_depths(tmp_path, capsys):
    """GPT-2 from a config, FUNC(width, depth) in a file: the check finds its blocks (transformer.h), hooks its
    attention (a tuple output) and MLP, and tells the two modules apart."""
    path = tmp_path / "gpt2_depth.py"
    path.write_text(
        "from transformers import GPT2Config, GPT2LMHeadModel\n\n\n"
        "def build(width, depth):\n"
        "    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=depth, n_head=2, vocab_size=96, n_positions=32,"
        " bos_token_id=0, eos_token_id=0))\n")
    argv = ["coord-check", "muon", "--model", f"{path}:build", "--widths", "32", "--depths", "2,4,8", "--steps", "3",
            "--seeds", "3", "--device", "cpu"]
    assert main([*argv, "--no-depth-scaling"]) == 1
    out = capsys.readouterr().out
    assert "transformer.h.1 (stream)" in out and "blows up as L^" in out
    assert main(argv) == 0, capsys.readouterr().out
