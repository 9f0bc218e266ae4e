#!/usr/bin/env bash
# Builds the small test guest that the lab tests and the quick start boot:
#
#   <out>/vmlinuz          a Debian kernel, taken from its package without installing it
#   <out>/initramfs.gz     busybox + the virtio modules + an /init that configures the guest
#                          from the kernel command line
#
# The guest reads `zy.name=`, `zy.ip=<addr>/<len>`, `zy.gw=` (and, for tests,
# `zy.poweroff_after=<seconds>`, `zy.probe=<ip>,<ip>`) from /proc/cmdline, brings
# eth0 up with that address (it then answers ping), powers off cleanly on an ACPI power
# button press (QMP system_powerdown), prints `ZY-READY <name>` on the serial console, and
# keeps a shell on the console.
#
# Usage: images/make-test-guest.sh [out dir]   (default: images/out; skipped if up to date)
# Needs apt (downloads two .deb files; installs nothing) and gzip.
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
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -s "$out/vmlinuz" && -s "$out/initramfs.gz" ]]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt's sandbox user cannot write to a root-owned temp dir; download as root there.
chmod 0777 "$work"
apt-get download -qq "$kpkg" busybox-static 2>/dev/null
dpkg -x linux-image-*.deb k
dpkg -x busybox-static_*.deb bb
kver="${kpkg#linux-image-}"
bb="$work/bb/bin/busybox"

root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc,tmp,run,lib/modules/"$kver"}
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done

# The modules the guest needs, with their dependencies, found by busybox depmod.
src="k/lib/modules/$kver"
cp -a "$src/kernel" "$root/lib/modules/$kver/kernel.all"
"$bb" depmod -b "$root" "$kver" >/dev/null 2>&1 || true
mkdir -p "$root/lib/modules/$kver/kernel"
need="virtio_pci virtio_net virtio_blk virtio_console button evdev"
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
for m in virtio_pci virtio_net virtio_blk virtio_console button evdev; do
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
    esac
done
hostname "$ZY_name"
ip link set lo up
if [ -n "$ZY_ip" ]; then
    ip link set eth0 up
    ip addr add "$ZY_ip" dev eth0
    [ -n "$ZY_gw" ] && ip route add default via "$ZY_gw"
fi
# A press of the ACPI power button (QMP system_powerdown) powers the guest off cleanly:
# busybox acpid runs /etc/acpi/<event>/<parameter> for each event.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
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
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$want" > "$stamp"
echo "test guest: $out/vmlinuz ($kver), $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1))"
