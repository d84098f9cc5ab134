#!/usr/bin/env python3
"""Loopback TCP limits for the pre-copy benchmark (scripts/bench-precopy.sh).

One TCP connection over 127.0.0.1, sender and receiver in two processes, kernel copies
only. Three measures, because a migration is bounded by more than the link:

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
import time


def receive(conn, mode, mem, total, done):
    """The receiving process: reads everything, then writes the byte count to `done`."""
    got = 0
    if mode == "link":
        v = memoryview(bytearray(4 << 20))
        while True:
            n = conn.recv_into(v)
            if n == 0:
                break
            got += n
    else:
        # An anonymous mapping: untouched until the kernel copies into it.
        dst = mmap.mmap(-1, mem)
        if mode == "ram-to-ram":
            dst.write(b"\x01" * mem)
        os.write(done, b"r")  # ready: the sender starts its clock now
        v = memoryview(dst)
        while got < total:
            n = conn.recv_into(v[got:], min(1 << 20, total - got))
            if n == 0:
                break
            got += n
        v.release()
    os.write(done, str(got).encode())


def run(mode, mem):
    total = 4 << 30 if mode == "link" else mem
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    rd, wr = os.pipe()
    # Two processes, as a migration has: one interpreter lock would serialise them.
    pid = os.fork()
    if pid == 0:
        try:
            c, _ = srv.accept()
            receive(c, mode, mem, total, wr)
        finally:
            os._exit(0)
    srv.close()
    os.close(wr)
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "link":
            src = memoryview(b"\x5a" * (4 << 20))
        else:
            src = memoryview(bytearray(os.urandom(mem)))
            assert os.read(rd, 1) == b"r", "the receiver did not get ready"
        t0 = time.perf_counter()
        sent = 0
        if mode == "link":
            while sent < total:
                s.sendall(src)
                sent += len(src)
        else:
            for off in range(0, total, 1 << 20):
                s.sendall(src[off:off + (1 << 20)])
                sent += min(1 << 20, total - off)
        s.shutdown(socket.SHUT_WR)
        got = int(os.read(rd, 32) or b"0")
        dt = time.perf_counter() - t0
        s.close()
    finally:
        os.waitpid(pid, 0)
        os.close(rd)
    assert got == sent, f"received {got} of {sent} bytes"
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
