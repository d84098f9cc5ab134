#!/usr/bin/env python3
"""Loopback TCP limits for the pre-copy benchmark (scripts/bench-precopy.sh).

One TCP connection over 127.0.0.1, sender and receiver threads of one process, kernel
copies only. Three measures, because a migration is bounded by more than the link:

  link          4 MiB writes from one buffer into one 4 MiB receive buffer, over and over:
                the socket's rate with both ends in cache (what iperf3 measures).
  ram-to-fresh  MEM bytes sent from a filled buffer in 1 MiB writes, received into a
                buffer never touched before: what moving guest RAM to a destination whose
                RAM is untouched costs at the least (every page faults in on arrival).
  ram-to-ram    the same into a buffer written beforehand (RAM already populated).

  python3 scripts/loopback.py [MEM_MIB] [link|ram-to-fresh|ram-to-ram ...]
"""
import mmap
import os
import socket
import sys
import threading
import time


def run(mode, mem):
    chunk = 1 << 20
    total = 4 << 30 if mode == "link" else mem
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    if mode == "link":
        src = memoryview(b"\x5a" * (4 << 20))
        dst = None
    else:
        src = memoryview(bytearray(os.urandom(mem)))
        # An anonymous mapping: untouched until the kernel copies into it.
        dst = mmap.mmap(-1, mem)
        if mode == "ram-to-ram":
            dst.write(b"\x01" * mem)
    got = [0]

    def sink():
        c, _ = srv.accept()
        if dst is None:
            v = memoryview(bytearray(4 << 20))
            while True:
                n = c.recv_into(v)
                if n == 0:
                    break
                got[0] += n
        else:
            v = memoryview(dst)
            while got[0] < total:
                n = c.recv_into(v[got[0]:], min(chunk, total - got[0]))
                if n == 0:
                    break
                got[0] += n
            v.release()
        c.close()

    t = threading.Thread(target=sink)
    t.start()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    sent = 0
    if dst is None:
        while sent < total:
            s.sendall(src)
            sent += len(src)
    else:
        for off in range(0, total, chunk):
            s.sendall(src[off:off + chunk])
            sent += min(chunk, total - off)
    s.close()
    t.join()
    dt = time.perf_counter() - t0
    srv.close()
    assert got[0] == sent, f"received {got[0]} of {sent} bytes"
    print(f"loopback_tcp {mode:<12} {sent / dt / 1e6:6.0f} MB/s ({sent >> 20} MiB in {dt * 1e3:.0f} ms)")


def main():
    mem = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 256 << 20
    modes = sys.argv[2:] or ["link", "ram-to-fresh", "ram-to-ram"]
    for m in modes:
        if m not in ("link", "ram-to-fresh", "ram-to-ram"):
            sys.exit(f"unknown measure {m!r}")
        run(m, mem)


if __name__ == "__main__":
    main()
