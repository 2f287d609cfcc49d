"""Reports of a coordinate check: the JSON document, log-log plots, and markdown tables over several checks (the
terminal and markdown tables of one check are :mod:`result`'s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mupderive.verify.coord.fit import fit_slope
from mupderive.verify.coord.judge import JUDGED, Check, checkpoints, judged
from mupderive.verify.coord.measure import QUANTITIES
from mupderive.verify.coord.result import CoordCheck

SCHEMA = "mupderive.coord_check/1"


def step_slopes(result: CoordCheck) -> dict[str, dict[str, list[dict | None]]]:
    """``{layer: {quantity: [slope per step]}}``; change and effect are 0 at step 0 (None there)."""
    out: dict[str, dict[str, list]] = {}
    for index, layer in enumerate(result.layers):
        out[layer] = {}
        for q, quantity in enumerate(QUANTITIES):
            out[layer][quantity] = [
                None if step == 0 and quantity in ("change", "effect")
                else fit_slope(result.scales, result.rms[:, :, step, index, q]).to_json()
                for step in range(result.steps + 1)]
    return out


def to_json(result: CoordCheck) -> dict:
    """The ``mupderive.coord_check/1`` document: setup, raw rms, slopes per step, checks and verdict."""
    r = result
    return {
        "schema": SCHEMA, "rule": r.rule.name, "rule_sha256": r.rule.digest, "model": r.task.name,
        "task": r.task.to_json(),
        "parameterization": r.parameterization, "convention": r.convention, "exponents": r.exponents,
        "widths": r.widths, "depths": r.depths, "depth_scaling": r.depth_scaling if r.depths else None,
        "steps": r.steps,
        "seeds": r.seeds, "lr": r.lr, "tolerance": r.tolerance, "device": r.device, "torch": torch.__version__,
        "checkpoints": checkpoints(r.rms), "layers": r.layers,
        "logits": next(layer for layer, role in reversed(r.layers.items()) if role != "attention"),
        "quantities": list(QUANTITIES),
        "rms": {layer: {quantity: r.rms[:, :, :, i, q].transpose(2, 0, 1).round(8).tolist()
                        for q, quantity in enumerate(QUANTITIES)} for i, layer in enumerate(r.layers)},
        "rms_layout": f"rms[layer][quantity][step][seed][{r.axis} index]",
        "loss": r.loss.round(6).tolist(), "loss_layout": f"loss[seed][{r.axis} index][step - 1]",
        "readout_init": str(r.targets.readout_init), "predictions": r.targets.predictions,
        "predicted_slopes": r.targets.slopes,
        "alignment": None if r.alignment is None else {f.layer: f.to_json() for f in r.alignment},
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
            for index, (layer, role) in enumerate(r.layers.items()):
                if quantity not in judged(role):
                    continue
                values = r.rms[:, :, step, index, q]
                ax.loglog(r.scales, np.exp(np.log(values).mean(axis=0)), "o-", ms=3, lw=1.2,
                          color=colors[index], label=layer)
            ax.set_title(f"step {step}", fontsize=9)
            ax.set_xticks(r.scales, [str(w) for w in r.scales])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.tick_params(labelsize=7)
            if step == 0 or (step == 1 and quantity != "activation"):
                ax.set_ylabel(f"rms {quantity}", fontsize=9)
            if row == rows - 1:
                ax.set_xlabel(r.axis, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    verdict = "PASS" if r.passed else "FAIL"
    fig.suptitle(f"{r.rule.name} / {r.task.name} / {r.parameterization}: {verdict} ({r.device})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (2.6 * cols + 2.2), 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(result: CoordCheck, out: Path, stem: str | None = None) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.png`` under ``out`` (default stem: ``<rule>_<model>_<parameterization>``,
    then ``_depth`` or ``_depth_width-only`` for a depth check)."""
    out.mkdir(parents=True, exist_ok=True)
    depth = "" if result.depths is None else "_depth" if result.depth_scaling else "_depth_width-only"
    stem = stem or f"{result.rule.name}_{result.task.name}_{result.parameterization}{depth}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"  # a stem may hold dots (FILE.FUNC)
    json_path.write_text(json.dumps(to_json(result), indent=1) + "\n", encoding="utf-8")
    plot(result, png_path)
    return [json_path, png_path]


def markdown_layers(results: list[CoordCheck], quantity: str, checkpoint: str) -> str:
    """A table, one row per rule: each layer's ``quantity`` slope (+- CI) at ``checkpoint``; one model per call."""
    layers = list(results[0].layers)
    lines = [f"| rule | {' | '.join(layers)} | verdict |", "|---" * (len(layers) + 2) + "|"]
    for r in results:
        cells = {c.layer: c for c in r.checks if c.checkpoint == checkpoint and c.quantity == quantity}
        lines.append(f"| {r.rule.name} | " + " | ".join(_md(cells[layer]) if layer in cells else "" for layer in layers)
                     + f" | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


def markdown_worst(results: list[CoordCheck]) -> str:
    """A table, one row per rule: per quantity, the slope farthest from its target over all layers and checkpoints."""
    lines = [f"| rule | {' | '.join(f'worst {q}' for q in JUDGED)} | verdict |", "|---" * (len(JUDGED) + 2) + "|"]
    for r in results:
        cells = []
        for quantity in JUDGED:
            worst = max((c for c in r.checks if c.quantity == quantity and c.checkpoint != "init"),
                        key=lambda c: abs(c.target.distance(c.slope.value)) if c.target.relation in ("=", "in")
                        else c.slope.value - c.target.value)
            cells.append(f"{_md(worst)} ({worst.layer}, {worst.checkpoint})")
        lines.append(f"| {r.rule.name} | {' | '.join(cells)} | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


def _md(check: Check) -> str:
    text = f"{check.slope.value:+.2f} ± {check.slope.ci:.2f}" if check.slope.finite else "n/a"
    return text if check.passed else f"**{text}**"
