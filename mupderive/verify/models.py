"""Reference models for verification: a plain MLP and a small GPT, plus activation recording.

Both use default PyTorch initialization; the generated muP module re-initializes and re-scales them.
Submodules are registered in the order the forward pass calls them, so `layer_names` is in forward order. `roles`
reads each parameter's role off which of its fans grow with the width (the rule the generated module applies).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """ReLU MLP with `depth` Linear layers: input (d_in -> width), depth - 2 hidden, readout (-> d_out)."""

    def __init__(self, d_in: int, width: int, d_out: int, depth: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth counts Linear layers and must be >= 2, got {depth}")
        self.input = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.readout = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float inputs [B, d_in] to logits [B, d_out]."""
        x = F.relu(self.input(x))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with a fixed head count, so head_dim = width // n_head grows with width.

    attn_scale="mup" scales logits by 1/head_dim: in muP, q and k become correlated during training, so q.k is
    a coherent sum of head_dim terms and grows like head_dim. attn_scale="standard" uses 1/sqrt(head_dim).
    """

    def __init__(self, width: int, n_head: int, attn_scale: str):
        super().__init__()
        if width % n_head:
            raise ValueError(f"width {width} is not divisible by n_head {n_head}")
        if attn_scale not in ("mup", "standard"):
            raise ValueError(f"attn_scale must be 'mup' or 'standard', got {attn_scale!r}")
        self.n_head = n_head
        self.head_dim = width // n_head
        self.scale = 1 / self.head_dim if attn_scale == "mup" else self.head_dim**-0.5
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over earlier positions: [B, T, width] -> [B, T, width]."""
        B, T, C = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        q, k, v = (t.view(heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """Position-wise GELU MLP of the transformer block: width -> 4 * width -> width."""

    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply c_fc, GELU, c_proj."""
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, n_head: int, attn_scale: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_head, attn_scale)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the attention and MLP residual branches."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Small nanoGPT-style decoder with learned positions and an untied lm_head."""

    def __init__(
        self,
        vocab_size: int,
        width: int,
        n_layer: int = 2,
        n_head: int = 4,
        block_size: int = 64,
        attn_scale: str = "mup",
    ):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, n_head, attn_scale) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Map token ids [B, T] (T <= block_size) to next-token logits [B, T, vocab_size]."""
        seq_len = idx.shape[1]
        if seq_len > self.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(seq_len, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


RECORDED_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm)


def layer_names(model: nn.Module) -> list[str]:
    """Return the names of all Linear, Embedding and LayerNorm submodules, in registration (forward) order."""
    return [name for name, module in model.named_modules() if isinstance(module, RECORDED_TYPES)]


@contextmanager
def record_activations(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Hook the named submodules; yield {name: [detached output of each forward call]} filled as it runs."""
    modules = dict(model.named_modules())
    if missing := [name for name in names if name not in modules]:
        raise KeyError(f"no submodules named {missing}")
    records: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            records[name].append(output.detach())

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class Buildable(Protocol):
    """Anything that builds a model at a width (a coordinate-check task, a transfer sweep's model spec)."""

    def build(self, width: int) -> nn.Module: ...


def _fans(module: nn.Module, name: str, shape: torch.Size) -> tuple[int, ...]:
    """(fan_out, fan_in) of a matrix (an Embedding table is stored transposed), or the shape of a vector."""
    if isinstance(module, nn.Embedding) and name == "weight":
        return shape[1], shape[0]
    return tuple(shape)


def roles(task: Buildable, width: int) -> dict[str, str]:
    """``{parameter name: input|hidden|output|vector|fixed}`` from which fans grow between ``width`` and ``2 width``."""
    with torch.device("meta"):
        small, large = task.build(width), task.build(2 * width)
    grows = {}
    for model, key in ((small, 0), (large, 1)):
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                grows.setdefault(f"{mod_name}.{p_name}" if mod_name else p_name, [None, None])[key] = \
                    _fans(module, p_name, p.shape)
    out = {}
    for name, (a, b) in grows.items():
        wide = tuple(x != y for x, y in zip(a, b, strict=True))
        if len(wide) == 1:
            out[name] = "vector" if wide[0] else "fixed"
        else:
            out[name] = {(True, True): "hidden", (True, False): "input", (False, True): "output"}.get(wide, "fixed")
    return out


def base_shapes(task: Buildable, width: int) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of the model at ``width`` (built on the meta device, no memory)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in task.build(width).named_parameters()}
