#!/usr/bin/env python3
"""Our post-copy next to QEMU's, in one run: the issue-10 benchmark.

    scripts/bench-postcopy.py [--reps N] [--mem 256M] [--no-qemu] [--json OUT]

In this order, all on loopback, one thing at a time (2 cores):
  1. the loopback round trip of a 16 B request and a 4 KiB reply (scripts/rtt.py);
  2. QEMU post-copy and post-copy-preempt on its scatter guest (benches/qemu/compare.py
     --workloads postcopy,postcopy-preempt), unless --no-qemu;
  3. ours, `vmm-demo demo --postcopy` of a KVM guest whose vCPU touches pseudo-random pages
     of all of its RAM (random fill, working set = RAM above its first MiB, scattered order): fault latency
     p50/p99/max, requests, vCPU blocktime, total time;
  4. ours, pure post-copy against pre-copy of the same idle guest (random RAM, halted vCPU);
  5. ours, time to recover: `run` / `destination` / `migrate --postcopy` through a proxy
     in this script that cuts every connection once a third of RAM went through.

Prints medians [min-max] per row. Needs a release build of vmm-demo
(`cargo build --release -p vmm-demo`) and, for QEMU, benches/qemu/setup.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "vmm-demo"


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def demo(args: list[str], timeout=300) -> dict:
    out = subprocess.run([str(BIN), "demo", "--json", *args], capture_output=True, text=True,
                         timeout=timeout)
    try:
        v = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"vmm-demo demo printed no report: {out.stderr[-2000:]}")
    if not v.get("verified"):
        raise SystemExit(f"vmm-demo demo {' '.join(args)}: not verified: {v.get('error')}")
    return v


def rtt(count: int) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "rtt.py"), "--count", str(count), "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def data_pages(mem: str) -> str:
    """The working set that covers all of RAM above the guest's first MiB (its program)."""
    return f"{(parse_size(mem) >> 20) - 1}M"


def ours_touching(mem: str) -> dict:
    v = demo(["--guest", "kvm", "--mem", mem, "--fill", "random", "--working-set", data_pages(mem), "--order",
              "scattered",
              "--postcopy", "--no-hash-check", "--run-before", "500ms", "--run-after", "500ms"])
    p = v["destination"]["postcopy"]
    return {
        "total_ms": v["total_ms"],
        "fault_p50_us": p["fault_latency"]["p50_us"],
        "fault_p99_us": p["fault_latency"]["p99_us"],
        "fault_max_us": p["fault_latency"]["max_us"],
        "faults": p["faults"],
        "requests": p["requests"],
        "pages_requested": p["pages"]["requested"],
        "blocktime_vcpus_ms": sum(p["blocktime"]["vcpus_ms"]),
        "postcopy_ms": p["postcopy_ms"],
        "downtime_ms": v["downtime_ms"],
    }


def ours_idle(mem: str, postcopy: bool) -> float:
    a = ["--guest", "kvm", "--mem", mem, "--fill", "random", "--working-set", "0", "--no-hash-check",
         "--run-before", "300ms", "--run-after", "300ms"]
    if postcopy:
        a.append("--postcopy")
    return demo(a)["total_ms"]


class CuttingProxy:
    """Forwards TCP connections to `upstream`; once `cut_after` bytes went towards it, shuts
    every open connection down, once, and forwards new ones as before."""

    def __init__(self, upstream: tuple[str, int], cut_after: int):
        self.upstream, self.cut_after = upstream, cut_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.up_bytes, self.cut, self.open = 0, False, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.open += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, a, b, up):
        while True:
            try:
                data = a.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            cut_now = False
            if up:
                with self.lock:
                    self.up_bytes += len(data)
                    if not self.cut and self.up_bytes >= self.cut_after:
                        self.cut = cut_now = True
            if cut_now:
                with self.lock:
                    for s in self.open:
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    self.open = []
                break
            try:
                b.sendall(data)
            except OSError:
                break
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def ours_recovery(mem: str) -> float | None:
    """One post-copy through a cutting proxy: the source's recovery time, ms."""
    with tempfile.TemporaryDirectory() as d:
        ctl = Path(d) / "control.sock"
        procs = []
        try:
            dst = subprocess.Popen([str(BIN), "destination", "--listen", "tcp:127.0.0.1:0", "--json", "--quiet",
                                    "--run-for", "300ms", "--recovery-window", "30s"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(dst)
            addr = None
            while addr is None:
                line = dst.stderr.readline()
                if not line:
                    raise SystemExit("the destination exited before listening")
                if line.startswith("vmm-demo destination: listening on "):
                    addr = line.strip().rsplit(" ", 1)[1]
            threading.Thread(target=dst.stderr.read, daemon=True).start()
            host, port = addr.removeprefix("tcp:").rsplit(":", 1)
            proxy = CuttingProxy((host, int(port)), parse_size(mem) // 3)
            src = subprocess.Popen([str(BIN), "run", "--json", "--quiet", "--control", f"unix:{ctl}", "--guest",
                                    "kvm", "--mem", mem, "--fill", "random", "--working-set", data_pages(mem), "--order",
                                    "scattered"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(src)
            deadline = time.monotonic() + 30
            while not ctl.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the source's control socket did not appear")
                time.sleep(0.05)
            time.sleep(0.5)
            mig = subprocess.run([str(BIN), "migrate", "--control", f"unix:{ctl}", "--to",
                                  f"tcp:127.0.0.1:{proxy.port}", "--postcopy", "--recovery-window", "30s", "--json"],
                                 capture_output=True, text=True, timeout=120)
            proxy.close()
            v = json.loads(mig.stdout)
            if not proxy.cut:
                raise SystemExit("the proxy never cut")
            rec = (v.get("postcopy") or {}).get("recoveries") or []
            if mig.returncode != 0 or not rec:
                raise SystemExit(f"no recovery: {mig.stdout[-1000:]} {mig.stderr[-1000:]}")
            out, _ = dst.communicate(timeout=60)
            dv = json.loads(out)
            if not dv.get("verified"):
                raise SystemExit(f"destination not verified after the recovery: {dv.get('error')}")
            src.communicate(timeout=60)
            return sum(r["ms"] for r in rec)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main():
    global BIN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem", default="256M")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bin", type=Path, default=BIN, help="the vmm-demo binary (another build, to compare)")
    a = ap.parse_args()
    BIN = a.bin
    if not BIN.exists():
        raise SystemExit(f"{BIN} is missing: cargo build --release -p vmm-demo")
    report: dict = {}
    r = rtt(20000)
    report["rtt"] = r
    print(f"loopback round trip (Python, 16 B / 4 KiB): p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us",
          flush=True)
    if not a.no_qemu:
        qjson = Path(tempfile.mkstemp(suffix=".json")[1])
        subprocess.run([sys.executable, str(ROOT / "benches" / "qemu" / "compare.py"), "--workloads",
                        "postcopy,postcopy-preempt", "--reps", str(a.reps), "--mem-mib",
                        str(parse_size(a.mem) >> 20), "--no-iperf3", "--loopback-rounds", "0",
                        "--json", str(qjson)], check=True, stdout=sys.stderr)
        report["qemu"] = json.loads(qjson.read_text())
        qjson.unlink()
        for w, q in report["qemu"]["summary"].items():
            def f(key):
                v = q[key]
                return "n/a" if v["median"] is None else f"{v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]"
            print(f"QEMU {w}, {q['runs']} runs: total {f('total_ms')} ms, requests {f('postcopy_requests')}, "
                  f"vCPU blocktime {f('vcpu_blocktime_ms')} ms, per request {f('blocktime_per_request_us')} us",
                  flush=True)
    touching = [ours_touching(a.mem) for _ in range(a.reps)]
    report["ours_touching"] = touching
    print(f"ours, {a.mem} guest touching random pages, {a.reps} runs:")
    for k in touching[0]:
        print(f"  {k}: {med([t[k] for t in touching])}")
    idle_post, idle_pre = [], []
    for _ in range(a.reps):
        idle_pre.append(ours_idle(a.mem, False))
        idle_post.append(ours_idle(a.mem, True))
    report["ours_idle"] = {"precopy_ms": idle_pre, "postcopy_ms": idle_post}
    print(f"ours, idle {a.mem}: pre-copy {med(idle_pre)} ms, pure post-copy {med(idle_post)} ms, ratio "
          f"{statistics.median(idle_post) / statistics.median(idle_pre):.2f}")
    rec = [ours_recovery(a.mem) for _ in range(a.reps)]
    report["ours_recovery_ms"] = rec
    print(f"ours, time to recover after a cut at a third of RAM: {med(rec)} ms")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
