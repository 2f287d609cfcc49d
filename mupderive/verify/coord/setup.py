"""How a coordinate check parameterizes a model at one width: the generated muP module, or the standard one.

``Derived`` applies the module that ``mupderive.codegen.generate`` emits for a derivation exactly as a user would
(``MuP(model, base, delta=delta)``, ``initialize_``, ``optimizer``). ``Standard`` keeps the model's own
initialization (PyTorch's defaults, or whatever a model of your own does) and builds the rule's real optimizer class
with one learning rate for every parameter; a hybrid rule (Muon) uses its class where it applies (hidden matrices)
and its fallback's class (AdamW) elsewhere, same lr. Both take parameter roles from the generated module
(:func:`parameter_roles`), the one classification the parameterization itself applies.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from mupderive.derivation import Derivation
from mupderive.errors import MupError
from mupderive.language.rule import Rule
from mupderive.verify.train import Chain, import_source, standard_optimizer, standard_setup

Base = nn.Module | dict[str, tuple[int, ...]]


def generated_module(derivation: Derivation) -> ModuleType:
    """The imported module ``mupderive.codegen.generate`` emits for ``derivation``."""
    try:
        from mupderive.codegen import generate
    except ImportError as exc:
        raise MupError(f"code generation (mupderive.codegen) is not available: {exc}") from None
    return import_source(generate(derivation))


def parameter_roles(module: ModuleType, model: nn.Module, base: Base, delta: Base) -> dict[str, str]:
    """``{parameter name: role}`` as ``module.MuP(model, base, delta=delta)`` classifies them (its hooks removed
    again, so ``model``, e.g. one on the meta device, is left as it was)."""
    try:
        mup = module.MuP(model, base, delta=delta)
    except (ValueError, TypeError) as exc:
        raise MupError(f"the generated module cannot parameterize this model: {exc}") from None
    mup.remove()
    return dict(mup.roles)


class Standard:
    """The model's own init; the rule's optimizer class with one learning rate for all parameters (the transfer
    sweep's baseline, :func:`mupderive.verify.train.standard_optimizer`)."""

    def __init__(self, rule: Rule, lr: float):
        self.setup = standard_setup(rule)
        self.hidden: set[str] = set()
        self.lr = lr

    def bind(self, roles: dict[str, str]) -> None:
        """The parameter roles (hidden matrices go to a hybrid rule's main class)."""
        self.hidden = {name for name, role in roles.items() if role == "hidden"}

    def prepare(self, model: nn.Module, generator: torch.Generator) -> Chain | torch.optim.Optimizer:
        """Keep the model's initialization (drawn by the caller) and build the optimizer."""
        return standard_optimizer(self.setup, model, self.hidden, self.lr)


class Derived:
    """The generated module: ``MuP(model, base, delta=delta)``, ``initialize_(generator)``, ``optimizer(lr=lr)``.

    ``base`` is the model at the base (smallest) width and ``delta`` at another width (modules on the meta device,
    or their parameter shapes), as in the ``mup`` package: the dimensions that differ between the two scale, so the
    model at the base width itself gets its roles (and the derived init at ratio 1) like every other width. A base
    shallower than the model gives the depth ratio too; ``depth_scaling=False`` takes the model as its own depth base
    (the width-only parameterization: no branch multiplier, no depth factor).
    """

    def __init__(self, module: ModuleType, base: Base, delta: Base, lr: float, depth_scaling: bool = True):
        self.module, self.base, self.delta, self.lr = module, base, delta, lr
        self.depth_scaling = depth_scaling

    def bind(self, roles: dict[str, str]) -> None:
        """Roles come from ``MuP`` itself at every width."""

    def prepare(self, model: nn.Module, generator: torch.Generator) -> torch.optim.Optimizer:
        """Re-initialize ``model`` with the derived stds and build the optimizer with per-layer settings."""
        depth = {} if self.depth_scaling else {"depth_base": model}  # the model as its own depth base: width only
        p = self.module.MuP(model, self.base, delta=self.delta, **depth)
        p.initialize_(generator=generator)
        return p.optimizer(lr=self.lr)
