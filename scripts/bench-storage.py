#!/usr/bin/env python3
"""Storage migration of the demo VM (--copy-storage-all), measured end to end.

A 256 MiB guest with a 1 GiB sparse disk, idle (no RAM or disk writes) and writing (its
RAM working set and its disk working set each pass), by pre-copy and by pure post-copy:
total time, mirror time, the guest's pause, bytes on the wire for RAM, bytes copied for
the disk. Rounds are interleaved; medians and ranges are printed as a Markdown table.

Usage: scripts/bench-storage.py [--reps N] [--bin PATH]
"""
import argparse
import json
import statistics
import subprocess

CASES = [
    ("idle, pre-copy", ["--working-set", "0"]),
    ("idle, post-copy", ["--working-set", "0", "--postcopy"]),
    ("writing, pre-copy", ["--working-set", "16M", "--disk-working-set", "256"]),
    ("writing, post-copy", ["--working-set", "16M", "--disk-working-set", "256", "--postcopy"]),
]


def run(binary, extra):
    args = [binary, "demo", "--mem", "256M", "--disk-size", "1G", "--copy-storage-all",
            "--json"] + extra
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    d = json.loads(out.stdout)
    if not d.get("verified"):
        raise SystemExit(f"not verified: {d.get('error')}")
    s = d["storage"]
    return {
        "total_ms": d["total_ms"] + s["mirror_ms"],
        "mirror_ms": s["mirror_ms"],
        "pause_ms": d.get("downtime_ms") or 0.0,
        "ram_bytes": d["bytes_on_wire"],
        "disk_bytes": s["bytes_copied"] + s["bytes_zeroed"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bin", default="target/release/vmm-demo")
    a = p.parse_args()
    res = {name: [] for name, _ in CASES}
    for _ in range(a.reps):
        for name, extra in CASES:
            res[name].append(run(a.bin, extra))
    print("| case | total ms | mirror ms | pause ms | RAM bytes | disk bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rs in res.items():
        def col(k, fmt="{:.1f}"):
            v = [r[k] for r in rs]
            return (fmt + " [" + fmt + "–" + fmt + "]").format(statistics.median(v), min(v), max(v))
        print(f"| {name} | {col('total_ms')} | {col('mirror_ms')} | {col('pause_ms')} | "
              f"{col('ram_bytes', '{:.0f}')} | {col('disk_bytes', '{:.0f}')} |")


if __name__ == "__main__":
    main()
