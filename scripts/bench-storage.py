#!/usr/bin/env python3
"""Storage migration of the demo VM (--copy-storage-all), measured end to end.

A 256 MiB guest (zero RAM but for its working set) with a 1 GiB disk, half written
(`--disk-prefill 50`: every other 1 MiB piece holds a seeded pattern, the rest are holes),
idle (no RAM or disk writes) and writing (a 16 MiB RAM working set and 256 disk sectors
each pass), by pre-copy and by pure post-copy: total time (mirror + RAM migration, without the oracle's checks in the pause),
mirror time to ready, the guest's pause (the engine's, without the checks), bytes on the
wire for RAM, bytes the mirror sent as data for the disk (and ranges it zeroed, which
travel as a request each). Rounds are interleaved, after one run not counted (see main);
medians and ranges are printed as a Markdown table. Every run must come back verified (RAM and disk oracles on the
destination, the disk's hash at a pre-copy switch), or the script stops.

With --qemu, QEMU's own storage migration (benches/qemu/compare.py, workloads
storage-idle and storage-writing: a TCG guest, blockdev-mirror into the destination's NBD
export, then migrate, as libvirt drives it) runs in the same rounds, between ours, on a
disk of the same size and fill.

The images live in --dir (default /dev/shm), so that the host's disk does not hide the
copiers' own cost; both processes of a run are on this host.

Usage: scripts/bench-storage.py [--reps N] [--bin PATH] [--dir DIR] [--sparse] [--qemu]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# RAM outside the working set is zero, as in QEMU's boot-sector guests, so that both move
# the same RAM.
WRITING = ["--fill", "zero", "--working-set", "16M", "--disk-working-set", "256"]
IDLE = ["--fill", "zero", "--working-set", "0"]
CASES = [
    ("idle, pre-copy", IDLE, "storage-idle"),
    ("idle, post-copy", IDLE + ["--postcopy"], None),
    ("writing, pre-copy", WRITING, "storage-writing"),
    ("writing, post-copy", WRITING + ["--postcopy"], None),
]


def run(binary, extra, prefill, tmpdir):
    args = [binary, "demo", "--mem", "256M", "--disk-size", "1G", "--disk-prefill",
            str(prefill), "--copy-storage-all", "--json"] + extra
    env = dict(os.environ, TMPDIR=tmpdir)
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    d = json.loads(out.stdout)
    if not d.get("verified"):
        raise SystemExit(f"not verified: {d.get('error')}\n{out.stderr[-2000:]}")
    s = d["storage"]
    pause = d["downtime_without_checks_ms"]
    checks = max(0.0, d["paused_with_checks_ms"] - pause)
    return {
        "total_ms": d["total_ms"] - checks + s["mirror_ms"],
        "mirror_ms": s["mirror_ms"],
        "pause_ms": pause,
        "ram_bytes": d["bytes_on_wire"],
        "disk_bytes": s["bytes_copied"],
        "zeroed_bytes": s["bytes_zeroed"],
    }


def run_qemu(workload, tmpdir):
    """One run of QEMU's storage migration; None (and why, on stderr) if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=tmpdir) as f:
        cmd = [sys.executable, str(ROOT / "benches/qemu/compare.py"), "--workloads", workload,
               "--reps", "1", "--no-loopback", "--json", f.name]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(f"qemu {workload}: exit {out.returncode}\n{out.stderr[-2000:]}", file=sys.stderr)
            return None
        with open(f.name) as j:
            v = json.load(j)
    runs = [r for r in v.get("runs", []) if r.get("workload") == workload]
    if not runs or not runs[0].get("ok") or not runs[0].get("verified", True):
        print(f"qemu {workload}: no verified run: {runs[:1]}", file=sys.stderr)
        return None
    r = runs[0]
    return {
        "total_ms": r["total_ms"],
        "mirror_ms": r["mirror_ms"],
        # The guest's pause (source STOP to destination RESUME, the harness's checks
        # taken out), the figure ours reports; QEMU's own `downtime` is beside it.
        "pause_ms": r["pause_ms"],
        "qemu_downtime_ms": r["downtime_ms"],
        "ram_bytes": r["ram_transferred"],
        # TCP bytes of the NBD connection, both ways (ours counts payload alone; NBD's
        # headers add 44 bytes per 256 KiB request).
        "disk_bytes": r["disk_wire_bytes"],
        "zeroed_bytes": None,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bin", default=str(ROOT / "target/release/vmm-demo"))
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--sparse", action="store_true", help="a sparse disk (no prefill)")
    p.add_argument("--qemu", action="store_true", help="QEMU's storage migration in the same rounds")
    a = p.parse_args()
    prefill = 0 if a.sparse else 50
    rows = [(name, extra) for name, extra, _ in CASES]
    if a.qemu:
        rows += [(f"QEMU: {name}", None) for name, _, q in CASES if q]
    res = {name: [] for name, _ in rows}
    # The first images made in a fresh tmpfs after the page cache filled cost several
    # times what later ones do (the kernel reclaims memory for them: seen as a 2.5 s first
    # mirror, ours and QEMU's alike): one run, not counted, takes that cost.
    run(a.bin, CASES[0][1], prefill, a.dir)
    for rep in range(a.reps):
        for name, extra, q in CASES:
            res[name].append(run(a.bin, extra, prefill, a.dir))
            if a.qemu and q:
                r = run_qemu(q, a.dir)
                if r:
                    res[f"QEMU: {name}"].append(r)
        print(f"round {rep + 1} of {a.reps} done", file=sys.stderr)
    disk = "sparse" if a.sparse else f"{prefill} % prefilled"
    print(f"256 MiB guest, 1 GiB disk ({disk}), {a.reps} rounds, images in {a.dir}")
    print()
    print("| case | total ms | mirror ms | pause ms | RAM bytes | disk bytes | disk zeroed bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rs in res.items():
        def col(k, fmt="{:.1f}"):
            v = [r[k] for r in rs if r.get(k) is not None]
            if not v:
                return "—"
            return (fmt + " [" + fmt + "–" + fmt + "]").format(statistics.median(v), min(v), max(v))
        if not rs:
            print(f"| {name} | no verified run | | | | | |")
            continue
        print(f"| {name} | {col('total_ms')} | {col('mirror_ms')} | {col('pause_ms')} | "
              f"{col('ram_bytes', '{:.0f}')} | {col('disk_bytes', '{:.0f}')} | "
              f"{col('zeroed_bytes', '{:.0f}')} |")
    q = [r["qemu_downtime_ms"] for name, rs in res.items() for r in rs if "qemu_downtime_ms" in r]
    if q:
        print()
        print(f"QEMU's own `downtime` figure: median {statistics.median(q):.1f} ms [{min(q):.1f}–{max(q):.1f}]")


if __name__ == "__main__":
    main()
