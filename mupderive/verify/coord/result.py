"""The result of a coordinate check (:class:`CoordCheck`) and its two tables: the terminal report and markdown.

Both the check (:mod:`check`, which builds it) and the reports (:mod:`report`: JSON, plots, multi-rule tables)
import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mupderive.language.rule import Rule
from mupderive.verify.coord.alignment import LayerAlignment
from mupderive.verify.coord.judge import FLAT, JUDGED, Check, Targets, checkpoints
from mupderive.verify.coord.task import Task


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
    alignment: list[LayerAlignment] | None = None  # measure_alignment=True: each weight matrix's fitted alignment
    depths: list[int] | None = None  # a depth check: the depths (``widths`` holds its one width)
    depth_scaling: bool = True  # a depth check: False for the width-only module (--no-depth-scaling)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def axis(self) -> str:
        """What the slopes are fitted against: "width", or "depth" for a depth check."""
        return "width" if self.depths is None else "depth"

    @property
    def scales(self) -> list[int]:
        """The x values of the fits: the widths, or a depth check's depths."""
        return self.widths if self.depths is None else self.depths

    @property
    def setup(self) -> str:
        """The scales in words: "widths 64,128" or "depths 2,4 at width 64 (derived, depth-scaled)"."""
        if self.depths is None:
            return f"widths {','.join(map(str, self.widths))}"
        alpha = f", alpha {self.targets.depth.alpha:g}" if self.targets.depth is not None else ""
        scaling = f"depth-scaled{alpha}" if self.depth_scaling else "width-only: --no-depth-scaling"
        return f"depths {','.join(map(str, self.depths))} at width {self.widths[0]} ({scaling})"

    def _repr_markdown_(self) -> str:
        """Jupyter: the slope table per layer and checkpoint and the verdict (:func:`markdown_report`)."""
        return markdown_report(self)


def _label(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _cell(check: Check | None) -> str:
    if check is None:
        return ""
    text = f"{check.slope.value:+.2f}±{check.slope.ci:.2f}" if check.slope.finite else "n/a"
    note = next((e for e in (check.expected, check.target) if e is not None and e != FLAT), None)
    text += f" ({note})" if note is not None else ""
    return text + ("" if check.passed else " *")


def text_report(result: CoordCheck) -> str:
    """The table of slopes per layer and checkpoint, the losses, and the verdict with causes."""
    r = result
    marks = checkpoints(r.rms)
    predictions = r.targets.predictions
    pad = max(24, *(len(layer) + 1 for layer in r.layers))
    lines = [f"coord-check {r.rule.name} on {r.task.name} ({r.parameterization} parameterization, {r.convention} "
             f"convention): {r.setup}, {r.steps} steps, {r.seeds} seeds, lr {r.lr:g}, "
             f"{r.device}",
             f"slope of log rms against log {r.axis}, +- 95% CI over seeds x {r.axis}s; target 0 unless shown in "
             f"parentheses; '*' = misses its target by more than {r.tolerance:g} + CI; last = {_label(marks['last'])}"]
    if r.targets.slopes is not None:
        lines.append(f"{r.parameterization}: every target is the slope `mupderive analyze` predicts for the layer's "
                     f"role")
    if predictions is not None:
        lines.append("standard parameterization: the engine's prediction in parentheses" if predictions else
                     "standard parameterization: the engine has no per-layer prediction for this model")
    header = f"{'layer':<{pad}} {'role':<9} {'checkpoint':<11} " + " ".join(f"{q:<21}" for q in JUDGED) + "verdict"
    lines += ["", header, "-" * len(header)]
    for layer, role in r.layers.items():
        for name, steps in marks.items():
            row = {c.quantity: c for c in r.checks if c.layer == layer and c.checkpoint == name}
            verdict = "ok" if all(c.passed for c in row.values()) else "FAIL"
            predicted = [c for c in row.values() if c.expected is not None]
            if predictions and predicted:
                verdict += " (as predicted)" if all(c.agrees for c in predicted) else " (differs from prediction)"
            label = "init" if name == "init" else _label(steps)
            lines.append(f"{layer:<{pad}} {role:<9} {label:<11} "
                         + " ".join(f"{_cell(row.get(q)):<21}" for q in JUDGED) + verdict)
    final = r.loss[:, :, -1].mean(axis=0)
    chance = getattr(r.task, "chance", None)
    chance = f"; chance: ln 96 = {chance:.2f}" if chance is not None else ""
    lines += ["", f"training loss at step {r.steps}, before its update (mean over seeds{chance}): "
              + "  ".join(f"{w}: {v:.3f}" for w, v in zip(r.scales, final, strict=True))]
    if r.passed:
        lines.append(f"PASS: every layer's slopes are the analysis's predictions ({r.seconds:.1f} s)"
                     if r.targets.slopes is not None else
                     f"PASS: every layer keeps its scale across {r.axis}s ({r.seconds:.1f} s)")
    else:
        lines.append(f"FAIL: {len(r.failures)} of {len(r.layers)} layers fail the check ({r.seconds:.1f} s)")
        lines += [f"  {message}" for _, message in r.failures]
    return "\n".join(lines)


def markdown_report(result: CoordCheck) -> str:
    """The text report's table in markdown: slope ± CI per layer, checkpoint and quantity ('**' = misses)."""
    r = result
    marks = checkpoints(r.rms)
    verdict = "PASS" if r.passed else f"FAIL ({len(r.failures)} of {len(r.layers)} layers)"
    lines = [f"**coord-check {r.rule.name} on {r.task.name}, {r.parameterization}: {verdict}** ("
             f"{r.setup}; {r.steps} steps, {r.seeds} seeds, lr {r.lr:g}; target slope 0 "
             f"unless shown)", "", f"| layer | role | checkpoint | {' | '.join(JUDGED)} |",
             "|---" * (3 + len(JUDGED)) + "|"]
    for layer, role in r.layers.items():
        for name, steps in marks.items():
            row = {c.quantity: c for c in r.checks if c.layer == layer and c.checkpoint == name}
            cells = [_cell(row.get(q)).replace(" *", "") for q in JUDGED]
            cells = [cell if q not in row or row[q].passed else f"**{cell}**" for q, cell in zip(JUDGED, cells,
                                                                                                  strict=True)]
            lines.append(f"| {layer} | {role} | {'init' if name == 'init' else _label(steps)} | "
                         f"{' | '.join(cells)} |")
    lines += [""] + [f"- {message}" for _, message in r.failures]
    return "\n".join(lines)


