"""``mupderive coord-check``: train a real model a few steps at several widths and check every layer keeps its scale.

For each seed and width the model (the MLP, the GPT or one of your own, :mod:`task`) is parameterized
(:mod:`setup`: the module generated from the derivation, or the standard parameterization), trained on its task and
measured on a fixed evaluation batch after every step (:mod:`measure`: every layer :mod:`layers` records, attention
logits included). Slopes of log rms against log width are fitted over all seeds with a 95% interval (:mod:`fit`)
and judged (:mod:`judge`) into a :class:`~result.CoordCheck`; :mod:`report` writes JSON and plots.

The base the generated module compares against is the model built at the smallest width (a real one on the CPU, as a
user passes it: values its modules hold, such as an embedding's output factor, are read from it), the delta the
model at twice that width on the meta device (shapes only), so any model whose shapes follow its width works
unchanged.

Learning rate: ``BASE_LR`` per built-in rule, the rate the check runs at on the base (smallest) width, where the
derived and the standard parameterization coincide. They are the rules' defaults except SGD (1e-3 barely moves the
features in a few steps; 3e-2 does, and stays out of the strongly nonlinear regime 1e-1 reaches on the GPT) and
RMSprop (without bias correction its first step is lr / sqrt(1 - alpha) = 10 lr per coordinate, so 1e-4 takes the
step Adam takes at 1e-3; the default 1e-2 takes 0.1). The slopes are properties of the parameterization, not of the
lr: 4x lower and higher rates give the same verdicts (one exception, docs/coord_check/README.md). A rule file of your
own runs at its declared default lr; ``--lr`` overrides.
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mupderive.analysis import first_step
from mupderive.depth import Depth
from mupderive.derivation import Derivation, derive, rational
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule
from mupderive.parameterized import analysed, predicted_slopes
from mupderive.solver import Fix
from mupderive.verify.coord import depth as depth_module
from mupderive.verify.coord.alignment import QUANTITIES as ALIGNMENT
from mupderive.verify.coord.alignment import fit_alignment
from mupderive.verify.coord.judge import DepthTargets, Expect, Targets, checkpoints, diagnose, judge
from mupderive.verify.coord.layers import ATTENTION, forward_order, layer_roles
from mupderive.verify.coord.measure import train_and_measure
from mupderive.verify.coord.result import CoordCheck
from mupderive.verify.coord.setup import Derived, Standard, generated_module, parameter_roles
from mupderive.verify.coord.task import GPTTask, MLPTask, Task
from mupderive.verify.data import load_corpus, split_corpus
from mupderive.verify.train import needs_graph

BASE_LR = {"adafactor": 1e-2, "adam": 1e-3, "adam_atan2": 1e-3, "adamw": 1e-3, "adopt": 1e-3, "lamb": 1e-3,
           "lion": 1e-4, "muon": 1e-3, "rmsprop": 1e-4, "sgd": 3e-2, "shampoo": 1e-3, "signsgd": 1e-3,
           "sophia": 6e-2}
TOLERANCE = 0.15
EVAL_SEED = 12345
PROBE_SEED = 7


def _check_sizes(widths: list[int], steps: int, seeds: int, task: Task) -> list[int]:
    widths = sorted(set(widths))
    if len(widths) < 3 or widths[0] < 1:
        raise MupError(f"need at least 3 distinct positive widths to fit a slope, got {widths}")
    if steps < 1 or seeds < 1:
        raise MupError(f"--steps and --seeds must be at least 1, got {steps} and {seeds}")
    task.check_widths(widths)
    return widths


def readout_init(derivation: Derivation) -> float:
    """Slope of the readout's activation at init: multiplier + init_std + fan_in/2 (its input has Theta(1) entries)."""
    out = derivation.layers["output"]
    return float(rational(out.multiplier) + rational(out.init_std) + rational(out.fan_in) / 2)


def init_targets(derivation: Derivation) -> dict[str, Expect]:
    """Derived init slopes: the readout's exactly; a tied readout's between readout multiplier + embedding init +
    1/2 (W h incoherent) and + 1 (coherent: the residual stream carries the tensor's own row of each input token)."""
    targets = {"output": Expect("=", readout_init(derivation))}
    tied = getattr(derivation, "tied", None)
    if tied is not None:  # the residual stream holds the tensor's own rows: coherent for the input's own token
        low = float(rational(tied.readout.multiplier) + rational(tied.embedding.init_std)
                    + rational(derivation.layers["output"].fan_in) / 2)
        targets["tied-out"] = Expect("in", low, low + 0.5)
    return targets


def standard_predictions(rule: Rule, task: Task, convention: str) -> dict[str, dict[str, float]]:
    """The engine's first-step exponents of the standard parameterization per layer (none for the GPT)."""
    chain = task.chain()
    if chain is None:
        return {}
    return {c.layer: {"change": float(rational(c.change)), "effect": float(rational(c.own))}
            for c in first_step(rule, chain, "standard", convention)}


def _meta(task: Task, width: int, depth: int | None = None) -> nn.Module:
    """The model at ``width`` (and ``depth``) on the meta device: shapes only, no memory and no initialization."""
    with torch.device("meta"):
        return build(task, width, depth)


def build(task: Task, width: int, depth: int | None = None) -> nn.Module:
    """The task's model at ``width`` (with ``depth`` residual blocks, for a depth check)."""
    return task.build(width) if depth is None else task.build(width, depth)


def _layers(task: Task, module: ModuleType, widths: list[int], eval_x: object, eval_y: torch.Tensor, device: str,
            depth: int | None = None) -> tuple[dict[str, str], dict[str, str], nn.Module, nn.Module]:
    """The recorded layers with their roles in forward order, the parameter roles, and the base and delta models.

    One real model at the smallest width (on ``device``) runs the task's loss once: that checks the model and task
    work together and gives the forward order; then the generated module classifies its parameters against the
    base (real, on the CPU) and the meta-device delta (a real model, so layouts the module probes, such as Conv1D's,
    are read right). ``depth``: every model at that depth (a depth check's base depth).
    """
    delta = _meta(task, 2 * widths[0], depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBE_SEED)
        model = build(task, widths[0], depth).to(device)
        base = build(task, widths[0], depth)  # real (on the CPU), as a user passes it: values such as a scaled
        # embedding's factor (Gemma's sqrt(hidden), a buffer) are measured on it
    try:
        names = forward_order(model, lambda: task.loss(model, eval_x, eval_y))
    except MupError:
        raise
    except Exception as exc:  # a model or task that does not run is bad input: one line
        message = " ".join(str(exc).split())
        raise MupError(f"{task.name}: the model at width {widths[0]} fails on an evaluation batch: "
                       f"{type(exc).__name__}: {message}") from None
    if not names:
        raise MupError(f"{task.name}: the model has no layer the check records (Linear, Embedding, Conv1D, norms, "
                       "attention)")
    roles = parameter_roles(module, model, base, delta)
    return layer_roles(model, roles, names), roles, base, delta


def _warn_unrecorded_attention(layers: dict[str, str], attention: list[str]) -> None:
    """Say so when the model has attention modules (as the generated module finds them) but none of their logits
    were recorded: the verdict then says nothing about the logit scale."""
    if attention and "attention" not in layers.values():
        shown = ", ".join(attention[:3]) + (f" and {len(attention) - 3} more" if len(attention) > 3 else "")
        warnings.warn(f"attention logits of {shown} were not recorded (only calls of torch.nn.functional."
                      f"scaled_dot_product_attention and transformers' eager_attention_forward are): this check "
                      f"does not test their logit scale", stacklevel=3)


def run_check(rule: Rule | Derivation | str | Path, task: Task | None = None, parameterization: str = "derived",
              widths: tuple[int, ...] | list[int] = (64, 128, 256, 512), steps: int = 5, seeds: int = 3,
              lr: float | None = None, tolerance: float = TOLERANCE, device: str = "cpu",
              convention: str = "spectral", fixes: tuple[Fix, ...] | list[Fix] = (),
              options: dict[str, bool] | None = None, first_seed: int = 0, progress: bool = False,
              alignment: str | Mapping[str, Mapping[str, object]] | None = None,
              measure_alignment: bool = False, depths: tuple[int, ...] | list[int] | None = None,
              depth_scaling: bool = True) -> CoordCheck:
    """Run a coordinate check; ``rule`` may be a ready :class:`Derivation` (e.g. a deliberately altered one).

    ``task``: :class:`MLPTask` (default), :class:`GPTTask` or :class:`~mupderive.verify.user.UserTask` (your own
    model, e.g. ``UserTask(build=lambda width: GPT2LMHeadModel(config_at(width)))``). Seed ``first_seed + k`` trains
    on the k-th ``steps`` batches of one stream drawn from ``first_seed`` (the same batches at every width) and,
    with the width, fixes the initialization.

    ``depths``: a depth check instead, at the smallest of ``widths``: one model per depth (``task.build(width,
    depth)``), the base the shallowest, slopes against depth (:mod:`~mupderive.verify.coord.depth` matches the layers
    across depths and adds the residual stream). ``depth_scaling=False`` applies the width-only module (the model
    as its own depth base: no branch multiplier, no depth factor), the negative control.


    ``parameterization``: derived, standard, or an analysed one (sp, ntk, mup, mfp, a table, or a path to a JSON
    table) under ``alignment`` (full by default; :mod:`mupderive.parameterized`): the generated module of that
    analysis, each layer judged against the slopes the analysis predicts for its role. ``measure_alignment``: also
    fit every weight matrix's alignment exponents (:mod:`~mupderive.verify.coord.alignment`, ``result.alignment``).
    """
    start = time.perf_counter()
    task = task or MLPTask()
    widths = _check_sizes(list(widths), steps, seeds, task) if depths is None else sorted(set(widths))[:1]
    scales = widths if depths is None else _check_sizes(list(depths), steps, seeds, _NoCheck())
    derivation = rule if isinstance(rule, Derivation) else None
    rule = derivation.rule if derivation else rule if isinstance(rule, Rule) else load_rule(rule)
    lr = lr if lr is not None else BASE_LR.get(rule.name, float(rule.lr.default))
    if depths is not None and parameterization != "derived":
        raise MupError("a depth check compares the derived parameterization with --no-depth-scaling (the "
                       "width-only module); --parameterization standard does not apply")
    if not depth_scaling and depths is None:
        raise MupError("--no-depth-scaling applies to a depth check (--depths)")
    if alignment is not None and parameterization in ("derived", "standard"):
        raise MupError("--alignment applies to an analysed --parameterization (sp, ntk, mup, mfp or a table)")
    if parameterization == "derived":
        derivation = derivation or derive(rule, convention, fixes, options, depth=Depth())
        module = generated_module(derivation)
        targets = Targets(init_targets(derivation), None)
        exponents = {role: {k: str(v) for k, v in layer.exponents().items()}
                     for role, layer in derivation.layers.items()}
    elif parameterization != "standard":
        if fixes or options or convention != "spectral" or derivation is not None:
            raise MupError(f"--parameterization {parameterization}: the analysis fixes every knob, so a derivation, "
                           f"--fix, --set and --convention apply to the derived parameterization only")
        derivation = analysed(rule, parameterization, alignment)
        module = generated_module(derivation)
        slopes = {role: {k: float(v) for k, v in row.items()} for role, row in
                  predicted_slopes(derivation.analysis).items()}
        targets = Targets({"output": Expect("=", slopes["output"]["init"])}, None, slopes)
        exponents = {role: {k: str(v) for k, v in layer.exponents().items()}
                     for role, layer in derivation.layers.items()}
        parameterization = derivation.tag
    else:
        if derivation is not None or fixes or options:
            raise MupError("a derivation, --fix and --set apply to the derived parameterization only")
        setup = Standard(rule, lr)
        module = generated_module(derive(rule, convention))  # only for the parameter roles
        task = replace(task, attn_scale="standard") if isinstance(task, GPTTask) else task
        targets, exponents = Targets({}, standard_predictions(rule, task, convention)), None
    train, val = split_corpus(load_corpus())
    eval_x, eval_y = next(task.batches(val, torch.Generator().manual_seed(EVAL_SEED), device, task.eval_size))
    base_depth = None if depths is None else scales[0]
    layers, roles, base, delta = _layers(task, module, widths, eval_x, eval_y, device, base_depth)
    _warn_unrecorded_attention(layers, module._attention_modules(base))
    names_of = _names(module, base, layers, base_depth, task.name)
    if depths is not None:
        layers = {name: layers.get(name, "stream") for name in names_of(base_depth)}
        targets = replace(targets, depth=DepthTargets(float(derivation.depth.alpha)))
    setup = setup if parameterization == "standard" else Derived(module, base, delta, lr, depth_scaling)
    setup.bind(roles)
    rms = np.zeros((seeds, len(scales), steps + 1, len(layers), 4))
    loss = np.zeros((seeds, len(scales), steps))
    terms = np.zeros((seeds, len(scales), steps + 1, len(layers), len(ALIGNMENT))) if measure_alignment else None
    bar = tqdm(total=seeds * len(scales), desc=f"coord-check {rule.name} {task.name} {parameterization}",
               file=sys.stderr, disable=not progress, leave=False)
    stream = task.batches(train, torch.Generator().manual_seed(first_seed), device, task.batch_size)
    with bar:
        for s, seed in enumerate(range(first_seed, first_seed + seeds)):
            batches = list(itertools.islice(stream, steps))  # this seed's batches, the same at every width
            for w, scale in enumerate(scales):
                width, depth = (scale, None) if depths is None else (widths[0], scale)
                init_seed = 1_000_003 * seed + scale
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(init_seed)
                    model = build(task, width, depth)
                model.to(device)
                optimizer = setup.prepare(model, torch.Generator(device=device).manual_seed(init_seed))
                run = train_and_measure(model, optimizer, names_of(depth), batches, eval_x, needs_graph(optimizer),
                                        task.loss, measure_alignment)
                rms[s, w], loss[s, w] = run.rms.numpy(), run.loss.numpy()
                if terms is not None:
                    terms[s, w] = run.terms.numpy()
                bar.update()
    checks = judge(rms, scales, layers, tolerance, targets)
    failures = diagnose(rms, scales, layers, checks, tolerance, "n" if depths is None else "L")
    fitted = None if terms is None else fit_alignment(terms, scales, layers, checkpoints(rms), {
        role: float(Fraction(row.get("multiplier", "0"))) for role, row in (exponents or {}).items()})
    return CoordCheck(rule, task, parameterization, convention, widths, steps, seeds, lr, tolerance, device, layers,
                      rms, loss, targets, exponents, checks, failures, time.perf_counter() - start, fitted,
                      depths=None if depths is None else scales, depth_scaling=depth_scaling)


class _NoCheck:
    """Depths need no per-task check of their values."""

    def check_widths(self, widths: list[int]) -> None:
        """Every depth is valid."""


def _names(module: ModuleType, base: nn.Module, layers: dict[str, str], base_depth: int | None, label: str
           ) -> Callable[[int | None], list[str]]:
    """The recorded names at a depth: the base's layers (width check), or those matched at that depth with the
    residual stream after each block (depth check, :mod:`~mupderive.verify.coord.depth`)."""
    if base_depth is None:
        return lambda depth: list(layers)
    path, count = depth_module.block_list(module, base, label)
    names = depth_module.with_streams(depth_module.matchable(list(layers), count), path, count)
    calls = sum(name.startswith(f"{ATTENTION}.") for name in names)
    return lambda depth: depth_module.names_at(names, path, count, depth, calls)
