"""Synthetic layer states: the structure THEORY section 3 assumes, and the metrics the oracle measures them with."""

from __future__ import annotations

import math

import pytest
import torch

from mupderive.verify.synthetic import SPAN, dims, make_layer, spectral_norm

ROLES = ("input", "hidden", "output", "vector")


@pytest.mark.parametrize("role", ROLES)
def test_shapes_and_gradient_structure(role):
    layer = make_layer(role, 96, 0.1, 1.0, steps=3, seed=0)
    fan_out, fan_in = dims(role, 96)
    shape = (fan_out,) if role == "vector" else (fan_out, fan_in)
    assert layer.W0.shape == shape and all(b.G.shape == shape and b.H.shape == shape for b in layer.batches)
    grads = [b.G.reshape(fan_out, -1) for b in layer.batches]
    # fresh batches every step, drawn from the same fixed spans: all gradients together stay low rank
    assert torch.linalg.matrix_rank(torch.cat(grads, dim=1)) <= SPAN
    assert torch.linalg.matrix_rank(torch.cat(grads, dim=0)) <= min(SPAN, fan_in)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("role", ROLES)
def test_gradient_scale_follows_the_spectral_condition(role):
    """|G|_F = Theta(sqrt(fan_in / fan_out)); with common random numbers a seed gives the same ratio at every width."""
    ratios = []
    for n in (64, 256, 1024):
        fan_out, fan_in = dims(role, n)
        G = make_layer(role, n, 0.1, 1.0, steps=1, seed=4).batches[0].G
        ratios.append(float(torch.linalg.vector_norm(G)) / math.sqrt(fan_in / fan_out))
    assert max(ratios) / min(ratios) < 1 + 1e-9


def test_hutchinson_estimate_scale_and_sign():
    """H = z * (GN z): dense, both signs, RMS ~ |G|_F rms(G) (THEORY section 3)."""
    for n in (64, 512):
        layer = make_layer("hidden", n, n**-0.5, 1.0, steps=4, seed=1)
        for b in layer.batches:
            assert 0.2 < float((b.H > 0).double().mean()) < 0.8
            scale = float(torch.linalg.vector_norm(b.G) * b.G.square().mean().sqrt())
            assert 0.02 < float(b.H.square().mean().sqrt()) / scale < 50


def test_weight_is_init_plus_earlier_updates_at_the_spectral_scale():
    layer = make_layer("hidden", 256, 0.0, 1.0, steps=1, seed=2)  # no init: only the earlier updates remain
    assert torch.linalg.matrix_rank(layer.W0) == 1
    assert math.isclose(layer.metric(layer.W0, "spec"), 1.0, rel_tol=1e-9)  # sqrt(fan_out / fan_in)
    assert layer.effect(layer.W0) > 0.1  # aligned with the inputs: a coherent effect


def test_metrics():
    layer = make_layer("hidden", 128, 128**-0.5, 1.0, steps=1, seed=3)
    M = torch.randn(128, 128, dtype=torch.float64)
    assert math.isclose(spectral_norm(M), float(torch.linalg.matrix_norm(M, ord=2)), rel_tol=0.02)
    low = layer.batches[0].G
    assert math.isclose(spectral_norm(low), float(torch.linalg.matrix_norm(low, ord=2)), rel_tol=1e-9)
    assert math.isclose(layer.metric(M, "rms") * 128, layer.metric(M, "fro"), rel_tol=1e-12)
    # an iid matrix acts incoherently on the inputs: |M x| / |x| ~ rms sqrt(fan_out), far below |M|_*
    assert 0.7 < layer.effect(M) / math.sqrt(128) < 1.3 and layer.effect(M) < 0.6 * spectral_norm(M)
    vector = make_layer("vector", 64, 1.0, 1.0, steps=1, seed=0)
    v = torch.randn(64, dtype=torch.float64)
    norms = {m: vector.metric(v, m) for m in ("spec", "fro", "effect")}
    assert len(set(round(x, 12) for x in norms.values())) == 1 and math.isclose(norms["fro"], float(v.norm()))
