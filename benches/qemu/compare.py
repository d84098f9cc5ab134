#!/usr/bin/env python3
"""QEMU's pre-copy migration of a 256 MiB guest over loopback, next to the loopback TCP limit.

The reference half of the issue-3 benchmark: the same three workloads our vmm-demo migrates
(idle, random content, busy writer), run by Debian's qemu-system-x86_64 under TCG, migrated
from one QEMU process to another over 127.0.0.1 on a single channel with no compression and
max-bandwidth raised out of the way. The loopback TCP limit is measured in the same run, by a
Python sender/receiver pair and, when installed, iperf3.

Every guest is the 512-byte boot sector in bootblock.s (assembled here with binutils), so no
image is downloaded. The harness waits on what the guest prints on its serial port, never on
a sleep, and checks the outcome:
  idle, random  the destination runs, and RAM above 1 MiB hashes the same on both sides;
  busy          the destination keeps printing passes, its counters are N+1...N+1 N...N
                (one walk in progress), and the passes it reports continue the source's.

Only processes this script starts are ended, by their PID, always (try/finally).

Run: bash benches/qemu/setup.sh && python3 benches/qemu/compare.py --json qemu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
PAGE = 4096
FILL_START = 1 * MIB  # the guest fills and walks RAM from 1 MiB up
MODES = {"idle": 0, "random": 1, "busy": 2}


class BenchError(Exception):
    """A run that could not be measured; the message says which step failed."""


# --------------------------------------------------------------------------------------------
# Guest image


def build_bootblock(workdir: Path) -> bytes:
    """Assembles bootblock.s with GNU as/ld into the 512-byte boot sector."""
    obj = workdir / "bootblock.o"
    binary = workdir / "bootblock.bin"
    for cmd in (
        ["as", "--32", "-o", str(obj), str(HERE / "bootblock.s")],
        ["ld", "-m", "elf_i386", "-Ttext=0x7c00", "--oformat", "binary", "-o", str(binary), str(obj)],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.strip()}")
    data = binary.read_bytes()
    if len(data) != 512 or data[510:] != b"\x55\xaa":
        raise BenchError(f"bootblock.bin is {len(data)} bytes without a boot signature where 512 with one were expected")
    return data


def patch_params(block: bytes, mode: int, busy_fill: bool, report_shift: int, ram_end: int,
                 ws_bytes: int, seed: int) -> bytes:
    """Writes the workload parameters into the block after its "QMB1" magic (see bootblock.s)."""
    at = block.find(b"QMB1")
    if at < 0 or block.find(b"QMB1", at + 1) >= 0:
        raise BenchError("bootblock.bin must hold exactly one QMB1 parameter block")
    out = bytearray(block)
    struct.pack_into("<BBBBIII", out, at + 4, mode, int(busy_fill), report_shift, 0, ram_end,
                     ws_bytes, seed)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A minimal QMP client over a unix socket: one command at a time, events kept aside."""

    def __init__(self, path: Path, deadline: float, proc: subprocess.Popen):
        self.events: list[dict] = []
        self._next_id = 0
        while True:
            if proc.poll() is not None:
                raise BenchError(f"QEMU exited ({proc.returncode}) before its QMP socket {path} accepted")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise BenchError(f"QMP socket {path} did not accept within the deadline")
                time.sleep(0.02)
        sock.settimeout(30)
        self._sock = sock
        self._file = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"QMP greeting expected on {path}, got {greeting!r}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise BenchError("QMP connection closed by QEMU")
        return json.loads(line)

    def cmd(self, name: str, **arguments) -> object:
        self._next_id += 1
        msg = {"execute": name, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                raise BenchError(f"QMP {name} {arguments}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Processes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) of a live process, from /proc/PID/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0])
    except FileNotFoundError:
        pass
    return out


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat (busy: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest time is in user)
    return total - vals[3] - vals[4], total


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (FileNotFoundError, IndexError, ValueError):
        return float("nan"), float("nan")


class Started:
    """Processes this script started; stop() ends each by its PID, and only those."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL to this PID only
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, cond, deadline: float, procs=(), interval: float = 0.02):
    """Polls cond() until it returns something truthy; fails at the deadline or if a process died."""
    while True:
        got = cond()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.pid} exited ({p.returncode}) while waiting")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not reached within the deadline")
        time.sleep(interval)


def serial_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------
# Loopback TCP limit


def loopback_receiver(nbytes: int) -> None:
    """Child side of the Python loopback measure: prints its port, reads nbytes, acks."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    srv.settimeout(60)
    conn, _ = srv.accept()
    conn.settimeout(60)
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = conn.recv_into(view, min(len(buf), nbytes - got))
        if n == 0:
            sys.exit(f"loopback receiver: connection closed after {got} of {nbytes} bytes")
        got += n
    conn.sendall(b"k")
    conn.close()


def measure_loopback_python(nbytes: int, started: Started, workdir: Path) -> dict:
    """One TCP stream over 127.0.0.1, sender here and receiver in a second process (own core)."""
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--loopback-receiver", str(nbytes)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    started.procs.append(child)
    line = child.stdout.readline()
    if not line.strip().isdigit():
        raise BenchError(f"loopback receiver did not print its port (got {line!r})")
    port = int(line)
    payload = os.urandom(4 * MIB)
    view = memoryview(payload)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(len(payload), nbytes - sent)
            s.sendall(view[:n])
            sent += n
        if s.recv(1) != b"k":
            raise BenchError("loopback receiver did not acknowledge every byte")
        elapsed = time.perf_counter() - t0
    child.wait(timeout=30)
    if child.returncode != 0:
        raise BenchError(f"loopback receiver exited {child.returncode}")
    return {"tool": "python", "bytes": nbytes, "seconds": elapsed, "mib_per_s": nbytes / elapsed / MIB}


def port_listening(port: int) -> bool:
    """True once a socket listens on 127.0.0.1:port (state 0A in /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])
    except FileNotFoundError:
        return False


def measure_loopback_iperf3(nbytes: int, started: Started, workdir: Path) -> dict | None:
    iperf = shutil.which("iperf3")
    if iperf is None:
        return None
    port = free_port()
    server = started.popen([iperf, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)], workdir / "iperf3-server.log")
    wait_for("iperf3 server listening", lambda: port_listening(port), time.monotonic() + 10, [server])
    # -l 1M: iperf3's default 128 KiB writes cost it about half the loopback rate here.
    res = subprocess.run([iperf, "-c", "127.0.0.1", "-p", str(port), "-n", str(nbytes), "-l", "1M", "-J"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise BenchError(f"iperf3 client failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")
    report = json.loads(res.stdout)
    recv = report["end"]["sum_received"]
    server.wait(timeout=10)
    return {"tool": "iperf3", "bytes": int(recv["bytes"]), "seconds": float(recv["seconds"]),
            "mib_per_s": float(recv["bits_per_second"]) / 8 / MIB}


# --------------------------------------------------------------------------------------------
# One migration


def qemu_cmd(qemu: str, mem_mib: int, image: Path, serial: Path, qmp: Path, incoming: bool,
             prealloc: bool = False) -> list[str]:
    cmd = [qemu, "-accel", "tcg", "-machine", "pc", "-m", str(mem_mib), "-smp", "1",
           "-nodefaults", "-vga", "none", "-display", "none", "-monitor", "none",
           "-serial", f"file:{serial}",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-drive", f"file={image},format=raw,if=ide"]
    if incoming:
        cmd += ["-incoming", "defer"]
    if prealloc:
        cmd += ["-mem-prealloc"]  # touch all guest RAM at start-up, before any migration
    return cmd


CAPS_OFF = ["xbzrle", "compress", "multifd", "auto-converge", "postcopy-ram", "zero-blocks", "release-ram"]


def set_migration_options(qmp: Qmp, max_bandwidth: int, downtime_ms: int) -> None:
    # Only what this QEMU has: `compress` went in 9.1, and setup.sh may install 10.x.
    known = {c["capability"] for c in qmp.cmd("query-migrate-capabilities")}
    caps = [{"capability": c, "state": False} for c in CAPS_OFF if c in known]
    caps.append({"capability": "events", "state": True})
    qmp.cmd("migrate-set-capabilities", capabilities=caps)
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth, "downtime-limit": downtime_ms})


def ram_hash(qmp: Qmp, start: int, size: int, path: Path) -> tuple[str, int]:
    """SHA-256 of guest-physical [start, start+size) via pmemsave, and how many pages are zero."""
    qmp.cmd("pmemsave", val=start, size=size, filename=str(path))
    data = path.read_bytes()
    path.unlink()
    if len(data) != size:
        raise BenchError(f"pmemsave wrote {len(data)} bytes where {size} were asked")
    zero = bytes(PAGE)
    zero_pages = sum(1 for off in range(0, size, PAGE) if data[off:off + PAGE] == zero)
    return hashlib.sha256(data).hexdigest(), zero_pages


def check_counters(data: bytes, ws_bytes: int) -> tuple[bool, int, str]:
    """Busy oracle: counters read N+1 up to some page and N from there, nothing else."""
    counters = [struct.unpack_from("<I", data, off)[0] for off in range(0, ws_bytes, PAGE)]
    hi, lo = counters[0], counters[-1]
    if hi - lo not in (0, 1):
        return False, lo, f"first page {hi}, last page {lo}: more than one pass apart"
    step = next((i for i, c in enumerate(counters) if c != hi), len(counters))
    if any(c != lo for c in counters[step:]) or any(c != hi for c in counters[:step]):
        return False, lo, f"counters not of the form N+1..N+1 N..N (first break at page {step})"
    return True, lo, f"{step} pages at {hi}, {len(counters) - step} at {lo}"


def run_one(args, workload: str, rep: int, block: bytes, workdir: Path) -> dict:
    mem = args.mem_mib * MIB
    run_dir = workdir / f"{workload}-{rep}"
    run_dir.mkdir()
    shift = args.report_shift
    image = patch_params(block, MODES[workload], args.busy_fill == "random", shift, mem, args.busy_ws_mib * MIB,
                         args.seed + rep)
    src_img, dst_img = run_dir / "src.img", run_dir / "dst.img"
    for img in (src_img, dst_img):
        img.write_bytes(image + bytes(64 * 1024 - len(image)))  # a small raw disk; the guest never reads it
    src_ser, dst_ser = run_dir / "src-serial.txt", run_dir / "dst-serial.txt"
    src_qmp_path, dst_qmp_path = run_dir / "src.qmp", run_dir / "dst.qmp"

    started = Started()
    result: dict = {"workload": workload, "rep": rep, "ok": False}
    src_qmp = dst_qmp = None
    try:
        deadline = time.monotonic() + 30
        dst = started.popen(qemu_cmd(args.qemu, args.mem_mib, dst_img, dst_ser, dst_qmp_path, True, args.dst_prealloc),
                            run_dir / "dst.log")
        src = started.popen(qemu_cmd(args.qemu, args.mem_mib, src_img, src_ser, src_qmp_path, False), run_dir / "src.log")
        dst_qmp = Qmp(dst_qmp_path, deadline, dst)
        src_qmp = Qmp(src_qmp_path, deadline, src)
        procs = [src, dst]

        # The guest is ready when it says so on its serial port.
        if workload == "busy":
            start_marker = "F" if args.busy_fill == "random" else "A"

            def ready():
                # a few pass reports after the fill: the walk is under way
                text = serial_text(src_ser)
                return start_marker in text and text.split(start_marker, 1)[1].count("B") >= 3
        else:
            def ready():
                return "H" in serial_text(src_ser)
        t_boot = time.monotonic()
        wait_for(f"{workload} guest ready on serial", ready, time.monotonic() + args.ready_timeout, procs)
        result["guest_ready_s"] = round(time.monotonic() - t_boot, 3)

        set_migration_options(dst_qmp, args.max_bandwidth, args.downtime_limit)
        set_migration_options(src_qmp, args.max_bandwidth, args.downtime_limit)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst_qmp.cmd("migrate-incoming", uri=uri)
        wait_for("destination listening", lambda: port_listening(port), time.monotonic() + 10, procs)

        rss_before = {"src": proc_status(src.pid), "dst": proc_status(dst.pid)}
        cpu_before = {"src": proc_cpu_seconds(src.pid), "dst": proc_cpu_seconds(dst.pid)}
        machine_before = machine_cpu_ticks()
        t0 = time.monotonic()
        src_qmp.cmd("migrate", uri=uri)
        mig_deadline = t0 + args.migration_timeout
        statuses = []
        while True:
            info = src_qmp.cmd("query-migrate")
            status = info.get("status")
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            if status in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > mig_deadline:
                src_qmp.cmd("migrate_cancel")
                raise BenchError(f"migration not completed after {args.migration_timeout} s (status {status}, "
                                 f"ram {info.get('ram')})")
            time.sleep(args.poll_interval)
        wall = time.monotonic() - t0
        machine_after = machine_cpu_ticks()
        if status != "completed":
            raise BenchError(f"migration {status}: {info.get('error-desc', info)}")
        # QEMU's migration thread sets "completed" before it fills in total-time and downtime
        # (under the iothread lock, a moment later): a query in between reads zeros.
        info = wait_for("completed migration's statistics",
                        lambda: (i := src_qmp.cmd("query-migrate")).get("total-time", 0) > 0 and i,
                        time.monotonic() + 10, procs)
        dst_status = wait_for("destination running",
                              lambda: (s := dst_qmp.cmd("query-status")).get("status") == "running" and s,
                              time.monotonic() + 20, procs)
        # Peak memory before the verification below reads guest RAM back.
        rss_after = {"src": proc_status(src.pid), "dst": proc_status(dst.pid)}
        cpu_after = {"src": proc_cpu_seconds(src.pid), "dst": proc_cpu_seconds(dst.pid)}

        # CPU the rest of the machine (other users of the shared cores) took while we migrated:
        # busy time of all CPUs minus what both QEMU processes used, over the cores available.
        tick = os.sysconf("SC_CLK_TCK")
        busy = (machine_after[0] - machine_before[0]) / tick
        window = (machine_after[1] - machine_before[1]) / tick
        ours = sum(cpu_after[k][i] - cpu_before[k][i] for k in ("src", "dst") for i in (0, 1))
        others_pct = round(100 * max(0.0, busy - ours) / window, 1) if window > 0 else None

        ram = info.get("ram", {})
        transfer_ms = info["total-time"] - info.get("setup-time", 0)
        result.update({
            "statuses": statuses,
            "wall_s": round(wall, 3),
            "total_ms": info["total-time"],
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "ram_transferred": ram.get("transferred"),
            "ram_total": ram.get("total"),
            "pages_normal": ram.get("normal"),
            "pages_duplicate_zero": ram.get("duplicate"),
            "normal_bytes": ram.get("normal-bytes"),
            "precopy_bytes": ram.get("precopy-bytes"),
            "downtime_bytes": ram.get("downtime-bytes"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "qemu_mbps": ram.get("mbps"),
            "mib_per_s": (ram["transferred"] / MIB) / (transfer_ms / 1000) if transfer_ms > 0 else None,
            "src_vmrss_before_kib": rss_before["src"].get("VmRSS"),
            "dst_vmrss_before_kib": rss_before["dst"].get("VmRSS"),
            "src_vmhwm_kib": rss_after["src"].get("VmHWM"),
            "dst_vmhwm_kib": rss_after["dst"].get("VmHWM"),
            "src_cpu_user_s": round(cpu_after["src"][0] - cpu_before["src"][0], 3),
            "src_cpu_sys_s": round(cpu_after["src"][1] - cpu_before["src"][1], 3),
            "dst_cpu_user_s": round(cpu_after["dst"][0] - cpu_before["dst"][0], 3),
            "dst_cpu_sys_s": round(cpu_after["dst"][1] - cpu_before["dst"][1], 3),
            "dst_status": dst_status.get("status"),
            "others_cpu_pct": others_pct,
        })

        # Verify that the guest arrived whole.
        if workload == "busy":
            def more_passes():
                return serial_text(dst_ser).count("B") >= 2
            wait_for("destination printing passes", more_passes, time.monotonic() + 30, procs)
            dst_qmp.cmd("stop")
            dump = run_dir / "ws.bin"
            dst_qmp.cmd("pmemsave", val=FILL_START, size=args.busy_ws_mib * MIB, filename=str(dump))
            ok, n, why = check_counters(dump.read_bytes(), args.busy_ws_mib * MIB)
            dump.unlink()
            reports = serial_text(src_ser).count("B") + serial_text(dst_ser).count("B")
            expect = n >> shift  # passes completed when the walk was stopped, in reports
            cont = reports in (expect, expect - 1)
            result["verify"] = (f"{why}; {reports} 'B' reports on source+destination for {n} passes "
                                f"(expected {expect - 1} or {expect})")
            result["verified"] = ok and cont
        else:
            size = mem - FILL_START
            h_src, z_src = ram_hash(src_qmp, FILL_START, size, run_dir / "src.ram")
            h_dst, z_dst = ram_hash(dst_qmp, FILL_START, size, run_dir / "dst.ram")
            result["verify"] = (f"RAM [1 MiB, {args.mem_mib} MiB) sha256 {'equal' if h_src == h_dst else 'DIFFERS'}; "
                                f"zero pages there: source {z_src}, destination {z_dst}")
            plausible = (z_src < 64) if workload == "random" else (z_src > (size // PAGE) * 9 // 10)
            result["verified"] = h_src == h_dst and plausible
        result["ok"] = True
    except BenchError as e:
        result["error"] = str(e)
    finally:
        for q in (src_qmp, dst_qmp):
            if q is not None:
                q.close()
        started.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Report


def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
    env = report["environment"]
    print(f"\n{env['qemu_version']} | kernel {env['kernel']} | {env['cpus']} CPUs | "
          f"load avg {env['loadavg_start']} -> {env['loadavg_end']}")
    print(f"guest {report['params']['mem_mib']} MiB, TCG, single channel, no compression, "
          f"max-bandwidth {report['params']['max_bandwidth']} B/s, downtime-limit {report['params']['downtime_limit_ms']} ms")
    lbs = report["loopback"]
    print(f"loopback TCP, one stream of {lbs[0]['bytes'] / (1 << 30):.1f} GiB each, MiB/s: "
          + ", ".join(f"{lb['tool']} {lb['when']} {lb['mib_per_s']:.0f}" for lb in lbs))
    print(f"loopback TCP limit: best {report['loopback_best_mib_per_s']:.0f} MiB/s, "
          f"median {report['loopback_median_mib_per_s']:.0f} MiB/s")
    hdr = (f"{'workload':8} {'rep':>3} {'total ms':>8} {'down ms':>7} {'setup':>5} {'xfer MiB':>8} {'MiB/s':>7} "
           f"{'normal pg':>9} {'zero pg':>7} {'syncs':>5} {'srcHWM':>7} {'dstHWM':>7} {'others':>6}  verified")
    print(hdr)
    print("-" * len(hdr))
    for r in report["runs"]:
        if not r["ok"]:
            print(f"{r['workload']:8} {r['rep']:>3}  FAILED: {r.get('error')}")
            continue
        print(f"{r['workload']:8} {r['rep']:>3} {r['total_ms']:>8} {fmt(r['downtime_ms']):>7} {fmt(r['setup_ms']):>5} "
              f"{r['ram_transferred'] / MIB:>8.1f} {fmt(r['mib_per_s'], '.0f'):>7} {fmt(r['pages_normal']):>9} "
              f"{fmt(r['pages_duplicate_zero']):>7} {fmt(r['dirty_sync_count']):>5} "
              f"{r['src_vmhwm_kib'] // 1024:>6}M {r['dst_vmhwm_kib'] // 1024:>6}M {fmt(r['others_cpu_pct']):>5}%"
              f"  {r['verified']}")
    print("(MiB/s: RAM bytes transferred / (total - setup) time; srcHWM/dstHWM: VmHWM of each QEMU "
          "right after completion;\n others: share of the machine's CPUs busy with other work during "
          "the migration)")
    for w, s in report["summary"].items():
        tot, down, rate = s["total_ms"], s["downtime_ms"], s["mib_per_s"]
        print(f"{w:8} over {s['runs']} run(s), median [min-max]: total {tot['median']} [{tot['min']}-{tot['max']}] ms, "
              f"downtime {down['median']} [{down['min']}-{down['max']}] ms, "
              f"{fmt(rate['median'], '.0f')} [{fmt(rate['min'], '.0f')}-{fmt(rate['max'], '.0f')}] MiB/s")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for w in MODES:
        ok = [r for r in runs if r["workload"] == w and r["ok"]]
        if not ok:
            continue
        def spread(key):
            vals = [r[key] for r in ok if r[key] is not None]
            if not vals:
                return {"median": None, "min": None, "max": None}
            return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

        out[w] = {
            "runs": len(ok),
            "total_ms": spread("total_ms"),
            "downtime_ms": spread("downtime_ms"),
            "mib_per_s": spread("mib_per_s"),
            "src_vmhwm_kib": max(r["src_vmhwm_kib"] for r in ok),
            "dst_vmhwm_kib": max(r["dst_vmhwm_kib"] for r in ok),
            "all_verified": all(r["verified"] for r in ok),
        }
    return out


def parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--loopback-receiver":
        loopback_receiver(int(sys.argv[2]))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="idle,random,busy", help="comma-separated: idle, random, busy")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each workload")
    ap.add_argument("--mem-mib", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--busy-ws-mib", type=int, default=16, help="busy: working set in MiB, from 1 MiB up")
    ap.add_argument("--busy-fill", choices=["random", "zero"], default="random",
                    help="busy: content of RAM outside the working set (vmm-demo's --fill)")
    ap.add_argument("--report-shift", type=int, default=8, help="busy: print 'B' every 2^N passes")
    ap.add_argument("--seed", type=int, default=0x2545F491, help="xorshift32 seed (plus the repetition)")
    ap.add_argument("--max-bandwidth", type=parse_size, default=100_000_000_000,
                    help="QEMU max-bandwidth in bytes/s (default 100 GB/s, i.e. out of the way)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="QEMU downtime-limit in ms")
    ap.add_argument("--loopback-bytes", type=parse_size, default=4 << 30, help="bytes for each loopback measure")
    ap.add_argument("--loopback-rounds", type=int, default=2,
                    help="loopback measures (python and iperf3) before the migrations; one more follows them")
    ap.add_argument("--no-iperf3", action="store_true", help="skip the iperf3 loopback measure")
    ap.add_argument("--dst-prealloc", action="store_true",
                    help="start the destination with -mem-prealloc (not QEMU's default; for diagnosis)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--ready-timeout", type=float, default=60, help="seconds for a guest to boot and fill RAM")
    ap.add_argument("--migration-timeout", type=float, default=120, help="seconds for one migration")
    ap.add_argument("--poll-interval", type=float, default=0.02, help="query-migrate poll interval, seconds")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, serial output)")
    args = ap.parse_args()

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in MODES]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {list(MODES)}")
    if args.mem_mib * MIB > 0xFFFFF000 or args.mem_mib < 2 + args.busy_ws_mib:
        ap.error("--mem-mib must be below 4 GiB and leave room for the working set above 1 MiB")
    qemu = shutil.which(args.qemu)
    if qemu is None:
        print(f"skipped: {args.qemu} not found; run benches/qemu/setup.sh first", file=sys.stderr)
        return 2
    args.qemu = qemu
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            print(f"skipped: {tool} (binutils) not found; run benches/qemu/setup.sh first", file=sys.stderr)
            return 2

    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    # The RAM dumps that verify each run go to tmpfs: 2 x 255 MiB per run written to disk would
    # leave writeback running into the next migration, which measurably slowed it here.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="qemu-bench-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    report: dict = {
        "environment": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "qemu_version": version,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
        },
        "params": {
            "mem_mib": args.mem_mib, "busy_ws_mib": args.busy_ws_mib, "busy_fill": args.busy_fill,
            "max_bandwidth": args.max_bandwidth, "downtime_limit_ms": args.downtime_limit,
            "channels": 1, "compression": None, "accel": "tcg", "machine": "pc", "reps": args.reps,
            "dst_prealloc": args.dst_prealloc,
        },
        "loopback": [],
        "runs": [],
    }
    started = Started()
    try:
        block = build_bootblock(workdir)
        print(f"{version}; work dir {workdir}", flush=True)
        # Unreported warm-up: the first stream of a run was repeatedly the slowest here.
        measure_loopback_python(min(args.loopback_bytes, 512 * MIB), started, workdir)

        def loopback_round(when: str) -> None:
            print(f"loopback TCP ({when}) ...", flush=True)
            lb = measure_loopback_python(args.loopback_bytes, started, workdir)
            report["loopback"].append(lb | {"when": when})
            if not args.no_iperf3:
                lb = measure_loopback_iperf3(args.loopback_bytes, started, workdir)
                if lb is not None:
                    report["loopback"].append(lb | {"when": when})

        for _ in range(args.loopback_rounds):
            loopback_round("before")
        # Interleave workloads so slow drift in the machine's load spreads over all of them.
        for rep in range(args.reps):
            for w in workloads:
                print(f"{w} #{rep} ...", flush=True)
                r = run_one(args, w, rep, block, workdir)
                report["runs"].append(r)
                if not r["ok"]:
                    print(f"  failed: {r['error']}", flush=True)
        loopback_round("after")
    finally:
        started.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    report["summary"] = summarize(report["runs"])
    report["loopback_best_mib_per_s"] = max(lb["mib_per_s"] for lb in report["loopback"])
    report["loopback_median_mib_per_s"] = statistics.median(lb["mib_per_s"] for lb in report["loopback"])
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [r for r in report["runs"] if not r["ok"] or not r.get("verified")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
