"""Optimizers compiled from the rule IR: step for step equal to the library they mirror, and to the reference
interpreter, in both layouts (foreach kernels and one tensor at a time)."""

from __future__ import annotations

import functools
import itertools

import pytest
import pytorch_optimizer
import torch

from mupderive import derive, load_rule
from mupderive.codegen import generate
from mupderive.codegen.parts import Part
from mupderive.verify.interpret import Interpreter
from mupderive.verify.train import import_source

STEPS = 20
SHAPES = [(8, 5), (5,), (3, 7)]  # a matrix, a vector, a wide matrix



@functools.cache
def compiled_source(rule_name: str) -> str:
    return generate(derive(rule_name), backend="ir")


def compiled_class(rule_name: str) -> type:
    """The optimizer class generate(..., backend="ir") compiles from the rule."""
    module = import_source(compiled_source(rule_name))
    return getattr(module, Part(load_rule(rule_name), (), "", "ir").class_name)


def tensors(seed: int, shapes=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes or SHAPES]


def run(make, seed: int = 0, steps: int = STEPS, shapes=None) -> list[list[torch.Tensor]]:
    """Parameters after each step of the optimizer ``make(params)`` on fixed random gradients."""
    params = [p.requires_grad_() for p in tensors(seed, shapes)]
    optimizer = make(params)
    grads = torch.Generator().manual_seed(seed + 1)
    history = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads, dtype=p.dtype)
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history


def assert_trajectories_close(ours, theirs, rtol=1e-9, atol=1e-12):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x, y, rtol=rtol, atol=atol), f"step {step}: max |diff| {(x - y).abs().max():.3g}"


# (rule, hyperparameters for the compiled class, the library optimizer with the same settings, rtol)
LIBRARY = {
    "adamw": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1},
              lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), 1e-9),
    "lion": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.1},
             lambda p: pytorch_optimizer.Lion(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), 1e-9),
    "lamb": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1, "clamp": 1.5},
             lambda p: _lamb(p, clamp=1.5, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), 1e-9),
    "adam": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
             lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True),
             1e-9),
    "sgd": ({"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1, "nesterov": True},
            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True), 1e-9),
    "rmsprop": ({"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1, "momentum": 0.5, "centered": True},
                lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5,
                                              centered=True), 1e-9),
    "signsgd": ({"lr": 1e-2, "momentum": 0.8, "weight_decay": 0.1},
                lambda p: pytorch_optimizer.SignSGD(p, lr=1e-2, momentum=0.8, weight_decay=0.1), 1e-9),
    "adopt": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1},
              lambda p: pytorch_optimizer.ADOPT(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), 1e-9),
    "adafactor": ({"lr": 1e-2, "beta2_decay": -0.8, "eps1": 1e-3, "eps2": 1e-3, "d": 1.0, "weight_decay": 0.1},
                  lambda p: torch.optim.Adafactor(p, lr=1e-2, beta2_decay=-0.8, eps=(1e-3, 1e-3), d=1.0,
                                                  weight_decay=0.1), 1e-9),
    # the library takes matrix roots by SVD, the compiled rule by eigh: equal up to rounding of the roots
    "shampoo": ({"lr": 1e-2, "momentum": 0.5, "weight_decay": 0.1, "matrix_eps": 1e-2},
                lambda p: pytorch_optimizer.Shampoo(p, lr=1e-2, momentum=0.5, weight_decay=0.1, matrix_eps=1e-2,
                                                    weight_decouple=True), 1e-6),
    # the library takes the SVD in float32 for float64 parameters: equal up to its rounding. No refresh within the
    # run: the moments outlive a refresh, so across one the result depends on the signs the SVD gives the new
    # singular vectors (the library takes U of G, the rule V of G.T for a wide matrix)
    "galore": ({"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1, "rank": 2,
                "update_proj_gap": 100, "scale": 0.5},
               lambda p: pytorch_optimizer.GaLore(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, rank=2,
                                                  update_proj_gap=100, scale=0.5, projection_type="std"), 1e-4),
}
# Square matrices for SOAP: a non-square gradient's statistic on its longer side is singular, and the eigenbasis of
# its null space is set by rounding, so two exact implementations need not agree there.
SQUARE_SHAPES = [(6, 6), (4, 4), (5,)]


def _lamb(params, clamp: float, **kwargs) -> pytorch_optimizer.Lamb:
    """pytorch_optimizer.Lamb with its class-level weight-norm clamp set on the instance."""
    optimizer = pytorch_optimizer.Lamb(params, **kwargs)
    optimizer.clamp = clamp
    return optimizer


@pytest.mark.parametrize(("rule", "foreach"), list(itertools.product(LIBRARY, [True, False])))
def test_compiled_rule_matches_the_library_step_for_step(rule, foreach):
    hypers, library, rtol = LIBRARY[rule]
    cls = compiled_class(rule)
    ours = run(lambda p: cls(p, **hypers, foreach=foreach))
    assert_trajectories_close(ours, run(library), rtol=rtol)


@pytest.mark.parametrize("foreach", [True, False])
def test_compiled_soap_matches_the_library_step_for_step(foreach):
    """Eigenbases refreshed by a step condition, bias correction at t - 1, decay of the updated weight: with a
    refresh every step the library's one power-iteration QR step is not what the rule computes, so the
    comparison runs before the first refresh (precondition_frequency larger than the run)."""
    hypers = {"lr": 1e-2, "beta1": 0.8, "beta2": 0.9, "shampoo_beta": 0.7, "eps": 1e-6, "weight_decay": 0.1,
              "precondition_frequency": 100}
    cls = compiled_class("soap")
    ours = run(lambda p: cls(p, **hypers, foreach=foreach), shapes=SQUARE_SHAPES, steps=8)
    theirs = run(lambda p: pytorch_optimizer.SOAP(p, lr=1e-2, betas=(0.8, 0.9), shampoo_beta=0.7, eps=1e-6,
                                                  weight_decay=0.1, precondition_frequency=100),
                 shapes=SQUARE_SHAPES, steps=8)
    assert_trajectories_close(ours, theirs, rtol=1e-7, atol=1e-10)


def test_lamb_clamp_is_active_and_per_group():
    """The clamp binds (weight norms exceed it), and two groups with different clamps differ from one clamp."""
    cls = compiled_class("lamb")
    norms = [p.norm().item() for p in tensors(0) if p.ndim == 2]
    assert min(norms) > LIBRARY["lamb"][0]["clamp"]

    def grouped(clamps):
        return lambda p: cls([{"params": p[:1], "clamp": clamps[0]}, {"params": p[1:], "clamp": clamps[1]}],
                             lr=1e-2, weight_decay=0.1)

    same, split = run(grouped((1.5, 1.5)))[-1], run(grouped((1.5, 100.0)))[-1]
    assert torch.equal(same[0], split[0]) and not torch.allclose(same[2], split[2])


def test_lamb_trust_ratio_sees_the_decayed_weight():
    """decay_first: with a large decay the library and the compiled rule still agree (the trust ratio reads the
    decayed W); a rule applying the decay after the direction would not."""
    cls = compiled_class("lamb")
    ours = run(lambda p: cls(p, lr=0.1, weight_decay=2.0, clamp=1e9), steps=3)
    theirs = run(lambda p: _lamb(p, clamp=1e9, lr=0.1, weight_decay=2.0), steps=3)
    assert_trajectories_close(ours, theirs)


# Refresh intervals and ranks small enough that the step conditions and truncations act within the run.
SMALL = {"precondition_frequency": 2, "update_proj_gap": 2, "rank": 2}


@pytest.mark.parametrize("rule", ["adamw", "lion", "lamb", "adam_atan2", "adopt", "adafactor", "shampoo", "muon",
                                  "rmsprop", "sgd", "signsgd", "adam", "soap", "galore"])
def test_compiled_rule_matches_the_reference_interpreter(rule):
    """Every built-in body (sophia excepted: only its library computes H) against mupderive.verify.interpret."""
    loaded = load_rule(rule)
    cls = compiled_class(rule)
    values = {h.name: h.default for h in loaded.hypers} | {loaded.lr.name: 1e-2}
    if "weight_decay" in values:
        values["weight_decay"] = 0.1
    values |= {k: v for k, v in SMALL.items() if k in values}
    shapes = SQUARE_SHAPES if rule == "soap" else None
    params = [p.requires_grad_() for p in tensors(3, shapes) if p.ndim == 2 or "vector" in loaded.applies_to]
    optimizer = cls(params, **values, foreach=True)
    reference = [Interpreter(loaded, "vector" if p.ndim == 1 else "hidden", values) for p in params]
    expected = [p.detach().clone() for p in params]
    grads = torch.Generator().manual_seed(4)
    for step in range(1, 7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads, dtype=p.dtype)
        expected = [r.step(w, p.grad).W for r, w, p in zip(reference, expected, params, strict=True)]
        optimizer.step()
        for p, e in zip(params, expected, strict=True):
            assert torch.allclose(p.detach(), e, rtol=1e-8, atol=1e-10), f"{rule}, step {step}"


def test_a_parameter_without_gradient_keeps_its_own_step_count():
    """t is per parameter: a parameter that skips a step is not advanced, and its bias correction uses its own t."""
    cls = compiled_class("adamw")
    a, b = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    optimizer = cls([a, b], lr=1e-2)
    alone = torch.optim.AdamW([c := b.detach().clone().requires_grad_()], lr=1e-2)
    for step in range(4):
        a.grad = torch.ones_like(a) if step % 2 else None
        b.grad = c.grad = torch.full_like(b, 0.5 + step)
        optimizer.step()
        alone.step()
    assert optimizer.state[a]["step"] == 2 and optimizer.state[b]["step"] == 4
    assert torch.allclose(b, c)


def test_library_lamb_counts_steps_per_group():
    """pytorch_optimizer.Lamb keeps one step counter per group (bias correction 1 - beta1^t_group): a parameter that
    skipped steps then moves differently from the compiled rule (t per parameter); one that never skips agrees."""
    cls = compiled_class("lamb")

    def trained(make):
        a, b = (p.requires_grad_() for p in tensors(5)[0::2])
        optimizer = make([a, b])
        for step in range(4):
            a.grad = torch.ones_like(a) if step % 2 else None
            b.grad = torch.full_like(b, 0.5 + step)
            optimizer.step()
        return a.detach(), b.detach()

    ours, theirs = trained(lambda p: cls(p, lr=1e-2)), trained(lambda p: _lamb(p, clamp=10.0, lr=1e-2))
    assert torch.allclose(ours[1], theirs[1], rtol=1e-9) and not torch.allclose(ours[0], theirs[0], rtol=1e-6)


def test_state_dict_round_trips():
    cls = compiled_class("lamb")
    params = [p.requires_grad_() for p in tensors(0)]
    first = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    first.step()
    second = cls(params, lr=5.0)
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(second.state[p]["m"], first.state[p]["m"]) for p in params)


PRODIGY = {"lr": 1.0, "beta1": 0.8, "beta2": 0.95, "beta3": 0.9, "d0": 1e-3, "d_coef": 0.5, "eps": 1e-6,
           "weight_decay": 0.1}


def _toward_targets(make, steps: int = 25):
    """Parameters after each step on gradients W - target + noise (d keeps growing while the steps approach the
    targets), and the optimizer."""
    params = [p.requires_grad_() for p in tensors(0)]
    optimizer = make(params)
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    history = []
    for _ in range(steps):
        for p, target in zip(params, targets, strict=True):
            p.grad = p.detach() - target + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history, optimizer


def _library_prodigy(params):
    h = PRODIGY
    return pytorch_optimizer.Prodigy(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), beta3=h["beta3"], d0=h["d0"],
                                     d_coef=h["d_coef"], eps=h["eps"], weight_decay=h["weight_decay"])


def test_compiled_prodigy_shares_d_across_parameters_as_the_library_does():
    """total(): the compiled step runs every parameter side by side and sums <G, W0 - W> and |s|_1 over all of them,
    so the one d it adapts (here from 1e-3 to ~0.3) is the library's. The library accumulates those sums in float32
    tensors (torch.tensor([0.0])): with float64 ones the trajectories agree to rounding, with its own to ~1e-7."""
    cls = compiled_class("prodigy")
    ours, optimizer = _toward_targets(lambda p: cls(p, **PRODIGY))
    ds = {optimizer.state[p]["d"].item() for p in optimizer.state}
    assert len(ds) == 1 and ds.pop() > 100 * PRODIGY["d0"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exact, library = _toward_targets(_library_prodigy)
    finally:
        torch.set_default_dtype(default)
    assert_trajectories_close(ours, exact, rtol=1e-10, atol=1e-12)
    float32_sums, _ = _toward_targets(_library_prodigy)
    assert_trajectories_close(ours, float32_sums, rtol=1e-5, atol=1e-7)
    # one parameter alone has a d of its own: the statistic really is summed over the parameters
    alone, _ = _toward_targets(lambda p: cls(p[:1], **PRODIGY))
    assert not torch.allclose(alone[-1][0], ours[-1][0])


def test_compiled_prodigy_on_one_parameter_matches_the_interpreter():
    """With one parameter, total(x) is x: the compiled step and mupderive.verify.interpret agree."""
    loaded = load_rule("prodigy")
    cls = compiled_class("prodigy")
    param = tensors(3)[0].requires_grad_()
    optimizer = cls([param], **PRODIGY)
    reference = Interpreter(loaded, "hidden", PRODIGY)
    expected = param.detach().clone()
    grads = torch.Generator().manual_seed(4)
    for step in range(1, 8):
        param.grad = expected - 1.0 + 0.1 * torch.randn(param.shape, generator=grads, dtype=param.dtype)
        expected = reference.step(expected, param.grad).W
        optimizer.step()
        assert torch.allclose(param.detach(), expected, rtol=1e-9, atol=1e-12), f"step {step}"
