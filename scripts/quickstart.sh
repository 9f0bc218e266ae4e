#!/usr/bin/env bash
# Quick start: a one-machine Zhengyun cloud. Installs what a fresh Debian 12 machine lacks,
# builds, then starts a coordinator and two nodes, each in its own network namespace joined
# by a backbone bridge, enrolls both nodes, shows `zy node ls`, and boots two VMs (the small
# test guest, under KVM or TCG) that ping each other. The packer puts both on one node and
# keeps the other empty (so that it could stand by); `zy vm ls` shows where each went. Then
# it moves vm2 to the other node while it runs (live migration, disks and memory under TLS)
# and shows vm1 still reaching it, now across the nodes' VXLAN.
#
#   scripts/quickstart.sh          start (or show, if already up)
#   scripts/quickstart.sh down     stop everything and remove every namespace, link and file
#
# Layout (all names start with zyqs):
#   host (zyqs-host, 10.77.0.254) --+
#   zyqs-coord (10.77.0.1)  --------+-- bridge br0 in zyqs-bb
#   zyqs-n1 (10.77.0.11), zyqs-n2 --+
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

ROOT="$PWD"
QS="$ROOT/.zy-quickstart"
BIN="$ROOT/target/release"
NET="${ZY_QS_NET:-10.77.0}"
COORD_IP="$NET.1"
NODES=2

down() {
    for ns in zyqs-coord zyqs-n1 zyqs-n2 zyqs-bb; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
        fi
    done
    sleep 1
    for ns in zyqs-coord zyqs-n1 zyqs-n2 zyqs-bb; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    ip link del zyqs-host 2>/dev/null || true
    rm -rf "$QS"
    echo "quick start stopped: processes, namespaces, links and $QS removed"
}

start_in() { # ns logname cmd...
    local ns=$1 log=$2
    shift 2
    setsid ip netns exec "$ns" "$@" >>"$QS/logs/$log.log" 2>&1 < /dev/null &
}

zy() { ZY_CONFIG="$QS/coordinator/zy.toml" "$BIN/zy" "$@"; }

wait_until() { # seconds description command...
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "timed out waiting for $what (logs in $QS/logs)"
}

up() {
    need_root
    if ip netns list | grep -qw zyqs-coord; then
        echo "the quick-start cloud is already up:"
        zy node ls
        return
    fi
    ensure_base
    ensure_qemu
    bash images/make-test-guest.sh
    echo "building (release)..."
    cargo build --release --bins --locked
    rm -rf "$QS"
    mkdir -p "$QS/logs"
    trap 'echo "start failed; cleaning up"; down' ERR

    ip netns add zyqs-bb
    ip -n zyqs-bb link set lo up
    ip -n zyqs-bb link add br0 type bridge
    ip -n zyqs-bb link set br0 up
    attach() { # ns port ip
        ip netns add "$1"
        ip -n "$1" link set lo up
        ip link add eth0 netns "$1" type veth peer name "$2" netns zyqs-bb
        ip -n zyqs-bb link set "$2" master br0 up
        ip -n "$1" addr add "$3/24" dev eth0
        ip -n "$1" link set eth0 up
    }
    attach zyqs-coord coord "$COORD_IP"
    for i in $(seq $NODES); do attach "zyqs-n$i" "n$i" "$NET.$((10 + i))"; done
    # The host joins the backbone too, so `zy` works from here.
    ip link add zyqs-host type veth peer name host netns zyqs-bb
    ip -n zyqs-bb link set host master br0 up
    ip addr add "$NET.254/24" dev zyqs-host
    ip link set zyqs-host up

    "$BIN/zy-coordinator" init --state-dir "$QS/coordinator" --site quickstart \
        --daemon-listen "$COORD_IP:7400" --api-listen "$COORD_IP:7443" \
        --advertise "$COORD_IP:7443" >"$QS/logs/init.log"
    start_in zyqs-coord coordinator "$BIN/zy-coordinator" run --state-dir "$QS/coordinator"
    wait_until 20 "the coordinator" zy status

    for i in $(seq $NODES); do
        token=$(zy token create --zone intranet --ttl 10m --json | sed -n 's/.*"token": "\(.*\)".*/\1/p')
        ip netns exec "zyqs-n$i" "$BIN/zy-agent" --data-dir "$QS/agent-n$i" join "$COORD_IP:7400" "$token" --name "node$i" >/dev/null
        start_in "zyqs-n$i" "agent-n$i" "$BIN/zy-agent" --data-dir "$QS/agent-n$i" run
    done
    for i in $(seq $NODES); do
        wait_until 30 "node$i to report" sh -c "ZY_CONFIG='$QS/coordinator/zy.toml' '$BIN/zy' node show node$i --json | grep -q '\"seq\"'"
    done

    echo
    zy node ls
    echo
    echo "booting two VMs (the packer fills one node before it opens another)..."
    zy image import --kernel images/out/vmlinuz --initrd images/out/initramfs.gz \
        --cmdline "console=ttyS0 quiet no_timer_check" --name guest --zone intranet >/dev/null
    # The same kernel with a command line that makes the guest ping its neighbour.
    zy image import --kernel images/out/vmlinuz --initrd images/out/initramfs.gz \
        --cmdline "console=ttyS0 quiet no_timer_check zy.probe=10.220.0.3" --name pinger --zone intranet >/dev/null
    zy vm create --name vm1 --zone intranet --memory 256 --image pinger >/dev/null
    zy vm create --name vm2 --zone intranet --memory 256 --image guest >/dev/null
    wait_until 180 "vm1 to reach vm2" sh -c "ZY_CONFIG='$QS/coordinator/zy.toml' '$BIN/zy' vm console vm1 --lines 200 | grep -q 'ZY-PING 10.220.0.3 ok'"
    zy vm ls
    echo
    echo "moving vm2 to the other node while it runs (live migration)..."
    zy vm migrate vm2
    # Pings from vm1 to vm2, now across the nodes, after the move.
    seen=$(zy vm console vm1 --lines 1000 | grep -c 'ZY-PING 10.220.0.3 ok' || true)
    wait_until 60 "vm1 to reach vm2 on its new node" sh -c "[ \$(ZY_CONFIG='$QS/coordinator/zy.toml' '$BIN/zy' vm console vm1 --lines 1000 | grep -c 'ZY-PING 10.220.0.3 ok') -gt $seen ]"
    trap - ERR
    zy vm ls
    echo
    echo "vm1's console (it pings vm2):"
    zy vm console vm1 --lines 200 | grep ZY- | tail -3
    cat <<MSG

A one-machine Zhengyun cloud is up: a coordinator and two nodes, each in its own network
namespace, and two VMs on the zone's network that reach each other, one of them moved live to
the other node. Drive it with the zy CLI:

  export ZY_CONFIG=$QS/coordinator/zy.toml PATH=$BIN:\$PATH
  zy node ls
  zy vm ls
  zy vm console vm1            # its serial console, interactive (Ctrl-] detaches)
  zy vm console vm1 --follow   # its console's log, followed
  zy vm create --name vm3 --zone intranet --memory 256 --image guest
  zy vm migrate vm2            # move it back while it runs
  zy node show node1

Logs are in $QS/logs. Stop it and remove everything with:

  scripts/quickstart.sh down
MSG
}

case "${1:-up}" in
    up) up ;;
    down) need_root; down ;;
    *) die "usage: $0 [up|down]" ;;
esac
