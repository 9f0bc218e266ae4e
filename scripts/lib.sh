# Shared by the scripts: root check, installing what a fresh Debian 12 machine lacks.
# Sourced, not run.

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

need_root() {
    [[ "$(id -u)" -eq 0 ]] || die "run as root: the lab and the quick start create network namespaces"
}

# Installs Debian packages that provide missing commands: ensure_packages cmd:pkg ...
ensure_packages() {
    local missing=()
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The Rust toolchain cannot come from Debian (bookworm's cargo is too old); it comes from rustup.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust 1.85 or newer with rustup (https://rustup.rs)"
    local have
    have=$(rustc --version | awk '{print $2}')
    if ! printf '1.85.0\n%s\n' "$have" | sort -V -C; then
        die "Rust $have is too old: Zhengyun needs 1.85 or newer (rustup update)"
    fi
}

# What every script needs on a fresh Debian 12 machine.
ensure_base() {
    ensure_packages ip:iproute2 cc:gcc pkg-config:pkg-config
    ensure_rust
}

# A real systemd for the lab's systemd node: systemd-nspawn boots the host's own OS
# statelessly in a container. systemd-container must match the host's systemd exactly (any
# other version would upgrade systemd itself); dbus provides the container's system bus;
# busctl, journalctl and nsenter are how the tests look inside.
ensure_nspawn() {
    ensure_packages nsenter:util-linux busctl:systemd
    if ! command -v systemd-nspawn >/dev/null 2>&1 || ! command -v dbus-daemon >/dev/null 2>&1; then
        local v
        v=$(dpkg-query -W -f='${Version}' systemd)
        echo "installing: systemd-container=$v dbus"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "systemd-container=$v" dbus >/dev/null
    fi
}

# QEMU 10 from bookworm-backports (bookworm's own 7.2 would also replace the machine's
# qemu-utils 10). The backports line reuses the Debian mirror this machine already uses.
ensure_qemu() {
    if command -v qemu-system-x86_64 >/dev/null 2>&1; then
        local major
        major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)
        [[ "${major:-0}" -ge 8 ]] && return 0
    fi
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        local uri
        uri=$(awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [[ -n "$uri" ]] || uri=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [[ -n "$uri" ]] || die "cannot find this machine's Debian mirror to add bookworm-backports"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
            > /etc/apt/sources.list.d/zy-backports.sources
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
}
