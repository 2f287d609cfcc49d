"""The layers a depth check records: the same layers at every depth, matched by their place in the stack of blocks.

A depth check trains one model per depth at a fixed width, so the models hold different numbers of blocks. The base
(the shallowest model, L_base blocks) cuts every stack into L_base equal segments; its block j is matched at depth L
by the last block of segment j, ``(j + 1) L / L_base - 1`` (rounded down), so the residual stream after a matched
block always holds the same share (j + 1) / L_base of the branches (a fixed block, such as the first, holds a 1/L
share at depth L, which no parameterization keeps depth-independent). Layers outside the blocks (embedding, final
norm, readout) keep their names. The k-th attention call of a block is matched the same way (when the base makes the
same number of attention calls in every block). Each matched block's output, the residual stream after it, is
recorded too, with role ``stream``.

The blocks are those the generated module finds (``_stacks``: its one classification of a model's block lists).
"""

from __future__ import annotations

import warnings
from types import ModuleType

from torch import nn

from mupderive.errors import MupError
from mupderive.verify.coord.layers import ATTENTION


def block_list(module: ModuleType, model: nn.Module, label: str) -> tuple[str, int]:
    """(path, length) of the model's one repeated block list, as the generated module finds it."""
    stacks = module._stacks(model)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise MupError(f"{label}: a depth check needs exactly one repeated block list (an nn.ModuleList or "
                       f"nn.Sequential of blocks of one class); found {found}")
    path, stack = next(iter(stacks.items()))
    return path, len(stack)


def matched_block(j: int, base: int, depth: int) -> int:
    """The block of a ``depth``-block stack matching block ``j`` of a ``base``-block one: the last of segment j."""
    return (j + 1) * depth // base - 1


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def with_streams(names: list[str], path: str, base: int) -> list[str]:
    """``names`` with each block's output (``path.j``) inserted after the block's last recorded layer."""
    out = list(names)
    for j in range(base):
        block = f"{_prefix(path)}{j}"
        inside = [i for i, name in enumerate(out) if name.startswith(f"{block}.")]
        out.insert(inside[-1] + 1 if inside else len(out), block)
    return out


def names_at(names: list[str], path: str, base: int, depth: int, calls: int) -> list[str]:
    """The names of the base's recorded layers in the model with ``depth`` blocks (``calls``: attention calls the
    base makes; matched per block when they divide evenly among its blocks)."""
    prefix = _prefix(path)
    per_block = calls // base if calls % base == 0 else None
    out = []
    for name in names:
        if name.startswith(f"{ATTENTION}."):
            k = int(name.rpartition(".")[2])
            out.append(f"{ATTENTION}.{matched_block(k // per_block, base, depth) * per_block + k % per_block}")
        elif name.startswith(prefix) and (head := name[len(prefix):].partition(".")[0]).isdigit():
            out.append(f"{prefix}{matched_block(int(head), base, depth)}{name[len(prefix) + len(head):]}")
        else:
            out.append(name)
    return out


def matchable(names: list[str], base: int) -> list[str]:
    """``names`` without the attention logits when the base's attention calls do not divide among its blocks."""
    calls = sum(name.startswith(f"{ATTENTION}.") for name in names)
    if calls % base == 0:
        return names
    warnings.warn(f"the base makes {calls} attention calls in {base} blocks, so they cannot be matched across "
                  f"depths: the depth check leaves the attention logits out", stacklevel=3)
    return [name for name in names if not name.startswith(f"{ATTENTION}.")]
