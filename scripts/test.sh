#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints, every test of
# every crate (unit, property, end-to-end against real KVM guests and real NBD peers).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test"
cargo test --workspace --all-features -- "$@"
