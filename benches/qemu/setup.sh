#!/usr/bin/env bash
# Installs what the QEMU comparison (benches/qemu/compare.py) needs, only when it is missing.
# Kept apart from scripts/setup.sh on purpose: the test suite runs that one, and nothing in the
# test suite needs a full system emulator.
#   qemu-system-x86  the reference: qemu-system-x86_64 under TCG, source and destination
#   iperf3           a second, independent measure of single-stream loopback TCP
#   binutils         `as`/`ld`, to assemble the guest boot sector (guest.S)
#   python3          runs compare.py (standard library only)
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in qemu-system-x86 iperf3 binutils python3; do
    have_pkg "$pkg" || need+=("$pkg")
done

if ((${#need[@]})); then
    echo "qemu bench setup: installing ${need[*]}" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
