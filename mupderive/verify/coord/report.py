"""Reports of a coordinate check: the terminal table, the JSON document, log-log plots and a markdown summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mupderive.verify.coord_check import CoordCheck
from mupderive.verify.coord_fit import fit_slope
from mupderive.verify.coord_judge import FLAT, JUDGED, Check, checkpoints
from mupderive.verify.coord_measure import QUANTITIES

SCHEMA = "mupderive.coord_check/1"


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
    lines = [f"coord-check {r.rule.name} on {r.task.name} ({r.parameterization} parameterization, {r.convention} "
             f"convention): widths {','.join(map(str, r.widths))}, {r.steps} steps, {r.seeds} seeds, lr {r.lr:g}, "
             f"{r.device}",
             f"slope of log rms against log width, +- 95% CI over seeds x widths; target 0 unless shown in "
             f"parentheses; '*' = misses its target by more than {r.tolerance:g} + CI; last = {_label(marks['last'])}"]
    if predictions is not None:
        lines.append("standard parameterization: the engine's prediction in parentheses" if predictions else
                     "standard parameterization: the engine has no per-layer prediction for this model")
    header = f"{'layer':<24} {'role':<7} {'checkpoint':<11} " + " ".join(f"{q:<21}" for q in JUDGED) + "verdict"
    lines += ["", header, "-" * len(header)]
    for layer, role in r.layers.items():
        for name, steps in marks.items():
            row = {c.quantity: c for c in r.checks if c.layer == layer and c.checkpoint == name}
            verdict = "ok" if all(c.passed for c in row.values()) else "FAIL"
            predicted = [c for c in row.values() if c.expected is not None]
            if predictions and predicted:
                verdict += " (as predicted)" if all(c.agrees for c in predicted) else " (differs from prediction)"
            label = "init" if name == "init" else _label(steps)
            lines.append(f"{layer:<24} {role:<7} {label:<11} "
                         + " ".join(f"{_cell(row.get(q)):<21}" for q in JUDGED) + verdict)
    final = r.loss[:, :, -1].mean(axis=0)
    lines += ["", f"training loss at step {r.steps}, before its update (mean over seeds; chance: ln 96 = 4.56): "
              + "  ".join(f"{w}: {v:.3f}" for w, v in zip(r.widths, final, strict=True))]
    if r.passed:
        lines.append(f"PASS: every layer keeps its scale across widths ({r.seconds:.1f} s)")
    else:
        lines.append(f"FAIL: {len(r.failures)} of {len(r.layers)} layers fail the check ({r.seconds:.1f} s)")
        lines += [f"  {message}" for _, message in r.failures]
    return "\n".join(lines)


def markdown_report(result: CoordCheck) -> str:
    """The text report's table in markdown: slope ± CI per layer, checkpoint and quantity ('**' = misses)."""
    r = result
    marks = checkpoints(r.rms)
    verdict = "PASS" if r.passed else f"FAIL ({len(r.failures)} of {len(r.layers)} layers)"
    lines = [f"**coord-check {r.rule.name} on {r.task.name}, {r.parameterization}: {verdict}** (widths "
             f"{', '.join(map(str, r.widths))}; {r.steps} steps, {r.seeds} seeds, lr {r.lr:g}; target slope 0 "
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


def step_slopes(result: CoordCheck) -> dict[str, dict[str, list[dict | None]]]:
    """``{layer: {quantity: [slope per step]}}``; change and effect are 0 at step 0 (None there)."""
    out: dict[str, dict[str, list]] = {}
    for index, layer in enumerate(result.layers):
        out[layer] = {}
        for q, quantity in enumerate(QUANTITIES):
            out[layer][quantity] = [
                None if step == 0 and quantity in ("change", "effect")
                else fit_slope(result.widths, result.rms[:, :, step, index, q]).to_json()
                for step in range(result.steps + 1)]
    return out


def to_json(result: CoordCheck) -> dict:
    """The ``mupderive.coord_check/1`` document: setup, raw rms, slopes per step, checks and verdict."""
    r = result
    return {
        "schema": SCHEMA, "rule": r.rule.name, "rule_sha256": r.rule.digest, "model": r.task.name,
        "task": {k: getattr(r.task, k) for k in r.task.__dataclass_fields__},
        "parameterization": r.parameterization, "convention": r.convention, "exponents": r.exponents,
        "widths": r.widths, "steps": r.steps,
        "seeds": r.seeds, "lr": r.lr, "tolerance": r.tolerance, "device": r.device, "torch": torch.__version__,
        "checkpoints": checkpoints(r.rms), "layers": r.layers, "logits": list(r.layers)[-1],
        "quantities": list(QUANTITIES),
        "rms": {layer: {quantity: r.rms[:, :, :, i, q].transpose(2, 0, 1).round(8).tolist()
                        for q, quantity in enumerate(QUANTITIES)} for i, layer in enumerate(r.layers)},
        "rms_layout": "rms[layer][quantity][step][seed][width index]",
        "loss": r.loss.round(6).tolist(), "loss_layout": "loss[seed][width index][step - 1]",
        "readout_init": str(r.targets.readout_init), "predictions": r.targets.predictions,
        "slopes": step_slopes(r), "checks": [c.to_json() for c in r.checks],
        "passed": r.passed, "failures": [{"layer": layer, "message": message} for layer, message in r.failures],
        "seconds": round(r.seconds, 3),
    }


def plot(result: CoordCheck, path: Path) -> None:
    """One PNG: a row per quantity (activation, change, effect), a panel per step, a line per layer, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    r = result
    rows, cols = len(JUDGED), r.steps + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 2.2, 2.3 * rows), squeeze=False, sharex=True)
    colors = plt.cm.tab20(np.arange(len(r.layers)) % 20) if len(r.layers) > 10 else plt.cm.tab10(np.arange(10))
    for row, quantity in enumerate(JUDGED):
        q = QUANTITIES.index(quantity)
        for step in range(cols):
            ax = axes[row][step]
            if step == 0 and quantity != "activation":
                ax.axis("off")
                continue
            for index, layer in enumerate(r.layers):
                values = r.rms[:, :, step, index, q]
                ax.loglog(r.widths, np.exp(np.log(values).mean(axis=0)), "o-", ms=3, lw=1.2,
                          color=colors[index], label=layer)
            ax.set_title(f"step {step}", fontsize=9)
            ax.set_xticks(r.widths, [str(w) for w in r.widths])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.tick_params(labelsize=7)
            if step == 0 or (step == 1 and quantity != "activation"):
                ax.set_ylabel(f"rms {quantity}", fontsize=9)
            if row == rows - 1:
                ax.set_xlabel("width", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    verdict = "PASS" if r.passed else "FAIL"
    fig.suptitle(f"{r.rule.name} / {r.task.name} / {r.parameterization}: {verdict} ({r.device})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (2.6 * cols + 2.2), 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(result: CoordCheck, out: Path, stem: str | None = None) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.png`` under ``out`` (default stem: ``<rule>_<model>_<parameterization>``)."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / (stem or f"{result.rule.name}_{result.task.name}_{result.parameterization}")
    json_path, png_path = base.with_suffix(".json"), base.with_suffix(".png")
    json_path.write_text(json.dumps(to_json(result), indent=1) + "\n", encoding="utf-8")
    plot(result, png_path)
    return [json_path, png_path]


def markdown_layers(results: list[CoordCheck], quantity: str, checkpoint: str) -> str:
    """A table, one row per rule: each layer's ``quantity`` slope (+- CI) at ``checkpoint``; one model per call."""
    layers = list(results[0].layers)
    lines = [f"| rule | {' | '.join(layers)} | verdict |", "|---" * (len(layers) + 2) + "|"]
    for r in results:
        cells = {c.layer: c for c in r.checks if c.checkpoint == checkpoint and c.quantity == quantity}
        lines.append(f"| {r.rule.name} | " + " | ".join(_md(cells[layer]) for layer in layers)
                     + f" | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


def markdown_worst(results: list[CoordCheck]) -> str:
    """A table, one row per rule: per quantity, the slope farthest from its target over all layers and checkpoints."""
    lines = [f"| rule | {' | '.join(f'worst {q}' for q in JUDGED)} | verdict |", "|---" * (len(JUDGED) + 2) + "|"]
    for r in results:
        cells = []
        for quantity in JUDGED:
            worst = max((c for c in r.checks if c.quantity == quantity and c.checkpoint != "init"),
                        key=lambda c: abs(c.slope.value - c.target.value) if c.target.relation == "=" else
                        c.slope.value - c.target.value)
            cells.append(f"{_md(worst)} ({worst.layer}, {worst.checkpoint})")
        lines.append(f"| {r.rule.name} | {' | '.join(cells)} | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


def _md(check: Check) -> str:
    text = f"{check.slope.value:+.2f} ± {check.slope.ci:.2f}" if check.slope.finite else "n/a"
    return text if check.passed else f"**{text}**"
