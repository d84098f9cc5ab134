#!/usr/bin/env python3
"""QEMU's migration of a 256 MiB guest over loopback, next to the loopback TCP limits.

The reference half of the issue-3 benchmark: the same three workloads our vmm-demo migrates
(idle, random content, busy writer), run by Debian's qemu-system-x86_64 under TCG, migrated
from one QEMU process to another over 127.0.0.1 on a single channel with no compression and
max-bandwidth raised out of the way. The loopback TCP limit is measured in the same run, by a
Python sender/receiver pair and, when installed, iperf3.

The reference half of issue 10 (post-copy), not run unless asked (--workloads all, or by name):
  postcopy          post-copy of a guest that touches pseudo-random pages of its RAM (the
                    scatter guest), switched with migrate-start-postcopy right after `migrate`;
  postcopy-preempt  the same with the postcopy-preempt capability (urgent pages on a channel
                    of their own).
Both report page requests, vCPU blocktime, the guest's pause and the time in post-copy. The
loopback round trip of a 16-byte request answered by 4 KiB (scripts/rtt.py, the floor our
post-copy's fault latency is stated against) is measured in every run.

The reference half of issue 12 (storage migration), not run unless asked (by name or `all`):
  storage-idle     live migration with a non-shared 1 GiB raw disk (half of it written: every
                   other 1 MiB piece pseudo-random), the disk copied by blockdev-mirror to an
                   NBD export of the destination, driven as libvirt drives `virsh migrate --live
                   --copy-storage-all` (see run_storage); the guest boots from that disk and
                   idles (timer interrupts, no RAM or disk writes);
  storage-writing  the same with a guest that writes 256 sectors of its disk (through BIOS
                   int 13h) and walks 16 MiB of its RAM, every pass.
Both report total time (mirror start to the mirror's completion after the migration), mirror
time to READY, QEMU's downtime, the guest's pause, RAM bytes and the NBD connection's bytes.

For scripts/bench-storage.py (one run of one storage workload between its own rounds), the
interface is the command line, which prints a table and writes JSON:
  python3 benches/qemu/compare.py --workloads storage-writing --reps 1 --no-loopback --json F
F then holds {"environment", "params", "runs": [one run dict], "summary": {...}}; the run dict
has "ok", "verified", "total_ms", "mirror_ms", "downtime_ms", "pause_ms", "ram_transferred",
"disk_wire_bytes" (and the rest documented in README.md). The exit status is 0 only if the
run completed and verified, 2 if QEMU or binutils are missing.

Every guest is the boot sector in bootblock.s (assembled here with binutils; the storage
guest is its second sector, which the first loads from the disk), so no image is downloaded.
The harness waits on what the guest prints on its serial port, never on a sleep, and checks
the outcome:
  idle, random  the destination runs, and RAM above 1 MiB hashes the same on both sides;
  busy          the destination keeps printing passes, its counters are N+1...N+1 N...N
                (one walk in progress), and the passes it reports continue the source's.
  postcopy*     the destination keeps printing touches after completion; RAM above 1 MiB is
                equal on both sides except the first word of pages touched on the destination,
                which holds touch numbers the destination made; the touches both sides report
                add up to the destination's touch count.
  storage-*     with both sides paused after the migration (NBD server stopped): qemu-img
                compare says the two images are identical, and guest RAM [0, 256 MiB) hashes
                the same on both; after `cont` the destination keeps printing; writing: the
                disk working set and RAM counters of each side read N+1..N+1 N..N, and the
                destination's continue the source's passes; idle: RAM above 1 MiB over 90 % zero.

Only processes this script starts are ended, by their PID, always (try/finally).

Run: bash benches/qemu/setup.sh && python3 benches/qemu/compare.py --json qemu.json
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import platform
import random
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
PAGE = 4096
FILL_START = 1 * MIB  # the guest fills and walks RAM from 1 MiB up
MODES = {"idle": 0, "random": 1, "busy": 2, "postcopy": 3, "postcopy-preempt": 3,
         "storage-idle": 4, "storage-writing": 4}
PRECOPY_WORKLOADS = ["idle", "random", "busy"]  # the default run, as before issue 10
# Post-copy workloads: the capabilities each one turns on (on both sides) besides postcopy-ram.
POSTCOPY = {"postcopy": [], "postcopy-preempt": ["postcopy-preempt"]}
# Storage workloads (issue 12): live migration with a non-shared disk, copied by blockdev-mirror
# to the destination's NBD export, the way libvirt does --copy-storage-all.
STORAGE = ["storage-idle", "storage-writing"]
TOUCH_COUNT_ADDR = 0x10000  # bootblock.s: touch_count, the scatter guest's touches so far
RTT_TOOL = HERE.parent.parent / "scripts" / "rtt.py"


class BenchError(Exception):
    """A run that could not be measured; the message says which step failed."""


# --------------------------------------------------------------------------------------------
# Guest image


def build_bootblock(workdir: Path) -> bytes:
    """Assembles bootblock.s with GNU as/ld: the boot sector and the sector after it (1024 bytes;
    the second sector is the real-mode storage guest, which the first loads in mode 4)."""
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
    if len(data) != 1024 or data[510:512] != b"\x55\xaa":
        raise BenchError(f"bootblock.bin is {len(data)} bytes, {data[510:512]!r} at 510, where 1024 bytes "
                         f"with the boot signature 55 aa at 510 were expected")
    return data


def patch_params(block: bytes, mode: int, busy_fill: bool, report_shift: int, ram_end: int,
                 ws_bytes: int, seed: int, disk_ws: int = 0, disk_chunk: int = 128) -> bytes:
    """Writes the workload parameters into the block after its "QMB1" magic (see bootblock.s)."""
    at = block.find(b"QMB1")
    if at < 0 or block.find(b"QMB1", at + 1) >= 0:
        raise BenchError("bootblock.bin must hold exactly one QMB1 parameter block")
    out = bytearray(block)
    struct.pack_into("<BBBBIIIHH", out, at + 4, mode, int(busy_fill), report_shift, 0, ram_end,
                     ws_bytes, seed, disk_ws, disk_chunk)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A minimal QMP client over a unix socket: one command at a time, events kept aside (and
    waited for with a deadline by wait_event)."""

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
        self._sock = sock
        self._buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"QMP greeting expected on {path}, got {greeting!r}")
        self.cmd("qmp_capabilities")

    def _read(self, deadline: float | None = None) -> dict | None:
        """The next message; None if `deadline` (monotonic) passes first. Without a deadline,
        QEMU saying nothing for 30 s is an error."""
        while b"\n" not in self._buf:
            timeout = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                if deadline is None:
                    raise BenchError("QMP: QEMU sent nothing for 30 s")
                return None
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise BenchError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def find_event(self, names, pred=None) -> dict | None:
        """The first event received so far named in `names` (and satisfying pred)."""
        for e in self.events:
            if e.get("event") in names and (pred is None or pred(e)):
                return e
        return None

    def wait_event(self, what: str, names, deadline: float, pred=None, procs=()) -> dict:
        """Reads events until one named in `names` (and satisfying pred) has arrived; fails at the
        deadline (monotonic) or if one of `procs` exited."""
        names = {names} if isinstance(names, str) else set(names)
        while True:
            e = self.find_event(names, pred)
            if e is not None:
                return e
            for p in procs:
                if p.poll() is not None:
                    raise BenchError(f"{what}: process {p.pid} exited ({p.returncode}) while waiting")
            msg = self._read(min(deadline, time.monotonic() + 0.5))
            if msg is None:
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: not reached within the deadline")
            elif "event" in msg:
                self.events.append(msg)

    def cmd(self, name: str, /, **arguments) -> object:
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


def measure_rtt(count: int, started: Started, workdir: Path) -> dict:
    """scripts/rtt.py: loopback round trips of a 16-byte request answered by 4 KiB (TCP_NODELAY)."""
    if not RTT_TOOL.is_file():
        raise BenchError(f"{RTT_TOOL} not found (the round-trip tool this script runs)")
    log = workdir / "rtt.log"
    p = started.popen([sys.executable, str(RTT_TOOL), "--count", str(count), "--json"], log)
    try:
        p.wait(timeout=60 + count / 1000)  # ~20-100 us a round trip; generous
    except subprocess.TimeoutExpired:
        raise BenchError(f"{RTT_TOOL.name} did not finish {count} round trips in time") from None
    out = log.read_text(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"{RTT_TOOL.name} exited {p.returncode}: {out.strip()[-500:]}")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"{RTT_TOOL.name} printed no JSON result: {out.strip()[-500:]!r}") from None


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


CAPS_OFF = ["xbzrle", "compress", "multifd", "auto-converge", "postcopy-ram", "zero-blocks", "release-ram",
            "postcopy-preempt", "postcopy-blocktime"]


def set_migration_options(qmp: Qmp, max_bandwidth: int, downtime_ms: int, enable: list[str] = ()) -> None:
    """Capabilities off but `events` and those in `enable` (which this QEMU must have), then parameters."""
    # Only what this QEMU has: `compress` went in 9.1, and setup.sh may install 10.x.
    known = {c["capability"] for c in qmp.cmd("query-migrate-capabilities")}
    missing = [c for c in enable if c not in known]
    if missing:
        raise BenchError(f"this QEMU has no migration capability {', '.join(missing)} "
                         f"(query-migrate-capabilities lists {sorted(known)})")
    caps = [{"capability": c, "state": False} for c in CAPS_OFF if c in known and c not in enable]
    caps += [{"capability": c, "state": True} for c in ["events", *enable]]
    try:
        qmp.cmd("migrate-set-capabilities", capabilities=caps)
    except BenchError as e:
        if "postcopy-ram" in enable:  # QEMU checks userfaultfd here ("Postcopy is not supported: ...")
            raise BenchError(f"{e} (post-copy needs userfaultfd: root, /dev/userfaultfd access or "
                             f"vm.unprivileged_userfaultfd=1)") from None
        raise
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth, "downtime-limit": downtime_ms})


def event_time(qmp: Qmp, event: str, status: str | None = None) -> float | None:
    """Host time (s) of the first QMP event of that name (and MIGRATION status) received so far."""
    for e in qmp.events:
        if e.get("event") == event and (status is None or e.get("data", {}).get("status") == status):
            ts = e["timestamp"]
            return ts["seconds"] + ts["microseconds"] / 1e6
    return None


def ms_between(t0: float | None, t1: float | None) -> float | None:
    return None if t0 is None or t1 is None else round((t1 - t0) * 1000, 2)


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


def read_touch_count(qmp: Qmp, path: Path) -> int:
    """The scatter guest's touch_count word (guest-physical TOUCH_COUNT_ADDR), via pmemsave."""
    qmp.cmd("pmemsave", val=TOUCH_COUNT_ADDR, size=4, filename=str(path))
    data = path.read_bytes()
    path.unlink()
    if len(data) != 4:
        raise BenchError(f"pmemsave of touch_count wrote {len(data)} bytes where 4 were asked")
    return struct.unpack("<I", data)[0]


def check_scatter(src: bytes, dst: bytes, n_src: int, n_dst: int) -> tuple[bool, int, str]:
    """Post-copy oracle for the scatter guest, on RAM [1 MiB, end) of the stopped source (as it
    was at the switch) and of the stopped destination.

    Every touch n writes n into the first word of one page, after storing n in touch_count, so:
    bytes 4..4095 of every page are equal on both sides (each page arrived whole), and a page
    whose first word differs was touched on the destination: it holds n_src <= n <= n_dst.
    Returns (ok, pages whose first word differs, what was found).
    """
    if len(src) != len(dst) or len(src) % PAGE:
        return False, 0, f"RAM dumps of {len(src)} and {len(dst)} bytes"
    a, b = array("I"), array("I")
    if a.itemsize != 4:
        raise BenchError(f"array('I') has {a.itemsize}-byte items on this platform where 4 were expected")
    a.frombytes(src)
    b.frombytes(dst)
    step = PAGE // 4
    first_a, first_b = a[::step], b[::step]
    blank = array("I", bytes(4 * len(first_a)))
    a[::step] = blank  # compare everything but the touched words in one go
    b[::step] = blank
    if a != b:
        bad = next(i for i in range(len(first_a)) if a[i * step:(i + 1) * step] != b[i * step:(i + 1) * step])
        return False, 0, f"page {bad} (at {FILL_START + bad * PAGE:#x}) differs beyond its first word"
    changed = [(i, y) for i, (x, y) in enumerate(zip(first_a, first_b)) if x != y]
    stray = [(i, y) for i, y in changed if not n_src <= y <= n_dst]
    if stray:
        i, y = stray[0]
        return False, len(changed), (f"{len(stray)} changed page(s) hold no touch number of the destination, e.g. "
                                     f"page {i}: {y} outside [{n_src}, {n_dst}]")
    return True, len(changed), (f"RAM equal but the first word of {len(changed)} pages, each holding a touch "
                                f"number in [{n_src}, {n_dst}]")


def run_one(args, workload: str, rep: int, block: bytes, workdir: Path) -> dict:
    mem = args.mem_mib * MIB
    run_dir = workdir / f"{workload}-{rep}"
    run_dir.mkdir()
    postcopy = workload in POSTCOPY
    shift = args.scatter_report_shift if postcopy else args.report_shift
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
        elif postcopy:
            def ready():
                # filled, and a few touch reports after it: the scatter loop is under way
                text = serial_text(src_ser)
                return "F" in text and text.split("F", 1)[1].count("S") >= 3
        else:
            def ready():
                return "H" in serial_text(src_ser)
        t_boot = time.monotonic()
        wait_for(f"{workload} guest ready on serial", ready, time.monotonic() + args.ready_timeout, procs)
        result["guest_ready_s"] = round(time.monotonic() - t_boot, 3)

        # Post-copy: postcopy-blocktime is measured by the destination; set on both for symmetry.
        enable = ["postcopy-ram", *POSTCOPY[workload], "postcopy-blocktime"] if postcopy else []
        set_migration_options(dst_qmp, args.max_bandwidth, args.downtime_limit, enable)
        set_migration_options(src_qmp, args.max_bandwidth, args.downtime_limit, enable)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst_qmp.cmd("migrate-incoming", uri=uri)
        wait_for("destination listening", lambda: port_listening(port), time.monotonic() + 10, procs)

        rss_before = {"src": proc_status(src.pid), "dst": proc_status(dst.pid)}
        cpu_before = {"src": proc_cpu_seconds(src.pid), "dst": proc_cpu_seconds(dst.pid)}
        machine_before = machine_cpu_ticks()
        t0 = time.monotonic()
        src_qmp.cmd("migrate", uri=uri)
        if postcopy:
            # As pure a post-copy as QEMU allows: asked for before the migration thread's first
            # iteration (it is still connecting or in setup), QEMU switches at that iteration,
            # before sending any page in pre-copy (precopy_bytes shows whether it did).
            src_qmp.cmd("migrate-start-postcopy")
        mig_deadline = t0 + args.migration_timeout
        statuses = []
        while True:
            info = src_qmp.cmd("query-migrate")
            status = info.get("status")
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            if status in ("completed", "failed", "cancelled"):
                break
            if status == "postcopy-paused":
                # The connection broke during post-copy: neither side has the whole guest; QEMU
                # waits for a `migrate-recover`, which this benchmark does not attempt.
                raise BenchError(f"post-copy paused (the migration stream broke): "
                                 f"{info.get('error-desc', 'no error-desc')}; source exited: {src.poll()}, "
                                 f"destination exited: {dst.poll()}")
            if time.monotonic() > mig_deadline:
                try:
                    src_qmp.cmd("migrate_cancel")
                    cancelled = "cancelled"
                except BenchError as e:  # e.g. refused in post-copy; the processes end in finally anyway
                    cancelled = f"migrate_cancel refused: {e}"
                raise BenchError(f"migration not completed after {args.migration_timeout} s (status {status}, "
                                 f"ram {info.get('ram')}; {cancelled})")
            time.sleep(args.poll_interval)
        wall = time.monotonic() - t0
        machine_after = machine_cpu_ticks()
        if status != "completed":
            raise BenchError(f"migration {status}: {info.get('error-desc', info)}")
        if postcopy:
            touches_at_completion = serial_text(dst_ser).count("S")
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
        if postcopy:
            # Blocktime is the destination's: its query-migrate has it once its side completed.
            dst_info = wait_for("destination's side of the migration completed",
                                lambda: (i := dst_qmp.cmd("query-migrate")).get("status") == "completed" and i,
                                time.monotonic() + 20, procs)
            requests = ram.get("postcopy-requests")
            vcpu_bt = dst_info.get("postcopy-vcpu-blocktime")
            # Host-clock timestamps of QMP events, the same clock for both processes.
            t_setup = event_time(src_qmp, "MIGRATION", "setup")
            t_stop = event_time(src_qmp, "STOP")
            t_switch = event_time(src_qmp, "MIGRATION", "postcopy-active")
            t_done = event_time(src_qmp, "MIGRATION", "completed")
            t_resume = event_time(dst_qmp, "RESUME")
            result.update({
                "postcopy_requests": requests,
                "postcopy_bytes": ram.get("postcopy-bytes"),
                "blocktime_ms": dst_info.get("postcopy-blocktime"),
                "vcpu_blocktime_ms": vcpu_bt,
                "blocktime_per_request_us": (round(1000 * sum(vcpu_bt) / requests, 1)
                                             if vcpu_bt and requests else None),
                "switch_after_ms": ms_between(t_setup, t_stop),
                "pause_ms": ms_between(t_stop, t_resume),
                "postcopy_ms": ms_between(t_switch, t_done),
                # Per-fault latency came in QEMU 10.1 (ns, and a histogram of 2^N us buckets):
                # recorded when this QEMU reports it, None before.
                "latency_ns": dst_info.get("postcopy-latency"),
                "vcpu_latency_ns": dst_info.get("postcopy-vcpu-latency"),
                "non_vcpu_latency_ns": dst_info.get("postcopy-non-vcpu-latency"),
                "latency_dist": dst_info.get("postcopy-latency-dist"),
            })

        # Verify that the guest arrived whole.
        if postcopy:
            # It goes on running on the destination: more touch reports after completion.
            wait_for("destination reporting touches after completion",
                     lambda: serial_text(dst_ser).count("S") >= touches_at_completion + 2,
                     time.monotonic() + 30, procs)
            dst_qmp.cmd("stop")
            n_src = read_touch_count(src_qmp, run_dir / "src.count")  # stopped since the switch
            n_dst = read_touch_count(dst_qmp, run_dir / "dst.count")
            size = mem - FILL_START
            dumps = []
            for side, q in (("src", src_qmp), ("dst", dst_qmp)):
                path = run_dir / f"{side}.ram"
                q.cmd("pmemsave", val=FILL_START, size=size, filename=str(path))
                dumps.append(path.read_bytes())
                path.unlink()
            ok, changed, why = check_scatter(dumps[0], dumps[1], n_src, n_dst)
            src_reports, dst_reports = serial_text(src_ser).count("S"), serial_text(dst_ser).count("S")
            # One report per 2^shift touches, printed after the touch: one may be pending on each side.
            src_cont = src_reports in (n_src >> shift, (n_src >> shift) - 1)
            cont = src_reports + dst_reports in (n_dst >> shift, (n_dst >> shift) - 1)
            result.update({"touches_at_switch": n_src, "touches_at_stop": n_dst, "pages_touched_on_dst": changed})
            result["verify"] = (f"{why}; 'S' reports: source {src_reports} for {n_src} touches, source+destination "
                                f"{src_reports + dst_reports} for {n_dst} (one per {1 << shift})")
            result["verified"] = ok and src_cont and cont and changed > 0
        elif workload == "busy":
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
# Storage migration (issue 12): a non-shared disk copied with blockdev-mirror to the
# destination's NBD export, driven as libvirt drives `virsh migrate --live --copy-storage-all`


SECTOR = 512
DISK_FIRST_LBA = 2  # bootblock.s: sector 0 is the boot sector, 1 the storage guest, then the working set
DISK_NODE = "libvirt-1-format"  # node names, device and export names as libvirt gives them
DISK_STORAGE_NODE = "libvirt-1-storage"
MIRROR_TARGET_NODE = "migration-vda-format"
MIRROR_TARGET_STORAGE_NODE = "migration-vda-storage"


def make_base_disk(path: Path, size: int, piece: int, seed: int) -> None:
    """The disk of the storage workloads, without its boot sectors: `size` bytes of raw image,
    pieces 1, 3, 5, ... of `piece` bytes filled with pseudo-random bytes (Python's Mersenne
    Twister seeded with `seed`, so the same every time), the others holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(1, size // piece, 2):
            f.seek(i * piece)
            f.write(rng.randbytes(piece))


def copy_sparse(src: Path, dst: Path) -> None:
    """Copies a file keeping its holes (SEEK_DATA/SEEK_HOLE), data by copy_file_range."""
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        off = 0
        while off < size:
            try:
                data = os.lseek(fi.fileno(), off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole from here on
                    break
                raise
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), hole - pos, pos, pos)
                if n <= 0:
                    raise BenchError(f"copy_file_range of {src} stopped at {pos} of {hole}")
                pos += n
            off = hole


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def storage_qemu_cmd(qemu: str, mem_mib: int, image: Path, serial: Path, qmp: Path, incoming: bool,
                     bus: str, discard: str) -> list[str]:
    """A guest booting from a raw image through -blockdev (a file node under a raw format node,
    node names and properties as libvirt gives them), on virtio-blk or IDE. The destination
    waits paused (-S) for `migrate-incoming` and then for `cont`, as libvirt starts it.

    libvirt puts discard=unmap on the file node always and on the format node only for a disk
    with <driver discard='unmap'/>; `discard` is the format node's. Without it the block layer
    drops the may-unmap flag of the mirror's zero writes at the format node, and on a file system
    without FALLOC_FL_ZERO_RANGE (tmpfs) QEMU then writes the destination's holes as zeroes."""
    dev = ("virtio-blk-pci,drive={n},id=virtio-disk0,bootindex=1" if bus == "virtio"
           else "ide-hd,bus=ide.0,unit=0,drive={n},id=ide0-0-0,bootindex=1").format(n=DISK_NODE)
    cmd = [qemu, "-accel", "tcg", "-machine", "pc", "-m", str(mem_mib), "-smp", "1",
           "-nodefaults", "-vga", "none", "-display", "none", "-monitor", "none",
           "-serial", f"file:{serial}",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-blockdev", json.dumps({"driver": "file", "filename": str(image), "node-name": DISK_STORAGE_NODE,
                                    "auto-read-only": True, "discard": "unmap"}),
           "-blockdev", json.dumps({"node-name": DISK_NODE, "read-only": False, "driver": "raw",
                                    "file": DISK_STORAGE_NODE, **({"discard": "unmap"} if discard == "unmap" else {})}),
           "-device", dev]
    if incoming:
        cmd += ["-incoming", "defer", "-S"]
    return cmd


def tcp_counters(port: int) -> list[dict]:
    """bytes_received / bytes_sent / bytes_acked of the established TCP sockets whose local port
    is `port` (the server's end of each connection to it), from the kernel's tcp_info (ss -i)."""
    res = subprocess.run(["ss", "-tinH", "state", "established", "sport", "=", f":{port}"],
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise BenchError(f"ss failed ({res.returncode}): {res.stderr.strip()}")
    out = []
    for m in re.finditer(r"bytes_sent:(\d+).*?bytes_received:(\d+)", res.stdout, re.S):
        acked = re.search(r"bytes_acked:(\d+)", res.stdout[m.start():m.end()])
        out.append({"bytes_sent": int(m.group(1)), "bytes_received": int(m.group(2)),
                    "bytes_acked": int(acked.group(1)) if acked else None})
    return out


def step_form(values: list[int]) -> tuple[bool, int, int, str]:
    """Whether values read h..h l..l with h - l in {0, 1} (a pass over them in progress or
    done): (ok, h, l, what was found)."""
    hi, lo = values[0], values[-1]
    if all(v == hi for v in values):
        return True, hi, lo, f"all {len(values)} at {hi}"
    if hi - lo not in (0, 1):
        return False, hi, lo, f"first {hi}, last {lo}: more than one pass apart"
    step = next((i for i, v in enumerate(values) if v != hi), len(values))
    if any(v != lo for v in values[step:]):
        return False, hi, lo, f"not of the form N+1..N+1 N..N (first break at {step})"
    return True, hi, lo, f"{step} at {hi}, {len(values) - step} at {lo}"


def disk_ws_values(image: Path, sectors: int) -> tuple[list[int], str | None]:
    """The word each sector of the writer's working set holds; an error if a sector is not one
    word repeated (every pass writes its number into every word of every sector)."""
    with open(image, "rb") as f:
        f.seek(DISK_FIRST_LBA * SECTOR)
        data = f.read(sectors * SECTOR)
    vals = []
    for k in range(sectors):
        sec = data[k * SECTOR:(k + 1) * SECTOR]
        v = struct.unpack_from("<I", sec)[0]
        if sec != struct.pack("<I", v) * (SECTOR // 4):
            return vals, f"sector {DISK_FIRST_LBA + k} is not one word repeated"
        vals.append(v)
    return vals, None


def writer_state(image: Path, qmp: Qmp, args, path: Path) -> dict:
    """The writing guest's progress as a stopped side holds it: its disk working set and, when
    it walks RAM, its page counters. Pass p writes p into the disk working set, then makes every
    counter p, so a consistent state is (disk p..p p-1..p-1, RAM all p-1), (disk all p, RAM
    p..p p-1..p-1) or (all p)."""
    vals, bad = disk_ws_values(image, args.disk_ws_sectors)
    if bad:
        return {"ok": False, "why": bad, "passes": 0}
    ok_d, d_hi, d_lo, why_d = step_form(vals)
    st = {"ok": ok_d, "disk_hi": d_hi, "disk_lo": d_lo, "why": f"disk working set: {why_d}"}
    ws = args.storage_ram_ws_mib * MIB
    if ws:
        qmp.cmd("pmemsave", val=FILL_START, size=ws, filename=str(path))
        data = path.read_bytes()
        path.unlink()
        counters = [struct.unpack_from("<I", data, off)[0] for off in range(0, ws, PAGE)]
        ok_r, r_hi, r_lo, why_r = step_form(counters)
        cross = (d_hi == r_lo + 1 and (r_hi == r_lo or d_lo == d_hi)) or (d_hi == d_lo == r_hi == r_lo)
        st.update({"ok": ok_d and ok_r and cross, "ram_hi": r_hi, "ram_lo": r_lo,
                   "why": f"disk working set: {why_d}; RAM counters: {why_r}"
                          + ("" if cross else "; disk and RAM not at the same pass")})
        st["passes"] = r_lo  # passes whose RAM walk is done
    else:
        st["passes"] = d_lo
    return st


def ram_compare(src_qmp: Qmp, dst_qmp: Qmp, size: int, run_dir: Path) -> tuple[bool, int, str]:
    """Guest RAM [0, size) of both (paused) sides: equal? And the source's zero pages above 1 MiB."""
    digests, z_high = [], 0
    for side, q in (("src", src_qmp), ("dst", dst_qmp)):
        path = run_dir / f"{side}.ram"
        q.cmd("pmemsave", val=0, size=size, filename=str(path))
        data = path.read_bytes()
        path.unlink()
        if len(data) != size:
            raise BenchError(f"pmemsave wrote {len(data)} bytes where {size} were asked")
        digests.append(hashlib.sha256(data).digest())
        if side == "src":
            zero = bytes(PAGE)
            z_high = sum(1 for off in range(FILL_START, size, PAGE) if data[off:off + PAGE] == zero)
        del data
    h_src, h_dst = digests
    return h_src == h_dst, z_high, (f"RAM [0, {size // MIB} MiB) sha256 {'equal' if h_src == h_dst else 'DIFFERS'} "
                                    f"on the paused source and destination; zero pages above 1 MiB: {z_high}")


def run_storage(args, workload: str, rep: int, block: bytes, base: Path, workdir: Path) -> dict:
    """One live migration with a non-shared disk, as libvirt (>= 6 with QEMU >= 6) does it:

    destination (libvirt's Prepare): started paused with -incoming defer; migration capabilities
    and parameters; nbd-server-start; block-export-add (nbd, writable) of the disk's node;
    migrate-incoming.
    source (Perform): blockdev-add of an NBD client node on the export (and a raw node on top);
    blockdev-mirror sync=full to it; wait for BLOCK_JOB_READY; migrate; wait for the MIGRATION
    event `completed`; block-job-cancel of the READY job (without force: it finishes the copy
    without pivoting, with the source paused) and wait for BLOCK_JOB_COMPLETED; job-dismiss;
    blockdev-del of the client nodes.
    destination (Finish): wait for its MIGRATION `completed`; nbd-server-stop; cont.

    Between nbd-server-stop and cont, both sides paused, the harness verifies: qemu-img compare
    of the two images, RAM of both sides. That time (and the few ms of reading the NBD socket's
    counters before the client node is deleted) is taken out of the pause it reports.
    """
    mem = args.mem_mib * MIB
    writing = workload == "storage-writing"
    run_dir = workdir / f"{workload}-{rep}"
    run_dir.mkdir()
    shift = args.storage_report_shift if writing else args.idle_tick_shift
    marker = "W" if writing else "T"
    blob = patch_params(block, MODES[workload], False, shift, mem,
                        args.storage_ram_ws_mib * MIB if writing else 0, args.seed + rep,
                        disk_ws=args.disk_ws_sectors if writing else 0, disk_chunk=args.disk_chunk_sectors)
    src_img, dst_img = run_dir / "src.img", run_dir / "dst.img"
    copy_sparse(base, src_img)
    with open(src_img, "r+b") as f:
        f.write(blob)  # sector 0, the boot sector, and 1, the storage guest, in piece 0
    with open(dst_img, "wb") as f:
        f.truncate(args.disk_size)  # libvirt pre-creates the destination's volume: same size, empty
    src_ser, dst_ser = run_dir / "src-serial.txt", run_dir / "dst-serial.txt"
    src_qmp_path, dst_qmp_path = run_dir / "src.qmp", run_dir / "dst.qmp"
    export = "drive-virtio-disk0" if args.disk_bus == "virtio" else "drive-ide0-0-0"
    job = export  # libvirt names the job after the disk's drive alias

    started = Started()
    result: dict = {"workload": workload, "rep": rep, "ok": False, "disk_allocated_bytes": allocated_bytes(src_img)}
    src_qmp = dst_qmp = None
    try:
        deadline = time.monotonic() + 30
        dst = started.popen(storage_qemu_cmd(args.qemu, args.mem_mib, dst_img, dst_ser, dst_qmp_path, True,
                                             args.disk_bus, args.disk_discard), run_dir / "dst.log")
        src = started.popen(storage_qemu_cmd(args.qemu, args.mem_mib, src_img, src_ser, src_qmp_path, False,
                                             args.disk_bus, args.disk_discard), run_dir / "src.log")
        dst_qmp = Qmp(dst_qmp_path, deadline, dst)
        src_qmp = Qmp(src_qmp_path, deadline, src)
        procs = [src, dst]

        def guest_error(text: str) -> str | None:
            if "E" not in text:
                return None
            after = text.split("E", 1)[1]
            return f"the guest's int 13h write failed with status {ord(after[0]):#04x}" if after else \
                "the guest failed to load its second sector or to write (E on serial)"

        def ready():
            text = serial_text(src_ser)
            if (err := guest_error(text)):
                raise BenchError(err)
            return "D" in text and text.split("D", 1)[1].count(marker) >= 3
        t_boot = time.monotonic()
        wait_for(f"{workload} guest ready on serial ('D' and three '{marker}')", ready,
                 time.monotonic() + args.ready_timeout, procs)
        result["guest_ready_s"] = round(time.monotonic() - t_boot, 3)

        # Destination, libvirt's Prepare: parameters, NBD server and export, then migrate-incoming.
        set_migration_options(dst_qmp, args.max_bandwidth, args.downtime_limit)
        set_migration_options(src_qmp, args.max_bandwidth, args.downtime_limit)
        nbd_port = free_port()
        dst_qmp.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}})
        dst_qmp.cmd("block-export-add", type="nbd", id=f"libvirt-nbd-{DISK_NODE}", **{"node-name": DISK_NODE},
                    name=export, writable=True)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst_qmp.cmd("migrate-incoming", uri=uri)
        wait_for("destination listening", lambda: port_listening(port), time.monotonic() + 10, procs)

        # Source, libvirt's Perform: the mirror to the export, READY, then the migration.
        cpu_before = {"src": proc_cpu_seconds(src.pid), "dst": proc_cpu_seconds(dst.pid)}
        machine_before = machine_cpu_ticks()
        t0 = time.time()  # host wall clock, as QMP's event timestamps
        src_qmp.cmd("blockdev-add", driver="nbd", **{"node-name": MIRROR_TARGET_STORAGE_NODE},
                    server={"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)}, export=export,
                    **{"auto-read-only": True, "discard": "unmap"})
        src_qmp.cmd("blockdev-add", driver="raw", **{"node-name": MIRROR_TARGET_NODE, "read-only": False},
                    file=MIRROR_TARGET_STORAGE_NODE,
                    **({"discard": "unmap"} if args.disk_discard == "unmap" else {}))
        t_mirror = time.time()
        src_qmp.cmd("blockdev-mirror", **{"job-id": job, "device": DISK_NODE, "target": MIRROR_TARGET_NODE,
                                          "sync": "full", "auto-finalize": True, "auto-dismiss": False})
        of_job = lambda e: e.get("data", {}).get("device") == job  # noqa: E731
        ev = src_qmp.wait_event("mirror READY", {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"},
                                time.monotonic() + args.mirror_timeout, of_job, procs)
        if ev["event"] != "BLOCK_JOB_READY":
            raise BenchError(f"the mirror ended before READY: {ev}")
        t_ready = ev_time(ev)
        jobs_at_ready = src_qmp.cmd("query-block-jobs")
        ready_job = next((j for j in jobs_at_ready if j.get("device") == job), {})
        t_migrate = time.time()
        src_qmp.cmd("migrate", uri=uri)
        ev = src_qmp.wait_event("migration end", "MIGRATION", time.monotonic() + args.migration_timeout,
                                lambda e: e["data"]["status"] in ("completed", "failed", "cancelled"), procs)
        if ev["data"]["status"] != "completed":
            info = src_qmp.cmd("query-migrate")
            raise BenchError(f"migration {ev['data']['status']}: {info.get('error-desc', info)}")
        t_completed = ev_time(ev)
        # libvirt, right after: cancel the READY mirror (no force) and wait for it to finish.
        src_qmp.cmd("block-job-cancel", device=job)
        ev = src_qmp.wait_event("mirror completion", {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"},
                                time.monotonic() + 60, of_job, procs)
        t_mirror_done = ev_time(ev)
        mirror_end_event = ev["event"]
        if ev["event"] == "BLOCK_JOB_COMPLETED" and ev["data"].get("error"):
            raise BenchError(f"the mirror failed at its completion: {ev['data']['error']}")
        machine_after = machine_cpu_ticks()
        cpu_after = {"src": proc_cpu_seconds(src.pid), "dst": proc_cpu_seconds(dst.pid)}
        # Harness time inside the pause, taken out of it below: the job's last figures and the
        # NBD connection's byte counters, read before the client node (and connection) goes.
        x0 = time.time()
        final_job = next((j for j in src_qmp.cmd("query-block-jobs") if j.get("device") == job), {})
        nbd_tcp = tcp_counters(nbd_port)
        x1 = time.time()
        src_qmp.cmd("job-dismiss", id=job)
        src_qmp.cmd("blockdev-del", **{"node-name": MIRROR_TARGET_NODE})
        src_qmp.cmd("blockdev-del", **{"node-name": MIRROR_TARGET_STORAGE_NODE})
        # Destination, libvirt's Finish: its side completed, NBD server stopped, then cont.
        dst_qmp.wait_event("destination's side completed", "MIGRATION", time.monotonic() + 30,
                           lambda e: e["data"]["status"] in ("completed", "failed"), procs)
        if dst_qmp.find_event({"MIGRATION"}, lambda e: e["data"]["status"] == "failed"):
            raise BenchError("the destination's side of the migration failed")
        dst_qmp.cmd("nbd-server-stop")

        # Both paused: the disk and RAM must be equal on both sides (harness time, not pause).
        v0 = time.time()
        cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(src_img), str(dst_img)],
                             capture_output=True, text=True, timeout=300)
        disk_equal = cmp.returncode == 0
        disk_why = (cmp.stdout + cmp.stderr).strip()
        src_status = src_qmp.cmd("query-status").get("status")
        dst_paused = dst_qmp.cmd("query-status").get("status")
        ram_equal, zero_high, ram_why = ram_compare(src_qmp, dst_qmp, mem, run_dir)
        src_state = writer_state(src_img, src_qmp, args, run_dir / "src-ws.bin") if writing else None
        v1 = time.time()
        dst_qmp.cmd("cont")
        ev = dst_qmp.wait_event("destination RESUME", "RESUME", time.monotonic() + 30, None, procs)
        t_resume = ev_time(ev)
        t_stop = event_time(src_qmp, "STOP")
        if not disk_equal:
            raise BenchError(f"VERIFICATION FAILED: qemu-img compare of the images: {disk_why}")
        if not ram_equal:
            raise BenchError(f"VERIFICATION FAILED: {ram_why}")

        # Statistics (after cont: nothing here is in the pause).
        info = wait_for("completed migration's statistics",
                        lambda: (i := src_qmp.cmd("query-migrate")).get("total-time", 0) > 0 and i,
                        time.monotonic() + 10, procs)
        ram = info.get("ram", {})
        excluded = (x1 - x0) + (v1 - v0)
        tick = os.sysconf("SC_CLK_TCK")
        busy = (machine_after[0] - machine_before[0]) / tick
        window = (machine_after[1] - machine_before[1]) / tick
        ours = sum(cpu_after[k][i] - cpu_before[k][i] for k in ("src", "dst") for i in (0, 1))
        to_dst = sum(c["bytes_received"] for c in nbd_tcp)
        from_dst = sum(c["bytes_sent"] for c in nbd_tcp)
        result.update({
            "disk_size": args.disk_size, "disk_bus": args.disk_bus, "disk_discard": args.disk_discard,
            "nbd_transport": "tcp 127.0.0.1",
            "total_ms": round((t_mirror_done - t0) * 1000, 1),
            "mirror_ms": round((t_ready - t0) * 1000, 1),
            "mirror_cmd_to_ready_ms": round((t_ready - t_mirror) * 1000, 1),
            "ready_to_migrate_ms": round((t_migrate - t_ready) * 1000, 1),
            "migration_ms": round((t_completed - t_migrate) * 1000, 1),
            "qemu_total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "cancel_ms": round((t_mirror_done - t_completed) * 1000, 1),
            "pause_ms": ms_between(t_stop, t_resume - excluded) if t_stop else None,
            "pause_raw_ms": ms_between(t_stop, t_resume),
            "pause_excluded_ms": round(excluded * 1000, 1),
            "mirror_end_event": mirror_end_event,
            "ram_transferred": ram.get("transferred"),
            "ram_total": ram.get("total"),
            "pages_normal": ram.get("normal"),
            "pages_duplicate_zero": ram.get("duplicate"),
            "downtime_bytes": ram.get("downtime-bytes"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "mirror_len_at_ready": ready_job.get("len"),
            "mirror_offset": final_job.get("offset"),
            "mirror_len": final_job.get("len"),
            "nbd_connections": len(nbd_tcp),
            "disk_wire_to_dst": to_dst,
            "disk_wire_from_dst": from_dst,
            "disk_wire_bytes": to_dst + from_dst,
            "dst_disk_allocated_bytes": allocated_bytes(dst_img),
            "src_vmhwm_kib": proc_status(src.pid).get("VmHWM"),
            "dst_vmhwm_kib": proc_status(dst.pid).get("VmHWM"),
            "src_cpu_s": round(sum(cpu_after["src"]) - sum(cpu_before["src"]), 3),
            "dst_cpu_s": round(sum(cpu_after["dst"]) - sum(cpu_before["dst"]), 3),
            "others_cpu_pct": round(100 * max(0.0, busy - ours) / window, 1) if window > 0 else None,
            "src_status_paused": src_status, "dst_status_paused": dst_paused,
        })
        if len(nbd_tcp) != 1:
            raise BenchError(f"{len(nbd_tcp)} NBD connections on port {nbd_port} where one was expected")

        # The destination goes on: more markers after cont.
        n_dst = serial_text(dst_ser).count(marker)
        wait_for(f"destination printing '{marker}' after cont",
                 lambda: serial_text(dst_ser).count(marker) >= n_dst + 2, time.monotonic() + 30, procs)
        if (err := guest_error(serial_text(dst_ser))):
            raise BenchError(f"on the destination: {err}")
        dst_status = dst_qmp.cmd("query-status").get("status")
        checks = [disk_equal, ram_equal, dst_status == "running", src_status == "postmigrate",
                  dst_paused == "paused"]
        verify = [f"qemu-img compare: {disk_why}", ram_why,
                  f"source {src_status} and destination {dst_paused} while compared, destination {dst_status} after cont"]
        if writing:
            # Stopped, the destination's disk and counters continue the source's passes.
            dst_qmp.cmd("stop")
            dst_state = writer_state(dst_img, dst_qmp, args, run_dir / "dst-ws.bin")
            src_w, dst_w = serial_text(src_ser).count("W"), serial_text(dst_ser).count("W")
            c_src, c_dst = src_state["passes"], dst_state["passes"]
            src_ok = src_w in (c_src >> shift, (c_src - 1) >> shift)
            cont_ok = src_w + dst_w in (c_dst >> shift, (c_dst - 1) >> shift) and c_dst > c_src
            checks += [src_state["ok"], dst_state["ok"], src_ok, cont_ok]
            verify += [f"source at the switch: {src_state['why']}", f"destination stopped later: {dst_state['why']}",
                       f"'W' reports: source {src_w} for {c_src} passes, source+destination {src_w + dst_w} for "
                       f"{c_dst} (one per {1 << shift})"]
            result.update({"passes_at_switch": c_src, "passes_at_stop": c_dst})
        else:
            plausible = zero_high > ((mem - FILL_START) // PAGE) * 9 // 10
            checks.append(plausible)
            verify.append(f"'T' reports on the destination after cont: {serial_text(dst_ser).count('T') - n_dst}")
        result["verify"] = "; ".join(verify)
        result["verified"] = all(checks)
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


def ev_time(e: dict) -> float:
    ts = e["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


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
    if lbs:
        print(f"loopback TCP, one stream of {lbs[0]['bytes'] / (1 << 30):.1f} GiB each, MiB/s: "
              + ", ".join(f"{lb['tool']} {lb['when']} {lb['mib_per_s']:.0f}" for lb in lbs))
        print(f"loopback TCP limit: best {report['loopback_best_mib_per_s']:.0f} MiB/s, "
              f"median {report['loopback_median_mib_per_s']:.0f} MiB/s")
    for rt in report["rtt"]:
        print(f"loopback round trip ({rt['when']}), {rt['request_bytes']} B request / {rt['reply_bytes']} B reply, "
              f"TCP_NODELAY, {rt['count']} round trips: p50 {rt['p50_us']:.1f} us, p99 {rt['p99_us']:.1f} us, "
              f"max {rt['max_us']:.0f} us (p90 {rt['p90_us']:.1f}, p99.9 {rt['p999_us']:.1f}, mean {rt['mean_us']:.1f})")
    if report["rtt"]:
        rs = report["rtt_summary"]
        print(f"loopback round trip, median of {len(report['rtt'])} measures: p50 {rs['p50_us']:.1f} us, "
              f"p99 {rs['p99_us']:.1f} us, max {rs['max_us']:.0f} us; our post-copy's targets against it: "
              f"fault p50 <= {2 * rs['p50_us']:.1f} us (2x), p99 <= 1000 us")
    ww = max([8] + [len(r["workload"]) for r in report["runs"]])
    ram_runs = [r for r in report["runs"] if r["workload"] not in STORAGE]
    if ram_runs:
        hdr = (f"{'workload':{ww}} {'rep':>3} {'total ms':>8} {'down ms':>7} {'setup':>5} {'xfer MiB':>8} {'MiB/s':>7} "
               f"{'normal pg':>9} {'zero pg':>7} {'syncs':>5} {'srcHWM':>7} {'dstHWM':>7} {'others':>6}  verified")
        print(hdr)
        print("-" * len(hdr))
    for r in ram_runs:
        if not r["ok"]:
            print(f"{r['workload']:{ww}} {r['rep']:>3}  FAILED: {r.get('error')}")
            continue
        print(f"{r['workload']:{ww}} {r['rep']:>3} {r['total_ms']:>8} {fmt(r['downtime_ms']):>7} {fmt(r['setup_ms']):>5} "
              f"{r['ram_transferred'] / MIB:>8.1f} {fmt(r['mib_per_s'], '.0f'):>7} {fmt(r['pages_normal']):>9} "
              f"{fmt(r['pages_duplicate_zero']):>7} {fmt(r['dirty_sync_count']):>5} "
              f"{r['src_vmhwm_kib'] // 1024:>6}M {r['dst_vmhwm_kib'] // 1024:>6}M {fmt(r['others_cpu_pct']):>5}%"
              f"  {r['verified']}")
    print("(MiB/s: RAM bytes transferred / (total - setup) time; srcHWM/dstHWM: VmHWM of each QEMU "
          "right after completion;\n others: share of the machine's CPUs busy with other work during "
          "the migration)")
    if any(r["workload"] in STORAGE for r in report["runs"]):
        print_storage_table(report, ww)
    pc_runs = [r for r in report["runs"] if r["ok"] and r["workload"] in POSTCOPY]
    if pc_runs:
        print(f"\npost-copy (scatter guest, migrate-start-postcopy right after migrate; "
              f"one 'S' per {1 << report['params']['scatter_report_shift']} touches)")
        hdr = (f"{'workload':{ww}} {'rep':>3} {'requests':>8} {'blocktime':>9} {'per vCPU':>9} {'bt/req us':>9} "
               f"{'switch':>6} {'pause':>6} {'in pc ms':>8} {'precopy B':>9} {'pc MiB':>6} {'dst pages':>9}")
        print(hdr)
        print("-" * len(hdr))
        for r in pc_runs:
            vcpu = "-" if r["vcpu_blocktime_ms"] is None else ",".join(str(v) for v in r["vcpu_blocktime_ms"])
            print(f"{r['workload']:{ww}} {r['rep']:>3} {fmt(r['postcopy_requests']):>8} {fmt(r['blocktime_ms']):>9} "
                  f"{vcpu:>9} {fmt(r['blocktime_per_request_us'], '.0f'):>9} {fmt(r['switch_after_ms'], '.1f'):>6} "
                  f"{fmt(r['pause_ms'], '.1f'):>6} {fmt(r['postcopy_ms'], '.0f'):>8} {fmt(r['precopy_bytes']):>9} "
                  f"{r['postcopy_bytes'] / MIB if r['postcopy_bytes'] is not None else float('nan'):>6.1f} "
                  f"{fmt(r.get('pages_touched_on_dst')):>9}")
        print("(requests: ram.postcopy-requests of the source; blocktime, per vCPU: postcopy-blocktime and "
              "postcopy-vcpu-blocktime of the\n destination, ms; bt/req: vCPU blocktime / requests; switch: "
              "source's MIGRATION setup event to its STOP, ms;\n pause: source's STOP to destination's RESUME "
              "event, ms; in pc: source's postcopy-active to completed event; precopy B:\n ram.precopy-bytes, "
              "sent before the switch; pc MiB: ram.postcopy-bytes; dst pages: pages the destination touched)")
        lat = [r for r in pc_runs if r["latency_ns"] is not None]
        if not lat:
            print("per-fault latency: not reported by this QEMU (postcopy-latency and postcopy-latency-dist "
                  "came in 10.1)")
        for r in lat:
            print(f"{r['workload']:{ww}} {r['rep']:>3} postcopy-latency {r['latency_ns'] / 1000:.1f} us, "
                  f"non-vCPU {fmt(r['non_vcpu_latency_ns'])} ns, postcopy-latency-dist (faults per [2^N, 2^N+1) us) "
                  f"{r['latency_dist']}")
    for w, s in report["summary"].items():
        if w in STORAGE:
            continue
        tot, down, rate = s["total_ms"], s["downtime_ms"], s["mib_per_s"]
        print(f"{w:{ww}} over {s['runs']} run(s), median [min-max]: total {tot['median']} [{tot['min']}-{tot['max']}] ms, "
              f"downtime {down['median']} [{down['min']}-{down['max']}] ms, "
              f"{fmt(rate['median'], '.0f')} [{fmt(rate['min'], '.0f')}-{fmt(rate['max'], '.0f')}] MiB/s")
        if w in POSTCOPY:
            def mm(key, spec=".0f"):
                v = s[key]
                return f"{fmt(v['median'], spec)} [{fmt(v['min'], spec)}-{fmt(v['max'], spec)}]"
            print(f"{'':{ww}}   requests {mm('postcopy_requests')}, vCPU blocktime {mm('vcpu_blocktime_ms')} ms, "
                  f"{mm('blocktime_per_request_us')} us per request, pause {mm('pause_ms', '.1f')} ms, "
                  f"in post-copy {mm('postcopy_ms')} ms")


STORAGE_SUMMARY_KEYS = ["total_ms", "mirror_ms", "migration_ms", "downtime_ms", "cancel_ms", "pause_ms",
                        "ram_transferred", "disk_wire_bytes", "disk_wire_to_dst", "disk_wire_from_dst",
                        "mirror_offset", "dst_disk_allocated_bytes", "src_cpu_s", "dst_cpu_s", "others_cpu_pct"]


def print_storage_table(report: dict, ww: int) -> None:
    st = report["params"]["storage"]
    print(f"\nstorage: {st['disk_size'] / MIB:.0f} MiB raw disk ({st['disk_layout']}; in {st['disk_dir_fs']}), "
          f"{st['disk_bus']}, mirror to an NBD export over {st['nbd_transport']}; writer: {st['disk_ws_sectors']} "
          f"sectors from LBA {st['disk_first_lba']} and {st['ram_ws_mib']} MiB of RAM per pass")
    hdr = (f"{'workload':{ww}} {'rep':>3} {'total ms':>8} {'mirror':>7} {'migr':>6} {'down':>5} {'cancel':>6} "
           f"{'pause':>6} {'RAM MiB':>7} {'NBD MiB':>8} {'to dst B':>10} {'from dst':>8} {'job off':>10} "
           f"{'others':>6}  verified")
    print(hdr)
    print("-" * len(hdr))
    for r in report["runs"]:
        if r["workload"] not in STORAGE:
            continue
        if not r["ok"]:
            print(f"{r['workload']:{ww}} {r['rep']:>3}  FAILED: {r.get('error')}")
            continue
        print(f"{r['workload']:{ww}} {r['rep']:>3} {r['total_ms']:>8.0f} {r['mirror_ms']:>7.0f} {r['migration_ms']:>6.0f} "
              f"{fmt(r['downtime_ms']):>5} {r['cancel_ms']:>6.1f} {fmt(r['pause_ms'], '.1f'):>6} "
              f"{r['ram_transferred'] / MIB:>7.1f} {r['disk_wire_bytes'] / MIB:>8.1f} {r['disk_wire_to_dst']:>10} "
              f"{r['disk_wire_from_dst']:>8} {fmt(r['mirror_offset']):>10} {fmt(r['others_cpu_pct']):>5}%  {r['verified']}")
    print("(total: first blockdev-add to BLOCK_JOB_COMPLETED after the migration; mirror: to BLOCK_JOB_READY; "
          "migr: migrate to the\n MIGRATION completed event; down: QEMU's downtime; cancel: completed event to the "
          "mirror's BLOCK_JOB_COMPLETED;\n pause: source STOP to destination RESUME, less the harness's verification; "
          "RAM: ram.transferred; NBD: TCP payload\n bytes of the NBD connection both ways (to dst / from dst, "
          "tcp_info of the server's socket); job off: the mirror job's offset)")
    for w, s in report["summary"].items():
        if w not in STORAGE:
            continue
        def mm(key, scale=1.0, spec=".0f"):
            v = s[key]
            if v["median"] is None:
                return "-"
            return f"{v['median'] / scale:{spec}} [{v['min'] / scale:{spec}}-{v['max'] / scale:{spec}}]"
        print(f"{w:{ww}} over {s['runs']} run(s), median [min-max]: total {mm('total_ms')} ms, mirror {mm('mirror_ms')} ms, "
              f"downtime {mm('downtime_ms')} ms, pause {mm('pause_ms', spec='.1f')} ms, RAM {mm('ram_transferred', MIB, '.1f')} MiB, "
              f"disk on the wire {mm('disk_wire_bytes', MIB, '.1f')} MiB")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for w in MODES:
        ok = [r for r in runs if r["workload"] == w and r["ok"]]
        if not ok:
            continue
        def spread(key, get=None):
            vals = [v for r in ok if (v := (get(r) if get else r[key])) is not None]
            if not vals:
                return {"median": None, "min": None, "max": None}
            return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

        if w in STORAGE:
            out[w] = {"runs": len(ok), **{k: spread(k) for k in STORAGE_SUMMARY_KEYS},
                      "src_vmhwm_kib": max(r["src_vmhwm_kib"] for r in ok),
                      "dst_vmhwm_kib": max(r["dst_vmhwm_kib"] for r in ok),
                      "all_verified": all(r["verified"] for r in ok)}
            continue

        out[w] = {
            "runs": len(ok),
            "total_ms": spread("total_ms"),
            "downtime_ms": spread("downtime_ms"),
            "mib_per_s": spread("mib_per_s"),
            "src_vmhwm_kib": max(r["src_vmhwm_kib"] for r in ok),
            "dst_vmhwm_kib": max(r["dst_vmhwm_kib"] for r in ok),
            "all_verified": all(r["verified"] for r in ok),
        }
        if w in POSTCOPY:
            for key in ("postcopy_requests", "blocktime_ms", "blocktime_per_request_us", "pause_ms",
                        "postcopy_ms", "switch_after_ms", "precopy_bytes", "postcopy_bytes", "ram_transferred"):
                out[w][key] = spread(key)
            # the sum over vCPUs, one figure per run (this guest has one vCPU)
            out[w]["vcpu_blocktime_ms"] = spread(None, lambda r: sum(r["vcpu_blocktime_ms"])
                                                 if r["vcpu_blocktime_ms"] else None)
    return out


def fs_type(path: Path) -> str:
    """The file system holding `path` (type and mount point), from /proc/mounts."""
    best = ("?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, fstype = parts[1], parts[2]
                if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1]):
                    best = (fstype, mnt)
    except OSError:
        pass
    return f"{best[0]} at {best[1]}"


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
    ap.add_argument("--workloads", default=",".join(PRECOPY_WORKLOADS),
                    help=f"comma-separated: {', '.join(MODES)}, or all (default: {','.join(PRECOPY_WORKLOADS)})")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each workload")
    ap.add_argument("--mem-mib", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--busy-ws-mib", type=int, default=16, help="busy: working set in MiB, from 1 MiB up")
    ap.add_argument("--busy-fill", choices=["random", "zero"], default="random",
                    help="busy: content of RAM outside the working set (vmm-demo's --fill)")
    ap.add_argument("--report-shift", type=int, default=8, help="busy: print 'B' every 2^N passes")
    ap.add_argument("--scatter-report-shift", type=int, default=12,
                    help="postcopy workloads: the guest prints 'S' every 2^N touches")
    ap.add_argument("--seed", type=int, default=0x2545F491, help="xorshift32 seed (plus the repetition)")
    ap.add_argument("--max-bandwidth", type=parse_size, default=100_000_000_000,
                    help="QEMU max-bandwidth in bytes/s (default 100 GB/s, i.e. out of the way)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="QEMU downtime-limit in ms")
    ap.add_argument("--loopback-bytes", type=parse_size, default=4 << 30, help="bytes for each loopback measure")
    ap.add_argument("--loopback-rounds", type=int, default=2,
                    help="loopback measures (python and iperf3) before the migrations; one more follows them")
    ap.add_argument("--no-iperf3", action="store_true", help="skip the iperf3 loopback measure")
    ap.add_argument("--rtt-count", type=int, default=20000,
                    help="round trips in each loopback round-trip measure (scripts/rtt.py), 0 to skip")
    ap.add_argument("--dst-prealloc", action="store_true",
                    help="start the destination with -mem-prealloc (not QEMU's default; for diagnosis)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--ready-timeout", type=float, default=60, help="seconds for a guest to boot and fill RAM")
    ap.add_argument("--migration-timeout", type=float, default=120, help="seconds for one migration")
    ap.add_argument("--poll-interval", type=float, default=0.02, help="query-migrate poll interval, seconds")
    ap.add_argument("--disk-size", type=parse_size, default=1 << 30,
                    help="storage workloads: size of the raw disk (default 1G)")
    ap.add_argument("--disk-piece", type=parse_size, default=1 * MIB,
                    help="storage workloads: pieces 1, 3, 5, ... of this size hold pseudo-random data, the "
                         "others are holes (default 1M; piece 0 holds the boot sectors and the working set)")
    ap.add_argument("--disk-ws-sectors", type=int, default=256,
                    help="storage-writing: sectors each pass writes, from sector 2 (default 256)")
    ap.add_argument("--disk-chunk-sectors", type=int, default=128,
                    help="storage-writing: sectors per int 13h write (at most 128; default 128)")
    ap.add_argument("--storage-ram-ws-mib", type=int, default=16,
                    help="storage-writing: RAM working set walked each pass, from 1 MiB up (0: disk only)")
    ap.add_argument("--storage-report-shift", type=int, default=4,
                    help="storage-writing: the guest prints 'W' every 2^N passes")
    ap.add_argument("--idle-tick-shift", type=int, default=2,
                    help="storage-idle: the guest prints 'T' every 2^N timer wake-ups (18.2 a second)")
    ap.add_argument("--disk-bus", choices=["virtio", "ide"], default="virtio",
                    help="storage workloads: the guest's disk controller (default virtio: virtio-blk-pci)")
    ap.add_argument("--disk-discard", choices=["unmap", "ignore"], default="unmap",
                    help="storage workloads: discard= of the disks' raw format nodes (libvirt's <driver "
                         "discard=...>; default unmap, so the destination keeps the holes; ignore is "
                         "libvirt's default, under which QEMU writes the holes as zeroes on tmpfs)")
    ap.add_argument("--mirror-timeout", type=float, default=300, help="seconds for the mirror to be READY")
    ap.add_argument("--no-loopback", action="store_true",
                    help="skip the loopback TCP and round-trip measures (e.g. one storage run for "
                         "scripts/bench-storage.py)")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, serial output)")
    args = ap.parse_args()

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if workloads == ["all"]:
        workloads = list(MODES)
    bad = [w for w in workloads if w not in MODES]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {list(MODES)}")
    if args.mem_mib * MIB > 0xFFFFF000 or args.mem_mib < 2 + args.busy_ws_mib:
        ap.error("--mem-mib must be below 4 GiB and leave room for the working set above 1 MiB")
    if args.dst_prealloc and any(w in POSTCOPY for w in workloads):
        ap.error("--dst-prealloc cannot go with a post-copy workload: QEMU's post-copy needs the "
                 "destination's RAM not populated")
    if not 0 <= args.report_shift <= 31 or not 0 <= args.scatter_report_shift <= 31:
        ap.error("--report-shift and --scatter-report-shift must be within 0..31")
    if not 0 <= args.storage_report_shift <= 15 or not 0 <= args.idle_tick_shift <= 15:
        ap.error("--storage-report-shift and --idle-tick-shift must be within 0..15 (a 16-bit mask)")
    if any(w in STORAGE for w in workloads):
        if args.disk_piece % PAGE or args.disk_size % (2 * args.disk_piece) or args.disk_size < 2 * args.disk_piece:
            ap.error("--disk-size must be a multiple of twice --disk-piece, itself a multiple of 4096")
        if not 1 <= args.disk_chunk_sectors <= 128 or args.disk_ws_sectors < 1 or \
                args.disk_ws_sectors % args.disk_chunk_sectors:
            ap.error("--disk-ws-sectors must be a positive multiple of --disk-chunk-sectors (1..128)")
        if (DISK_FIRST_LBA + args.disk_ws_sectors) * SECTOR > args.disk_piece or args.disk_ws_sectors > 0xFFFF - 2:
            ap.error("the disk working set (sectors 2 .. 2 + --disk-ws-sectors) must lie in piece 0")
        if args.storage_ram_ws_mib < 0 or args.mem_mib < 2 + args.storage_ram_ws_mib:
            ap.error("--storage-ram-ws-mib must leave room above 1 MiB")
        if args.dst_prealloc:
            ap.error("--dst-prealloc is not implemented for the storage workloads")
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
            "dst_prealloc": args.dst_prealloc, "workloads": workloads,
            "report_shift": args.report_shift, "scatter_report_shift": args.scatter_report_shift,
        },
        "loopback": [],
        "rtt": [],
        "runs": [],
    }
    if any(w in STORAGE for w in workloads):
        report["params"]["storage"] = {
            "disk_size": args.disk_size, "disk_piece": args.disk_piece, "disk_format": "raw",
            "disk_layout": "pieces 1, 3, 5, ... pseudo-random (random.Random(seed)), the others holes; "
                           "sectors 0-1 the guest",
            "disk_dir": str(workdir), "disk_dir_fs": fs_type(workdir),
            "disk_bus": args.disk_bus, "disk_discard": args.disk_discard, "nbd_transport": "tcp 127.0.0.1", "mirror": "blockdev-mirror sync=full",
            "disk_ws_sectors": args.disk_ws_sectors, "disk_first_lba": DISK_FIRST_LBA,
            "disk_chunk_sectors": args.disk_chunk_sectors, "ram_ws_mib": args.storage_ram_ws_mib,
            "storage_report_shift": args.storage_report_shift, "idle_tick_shift": args.idle_tick_shift,
        }
    started = Started()
    try:
        block = build_bootblock(workdir)
        print(f"{version}; work dir {workdir} ({fs_type(workdir)})", flush=True)
        base = None
        if any(w in STORAGE for w in workloads):
            base = workdir / "base.img"
            t = time.monotonic()
            make_base_disk(base, args.disk_size, args.disk_piece, args.seed)
            print(f"base disk: {args.disk_size / MIB:.0f} MiB raw, {allocated_bytes(base) / MIB:.0f} MiB allocated, "
                  f"made in {time.monotonic() - t:.1f} s", flush=True)
        if not args.no_loopback:
            # Unreported warm-up: the first stream of a run was repeatedly the slowest here.
            measure_loopback_python(min(args.loopback_bytes, 512 * MIB), started, workdir)

        def loopback_round(when: str) -> None:
            print(f"loopback TCP and round trip ({when}) ...", flush=True)
            lb = measure_loopback_python(args.loopback_bytes, started, workdir)
            report["loopback"].append(lb | {"when": when})
            if not args.no_iperf3:
                lb = measure_loopback_iperf3(args.loopback_bytes, started, workdir)
                if lb is not None:
                    report["loopback"].append(lb | {"when": when})
            if args.rtt_count > 0:
                report["rtt"].append(measure_rtt(args.rtt_count, started, workdir) | {"when": when})

        for _ in range(0 if args.no_loopback else args.loopback_rounds):
            loopback_round("before")
        # Interleave workloads so slow drift in the machine's load spreads over all of them.
        for rep in range(args.reps):
            for w in workloads:
                print(f"{w} #{rep} ...", flush=True)
                if w in STORAGE:
                    r = run_storage(args, w, rep, block, base, workdir)
                else:
                    r = run_one(args, w, rep, block, workdir)
                report["runs"].append(r)
                if not r["ok"]:
                    print(f"  failed: {r['error']}", flush=True)
        if not args.no_loopback:
            loopback_round("after")
    finally:
        started.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    report["summary"] = summarize(report["runs"])
    if report["loopback"]:
        report["loopback_best_mib_per_s"] = max(lb["mib_per_s"] for lb in report["loopback"])
        report["loopback_median_mib_per_s"] = statistics.median(lb["mib_per_s"] for lb in report["loopback"])
    if report["rtt"]:
        # Median of each measure's percentile; max over all of them.
        report["rtt_summary"] = {
            "measures": len(report["rtt"]),
            "round_trips": sum(rt["count"] for rt in report["rtt"]),
            "p50_us": statistics.median(rt["p50_us"] for rt in report["rtt"]),
            "p99_us": statistics.median(rt["p99_us"] for rt in report["rtt"]),
            "max_us": max(rt["max_us"] for rt in report["rtt"]),
        }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [r for r in report["runs"] if not r["ok"] or not r.get("verified")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
