"""The generated module's depth: a base (or ``depth_base``) with fewer residual blocks gives the depth ratio L / L_base,
every residual branch's output gets the multiplier (L / L_base)**DEPTH_BRANCH_MULTIPLIER as a forward hook, and the
parameters inside the blocks get the depth factors of their role on init, lr and every scale hyperparameter, on top
of the width factors. Checked on the built-in GPT, a nanoGPT-style model, GPT-2 and Llama built from configs, under
torch.compile and through a checkpoint; the expected factors are computed from the engine's exact exponents."""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from mupderive import derive
from mupderive.codegen import generate
from mupderive.depth import Depth
from mupderive.verify.models import GPT
from mupderive.verify.train import import_source

logging.set_verbosity_error()
VOCAB = 96
_spec = importlib.util.spec_from_file_location("_nanogpt", Path(__file__).with_name("test_module_nanogpt.py"))
nanogpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nanogpt)


@functools.cache
def derivation(rule: str = "adamw", k: int = 2):
    return derive(rule, depth=Depth(branch_matrices=k))


@functools.cache
def module(rule: str = "adamw", k: int = 2):
    return import_source(generate(derivation(rule, k)))


def gpt(width: int, depth: int) -> nn.Module:
    return GPT(VOCAB, width, n_layer=depth, n_head=4, block_size=16)


def gpt2(width: int, depth: int) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=depth, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def llama(width: int, depth: int) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                        bos_token_id=0, eos_token_id=0))


def exact(rule: str, k: int, role: str, quantity: str, width_ratio: float, depth_ratio: float) -> float:
    """width_ratio**E * depth_ratio**D from the engine's exact exponents (lr under its own name)."""
    d = derivation(rule, k)
    e, dd = d.layers[role].exponents(), d.depth.layers[role].exponents()
    return width_ratio ** float(e.get(quantity, 0)) * depth_ratio ** float(dd.get(quantity, 0))


@pytest.mark.parametrize("k", [2, 1])
def test_a_shallower_base_gives_branch_multipliers_and_depth_factors(k):
    mu = module("adamw", k)
    model, base = gpt(64, 8), gpt(32, 2)
    p = mu.MuP(model, base)
    alpha = derivation("adamw", k).depth.alpha
    assert alpha == (Fraction(1) if k == 2 else Fraction(1, 2))
    assert p.depths == {"blocks": (8, 2)}
    assert set(p.branches) == {f"blocks.{i}.{b}" for i in range(8) for b in ("attn", "mlp")}
    assert all(v == pytest.approx(4.0 ** float(-alpha)) for v in p.branches.values())
    inside = {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
    assert set(p.depth_ratios) == inside and set(p.depth_ratios.values()) == {4.0}
    groups = p.optimizer(lr=1e-3, eps=1e-8, weight_decay=0.1).param_groups
    assert {g["mup_depth"] for g in groups} == {1.0, 4.0}
    for g in groups:
        role, r, depth = g["mup_role"], g["mup_ratio"], g["mup_depth"]
        assert g["lr"] == pytest.approx(1e-3 * exact("adamw", k, role, "lr", r, depth), rel=1e-12)
        assert g["eps"] == pytest.approx(1e-8 * exact("adamw", k, role, "eps", r, depth), rel=1e-12)
        assert g["weight_decay"] == pytest.approx(0.1 * exact("adamw", k, role, "weight_decay", r, depth), rel=1e-12)
        names = {n for n, q in model.named_parameters() if any(q is t for t in g["params"])}
        assert (depth == 4.0) == bool(names & inside) and not (names & inside and names - inside)
    assert exact("adamw", k, "hidden", "eps", 1, 4) != 1  # the check above covers a depth factor that is not 1


def test_the_hooks_multiply_each_branch_output_and_remove_restores_the_plain_forward():
    model = gpt(32, 4)
    p = module().MuP(model, gpt(16, 2))
    assert p.branches["blocks.3.attn"] == pytest.approx(0.5)  # (4 / 2) ** -1
    attn, seen = model.blocks[3].attn, {}
    pre = attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    post = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))  # runs after MuP's hook
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        hooked = model(x)
        direct = attn.forward(seen["x"])  # forward() bypasses the module's own hooks
    assert torch.allclose(seen["out"], direct * 0.5, rtol=1e-6, atol=1e-7)
    pre.remove()
    post.remove()
    p.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x), hooked, rtol=1e-3)


def test_the_same_depth_gives_no_hook_and_no_depth_factor():
    mu = module()
    model = gpt(64, 4)
    p = mu.MuP(model, gpt(32, 4))
    assert p.depths == {"blocks": (4, 4)} and p.branches == {} and p.depth_ratios == {}
    assert {g["mup_depth"] for g in p.optimizer(lr=1e-3).param_groups} == {1.0}
    assert "depth" not in p.describe()  # describe() is the width-only one
    with_depth_base = mu.MuP(gpt(64, 4), gpt(32, 4), depth_base=gpt(32, 4))
    assert with_depth_base.branches == {}


def test_depth_base_as_a_model_a_shapes_dict_or_a_number():
    mu = module()
    base = gpt(32, 8)  # the width base, as deep as the model
    for depth_base in (gpt(64, 2), {n: tuple(q.shape) for n, q in gpt(16, 2).named_parameters()}, 2):
        p = mu.MuP(gpt(64, 8), base, depth_base=depth_base)
        assert p.depths == {"blocks": (8, 2)} and len(p.branches) == 16
    with pytest.raises(ValueError, match="depth_base=0"):
        mu.MuP(gpt(64, 8), base, depth_base=0)


def test_describe_shows_the_depth_ratio_the_multiplier_and_the_factors():
    text = module().MuP(gpt(64, 8), gpt(32, 2)).describe()
    header = text.splitlines()[0].split()
    assert header[:5] == ["parameter", "shape", "role", "ratio", "depth"]
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:] if line and not line.startswith(
        ("init", "depth", "attention"))}
    assert rows["blocks.5.mlp.c_fc.weight"][4] == "4" and rows["lm_head.weight"][4] == "-"
    assert "depth: blocks has 8 blocks, the depth base 2 (ratio 4); alpha 1: each branch's output x 0.25" in text
    assert "on blocks.*.attn, blocks.*.mlp" in text
    assert "depth factors of hidden parameters inside the blocks" in text and "eps x0.25" in text


@pytest.mark.parametrize("build, branches", [
    (gpt2, {"attn", "mlp"}), (llama, {"self_attn", "mlp"}), (nanogpt.NanoGPT, {"attn", "mlp"})])
def test_transformers_and_nanogpt_blocks(build, branches):
    mu = module()
    if build is nanogpt.NanoGPT:
        model, base = nanogpt.NanoGPT(64, n_layer=6), nanogpt.NanoGPT(32, n_layer=2)
    else:
        model, base = build(64, 6), build(32, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nanoGPT's unscalable attention is named (tested elsewhere)
        p = mu.MuP(model, base)
    (stack, (now, before)), = p.depths.items()
    assert (now, before) == (6, 2)
    assert {b.rpartition(".")[2] for b in p.branches} == branches and len(p.branches) == 6 * len(branches)
    assert all(b.startswith(f"{stack}.") for b in p.branches)
    names = [n for n, _ in model.named_parameters()]
    assert {n for n in names if n.startswith(f"{stack}.")} == set(p.depth_ratios)
    p.initialize_()
    x = torch.randint(0, 50, (2, 8))  # nanoGPT's vocabulary is 50
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.isfinite(logits).all()


def test_branches_override_and_what_it_cannot_handle():
    mu = module()
    p = mu.MuP(gpt(32, 4), gpt(16, 2), branches=["blocks.*.mlp"])
    assert set(p.branches) == {f"blocks.{i}.mlp" for i in range(4)}
    with pytest.raises(ValueError, match="branches pattern 'nope' matches no module"):
        mu.MuP(gpt(32, 4), gpt(16, 2), branches=["nope"])
    with pytest.raises(ValueError, match=r"blocks\.0 \(Block\): no residual branch found"):
        mu.MuP(gpt(32, 4), gpt(16, 2), branches=["lm_head"])

    class Flat(nn.Module):  # no block list at all
        def __init__(self, width):
            super().__init__()
            self.a, self.b = nn.Linear(width, width), nn.Linear(width, 3)

    with pytest.raises(ValueError, match="no repeated block list"):
        mu.MuP(Flat(8), Flat(4), depth_base=2)

    class Dict(nn.Module):  # a branch returning a dict: its multiplier cannot be applied
        def __init__(self, width):
            super().__init__()
            self.f = nn.Linear(width, width)

        def forward(self, x):
            return {"y": self.f(x)}

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm, self.branch = nn.LayerNorm(width), Dict(width)

        def forward(self, x):
            return x + self.branch(self.norm(x))["y"]

    class Net(nn.Module):
        def __init__(self, width, depth):
            super().__init__()
            self.inp, self.blocks, self.out = nn.Linear(3, width), nn.ModuleList(Block(width) for _ in range(depth)), \
                nn.Linear(width, 3)

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = block(x)
            return self.out(x)

    net = Net(16, 4)
    mu.MuP(net, Net(8, 2))
    with pytest.raises(TypeError, match=r"blocks\.0\.branch \(Dict\): a residual branch returning a dict"):
        net(torch.randn(2, 3))


def test_a_block_with_more_norms_than_branches_is_named():
    class PostNormBlock(nn.Module):  # Gemma-like: a norm on each branch's output
        def __init__(self, width):
            super().__init__()
            self.pre, self.f, self.post = nn.LayerNorm(width), nn.Linear(width, width), nn.LayerNorm(width)

        def forward(self, x):
            return x + self.post(self.f(self.pre(x)))

    class Net(nn.Module):
        def __init__(self, width, depth):
            super().__init__()
            self.inp, self.out = nn.Linear(3, width), nn.Linear(width, 3)
            self.layers = nn.ModuleList(PostNormBlock(width) for _ in range(depth))

    with pytest.warns(UserWarning, match=r"layers\.0 \(PostNormBlock\) holds 2 normalization layers \(pre, post\)"):
        module().MuP(Net(16, 4), Net(8, 2))


def test_a_module_generated_without_depth_refuses_a_shallower_base():
    mu = import_source(generate(derive("adamw")))
    with pytest.raises(ValueError, match="generated without depth exponents"):
        mu.MuP(gpt(32, 4), gpt(16, 2))
    assert mu.MuP(gpt(32, 4), gpt(16, 4)).branches == {}


def test_compile_traces_the_branch_hooks():
    torch._dynamo.reset()
    try:
        mu = module()
        torch.manual_seed(0)
        model = gpt(32, 4)
        p = mu.MuP(model, gpt(16, 2))
        p.initialize_(torch.Generator().manual_seed(0))
        x = torch.randint(0, VOCAB, (2, 8))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)
            hooked = compiled(x)
            p.remove()
            assert not torch.allclose(compiled(x), hooked, rtol=1e-3)
    finally:
        torch._dynamo.reset()


def _train(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 8), generator=g)
        loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _fresh(seed):
    torch.manual_seed(seed)
    model = gpt(32, 4)
    p = module().MuP(model, gpt(16, 2))
    p.initialize_(torch.Generator().manual_seed(seed))
    return model, p.optimizer(lr=1e-2, eps=1e-8)


def test_checkpoint_resume_keeps_the_depth_groups(tmp_path):
    straight_model, straight_opt = _fresh(0)
    straight = _train(straight_model, straight_opt, 4)
    model, opt = _fresh(0)
    first = _train(model, opt, 2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    model, opt = _fresh(1)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the batches the straight run used first
        torch.randint(0, VOCAB, (4, 8), generator=g)
    rest = []
    for _ in range(2):
        x = torch.randint(0, VOCAB, (4, 8), generator=g)
        loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        rest.append(loss.item())
    assert first + rest == straight
    tags = ("mup_role", "mup_ratio", "mup_depth", "lr", "eps")
    assert [{t: g[t] for t in tags} for g in opt.param_groups] == [
        {t: g[t] for t in tags} for g in straight_opt.param_groups]


def test_the_derived_depth_keeps_the_streams_one_step_change_and_width_only_does_not():
    """One Adam step on the GPT at depths 2 and 16 (base 2): with the branch multipliers the final residual stream
    moves by about as much at 16 blocks as at 2; the width-only module (the model as its own depth base) moves it
    several times more."""
    mu = module()
    changes = {}
    for scaling in (True, False):
        for depth in (2, 16):
            torch.manual_seed(0)
            model = gpt(32, depth)
            p = mu.MuP(model, gpt(32, 2), delta=gpt(64, 2), **({} if scaling else {"depth_base": model}))
            p.initialize_(torch.Generator().manual_seed(depth))
            out = {}
            model.blocks[-1].register_forward_hook(lambda m, a, y, out=out: out.__setitem__("s", y.detach()))
            x = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(x)
            before = out["s"]
            _train(model, p.optimizer(lr=1e-3), 1)
            with torch.no_grad():
                model(x)
            changes[scaling, depth] = float((out["s"] - before).pow(2).mean().sqrt())
    derived = math.log2(changes[True, 16] / changes[True, 2]) / 3
    width_only = math.log2(changes[False, 16] / changes[False, 2]) / 3
    assert abs(derived) < 0.3 and width_only > 0.7, (derived, width_only)


def test_generate_writes_the_depth_tables_the_options_ask_for(tmp_path, capsys):
    from mupderive.cli import main

    assert main(["generate", "adamw", "--branch-matrices", "1", "-o", str(tmp_path / "k1.py")]) == 0
    k1 = import_source((tmp_path / "k1.py").read_text())
    assert k1.DEPTH_ALPHA == "1/2" and k1.DEPTH_BRANCH_MULTIPLIER == "-1/2" and k1.DEPTH_BREAKS == ()
    hidden = derive("adamw", depth=Depth(branch_matrices=1)).depth.layers["hidden"].exponents()
    assert k1.DEPTH["hidden"] == {name: str(e) for name, e in hidden.items()}
    assert "mupderive generate adamw --branch-matrices 1 -o mup_adamw.py" in (tmp_path / "k1.py").read_text()
    assert main(["generate", "adamw", "--alpha", "1/2", "-o", str(tmp_path / "a.py")]) == 0
    imposed = import_source((tmp_path / "a.py").read_text())
    assert imposed.DEPTH_ALPHA == "1/2" and imposed.DEPTH_BREAKS  # K = 2 needs alpha = 1: the module says why
    assert main(["generate", "adamw", "-o", str(tmp_path / "d.py")]) == 0
    assert import_source((tmp_path / "d.py").read_text()).DEPTH_ALPHA == "1"
    assert main(["generate", "adamw", "--alpha", "x", "-o", str(tmp_path / "bad.py")]) == 2
    assert not (tmp_path / "bad.py").exists() and "--alpha 'x'" in capsys.readouterr().err
