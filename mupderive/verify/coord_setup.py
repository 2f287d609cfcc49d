"""How a coordinate check parameterizes a model at one width: the generated muP module, or the standard one.

``Derived`` imports the module that ``mupderive.codegen.generate`` emits for a derivation and applies it exactly as a
user would (``MuP(model, base)``, ``initialize_``, ``optimizer``). ``Standard`` keeps PyTorch's default
initialization and builds the rule's real optimizer class with one learning rate for every parameter; a hybrid rule
(Muon) uses its class where it applies (hidden matrices) and its fallback's class (AdamW) elsewhere, same lr.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from mupderive.derivation import Derivation
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule


class OptimizerChain:
    """Optimizers over disjoint parameter sets, stepped together (a hybrid such as Muon + AdamW)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def needs_graph(optimizer: object) -> bool:
    """Whether ``backward`` must keep the graph: optimizers that estimate the Hessian themselves (SophiaH)."""
    if isinstance(optimizer, OptimizerChain):
        return any(needs_graph(opt) for opt in optimizer.optimizers)
    return "hessian" in inspect.signature(optimizer.step).parameters


def _optimizer_class(rule: Rule) -> type:
    path = rule.implementation.cls
    if path is None:
        raise MupError(f"rule {rule.name!r} names no library class, so the standard parameterization has no real "
                       "optimizer to run; check it with --parameterization derived")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise MupError(f"rule {rule.name!r} mirrors {path}, which cannot be imported here: {exc}") from None


class Standard:
    """PyTorch's default init; the rule's optimizer class with one learning rate for all parameters."""

    def __init__(self, rule: Rule, roles: dict[str, str], lr: float):
        self.rule, self.roles, self.lr = rule, roles, lr
        self.fallback = load_rule(rule.fallback) if rule.fallback else None

    def prepare(self, model: nn.Module, generator: torch.Generator) -> OptimizerChain | torch.optim.Optimizer:
        """Keep the model's default initialization (drawn by the caller) and build the optimizer."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            use_main = self.fallback is None or self.roles[name] in self.rule.applies_to
            groups.setdefault("main" if use_main else "fallback", []).append(param)
        optimizers = []
        for key, params in groups.items():
            rule = self.rule if key == "main" else self.fallback
            optimizers.append(_optimizer_class(rule)(params, lr=self.lr, **dict(rule.implementation.fixed)))
        return optimizers[0] if len(optimizers) == 1 else OptimizerChain(optimizers)


def load_generated(source: str) -> ModuleType:
    """Import generated source as a fresh module (from a temporary file, so tracebacks show its lines)."""
    name = f"_mupderive_generated_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


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
        self.module = load_generated(generate(derivation))
        self.base, self.delta, self.lr = base, delta, lr

    def prepare(self, model: nn.Module, generator: torch.Generator) -> torch.optim.Optimizer:
        """Re-initialize ``model`` with the derived stds and build the optimizer with per-layer settings."""
        p = self.module.MuP(model, self.base, delta=self.delta)
        p.initialize_(generator=generator)
        return p.optimizer(lr=self.lr)
