"""Muon oracle speed: ``mupderive oracle muon`` (widths 64..1024, 3 steps, 3 seeds; target: at most 120 s on a CPU).

torch.optim.Muon runs Newton-Schulz in bfloat16. A CPU without native bfloat16 GEMM (no AVX512-BF16 / AMX: AVX2
machines) multiplies bfloat16 matrices in ATen's generic loop, ~100x slower than float32, and the oracle took 4.5
minutes here (6-9 on slower machines), 86% of it in those products. The oracle now runs them through float32 kernels
with the same rounding where the CPU lacks native ones (:mod:`mupderive.verify.bf16`); the optimizer is still
torch's own.

Each measurement runs in a fresh process. ``--cpu no-bf16`` makes this CPU behave like one without native bfloat16
GEMM (``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN then reports no bf16 support and ATen takes its generic loop), which is
the case the target is about; ``native`` is this CPU as it is. Reported per CPU mode: the Muon oracle's time and its
ratio to the target, and as a reference measured in the same run the AdamW oracle at the same widths (ratio
muon / adamw). ``--baseline`` also times the Muon oracle with the native bfloat16 kernels forced
(``MUPDERIVE_BF16_GEMM=native``, the behaviour before) and compares every fitted slope of the two reports.

    python benchmarks/bench_oracle_muon.py [--cpu native,no-bf16] [--baseline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TARGET_S = 120.0
CPU_MODES = {"native": {}, "no-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}

CHILD = r"""
import json, sys, time
import torch
from mupderive.verify.bf16 import choice, native_bf16
from mupderive.verify.oracle import run_oracle
rule, widths = sys.argv[1], tuple(int(w) for w in sys.argv[2].split(","))
start = time.perf_counter()
report = run_oracle(rule, widths=widths, steps=3, seeds=3)
seconds = time.perf_counter() - start
slopes = {f"{role}/{s['name']}/{c['quantity']}": c["slope"] for role, r in report.to_json()["roles"].items()
          for s in r["scenarios"] for c in s["checks"]}
print(json.dumps({"seconds": seconds, "passed": report.passed, "native_bf16": native_bf16(),
                  "float32_gemm": choice(), "threads": torch.get_num_threads(), "slopes": slopes}))
"""


def measure(rule: str, widths: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, rule, widths], capture_output=True, text=True,
                          env=os.environ | env, check=False)
    if proc.returncode != 0:
        sys.exit(f"oracle {rule} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", default="native,no-bf16", help="comma-separated CPU modes: native, no-bf16")
    parser.add_argument("--widths", default="64,128,256,512,1024", help="the oracle's widths (default: the CLI's)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time Muon with the native bfloat16 kernels forced (slow without bf16 units)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    modes = [m.strip() for m in args.cpu.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in CPU_MODES]:
        parser.error(f"--cpu: unknown mode(s) {', '.join(unknown)}; expected {', '.join(CPU_MODES)}")
    out: dict[str, dict] = {}
    for mode in modes:
        env = CPU_MODES[mode]
        muon = measure("muon", args.widths, env)
        adamw = measure("adamw", args.widths, env)
        row = {"muon": muon, "adamw": adamw}
        kernels = "float32 GEMMs for bfloat16" if muon["float32_gemm"] else "native bfloat16 GEMMs"
        print(f"[{mode}: native bf16 {'yes' if muon['native_bf16'] else 'no'}, {muon['threads']} threads; "
              f"Muon's Newton-Schulz through {kernels}]")
        print(f"  oracle muon  {muon['seconds']:7.1f} s  {'PASS' if muon['passed'] else 'FAIL'}  ratio to the "
              f"{TARGET_S:.0f} s target {muon['seconds'] / TARGET_S:.2f} "
              f"({'meets' if muon['seconds'] <= TARGET_S else 'MISSES'} it)")
        print(f"  oracle adamw {adamw['seconds']:7.1f} s  {'PASS' if adamw['passed'] else 'FAIL'}  (reference); "
              f"muon / adamw = {muon['seconds'] / adamw['seconds']:.2f}")
        if args.baseline:
            before = measure("muon", args.widths, env | {"MUPDERIVE_BF16_GEMM": "native"})
            shared = muon["slopes"].keys() & before["slopes"].keys()
            worst = max(abs(muon["slopes"][k] - before["slopes"][k]) for k in shared)
            print(f"  baseline (native bf16 kernels forced) {before['seconds']:7.1f} s "
                  f"{'PASS' if before['passed'] else 'FAIL'}: {before['seconds'] / muon['seconds']:.1f}x slower; "
                  f"{len(shared)} checks, largest slope difference {worst:.4f}")
            row["baseline"] = before
            row["max_slope_difference"] = worst
        out[mode] = row
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"target_s": TARGET_S, "widths": args.widths, "modes": out}, fh, indent=2)


if __name__ == "__main__":
    main()
