#!/bin/sh
# End-to-end pre-copy figures: `vmm-demo demo --json` (release build) migrating a guest
# between two processes over loopback, for an idle guest (zero RAM), random RAM and a busy
# writer, next to the raw loopback TCP rate measured in the same run.
#
#   scripts/bench-precopy.sh [MEM] [RUNS]      (defaults: 256M, 3)
#
# The loopback limits are measured first: see scripts/loopback.py.
#
# Prints one line per run: workload, guest, total ms, downtime ms (the engine's pause; the
# guest's pause with the demo's oracle checks, and those checks, in brackets), MB on the wire,
# throughput MB/s (bytes on the wire over total time, setup included), the bulk pass's
# rate, passes, verified.
set -eu
MEM=${1:-256M}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
cargo build -q --release -p vmm-demo
BIN=target/release/vmm-demo

case "$MEM" in
    *G) MIB=$(( ${MEM%G} * 1024 )) ;;
    *M) MIB=${MEM%M} ;;
    *) echo "MEM is a size in M or G, not $MEM" >&2; exit 1 ;;
esac

echo "# loopback TCP limits (scripts/loopback.py): the link, and moving $MEM into fresh / populated RAM"
python3 scripts/loopback.py "$MIB"
if [ -e /dev/kvm ]; then
    # The same with a KVM guest walking its RAM on the side, as it does during the KVM rows.
    $BIN run --guest kvm --mem "$MEM" --working-set 4K --duration 10m --quiet >/dev/null 2>&1 &
    GUEST=$!
    sleep 1
    echo "# the same while a KVM guest runs (pid $GUEST)"
    python3 scripts/loopback.py "$MIB" || true
    kill "$GUEST" 2>/dev/null || true
    wait "$GUEST" 2>/dev/null || true
fi

ROW=$(mktemp)
trap 'rm -f "$ROW"' EXIT
cat >"$ROW" <<'PY'
import json, sys
v = json.load(sys.stdin)
name = sys.argv[1]
if v.get("error"):
    print(name, "ERROR", v["error"])
    sys.exit(0)
c = v["oracle_checks"]
b = v["iteration_details"][0]
print(f"{name:<24} total {v['total_ms']:7.1f} ms  downtime {v['downtime_ms']:7.2f} ms"
      f" (with checks {v['paused_with_checks_ms']:.2f}:"
      f" src hash {c['source_hash_ms']:.1f}, dst check {c['destination_check_ms']:.1f})"
      f"  wire {v['bytes_on_wire'] / 1e6:8.1f} MB  {v['throughput_mb_s']:7.0f} MB/s"
      f"  bulk {b['bytes'] / b['ms'] / 1e3:6.0f} MB/s"
      f"  passes {v['iterations']}  verified {v['verified']}")
PY
row() { python3 "$ROW" "$1"; }

# "idle" and "random" guests halt (working set 0), as QEMU's guests for the same workloads
# do after filling RAM, so the migration has both cores. A KVM guest walking even one page
# keeps a core busy (nested virtualisation): the "walking" rows measure that case, and the
# busy rows a 16 MiB working set dirtied all along.
for i in $(seq "$RUNS"); do
    for G in kvm sw; do
        if [ $G = kvm ]; then GA="--guest kvm"; else GA="--guest software"; fi
        for FILL in zero random; do
            $BIN demo --json $GA --mem "$MEM" --fill $FILL --working-set 0 --run-before 300ms --run-after 300ms | row "$G-idle-$FILL"
            $BIN demo --json $GA --mem "$MEM" --fill $FILL --working-set 0 --no-hash-check --run-before 300ms --run-after 300ms | row "$G-idle-$FILL-nochk"
        done
    done
    # Destination RAM populated before the migration (QEMU: -mem-prealloc, compare.py
    # --dst-prealloc): no page fault on arrival.
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 0 --dst-prealloc --no-hash-check --run-before 300ms --run-after 300ms | row kvm-idle-random-prealloc-nochk
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 4K --no-hash-check --run-before 300ms --run-after 300ms | row kvm-walking-4K-random-nochk
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 16M --run-before 300ms --run-after 300ms | row kvm-busy-16M
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 16M --no-hash-check --run-before 300ms --run-after 300ms | row kvm-busy-16M-nochk
    $BIN demo --json --guest kvm --mem "$MEM" --fill random --working-set 16M --zstd --delta-cache 64M --no-hash-check --run-before 300ms --run-after 300ms | row kvm-busy-16M-zstd-delta-nochk
done
