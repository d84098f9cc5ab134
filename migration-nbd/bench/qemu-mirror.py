#!/usr/bin/env python3
"""QEMU's own mirror (blockdev-mirror in qemu-storage-daemon, driven over QMP), timed the
way examples/mirror-bench.rs times ours, for bench/mirror-bench.sh.

    qemu-mirror.py SOURCE TARGET_SOCKET [--export NAME] [--mode background|write-blocking]
                   [--granularity BYTES] [--writer BYTES_PER_S --writer-cmd PATH]
                   [--block BYTES] [--ready-limit SECONDS]

The source is a raw `file` node, the target an `nbd` node on TARGET_SOCKET (our server or
qemu-nbd); `blockdev-mirror sync=full`, then BLOCK_JOB_READY, `block-job-complete` and
BLOCK_JOB_COMPLETED. One line of key=value results, as mirror-bench prints.

With --writer, the source node is also exported over NBD by the same daemon, and the
writer (`mirror-bench --nbd-writer`, given as --writer-cmd) writes into that export from
the start until READY: writes reach the source through QEMU's block layer, so its dirty
bitmap sees them (a process writing the file directly would bypass it, and the mirror
would miss its writes). Past --ready-limit the job is cancelled and ready=0 printed.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.s.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"qemu-mirror: no QMP socket at {path}")
                time.sleep(0.02)
        # Lines read by hand over the raw socket: a file object over it is unusable after
        # one read timed out, and waiting for an event needs a timeout.
        self.buf = b""
        self.events = []
        greeting = self.read()
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def read(self, deadline=None):
        """The next message, or None if none came by the deadline."""
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.s], [], [], left)[0]:
                    return None
            chunk = self.s.recv(65536)
            if not chunk:
                raise SystemExit("qemu-mirror: qemu-storage-daemon closed QMP")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, command, /, **args):
        self.s.sendall(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        while True:
            m = self.read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise SystemExit(f"qemu-mirror: {command}: {m['error']}")
            elif "return" in m:
                return m["return"]

    def wait_event(self, names, deadline):
        """The first event named in `names`, or None at the deadline."""
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            m = self.read(deadline)
            if m is None:
                return None
            if "event" in m:
                self.events.append(m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("target_socket")
    ap.add_argument("--export", default="")
    ap.add_argument("--mode", default="background", choices=["background", "write-blocking"])
    ap.add_argument("--granularity", type=int, default=0)
    ap.add_argument("--writer", type=int, default=0)
    ap.add_argument("--writer-cmd")
    ap.add_argument("--block", type=int, default=64 << 10)
    ap.add_argument("--ready-limit", type=float, default=300)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="qemu-mirror.", dir="/dev/shm")
    qmp_path = os.path.join(tmp, "qmp.sock")
    src_sock = os.path.join(tmp, "src.sock")
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--chardev", f"socket,path={qmp_path},server=on,wait=off,id=qmp",
            "--monitor", "chardev=qmp",
        ],
        stdin=subprocess.DEVNULL,
    )
    writer = None
    try:
        q = Qmp(qmp_path, time.monotonic() + 20)
        # cache.direct off: the page cache, as our FileBackend and qemu-nbd use it here.
        q.cmd("blockdev-add", driver="file", **{"node-name": "src"}, filename=a.source,
              aio="threads")
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "unix", "path": a.target_socket}, export=a.export)
        if a.writer:
            q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": src_sock}})
            q.cmd("block-export-add", type="nbd", id="srcx", **{"node-name": "src"},
                  name="src", writable=True)
        mirror = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                  "copy-mode": a.mode, "auto-finalize": True, "auto-dismiss": True}
        if a.granularity:
            mirror["granularity"] = a.granularity
        t0 = time.monotonic()
        if a.writer:
            writer = subprocess.Popen(
                [a.writer_cmd, "--nbd-writer", src_sock, "src", "--writer", str(a.writer),
                 "--block", str(a.block)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
        q.cmd("blockdev-mirror", **mirror)
        ev = q.wait_event({"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"},
                          t0 + a.ready_limit)
        t_ready = time.monotonic() - t0
        written = 0
        if writer:
            writer.stdin.close()
            out = writer.stdout.read()
            writer.wait()
            writer = None
            for kv in out.split():
                if kv.startswith("written="):
                    written = int(kv.split("=", 1)[1])
        if ev is None or ev["event"] != "BLOCK_JOB_READY":
            jobs = q.cmd("query-block-jobs")
            if ev is None:
                q.cmd("block-job-cancel", device="m", force=True)
                q.wait_event({"BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"},
                             time.monotonic() + 30)
            moved = jobs[0]["offset"] if jobs else 0
            size = os.path.getsize(a.source)
            print(f"ready=0 ready_s={t_ready:.3f} written={written} moved={moved} "
                  f"recopied={max(moved - size, 0)}")
            return
        # Bytes the job moved so far (offset): the disk once plus what it copied again.
        moved_ready = ev["data"].get("offset", 0)
        q.cmd("block-job-complete", device="m")
        done = q.wait_event({"BLOCK_JOB_COMPLETED"}, time.monotonic() + 120)
        total = time.monotonic() - t0
        if done is None or "error" in done["data"]:
            raise SystemExit(f"qemu-mirror: did not complete: {done}")
        # The job's length grows by what it copies again; the disk's size does not.
        size = os.path.getsize(a.source)
        moved = done["data"]["offset"]
        print(
            f"ready=1 size={size} ready_s={t_ready:.3f} total_s={total:.3f} "
            f"rate_mib_s={size / total / 1048576:.0f} moved={moved} "
            f"recopied={max(moved_ready - size, 0)} written={written}"
        )
        q.cmd("quit")
    finally:
        if writer:
            writer.kill()
        try:
            qsd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            qsd.kill()
        for f in (qmp_path, src_sock):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
        os.rmdir(tmp)


if __name__ == "__main__":
    sys.exit(main())
