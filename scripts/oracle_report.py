"""Run ``mupderive oracle`` on every built-in rule and write the report under ``docs/oracle/``.

Per rule ``RULE.json`` (the oracle's JSON) and ``RULE.png`` (its log-log plot); ``summary.md`` is one row per rule:
checks passed in the derived scenario and in the ``if_fixed`` scenarios, the largest |slope - prediction| among
each, the implementation match, and every failing check with its numbers.

    OMP_NUM_THREADS=1 python scripts/oracle_report.py [--out docs/oracle] [--device auto]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mupderive import builtin_rule_names
from mupderive.verify.oracle import DEFAULT_WIDTHS, Check, Report, run_oracle, write_outputs
from mupderive.verify.train import resolve_device

# torch.optim.Muon runs Newton-Schulz in bfloat16, which a CPU without bf16 units emulates slowly (7 s a step at 512)
CPU_WIDTHS = {"muon": (64, 128, 256)}


def checks(report: Report, fixed: bool) -> list[Check]:
    return [c for r in report.roles for s in r.results if (s.scenario.fixed is not None) == fixed for c in s.checks]


def worst(cs: list[Check]) -> str:
    deviations = [abs(c.deviation) for c in cs if c.fit is not None]
    return f"{max(deviations):.3f}" if deviations else "-"


def row(report: Report, seconds: float) -> str:
    derived, fixed = checks(report, False), checks(report, True)
    errors = [s.match.error for r in report.roles for s in r.results if s.match.error is not None]
    match = f"{max(errors):.1e}" if errors else "interpreter"
    failing = [f"{r.role} / {s.scenario.name}: {c.quantity.label} {c.fit.slope:+.2f} vs {c.quantity.predicted}"
               for r in report.roles for s in r.results for c in s.checks if not c.passed and c.fit is not None]
    widths = f"{report.widths[0]}-{report.widths[-1]}"
    return (f"| {report.rule.name} | {widths} | {'PASS' if report.passed else 'FAIL'} | "
            f"{sum(c.passed for c in derived)}/{len(derived)} | {worst(derived)} | "
            f"{sum(c.passed for c in fixed)}/{len(fixed)} | {worst(fixed)} | {match} | "
            f"{'; '.join(failing) or '-'} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/oracle")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    out, device = Path(args.out), resolve_device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = ["| rule | widths | verdict | derived checks passed | worst deviation | if_fixed checks passed | "
            "worst deviation | implementation match (max rel. error) | failing checks (slope vs predicted) | s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in builtin_rule_names():
        start = time.perf_counter()
        widths = CPU_WIDTHS.get(name, DEFAULT_WIDTHS) if device == "cpu" else DEFAULT_WIDTHS
        report = run_oracle(name, widths=widths, device=device, progress=True)
        write_outputs(report, out)
        rows.append(row(report, time.perf_counter() - start))
        print(rows[-1], flush=True)
    (out / "summary.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
