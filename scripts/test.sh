#!/usr/bin/env bash
# The test command: installs what a fresh Debian 12 machine lacks, then runs the whole suite:
# formatting, lints, unit and property tests, real QEMU guests (TCG where KVM is unusable),
# and the lab tests (real binaries in network namespaces). Run as root. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

need_root
ensure_base
ensure_packages curl:curl  # the API lab test drives the API as clients do
ensure_qemu
ensure_nspawn
bash images/make-test-guest.sh
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy 2>/dev/null || true

start=$(date +%s)
echo "== fmt";    cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build";  cargo build --workspace --bins --locked
echo "== tests";  cargo test --workspace --locked
echo "== done in $(( $(date +%s) - start ))s"
