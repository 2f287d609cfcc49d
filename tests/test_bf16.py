"""bfloat16 GEMMs through float32 kernels (for torch.optim.Muon in the oracle on CPUs without native bf16 GEMM)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mupderive.errors import MupError
from mupderive.verify.bf16 import ENV, choice, float32_gemm
from mupderive.verify.oracle import run_oracle

aten = torch.ops.aten


class Recorder(TorchDispatchMode):
    """Records the dtypes of every mm / addmm that reaches the kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default):
            self.seen.append((func.overloadpacket.__name__, args[-1].dtype))
        return func(*args, **(kwargs or {}))


def operands(n: int = 192, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, n, generator=g).bfloat16() for _ in range(3))


def test_products_run_in_float32_and_round_once_like_the_native_kernel():
    a, b, c = operands()
    with Recorder() as recorder, float32_gemm(True):
        mm, addmm = a @ b, torch.addmm(c, a, b, beta=-4.775, alpha=2.0315)
        untouched = a.double() @ b.double()  # not bfloat16: passes through as it is
    assert recorder.seen == [("mm", torch.float32), ("addmm", torch.float32), ("mm", torch.float64)]
    assert mm.dtype == addmm.dtype == torch.bfloat16
    assert torch.equal(untouched, a.double() @ b.double())
    native_mm, native_addmm = a @ b, torch.addmm(c, a, b, beta=-4.775, alpha=2.0315)
    for ours, native in ((mm, native_mm), (addmm, native_addmm)):
        assert (ours == native).double().mean() > 0.999  # the rest: one rounding of a float32 sum near a tie
        diff = torch.linalg.vector_norm((ours - native).double()) / torch.linalg.vector_norm(native.double())
        assert diff < 2.0**-9  # a bfloat16 step is 2^-8 relative at most, and only a few entries take one


def test_without_the_mode_the_kernels_see_bfloat16():
    a, b, _ = operands(64)
    with Recorder() as recorder, float32_gemm(False):
        a @ b
    assert recorder.seen == [("mm", torch.bfloat16)]


def test_muon_update_agrees_with_the_native_kernels_as_closely_as_two_native_kernels_do():
    """Newton-Schulz amplifies rounding in the small singular directions: two native kernels (AMX, ATen's loop)
    differ by up to ~2% in Muon's update; float32 kernels must stay within that order, far inside the oracle's 60%."""
    updates = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(256, 256, dtype=torch.float64) / 16)
        opt = torch.optim.Muon([param], lr=0.02, adjust_lr_fn="original")
        steps = []
        for _ in range(3):
            param.grad = torch.randn(256, 4, dtype=torch.float64) @ torch.randn(4, 256, dtype=torch.float64) / 256
            before = param.detach().clone()
            with float32_gemm(enabled):
                opt.step()
            steps.append(param.detach() - before)
        updates[enabled] = steps
    for native, ours in zip(updates[False], updates[True], strict=True):
        error = torch.linalg.matrix_norm(ours - native, 2) / torch.linalg.matrix_norm(native, 2)
        assert error < 0.05, error


def test_the_oracle_reads_the_same_slopes_with_either_kernel(monkeypatch):
    reports = {}
    for setting in ("native", "float32"):
        monkeypatch.setenv(ENV, setting)
        reports[setting] = run_oracle("muon", widths=(64, 128, 256), steps=3, seeds=2, roles=("hidden",))
    native, ours = (reports[s].roles[0].results[0] for s in ("native", "float32"))
    assert native.passed and ours.passed
    assert abs(native.match.error - ours.match.error) < 0.02
    for a, b in zip(native.checks, ours.checks, strict=True):
        assert a.quantity == b.quantity and abs(a.fit.slope - b.fit.slope) < 0.01, a.quantity.label


def test_the_setting_and_its_bad_values(monkeypatch):
    monkeypatch.setenv(ENV, "float32")
    assert choice()
    monkeypatch.setenv(ENV, "native")
    assert not choice()
    monkeypatch.setenv(ENV, "bf17")
    with pytest.raises(MupError, match="expected auto, float32 or native"):
        choice()


def test_a_cpu_without_native_bf16_gemm_gets_float32_kernels_by_default():
    code = "from mupderive.verify.bf16 import choice, native_bf16; print(native_bf16(), choice())"
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "True"]
