"""Benchmark: learning-rate transfer across depth on the built-in GPT, derived (depth-scaled) vs width-only.

Expected result (a benchmark, not a test): with the generated module's depth scaling (each residual branch's output
times (L / L_base)^-alpha, the depth factors on lr and every scale hyperparameter inside the blocks) the best
learning rate drifts by at most one grid step (a factor of 2) across 8x depth (2 -> 16 blocks), while the same
module applied width-only (the model as its own depth base: no branch multiplier, no depth factor) drifts more.

Protocol, per rule and scaling: the GPT at one width (``WIDTH``; ``CPU_WIDTH`` for rules too slow on a CPU), depths
``DEPTHS``, ``STEPS`` steps of batch ``BATCH`` x ``BLOCK`` characters, one seed, and a fixed 7-point factor-2 lr
grid centred on the rule's power of 2 from the width benchmark's 1-layer GPT (``bench_transfer.GPT_CENTRE``). Every
run goes to the SQLite store, so ``run`` resumes after a kill and ``report`` only reads.

    OMP_NUM_THREADS=1 python benchmarks/bench_depth_transfer.py run --store depth-bench.db --jobs 2
    python benchmarks/bench_depth_transfer.py report --store depth-bench.db --out docs/transfer/depth
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import GPT_CENTRE, within_one_step  # noqa: E402

from mupderive.verify.store import Store  # noqa: E402
from mupderive.verify.transfer import Summary, Sweep, make_config, plot, run_sweep, summarize  # noqa: E402

RULES = ("adamw", "sgd", "muon", "lamb", "shampoo", "adopt", "sophia")
DEPTHS = (2, 4, 8, 16)
WIDTH = 64
CPU_WIDTH = {"shampoo": 32}  # pytorch_optimizer.Shampoo takes an SVD of every preconditioner every step
STEPS, BATCH, BLOCK = 150, 8, 32
GRID = range(-3, 4)  # centre x 2^j
SCALINGS = {"derived": True, "width-only": False}


def config(rule: str, scaling: str, device: str = "auto"):
    """One depth sweep of the benchmark (``scaling``: "derived" or "width-only")."""
    lrs = [2.0 ** (GPT_CENTRE[rule] + j) for j in GRID]
    sweep = make_config(rule, model="gpt", widths=[CPU_WIDTH.get(rule, WIDTH)], depths=DEPTHS, lrs=lrs, steps=STEPS,
                        batch_size=BATCH, device=device, depth_scaling=SCALINGS[scaling])
    return replace(sweep, model=replace(sweep.model, block_size=BLOCK))


def sweep_rule(rule: str, scaling: str, store_path: str, device: str, progress: bool) -> dict:
    """Run (or resume) one rule's depth sweep; return its timing."""
    start = time.perf_counter()
    with Store(store_path) as store:
        run_sweep(Sweep(config(rule, scaling, device)), store, progress)
    return {"rule": rule, "scaling": scaling, "wall_s": time.perf_counter() - start}


def _worker(task: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    return sweep_rule(*task, progress=False)


def run(args: argparse.Namespace) -> int:
    tasks = [(rule, s, args.store, args.device) for rule in args.rules for s in SCALINGS]
    tasks.sort(key=lambda task: task[0] not in CPU_WIDTH)  # the slow ones first, so the pool balances
    if args.jobs == 1:
        for task in tasks:
            _done(sweep_rule(*task, progress=True))
        return 0
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(_worker, tasks):
            _done(result)
    return 0


def _done(result: dict) -> None:
    print(f"done {result['rule']} {result['scaling']} in {result['wall_s']:.0f} s", flush=True)


def _drift(summary: Summary) -> str:
    if summary.drift is None:
        return "undefined"
    return f"{summary.drift:.2f}" + ("" if summary.reliable else " (edge)")


def _optima(summary: Summary) -> str:
    return ", ".join("-" if o.log2_lr is None else f"{o.log2_lr:.2f}" for o in summary.optima.values())


def _best(summary: Summary) -> str:
    return ", ".join("-" if o.loss is None else f"{o.loss:.3f}" for o in summary.optima.values())


def report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results, verdicts = [], {}, {}
    with Store(args.store) as store:
        for rule in args.rules:
            summaries = {}
            for scaling in SCALINGS:
                sweep = Sweep(config(rule, scaling, args.device))
                c = sweep.config
                runs = store.runs(sweep.key(*point) for point in sweep.plan())
                summaries[scaling] = {m: summarize(runs, c.depths, c.lrs, m, "depth") for m in ("train", "val")}
                title = (f"{rule}, {scaling}: GPT width {c.widths[0]}, depths {DEPTHS[0]}-{DEPTHS[-1]}, {c.steps} "
                         f"steps, batch {c.batch_size}x{BLOCK}, {args.device_note}")
                plot(summaries[scaling]["train"], title, out / f"{rule}-{scaling}.png")
                results[f"{rule}/{scaling}"] = {
                    "width": c.widths[0], "depths": list(c.depths), "lrs": list(c.lrs),
                    "missing_runs": len(sweep.plan()) - len(runs), "wall_s": round(sum(r.wall_s for r in runs), 1),
                    **{metric: summary.to_json() for metric, summary in summaries[scaling].items()}}
            derived, width_only = summaries["derived"], summaries["width-only"]
            step = derived["train"].grid_step
            verdicts[rule] = within_one_step(derived["train"])
            rows.append(f"| {rule} | {results[f'{rule}/derived']['width']} | {_drift(derived['train'])} | "
                        f"{_drift(width_only['train'])} | {_drift(derived['val'])} | {_drift(width_only['val'])} | "
                        f"{_optima(derived['train'])} | {_optima(width_only['train'])} | {_best(derived['train'])} | "
                        f"{_best(width_only['train'])} | {'yes' if verdicts[rule] else 'no'} (step {step:g}) |")
    header = ["| rule | width | derived drift (train) | width-only drift (train) | derived drift (val) | "
              "width-only drift (val) | derived optima, log2 lr per depth | width-only optima | derived best loss "
              "per depth | width-only best loss per depth | derived within one grid step |",
              "|---" * 11 + "|"]
    (out / "drift-table.md").write_text("\n".join(header + rows) + "\n")
    (out / "transfer.json").write_text(json.dumps(
        {"schema": "mupderive.depth-transfer-benchmark/1", "model": "gpt", "depths": list(DEPTHS),
         "steps": STEPS, "batch_size": BATCH, "block_size": BLOCK, "seeds": 1, "device": args.device_note,
         "results": results}, indent=2) + "\n")
    print("\n".join(header + rows))
    failed = [rule for rule, ok in verdicts.items() if not ok]
    print(f"\nderived drift <= one grid step (train loss) for {len(verdicts) - len(failed)}/{len(verdicts)} rules"
          + (f"; not for {', '.join(failed)}" if failed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated (default: the seven above)")
    parser.add_argument("--store", default="depth-bench.db")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one thread each)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="docs/transfer/depth")
    parser.add_argument("--device-note", default="cpu", help="the hardware, recorded in the JSON report")
    args = parser.parse_args(argv)
    args.rules = [r for r in args.rules.split(",") if r]
    return run(args) if args.action == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
