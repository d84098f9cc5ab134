#!/usr/bin/env bash
# Throughput of NBD servers and clients, measured in one run on one machine:
#   servers: migration-nbd serve, qemu-nbd, nbdkit file -- each serving its own copy of
#            the same file, driven by the same client (nbdcopy);
#   clients: migration-nbd copy and nbdcopy (with --flush, as our copy always flushes), both
#            against qemu-nbd, with every file of these cases in /dev/shm so that the disk
#            does not hide the clients' own cost.
# Rounds are interleaved (A B C, A B C...) so that load from other processes hits every
# contender alike; the median of the rounds is printed, in MiB/s of export data.
#
# Usage: bench/nbd-throughput.sh [SIZE_MIB] [ROUNDS]      (defaults 1024 and 5)
# Needs: qemu-nbd, nbdkit, nbdcopy (scripts/setup.sh). Builds migration-nbd in release.
set -euo pipefail

SIZE_MIB=${1:-1024}
ROUNDS=${2:-5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

for t in qemu-nbd nbdkit nbdcopy; do
    command -v "$t" >/dev/null || { echo "bench: $t not installed (run scripts/setup.sh)" >&2; exit 1; }
done

(cd "$root" && cargo build --release -q -p migration-nbd)
ours="$root/target/release/migration-nbd"

work=$(mktemp -d /tmp/nbd-bench.XXXXXX)
shm=$(mktemp -d /dev/shm/nbd-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work" "$shm"
}
trap cleanup EXIT

wait_sock() {
    local deadline=$((SECONDS + 20))
    until [ -S "$1" ] && nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "bench: $1 never came up" >&2; exit 1; }
        sleep 0.05
    done
}

echo "bench: building a ${SIZE_MIB} MiB source file of random data in $work" >&2
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/src.img"
for n in ours qemu nbdkit; do
    cp "$work/src.img" "$work/$n.img"
done
cp "$work/src.img" "$shm/src.img"
cp "$work/src.img" "$shm/qemuc.img"
sync

uri() { echo "nbd+unix:///?socket=$work/$1.sock"; }

"$ours" serve "$work/ours.img" --listen "unix:$work/ours.sock" 2>/dev/null &
pids+=($!)
qemu-nbd -f raw -t --shared=16 -k "$work/qemu.sock" "$work/qemu.img" &
pids+=($!)
nbdkit -f -U "$work/nbdkit.sock" file file="$work/nbdkit.img" &
pids+=($!)
qemu-nbd -f raw -t --shared=16 -k "$work/qemuc.sock" "$shm/qemuc.img" &
pids+=($!)
for n in ours qemu nbdkit qemuc; do wait_sock "$work/$n.sock"; done

for n in ours qemu nbdkit; do
    mc=$(nbdinfo "$(uri $n)" | awk '/can_multi_conn/ {print $2}')
    echo "bench: $n can_multi_conn=$mc" >&2
done

# Runs a command, prints the MiB/s it achieved for SIZE_MIB.
timed() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$SIZE_MIB $t0 $t1" | awk '{printf "%.0f\n", $1 / ($3 - $2)}'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

declare -A res
run_case() { # name command...
    local name=$1
    shift
    res[$name]+="$(timed "$@") "
}

# Warm-up round (page cache, first allocation of the write targets), not counted.
for n in ours qemu nbdkit; do
    nbdcopy "$(uri $n)" null: >/dev/null
    nbdcopy "$work/src.img" "$(uri $n)"
done
sync

for r in $(seq "$ROUNDS"); do
    echo "bench: round $r/$ROUNDS" >&2
    for n in ours qemu nbdkit; do
        run_case "read/$n" nbdcopy "$(uri $n)" null:
    done
    for n in ours qemu nbdkit; do
        run_case "write/$n" nbdcopy "$work/src.img" "$(uri $n)"
        sync
    done
    # Clients against qemu-nbd (file in /dev/shm), reading into and writing from /dev/shm.
    # Which client goes first alternates between rounds.
    if ((r % 2)); then order="nbdcopy ours"; else order="ours nbdcopy"; fi
    for c in $order; do
        rm -f "$shm/out.img"
        if [ "$c" = ours ]; then
            run_case "client-read/ours" "$ours" copy "$(uri qemuc)" "$shm/out.img"
        else
            run_case "client-read/nbdcopy" nbdcopy --flush "$(uri qemuc)" "$shm/out.img"
        fi
        cmp "$shm/out.img" "$shm/qemuc.img"
    done
    rm -f "$shm/out.img"
    for c in $order; do
        if [ "$c" = ours ]; then
            run_case "client-write/ours" "$ours" copy "$shm/src.img" "$(uri qemuc)"
        else
            run_case "client-write/nbdcopy" nbdcopy --flush "$shm/src.img" "$(uri qemuc)"
        fi
    done
done
cmp "$shm/qemuc.img" "$shm/src.img"

cmp "$work/ours.img" "$work/src.img"
cmp "$work/qemu.img" "$work/src.img"

echo
echo "NBD throughput, ${SIZE_MIB} MiB, median of $ROUNDS interleaved rounds (MiB/s); $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-24s %8s   %s\n" case median rounds
for k in read/ours read/qemu read/nbdkit write/ours write/qemu write/nbdkit \
    client-read/ours client-read/nbdcopy client-write/ours client-write/nbdcopy; do
    printf "%-24s %8s   %s\n" "$k" "$(echo "${res[$k]}" | tr ' ' '\n' | grep . | median)" "${res[$k]}"
done
