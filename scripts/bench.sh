#!/usr/bin/env bash
# Runs the spine benchmark: builds the release binaries the lab starts, then the bench, which
# prints its figures and writes them into docs/PERFORMANCE.md. Needs root (network
# namespaces). Takes about six minutes on a two-core machine; ZY_BENCH_* variables shorten or
# select parts (see tests/benches/spine.rs), e.g. ZY_BENCH_SECS=10 ZY_BENCH_AGENTS=1000.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bench.sh: the lab needs root (network namespaces); run it as root" >&2
    exit 1
fi

cargo build --release --bins
cargo bench -p zy-lab --bench spine
