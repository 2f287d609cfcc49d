"""Shared training helpers for verification: model specs, the standard-parameterization optimizer, generated modules,
and a training loop that records divergence instead of raising.

Everything is device-agnostic: models and batches live on the device passed in, randomness comes from seeds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Implementation, Rule
from mupderive.verify.data import CharVocab, Device, char_batches, context_batches
from mupderive.verify.models import GPT, MLP, Buildable, roles

Batches = Iterator[tuple[Any, torch.Tensor]]
LossFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """A reference architecture at unspecified width: the MLP on one-hot character context, or the GPT."""

    kind: str  # "mlp" | "gpt"
    depth: int = 4  # MLP: Linear layers (input, depth - 2 hidden, readout)
    context: int = 8  # MLP: previous characters fed one-hot
    n_layer: int = 1  # GPT
    n_head: int = 4  # GPT
    block_size: int = 64  # GPT
    attn_scale: str = "mup"  # GPT: logits scaled by 1/head_dim ("mup") or 1/sqrt(head_dim) ("standard")

    def __post_init__(self):
        if self.kind not in ("mlp", "gpt"):
            raise ValueError(f"model kind must be 'mlp' or 'gpt', got {self.kind!r}")

    def build(self, width: int, depth: int | None = None) -> nn.Module:
        """A freshly (default-)initialized model of this architecture at `width` (the GPT with `depth` blocks, default
        n_layer), on the current default device."""
        vocab = CharVocab().size
        if self.kind == "mlp":
            if depth is not None:
                raise MupError("the MLP has no residual blocks to scale in depth: use --model gpt or your own model")
            return MLP(self.context * vocab, width, vocab, self.depth)
        return GPT(vocab, width, self.n_layer if depth is None else depth, self.n_head, self.block_size,
                   self.attn_scale)

    @property
    def name(self) -> str:
        return self.kind

    def batches(self, text: str, generator: torch.Generator, device: Device, batch_size: int) -> Batches:
        """Infinite (x, y) batches of `text` for this architecture."""
        if self.kind == "mlp":
            return context_batches(text, self.context, batch_size, generator, device)
        return char_batches(text, self.block_size, batch_size, generator, device)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Next-character cross-entropy (:func:`loss_of`)."""
        return loss_of(model, x, y)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def forward(model: nn.Module, x: Any) -> Any:
    """``model(x)``; a tuple or list of inputs is passed as positional arguments, a dict as keyword arguments."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def logits_of(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: the tensor itself, its ``.logits`` (Hugging Face), or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def loss_of(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats), CE(logits.reshape(-1, V), y.reshape(-1)), of the logits ([B, V] or [B, T, V])."""
    logits = logits_of(forward(model, x))
    if logits is None:
        raise MupError(f"the model ({type(model).__name__}) returned neither a tensor of logits nor an object with "
                       ".logits")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def to_device(x: Any, device: Device) -> Any:
    """``x`` (a tensor, or a tuple, list or dict of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(to_device(v, device) for v in x)
    return x


def resolve_device(name: str) -> str:
    """``auto`` -> CUDA when available, else CPU; an explicit ``cuda`` must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MupError("--device cuda: no CUDA device is available here")
    return name


# ---- the standard parameterization: default init, the rule's real optimizer, one lr for all parameters ----

def import_class(path: str) -> type:
    """Import 'package.module.Class'."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise MupError(f"cannot import the optimizer class {path} ({exc})") from None


def constructor_arguments(implementation: Implementation, values: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameter ``values`` as constructor arguments of the implementation's class, mapped through ``args``
    ('betas[1]' fills a tuple slot; slots no hyperparameter maps keep the class default), plus ``fixed``."""
    kwargs: dict[str, Any] = {}
    packed: dict[str, dict[int, Any]] = {}
    for hyper, arg in implementation.args:
        match = re.fullmatch(r"(\w+)\[(\d)\]", arg)
        if match:
            packed.setdefault(match.group(1), {})[int(match.group(2))] = values[hyper]
        else:
            kwargs[arg] = values[hyper]
    if packed:
        signature = inspect.signature(import_class(implementation.cls).__init__).parameters
        for arg, items in packed.items():
            default = signature[arg].default
            slots = list(default) if isinstance(default, tuple) else []
            slots += [None] * (max(items) + 1 - len(slots))
            for index, value in items.items():
                slots[index] = value
            kwargs[arg] = tuple(slots)
    return kwargs | dict(implementation.fixed)


def constructor_kwargs(rule: Rule) -> dict[str, Any]:
    """The rule's default hyperparameters as constructor arguments of its class."""
    return constructor_arguments(rule.implementation, {h.name: h.default for h in rule.hypers})


def hidden_matrices(spec: Buildable, width: int) -> set[str]:
    """Names of the parameters in the 'hidden' role (both fans grow with width)."""
    return {name for name, role in roles(spec, width).items() if role == "hidden"}


class Chain:
    """Several optimizers over disjoint parameters, stepped together and presented as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def standard_setup(rule: Rule) -> dict[str, Any]:
    """What the standard baseline runs for `rule`: class and arguments, plus the fallback's for other parameters."""
    if rule.implementation.cls is None:
        raise MupError(f"rule {rule.name!r} names no library class, so the standard parameterization has no real "
                       "optimizer to run; check it with --parameterization derived")
    setup: dict[str, Any] = {"class": rule.implementation.cls, "kwargs": constructor_kwargs(rule),
                             "applies_to": list(rule.applies_to), "init": "default"}
    if rule.fallback is not None and set(rule.applies_to) != {"input", "hidden", "output", "vector"}:
        if set(rule.applies_to) != {"hidden"}:
            raise MupError(f"standard baseline: rule {rule.name} applies to {list(rule.applies_to)}; only rules for "
                           "hidden matrices (with a fallback elsewhere) are supported")
        fallback = load_rule(rule.fallback)
        setup["fallback"] = {"class": fallback.implementation.cls, "kwargs": constructor_kwargs(fallback)}
    return setup


def standard_optimizer(setup: dict[str, Any], model: nn.Module, hidden: set[str], lr: float):
    """Build the baseline optimizer of `standard_setup`: one lr for every parameter, library defaults otherwise."""
    kwargs = {**setup["kwargs"], "lr": lr}
    if "fallback" not in setup:
        return import_class(setup["class"])(model.parameters(), **kwargs)
    params = dict(model.named_parameters())
    main = [p for name, p in params.items() if name in hidden]
    rest = [p for name, p in params.items() if name not in hidden]
    fallback = setup["fallback"]
    return Chain(import_class(setup["class"])(main, **kwargs),
                 import_class(fallback["class"])(rest, **{**fallback["kwargs"], "lr": lr}))


def digest(text: str) -> str:
    """sha256 hex digest of text."""
    return hashlib.sha256(text.encode()).hexdigest()


def import_source(source: str) -> ModuleType:
    """Import Python source (a generated module) from a temporary file under a unique module name."""
    name = f"mupderive_generated_{digest(source)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(tempfile.mkdtemp(prefix="mupderive-")) / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ---- training ----

@dataclass(frozen=True)
class TrainResult:
    """Per-step training losses; status 'diverged' with the step where the loss became non-finite or exploded."""

    losses: list[float]
    status: str
    diverged_step: int | None = None


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def needs_graph(optimizer) -> bool:
    """Whether the optimizer estimates curvature itself (step(hessian=...)) and so needs backward(create_graph)."""
    parts = getattr(optimizer, "optimizers", (optimizer,))
    return any("hessian" in inspect.signature(opt.step).parameters for opt in parts)


def train(model: nn.Module, optimizer, batches: Batches, steps: int, warmup: int = 0, explode: float = 3.0,
          loss_fn: LossFn = loss_of) -> TrainResult:
    """Train for `steps` steps under the warmup + cosine schedule (scaling each group's own lr).

    Stops early, as 'diverged', at the first step whose loss is NaN/inf or above `explode` times the first loss.
    """
    model.train()
    groups = optimizer.param_groups
    base_lrs = [group["lr"] for group in groups]
    create_graph = needs_graph(optimizer)
    losses: list[float] = []
    # fused attention kernels have no double backward; the math kernel does
    with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
        try:
            for step in range(steps):
                for group, base in zip(groups, base_lrs, strict=True):
                    group["lr"] = base * lr_factor(step, steps, warmup)
                x, y = next(batches)
                loss = loss_fn(model, x, y)
                value = loss.item()
                losses.append(value)
                if not math.isfinite(value) or value > explode * losses[0]:
                    return TrainResult(losses, "diverged", step)
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss.backward(create_graph=create_graph)
                    optimizer.step()
                except RuntimeError as exc:  # e.g. an SVD of non-finite statistics: a numerical breakdown is divergence
                    if not isinstance(exc, torch.linalg.LinAlgError) and all_finite(model):
                        raise
                    return TrainResult(losses, "diverged", step)
            return TrainResult(losses, "ok")
        finally:
            optimizer.zero_grad(set_to_none=True)  # drop gradients (and their graphs when create_graph was used)


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter and gradient of the model is finite."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, n_batches: int, loss_fn: LossFn = loss_of) -> float:
    """Mean loss over the next `n_batches` batches, in eval mode."""
    model.eval()
    total = sum(loss_fn(model, *next(batches)).item() for _ in range(n_batches))
    return total / n_batches
