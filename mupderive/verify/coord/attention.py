"""Attention logits as recorded quantities: ``scale * q kᵀ`` of every attention call in a forward pass.

While :func:`attention_logits` is active, ``torch.nn.functional.scaled_dot_product_attention`` is replaced by a
function that first computes the logits ``scale * q kᵀ`` (``scale`` defaulting to ``1/sqrt(q.size(-1))`` as in
torch; grouped-query attention's fewer key heads repeated, as ``enable_gqa`` does) and hands them to the sink, then
calls the real function. Models that call it as ``torch.nn.functional.scaled_dot_product_attention`` / ``F.`` (Hugging
Face's sdpa attention, nanoGPT-style models) are covered. So are Hugging Face models with eager attention: a
modeling module's ``eager_attention_forward(module, query, key, value, attention_mask, scaling, ...)``, looked up by
name at call time, is wrapped the same way for every module of the model whose class is defined next to one.

The logits are taken over all (query, key) pairs before any mask: the scale question (does ``s q.k`` stay ~ 1?) is
the same for every pair. Only the evaluation forward of the coordinate check is recorded; training runs the real
kernels untouched.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Sink = Callable[[torch.Tensor, torch.Tensor], None]  # (logits, rms(q) * rms(k))
_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None)


def logits(query: torch.Tensor, key: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``scale * q kᵀ`` in float32, ``[..., heads, L, S]``; key heads repeated to the query's (GQA)."""
    q, k = query.float(), key.float()
    if q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] != q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return (q @ k.transpose(-2, -1)) * scale


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of ``x``, accumulated in float32."""
    return torch.linalg.vector_norm(x, dtype=torch.float32) / x.numel() ** 0.5


def _record(sink: Sink, query: torch.Tensor, key: torch.Tensor, scale: float | None) -> None:
    with torch.no_grad():
        sink(logits(query, key, scale), rms(query) * rms(key))


def _patched_sdpa(real: Callable, sink: Sink) -> Callable:
    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
        _record(sink, bound["query"], bound["key"], bound.get("scale"))
        return real(*args, **kwargs)

    return scaled_dot_product_attention


def _patched_eager(real: Callable, sink: Sink) -> Callable:
    signature = inspect.signature(real)

    def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any,
                                **kwargs: Any) -> Any:
        try:
            scale = signature.bind(module, query, key, *args, **kwargs).arguments.get("scaling")
        except TypeError:
            scale = kwargs.get("scaling")
        _record(sink, query, key, scale)
        return real(module, query, key, *args, **kwargs)

    return eager_attention_forward


def _eager_modules(model: nn.Module) -> list[Any]:
    """The Python modules defining the model's submodule classes that hold an ``eager_attention_forward``."""
    found = {}
    for module in model.modules():
        source = sys.modules.get(type(module).__module__)
        if source is not None and callable(getattr(source, "eager_attention_forward", None)):
            found[source.__name__] = source
    return list(found.values())


@contextmanager
def attention_logits(model: nn.Module, sink: Sink) -> Iterator[None]:
    """Call ``sink(logits, rms(q) rms(k))`` for each attention computation of ``model`` while active (see above)."""
    functional = torch.nn.functional
    real_sdpa = functional.scaled_dot_product_attention
    eager = [(source, source.eager_attention_forward) for source in _eager_modules(model)]
    functional.scaled_dot_product_attention = _patched_sdpa(real_sdpa, sink)
    for source, real in eager:
        source.eager_attention_forward = _patched_eager(real, sink)
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = real_sdpa
        for source, real in eager:
            source.eager_attention_forward = real
