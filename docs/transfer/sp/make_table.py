"""The SP transfer table and its plot from the three sweeps' JSON reports here (``mupderive transfer --out``).

    python docs/transfer/sp/make_table.py     # prints the markdown table, writes transfer-sp.png
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEPS = [("transfer-adam-sp-full-gpt.json", "SP, per-layer lrs (analyze sp, full alignment)"),
          ("transfer-adam-derived-gpt.json", "muP (derived)"),
          ("transfer-adam-standard-gpt.json", "SP, one lr (standard)")]


def load() -> list[tuple[str, dict]]:
    return [(label, json.loads((HERE / name).read_text())) for name, label in SWEEPS if (HERE / name).exists()]


def table(reports: list[tuple[str, dict]], metric: str = "train") -> str:
    widths = reports[0][1]["widths"]
    head = (f"| parameterization | {' | '.join(f'best lr @{w}' for w in widths)} | drift (log2) | "
            f"{' | '.join(f'best loss @{w}' for w in widths)} |")
    lines = [head, "|---" * (2 + 2 * len(widths)) + "|"]
    for label, r in reports:
        rows = r[metric]["per_width"]
        lrs = [("-" if p["lr"] is None else f"{p['lr']:.3g}") + ("" if p["kind"] in ("interpolated", "grid") else
                                                                 f" ({p['kind']})") for p in rows]
        drift = r[metric]["drift_log2"]
        drift = "-" if drift is None else f"{drift:.2f}" + ("" if r[metric]["reliable"] else " (edge)")
        losses = ["-" if p["loss"] is None else f"{p['loss']:.3f}" for p in rows]
        lines.append(f"| {label} | {' | '.join(lrs)} | {drift} | {' | '.join(losses)} |")
    return "\n".join(lines)


def plot(reports: list[tuple[str, dict]], path: Path, metric: str = "train") -> None:
    """Left: the optimal lr per width; right: the best loss per width; one line per parameterization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, r in reports:
        rows = [p for p in r[metric]["per_width"] if p["lr"] is not None]
        widths = [p["width"] for p in rows]
        left.plot(widths, [p["lr"] for p in rows], "-o", label=label)
        right.plot(widths, [p["loss"] for p in rows], "-o", label=label)
    for ax, name in ((left, "optimal (base-width) learning rate"), (right, f"best {metric} loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    left.set_yscale("log", base=2)
    right.legend(fontsize=8)
    r = reports[0][1]
    fig.suptitle(f"adam, {r['model']['n_layer']}-layer GPT, {r['steps']} steps, batch {r['batch_size']}, "
                 f"{r['seeds']} seed(s), {r['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    reports = load()
    print(table(reports, "train"))
    print()
    print(table(reports, "val"))
    plot(reports, HERE / "transfer-sp.png")


if __name__ == "__main__":
    main()
