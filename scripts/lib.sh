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
