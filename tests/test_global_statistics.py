"""A statistic shared by all parameters (total()): Prodigy's d measured on a whole synthetic model.

The oracle steps the real class on one parameter at a time; what it cannot see is the law across layers. Here the
optimizer compiled from rules/prodigy.toml (step for step the library's, see test_codegen_ir) runs input, hidden,
output and vector parameters together with per-layer learning rates, at several widths.
"""

from __future__ import annotations

import math

import torch

from mupderive import derive, load_rule
from mupderive.codegen import generate
from mupderive.codegen.parts import Part
from mupderive.verify.fit import fit_slope
from mupderive.verify.synthetic import spectral_norm
from mupderive.verify.train import import_source

WIDTHS = (64, 128, 256, 512)
BASE, LR, D0, STEPS = 64, 0.5, 1e-3, 6
SHAPES = {"input": lambda n: (n, 4), "hidden": lambda n: (n, n), "output": lambda n: (4, n), "vector": lambda n: (n,)}


def _prodigy_class() -> type:
    module = import_source(generate(derive("prodigy"), backend="ir"))
    return getattr(module, Part(load_rule("prodigy"), (), "", "ir").class_name)


def _model_step(cls: type, n: int, lr_exponents: dict[str, float], seed: int) -> tuple[float, float]:
    """d's growth d / d0 after STEPS steps and the hidden layer's |W - W0|_*, on rank-one gradients at the spectral
    condition (|G|_F = sqrt(fan_in / fan_out), a little noise), every hyperparameter at its derived exponent."""
    model = derive("prodigy")
    g = torch.Generator().manual_seed(seed)
    ratio = n / BASE
    groups, grads = [], []
    for role, shape in SHAPES.items():
        s = shape(n)
        o, i = s[0], (s[1] if len(s) == 2 else 1)
        p = (torch.randn(s, generator=g, dtype=torch.float64) * min(1, math.sqrt(o / i)) / math.sqrt(i))
        u, v = (torch.randn(k, generator=g, dtype=torch.float64) for k in (o, i))
        grads.append((torch.outer(u / u.norm(), v / v.norm()) * math.sqrt(i / o)).reshape(s))
        groups.append({"params": [p.requires_grad_()], "lr": LR * ratio ** lr_exponents[role],
                       "d0": D0 * ratio ** float(model.layers[role].hyper["d0"].const),
                       "eps": 1e-8 * ratio ** float(model.layers[role].hyper["eps"].const)})
    start = [group["params"][0].detach().clone() for group in groups]
    optimizer = cls(groups)
    for _ in range(STEPS):
        for group, G in zip(groups, grads, strict=True):
            noise = torch.randn(G.shape, generator=g, dtype=G.dtype) * G.abs().mean()
            group["params"][0].grad = G + 0.05 * noise
        optimizer.step()
    d = next(iter(optimizer.state.values()))["d"].item()
    d0 = groups[0]["d0"]
    hidden = groups[1]["params"][0].detach() - start[1]
    return d / d0, spectral_norm(hidden)


def test_prodigy_d_adapts_alike_at_every_width_with_the_derived_learning_rates():
    """With the derived lrs (Adam's times n: d ~ n^-1 because |s|_1 is largest, ~ n, on the hidden and output
    layers) d grows by the same factor at every width and the hidden update keeps its spectral scale; with Adam's
    lrs (d taken width-independent) the growth dies out at large width (d_hat ~ n^-1 d stays below d)."""
    cls = _prodigy_class()
    derived = {role: float(derive("prodigy").layers[role].lr.const) for role in SHAPES}
    adam = {role: float(derive("adam").layers[role].lr.const) for role in SHAPES}
    xs = [n for n in WIDTHS for _ in range(2)]
    runs = [_model_step(cls, n, derived, seed) for n in WIDTHS for seed in range(2)]
    growth, hidden = fit_slope(xs, [r[0] for r in runs]), fit_slope(xs, [r[1] for r in runs])
    assert min(r[0] for r in runs) > 5, "d did not adapt: the check would not test the law"
    assert abs(growth.slope) < 0.1 and abs(hidden.slope) < 0.1, (growth, hidden)
    stalled = fit_slope(xs, [_model_step(cls, n, adam, seed)[0] for n in WIDTHS for seed in range(2)])
    assert stalled.slope < -0.5, stalled
