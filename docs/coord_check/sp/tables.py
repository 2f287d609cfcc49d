"""Print the markdown tables of docs/coord_check/sp/README.md from the coordinate-check and alignment JSONs here.

    python docs/coord_check/sp/tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [("adam_mlp_sp-full", "MLP, sp, full"), ("adam_mlp_sp-none", "MLP, sp, none"),
        ("adam_mlp_mup-full", "MLP, Everett's mup, full"), ("adam_gpt_sp-full", "GPT, sp, full"),
        ("adam_gpt_sp-table", "GPT, sp, measured alignment"), ("adam_gpt_sp-none", "GPT, sp, none")]


def cell(check: dict) -> str:
    """``measured ± ci (predicted)``, bold when the judge fails it."""
    text = f"{check['slope']:+.2f}±{check['ci']:.2f} ({check['target']})"
    return text if check["passed"] else f"**{text}**"


def run_table(stem: str, title: str) -> list[str]:
    doc = json.loads((HERE / f"{stem}.json").read_text())
    verdict = "PASS" if doc["passed"] else f"FAIL ({len(doc['failures'])} layers)"
    lines = [f"### {title}: {verdict}", "",
             f"widths {', '.join(map(str, doc['widths']))}; {doc['steps']} steps, {doc['seeds']} seeds, lr "
             f"{doc['lr']:g}; slope ± 95% CI (predicted); bold = misses the prediction by more than "
             f"{doc['tolerance']} + CI", "",
             "| layer | role | init activation | first-step change | first-step effect | last change | last effect |",
             "|---|---|---|---|---|---|---|"]
    checks = {(c["layer"], c["checkpoint"], c["quantity"]): c for c in doc["checks"]}
    for layer, role in doc["layers"].items():
        keys = [("init", "activation"), ("first", "change"), ("first", "effect"), ("last", "change"),
                ("last", "effect")]
        cells = [cell(checks[(layer, *k)]) if (layer, *k) in checks else "" for k in keys]
        lines.append(f"| {layer} | {role} | {' | '.join(cells)} |")
    lines += [""] + [f"- {f['message']}" for f in doc["failures"]] + [""]
    return lines


def alignment_table(stem: str, title: str) -> list[str]:
    doc = json.loads((HERE / f"{stem}.json").read_text())
    lines = [f"### {title}", "", "| layer | role | own dW z0 (first / last) | propagated W0 dz | cross dW dz |",
             "|---|---|---|---|---|"]
    for layer, row in doc["layers"].items():
        cells = [f"{row[t]['first']['slope']:.2f} / {row[t]['last']['slope']:.2f} ± {row[t]['last']['ci']:.2f}"
                 for t in ("own", "propagated", "cross")]
        lines.append(f"| {layer} | {row['role']} | {' | '.join(cells)} |")
    roles = "; ".join(f"{role}: " + ", ".join(f"{t} {k}" for t, k in row.items()) for role, row in doc["roles"].items())
    return lines + ["", f"Table written for analyze: {roles}", ""]


def main() -> None:
    out = []
    for stem, title in RUNS:
        if (HERE / f"{stem}.json").exists():
            out += run_table(stem, title)
    for stem, title in [("alignment-gpt-derived", "GPT, derived muP"), ("alignment-gpt-sp-full", "GPT, sp (full)"),
                        ("alignment-mlp-sp-full", "MLP, sp (full)"), ("alignment-mlp-mup-full", "MLP, mup (full)")]:
        if (HERE / f"{stem}.json").exists():
            out += alignment_table(stem, title)
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
