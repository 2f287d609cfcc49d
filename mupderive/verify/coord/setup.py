"""How a coordinate check parameterizes a model at one width: the generated muP module, or the standard one.

``Derived`` imports the module that ``mupderive.codegen.generate`` emits for a derivation and applies it exactly as a
user would (``MuP(model, base)``, ``initialize_``, ``optimizer``). ``Standard`` keeps PyTorch's default
initialization and builds the rule's real optimizer class with one learning rate for every parameter; a hybrid rule
(Muon) uses its class where it applies (hidden matrices) and its fallback's class (AdamW) elsewhere, same lr.
"""

from __future__ import annotations

import torch
from torch import nn

from mupderive.derivation import Derivation
from mupderive.errors import MupError
from mupderive.language.rule import Rule
from mupderive.verify.train import Chain, import_source, standard_optimizer, standard_setup


class Standard:
    """PyTorch's default init; the rule's optimizer class with one learning rate for all parameters (the transfer
    sweep's baseline, :func:`mupderive.verify.train.standard_optimizer`)."""

    def __init__(self, rule: Rule, roles: dict[str, str], lr: float):
        self.setup = standard_setup(rule)
        self.hidden = {name for name, role in roles.items() if role == "hidden"}
        self.lr = lr

    def prepare(self, model: nn.Module, generator: torch.Generator) -> Chain | torch.optim.Optimizer:
        """Keep the model's default initialization (drawn by the caller) and build the optimizer."""
        return standard_optimizer(self.setup, model, self.hidden, self.lr)


class Derived:
    """The generated module: ``MuP(model, base, delta=delta)``, ``initialize_(generator)``, ``optimizer(lr=lr)``.

    ``base`` holds the base (smallest) width's parameter shapes and ``delta`` those at another width, as in the
    ``mup`` package: the dimensions that differ between the two scale, so the model at the base width itself gets
    its roles (and the derived init at ratio 1) like every other width.
    """

    def __init__(self, derivation: Derivation, base: dict[str, tuple[int, ...]], delta: dict[str, tuple[int, ...]],
                 lr: float):
        try:
            from mupderive.codegen import generate
        except ImportError as exc:
            raise MupError(f"code generation (mupderive.codegen) is not available: {exc}") from None
        self.module = import_source(generate(derivation))
        self.base, self.delta, self.lr = base, delta, lr

    def prepare(self, model: nn.Module, generator: torch.Generator) -> torch.optim.Optimizer:
        """Re-initialize ``model`` with the derived stds and build the optimizer with per-layer settings."""
        p = self.module.MuP(model, self.base, delta=self.delta)
        p.initialize_(generator=generator)
        return p.optimizer(lr=self.lr)
