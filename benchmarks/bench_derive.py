"""Derivation speed: every built-in rule derived in one process, after import (target: at most 0.5 s in total).

Each repetition runs in a fresh interpreter (the engine memoizes evaluations inside a process, so repeating in one
process would time cache hits). Reported: the total per run (median over runs), the median per rule, and the ratio
to the target; as a machine-independent reference measured in the same runs, the time to parse and check the same
rule files (``load_rule``), with the ratio derive / parse.

    python benchmarks/bench_derive.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TARGET_S = 0.5

CHILD = r"""
import json, time
from mupderive import builtin_rule_names, derive, load_rule
names = builtin_rule_names()
t0 = time.perf_counter()
rules = [load_rule(n) for n in names]
parse = time.perf_counter() - t0
per_rule = {}
t0 = time.perf_counter()
for rule in rules:
    t1 = time.perf_counter()
    derive(rule)
    per_rule[rule.name] = time.perf_counter() - t1
total = time.perf_counter() - t0
print(json.dumps({"parse": parse, "total": total, "per_rule": per_rule}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                      text=True).stdout) for _ in range(args.runs)]
    total = statistics.median(r["total"] for r in runs)
    parse = statistics.median(r["parse"] for r in runs)
    per_rule = {name: statistics.median(r["per_rule"][name] for r in runs) for name in runs[0]["per_rule"]}
    print(f"derive all {len(per_rule)} built-in rules: {total * 1000:.0f} ms (median of {args.runs} fresh "
          f"processes); target {TARGET_S * 1000:.0f} ms -> ratio {total / TARGET_S:.2f} "
          f"({'meets' if total <= TARGET_S else 'MISSES'} the target)")
    print(f"reference: parse+check the same files {parse * 1000:.0f} ms; derive/parse = {total / parse:.1f}")
    print(f"median per rule: {statistics.median(per_rule.values()) * 1000:.1f} ms")
    for name, seconds in sorted(per_rule.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<12} {seconds * 1000:7.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"total_s": total, "target_s": TARGET_S, "ratio_to_target": total / TARGET_S,
                       "parse_s": parse, "per_rule_s": per_rule, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
