#!/usr/bin/env bash
# Installs what the QEMU comparison (benches/qemu/compare.py) needs, only when it is missing.
# Kept apart from scripts/setup.sh on purpose: the test suite runs that one, and nothing in the
# test suite needs a full system emulator.
#   qemu-system-x86  the reference: qemu-system-x86_64 under TCG, source and destination
#   iperf3           a second, independent measure of single-stream loopback TCP
#   binutils         `as`/`ld`, to assemble the guest boot sector (guest.S)
#   python3          runs compare.py (standard library only)
#
# qemu-img and qemu-nbd must keep working: the NBD interop tests use them. A qemu-utils from
# backports (10.x on bookworm) declares Breaks: qemu-system-common (<< 1:8.0), so installing
# the stable qemu-system-x86 (7.2) makes apt remove qemu-utils. When that would happen this
# script, in order:
#   1. installs the qemu-system-x86 of qemu-utils' own version, from the configured sources
#      or else from the backports suite qemu-utils came from (fetched through a temporary
#      source list: the system's sources are left as they were);
#   2. failing that (or with QEMU_BENCH_NO_BACKPORTS=1), installs qemu-system-x86 together
#      with the qemu-utils that goes with it (a downgrade, said out loud), so that nothing
#      is removed.
# Every install runs with --no-remove. At the end it checks `qemu-img --version` and
# `qemu-nbd --version` and prints what changed.
#
# Usage: bash benches/qemu/setup.sh [--dry-run]
#   --dry-run  only simulate (apt-get -s): print what would be installed or removed.
set -euo pipefail

dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    "") ;;
    *)
        echo "usage: $0 [--dry-run]" >&2
        exit 2
        ;;
esac

say() { echo "qemu bench setup: $*" >&2; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
version_of() {
    if have_pkg "$1"; then dpkg-query -W -f='${Version}' "$1"; fi
}

need=()
for pkg in qemu-system-x86 iperf3 binutils python3; do
    have_pkg "$pkg" || need+=("$pkg")
done
if ((${#need[@]} == 0)); then
    say "everything is installed already"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# Extra apt options (a temporary source list), a target suite, extra package pins.
apt_opts=()
target=()
install=("${need[@]}")
allow_downgrade=()
workdir=""
trap '[ -z "$workdir" ] || rm -rf "$workdir"' EXIT

# Packages apt would remove to install "$@" (nothing is changed: -s simulates).
removals() {
    apt-get "${apt_opts[@]}" -s install --no-install-recommends "${target[@]}" "${allow_downgrade[@]}" "$@" \
        2>/dev/null | awk '/^Remv /{print $2}' | tr '\n' ' '
}

# Whether apt, as currently configured here, offers package $1 at version $2.
offers() {
    apt-cache "${apt_opts[@]}" madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
        grep -qxF "$2"
}

# Points apt at the system's sources plus "$1" (a suite), through files of our own.
use_suite() {
    workdir=$(mktemp -d)
    mkdir -p "$workdir/lists/partial"
    if [ -f /etc/apt/sources.list ]; then cp /etc/apt/sources.list "$workdir/sources.list"; fi
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $1 main" \
        >>"$workdir/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$workdir/sources.list" -o "Dir::State::Lists=$workdir/lists"
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
    # The temporary lists must be fetched even in a dry run; only $workdir is written.
    if ! $SUDO apt-get "${apt_opts[@]}" update -qq 2>/dev/null; then
        say "cannot fetch the package lists of $1"
        apt_opts=()
        return 1
    fi
}

utils_before=$(version_of qemu-utils)
system_before=$(version_of qemu-system-x86)
if ((dry_run == 0)); then
    say "installing ${need[*]}"
    $SUDO apt-get update -qq
fi

if [[ " ${need[*]} " == *" qemu-system-x86 "* ]] && [ -n "$utils_before" ]; then
    removed=$(removals "${need[@]}")
    if [ -n "$removed" ]; then
        say "installing ${need[*]} as configured would remove: $removed(qemu-utils $utils_before)"
        pinned=("${need[@]/#qemu-system-x86/qemu-system-x86=$utils_before}")
        if ! offers qemu-system-x86 "$utils_before" && [[ "$utils_before" == *~bpo* ]] &&
            [ "${QEMU_BENCH_NO_BACKPORTS:-0}" != 1 ]; then
            suite="$(. /etc/os-release && echo "$VERSION_CODENAME")-backports"
            say "looking for qemu-system-x86 $utils_before in $suite (temporary source list)"
            if use_suite "$suite"; then target=(-t "$suite"); fi
        fi
        if offers qemu-system-x86 "$utils_before" && [ -z "$(removals "${pinned[@]}")" ]; then
            say "using qemu-system-x86 $utils_before, the version of the installed qemu-utils"
            install=("${pinned[@]}")
        else
            # No matching emulator: take the qemu-utils that goes with the one apt has.
            apt_opts=()
            target=()
            system=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
            say "no qemu-system-x86 $utils_before available: installing qemu-utils $system with qemu-system-x86 $system (a downgrade from $utils_before)"
            install=("${need[@]}" "qemu-utils=$system")
            allow_downgrade=(--allow-downgrades)
            removed=$(removals "${install[@]}")
            if [ -n "$removed" ]; then
                say "that would still remove $removed; giving up, nothing was changed"
                exit 1
            fi
        fi
    fi
fi

# What apt will do, printed before it does it.
plan=$(apt-get "${apt_opts[@]}" -s install --no-install-recommends --no-remove "${target[@]}" \
    "${allow_downgrade[@]}" "${install[@]}" 2>&1 | grep -E '^(Inst|Remv|E:) ' || true)
say "apt-get install ${target[*]} ${allow_downgrade[*]} ${install[*]}:"
sed 's/^/    /' <<<"$plan" >&2
if grep -q '^E:' <<<"$plan"; then
    say "apt cannot do it; nothing was changed"
    exit 1
fi
if ((dry_run)); then
    say "dry run: nothing was changed"
    exit 0
fi

$SUDO apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends --no-remove "${target[@]}" \
    "${allow_downgrade[@]}" "${install[@]}" >/dev/null

say "changed:"
for pkg in "${need[@]}" qemu-utils; do
    before=$(if [ "$pkg" = qemu-utils ]; then echo "$utils_before"; elif [ "$pkg" = qemu-system-x86 ]; then echo "$system_before"; fi)
    after=$(version_of "$pkg")
    if [ "$before" != "$after" ]; then
        say "  $pkg: ${before:-not installed} -> ${after:-removed}"
    fi
done
for tool in qemu-img qemu-nbd qemu-system-x86_64; do
    if ! out=$("$tool" --version 2>&1 | head -1); then
        say "$tool does not work after the install: $out"
        exit 1
    fi
    say "  $tool: $out"
done
