#!/bin/sh
# End-to-end pre-copy figures: `vmm-demo demo --json` (release build) migrating a guest
# between two processes over loopback, for an idle guest (zero RAM), random RAM and a busy
# writer, next to the raw loopback TCP rate measured in the same run.
#
#   scripts/bench-precopy.sh [MEM] [RUNS]      (defaults: 256M, 3)
#
# The demo guest always dirties its working set; "idle" is a 4 KiB one (one page).
#
# Prints one line per run: workload, guest, total ms, downtime ms, MB on the wire,
# throughput MB/s (bytes on the wire over total time, setup included), the bulk pass's
# rate, passes, verified.
set -eu
MEM=${1:-256M}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
cargo build -q --release -p vmm-demo
BIN=target/release/vmm-demo

echo "# loopback TCP, one connection, 4 MiB writes (python sender, kernel copy)"
python3 - <<'PY'
import socket, threading, time
N = 4 << 30
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
def sink():
    c, _ = srv.accept()
    buf = bytearray(4 << 20); v = memoryview(buf); got = 0
    while True:
        n = c.recv_into(v)
        if n == 0: break
        got += n
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
data = b"\x5a" * (4 << 20)
t0 = time.perf_counter(); sent = 0
while sent < N:
    s.sendall(data); sent += len(data)
s.close(); t.join(); dt = time.perf_counter() - t0
print(f"loopback_tcp {sent/dt/1e6:.0f} MB/s ({sent>>20} MiB in {dt*1e3:.0f} ms)")
PY

ROW=$(mktemp)
trap 'rm -f "$ROW"' EXIT
cat >"$ROW" <<'PY'
import json, sys
v = json.load(sys.stdin)
name = sys.argv[1]
if v.get("error"):
    print(name, "ERROR", v["error"])
    sys.exit(0)
d = v["destination"]
b = v["iteration_details"][0]
print(f"{name:<24} total {v['total_ms']:7.1f} ms  downtime {v['downtime_ms']:7.2f} ms"
      f" (w/o checks {v['downtime_without_checks_ms']:.2f})"
      f" (src hash {v.get('hash_ms', 0):.1f}, dst verify {d['verify_ms']:.1f})"
      f"  wire {v['bytes_on_wire'] / 1e6:8.1f} MB  {v['throughput_mb_s']:7.0f} MB/s"
      f"  bulk {b['bytes'] / b['ms'] / 1e3:6.0f} MB/s"
      f"  passes {v['iterations']}  verified {v['verified']}")
PY
row() { python3 "$ROW" "$1"; }

# A KVM vCPU spins on a core of its own whatever its working set (nested virtualisation,
# port exits): on a 2-core host the migration then has one core left. The software guest,
# paced to 1000 pages/s, leaves both cores to the migration; both are measured.
SW="--guest software --software-page-ns 1000000"
for i in $(seq "$RUNS"); do
    for G in kvm sw; do
        if [ $G = kvm ]; then GA="--guest kvm"; else GA=$SW; fi
        $BIN demo --json $GA --mem "$MEM" --fill zero --working-set 4K --run-before 300ms --run-after 300ms | row "$G-idle-zero"
        $BIN demo --json $GA --mem "$MEM" --fill zero --working-set 4K --no-hash-check --run-before 300ms --run-after 300ms | row "$G-idle-zero-nochk"
        $BIN demo --json $GA --mem "$MEM" --fill random --working-set 4K --run-before 300ms --run-after 300ms | row "$G-random"
        $BIN demo --json $GA --mem "$MEM" --fill random --working-set 4K --no-hash-check --run-before 300ms --run-after 300ms | row "$G-random-nochk"
    done
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 16M --run-before 300ms --run-after 300ms | row kvm-busy-16M
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 16M --zstd --delta-cache 64M --run-before 300ms --run-after 300ms | row kvm-busy-16M-zstd-delta
done
