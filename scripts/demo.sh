#!/usr/bin/env bash
# The demo: a KVM guest (a software vCPU where /dev/kvm is missing) that checks its own
# memory, live-migrated by vmm-demo between two processes over loopback, then verified.
# Extra arguments go to `vmm-demo demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p vmm-demo
exec ./target/release/vmm-demo demo "$@"
