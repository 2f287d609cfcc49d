"""One coordinate-check run: train a model a few steps and measure every recorded layer on a fixed batch.

After initialization and after each step the model runs on the same evaluation batch; forward hooks keep each
layer's input ``x_t`` and output ``h_t``. Per layer and step four root-mean-square values are recorded:

- ``activation``: rms(h_t);
- ``change``: rms(h_t - h_0), the feature change since initialization;
- ``effect``: rms(f(x_t; W_t) - f(x_t; W_0)), the weight update's own effect (W_t - W_0) x_t on the layer's current
  input (Linear, Embedding and LayerNorm outputs are affine in the weight, so this is exactly its share; the module
  is re-run with its initial weight, every other parameter as it is now: the weight's storage is swapped for the
  initial one for that call, which ``torch.func.functional_call`` would do at about ten times the cost);
- ``input``: rms(x_t) (1 for token ids, which are width-independent data).

All values stay on the device in one tensor until the run ends, so a run synchronizes with the host once.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mupderive.verify.train import loss_of

QUANTITIES = ("activation", "change", "effect", "input")


class Optimizer(Protocol):
    """What training needs of an optimizer (a torch optimizer or a hybrid of several)."""

    def zero_grad(self) -> None: ...

    def step(self) -> object: ...


@dataclass(frozen=True)
class Run:
    """Measurements of one (width, seed): ``rms[step, layer, quantity]`` and the training loss per step."""

    rms: torch.Tensor
    loss: torch.Tensor


class _Probe:
    """Hooks that keep each named module's latest input and output while ``active``.

    The input is taken before any other pre-hook (a forward multiplier may scale it there) and the output after
    every other hook, so re-running the module on that input reproduces the whole layer, multiplier included.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.modules = [modules[name] for name in names]
        self.inputs: list[tuple] = [()] * len(names)
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.active = False
        self.handles = []
        for index, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._keep_input(index), prepend=True))
            self.handles.append(module.register_forward_hook(self._keep_output(index)))

    def _keep_input(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.active:
                self.inputs[index] = args

        return hook

    def _keep_output(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.active:
                self.outputs[index] = output

        return hook

    def run(self, model: nn.Module, x: torch.Tensor) -> None:
        """Forward ``x`` without gradients, capturing every probed module."""
        self.active = True
        try:
            with torch.no_grad():
                model(x)
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dtype=torch.float32) / x.numel() ** 0.5


def _with_weight(module: nn.Module, weight: torch.Tensor, args: tuple) -> torch.Tensor:
    """``module(*args)`` (hooks included) with ``weight`` in place of its weight, restored afterwards (no_grad)."""
    current = module.weight.data
    module.weight.data = weight
    try:
        return module(*args)
    finally:
        module.weight.data = current


def train_and_measure(model: nn.Module, optimizer: Optimizer, names: list[str],
                      batches: list[tuple[torch.Tensor, torch.Tensor]], eval_x: torch.Tensor, keep_graph: bool) -> Run:
    """Train one step per batch (cross-entropy) and measure ``names`` on ``eval_x`` before and after every step.

    ``keep_graph``: backward with ``create_graph=True``, for optimizers that estimate the Hessian themselves.
    """
    steps = len(batches)
    probe = _Probe(model, names)
    rms = torch.zeros(steps + 1, len(names), len(QUANTITIES), device=eval_x.device)
    losses = torch.zeros(steps, device=eval_x.device)
    initial = [m.weight.detach().clone() for m in probe.modules]
    try:
        probe.run(model, eval_x)
        h0 = list(probe.outputs)
        for i, args in enumerate(probe.inputs):
            rms[0, i, 0] = _rms(h0[i])
            rms[0, i, 3] = _rms(args[0]) if args[0].is_floating_point() else 1.0
        for step, (x, y) in enumerate(batches, 1):
            with sdpa_kernel(SDPBackend.MATH) if keep_graph else nullcontext():  # fused kernels lack double backward
                loss = loss_of(model, x, y)
            with warnings.catch_warnings():  # create_graph=True warns about a reference cycle; grads are freed below
                warnings.simplefilter("ignore", UserWarning)
                loss.backward(create_graph=keep_graph)
            optimizer.step()
            optimizer.zero_grad()  # sets the gradients to None, which also frees a kept graph
            losses[step - 1] = loss.detach()
            probe.run(model, eval_x)
            with torch.no_grad():
                for i, (module, args, h) in enumerate(zip(probe.modules, probe.inputs, probe.outputs, strict=True)):
                    rms[step, i, 0] = _rms(h)
                    rms[step, i, 1] = _rms(h - h0[i])
                    rms[step, i, 2] = _rms(h - _with_weight(module, initial[i], args))
                    rms[step, i, 3] = _rms(args[0]) if args[0].is_floating_point() else 1.0
    finally:
        probe.remove()
    return Run(rms.cpu(), losses.cpu())
