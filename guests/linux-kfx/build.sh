#!/bin/bash
# Build the kfx_target module (guests/linux-kfx/kfx_target.c) against Debian's linux-headers for the kernel that
# guests/linux/build.sh put in build/linux/ (its release from build/linux/kernel.env), into build/linux-kfx/:
#   kfx_target.ko      the module (insmod it in the guest: its init runs KF/x's harness once)
#   kfx_target.map     `nm` of the module: the parser's and handlers' offsets, for --cover and symbol names
# Installs linux-headers-<release> with apt-get when it is missing. Idempotent: rebuilds only when a source, this
# script or the headers are newer than the module. Quiet on success; a one-line error and exit status 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
env_file=${VMFORK_LINUX_OUT:-$root/build/linux}/kernel.env
out=$root/build/linux-kfx

die() { echo "guests/linux-kfx/build.sh: error: $*" >&2; exit 1; }

[ -f "$env_file" ] || die "$env_file is missing: run guests/linux/build.sh first"
release=$(sed -n 's/^KERNEL_RELEASE=//p' "$env_file")
[ -n "$release" ] || die "no KERNEL_RELEASE in $env_file"
headers=/usr/src/linux-headers-$release
if [ ! -f "$headers/Makefile" ]; then
    apt-get install -y -q "linux-headers-$release" >/dev/null 2>&1 ||
        die "cannot install linux-headers-$release (apt-get install linux-headers-$release)"
fi
command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"

ko=$out/kfx_target.ko
if [ -f "$ko" ] && [ -z "$(find "$here" "$headers/Makefile" -newer "$ko" -print -quit)" ]; then
    exit 0
fi
mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$here/kfx_target.c" "$here/Kbuild" "$work/"
if ! make -s -C "$headers" M="$work" modules >"$work/log" 2>&1; then
    cat "$work/log" >&2
    die "the module did not build against $headers"
fi
nm "$work/kfx_target.ko" > "$work/kfx_target.map"
mv -f "$work/kfx_target.map" "$out/kfx_target.map"
mv -f "$work/kfx_target.ko" "$ko"
