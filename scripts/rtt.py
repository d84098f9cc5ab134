#!/usr/bin/env python3
"""Loopback round trip of a post-copy page request: 16 bytes out, 4 KiB back, over TCP.

The floor a post-copy fault is measured against: a client sends a 16-byte request over
127.0.0.1, a server in a second process (so on its own core when there is one) answers each
with 4096 bytes, and the client times request to last reply byte, one request in flight at a
time, TCP_NODELAY on both ends, blocking sockets (a wake-up on each side, as a fault served
by a thread pays). After a warm-up it reports p50 / p90 / p99 / p99.9 / max (and min, mean)
of many thousands of round trips.

Both ends are Python, so each round trip includes four interpreted socket calls (some
microseconds on top of the kernel's share); a tool written in Rust or C measures a little
less. Compare numbers measured the same way, in the same run.

  python3 scripts/rtt.py [--count N] [--warmup N] [--request B] [--reply B] [--json]

Standard library only. The server process is ended by its PID when the client is done,
whatever happened.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from array import array


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def serve(request: int, reply: int) -> None:
    """Server side: prints its port, then answers every request-sized read with a reply."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    srv.settimeout(30)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(request))
    out = bytes(range(256)) * (reply // 256) + bytes(reply % 256)
    while True:
        got = 0
        while got < request:
            n = conn.recv_into(buf[got:])
            if n == 0:  # the client is done (or gone): a clean end either way
                return
            got += n
        conn.sendall(out)


def percentile(sorted_ns: array, q: float) -> float:
    """Nearest-rank percentile of sorted samples, in microseconds."""
    k = max(0, min(len(sorted_ns) - 1, int(-(-q * len(sorted_ns) // 100)) - 1))
    return sorted_ns[k] / 1000


def measure(count: int, warmup: int, request: int, reply: int) -> dict:
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--request", str(request), "--reply", str(reply)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"rtt server did not print its port (got {line!r}, exit {server.poll()})")
        sock = socket.create_connection(("127.0.0.1", int(line)), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = b"R" * request
        view = memoryview(bytearray(reply))
        samples = array("q", bytes(8 * count))
        clock = time.perf_counter_ns
        with sock:
            for _ in range(warmup):
                sock.sendall(req)
                recv_exact(sock, view)
            t_start = time.monotonic()
            for i in range(count):
                t0 = clock()
                sock.sendall(req)
                recv_exact(sock, view)
                samples[i] = clock() - t0
            elapsed = time.monotonic() - t_start
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()  # this PID only
            server.wait(timeout=10)
    ordered = array("q", sorted(samples))
    return {
        "request_bytes": request, "reply_bytes": reply, "count": count, "warmup": warmup,
        "seconds": round(elapsed, 3),
        "min_us": ordered[0] / 1000,
        "mean_us": round(sum(ordered) / count / 1000, 2),
        "p50_us": percentile(ordered, 50),
        "p90_us": percentile(ordered, 90),
        "p99_us": percentile(ordered, 99),
        "p999_us": percentile(ordered, 99.9),
        "max_us": ordered[-1] / 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="timed round trips (default 20000)")
    ap.add_argument("--warmup", type=int, default=2000, help="untimed round trips first (default 2000)")
    ap.add_argument("--request", type=int, default=16, help="request bytes (default 16)")
    ap.add_argument("--reply", type=int, default=4096, help="reply bytes (default 4096)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.count < 1 or args.warmup < 0 or args.request < 1 or args.reply < 1:
        ap.error("--count, --request and --reply must be positive, --warmup not negative")
    if args.serve:
        serve(args.request, args.reply)
        return 0
    r = measure(args.count, args.warmup, args.request, args.reply)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"loopback TCP round trip, {r['request_bytes']} B request / {r['reply_bytes']} B reply, "
              f"{r['count']} round trips: p50 {r['p50_us']:.1f} us, p90 {r['p90_us']:.1f}, "
              f"p99 {r['p99_us']:.1f}, p99.9 {r['p999_us']:.1f}, max {r['max_us']:.1f} "
              f"(min {r['min_us']:.1f}, mean {r['mean_us']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
