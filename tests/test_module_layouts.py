"""The generated module's mechanisms on small modules: weight layouts (Linear, transformers' Conv1D found by its
forward pass, convolutions, a declared override), init stds, multipliers, attention scales without a base module,
the same-width guard, undecayed vectors and width-scaled gradient clipping."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mupderive import derive
from mupderive.codegen import generate
from mupderive.solver import parse_fix
from mupderive.verify.models import GPT, MLP, base_shapes
from mupderive.verify.train import import_source

R = 4  # width ratio


@functools.cache
def module(rule: str = "adamw", convention: str = "spectral", fix: str | None = None):
    return import_source(generate(derive(rule, convention, fixes=[parse_fix(fix)] if fix else [])))


def spectral(fan_out: int, fan_in: int) -> float:
    """fan_in^-1/2 min(1, sqrt(fan_out / fan_in))."""
    return fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))


class Mlp(nn.Module):
    """GPT-2's MLP, with Conv1D (stored (in, out)) or Linear (stored (out, in)) layers."""

    def __init__(self, width: int, kind: type[nn.Module]):
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if kind is Conv1D else nn.Linear
        self.c_fc, self.c_proj = make(width, 4 * width), make(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


@pytest.mark.parametrize("kind", [Conv1D, nn.Linear])
def test_conv1d_gets_the_stds_of_its_linear_equivalent(kind):
    base = 32
    model = Mlp(R * base, kind)
    p = module().MuP(model, Mlp(base, kind))
    assert p.layouts["c_fc.weight"] == ("in_out" if kind is Conv1D else "out_in")
    assert p.roles["c_fc.weight"] == p.roles["c_proj.weight"] == "hidden"
    p.initialize_(torch.Generator().manual_seed(0))
    assert model.c_fc.weight.std().item() == pytest.approx(spectral(4 * base, base) / R ** 0.5, rel=0.03)
    assert model.c_proj.weight.std().item() == pytest.approx(spectral(base, 4 * base) / R ** 0.5, rel=0.03)


def test_conv1d_takes_a_forward_multiplier():
    """hidden.multiplier fixed at -1: the Conv1D sees ratio**-1 times its input, its bias untouched."""
    model = Mlp(64, Conv1D)
    x = torch.randn(3, 64)
    want = x @ model.c_fc.weight / R + model.c_fc.bias
    p = module(fix="hidden.multiplier=-1").MuP(model, Mlp(16, Conv1D))
    assert p.multipliers["c_fc.weight"] == pytest.approx(1 / R)
    assert torch.allclose(model.c_fc(x), want, atol=1e-6)


def test_convolution_fans_include_the_kernel_and_groups():
    def net(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.Conv2d(c, c, 3, groups=2), nn.ConvTranspose2d(c, 5, 3))

    model = net(8 * R)
    p = module().MuP(model, net(8))
    assert [p.roles[f"{i}.weight"] for i in range(3)] == ["input", "hidden", "output"]
    assert p.layouts["2.weight"] == "in_out"
    p.initialize_(torch.Generator().manual_seed(0))
    assert model[0].weight.std().item() == pytest.approx(spectral(8, 27), rel=0.05)
    assert model[1].weight.std().item() == pytest.approx(spectral(8, 4 * 9) / R ** 0.5, rel=0.05)
    assert model[2].weight.std().item() == pytest.approx(spectral(5, 8 * 9) / R, rel=0.05)


class Bilinear(nn.Module):
    """A matrix stored (in, out) behind a forward pass the probe cannot call with one tensor."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, width))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight) * gate


def test_an_unknown_layout_warns_and_layouts_overrides_it():
    with pytest.warns(UserWarning, match=r"cannot tell how a Bilinear stores .* Pass layouts=\{'weight'"):
        p = module().MuP(Bilinear(64), Bilinear(16))
    assert p.roles["weight"] == "output"  # assumed (out, in): wrong, the width is its fan_out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = module().MuP(Bilinear(64), Bilinear(16), layouts={"weight": "in_out"})
    assert p.roles["weight"] == "input" and p.layouts["weight"] == "in_out"
    with pytest.raises(ValueError, match="expected one of out_in, in_out, embedding"):
        module().MuP(Bilinear(64), Bilinear(16), layouts={"weight": "transposed"})
    with pytest.raises(ValueError, match="matches no module"), pytest.warns(UserWarning, match="cannot tell"):
        module().MuP(Bilinear(64), Bilinear(16), layouts={"nothing": "in_out"})


@pytest.mark.parametrize("vocab", [50, 5000])
def test_embedding_std_does_not_depend_on_the_vocabulary(vocab):
    model = nn.Embedding(vocab, 64)
    module().MuP(model, nn.Embedding(vocab, 16)).initialize_(torch.Generator().manual_seed(0))
    assert model.weight.std().item() == pytest.approx(16 ** -0.5, rel=0.05)  # dim_base**-1/2, E_init 0


# -- attention ------------------------------------------------------------------------------------------------------
def gpt(width: int, attn_scale: str = "mup") -> GPT:
    return GPT(50, width, n_layer=1, n_head=2, block_size=8, attn_scale=attn_scale)


class Task:
    def __init__(self, attn_scale: str):
        self.attn_scale = attn_scale

    def build(self, width: int) -> GPT:
        return gpt(width, self.attn_scale)


def test_a_shapes_dict_base_keeps_a_1_over_head_dim_scale_silently():
    """The coordinate check's call: base and delta are shape dicts. 1/head_dim already is the derived law."""
    model = gpt(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = module().MuP(model, base_shapes(Task("mup"), 16), delta=base_shapes(Task("mup"), 32))
    assert model.blocks[0].attn.scale == 1 / 32 and p.attention["blocks.0.attn"] == ("scale", 1 / 32, 1 / 32)


def test_a_shapes_dict_base_warns_for_any_other_scale():
    model = gpt(64, "standard")
    with pytest.warns(UserWarning, match=r"blocks.0.attn \(CausalSelfAttention\): the base is not a module"):
        p = module().MuP(model, base_shapes(Task("standard"), 16))
    assert model.blocks[0].attn.scale == 32 ** -0.5 and "blocks.0.attn" not in p.attention
    q = module().MuP(gpt(64, "standard"), gpt(16, "standard"))  # a base module: 1/sqrt(8) * (32 / 8)**-1
    assert q.attention["blocks.0.attn"][2] == pytest.approx(8 ** -0.5 / 4)


class Wrapped(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.out = nn.Linear(width, 3)


def test_attention_it_cannot_rescale_warns_and_a_callable_takes_over():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module().MuP(Wrapped(64), Wrapped(16))
    messages = [str(w.message) for w in caught]
    assert any("attn (MultiheadAttention) looks like attention" in m and "attention={'attn'" in m for m in messages)
    seen = []

    def rescale(mod: nn.Module, base: nn.Module | None, logit_scale: float) -> None:
        seen.append((mod.head_dim, base.head_dim, logit_scale))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = module().MuP(Wrapped(64), Wrapped(16), attention={"attn": rescale})
    assert not any("looks like attention" in str(w.message) for w in caught)
    assert seen == [(32, 8, -1.0)] and "rescaled by the attention callable" in p.describe()


# -- guard rails ----------------------------------------------------------------------------------------------------
def test_a_model_as_its_own_base_needs_delta():
    model = MLP(8, 32, 4)
    with pytest.raises(ValueError, match=r"pass delta= \(a third instance at another width"):
        module().MuP(model, model)
    p = module().MuP(model, model, delta=MLP(8, 64, 4))
    assert p.roles["hidden.0.weight"] == "hidden"


def test_vectors_are_decayed_by_default_and_not_with_decay_vectors_false():
    p = module().MuP(GPT(50, 64, n_layer=1, n_head=2, block_size=8), gpt(16))
    decayed = p.optimizer(lr=1e-3, weight_decay=0.1)
    assert all(g["weight_decay"] > 0 for g in decayed.param_groups)
    opt = p.optimizer(lr=1e-3, weight_decay=0.1, decay_vectors=False)
    for group in opt.param_groups:
        vector = all(t.ndim < 2 for t in group["params"])
        assert (group["weight_decay"] == 0) == vector, group["mup_role"]
    roles = {g["mup_role"] for g in opt.param_groups if g["weight_decay"] == 0}
    assert roles == {"vector"} and sum(len(g["params"]) for g in opt.param_groups) == len(list(p.model.parameters()))
    sgd = module("sgd").MuP(MLP(8, 32, 4), MLP(8, 8, 4)).optimizer(lr=0.1, weight_decay=0.01, decay_vectors=False)
    fixed = [g for g in sgd.param_groups if g["mup_role"] == "fixed"]  # the readout bias: 1-D, fixed, not decayed
    assert fixed and all(g["weight_decay"] == 0 for g in fixed)


# -- gradient clipping ----------------------------------------------------------------------------------------------
def with_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=g)
    return {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize(("convention", "largest"), [("spectral", R ** 0.5), ("mup-package", 1.0)])
def test_global_clipping_threshold_follows_the_largest_gradient_share(convention, largest):
    """GRAD_NORM: the readout's share grows as n^1/2 in the spectral convention, not in mup-package's."""
    mod = module("adamw", convention)
    model = MLP(8, 16 * R, 4)
    p = mod.MuP(model, MLP(8, 16, 4))
    grads = with_grads(model)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    max_norm = 0.1 * total.item()
    returned = p.clip_grad_norm_(max_norm)
    assert returned.item() == pytest.approx(total.item(), rel=1e-6)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad) for q in model.parameters()]))
    assert after.item() == pytest.approx(max_norm * largest, rel=1e-4)


def test_per_layer_clipping_uses_each_parameters_own_factor():
    mod = module("adamw")
    model = MLP(8, 16 * R, 4)
    p = mod.MuP(model, MLP(8, 16, 4))
    grads = with_grads(model)
    max_norm = 0.5
    p.clip_grad_norm_(max_norm, per_layer=True)
    for name, param in model.named_parameters():
        role = p.roles[name]
        limit = max_norm * (p.ratios[name] ** mod._GRAD[role] if role != "fixed" else 1.0)
        want = min(1.0, limit / (grads[name].norm().item() + 1e-6))
        assert torch.allclose(param.grad, grads[name] * want, rtol=1e-5), name
    assert {p.roles[n] for n in grads} >= {"input", "hidden", "output", "vector"}


def test_zero_query_names_attention_it_finds_no_query_in():
    """One attention module with a q projection, one without: the second is named, not skipped silently."""
    class WithQuery(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.head_dim, self.q_proj, self.o_proj = width, nn.Linear(width, width), nn.Linear(width, width)

    class Opaque(nn.Module):  # an attention module holding its projection as a raw parameter
        def __init__(self, width):
            super().__init__()
            self.head_dim, self.w = width, nn.Parameter(torch.randn(width, width))

    def net(width):
        return nn.ModuleDict({"a": WithQuery(width), "b": Opaque(width)})

    mu = import_source(generate(derive("adamw")))
    with pytest.warns(UserWarning, match=r"zero_query: no query projection found in b;"):
        mu.MuP(net(16), net(8), zero_query=True)
