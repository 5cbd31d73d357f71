#!/usr/bin/env bash
# The test command of the README: installs what the tests need, builds the release
# binaries the integration tests start, checks formatting and lints, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pair in nbdinfo:libnbd-bin nbdsh:python3-libnbd fio:fio nbdkit:nbdkit nbdfuse:nbdfuse \
            fusermount3:fuse3 mkfs.ext4:e2fsprogs qemu-io:qemu-utils; do
    tool=${pair%%:*}; pkg=${pair#*:}
    command -v "$tool" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then need_pkgs+=(python3-libnbd); fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

cargo fmt --all -- --check
cargo build --release --bins
cargo clippy --release --all-targets -- -D warnings
cargo nextest run --release --workspace --no-fail-fast
