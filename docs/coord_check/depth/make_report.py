"""Regenerate the depth coordinate check in this folder: seven rules on the built-in GPT at one width across depths,
with the generated module's depth scaling (derived) and width-only (--no-depth-scaling, the negative control); one
JSON per check, PNGs for AdamW, and results.md with the residual-stream slopes and the verdicts.

    python docs/coord_check/depth/make_report.py [--threads 1]

Each check is ``mupderive coord-check RULE --model gpt --depths 2,4,8,16 --widths 64`` (5 steps, 3 seeds, the
command line's defaults), with ``--no-depth-scaling`` for the control.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mupderive.verify.coord import CoordCheck, GPTTask, run_check, text_report
from mupderive.verify.coord.report import write_outputs

HERE = Path(__file__).resolve().parent
RULES = ("adamw", "sgd", "muon", "lamb", "shampoo", "adopt", "sophia")
DEPTHS, WIDTH, STEPS, SEEDS = (2, 4, 8, 16), 64, 5, 3
PLOTTED = {"adamw"}


def _slope(result: CoordCheck, layer: str, quantity: str, checkpoint: str) -> str:
    check = next(c for c in result.checks if (c.layer, c.quantity, c.checkpoint) == (layer, quantity, checkpoint))
    text = f"{check.slope.value:+.2f} ± {check.slope.ci:.2f}"
    return text if check.passed else f"**{text}**"


def _row(rule: str, label: str, result: CoordCheck) -> str:
    streams = [layer for layer, role in result.layers.items() if role == "stream"]
    cells = [f"{_slope(result, s, 'activation', 'init')} / {_slope(result, s, 'change', 'first')} / "
             f"{_slope(result, s, 'change', 'last')}" for s in streams]
    failed = ", ".join(layer for layer, _ in result.failures) or "-"
    verdict = "pass" if result.passed else "**FAIL**"
    return f"| {rule} | {label} | {' | '.join(cells)} | {verdict} | {failed} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = GPTTask()
    rows, texts, start = [], [], time.perf_counter()
    for rule in RULES:
        for label, scaling in (("derived", True), ("width-only", False)):
            result = run_check(rule, task, widths=[WIDTH], depths=DEPTHS, steps=STEPS, seeds=SEEDS,
                               depth_scaling=scaling, progress=True)
            paths = write_outputs(result, HERE)
            if rule not in PLOTTED:
                paths[1].unlink()
            rows.append(_row(rule, label, result))
            texts.append(text_report(result))
            print(rows[-1], flush=True)
    streams = [layer for layer, role in result.layers.items() if role == "stream"]
    columns = " | ".join(f"stream after {s}: activation (init) / change (first) / change (last)" for s in streams)
    header = f"| rule | module | {columns} | verdict | failing layers |"
    lines = ["# Depth coordinate check: results", "",
             f"GPT at width {WIDTH}, depths {', '.join(map(str, DEPTHS))} (base {DEPTHS[0]}), {STEPS} steps, {SEEDS} "
             f"seeds, CPU; slope of log rms against log depth ± 95% CI; bold = misses its target (stream activation "
             f"<= 0, stream change 0, each within 0.15 + CI). Took {time.perf_counter() - start:.0f} s.", "",
             header, "|---" * (4 + len(streams)) + "|", *rows, "", "## Full reports", ""]
    lines += [f"```\n{text}\n```\n" for text in texts]
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
