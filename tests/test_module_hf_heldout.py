"""The generated module on transformers architectures beyond the ones it was written against (tiny configs, no
downloads): embeddings that scale their output in forward (Gemma, BioGPT: sqrt(hidden)), logit scales under other
attribute names (Bloom's inv_norm_factor, MPT's softmax_scale) or head dimensions named head_size (GPT-NeoX),
mixture-of-experts weights stacked over experts (Mixtral) and routers returning tuples, and config-level
multipliers made width-dependent (Granite)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    MptConfig,
    MptForCausalLM,
)
from transformers.utils import logging

from mupderive import derive
from mupderive.codegen import generate
from mupderive.verify.train import import_source

logging.set_verbosity_error()
VOCAB, HEADS, BASE, WIDTH = 96, 4, 32, 64
IDS = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)


@functools.cache
def module(rule: str = "adamw"):
    return import_source(generate(derive(rule)))


def llama_like(width: int, **extra) -> dict:
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, head_dim=width // HEADS, max_position_embeddings=32, **IDS, **extra)


def gemma(width: int) -> nn.Module:
    return GemmaForCausalLM(GemmaConfig(**llama_like(width)))


def mixtral(width: int) -> nn.Module:
    return MixtralForCausalLM(MixtralConfig(**llama_like(width, num_local_experts=4, num_experts_per_tok=2)))


def granite(width: int, width_dependent: bool = False) -> nn.Module:
    r = width / BASE if width_dependent else 1.0
    return GraniteForCausalLM(GraniteConfig(**llama_like(width, embedding_multiplier=12.0, logits_scaling=8.0 * r,
                                                         residual_multiplier=0.22,
                                                         attention_multiplier=HEADS / width)))


def built(fn, width: int) -> nn.Module:
    torch.manual_seed(0)
    return fn(width)


def construct(model: nn.Module, base: nn.Module, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = module().MuP(model, base, **kw)
    return p, [str(w.message) for w in caught]


def test_an_embedding_scaling_its_output_by_sqrt_hidden_is_compensated_to_the_base_factor():
    """Gemma's embedding multiplies the lookup by sqrt(hidden) in forward: 8 at width 64, 5.66 at 32. The hook
    brings it back to the base's factor (the effective multiplier is the base's times ratio**E, E = 0 here)."""
    model = built(gemma, WIDTH)
    p, caught = construct(model, built(gemma, BASE))
    assert caught == []
    now, before = p.embedding_scales["model.embed_tokens"]
    assert now == pytest.approx(WIDTH ** 0.5, rel=1e-5) and before == pytest.approx(BASE ** 0.5, rel=1e-5)
    ids = torch.arange(10)
    lookup = nn.functional.embedding(ids, model.model.embed_tokens.weight)
    assert torch.allclose(model.model.embed_tokens(ids), lookup * BASE ** 0.5, rtol=1e-4)
    assert "multiplies its output by 8 in forward (5.657 in the base): compensated by 0.7071" in p.describe()
    p.remove()
    assert torch.allclose(model.model.embed_tokens(ids), lookup * WIDTH ** 0.5, rtol=1e-4)


def test_a_scaled_embedding_against_a_meta_base_warns_that_it_cannot_compensate():
    with torch.device("meta"):
        base = gemma(BASE)
    p, caught = construct(built(gemma, WIDTH), base)
    assert p.embedding_scales == {}
    assert any("multiplies its output by 8 in forward" in w and "Pass the base as a real module" in w for w in caught)


@pytest.mark.parametrize(("build", "path", "attribute"), [
    (lambda w: BloomForCausalLM(BloomConfig(hidden_size=w, n_layer=1, n_head=HEADS, **IDS)),
     "transformer.h.0.self_attention", "inv_norm_factor"),
    (lambda w: MptForCausalLM(MptConfig(d_model=w, n_heads=HEADS, n_layers=1, max_seq_len=32, **IDS)),
     "transformer.blocks.0.attn", "softmax_scale"),
    (lambda w: GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=w, num_hidden_layers=1, num_attention_heads=HEADS,
                                                intermediate_size=4 * w, max_position_embeddings=32, **IDS)),
     "gpt_neox.layers.0.attention", "scaling"),  # head_size, not head_dim
])
def test_logit_scales_under_other_names_are_set(build, path, attribute):
    model, base = built(build, WIDTH), built(build, BASE)
    before = getattr(model.get_submodule(path), attribute)
    p, caught = construct(model, base)
    assert caught == []
    assert p.attention[path][0] == attribute
    assert getattr(model.get_submodule(path), attribute) == pytest.approx(getattr(base.get_submodule(path),
                                                                                  attribute) * BASE / WIDTH)
    assert before == pytest.approx((WIDTH // HEADS) ** -0.5)


def test_attention_without_a_scale_attribute_warns_naming_it():
    """GPT-Neo's attention applies no 1/sqrt(head_dim) at all: nothing to set, so it is named."""
    def neo(w):
        return GPTNeoForCausalLM(GPTNeoConfig(hidden_size=w, num_layers=1, num_heads=HEADS, max_position_embeddings=32,
                                              attention_types=[[["global"], 1]], intermediate_size=4 * w, **IDS))
    p, caught = construct(built(neo, WIDTH), built(neo, BASE))
    assert p.attention == {}
    assert any("transformer.h.0.attn.attention (GPTNeoSelfAttention) looks like attention" in w and
               "compute the scale in forward, or use none" in w for w in caught)


def test_stacked_expert_weights_are_hidden_and_the_router_is_a_readout():
    """Mixtral's experts hold (experts, out, in) tensors: a stack of hidden matrices (not an (out=experts, in) map
    whose fan_out is fixed); the router (hidden -> experts logits, returned in a tuple) is probed as (out, in)."""
    model, base = built(mixtral, WIDTH), built(mixtral, BASE)
    p, caught = construct(model, base)
    mlp = "model.layers.0.mlp"
    assert p.roles[f"{mlp}.experts.gate_up_proj"] == p.roles[f"{mlp}.experts.down_proj"] == "hidden"
    assert p.layouts[f"{mlp}.experts.gate_up_proj"] == "stacked_out_in"
    assert p.roles[f"{mlp}.gate.weight"] == "output" and p.layouts[f"{mlp}.gate.weight"] == "out_in"
    assert all("stack of (out, in) matrices" in w for w in caught) and len(caught) == 2
    assert not any("gate.weight" in w for w in caught)
    p.initialize_(torch.Generator().manual_seed(0))
    gate_up = model.get_submodule(f"{mlp}.experts").gate_up_proj  # (4, 8 x 64, 64): fan_in 64, fan_out 512
    expected = BASE ** -0.5 * (WIDTH / BASE) ** module()._E["hidden"]["init_std"]
    assert gate_up.std().item() == pytest.approx(expected, rel=0.05)
    q, quiet = construct(built(mixtral, WIDTH), base, layouts={f"{mlp}.experts.*": "stacked_in_out"})
    assert quiet == [] and q.layouts[f"{mlp}.experts.down_proj"] == "stacked_in_out"


def test_width_dependent_config_multipliers_warn_and_managed_ones_do_not():
    """Granite applies config multipliers itself; constant ones are fine, one that changes with width (here
    logits_scaling) comes on top of the derived parameterization and is named. attention_multiplier = 1/head_dim
    becomes the attention scaling, which MuP sets from the base's value: not named, and right."""
    model, base = built(functools.partial(granite, width_dependent=True), WIDTH), built(
        functools.partial(granite, width_dependent=True), BASE)
    p, caught = construct(model, base)
    assert len(caught) == 1 and "config.logits_scaling is 16 here and 8 in the base" in caught[0]
    attn = "model.layers.0.self_attn"
    assert model.get_submodule(attn).scaling == pytest.approx(HEADS / WIDTH)  # base 1/hd0 times hd0/hd
    assert construct(built(granite, WIDTH), built(granite, BASE))[1] == []


def test_the_coordinate_check_passes_on_a_model_that_scales_its_embedding():
    """The check builds its base for real (the embedding's factor is a buffer, invisible on the meta device)."""
    from mupderive.verify.coord import UserTask, run_check
    result = run_check("adam", UserTask(build=gemma), widths=(64, 128, 256, 512), steps=5, seeds=2)
    assert result.passed, result.failures


def neox(width: int) -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=HEADS,
                                            intermediate_size=4 * width, max_position_embeddings=32, **IDS))


def test_zero_query_does_not_zero_a_whole_query_key_value_projection():
    """query_key_value names the query and the key and value: a fused projection, of which only the query width is
    zeroed, with a warning that names the layout it assumes (GPT-NeoX interleaves per head)."""
    model = built(neox, WIDTH)
    with pytest.warns(UserWarning, match=r"query_key_value is a fused projection; zeroing its first 64 of 192"):
        p = module().MuP(model, built(neox, BASE), zero_query=True, init="keep")
    p.initialize_()
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert torch.all(qkv[:WIDTH] == 0) and torch.all(qkv[WIDTH:] != 0)
    assert module()._query_only("q_proj") and not module()._query_only("query_key_value")
    assert not module()._query_only("qkv_proj") and not module()._query_only("Wqkv")
