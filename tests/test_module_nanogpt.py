"""The README's "Your model" recipes: a nanoGPT-style model (tie by assignment, sdpa with its default scale) and a
tied Llama, each parameterized without edits to the model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mupderive import derive
from mupderive.codegen import generate
from mupderive.verify.train import import_source


class SelfAttention(nn.Module):
    """nanoGPT's attention: fused c_attn, sdpa at its default 1/sqrt(head_dim), no scale attribute."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_embd: int, n_head: int = 2, vocab: int = 50, block: int = 16, n_layer: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block, n_embd),
                                              h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
                                              ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # the tie, as nanoGPT writes it

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def query_scale(attn, base_attn, logit_scale):
    """The README's callable: scale q (the first n_embd outputs of c_attn) by (hd / hd0)**(logit_scale + 1/2)."""
    factor = ((attn.n_embd / attn.n_head) / (base_attn.n_embd / base_attn.n_head)) ** (logit_scale + 0.5)

    def hook(module, args, out):
        return torch.cat([out[..., :attn.n_embd] * factor, out[..., attn.n_embd:]], dim=-1)

    attn.c_attn.register_forward_hook(hook)


@pytest.fixture(scope="module")
def mu():
    return import_source(generate(derive("adamw")))


def test_nanogpt_tie_is_found_and_unscalable_attention_is_named(mu):
    model, base = NanoGPT(64), NanoGPT(16)
    with pytest.warns(UserWarning, match=r"transformer\.h\.\d\.attn \(SelfAttention\)"):
        p = mu.MuP(model, base)
    assert p.roles["transformer.wte.weight"] == "tied"  # named_parameters lists the shared tensor once
    assert "tied" in p.describe()


def test_the_query_callable_gives_the_derived_logit_scale(mu):
    torch.manual_seed(0)
    model, base = NanoGPT(64), NanoGPT(16)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        q, k, _ = attn.c_attn(x).split(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attention module is covered: nothing warns
        mu.MuP(model, base, attention={"transformer.h.*.attn": query_scale})
    with torch.no_grad():
        q2, k2, _ = attn.c_attn(x).split(64, 2)
    hd, hd0 = 32, 8
    logits = (q2.view(2, 5, 2, hd) * k2.view(2, 5, 2, hd)).sum(-1) / math.sqrt(hd)  # what sdpa computes
    derived = (q.view(2, 5, 2, hd) * k.view(2, 5, 2, hd)).sum(-1) * hd0**-0.5 * (hd / hd0) ** -1
    torch.testing.assert_close(logits, derived)
    torch.testing.assert_close(k2, k)


def test_the_readme_llama_recipe(mu):
    transformers = pytest.importorskip("transformers")

    def llama(width):
        config = transformers.LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
                                          num_key_value_heads=2, num_hidden_layers=1, vocab_size=64,
                                          tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config)

    torch.manual_seed(0)
    model = llama(64)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = mu.MuP(model, base=llama(16), init="keep")
    p.initialize_()
    assert p.roles["model.embed_tokens.weight"] == "tied" and model.lm_head.weight is model.model.embed_tokens.weight
    hd0, hd = 16 // 4, 64 // 4
    assert model.model.layers[0].self_attn.scaling == pytest.approx(hd0**-0.5 * hd0 / hd)  # base value * (hd/hd0)^-1
    ratio = 64 / 16
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, before * ratio**-0.5)  # hidden E_init
    opt = p.optimizer(lr=3e-3, weight_decay=0.1, decay_vectors=False)
    decays = {g["mup_role"]: g["weight_decay"] for g in opt.param_groups if g["params"][0].ndim == 1}
    assert decays and set(decays.values()) == {0.0}
    loss = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
    loss.backward()
    opt.step()
