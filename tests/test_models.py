"""Tests for the reference models: shapes, attention scale, causality, activation recording, training."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mupderive.verify.data import CharVocab, char_batches, context_batches, load_corpus, split_corpus
from mupderive.verify.models import GPT, MLP, layer_names, record_activations

VOCAB = CharVocab().size


@pytest.mark.parametrize("width", [32, 64])
def test_mlp_forward_shape(width):
    model = MLP(d_in=20, width=width, d_out=7, depth=4)
    assert model(torch.randn(5, 20)).shape == (5, 7)
    assert len(model.hidden) == 2
    assert model.input.out_features == model.readout.in_features == width


def test_mlp_rejects_depth_below_two():
    with pytest.raises(ValueError):
        MLP(4, 8, 2, depth=1)


@pytest.mark.parametrize("width", [32, 64])
def test_gpt_forward_shape(width):
    model = GPT(vocab_size=VOCAB, width=width, n_layer=2, n_head=4, block_size=16)
    idx = torch.randint(VOCAB, (3, 16))
    assert model(idx).shape == (3, 16, VOCAB)
    assert model(idx[:, :5]).shape == (3, 5, VOCAB)
    with pytest.raises(ValueError):
        model(torch.randint(VOCAB, (1, 17)))


def test_gpt_head_dim_grows_with_width_and_lm_head_untied():
    small, large = GPT(VOCAB, width=32, n_head=4), GPT(VOCAB, width=128, n_head=4)
    assert [b.attn.head_dim for b in small.blocks] == [8, 8]
    assert [b.attn.head_dim for b in large.blocks] == [32, 32]
    assert large.blocks[0].attn.n_head == 4
    assert large.lm_head.weight.data_ptr() != large.wte.weight.data_ptr()
    assert large.lm_head.bias is None


def reference_attention(attn, x, scale):
    """Explicit causal attention with the given logit scale, using attn's weights."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    logits = (q @ k.transpose(-2, -1)) * scale
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return attn.c_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("attn_scale", ["mup", "standard"])
def test_attention_scale_matches_explicit_formula(attn_scale):
    torch.manual_seed(0)
    attn = GPT(VOCAB, width=64, n_head=4, attn_scale=attn_scale).blocks[0].attn
    with torch.no_grad():
        attn.c_attn.weight.mul_(8)  # make the logits large so the two scales give clearly different outputs
    x = torch.randn(2, 10, 64)
    expected = {"mup": 1 / 16, "standard": 1 / 4}
    other = "standard" if attn_scale == "mup" else "mup"
    with torch.no_grad():
        out = attn(x)
        assert torch.allclose(out, reference_attention(attn, x, expected[attn_scale]), atol=1e-5)
        assert not torch.allclose(out, reference_attention(attn, x, expected[other]), atol=1e-2)


def test_mup_and_standard_gpt_differ_with_same_weights():
    torch.manual_seed(0)
    mup, standard = GPT(VOCAB, width=64, attn_scale="mup"), GPT(VOCAB, width=64, attn_scale="standard")
    standard.load_state_dict(mup.state_dict())
    idx = torch.randint(VOCAB, (2, 12))
    with torch.no_grad():
        assert (mup(idx) - standard(idx)).abs().max() > 1e-3
    with pytest.raises(ValueError):
        GPT(VOCAB, width=64, attn_scale="sqrt")


@pytest.mark.parametrize("attn_scale", ["mup", "standard"])
def test_gpt_is_causal(attn_scale):
    torch.manual_seed(0)
    model = GPT(VOCAB, width=32, block_size=16, attn_scale=attn_scale)
    idx = torch.randint(VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def test_layer_names_in_forward_order():
    assert layer_names(MLP(4, 8, 2, depth=4)) == ["input", "hidden.0", "hidden.1", "readout"]
    block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    expected = ["wte", "wpe", *(f"blocks.{i}.{n}" for i in range(2) for n in block), "ln_f", "lm_head"]
    assert layer_names(GPT(VOCAB, width=32, n_layer=2)) == expected


def test_record_activations_captures_each_call_and_removes_hooks():
    model = GPT(VOCAB, width=32, block_size=8)
    names = layer_names(model)
    idx = torch.randint(VOCAB, (3, 8))
    with record_activations(model, names) as records:
        logits = model(idx)
        model(idx)
    assert set(records) == set(names)
    assert all(len(outputs) == 2 for outputs in records.values())
    assert records["wte"][0].shape == (3, 8, 32)
    assert records["wpe"][0].shape == (8, 32)
    assert records["blocks.1.mlp.c_fc"][0].shape == (3, 8, 128)
    assert torch.equal(records["lm_head"][0], logits.detach())
    assert not any(t.requires_grad for outputs in records.values() for t in outputs)
    model(idx)  # hooks are gone: nothing more is recorded
    assert all(len(outputs) == 2 for outputs in records.values())
    with pytest.raises(KeyError), record_activations(model, ["nope"]):
        pass


def train(model, batches, steps, lr):
    """Run AdamW steps; return the mean loss of the first and last five steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in itertools.islice(batches, steps):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_training_reduces_loss_for_both_models():
    torch.manual_seed(0)
    train_text, _ = split_corpus(load_corpus())
    generator = torch.Generator().manual_seed(0)
    gpt = GPT(VOCAB, width=64, block_size=32)
    mlp = MLP(4 * VOCAB, width=128, d_out=VOCAB)
    losses = [
        train(gpt, char_batches(train_text, 32, 16, generator), steps=60, lr=3e-3),
        train(mlp, context_batches(train_text, 4, 64, generator), steps=60, lr=3e-3),
    ]
    for start, end in losses:
        assert start > 0.8 * math.log(VOCAB)  # near-uniform predictions at init
        assert end < start - 1.0, (start, end)
