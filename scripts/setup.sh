#!/usr/bin/env bash
# Installs what the workspace needs from the system, only when it is missing, so that the
# README's two commands work on a fresh Debian machine. Safe to run again.
#   libclang-dev   bindgen in userfaultfd-sys needs it at build time
#   qemu-utils     qemu-img / qemu-nbd, peers of the NBD interop tests
#   libnbd-bin     nbdinfo, nbdcopy, nbdsh (python3-libnbd)
#   nbdkit         a second NBD server to test our client against
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in libclang-dev qemu-utils libnbd-bin nbdkit python3-libnbd; do
    have_pkg "$pkg" || need+=("$pkg")
done

if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
