"""Every golden module imports and trains: MuP on an MLP with a base, initialize_, optimizer(), five steps on real
corpus batches with the rule's default hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mupderive import builtin_rule_names
from mupderive.codegen.golden import GOLDEN_DIR
from mupderive.verify.data import CharVocab, context_batches, load_corpus
from mupderive.verify.models import MLP
from mupderive.verify.train import import_source

VOCAB = CharVocab().size
CONTEXT = 1



@pytest.mark.parametrize("rule", builtin_rule_names())
def test_golden_module_imports_and_trains(rule):
    module = import_source((GOLDEN_DIR / f"{rule}.py").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = MLP(CONTEXT * VOCAB, 48, VOCAB, depth=3)
    p = module.MuP(model, MLP(CONTEXT * VOCAB, 16, VOCAB, depth=3))
    assert p.ratios["hidden.0.weight"] == 3.0
    p.initialize_(torch.Generator().manual_seed(0))
    optimizer = p.optimizer()
    before = [q.detach().clone() for q in model.parameters()]
    batches = context_batches(load_corpus()[:20_000], CONTEXT, 32, torch.Generator().manual_seed(1))
    hessian = module.RULE == "sophia"  # SophiaH estimates the Hessian diagonal from the gradient's graph
    losses = []
    for _ in range(5):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=hessian)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert min(losses[1:]) < losses[0]
    frozen = {name for (name, q), b in zip(model.named_parameters(), before, strict=True) if torch.equal(q, b)}
    assert not frozen  # lamb included: trust_ratio gives zero-initialized biases a trust of 1, as the library does
