"""Synthetic layer states at width ``n`` per role, as the calculus models a layer during a step (THEORY section 3).

Inputs ``x`` have Theta(1) entries and lie in a fixed ``SPAN``-dimensional subspace; backpropagated deltas lie in a
fixed subspace too, with ``|delta| ~ fan_out^-1/2``. Each step draws a fresh batch of ``BATCH`` pairs from those
spans, so the gradient ``G = n^m sum_b delta_b x_b^T`` is low-rank, aligned with the inputs, with entries ~ 1/fan_out.
The Hutchinson estimate is ``H = z * sum_b G_b <G_b, z>`` (Gauss-Newton Hessian, Gaussian ``z``). The weight is its
iid init at the derived std plus a rank-one part aligned with the spans, ``EARLIER`` times the spectral scale
``sqrt(fan_out/fan_in) n^-m``, standing for earlier updates. Vectors (biases, gains) are ``(fan_out,)`` with gradient
``sum_b delta_b``. Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPAN = 4  # dimension of the fixed input and delta subspaces
BATCH = 4  # samples per step
PROBES = 8  # fresh inputs used to measure |M x| / |x|
# Fixed fans, small next to the widths: an iid matrix has |Z|_* ~ sqrt(n) + sqrt(fixed), so a large fixed side bends
# log-log slopes over 64..1024 (fixed side 32: slope 0.37 instead of 1/2).
FIXED_FAN_IN = 8  # input layer: fan_in fixed (e.g. features)
FIXED_FAN_OUT = 8  # output layer: fan_out fixed (e.g. classes)
DTYPE = torch.float64
METRICS = ("spec", "fro", "rms", "effect")
# Earlier updates in W, in units of the spectral scale sqrt(fan_out/fan_in). In the readout they dominate W's effect
# on its inputs (n^-1/2 against the iid init's incoherent n^-1); a factor 8 makes them do so from the smallest width.
EARLIER = {"input": 1.0, "hidden": 1.0, "output": 8.0, "vector": 1.0}
SUBSPACE, ITERATIONS = 16, 8  # spectral norms of large matrices by subspace iteration


def dims(role: str, n: int) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of the parameter of ``role`` at width ``n`` (vectors: fan_in = 1)."""
    return {"input": (n, FIXED_FAN_IN), "hidden": (n, n), "output": (FIXED_FAN_OUT, n), "vector": (n, 1)}[role]


@dataclass(frozen=True)
class Batch:
    """One step's data: gradient ``G`` and Hutchinson estimate ``H`` (both shaped like ``W``)."""

    G: torch.Tensor
    H: torch.Tensor


@dataclass(frozen=True)
class Layer:
    """A parameter at width ``n``: its initial value, one :class:`Batch` per step, and probe inputs."""

    role: str
    n: int
    W0: torch.Tensor
    batches: tuple[Batch, ...]
    probes: torch.Tensor  # (fan_in, PROBES): fresh inputs from the input span (ones for vectors)

    def effect(self, M: torch.Tensor) -> float:
        """``|M x| / |x|`` over the probe inputs (root mean square over probes)."""
        mat = M.reshape(M.shape[0], -1)
        if mat.shape[1] != self.probes.shape[0]:
            raise ValueError(f"effect of a {tuple(M.shape)} tensor on inputs of size {self.probes.shape[0]}")
        ratios = torch.linalg.vector_norm(mat @ self.probes, dim=0) / torch.linalg.vector_norm(self.probes, dim=0)
        return float(ratios.square().mean().sqrt())

    def metric(self, M: torch.Tensor, metric: str) -> float:
        """``spec`` (largest singular value), ``fro``, ``rms``, ``entry`` or ``effect`` of ``M`` (vectors are
        columns)."""
        if metric == "rms":
            return float(M.square().mean().sqrt())
        if metric == "entry":  # typical nonzero entry: sqrt(sum x^4 / sum x^2) (the rms for spread entries)
            square = M.square()
            total = square.sum()
            return float((square.square().sum() / total).sqrt()) if total > 0 else 0.0
        if metric == "effect":
            return self.effect(M)
        if metric == "fro" or M.dim() < 2:
            return float(torch.linalg.vector_norm(M))
        return spectral_norm(M)


def spectral_norm(M: torch.Tensor) -> float:
    """Largest singular value: exact for a small side, else subspace iteration on ``M^T M`` from a fixed start
    (``SUBSPACE`` vectors, ``ITERATIONS`` rounds: within 1% on dense Gaussian matrices, exact on low-rank ones)."""
    if min(M.shape) <= 2 * SUBSPACE:
        return float(torch.linalg.matrix_norm(M, ord=2))
    start = torch.randn(M.shape[1], SUBSPACE, generator=torch.Generator().manual_seed(0), dtype=M.dtype)
    Q = start.to(M.device)
    for _ in range(ITERATIONS):
        Q = torch.linalg.qr(M.T @ (M @ Q)).Q
    return float(torch.linalg.matrix_norm(M @ Q, ord=2))


def make_layer(role: str, n: int, init_std: float, multiplier: float, steps: int, seed: int,
               device: torch.device | str = "cpu") -> Layer:
    """The synthetic parameter of ``role`` at width ``n``: init std and forward multiplier are the values at ``n``.

    Common random numbers across widths: the batch coefficients in the spans, the Hutchinson probe's component in the
    spans and the probe inputs' coefficients depend on ``seed`` only, so a seed is the same data at every width and
    slopes see only what genuinely changes with width (the spans' embedding, the iid init, the rest of ``z``).
    """
    local = torch.Generator().manual_seed(_seed(role, n, seed))
    shared = torch.Generator().manual_seed(_seed(role, 0, seed))
    fan_out, fan_in = dims(role, n)
    vector = role == "vector"

    def normal(*shape: int, gen: torch.Generator = local) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    # orthonormal span bases: delta = delta_basis a / sqrt(fan_out) has |delta| ~ fan_out^-1/2 and x = input_span c
    # has entries ~ 1
    delta_basis = torch.linalg.qr(normal(fan_out, SPAN)).Q
    input_basis = torch.ones(1, 1, dtype=DTYPE) if vector else torch.linalg.qr(normal(fan_in, SPAN)).Q
    input_span = input_basis * math.sqrt(fan_in / input_basis.shape[1])
    earlier = EARLIER[role] * math.sqrt(fan_out / fan_in) / multiplier * torch.outer(delta_basis[:, 0],
                                                                                    input_basis[:, 0])
    W0 = init_std * normal(fan_out, fan_in) + earlier
    batches = []
    for _ in range(steps):
        deltas = normal(BATCH, SPAN, gen=shared) @ delta_basis.T / math.sqrt(fan_out)  # (B, fan_out)
        xs = normal(BATCH, SPAN, gen=shared)[:, :input_basis.shape[1]] @ input_span.T  # (B, fan_in)
        if vector:
            xs = torch.ones(BATCH, 1, dtype=DTYPE)
        G = multiplier * deltas.T @ xs
        z = normal(fan_out, fan_in)  # iid Gaussian; its component in the spans is replaced by a shared draw
        block = normal(SPAN, SPAN, gen=shared)[:, :input_basis.shape[1]]
        z = z + delta_basis @ (block - delta_basis.T @ z @ input_basis) @ input_basis.T
        coef = multiplier * torch.einsum("bo,oi,bi->b", deltas, z, xs)  # <G_b, z>
        H = z * (multiplier * (deltas.T * coef) @ xs)
        batches.append(Batch(_shape(G, vector).to(device), _shape(H, vector).to(device)))
    probes = torch.ones(1, PROBES, dtype=DTYPE) if vector else input_span @ normal(SPAN, PROBES, gen=shared)
    return Layer(role, n, _shape(W0, vector).to(device), tuple(batches), probes.to(device))


def _shape(M: torch.Tensor, vector: bool) -> torch.Tensor:
    return M[:, 0].contiguous() if vector else M


def _seed(role: str, n: int, seed: int) -> int:
    """A deterministic seed per (role, width, seed) (``hash`` of a str is salted per process, so not that)."""
    return (seed * 1_000_003 + n * 101 + ("input", "hidden", "output", "vector").index(role)) % (2**63)
