"""The reference interpreter of the rule IR: step semantics, exact primitives, and the compared terms it records."""

from __future__ import annotations

import pytest
import torch

from mupderive import derive, load_rule, parse_rule
from mupderive.errors import MupError
from mupderive.language.ir import FUNCTIONS
from mupderive.verify.interpret import PRIMITIVES, Interpreter, matpow, orthogonalize, term_key, trust_ratio
from mupderive.verify.oracle import EXACT, construct
from mupderive.verify.synthetic import make_layer

F64 = torch.float64


def _defaults(rule, **overrides):
    return {h.name: h.default for h in rule.hypers} | overrides


def _trajectories(name: str, role: str = "hidden", steps: int = 4, **overrides):
    """W after each step from the interpreter and from the rule's implementation, on the same synthetic gradients."""
    rule = load_rule(name)
    values = _defaults(rule, **overrides)
    layer = make_layer(role, 48, 48 ** -0.5, 1.0, steps, seed=3)
    interp = Interpreter(rule, role, values)
    param = torch.nn.Parameter(layer.W0.clone())
    opt = construct(rule.implementation, [param], values)
    W, ours, theirs = layer.W0, [], []
    for batch in layer.batches:
        W = interp.step(W, batch.G, batch.H).W
        param.grad = batch.G.clone()
        opt.step(**({"hessian": [batch.H.clone()]} if name == "sophia" else {}))
        ours.append(W)
        theirs.append(param.detach().clone())
    return layer.W0, ours, theirs


@pytest.mark.parametrize(("name", "overrides"), [
    ("adamw", {}),
    ("adam", {"weight_decay": 0.3, "amsgrad": True}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.9, "dampening": 0.5}),  # torch's first buffer is the undampened gradient
    ("rmsprop", {"momentum": 0.5, "centered": True, "eps": 1e-3}),
    ("adopt", {"weight_decay": 0.2}),
    ("lamb", {"weight_decay": 0.5, "clamp": 2.0}),
    ("sophia", {"eps": 1e-4, "p": 0.5, "weight_decay": 0.1}),
    ("adafactor", {"weight_decay": 0.2, "eps2": 0.05}),
    ("shampoo", {"momentum": 0.5, "weight_decay": 0.1, "matrix_eps": 1e-3}),  # small eps: roots amplify rounding
    ("lion", {"weight_decay": 0.5}),
    ("signsgd", {"weight_decay": 0.5}),
    ("soap", {"weight_decay": 0.3, "eps": 1e-3, "precondition_frequency": 100}),
    ("soap", {"normalize_gradient": True, "correct_bias": False, "eps": 1e-3}),
    ("prodigy", {"weight_decay": 0.3, "eps": 1e-3, "d0": 1e-2, "lr": 0.5}),  # one parameter: total(x) is its own x
])
def test_interpreter_reproduces_the_implementation_exactly(name, overrides):
    W0, ours, theirs = _trajectories(name, **overrides)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
        moved = torch.linalg.vector_norm(b - W0)  # zero after a skipped first step (ADOPT), where a must equal b
        assert torch.linalg.vector_norm(a - b) <= EXACT * moved, f"{name}: trajectories differ at step {step}"
    assert torch.linalg.vector_norm(theirs[-1] - W0) > 0, f"{name}: the implementation never moved"


def test_vector_bodies_match_their_implementation():
    rule = load_rule("shampoo")
    values = _defaults(rule, momentum=0.3)
    layer = make_layer("vector", 40, 1.0, 1.0, 3, seed=1)
    interp = Interpreter(rule, "vector", values)
    param = torch.nn.Parameter(layer.W0.clone())
    opt = construct(rule.implementation, [param], values)
    W = layer.W0
    for batch in layer.batches:
        W = interp.step(W, batch.G).W
        param.grad = batch.G.clone()
        opt.step()
    assert torch.allclose(W, param.detach(), rtol=0, atol=1e-10 * float((W - layer.W0).norm()))


def test_skip_first_only_initialises_state():
    rule = load_rule("adopt")
    interp = Interpreter(rule, "hidden", _defaults(rule))
    W, G = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    first = interp.step(W, G)
    assert first.skipped and torch.equal(first.W, W)
    assert torch.allclose(interp.states["v"], G**2)
    second = interp.step(W, G)
    assert not second.skipped and not torch.equal(second.W, W)


def test_decay_first_lets_the_trust_ratio_see_the_decayed_weight():
    rule = load_rule("lamb")
    values = _defaults(rule, lr=0.1, weight_decay=2.0, clamp=100.0)
    W, G = torch.randn(6, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    step = Interpreter(rule, "hidden", values).step(W, G)
    decayed = torch.linalg.vector_norm(W * (1 - 0.1 * 2.0))
    u = step.values["u"]
    assert torch.isclose(step.values["trust"], decayed / (torch.linalg.vector_norm(u) + values["eps"]))


def test_conditional_follows_the_boolean_hyperparameter():
    rule = load_rule("sgd")
    W, G = torch.zeros(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64)
    plain = Interpreter(rule, "hidden", _defaults(rule, lr=1.0, momentum=0.5)).step(W, G)
    nesterov = Interpreter(rule, "hidden", _defaults(rule, lr=1.0, momentum=0.5, nesterov=True)).step(W, G)
    assert torch.allclose(plain.W, -G) and torch.allclose(nesterov.W, -1.5 * G)


def test_records_every_comparison_the_calculus_makes():
    for name, role in [("adamw", "hidden"), ("sophia", "input"), ("shampoo", "output"), ("adafactor", "vector"),
                       ("lamb", "hidden")]:
        rule = load_rule(name)
        outcome = derive(rule).layers[role].balanced.outcome
        layer = make_layer(role, 32, 0.2, 1.0, 2, seed=0)
        interp = Interpreter(rule, role, _defaults(rule, weight_decay=0.1))
        recorded = set()
        W = layer.W0
        for batch in layer.batches:
            step = interp.step(W, batch.G, batch.H)
            recorded |= set(step.terms)
            W = step.W
        for c in outcome.comparisons:
            key = term_key(c.op, c.node)
            assert key in recorded, f"{name}/{role}: {c.op} {c.text} not recorded"
            assert len(step.terms[key]) == len(c.sizes)


def test_reading_H_without_it_is_an_error():
    rule = load_rule("sophia")
    with pytest.raises(MupError, match="'H'"):
        Interpreter(rule, "hidden", _defaults(rule)).step(torch.ones(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64))


def test_matpow_is_the_spectral_power():
    A = torch.randn(6, 6, dtype=F64)
    A = A @ A.T + 0.1 * torch.eye(6, dtype=F64)
    root = matpow(A, -0.5)
    assert torch.allclose(root @ A @ root, torch.eye(6, dtype=F64), atol=1e-10)
    assert torch.allclose(matpow(A, 1.0), A, atol=1e-10)


def test_orthogonalize_is_the_polar_factor_on_the_nonzero_spectrum():
    X = torch.randn(20, 3, dtype=F64) @ torch.randn(3, 15, dtype=F64)
    polar = orthogonalize(X)
    s = torch.linalg.svdvals(polar)
    assert torch.allclose(s[:3], torch.ones(3, dtype=F64)) and s[3:].max() < 1e-10
    assert torch.allclose(polar.T @ X, (polar.T @ X).T, atol=1e-10)  # polar^T X = V S V^T is symmetric
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    assert torch.allclose(polar, U[:, :3] @ Vh[:3], atol=1e-10)


def test_a_rule_file_is_run_as_written():
    rule = parse_rule('''
name = "halfsign"
title = "t"
paper = "p"
[implementation]
[hyperparameters]
lr = { role = "lr", default = 0.5 }
[update]
direction = "sign(G) / 2"
''', "halfsign.toml")
    W, G = torch.zeros(2, 2, dtype=F64), torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=F64)
    assert torch.equal(Interpreter(rule, "hidden", {"lr": 0.5}).step(W, G).W, -0.25 * G.sign())


def test_every_primitive_of_the_language_has_reference_semantics():
    assert set(FUNCTIONS) == set(PRIMITIVES) | {"max", "min", "clip", "atan2", "matpow", "left_singular",
                                                 "right_singular"}


def test_galore_matches_the_library_up_to_its_float32_svd():
    """pytorch_optimizer.GaLore takes the SVD in float32 for float64 parameters: the trajectories agree to that
    precision on the hidden and (through transpose_wide: the library's left projection) the output layer. Rank 4, the
    synthetic gradients' rank: singular vectors beyond it are float32 rounding, which Adam's normalisation would
    amplify up to eps."""
    for role in ("hidden", "output"):
        W0, ours, theirs = _trajectories("galore", role, weight_decay=0.2, eps=1e-3, rank=4)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.linalg.vector_norm(a - b) <= 1e-5 * torch.linalg.vector_norm(b - W0), role


def _tiny(body: str) -> object:
    return parse_rule(f'''
name = "tiny"
title = "t"
paper = "p"
[implementation]
[hyperparameters]
lr = {{ role = "lr", default = 0.5 }}
wd = {{ role = "scale", default = 0.2 }}
k = {{ role = "width-free", default = 2 }}
[update]
{body}
''', "tiny.toml")


@pytest.mark.parametrize(("form", "expected"), [
    ("after", lambda W, U: (W - 0.5 * U) * (1 - 0.5 * 0.2)),
    ("proximal", lambda W, U: (W - 0.5 * U) / (1 + 0.5 * 0.2)),
    ("decoupled", lambda W, U: W * (1 - 0.5 * 0.2) - 0.5 * U),
])
def test_decay_forms_act_on_the_weight_as_declared(form, expected):
    rule = _tiny(f'direction = "sign(G)"\ndecay = "wd"\ndecay_form = "{form}"')
    W, G = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    got = Interpreter(rule, "hidden", {"lr": 0.5, "wd": 0.2, "k": 2}).step(W, G).W
    assert torch.allclose(got, expected(W, G.sign()), rtol=1e-14, atol=0)


def test_a_state_refreshed_on_a_step_condition_keeps_its_value_between_refreshes():
    rule = _tiny('state = { s = "G" }\ncompute = "s = G if t % k == 0 else s"\ndirection = "s"')
    interp = Interpreter(rule, "hidden", {"lr": 1.0, "wd": 0.0, "k": 2})
    grads = [torch.full((2, 2), float(i), dtype=F64) for i in range(1, 6)]
    seen = [float(interp.step(torch.zeros(2, 2, dtype=F64), G).values["s"][0, 0]) for G in grads]
    assert seen == [1.0, 2.0, 2.0, 4.0, 4.0]  # initial value at t = 1, refreshed at t = 2 and 4


def test_transpose_wide_runs_a_wide_matrix_on_its_transpose():
    """GaLore's 'std' choice: the body projects on the right (G P P^T); a wide matrix gets P P^T on the left."""
    rule = _tiny('transpose_wide = true\ndirection = "G @ right_singular(G, 1) @ right_singular(G, 1).T"\n'
                 '[update.vector]\ndirection = "G"')
    G = torch.randn(2, 5, dtype=F64)
    U, _, _ = torch.linalg.svd(G, full_matrices=False)
    got = Interpreter(rule, "hidden", {"lr": 1.0, "wd": 0.0, "k": 2}).step(torch.zeros(2, 5, dtype=F64), G).W
    assert torch.allclose(-got, U[:, :1] @ U[:, :1].T @ G, atol=1e-12)


def test_trust_ratio_guards_zero_norms():
    one = torch.tensor(1.0, dtype=F64)
    assert trust_ratio(torch.tensor(3.0, dtype=F64), torch.tensor(2.0, dtype=F64)) == 1.5
    assert trust_ratio(torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64)) == one
    assert trust_ratio(torch.tensor(3.0, dtype=F64), torch.tensor(0.0, dtype=F64)) == one
