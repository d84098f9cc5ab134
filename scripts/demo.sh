#!/usr/bin/env bash
# The demo: a KVM guest (a software vCPU where /dev/kvm is missing) that checks its own
# memory, run by vmm-demo. Extra arguments go to vmm-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p vmm-demo
exec ./target/release/vmm-demo run --passes 20 "$@"
