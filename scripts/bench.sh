#!/usr/bin/env bash
# Runs the benchmarks: builds the binaries the lab starts (profile dist, as deployed), then
# the spine bench and the VM bench, each of which prints its figures and writes them into its own section of
# docs/PERFORMANCE.md. Needs root (network namespaces).
#
#   spine  (tests/benches/spine.rs): agent and coordinator costs, failure detection; about six
#          minutes on a two-core machine. ZY_BENCH_* variables shorten or select parts, e.g.
#          ZY_BENCH_SECS=10 ZY_BENCH_AGENTS=1000.
#   storm  (tests/benches/storm.rs): peer updates in a reconnect storm of 1,000 nodes with
#          VMs, the reconciler's planning on a virtual clock; a second. Runs with spine.
#   calls  (tests/benches/calls.rs): how soon a call pending on a node fails once its
#          session ends; half a minute. Runs with spine.
#   store  (tests/benches/store.rs): VM writes and fsyncs per second with 1, 8 and 64
#          writers against a redb file, with and without group commit; about twenty
#          seconds. Runs with spine (needs no root, but lives with its neighbours).
#   vms    (tests/benches/vms.rs): VM start-up through the whole stack, the agent with many
#          VMs; about seven minutes on a two-core machine without KVM. Needs QEMU and the test
#          guest (built here with images/make-test-guest.sh if images/out lacks it).
#          ZY_BENCH_VMS* variables shorten or select parts, e.g. ZY_BENCH_VMS=5. Also a
#          4 GiB image fetched onto a throttled disk (report lateness; a few minutes).
#
#   packing (packer/benches/packing.rs): the packer against Nomad's and Kubernetes' scoring
#          on generated traces at 100, 1,000 and 10,000 nodes; pure computation, no root.
#          ZY_BENCH_PACK_* variables select parts, e.g. ZY_BENCH_PACK_NODES=1000. Runs with
#          spine. See its doc comment for the time it takes.
#
#   migration (tests/benches/migration.rs): live migration's downtime and total time for an
#          idle guest and one writing its disk, through the agent's command handler (two
#          agents' node sides, real QEMU under TLS); about three minutes without KVM.
#          ZY_BENCH_MIG_RUNS sets the migrations per kind of guest (5). Runs with vms.
#
#   systemd (tests/benches/systemd.rs): VM starts as systemd transient units against the
#          agent's own forks, on one site (a systemd-nspawn node and a plain one); about one
#          minute. ZY_BENCH_SD_VMS sets the VMs per node (10).
#
# ZY_BENCH_ONLY_SPINE=1, ZY_BENCH_ONLY_VMS=1 or ZY_BENCH_ONLY_SYSTEMD=1 runs one of them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bench.sh: the lab needs root (network namespaces); run it as root" >&2
    exit 1
fi
only=0
for v in ZY_BENCH_ONLY_SPINE ZY_BENCH_ONLY_VMS ZY_BENCH_ONLY_SYSTEMD; do
    [[ "${!v:-}" == 1 ]] && only=$((only + 1))
done
if [[ "$only" -gt 1 ]]; then
    echo "bench.sh: ZY_BENCH_ONLY_SPINE, ZY_BENCH_ONLY_VMS and ZY_BENCH_ONLY_SYSTEMD exclude each other" >&2
    exit 1
fi
run_spine=1
run_vms=1
run_systemd=1
if [[ "$only" == 1 ]]; then
    [[ "${ZY_BENCH_ONLY_SPINE:-}" == 1 ]] || run_spine=0
    [[ "${ZY_BENCH_ONLY_VMS:-}" == 1 ]] || run_vms=0
    [[ "${ZY_BENCH_ONLY_SYSTEMD:-}" == 1 ]] || run_systemd=0
fi

# The benches measure the binaries as deployed (profile `dist`, see Cargo.toml); the lab
# finds them through ZY_BIN_DIR.
cargo build --profile dist --bins
export ZY_BIN_DIR="$PWD/target/dist"

if [[ "$run_spine" == 1 ]]; then
    # The spine bench records every ZY_BENCH_* variable it sees; keep the VM bench's and
    # this script's own out of its record.
    (
        for v in ${!ZY_BENCH_VMS@} ${!ZY_BENCH_ONLY_@}; do unset "$v"; done
        cargo bench -p zy-lab --bench spine
    )
fi

if [[ "$run_spine" == 1 ]]; then
    # The reconciler's peer planning in a reconnect storm (virtual clock, a second), the
    # VM table's writes with and without group commit (a redb file), and how soon calls to
    # a node whose session ends fail (a one-node lab site).
    (
        for v in ${!ZY_BENCH_ONLY_@}; do unset "$v"; done
        cargo bench -p zy-lab --bench storm
        cargo bench -p zy-lab --bench store
        cargo bench -p zy-lab --bench calls
        cargo bench -p zy-packer --bench packing
    )
fi

if [[ "$run_vms" == 1 ]]; then
    if [[ ! -s images/out/vmlinuz || ! -s images/out/initramfs.gz ]]; then
        bash images/make-test-guest.sh
    fi
    cargo bench -p zy-lab --bench vms
    cargo bench -p zy-lab --bench migration
fi

if [[ "$run_systemd" == 1 ]]; then
    if [[ ! -s images/out/vmlinuz || ! -s images/out/initramfs.gz ]]; then
        bash images/make-test-guest.sh
    fi
    (
        for v in ${!ZY_BENCH_ONLY_@}; do unset "$v"; done
        cargo bench -p zy-lab --bench systemd
    )
fi
