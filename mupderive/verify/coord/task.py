"""The models a coordinate check trains and their data: an MLP on character contexts, a small GPT, or your own.

A task builds its model at any width, draws batches from the shipped corpus and computes the training loss;
``chain`` is the MLP's layer chain for the engine's first-step prediction (none exists for the GPT or a model of
your own, :class:`mupderive.verify.user.UserTask`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mupderive.errors import MupError
from mupderive.verify.data import CharVocab, Device, char_batches, context_batches
from mupderive.verify.models import GPT, MLP
from mupderive.verify.train import loss_of
from mupderive.verify.user import UserTask

VOCAB = CharVocab().size
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MLPTask:
    """ReLU MLP (``depth`` Linear layers) predicting the next character from ``context`` one-hot characters."""

    context: int = 4
    depth: int = 4
    batch_size: int = 32
    eval_size: int = 32
    name = "mlp"
    chance = math.log(VOCAB)

    def build(self, width: int, depth: int | None = None) -> nn.Module:
        if depth is not None:
            raise MupError("the MLP has no residual blocks to scale in depth: use --model gpt or a model of your own")
        return MLP(self.context * VOCAB, width, VOCAB, self.depth)

    def batches(self, text: str, generator: torch.Generator, device: Device, batch_size: int) -> Batches:
        scale = VOCAB**0.5  # one-hot entries have rms 1/sqrt(VOCAB): scale the inputs to unit rms
        return ((x * scale, y) for x, y in context_batches(text, self.context, batch_size, generator, device))

    def chain(self) -> list[tuple[str, str]]:
        """[(layer, role)] in forward order, as ``mupderive.analysis.first_step`` takes it."""
        hidden = [(f"hidden.{k}", "hidden") for k in range(self.depth - 2)]
        return [("input", "input"), *hidden, ("readout", "output")]

    def check_widths(self, widths: list[int]) -> None:
        """Every width is valid for the MLP."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Next-character cross-entropy."""
        return loss_of(model, x, y)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GPTTask:
    """nanoGPT-style decoder on next-character prediction (the check uses attn_scale="standard" for the standard
    parameterization and "mup", 1/head_dim, for the derived one)."""

    n_layer: int = 2
    n_head: int = 4
    block_size: int = 32
    batch_size: int = 8
    eval_size: int = 8
    attn_scale: str = "mup"
    name = "gpt"
    chance = math.log(VOCAB)

    def build(self, width: int, depth: int | None = None) -> nn.Module:
        """The GPT at ``width`` with ``depth`` blocks (default ``n_layer``)."""
        return GPT(VOCAB, width, self.n_layer if depth is None else depth, self.n_head, self.block_size,
                   self.attn_scale)

    def batches(self, text: str, generator: torch.Generator, device: Device, batch_size: int) -> Batches:
        return char_batches(text, self.block_size, batch_size, generator, device)

    def chain(self) -> None:
        """No per-layer prediction of the standard parameterization exists for the GPT."""
        return None

    def check_widths(self, widths: list[int]) -> None:
        if bad := [w for w in widths if w % self.n_head]:
            raise MupError(f"GPT widths must be multiples of n_head={self.n_head}; got {bad}")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Next-character cross-entropy."""
        return loss_of(model, x, y)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Task = MLPTask | GPTTask | UserTask
