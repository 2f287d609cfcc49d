"""Summarize ``mupderive oracle RULE --depths ... --out docs/oracle/depth`` runs as ``docs/oracle/depth/summary.md``.

One row per rule and scenario: the fitted slopes against L of the per-branch change, the joint change of two matrices
and the stream's change, each next to the depth calculus's prediction. Run the oracles first, e.g.

    for r in adamw sgd muon lamb shampoo adopt sophia; do
        python -m mupderive oracle $r --depths 2,4,8,16,32 --seeds 2 --out docs/oracle/depth; done
    python scripts/depth_oracle_report.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUANTITIES = ("branch change", "joint change", "stream change")


def cell(check: dict | None) -> str:
    if check is None:
        return "-"
    mark = "" if check["passed"] else " ✗"
    return f"{check['slope']:+.2f} ± {check['ci']:.2f} (L^{check['predicted']}){mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/oracle/depth")
    out = Path(parser.parse_args().out)
    lines = ["| rule | verdict | scenario | " + " | ".join(QUANTITIES) + " |", "|---" * (3 + len(QUANTITIES)) + "|"]
    for path in sorted(out.glob("*.json")):
        doc = json.loads(path.read_text())
        for name, scenario in doc["scenarios"].items():
            verdict = ("PASS" if doc["passed"] else "FAIL") if name == "derived" else ""
            cells = " | ".join(cell(scenario["checks"].get(q)) for q in QUANTITIES)
            lines.append(f"| {doc['rule']} | {verdict} | {name} (alpha {scenario['alpha']}) | {cells} |")
    head = ("Slopes against depth L (blocks) of residual stacks at width 64, measured on the real optimizer with the "
            "derived depth factors; in parentheses the depth calculus's prediction, ✗ where the measurement is off "
            "it by more than the tolerance plus the 95% interval. Only the derived scenario decides the verdict.")
    (out / "summary.md").write_text("# Depth oracle\n\n" + head + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
