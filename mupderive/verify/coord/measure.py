"""One coordinate-check run: train a model a few steps and measure every recorded layer on a fixed batch.

After initialization and after each step the model runs on the same evaluation batch; forward hooks keep each
layer's input ``x_t`` and output ``h_t``. Per layer and step four root-mean-square values are recorded:

- ``activation``: rms(h_t);
- ``change``: rms(h_t - h_0), the feature change since initialization;
- ``effect``: rms(f(x_t; W_t) - f(x_t; W_0)), the weight update's own effect (W_t - W_0) x_t on the layer's current
  input (Linear, Embedding, Conv1D and norm outputs are affine in the weight, so this is exactly its share; the module
  is re-run with its initial weight, every other parameter as it is now: the weight's storage is swapped for the
  initial one for that call, which ``torch.func.functional_call`` would do at about ten times the cost);
- ``input``: rms(x_t) (1 for token ids, which are width-independent data).

Attention logits (layers named ``attention_logits.k``, :mod:`attention`) record their activation rms(s q kᵀ), its
change since initialization, ``input`` = rms(q) rms(k) (what the logits inherit from the projections) and no
``effect`` (0: they own no weight). So do residual blocks recorded as the stream (a depth check's ``stream``
layers: a block's output is the residual stream after it).

With ``alignment=True`` each layer holding a weight matrix also records, after every step, the rms of the three terms
of its output change and of what they multiply (:mod:`alignment`: ``dW z0``, ``W0 dz``, ``dW dz``, ``dW``, ``W0``,
``z0``, ``dz``).

All values stay on the device in one tensor until the run ends, so a run synchronizes with the host once.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mupderive.verify.coord.alignment import QUANTITIES as ALIGNMENT
from mupderive.verify.coord.alignment import measurable, term_rms
from mupderive.verify.coord.attention import attention_logits
from mupderive.verify.coord.attention import rms as _rms
from mupderive.verify.coord.layers import ATTENTION
from mupderive.verify.train import LossFn, forward, loss_of

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
    terms: torch.Tensor | None = None  # [step, layer, alignment.QUANTITIES] with alignment=True


class _Probe:
    """Hooks that keep each named module's latest input and output, and each attention call's logits, while active.

    The input is taken before any other pre-hook (a forward multiplier may scale it there) and the output after
    every other hook, so re-running the module on that input reproduces the whole layer, multiplier included.
    ``names`` lists modules and ``attention_logits.k`` entries, in forward order; the k-th attention call of a
    forward pass fills ``attention_logits.k`` (calls not listed are not kept).
    """

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.model = model
        self.names = names
        self.attention = {int(name.rpartition(".")[2]): i for i, name in enumerate(names)
                          if name.startswith(f"{ATTENTION}.")}
        self.layer = [i for i, name in enumerate(names) if not name.startswith(f"{ATTENTION}.")]
        self.modules = {i: modules[names[i]] for i in self.layer}
        self.inputs: list[tuple[tuple, dict]] = [((), {})] * len(names)
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.qk: list[torch.Tensor | None] = [None] * len(names)
        self.calls = 0
        self.active = False
        self.handles = []
        for index, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._keep_input(index), prepend=True,
                                                                 with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._keep_output(index)))

    def _keep_input(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.active:
                self.inputs[index] = (args, kwargs)

        return hook

    def _keep_output(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.active:
                self.outputs[index] = _tensor(output)

        return hook

    def _keep_logits(self, logits: torch.Tensor, qk: torch.Tensor) -> None:
        if self.calls in self.attention:
            index = self.attention[self.calls]
            self.outputs[index], self.qk[index] = logits, qk
        self.calls += 1

    def run(self, x: Any) -> None:
        """Forward ``x`` without gradients in eval mode (no dropout), capturing every probed layer."""
        self.active, self.calls, training = True, 0, self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), attention_logits(self.model, self._keep_logits):
                forward(self.model, x)
        finally:
            self.active = False
            self.model.train(training)
        if self.calls <= max(self.attention, default=-1):
            raise RuntimeError(f"the forward pass made {self.calls} attention calls, at least "
                               f"{max(self.attention) + 1} expected")

    def input_rms(self, index: int) -> torch.Tensor | float:
        """rms of a layer's input (1 for integer data such as token ids), rms(q) rms(k) for attention logits."""
        if self.qk[index] is not None:
            return self.qk[index]
        x = _first_tensor(self.inputs[index])
        return _rms(x) if x is not None and x.is_floating_point() else 1.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tensor(output: Any) -> torch.Tensor:
    if isinstance(output, tuple | list):
        output = next(t for t in output if isinstance(t, torch.Tensor))
    return output


def _first_tensor(inputs: tuple[tuple, dict]) -> torch.Tensor | None:
    args, kwargs = inputs
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)


def _with_weight(module: nn.Module, weight: torch.Tensor, inputs: tuple[tuple, dict]) -> torch.Tensor:
    """``module(*args, **kwargs)`` (hooks included) with ``weight`` in place of its weight, restored afterwards.

    Only the weight's storage is swapped, so a layout such as Conv1D's (in, out) and a weight shared with another
    module (tied) are both fine: only this module is re-run.
    """
    args, kwargs = inputs
    current = module.weight.data
    module.weight.data = weight
    try:
        return _tensor(module(*args, **kwargs))
    finally:
        module.weight.data = current


def _with_input(module: nn.Module, weight: torch.Tensor, inputs: tuple[tuple, dict], x: torch.Tensor) -> torch.Tensor:
    """The module on input ``x`` (its first positional argument) with ``weight`` in place of its weight."""
    args, kwargs = inputs
    return _with_weight(module, weight, ((x, *args[1:]), kwargs))


def train_and_measure(model: nn.Module, optimizer: Optimizer, names: list[str], batches: list[tuple[Any, torch.Tensor]],
                      eval_x: Any, keep_graph: bool, loss_fn: LossFn = loss_of, alignment: bool = False) -> Run:
    """Train one step per batch (``loss_fn``, default cross-entropy) and measure ``names`` (modules and attention
    logits, in forward order) on ``eval_x`` before and after every step.

    ``keep_graph``: backward with ``create_graph=True``, for optimizers that estimate the Hessian themselves.
    ``alignment``: also record the three output-change terms of every weight matrix (:mod:`alignment`).
    """
    steps = len(batches)
    probe = _Probe(model, names)
    device = next(model.parameters()).device
    rms = torch.zeros(steps + 1, len(names), len(QUANTITIES), device=device)
    losses = torch.zeros(steps, device=device)
    initial = {i: m.weight.detach().clone() for i, m in probe.modules.items()  # a residual block's output (a
               if isinstance(getattr(m, "weight", None), torch.Tensor)}  # stream, no weight of its own): no effect
    terms = torch.zeros(steps + 1, len(names), len(ALIGNMENT), device=device) if alignment else None
    try:
        probe.run(eval_x)
        h0 = list(probe.outputs)
        x0 = {i: _first_tensor(probe.inputs[i]) for i in probe.modules}
        aligned = [i for i, m in probe.modules.items() if terms is not None and measurable(m) and probe.inputs[i][0]
                   and x0[i] is not None and x0[i].is_floating_point()]
        for i in range(len(names)):
            rms[0, i, 0] = _rms(h0[i])
            rms[0, i, 3] = probe.input_rms(i)
        for step, (x, y) in enumerate(batches, 1):
            with sdpa_kernel(SDPBackend.MATH) if keep_graph else nullcontext():  # fused kernels lack double backward
                loss = loss_fn(model, x, y)
            with warnings.catch_warnings():  # create_graph=True warns about a reference cycle; grads are freed below
                warnings.simplefilter("ignore", UserWarning)
                loss.backward(create_graph=keep_graph)
            optimizer.step()
            optimizer.zero_grad()  # sets the gradients to None, which also frees a kept graph
            losses[step - 1] = loss.detach()
            probe.run(eval_x)
            with torch.no_grad():
                for i, h in enumerate(probe.outputs):
                    rms[step, i, 0] = _rms(h)
                    rms[step, i, 1] = _rms(h - h0[i])
                    if i in initial:
                        rms[step, i, 2] = _rms(h - _with_weight(probe.modules[i], initial[i], probe.inputs[i]))
                    rms[step, i, 3] = probe.input_rms(i)
                for i in aligned:
                    module, inputs = probe.modules[i], probe.inputs[i]
                    terms[step, i] = term_rms(lambda x, w, m=module, a=inputs: _with_input(m, w, a, x), initial[i],
                                              module.weight.detach(), x0[i], _first_tensor(inputs))
    finally:
        probe.remove()
    return Run(rms.cpu(), losses.cpu(), None if terms is None else terms.cpu())
