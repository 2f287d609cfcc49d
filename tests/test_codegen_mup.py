"""The generated module in the mup-package convention trains exactly as the ``mup`` package does (MuReadout +
MuAdam/MuAdamW/MuSGD), on an MLP and on a transformer, from identical weights and batches.

Conventions that differ, and how the comparison handles them:
- mup never scales Adam's eps; the derivation does (eps ~ 1/fan_out). A tiny eps is not enough to hide this: the
  gradient of an attention key bias is pure round-off (softmax ignores a shift shared by all keys), of eps's order,
  so eps 1e-12 vs 2.5e-13 moves those biases differently. Every group of our optimizer therefore gets the same
  eps = 1e-12 after it is built (the eps exponents themselves are tested in test_codegen.py).
- Coupled (L2) weight decay in Adam: mup multiplies it by width_mult on hidden weights, the derivation gives
  width^-1/2 there. Adam is compared with weight_decay = 0. AdamW's decoupled decay and SGD's L2 decay agree with mup
  (hidden x width_mult for AdamW; / width_mult on vector-like parameters for SGD), so they are compared with decay on.
- Initialization is not compared (the mup package keeps PyTorch's init): our initialized weights are copied into the
  mup model after ``set_base_shapes``.
"""

from __future__ import annotations

import functools

import mup
import pytest
import torch
import torch.nn.functional as F

from mupderive import derive
from mupderive.codegen import generate
from mupderive.verify.data import CharVocab, char_batches, context_batches, load_corpus
from mupderive.verify.models import GPT, MLP
from mupderive.verify.train import import_source

VOCAB = CharVocab().size
WIDTH, BASE, STEPS = 64, 16, 6
CASES = {
    "adam": (dict(lr=3e-3, eps=1e-12), lambda p: mup.MuAdam(p, lr=3e-3, eps=1e-12)),
    "adamw": (dict(lr=3e-3, eps=1e-12, weight_decay=0.1), lambda p: mup.MuAdamW(p, lr=3e-3, eps=1e-12,
                                                                               weight_decay=0.1)),
    "sgd": (dict(lr=0.3, momentum=0.9, weight_decay=1e-3), lambda p: mup.MuSGD(p, lr=0.3, momentum=0.9,
                                                                                weight_decay=1e-3)),
}



@functools.cache
def module(rule: str):
    return import_source(generate(derive(rule, "mup-package")))


def mlp(width: int, readout: bool = False) -> MLP:
    model = MLP(2 * VOCAB, width, VOCAB, depth=3)
    if readout:
        model.readout = mup.MuReadout(width, VOCAB)
    return model


def gpt(width: int, readout: bool = False) -> GPT:
    model = GPT(VOCAB, width, n_layer=2, n_head=2, block_size=16)
    if readout:
        model.lm_head = mup.MuReadout(width, VOCAB, bias=False)
    return model


def batches(kind: str):
    text, g = load_corpus()[:50_000], torch.Generator().manual_seed(0)
    source = context_batches(text, 2, 32, g) if kind == "mlp" else char_batches(text, 16, 8, g)
    return [next(source) for _ in range(STEPS)]


def loss_of(model, x, y) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def train(model, optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
@pytest.mark.parametrize("rule", list(CASES))
def test_trajectories_match_the_mup_package(rule, kind):
    ours_kwargs, theirs = CASES[rule]
    build = mlp if kind == "mlp" else gpt
    torch.manual_seed(0)
    ours = build(WIDTH)
    p = module(rule).MuP(ours, build(BASE))
    p.initialize_(torch.Generator().manual_seed(0))

    twin = build(WIDTH, readout=True)
    mup.set_base_shapes(twin, build(BASE, readout=True))
    twin.load_state_dict(ours.state_dict())
    readout = "readout" if kind == "mlp" else "lm_head"
    assert p.roles[f"{readout}.weight"] == "output" and p.multipliers[f"{readout}.weight"] == BASE / WIDTH

    data = batches(kind)
    assert torch.allclose(loss_of(ours, *data[0]), loss_of(twin, *data[0]), rtol=1e-6)
    optimizer = p.optimizer(**ours_kwargs)
    for group in optimizer.param_groups:
        group["eps"] = ours_kwargs.get("eps", group.get("eps"))
    ours_losses = train(ours, optimizer, data)
    theirs_losses = train(twin, theirs(twin.parameters()), data)
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-5)
    assert ours_losses[-1] != ours_losses[0]
    for (name, a), b in zip(ours.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{name}: max |diff| {(a - b).abs().max():.3g}"


def test_the_standard_parameterization_would_differ():
    """The comparison can fail: the plain model (no readout multiplier) with mup's optimizer drifts apart."""
    torch.manual_seed(0)
    ours = mlp(WIDTH)
    p = module("adamw").MuP(ours, mlp(BASE))
    p.initialize_(torch.Generator().manual_seed(0))
    p.remove()
    twin = mlp(WIDTH, readout=True)
    mup.set_base_shapes(twin, mlp(BASE, readout=True))
    twin.load_state_dict(ours.state_dict())
    data = batches("mlp")
    assert loss_of(ours, *data[0]).item() != pytest.approx(loss_of(twin, *data[0]).item(), rel=1e-3)


# -- tied embedding/readout: mup's MuSharedReadout on a transformers GPT-2 (Conv1D layers, tied lm_head) ----------
def gpt2(width: int, shared: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    if shared:
        model.lm_head = mup.MuSharedReadout(model.transformer.wte.weight, bias=False)
    return model


def hf_loss(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).logits.reshape(-1, VOCAB), y.reshape(-1))


@pytest.mark.parametrize("rule", list(CASES))
def test_tied_trajectories_match_mup_shared_readout(rule):
    """Same init, same batches: our tied role (one tensor: input-side lr, readout multiplier 1/width_mult on the
    lm_head) against mup's MuSharedReadout + MuAdam/MuAdamW/MuSGD, losses within 1e-5."""
    ours_kwargs, theirs = CASES[rule]
    torch.manual_seed(0)
    ours = gpt2(WIDTH)
    p = module(rule).MuP(ours, gpt2(BASE))
    name = "transformer.wte.weight"
    assert p.roles[name] == "tied" and p.ties[name] == (("transformer.wte",), ("lm_head",))
    assert p.roles["transformer.h.0.attn.c_attn.weight"] == "hidden"
    p.initialize_(torch.Generator().manual_seed(0))

    twin = gpt2(WIDTH, shared=True)
    mup.set_base_shapes(twin, gpt2(BASE, shared=True))
    twin.load_state_dict(ours.state_dict())
    assert twin.lm_head.weight is twin.transformer.wte.weight
    for block, theirs_block in zip(ours.transformer.h, twin.transformer.h, strict=True):
        theirs_block.attn.scaling = block.attn.scaling  # the logit scale is the user's job under mup
    data = batches("gpt")
    assert torch.allclose(hf_loss(ours, *data[0]), hf_loss(twin, *data[0]), rtol=1e-6)
    optimizer = p.optimizer(**ours_kwargs)
    for group in optimizer.param_groups:
        group["eps"] = ours_kwargs.get("eps", group.get("eps"))

    def run(model, opt):
        losses = []
        for x, y in data:
            loss = hf_loss(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    ours_losses, theirs_losses = run(ours, optimizer), run(twin, theirs(twin.parameters()))
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-5)
    assert ours_losses[-1] != ours_losses[0]
    assert torch.allclose(ours.transformer.wte.weight, twin.transformer.wte.weight, rtol=1e-4, atol=1e-6)


def test_tied_readout_without_its_multiplier_would_differ():
    """The tied comparison can fail: without the readout pre-hook the logits are width_mult times mup's."""
    torch.manual_seed(0)
    ours = gpt2(WIDTH)
    p = module("adamw").MuP(ours, gpt2(BASE))
    p.initialize_(torch.Generator().manual_seed(0))
    twin = gpt2(WIDTH, shared=True)
    mup.set_base_shapes(twin, gpt2(BASE, shared=True))
    twin.load_state_dict(ours.state_dict())
    for block, theirs_block in zip(ours.transformer.h, twin.transformer.h, strict=True):
        theirs_block.attn.scaling = block.attn.scaling
    x, y = batches("gpt")[0]
    assert hf_loss(ours, x, y).item() == pytest.approx(hf_loss(twin, x, y).item(), rel=1e-6)
    p.remove()
    for block, theirs_block in zip(ours.transformer.h, twin.transformer.h, strict=True):
        block.attn.scaling = theirs_block.attn.scaling  # remove() restored the model's own; keep only the hook off
    assert hf_loss(ours, x, y).item() != pytest.approx(hf_loss(twin, x, y).item(), rel=1e-3)
