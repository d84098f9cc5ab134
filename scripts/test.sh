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
echo "== cargo doc"
# Broken intra-doc links, and public docs pointing at private items, fail the run.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --all-features -q
echo "== the pure layer"
# migration-core without default features builds and tests alone, and migration-nbd stands
# on it: no vm-memory, userfaultfd or bindgen (hence libclang) in its dependency tree.
cargo test -q -p migration-core --no-default-features --lib
heavy=$(cargo tree -p migration-nbd -e normal,build --prefix none | grep -E '^(vm-memory|userfaultfd|bindgen) ' || true)
if [ -n "$heavy" ]; then
    echo "migration-nbd depends on the host layer: $heavy" >&2
    exit 1
fi
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-features -- "$@" 2>&1 | tee "$log"
# One closing line for the whole run: cargo prints a result per test binary, the last of
# which is often a crate's empty doc-test run.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' "$log"
