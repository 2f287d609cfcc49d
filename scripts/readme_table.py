"""Print the README's table of derived exponents for every built-in rule (spectral convention).

    python scripts/readme_table.py          # tests/test_readme.py checks the README carries exactly this
"""

from __future__ import annotations

from mupderive import builtin_rule_names, derive

ROLES = ("input", "hidden", "output", "vector")


def n(e) -> str:
    return f"n^{e}" if e != 0 else "1"


def table() -> str:
    lines = ["| rule | kappa | lr: input / hidden / output / vector | lr formula | scale hyperparameters "
             "(input / hidden / output / vector) |", "|---|---|---|---|---|"]
    for name in builtin_rule_names():
        d = derive(name)
        kappa = d.kappa if not isinstance(d.kappa, dict) else ", ".join(f"{r} {k}" for r, k in d.kappa.items())
        lrs = " / ".join(n(d.layers[r].exponents()["lr"]) for r in ROLES)
        hypers = []
        for role in ROLES:
            layer = d.layers[role]
            for h, e in layer.exponents().items():
                if h in ("multiplier", "init_std", "lr"):
                    continue
                label = f"{h}" if layer.rule == name else f"{layer.rule}.{h}"
                hypers.append((label, role, e))
        names = list(dict.fromkeys(label for label, _, _ in hypers))
        cells = []
        for label in names:
            values = {role: e for lab, role, e in hypers if lab == label}
            cells.append(f"{label}: " + " / ".join(n(values[r]) if r in values else "-" for r in ROLES))
        formula = d.formulas.get("lr", "")
        lines.append(f"| {name} | {kappa} | {lrs} | `{formula}` | {'; '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
