#!/usr/bin/env bash
# The mirror job against its peers, in one run on one machine:
#   bulk: a disk with 50 % data and 50 % holes (1 MiB runs) and a fully written one, copied
#         into our server and into qemu-nbd by the mirror (examples/mirror-bench.rs), by
#         QEMU's own mirror (blockdev-mirror in qemu-storage-daemon, bench/qemu-mirror.py),
#         by nbdcopy --flush and by qemu-img convert -n, into the same export;
#   writer: the full disk mirrored into our server while a guest writer writes random
#         aligned blocks at 25 % and 75 % of the mirror's own bulk rate (measured in this
#         run; the rate is bytes the writer asks to write per second, and what it reached
#         is printed too), ours in background, auto and write-blocking mode, QEMU's in
#         background and write-blocking (it has no auto mode) with its writer going through
#         an NBD export of the source by the same daemon: time to ready (given up after
#         READY_LIMIT s), bytes copied again, the dirty rate the mirror saw in whole
#         clusters, and the latency write-blocking added to the guest's writes (ours).
#         WRITER_SMALL_CASES repeats some with 4 KiB writes, at 64 KiB and 4 KiB
#         granularity (a 4 KiB write dirties a whole 64 KiB cluster).
# Every file is in /dev/shm so that the disk does not hide the copiers' own cost. Rounds
# are interleaved (A B C, A B C...) so that load from other processes hits each contender
# alike; medians are printed.
#
# Usage: bench/mirror-bench.sh [SIZE_MIB] [ROUNDS]      (defaults 1024 and 3)
# Needs: qemu-nbd, qemu-img, qemu-storage-daemon, nbdcopy, nbdinfo, python3. Builds
# migration-nbd in release.
set -euo pipefail

SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
READY_LIMIT=${READY_LIMIT:-20}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

for t in qemu-nbd qemu-img qemu-storage-daemon nbdcopy nbdinfo fallocate python3; do
    command -v "$t" >/dev/null || { echo "bench: $t not installed" >&2; exit 1; }
done

(cd "$root" && cargo build --release -q -p migration-nbd --bin migration-nbd --example mirror-bench)
ours="$root/target/release/migration-nbd"
mb="$root/target/release/examples/mirror-bench"
qm="$here/qemu-mirror.py"

shm=$(mktemp -d /dev/shm/mirror-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$shm"
}
trap cleanup EXIT

wait_sock() {
    local deadline=$((SECONDS + 20))
    until [ -S "$1" ] && nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "bench: $1 never came up" >&2; exit 1; }
        sleep 0.05
    done
}

echo "bench: building ${SIZE_MIB} MiB disks in $shm" >&2
head -c $((SIZE_MIB << 20)) /dev/urandom >"$shm/full.img"
cp "$shm/full.img" "$shm/half.img"
for ((m = 1; m < SIZE_MIB; m += 2)); do
    fallocate -p -o $((m << 20)) -l $((1 << 20)) "$shm/half.img"
done
for t in ours qemu; do
    truncate -s $((SIZE_MIB << 20)) "$shm/tgt-$t.img"
done

"$ours" serve "$shm/tgt-ours.img" --listen "unix:$shm/ours.sock" 2>/dev/null &
pids+=($!)
qemu-nbd -f raw -t --shared=16 --discard=unmap -k "$shm/qemu.sock" "$shm/tgt-qemu.img" &
pids+=($!)
for t in ours qemu; do wait_sock "$shm/$t.sock"; done
uri() { echo "nbd+unix:///?socket=$shm/$1.sock"; }

declare -A res
add() { if [ -n "$2" ]; then res[$1]+="$2 "; fi; }
median() { # numbers, or "never" for a round not ready in time (then says how many)
    tr ' ' '\n' | grep . | sort -n | awk '$1 == "never" {n++; next} {a[++k]=$1}
        END {if (n) print "never " n "/" n + k (k ? ", else " a[int((k + 1) / 2)] : ""); else print a[int((k + 1) / 2)]}'
}
field() { tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
rate() { # command... -> MiB/s
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$SIZE_MIB $t0 $t1" | awk '{printf "%.0f\n", $1 / ($3 - $2)}'
}

# BULK_MIB=N skips the bulk cases and scales the writers from N MiB/s (an earlier run's
# bulk/full/ours/mirror), for writer cases run apart.
for r in $(seq "$([ -n "${BULK_MIB:-}" ] && echo 0 || echo "$ROUNDS")"); do
    echo "bench: bulk round $r/$ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    for disk in half full; do
        for t in ours qemu; do
            # The order of the three copiers turns with the round.
            case $((r % 4)) in
            0) order="mirror qemu-mirror nbdcopy qemu-img" ;;
            1) order="qemu-mirror nbdcopy qemu-img mirror" ;;
            2) order="nbdcopy qemu-img mirror qemu-mirror" ;;
            3) order="qemu-img mirror qemu-mirror nbdcopy" ;;
            esac
            for c in $order; do
                case $c in
                # Whole process, as the peers are timed (the job's own rate_mib_s
                # leaves its start-up and exit out).
                mirror) add "bulk/$disk/$t/mirror" "$(rate "$mb" "$shm/$disk.img" "$shm/$t.sock")" ;;
                # QEMU's from blockdev-mirror to completion: its daemon's start-up is
                # not the mirror's.
                qemu-mirror) out=$(python3 "$qm" "$shm/$disk.img" "$shm/$t.sock")
                    add "bulk/$disk/$t/qemu-mirror" "$(echo "$out" | field rate_mib_s)" ;;
                nbdcopy) add "bulk/$disk/$t/nbdcopy" "$(rate nbdcopy --flush "$shm/$disk.img" "$(uri "$t")")" ;;
                qemu-img) add "bulk/$disk/$t/qemu-img" "$(rate qemu-img convert -n -f raw -O raw "$shm/$disk.img" "$(uri "$t")")" ;;
                esac
            done
        done
    done
    cmp "$shm/full.img" "$shm/tgt-ours.img"
    cmp "$shm/full.img" "$shm/tgt-qemu.img"
done

bulk_table() {
    printf "%-48s %8s   %s\n" case median rounds
    for disk in half full; do
        for t in ours qemu; do
            for c in mirror qemu-mirror nbdcopy qemu-img; do
                k="bulk/$disk/$t/$c"
                printf "%-48s %8s   %s\n" "$k (MiB/s)" "$(echo "${res[$k]:-}" | median)" "${res[$k]:-}"
            done
        done
    done
}
# Kept on stderr as soon as known, should a writer case end the run.
echo "bench: bulk done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
bulk_table >&2

# Writers at a fraction of this run's bulk rate of the mirror into our server.
# A case is PCT/WHO-MODE[/BLOCK/GRANULARITY]: WHO-MODE is ours-bg, ours-auto,
# ours-blocking, qemu-background or qemu-write-blocking.
WRITER_CASES=${WRITER_CASES:-"25/ours-bg 25/qemu-background 25/ours-auto 25/ours-blocking 25/qemu-write-blocking 75/ours-bg 75/qemu-background 75/ours-auto 75/ours-blocking 75/qemu-write-blocking"}
WRITER_SMALL_CASES=${WRITER_SMALL_CASES:-"25/ours-bg/4096/65536 25/ours-bg/4096/4096 25/qemu-background/4096/65536 25/qemu-background/4096/4096"}
bulk=${BULK_MIB:-$(echo "${res[bulk/full/ours/mirror]}" | median)}
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
for r in $(seq "$ROUNDS"); do
    echo "bench: writer round $r/$ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    for spec in $WRITER_CASES $WRITER_SMALL_CASES; do
        IFS=/ read -r pct who block gran <<<"$spec"
        block=${block:-65536}
        gran=${gran:-65536}
        cp "$shm/full.img" "$shm/w.img"
        w=$((bulk * pct / 100 * 1048576))
        k="writer/$spec"
        # A case that fails is reported as such; the run goes on.
        case $who in
        ours-*) out=$("$mb" "$shm/w.img" "$shm/ours.sock" --writer "$w" --mode "${who#ours-}" \
                --block "$block" --granularity "$gran" --ready-limit "$READY_LIMIT") || out=failed ;;
        qemu-*) out=$(python3 "$qm" "$shm/w.img" "$shm/ours.sock" --mode "${who#qemu-}" \
                --writer "$w" --writer-cmd "$mb" --block "$block" --granularity "$gran" \
                --ready-limit "$READY_LIMIT") || out=failed ;;
        esac
        if [ "$out" = failed ]; then
            echo "bench: writer case $spec failed" >&2
            add "$k/ready_s" failed
            continue
        fi
        echo "bench: $spec: $out" >&2
        secs=$(echo "$out" | field ready_s)
        add "$k/reached_mib_s" "$(echo "$out" | field written | awk -v s="$secs" '{printf "%.0f", $1 / s / 1048576}')"
        if [ "$(echo "$out" | field ready)" = 1 ]; then
            cmp "$shm/w.img" "$shm/tgt-ours.img"
            add "$k/ready_s" "$secs"
            add "$k/p50_ms" "$(echo "$out" | field p50_ms)"
            add "$k/p99_ms" "$(echo "$out" | field p99_ms)"
        else
            add "$k/ready_s" "never"
        fi
        add "$k/recopied_mib" "$(mib "$(echo "$out" | field recopied)")"
        d=$(echo "$out" | field dirtied)
        [ -z "$d" ] || add "$k/dirtied_mib_s" "$(echo "$d" | awk -v s="$secs" '{printf "%.0f", $1 / s / 1048576}')"
    done
done

echo
echo "Mirror, ${SIZE_MIB} MiB, median of $ROUNDS interleaved rounds; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
bulk_table
echo "writer rates are percentages of $bulk MiB/s (bulk/full/ours/mirror); reached_mib_s: what the writer wrote until ready (or the limit); dirtied_mib_s: clusters the mirror saw made dirty (ours); ready limit ${READY_LIMIT} s; p50/p99 -1: no write-blocking write"
for spec in $WRITER_CASES $WRITER_SMALL_CASES; do
    k="writer/$spec"
    for f in ready_s reached_mib_s dirtied_mib_s recopied_mib p50_ms p99_ms; do
        [ -n "${res[$k/$f]:-}" ] || continue
        printf "%-48s %8s   %s\n" "$k/$f" "$(echo "${res[$k/$f]:-}" | median)" "${res[$k/$f]:-}"
    done
done
