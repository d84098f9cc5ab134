#!/usr/bin/env python3
"""Two vmm-demo builds side by side on the pre-copy benchmark rows.

    scripts/bench-compare.py OLD_BIN NEW_BIN [RUNS] [MEM]     (defaults: 7, 256M)
    ROWS=busy scripts/bench-compare.py ...                    (only rows whose name has "busy")

Runs each row of scripts/bench-precopy.sh (without the oracle checks, so that the
downtime is the engine's pause in every build) with the two binaries in turn, A B A B ...,
so that drift of the machine's speed during the run hits both alike, and prints the
median, min and max of the total time, the downtime and the throughput of each.
"""
import json
import os
import statistics
import subprocess
import sys

ROWS = [
    ("kvm-idle-zero", ["--guest", "kvm", "--fill", "zero", "--working-set", "0"]),
    ("kvm-idle-random", ["--guest", "kvm", "--fill", "random", "--working-set", "0"]),
    ("sw-idle-random", ["--guest", "software", "--fill", "random", "--working-set", "0"]),
    ("kvm-busy-16M", ["--guest", "kvm", "--fill", "random", "--working-set", "16M"]),
    ("kvm-busy-16M-zstd-delta", ["--guest", "kvm", "--fill", "random", "--working-set", "16M",
                                 "--zstd", "--delta-cache", "64M"]),
]


def run(binary, mem, args):
    cmd = [binary, "demo", "--json", "--mem", mem, "--no-hash-check",
           "--run-before", "300ms", "--run-after", "300ms"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    try:
        v = json.loads(out.stdout)
    except json.JSONDecodeError:
        return None
    if v.get("error") or not v.get("verified"):
        print(f"  {binary}: {v.get('error')}", file=sys.stderr)
        return None
    # Both builds report the engine's pause as downtime_without_checks_ms.
    return (v["total_ms"], v["downtime_without_checks_ms"], v["throughput_mb_s"])


def fmt(xs, unit):
    if not xs:
        return "no run"
    return f"{statistics.median(xs):8.1f} {unit} [{min(xs):.1f}-{max(xs):.1f}]"


def main():
    old, new = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    mem = sys.argv[4] if len(sys.argv) > 4 else "256M"
    print(f"# {runs} runs each, alternating; A = {old}, B = {new}; {mem} guest, no oracle checks")
    only = os.environ.get("ROWS", "")
    for name, args in ROWS:
        if only not in name:
            continue
        got = {old: [], new: []}
        for _ in range(runs):
            for b in (old, new):
                r = run(b, mem, args)
                if r:
                    got[b].append(r)
        for label, b in (("A", old), ("B", new)):
            rs = got[b]
            print(f"{name:<26} {label}  total {fmt([r[0] for r in rs], 'ms')}"
                  f"  downtime {fmt([r[1] for r in rs], 'ms')}"
                  f"  {fmt([r[2] for r in rs], 'MB/s')}  ({len(rs)} runs)")


if __name__ == "__main__":
    main()
