#!/usr/bin/env bash
# Runs the benchmarks: builds the release binaries the lab starts, then the spine bench and the
# VM bench, each of which prints its figures and writes them into its own section of
# docs/PERFORMANCE.md. Needs root (network namespaces).
#
#   spine  (tests/benches/spine.rs): agent and coordinator costs, failure detection; about six
#          minutes on a two-core machine. ZY_BENCH_* variables shorten or select parts, e.g.
#          ZY_BENCH_SECS=10 ZY_BENCH_AGENTS=1000.
#   vms    (tests/benches/vms.rs): VM start-up through the whole stack, the agent with many
#          VMs; about seven minutes on a two-core machine without KVM. Needs QEMU and the test
#          guest (built here with images/make-test-guest.sh if images/out lacks it).
#          ZY_BENCH_VMS* variables shorten or select parts, e.g. ZY_BENCH_VMS=5.
#
# ZY_BENCH_ONLY_SPINE=1 or ZY_BENCH_ONLY_VMS=1 runs one of the two.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bench.sh: the lab needs root (network namespaces); run it as root" >&2
    exit 1
fi
if [[ "${ZY_BENCH_ONLY_SPINE:-}" == 1 && "${ZY_BENCH_ONLY_VMS:-}" == 1 ]]; then
    echo "bench.sh: ZY_BENCH_ONLY_SPINE=1 and ZY_BENCH_ONLY_VMS=1 exclude each other" >&2
    exit 1
fi
run_spine=1
run_vms=1
[[ "${ZY_BENCH_ONLY_VMS:-}" == 1 ]] && run_spine=0
[[ "${ZY_BENCH_ONLY_SPINE:-}" == 1 ]] && run_vms=0

cargo build --release --bins

if [[ "$run_spine" == 1 ]]; then
    # The spine bench records every ZY_BENCH_* variable it sees; keep the VM bench's and
    # this script's own out of its record.
    (
        for v in ${!ZY_BENCH_VMS@} ${!ZY_BENCH_ONLY_@}; do unset "$v"; done
        cargo bench -p zy-lab --bench spine
    )
fi

if [[ "$run_vms" == 1 ]]; then
    if [[ ! -s images/out/vmlinuz || ! -s images/out/initramfs.gz ]]; then
        bash images/make-test-guest.sh
    fi
    cargo bench -p zy-lab --bench vms
fi
