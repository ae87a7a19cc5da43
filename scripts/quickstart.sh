#!/usr/bin/env bash
# agentlab quick start for a fresh Debian 12 / Ubuntu 22.04+ host, as root:
# installs the packages, builds and installs the static binary, boots a
# sandbox, runs a command in it, shows the output, and destroys it.
#
#   sudo scripts/quickstart.sh            # KEEP=1 leaves the sandbox running
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "quickstart: run as root (agentlab manages VMs and /var/lib/agentlab)" >&2
    exit 2
fi

step() { printf '\n==> %s\n' "$*"; }

step "installing packages"
# A guest kernel with virtio drivers: Debian's cloud kernel, Ubuntu's kvm one.
. /etc/os-release
case "${ID:-debian}" in
    ubuntu) guest_kernel=linux-image-kvm ;;
    *)      guest_kernel=linux-image-cloud-amd64 ;;
esac
packages=(qemu-system-x86 qemu-utils "$guest_kernel" busybox-static e2fsprogs
          nftables iproute2 curl build-essential xz-utils zstd)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" \
    || for p in "${packages[@]}"; do apt-get install -y -qq --no-install-recommends "$p"; done

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    step "installing the Rust toolchain (rustup, minimal profile)"
    # rustfmt and clippy too: the test command (.ci/run) checks with both.
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
    . "$HOME/.cargo/env"
fi

step "building agentlab (one static binary)"
cargo build --release --locked
install -m 0755 target/x86_64-unknown-linux-gnu/release/agentlab /usr/local/bin/agentlab
ldd /usr/local/bin/agentlab || true

step "creating a sandbox (the first one builds the default guest image)"
vmid=$(agentlab sandbox new --wait --ttl 30m)
agentlab sandbox show "$vmid"

step "running a command in sandbox $vmid (through its guest agent)"
# A failure leaves the sandbox for `agentlab logs`; its 30m lease ends it.
agentlab exec "$vmid" -- sh -c 'uname -a; df -h /; echo "hello from sandbox $(hostname)"'

if [ "${KEEP:-0}" = 1 ]; then
    step "sandbox $vmid keeps running (lease 30m); destroy it with: agentlab sandbox destroy $vmid"
else
    step "destroying sandbox $vmid"
    agentlab sandbox destroy "$vmid"
fi
