"""Coordinate-check speed: ``mupderive``'s check against the ``mup`` package's ``get_coord_data``, side by side.

Both train the same MLP (``MLPTask``: 4 one-hot context characters -> 3 ReLU layers of the given width -> 96
logits) at the same widths, for the same steps and seeds, with Adam at the same base lr, on the same batches, on the
same device. Ours: ``run_check`` end to end (derivation, generated module, training, measurement on a fixed batch,
slope fits, verdicts). mup's: ``get_coord_data`` with ``mup.MuAdam`` on models given base shapes by
``set_base_shapes`` (``do_assert=False``: the shared MLP's readout is a plain Linear, not mup's MuReadout, which
only rescales the logits); it records the l1 norm of every module's output on the training batch and fits nothing.
The two alternate ``--repeats`` times after one warm-up each; reported: medians and the ratio ours / mup (target
<= 1.0).

Work is not identical, and the report says so: mup records during the training forward pass; ours runs one extra
forward on the evaluation batch after each step plus one re-run of each layer with its initial weights (the update's
own effect), and fits and judges the slopes.

    python benchmarks/bench_coord_check.py [--widths 64,128,256,512] [--steps 5] [--seeds 3] [--repeats 5]
                                           [--device auto] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings

import torch

from mupderive.verify.coord import BASE_LR, MLPTask, run_check
from mupderive.verify.data import load_corpus, split_corpus
from mupderive.verify.train import resolve_device

TARGET = 1.0


def forget_generated() -> None:
    """Drop imported generated modules: ``import_source`` caches them per process, and each CLI run pays the import."""
    for name in [n for n in sys.modules if n.startswith("mupderive_generated_")]:
        del sys.modules[name]


def time_ours(task: MLPTask, widths: list[int], steps: int, seeds: int, device: str) -> tuple[float, bool]:
    """Seconds for ``run_check`` end to end (the generated module imported afresh), and whether the check passed."""
    forget_generated()
    start = time.perf_counter()
    result = run_check("adam", task, "derived", widths, steps, seeds, device=device)
    return time.perf_counter() - start, result.passed


def time_codegen() -> float:
    """Seconds to derive Adam, generate its module and import it: part of every check, independent of the widths."""
    from mupderive import derive
    from mupderive.codegen import generate
    from mupderive.verify.train import import_source

    forget_generated()
    start = time.perf_counter()
    import_source(generate(derive("adam")))
    return time.perf_counter() - start


def time_mup(task: MLPTask, widths: list[int], steps: int, seeds: int, device: str) -> float:
    """Seconds for ``mup.coord_check.get_coord_data`` (models built lazily, as mup expects)."""
    from mup import set_base_shapes
    from mup.coord_check import get_coord_data

    train, _ = split_corpus(load_corpus())
    batches = list(itertools.islice(task.batches(train, torch.Generator().manual_seed(0), "cpu", task.batch_size),
                                    steps))
    with torch.device("meta"):
        base, delta = task.build(widths[0]), task.build(2 * widths[0])

    def lazy(width: int):
        return lambda: set_base_shapes(task.build(width), base, delta=delta, do_assert=False)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_coord_data({w: lazy(w) for w in widths}, batches, optimizer="adam", lr=BASE_LR["adam"], mup=True,
                       nsteps=steps, nseeds=seeds, cuda=device == "cuda", fix_data=False, show_progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    widths, device, task = [int(w) for w in args.widths.split(",")], resolve_device(args.device), MLPTask()
    if args.threads:
        torch.set_num_threads(args.threads)
    time_ours(task, widths[:3], 1, 1, device)  # warm-up: imports, first kernels
    time_mup(task, widths[:3], 1, 1, device)
    ours, theirs, codegen = [], [], []
    for _ in range(args.repeats):
        codegen.append(time_codegen())
        seconds, passed = time_ours(task, widths, args.steps, args.seeds, device)
        if not passed:
            raise SystemExit("mupderive's coordinate check failed: the timing would not be of a working check")
        ours.append(seconds)
        theirs.append(time_mup(task, widths, args.steps, args.seeds, device))
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"coordinate check, MLP widths {args.widths}, {args.steps} steps, {args.seeds} seeds, Adam, {device}, "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats} alternating runs")
    print(f"  mupderive coord-check : {statistics.median(ours):7.3f} s  (runs: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"  mup get_coord_data    : {statistics.median(theirs):7.3f} s  (runs: "
          f"{', '.join(f'{t:.2f}' for t in theirs)})")
    print(f"  ratio ours / mup = {ratio:.2f} (target <= {TARGET:.1f}: {'met' if ratio <= TARGET else 'MISSED'})")
    gen = statistics.median(codegen)
    print(f"  of ours, derive + generate + import the module: {gen:.3f} s; without it the ratio is "
          f"{(statistics.median(ours) - gen) / statistics.median(theirs):.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"widths": widths, "steps": args.steps, "seeds": args.seeds, "device": device,
                       "threads": torch.get_num_threads(), "ours_s": ours, "mup_s": theirs, "codegen_s": codegen,
                       "ratio": ratio, "target": TARGET}, fh, indent=2)


if __name__ == "__main__":
    main()
