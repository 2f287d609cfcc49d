"""``mupderive coord-check``: train a real model a few steps at several widths and check every layer keeps its scale.

For each seed and width the model (MLP or GPT, :mod:`coord_task`) is parameterized (:mod:`coord_setup`: the module
generated from the derivation, or the standard parameterization), trained on the shipped corpus and measured on a
fixed evaluation batch after every step (:mod:`coord_measure`). Slopes of log rms against log width are fitted over
all seeds with a 95% interval (:mod:`coord_fit`) and judged (:mod:`coord_judge`); :mod:`coord_report` prints the
table and writes JSON and plots.

Learning rate: ``BASE_LR`` per built-in rule, the rate the check runs at on the base (smallest) width, where the
derived and the standard parameterization coincide. They are the rules' defaults except SGD (1e-3 barely moves the
features in a few steps; 3e-2 does, and stays out of the strongly nonlinear regime 1e-1 reaches on the GPT) and
RMSprop (without bias correction its first step is lr / sqrt(1 - alpha) = 10 lr per coordinate, so 1e-4 takes the
step Adam takes at 1e-3; the default 1e-2 takes 0.1). The slopes are properties of the parameterization, not of the
lr: 4x lower and higher rates give the same verdicts (one exception, docs/coord_check/README.md). A rule file of your
own runs at its declared default lr; ``--lr`` overrides.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mupderive.analysis import first_step
from mupderive.derivation import Derivation, derive, rational
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule
from mupderive.solver import Fix, parse_fix
from mupderive.verify.coord_judge import NOT_ABOVE, Check, Expect, Targets, diagnose, judge
from mupderive.verify.coord_measure import train_and_measure
from mupderive.verify.coord_setup import Derived, Standard
from mupderive.verify.coord_task import GPTTask, MLPTask, Task, layer_roles
from mupderive.verify.data import load_corpus, split_corpus
from mupderive.verify.models import base_shapes, roles
from mupderive.verify.train import needs_graph, resolve_device

BASE_LR = {"adafactor": 1e-2, "adam": 1e-3, "adam_atan2": 1e-3, "adamw": 1e-3, "adopt": 1e-3, "lamb": 1e-3,
           "lion": 1e-4, "muon": 1e-3, "rmsprop": 1e-4, "sgd": 3e-2, "shampoo": 1e-3, "signsgd": 1e-3,
           "sophia": 6e-2}
TOLERANCE = 0.15
EVAL_SEED = 12345


@dataclass
class CoordCheck:
    """The measurements and verdicts of one coordinate check."""

    rule: Rule
    task: Task
    parameterization: str
    convention: str
    widths: list[int]
    steps: int
    seeds: int
    lr: float
    tolerance: float
    device: str
    layers: dict[str, str]  # recorded layer -> role, in forward order
    rms: np.ndarray  # [seed, width, step, layer, quantity]
    loss: np.ndarray  # [seed, width, step]
    targets: Targets
    exponents: dict[str, dict[str, str]] | None  # derived: the exponents the generated module applied, per role
    checks: list[Check] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def _repr_markdown_(self) -> str:
        """Jupyter: the slope table per layer and checkpoint and the verdict (see ``coord_report.markdown_report``)."""
        from mupderive.verify.coord_report import markdown_report

        return markdown_report(self)


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


def standard_predictions(rule: Rule, task: Task, convention: str) -> dict[str, dict[str, float]]:
    """The engine's first-step exponents of the standard parameterization per layer (none for the GPT)."""
    chain = task.chain()
    if chain is None:
        return {}
    return {c.layer: {"change": float(rational(c.change)), "effect": float(rational(c.own))}
            for c in first_step(rule, chain, "standard", convention)}


def run_check(rule: Rule | Derivation | str | Path, task: Task | None = None, parameterization: str = "derived",
              widths: tuple[int, ...] | list[int] = (64, 128, 256, 512), steps: int = 5, seeds: int = 3,
              lr: float | None = None, tolerance: float = TOLERANCE, device: str = "cpu",
              convention: str = "spectral", fixes: tuple[Fix, ...] | list[Fix] = (),
              options: dict[str, bool] | None = None, first_seed: int = 0, progress: bool = False) -> CoordCheck:
    """Run a coordinate check; ``rule`` may be a ready :class:`Derivation` (e.g. a deliberately altered one).

    Seed ``first_seed + k`` trains on the k-th ``steps`` batches of one stream drawn from ``first_seed`` (the same
    batches at every width) and, with the width, fixes the initialization.
    """
    start = time.perf_counter()
    task = task or MLPTask()
    widths = _check_sizes(list(widths), steps, seeds, task)
    derivation = rule if isinstance(rule, Derivation) else None
    rule = derivation.rule if derivation else rule if isinstance(rule, Rule) else load_rule(rule)
    lr = lr if lr is not None else BASE_LR.get(rule.name, float(rule.lr.default))
    if parameterization == "derived":
        derivation = derivation or derive(rule, convention, fixes, options)
        setup = Derived(derivation, base_shapes(task, widths[0]), base_shapes(task, 2 * widths[0]), lr)
        targets = Targets(Expect("=", readout_init(derivation)), None)
        exponents = {role: {k: str(v) for k, v in layer.exponents().items()}
                     for role, layer in derivation.layers.items()}
    elif parameterization == "standard":
        if derivation is not None or fixes or options:
            raise MupError("a derivation, --fix and --set apply to the derived parameterization only")
        task = replace(task, attn_scale="standard") if isinstance(task, GPTTask) else task
        setup = Standard(rule, roles(task, widths[0]), lr)
        targets, exponents = Targets(NOT_ABOVE, standard_predictions(rule, task, convention)), None
    else:
        raise MupError(f"unknown parameterization {parameterization!r}; expected derived or standard")
    layers = layer_roles(task, widths[0])
    train, val = split_corpus(load_corpus())
    eval_x = next(task.batches(val, torch.Generator().manual_seed(EVAL_SEED), device, task.eval_size))[0]
    rms = np.zeros((seeds, len(widths), steps + 1, len(layers), 4))
    loss = np.zeros((seeds, len(widths), steps))
    bar = tqdm(total=seeds * len(widths), desc=f"coord-check {rule.name} {task.name} {parameterization}",
               file=sys.stderr, disable=not progress, leave=False)
    stream = task.batches(train, torch.Generator().manual_seed(first_seed), device, task.batch_size)
    with bar:
        for s, seed in enumerate(range(first_seed, first_seed + seeds)):
            batches = list(itertools.islice(stream, steps))  # this seed's batches, the same at every width
            for w, width in enumerate(widths):
                init_seed = 1_000_003 * seed + width
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(init_seed)
                    model = task.build(width)
                model.to(device)
                optimizer = setup.prepare(model, torch.Generator(device=device).manual_seed(init_seed))
                run = train_and_measure(model, optimizer, list(layers), batches, eval_x, needs_graph(optimizer))
                rms[s, w], loss[s, w] = run.rms.numpy(), run.loss.numpy()
                bar.update()
    checks = judge(rms, widths, layers, tolerance, targets)
    failures = diagnose(rms, widths, layers, checks, tolerance)
    return CoordCheck(rule, task, parameterization, convention, widths, steps, seeds, lr, tolerance, device, layers,
                      rms, loss, targets, exponents, checks, failures, time.perf_counter() - start)


def _widths(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MupError(f"--widths {text!r}: expected comma-separated integers, e.g. 64,128,256,512") from None


def command(args: argparse.Namespace) -> int:
    """The CLI entry: run, print the table and verdict, write JSON and plots to ``--out``; 0 iff every layer passes."""
    from mupderive.commands import _options
    from mupderive.verify.coord_report import text_report, write_outputs

    task = GPTTask() if args.model == "gpt" else MLPTask()
    result = run_check(args.rule, task, args.parameterization, _widths(args.widths), args.steps, args.seeds,
                       args.lr, args.tolerance, resolve_device(args.device), args.convention,
                       [parse_fix(text) for text in args.fix], _options(args.set), progress=True)
    print(text_report(result))
    if args.out:
        for path in write_outputs(result, Path(args.out)):
            print(f"wrote {path}")
    return 0 if result.passed else 1
