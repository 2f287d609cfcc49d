"""The generated module on transformers models built from configs (no downloads): GPT-2 (Conv1D, tied lm_head),
Llama tied and untied, Qwen2, Mistral with grouped-query attention. Every parameter's role follows from the shapes
the modules declare, the tie is found by tensor identity, every attention module's logit scale is set, and nothing
warns."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from mupderive import derive, parse_rule
from mupderive.codegen import generate
from mupderive.verify.train import import_source

logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
VOCAB, BASE, WIDTH = 96, 32, 64


@functools.cache
def module(rule: str = "adamw", convention: str = "spectral"):
    return import_source(generate(derive(rule, convention)))


def gpt2(width: int, heads: int = 2) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=2, n_head=heads, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def llama(width: int, tied: bool = True) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0))


def qwen2(width: int) -> nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        bos_token_id=0, eos_token_id=0))


def mistral(width: int) -> nn.Module:
    return MistralForCausalLM(MistralConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                                            vocab_size=VOCAB, bos_token_id=0, eos_token_id=0))


MODELS = {"gpt2": gpt2, "llama_tied": llama, "llama_untied": functools.partial(llama, tied=False),
          "qwen2": qwen2, "mistral_gqa": mistral}


def declared_fans(model: nn.Module) -> dict[str, tuple[int, int] | tuple[int]]:
    """{parameter: (fan_out, fan_in)} from what each module declares (not from any layout logic); vectors: (size,)."""
    out, names = {}, {id(param): name for name, param in model.named_parameters()}
    for mod in model.modules():
        for param in mod.parameters(recurse=False):
            name = names[id(param)]
            if param.ndim == 1:
                out.setdefault(name, tuple(param.shape))
            elif isinstance(mod, nn.Embedding):
                out.setdefault(name, (mod.embedding_dim, mod.num_embeddings))
            elif isinstance(mod, Conv1D):
                out.setdefault(name, (mod.nf, mod.nx))
            elif isinstance(mod, nn.Linear):
                out.setdefault(name, (mod.out_features, mod.in_features))
    return out


def expected_roles(model: nn.Module, base: nn.Module) -> dict[str, str]:
    """The role each parameter should get from which declared fans differ from the base's."""
    big, small = declared_fans(model), declared_fans(base)
    roles = {}
    for name, fans in big.items():
        grows = tuple(a != b for a, b in zip(fans, small[name], strict=True))
        if len(grows) == 1:
            roles[name] = "vector" if grows[0] else "fixed"
        else:
            roles[name] = {(True, True): "hidden", (True, False): "input", (False, True): "output"}.get(grows, "fixed")
    return roles


def tied_pairs(model: nn.Module) -> set[str]:
    """Parameter names (first occurrence) of tensors held by an Embedding and a Linear."""
    embeddings = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {f"{embeddings[id(m.weight)]}.weight" for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) in embeddings}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "head_dim")}


def build(name: str, width: int) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name](width)


@pytest.mark.parametrize("name", list(MODELS))
def test_roles_ties_and_attention_on_transformers_models(name):
    model, base = build(name, WIDTH), build(name, BASE)
    before = {n: m.scaling for n, m in attention_modules(model).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = module().MuP(model, base)
    assert [str(w.message) for w in caught] == []
    ties = tied_pairs(model)
    assert set(p.ties) == ties and (ties != set()) == (name in ("gpt2", "llama_tied"))
    expected = expected_roles(model, base)
    assert set(expected) == set(p.roles)
    assert {n: r for n, r in p.roles.items()} == {n: "tied" if n in ties else r for n, r in expected.items()}
    assert "hidden" in p.roles.values() and "vector" in p.roles.values()
    if name == "llama_untied":
        assert p.roles["lm_head.weight"] == "output"
    attention = attention_modules(model)
    assert attention and set(p.attention) == set(attention)
    bases = dict(base.named_modules())
    for n, m in attention.items():
        ratio = m.head_dim / bases[n].head_dim
        assert ratio == 2.0
        assert m.scaling == pytest.approx(bases[n].scaling / ratio)  # LOGIT_SCALE -1: 1/head_dim
        assert m.scaling == pytest.approx(before[n] / math.sqrt(2))
    p.remove()
    assert {n: m.scaling for n, m in attention.items()} == before


def test_the_readout_hook_of_a_tied_lm_head():
    """The tied tensor's readout use gets ratio**readout_multiplier (-1) on lm_head's input; the embedding use
    ratio**multiplier (0)."""
    model = build("llama_tied", WIDTH)
    idx = torch.randint(VOCAB, (2, 8))
    plain = model(idx).logits
    p = module().MuP(model, build("llama_tied", BASE))
    assert p.describe().splitlines()[1].split()[:5] == ["model.embed_tokens.weight", "96x64", "tied", "2", "1|0.5"]
    for m in p.attention:  # compare the hook alone: put the model's own logit scale back
        model.get_submodule(m).scaling = p.attention[m][1]
    assert torch.allclose(model(idx).logits, plain / 2, atol=1e-5)


def test_gqa_key_value_projections_are_hidden_and_heads_only_growth_keeps_the_scale():
    model, base = build("mistral_gqa", WIDTH), build("mistral_gqa", BASE)
    p = module().MuP(model, base)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert model.get_submodule(k.rpartition(".")[0]).out_features < WIDTH and p.roles[k] == "hidden"
    more_heads, fewer = gpt2(WIDTH, heads=4), gpt2(BASE, heads=2)  # head_dim 16 in both: nothing changes
    scale = more_heads.transformer.h[0].attn.scaling
    q = module().MuP(more_heads, fewer)
    assert more_heads.transformer.h[0].attn.scaling == scale and q.attention


def test_tied_readout_named_by_readout_stays_tied():
    p = module().MuP(build("gpt2", WIDTH), build("gpt2", BASE), readout="lm_head")
    assert p.roles["transformer.wte.weight"] == "tied"
    assert "readout= names it; it stays tied" in p.describe()


def test_a_conflicting_tie_is_refused_with_the_conflict():
    """A rule whose embedding and readout are served by different rules (SGD on the input side, AdamW's readout):
    no single tensor meets both, so a tie is refused, quoting the derivation's conflicts; roles= unties it."""
    text = (ROOT / "rules" / "sgd.toml").read_text().replace(
        'name = "sgd"', 'name = "sgd_in"\napplies_to = ["input", "hidden", "vector"]\nfallback = "adamw"', 1)
    derivation = derive(parse_rule(text, "sgd_in.toml"))
    assert derivation.tied.conflicts
    mod = import_source(generate(derivation))
    assert derivation.tied.conflicts == mod.TIED_CONFLICTS
    with pytest.raises(ValueError, match="cannot serve one tensor in both uses: the embedding uses rule sgd_in"):
        mod.MuP(build("gpt2", WIDTH), build("gpt2", BASE))
    untied = mod.MuP(build("gpt2", WIDTH), build("gpt2", BASE), roles={"transformer.wte.weight": "input"})
    assert untied.roles["transformer.wte.weight"] == "input"
    mod.MuP(build("llama_untied", WIDTH), build("llama_untied", BASE))  # no tie, nothing to refuse


def test_keep_mode_rescales_the_models_own_init():
    model, base = build("gpt2", WIDTH), build("gpt2", BASE)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    p = module().MuP(model, base, init="keep")
    p.initialize_()
    r = WIDTH / BASE
    for name, param in model.named_parameters():
        factor = 1.0 if p.roles[name] == "fixed" else r ** module()._E[p.roles[name]]["init_std"]
        assert torch.allclose(param, before[name] * factor), name
    c_fc = "transformer.h.0.mlp.c_fc.weight"
    assert p.roles[c_fc] == "hidden" and model.get_submodule(c_fc[:-7]).weight.std().item() == pytest.approx(
        0.02 / r ** 0.5, rel=0.05)  # GPT-2's initializer_range is the base std
    assert "init: keep" in p.describe()
    with pytest.raises(RuntimeError, match="rescale"):
        p.initialize_()


def test_zero_query_on_fused_and_separate_projections():
    model = build("gpt2", WIDTH)
    p = module().MuP(model, build("gpt2", BASE), zero_query=True)
    p.initialize_(torch.Generator().manual_seed(0))
    c_attn = model.transformer.h[1].attn.c_attn  # Conv1D (in, 3 out): the first third of the outputs is q
    assert torch.all(c_attn.weight[:, :WIDTH] == 0) and torch.all(c_attn.weight[:, WIDTH:] != 0)
    assert "query projections zeroed" in p.describe()
    model = build("mistral_gqa", WIDTH)
    module().MuP(model, build("mistral_gqa", BASE), zero_query=True, init="keep").initialize_()
    attn = model.model.layers[0].self_attn
    assert torch.all(attn.q_proj.weight == 0) and attn.k_proj.weight.abs().sum() > 0
    with pytest.warns(UserWarning, match="found no query projection"):
        module().MuP(nn.Sequential(nn.Linear(4, WIDTH), nn.Linear(WIDTH, 2)),
                     nn.Sequential(nn.Linear(4, BASE), nn.Linear(BASE, 2)), zero_query=True)
