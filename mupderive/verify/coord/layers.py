"""Which layers of a model the coordinate check records, in forward order, and the role of each.

Recorded: every module that owns a ``weight`` parameter and whose output is affine in it (so the update's own effect
can be measured by re-running it with its initial weight): ``nn.Linear``, ``nn.Embedding``, convolutions, torch's
normalization layers, any module whose class name ends in ``Norm`` with a 1-D weight (Hugging Face's
``LlamaRMSNorm`` and kin) and any ``Conv1D`` (transformers' GPT-2 layer, weight stored (in, out)); plus the
attention logits of every attention call (``attention_logits.0``, ``.1``, ... in call order, see :mod:`attention`).
The order is the order of first calls in one real forward pass, so layers registered out of order (a norm declared
after the block it precedes) and modules never called are handled.

A recorded layer's role is its weight's role in the generated module (``MuP(...).roles``, the one classification
the applied parameterization uses); a tied tensor is ``tied`` where it is looked up (the embedding) and
``tied-out`` where it produces the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mupderive.verify.coord.attention import attention_logits

ATTENTION = "attention_logits"
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm, nn.RMSNorm)
AFFINE = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd, *NORMS)


def recorded(module: nn.Module) -> bool:
    """Whether the check records this module (see the module docstring)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return False
    name = type(module).__name__
    return isinstance(module, AFFINE) or (name.endswith("Norm") and weight.ndim == 1) or name.endswith("Conv1D")


def forward_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """The recorded modules and attention calls of ``model`` in the order ``run()`` (one forward) first calls them."""
    order: list[str] = []
    attention = [0]

    def seen(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in order:
                order.append(name)

        return hook

    def on_attention(logits: torch.Tensor, qk: torch.Tensor) -> None:
        order.append(f"{ATTENTION}.{attention[0]}")
        attention[0] += 1

    handles = [module.register_forward_pre_hook(seen(name), with_kwargs=True)
               for name, module in model.named_modules() if recorded(module)]
    try:
        with torch.no_grad(), attention_logits(model, on_attention):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def layer_roles(model: nn.Module, parameter_roles: dict[str, str], names: list[str]) -> dict[str, str]:
    """``{layer: role}`` for the recorded ``names``: the role of each module's weight (found by identity, so a
    tied weight's second owner gets it too); ``attention`` for attention logits."""
    owner = {id(p): name for name, p in model.named_parameters()}
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name.startswith(f"{ATTENTION}."):
            out[name] = "attention"
            continue
        module = modules[name]
        role = parameter_roles[owner[id(module.weight)]]
        if role == "tied":
            role = "tied" if isinstance(module, nn.Embedding) else "tied-out"
        out[name] = role
    return out
