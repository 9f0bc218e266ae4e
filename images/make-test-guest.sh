#!/usr/bin/env bash
# Builds the small test guest that the lab tests and the quick start boot:
#
#   <out>/vmlinuz          a Debian kernel, taken from its package without installing it
#   <out>/initramfs.gz     busybox + the virtio and FAT modules + an /init that configures
#                          the guest from the kernel command line or a cloud-init seed
#   <out>/disk.qcow2       the same guest as a bootable disk image (FAT, SYSLINUX), which
#                          has no address on its command line: it must come from the seed
#
# The guest reads `zy.name=`, `zy.ip=<addr>/<len>`, `zy.gw=`, `zy.mtu=` (and, for tests,
# `zy.poweroff_after=<seconds>`, `zy.panic_after=<seconds>`, `zy.probe=<ip>,<ip>`,
# `zy.bigping=<ip>`, `zy.tcpsink=<port>`, `zy.tcpsend=<ip>:<port>`, `zy.diskwrite=<vdX>`,
# `zy.diskwrite_for=<seconds>`, `zy.counter=1`, `zy.pingloop=<ip>`) from /proc/cmdline. Without `zy.ip`
# it looks for a cloud-init NoCloud seed (a FAT disk holding meta-data and network-config)
# and takes its name, address, gateway and MTU from there, printing `ZY-SEED <instance-id>`.
# Booted from the disk image, it prints `ZY-DISK base=<text>` (a file of the image) and
# `ZY-DISK boots=<n>` (a file it appends to at each boot: writes reach the VM's overlay).
# It brings eth0 up with its address (it then answers ping) and prints `ZY-NET <addr> mtu <n>`,
# its default route and name servers when it has them (`ZY-ROUTE default via <gw>`,
# `ZY-DNS <servers>`, written to /etc/resolv.conf; `zy.dns=` and `zy.search=` on the command
# line), and with SSH keys in the seed's meta-data (`public-keys`) it runs dropbear on port
# 22 letting those keys in as root (`ZY-SSHD <n> keys`). For tests, `zy.sshkey=1` makes it
# make an ed25519 key and print its public line (`ZY-SSHKEY <line>`), and `zy.sshto=<ip>`
# makes it log in to <ip> with that key until it can and print what the far side said
# (`ZY-SSH-OK <far hostname>`).
# powers off cleanly on an ACPI power button press (QMP system_powerdown), prints
# `ZY-READY <name>` on the serial console, and keeps a shell on the console.
#
# Usage: images/make-test-guest.sh [out dir]   (default: images/out; skipped if up to date)
# Needs apt (downloads a few .deb files; installs nothing), gzip and qemu-img.
# dropbear and the libraries it links (glibc, libtomcrypt, libtommath, libgmp, zlib,
# libcrypt) are taken from their Debian packages: about 3 MB more in the initramfs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
stamp="$out/.built-from"

# The kernel package that linux-image-amd64 points at today.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [[ -z "$kpkg" ]]; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[[ -n "$kpkg" ]] || { echo "make-test-guest: cannot find the Debian kernel package" >&2; exit 1; }
want="$kpkg $(sha256sum "$0" | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -s "$out/vmlinuz" && -s "$out/initramfs.gz" && -s "$out/disk.qcow2" ]]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt's sandbox user cannot write to a root-owned temp dir; download as root there.
chmod 0777 "$work"
ssh_debs="dropbear-bin libtomcrypt1 libtommath1 libgmp10 zlib1g libcrypt1 libc6"
# shellcheck disable=SC2086
apt-get download -qq "$kpkg" busybox-static syslinux syslinux-common mtools dosfstools $ssh_debs 2>/dev/null
dpkg -x linux-image-*.deb k
dpkg -x busybox-static_*.deb bb
for p in $ssh_debs; do dpkg -x "${p}"_*.deb ssh; done
for d in syslinux_*.deb syslinux-common_*.deb mtools_*.deb dosfstools_*.deb; do dpkg -x "$d" tools; done
kver="${kpkg#linux-image-}"
bb="$work/bb/bin/busybox"

root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc,tmp,run,lib/modules/"$kver"}
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
# dropbear (server, client, key maker) with the shared libraries it needs.
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu" "$root/etc/dropbear" "$root/root/.ssh"
cp ssh/usr/sbin/dropbear ssh/usr/bin/dbclient ssh/usr/bin/dropbearkey "$root/bin/"
cp -L ssh/lib64/ld-linux-x86-64.so.2 "$root/lib64/"
for lib in libc.so.6 libcrypt.so.1 libtomcrypt.so.1 libtommath.so.1 libgmp.so.10 libz.so.1; do
    f=$(find ssh/lib ssh/usr/lib -name "$lib" | head -1)
    [[ -n "$f" ]] || { echo "make-test-guest: $lib is missing from the dropbear packages" >&2; exit 1; }
    cp -L "$f" "$root/lib/x86_64-linux-gnu/"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf '/bin/sh\n' > "$root/etc/shells"

# The modules the guest needs, with their dependencies, found by busybox depmod.
src="k/lib/modules/$kver"
cp -a "$src/kernel" "$root/lib/modules/$kver/kernel.all"
"$bb" depmod -b "$root" "$kver" >/dev/null 2>&1 || true
mkdir -p "$root/lib/modules/$kver/kernel"
need="virtio_pci virtio_net virtio_blk virtio_console button evdev vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1 pvpanic-mmio"
resolve() { # prints the module and its dependencies, dependencies first
    local line deps
    line=$(grep -E "/$1\.ko:" "$root/lib/modules/$kver/modules.dep" | head -1)
    [[ -n "$line" ]] || return 0
    for d in ${line#*:}; do resolve "$(basename "$d" .ko)"; done
    echo "${line%%:*}"
}
files=$(for m in $need; do resolve "$m"; done | awk '!seen[$0]++')
for f in $files; do
    mkdir -p "$root/lib/modules/$kver/$(dirname "${f/kernel.all/kernel}")"
    cp "$root/lib/modules/$kver/$f" "$root/lib/modules/$kver/${f/kernel.all/kernel}"
done
rm -rf "$root/lib/modules/$kver/kernel.all"
"$bb" depmod -b "$root" "$kver"

cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_blk virtio_console button evdev vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1 pvpanic-mmio; do
    modprobe "$m" 2>/dev/null
done
ZY_name=guest
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        zy.name=*) ZY_name="${arg#zy.name=}" ;;
        zy.ip=*) ZY_ip="${arg#zy.ip=}" ;;
        zy.gw=*) ZY_gw="${arg#zy.gw=}" ;;
        zy.poweroff_after=*) ZY_poweroff_after="${arg#zy.poweroff_after=}" ;;
        zy.probe=*) ZY_probe="${arg#zy.probe=}" ;;
        zy.mtu=*) ZY_mtu="${arg#zy.mtu=}" ;;
        zy.bigping=*) ZY_bigping="${arg#zy.bigping=}" ;;
        zy.tcpsink=*) ZY_tcpsink="${arg#zy.tcpsink=}" ;;
        zy.tcpsend=*) ZY_tcpsend="${arg#zy.tcpsend=}" ;;
        zy.panic_after=*) ZY_panic_after="${arg#zy.panic_after=}" ;;
        zy.dns=*) ZY_dns=$(echo "${arg#zy.dns=}" | tr , ' ') ;;
        zy.search=*) ZY_search=$(echo "${arg#zy.search=}" | tr , ' ') ;;
        zy.sshkey=*) ZY_sshkey="${arg#zy.sshkey=}" ;;
        zy.sshto=*) ZY_sshto="${arg#zy.sshto=}" ;;
        zy.diskwrite=*) ZY_diskwrite="${arg#zy.diskwrite=}" ;;
        zy.diskwrite_for=*) ZY_diskwrite_for="${arg#zy.diskwrite_for=}" ;;
        zy.counter=*) ZY_counter="${arg#zy.counter=}" ;;
        zy.pingloop=*) ZY_pingloop="${arg#zy.pingloop=}" ;;
    esac
done
# Without an address on the command line, a cloud-init NoCloud seed must provide one.
mkdir -p /seed /disk
if [ -z "$ZY_ip" ]; then
    i=0
    while [ $i -lt 30 ] && [ -z "$ZY_seed" ]; do
        for d in /dev/vd?; do
            [ -b "$d" ] || continue
            mount -t vfat -o ro "$d" /seed 2>/dev/null || continue
            if [ -f /seed/meta-data ] && [ -f /seed/network-config ]; then
                ZY_seed=$(sed -n 's/^instance-id: //p' /seed/meta-data)
                ZY_name=$(sed -n 's/^local-hostname: //p' /seed/meta-data)
                ZY_ip=$(sed -n 's/^ *- \([0-9.]*\/[0-9]*\)$/\1/p' /seed/network-config | head -1)
                ZY_gw=$(sed -n 's/^ *via: //p' /seed/network-config | head -1)
                ZY_mtu=$(sed -n 's/^ *mtu: //p' /seed/network-config | head -1)
                ZY_dns=$(sed -n 's/^ *addresses: \[\(.*\)\]$/\1/p' /seed/network-config | head -1 | tr -d ,)
                ZY_search=$(sed -n 's/^ *search: \[\(.*\)\]$/\1/p' /seed/network-config | head -1 | tr -d ,)
                # meta-data's public-keys: one quoted key line per item.
                sed -n '/^public-keys:/,/^[^ ]/s/^  - "\(.*\)"$/\1/p' /seed/meta-data > /tmp/keys
                echo "ZY-SEED $ZY_seed"
            fi
            umount /seed
            [ -n "$ZY_seed" ] && break
        done
        [ -z "$ZY_seed" ] && usleep 100000
        i=$((i + 1))
    done
fi
# Booted from the disk image: show a file of the image, and write to the disk.
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    mount -t vfat "$d" /disk 2>/dev/null || continue
    if [ -f /disk/zy-base.txt ]; then
        echo "ZY-DISK base=$(cat /disk/zy-base.txt)"
        echo boot >> /disk/zy-boots
        sync
        echo "ZY-DISK boots=$(wc -l < /disk/zy-boots)"
        break
    fi
    umount /disk
done
hostname "$ZY_name"
ip link set lo up
if [ -n "$ZY_ip" ]; then
    [ -n "$ZY_mtu" ] && ip link set eth0 mtu "$ZY_mtu"
    ip link set eth0 up
    ip addr add "$ZY_ip" dev eth0
    [ -n "$ZY_gw" ] && ip route add default via "$ZY_gw" && echo "ZY-ROUTE $(ip route show default)"
    echo "ZY-NET $ZY_ip mtu $(cat /sys/class/net/eth0/mtu)"
fi
if [ -n "$ZY_dns" ]; then
    for ns in $ZY_dns; do echo "nameserver $ns"; done > /etc/resolv.conf
    [ -n "$ZY_search" ] && echo "search $ZY_search" >> /etc/resolv.conf
    echo "ZY-DNS $ZY_dns${ZY_search:+ search $ZY_search}"
fi
# SSH: the seed's keys let root in through dropbear (host keys made on first use).
export HOME=/root
if [ -s /tmp/keys ]; then
    mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
    chmod 700 /root /root/.ssh
    cp /tmp/keys /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    dropbear -R -p 22 -P /run/dropbear.pid 2>/tmp/dropbear.log
    echo "ZY-SSHD $(wc -l < /root/.ssh/authorized_keys) keys"
fi
# A press of the ACPI power button (QMP system_powerdown) powers the guest off cleanly:
# busybox acpid runs /etc/acpi/<event>/<parameter> for each event.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nsync\numount /disk 2>/dev/null\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log
# Ready means ready to be stopped too: wait (up to 2 s) until acpid listens to the button.
i=0
while [ $i -lt 20 ]; do
    p=$(pidof acpid)
    [ -n "$p" ] && ls -l "/proc/$p/fd" 2>/dev/null | grep -q input/event && break
    usleep 100000
    i=$((i + 1))
done
echo "ZY-READY $ZY_name"
# Tests of the network ask the guest to ping addresses and say what answered.
if [ -n "$ZY_probe" ]; then
    (while true; do
        for ip in $(echo "$ZY_probe" | tr , ' '); do
            if ping -c 1 -W 1 "$ip" >/dev/null 2>&1; then echo "ZY-PING $ip ok"; else echo "ZY-PING $ip fail"; fi
        done
        sleep 1
    done) &
fi
# Tests of the overlay's MTU: full-size pings (1472 bytes of payload: a 1500-byte packet,
# which the guest must cut to its MTU) and a TCP transfer of 4 MiB.
if [ -n "$ZY_bigping" ]; then
    (while true; do
        if ping -c 2 -W 2 -s 1472 "$ZY_bigping" >/dev/null 2>&1; then echo "ZY-BIGPING $ZY_bigping ok"; else echo "ZY-BIGPING $ZY_bigping fail"; fi
        sleep 2
    done) &
fi
if [ -n "$ZY_tcpsink" ]; then
    # nc ends when the sender closes; its own stdin must not end first.
    (sleep 100000 | nc -l -p "$ZY_tcpsink" | wc -c | sed 's/^/ZY-TCP received /') &
fi
if [ -n "$ZY_tcpsend" ]; then
    (until dd if=/dev/zero bs=4096 count=1024 2>/dev/null | nc -w 5 "${ZY_tcpsend%:*}" "${ZY_tcpsend#*:}" 2>/dev/null; do
        sleep 1
    done
    echo "ZY-TCP sent") &
fi
# Tests of SSH: make a key and show it, then log in to a peer with it until that works.
if [ -n "$ZY_sshkey" ]; then
    dropbearkey -t ed25519 -f /root/.ssh/id_dropbear 2>/dev/null | grep '^ssh-ed25519 ' | sed 's/^/ZY-SSHKEY /'
fi
if [ -n "$ZY_sshto" ]; then
    (until out=$(dbclient -y -i /root/.ssh/id_dropbear "root@$ZY_sshto" hostname 2>/tmp/dbclient.log </dev/null); do
        sleep 2
    done
    echo "ZY-SSH-OK $out") &
fi
# Tests of live migration: the guest keeps writing random 64 KiB blocks over the first
# 32 MiB of a disk (`zy.diskwrite=vdb`), each synced, so that the disk changes while it moves.
# With `zy.diskwrite_for=<s>` it stops after that long, drops its caches and prints the MD5
# of those 32 MiB as read back from the disk (`ZY-DISKSUM <md5> <blocks written>`), for a
# test to compare with the disk image on the host.
if [ -n "$ZY_diskwrite" ]; then
    (echo "ZY-DISKWRITE $ZY_diskwrite"
    n=0
    start=$(cut -d. -f1 /proc/uptime)
    while true; do
        dd if=/dev/urandom of="/dev/$ZY_diskwrite" bs=65536 count=1 seek=$((n % 512)) conv=fsync 2>/dev/null
        n=$((n + 7))
        if [ -n "$ZY_diskwrite_for" ] && [ $(( $(cut -d. -f1 /proc/uptime) - start )) -ge "$ZY_diskwrite_for" ]; then
            break
        fi
    done
    sync
    echo 3 > /proc/sys/vm/drop_caches
    sum=$(dd if="/dev/$ZY_diskwrite" bs=65536 count=512 2>/dev/null | md5sum | cut -d' ' -f1)
    while true; do
        echo "ZY-DISKSUM $sum $((n / 7))"
        sleep 5
    done) &
fi
# Tests of live migration: a counter kept in the guest's memory, printed every second
# (`ZY-COUNT <n>`): a guest that moved live goes on counting where it was.
if [ -n "$ZY_counter" ]; then
    (n=0
    while true; do
        n=$((n + 1))
        echo "ZY-COUNT $n"
        sleep 1
    done) &
fi
# Tests of live migration: ping a peer five times a second and print the running totals
# every 25 pings (`ZY-PINGS <ip> sent=<n> lost=<m>`).
if [ -n "$ZY_pingloop" ]; then
    (sent=0
    lost=0
    while true; do
        ping -c 1 -W 1 "$ZY_pingloop" >/dev/null 2>&1 || lost=$((lost + 1))
        sent=$((sent + 1))
        [ $((sent % 25)) -eq 0 ] && echo "ZY-PINGS $ZY_pingloop sent=$sent lost=$lost"
        usleep 200000
    done) &
fi
# Tests of guest health ask for a kernel panic (which pvpanic reports to QEMU).
if [ -n "$ZY_panic_after" ]; then
    (sleep "$ZY_panic_after"; echo "ZY-PANIC $ZY_name"; echo c > /proc/sysrq-trigger) &
fi
# Tests of guest-initiated poweroff ask for one on the command line.
if [ -n "$ZY_poweroff_after" ]; then
    (sleep "$ZY_poweroff_after"; echo "ZY-POWEROFF $ZY_name"; poweroff -f) &
fi
while true; do
    setsid cttyhack sh
done
INIT
chmod 0755 "$root/init"

(cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -9) > "$out/initramfs.gz.tmp"
cp "k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"

# The bootable disk: a FAT volume (no partition table) with SYSLINUX in its boot sector,
# the kernel, the initramfs and a file to read back; no address on its command line.
PATH="$work/tools/usr/bin:$work/tools/sbin:$PATH"
export MTOOLS_SKIP_CHECK=1
truncate -s 48M disk.img
mkfs.vfat -n ZYDISK disk.img >/dev/null
syslinux --install disk.img
printf 'DEFAULT zy\nPROMPT 0\nTIMEOUT 0\nLABEL zy\n  KERNEL vmlinuz\n  APPEND initrd=initrd.gz console=ttyS0 quiet no_timer_check\n' > syslinux.cfg
echo "zhengyun-test-disk" > zy-base.txt
mcopy -i disk.img "$out/vmlinuz.tmp" ::vmlinuz
mcopy -i disk.img "$out/initramfs.gz.tmp" ::initrd.gz
mcopy -i disk.img syslinux.cfg ::syslinux.cfg
mcopy -i disk.img zy-base.txt ::zy-base.txt
qemu-img convert -O qcow2 disk.img "$out/disk.qcow2.tmp"

mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/disk.qcow2.tmp" "$out/disk.qcow2"
echo "$want" > "$stamp"
echo "test guest: $out/vmlinuz ($kver), $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1)), $out/disk.qcow2"
