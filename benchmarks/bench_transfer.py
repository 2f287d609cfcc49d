"""Benchmark: learning-rate transfer of every built-in rule, derived vs standard parameterization.

Expected result (a benchmark, not a test): under the derived parameterization the best learning rate drifts by at
most one grid step (a factor of 2) across an 8x width range for every built-in rule, while the standard
parameterization with Adam drifts by more.

Protocol, per rule and parameterization: a coarse scan at the base (smallest) width over the rule's default lr
times 4^-5 .. 4^5 finds where the optimum is; the sweep then trains every width on a 9-point grid with factor-2
steps centred there. Every run goes to the SQLite store, so `run` resumes after a kill and `report` only reads.

    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py run --store transfer-bench.db --jobs 2
    python benchmarks/bench_transfer.py report --store transfer-bench.db --out docs/transfer

``--model gpt`` runs the 1-layer GPT instead (widths 32-256, 100 steps, batch 16 x 64 characters): too slow on a
CPU for a coarse scan, so its 8-point factor-2 grid is centred on a fixed power of 2 per rule (``GPT_CENTRE``,
chosen from the MLP optima and probe runs at the base width) rather than found.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import replace
from pathlib import Path

from mupderive import builtin_rule_names, load_rule
from mupderive.verify.store import Store
from mupderive.verify.transfer import Summary, Sweep, find_optimum, make_config, plot, run_sweep, summarize

WIDTHS, CONTEXT = (64, 128, 256, 512), 8
# Muon's Newton-Schulz runs in bfloat16, ~45x slower than float32 matmuls on a CPU without bf16 units, and
# Shampoo takes an SVD of every preconditioner each step (768 x 768 for the input layer on 8 characters of
# context, whatever the width): on CPU both get a smaller 8x range, Shampoo also 2 characters of context.
CPU_WIDTHS = {"muon": (16, 32, 64, 128), "shampoo": (32, 64, 128, 256)}
CPU_CONTEXT = {"shampoo": 2}
STEPS, BATCH = 200, 128
COARSE = range(-5, 6)  # default lr x 4^k at the base width
FINE = range(-4, 5)  # centre x 2^j at every width
PARAMETERIZATIONS = ("derived", "standard")
GPT_WIDTHS, GPT_STEPS = (32, 64, 128, 256), 100
GPT_CPU_WIDTHS = {"muon": (32, 64, 128), "shampoo": (32, 64, 128)}  # 4x only: the cost of the two on a CPU (above)
# log2 of each rule's grid centre
GPT_CENTRE = {"adafactor": -2, "adam": -6, "adam_atan2": -6, "adamw": -6, "adopt": -7, "lamb": -4, "lion": -9,
              "muon": -5, "rmsprop": -7, "sgd": 0, "shampoo": -1, "signsgd": -7, "sophia": -1}
GPT_FINE = range(-4, 4)


def config(rule: str, parameterization: str, lrs: list[float], device: str = "auto", model: str = "mlp"):
    """The benchmark's sweep: depth-4 MLP on 8 characters of context, 200 steps, batch 128, one seed (or the GPT)."""
    if model == "gpt":
        return make_config(rule, model="gpt", widths=GPT_CPU_WIDTHS.get(rule, GPT_WIDTHS), lrs=lrs, steps=GPT_STEPS,
                           parameterization=parameterization, device=device)
    sweep = make_config(rule, model="mlp", widths=CPU_WIDTHS.get(rule, WIDTHS), lrs=lrs, steps=STEPS,
                        batch_size=BATCH, parameterization=parameterization, device=device)
    return replace(sweep, model=replace(sweep.model, context=CPU_CONTEXT.get(rule, CONTEXT)))


def coarse_lrs(rule: str) -> list[float]:
    default = float(load_rule(rule).lr.default)
    return [default * 4.0**k for k in COARSE]


def fine_lrs(rule: str, runs) -> list[float]:
    """The fine grid, centred on the coarse optimum at the base width (rounded to a power of 2 times the default)."""
    default = float(load_rule(rule).lr.default)
    lrs = coarse_lrs(rule)
    losses = [next((r.train_loss for r in runs if r.lr == lr), None) for lr in lrs]
    best = find_optimum([math.log2(lr) for lr in lrs], losses)
    centre = 0 if best.log2_lr is None else round(best.log2_lr - math.log2(default))
    return [default * 2.0 ** (centre + j) for j in FINE]


def gpt_lrs(rule: str) -> list[float]:
    return [2.0 ** (GPT_CENTRE[rule] + j) for j in GPT_FINE]


def coarse_scan(rule: str, parameterization: str, device: str) -> tuple[Sweep, list[tuple[int, float, int]]]:
    """The MLP's coarse scan: the sweep and its points (every coarse lr at the base width, seed 0)."""
    coarse = Sweep(config(rule, parameterization, coarse_lrs(rule), device))
    return coarse, [(min(coarse.config.widths), lr, 0) for lr in coarse.config.lrs]


def fine_sweep(rule: str, parameterization: str, device: str, model: str, store: Store) -> Sweep:
    """The sweep the benchmark reports: the GPT's fixed grid, or the MLP grid centred on the stored coarse scan."""
    if model == "gpt":
        return Sweep(config(rule, parameterization, gpt_lrs(rule), device, model))
    coarse, points = coarse_scan(rule, parameterization, device)
    runs = store.runs(coarse.key(*point) for point in points)
    return Sweep(config(rule, parameterization, fine_lrs(rule, runs), device))


def sweep_rule(rule: str, parameterization: str, store_path: str, device: str, model: str, progress: bool) -> dict:
    """Run (or resume) the coarse scan (MLP) and the fine sweep of one rule; return timing and the fine grid."""
    start = time.perf_counter()
    with Store(store_path) as store:
        if model == "mlp":
            coarse, points = coarse_scan(rule, parameterization, device)
            run_sweep(coarse, store, progress, points=points)
        sweep = fine_sweep(rule, parameterization, device, model, store)
        run_sweep(sweep, store, progress)
    return {"rule": rule, "parameterization": parameterization, "wall_s": time.perf_counter() - start,
            "lrs": list(sweep.config.lrs)}


def _worker(task: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    return sweep_rule(*task, progress=False)


def run(args: argparse.Namespace) -> int:
    tasks = [(rule, p, args.store, args.device, args.model) for rule in args.rules for p in PARAMETERIZATIONS]
    tasks.sort(key=lambda task: task[0] not in CPU_WIDTHS)  # the slow ones first, so the pool balances
    if args.jobs == 1:
        for task in tasks:
            _done(sweep_rule(*task, progress=True))
        return 0
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(_worker, tasks):
            _done(result)
    return 0


def _done(result: dict) -> None:
    print(f"done {result['rule']} {result['parameterization']} in {result['wall_s']:.0f} s", flush=True)


def stored_results(rule: str, parameterization: str, store: Store, device: str, model: str
                   ) -> tuple[Sweep, dict[str, Summary], int]:
    """The fine sweep of one rule from the store (nothing is trained): sweep, train/val summaries, missing runs."""
    sweep = fine_sweep(rule, parameterization, device, model, store)
    runs = store.runs(sweep.key(*point) for point in sweep.plan())
    summaries = {metric: summarize(runs, sweep.config.widths, sweep.config.lrs, metric) for metric in ("train", "val")}
    return sweep, summaries, len(sweep.plan()) - len(runs)


def _drift(summary: Summary) -> str:
    if summary.drift is None:
        return "undefined"
    return f"{summary.drift:.2f}" + ("" if summary.reliable else " (edge)")


def _optima(summary: Summary) -> str:
    return ", ".join("-" if o.log2_lr is None else f"{o.log2_lr:.2f}" for o in summary.optima.values())


def within_one_step(summary: Summary) -> bool:
    """The expectation for the derived parameterization: every optimum bracketed, drift <= one grid step."""
    return summary.drift is not None and summary.reliable and summary.drift <= summary.grid_step + 1e-9


def report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results, verdicts = [], {}, {}
    with Store(args.store) as store:
        for rule in args.rules:
            summaries = {}
            for parameterization in PARAMETERIZATIONS:
                sweep, summaries[parameterization], missing = stored_results(rule, parameterization, store,
                                                                             args.device, args.model)
                c = sweep.config
                what = (f"1-layer GPT, block {c.model.block_size}" if args.model == "gpt" else
                        f"depth-4 MLP, context {c.model.context}")
                title = f"{rule}, {parameterization}: {what}, {c.steps} steps, batch {c.batch_size}, {args.device_note}"
                plot(summaries[parameterization]["train"], title, out / f"{rule}-{parameterization}.png")
                results[f"{rule}/{parameterization}"] = {
                    "widths": list(sweep.config.widths), "context": sweep.config.model.context,
                    "lrs": list(sweep.config.lrs), "missing_runs": missing,
                    **{metric: summary.to_json() for metric, summary in summaries[parameterization].items()}}
            derived, standard = summaries["derived"], summaries["standard"]
            widths = sweep.config.widths
            verdicts[rule] = within_one_step(derived["train"])
            rows.append(f"| {rule} | {widths[0]}-{widths[-1]} | {_drift(derived['train'])} | "
                        f"{_drift(derived['val'])} | {_drift(standard['train'])} | {_drift(standard['val'])} | "
                        f"{_optima(derived['train'])} | {_optima(standard['train'])} | "
                        f"{'yes' if verdicts[rule] else 'no'} |")
    header = ["| rule | widths | derived drift (train) | derived drift (val) | standard drift (train) | "
              "standard drift (val) | derived optima, log2 lr per width (train) | standard optima (train) | "
              "derived within one grid step |",
              "|---|---|---|---|---|---|---|---|---|"]
    (out / "drift-table.md").write_text("\n".join(header + rows) + "\n")
    (out / "transfer.json").write_text(json.dumps(
        {"schema": "mupderive.transfer-benchmark/1", "model": "gpt, 1 layer" if args.model == "gpt" else "mlp, depth 4",
         "steps": GPT_STEPS if args.model == "gpt" else STEPS, "batch_size": sweep.config.batch_size, "seeds": 1,
         "device": args.device_note, "results": results}, indent=2) + "\n")
    print("\n".join(header + rows))
    failed = [rule for rule, ok in verdicts.items() if not ok]
    print(f"\nderived drift <= one grid step (train loss) for {len(verdicts) - len(failed)}/{len(verdicts)} rules"
          + (f"; not for {', '.join(failed)}" if failed else ""))
    if "adam" in args.rules:
        adam = {p: results[f"adam/{p}"]["train"]["drift_log2"] for p in PARAMETERIZATIONS}
        print(f"adam drift: derived {adam['derived']:.2f}, standard {adam['standard']:.2f} log2 units")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--rules", default=",".join(builtin_rule_names()), help="comma-separated (default: all)")
    parser.add_argument("--store", default="transfer-bench.db")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one thread each)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="mlp", choices=["mlp", "gpt"])
    parser.add_argument("--out", default="docs/transfer")
    parser.add_argument("--device-note", default="cpu", help="the hardware, recorded in the JSON report")
    args = parser.parse_args(argv)
    args.rules = [r for r in args.rules.split(",") if r]
    return run(args) if args.action == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
