"""bfloat16 matrix products on CPUs without native bfloat16 GEMM: the same arithmetic through float32 kernels.

torch.optim.Muon runs its Newton-Schulz iteration in bfloat16. A CPU with AVX512-BF16 or AMX (what oneDNN calls bf16
support) multiplies bfloat16 matrices fast; anywhere else (AVX2 CPUs) ATen falls back to a generic loop about 100x
slower than float32 (1024 x 1024: 2.5 s against 0.03 s), and the Muon oracle spends ~85% of its time there.

Both native paths compute a bfloat16 GEMM the same way: the products of bfloat16 numbers (exact in float32), summed
in float32, scaled by alpha / beta in float32 and rounded to bfloat16 once. :func:`float32_gemm` does exactly that
with float32 kernels: upcast (exact), one float32 ``mm`` / ``addmm``, one rounding. Only the order of the float32
summation differs, as it does between any two BLAS kernels: per product 99.96-99.999% of the entries are
bit-identical to the native result, the rest one bfloat16 rounding apart. Five Newton-Schulz iterations amplify
rounding in the small singular directions, so Muon's update then differs from the native one by up to ~3%
(spectral), as much as two native kernels (AMX and ATen's generic loop) differ from each other (~2%); the oracle's
allowance is 60% and its fitted slopes agree to 1e-4 (``tests/test_bf16.py``, ``benchmarks/bench_oracle_muon.py``).
Everything else in the optimizer (its code, its casts, its bfloat16 rounding between iterations) runs unchanged.
``MUPDERIVE_BF16_GEMM=native`` keeps the native kernels anyway, ``float32`` uses float32 ones everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mupderive.errors import MupError

aten = torch.ops.aten
ENV = "MUPDERIVE_BF16_GEMM"


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's bf16 support: AVX512-BF16, AMX, ...)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: ATen's generic loop
        return False


class Float32Gemm(TorchDispatchMode):
    """Inside this mode, ``mm`` and ``addmm`` of CPU bfloat16 tensors run as float32 GEMMs rounded once."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.addmm.default) and _cpu_bf16(args):
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def _cpu_bf16(args: tuple) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


def choice() -> bool:
    """Whether :func:`float32_gemm` is on by default: ``MUPDERIVE_BF16_GEMM`` = ``auto`` (the default: where the CPU
    has no native bfloat16 GEMM), ``float32`` (always) or ``native`` (never)."""
    setting = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if setting not in ("auto", "float32", "native"):
        raise MupError(f"{ENV}={setting!r}: expected auto, float32 or native")
    return setting == "float32" or (setting == "auto" and not native_bf16())


@contextlib.contextmanager
def float32_gemm(enabled: bool | None = None) -> Iterator[None]:
    """bfloat16 GEMMs through float32 kernels inside the block; by default as :func:`choice` says."""
    if enabled is None:
        enabled = choice()
    if not enabled:
        yield
        return
    with Float32Gemm():
        yield
