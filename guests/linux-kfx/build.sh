#!/bin/bash
# Build the kfx_target module (kfx_target.c, Kbuild, Makefile) and the initramfs that loads it, into build/linux-kfx/:
#   kfx_target.ko      the module, built against the CI kernel's build tree (guests/linux/build-kernel.sh, which
#                      this runs first: build/linux-min/src-<version>, CONFIG_MODULES=y)
#   kfx_target.map     `nm` of the module: the parser's and handlers' offsets in the module
#   init               /init: a static program (init.c, no libc) that finit_module()s /kfx_target.ko
#   initramfs.cpio     /init, /kfx_target.ko, /dev/console (newc, uncompressed, mtime 0: made by the kernel tree's
#                      usr/gen_init_cpio, no root needed)
#   key                the hash of every input; when it matches, nothing is rebuilt (milliseconds)
# `build.sh --cloud` builds only the module, against Debian's linux-headers for the cloud kernel in build/linux/
# (guests/linux/build.sh; its release from build/linux/kernel.env; the headers installed with apt-get when missing)
# into build/linux-kfx/cloud/. Debian's cloud kernel does not reach /init in CI time where kernel mode is emulated,
# so the initramfs and the tests use the CI kernel. Quiet on success; a one-line error and exit status 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${VMFORK_LINUX_KFX_OUT:-$root/build/linux-kfx}
sources=(kfx_target.c Kbuild Makefile)

die() { echo "guests/linux-kfx/build.sh: error: $*" >&2; exit 1; }
command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"

# build_module KDIR OUTDIR: kfx_target.ko and kfx_target.map in OUTDIR, built in a scratch copy of the sources
build_module() {
    local kdir=$1 dest=$2 work
    mkdir -p "$dest"
    work=$(mktemp -d "$dest/.build.XXXXXX")
    for f in "${sources[@]}"; do cp "$here/$f" "$work/"; done
    if ! make -s -C "$work" KDIR="$kdir" modules >"$work/log" 2>&1; then
        cat "$work/log" >&2
        rm -rf "$work"
        die "the module did not build against $kdir"
    fi
    nm "$work/kfx_target.ko" >"$work/kfx_target.map"
    mv -f "$work/kfx_target.map" "$dest/kfx_target.map"
    mv -f "$work/kfx_target.ko" "$dest/kfx_target.ko"
    rm -rf "$work"
}

if [ "${1:-}" = "--cloud" ]; then
    env_file=${VMFORK_LINUX_OUT:-$root/build/linux}/kernel.env
    [ -f "$env_file" ] || die "$env_file is missing: run guests/linux/build.sh first"
    release=$(sed -n 's/^KERNEL_RELEASE=//p' "$env_file")
    [ -n "$release" ] || die "no KERNEL_RELEASE in $env_file"
    headers=/usr/src/linux-headers-$release
    if [ ! -f "$headers/Makefile" ]; then
        apt-get install -y -q "linux-headers-$release" >/dev/null 2>&1 ||
            die "cannot install linux-headers-$release (apt-get install linux-headers-$release)"
    fi
    ko=$out/cloud/kfx_target.ko
    if [ -f "$ko" ] && [ -z "$(find "$here" "$headers/Makefile" -newer "$ko" -print -quit)" ]; then
        exit 0
    fi
    build_module "$headers" "$out/cloud"
    exit 0
fi
[ $# -eq 0 ] || die "usage: guests/linux-kfx/build.sh [--cloud]"

"$root/guests/linux/build-kernel.sh"
kernel_out=${VMFORK_LINUX_MIN_OUT:-$root/build/linux-min}
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
kdir=$kernel_out/src-$version
[ -f "$kdir/.config" ] || die "$kdir is not a configured kernel tree (guests/linux/build-kernel.sh)"
grep -qx 'CONFIG_MODULES=y' "$kdir/.config" || die "$kdir was configured without CONFIG_MODULES"
# What an out-of-tree build needs from the tree beyond `make vmlinux` (build-kernel.sh): the module linker script
# (modules_prepare) and Module.symvers (`make modules` with no in-tree modules: modpost over vmlinux's exports).
# Seconds; under the kernel build's own lock.
if [ ! -f "$kdir/scripts/module.lds" ] || [ ! -f "$kdir/Module.symvers" ]; then
    (
        flock 8 || die "cannot lock $kernel_out/.lock"
        make -s -C "$kdir" ARCH=x86_64 modules_prepare >/dev/null 2>&1 &&
            make -s -C "$kdir" ARCH=x86_64 modules >/dev/null 2>&1 ||
            die "make modules_prepare modules failed in $kdir"
    ) 8>"$kernel_out/.lock"
fi

want_key() {
    { cat "$kernel_out/key"; for f in "${sources[@]}" init.c build.sh; do cat "$here/$f"; done; } |
        sha256sum | cut -c1-16
}
if [ -f "$out/initramfs.cpio" ] && [ "$(cat "$out/key" 2>/dev/null)" = "$(want_key)" ]; then
    exit 0
fi
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9 || die "cannot lock $out/.lock"

build_module "$kdir" "$out"
gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -fcf-protection=none \
    -fno-asynchronous-unwind-tables -Wall -Werror -o "$out/init.tmp" "$here/init.c" ||
    die "init.c did not build"
mv -f "$out/init.tmp" "$out/init"
[ -x "$kdir/usr/gen_init_cpio" ] || die "$kdir/usr/gen_init_cpio is missing (the kernel tree is not built)"
cat >"$out/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
file /init $out/init 0755 0 0
file /kfx_target.ko $out/kfx_target.ko 0644 0 0
LIST
"$kdir/usr/gen_init_cpio" -t 0 "$out/initramfs.list" >"$out/initramfs.cpio.tmp" || die "gen_init_cpio failed"
mv -f "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
want_key >"$out/key"
