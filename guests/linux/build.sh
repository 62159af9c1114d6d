#!/bin/bash
# Prepare a real Debian Linux kernel and a busybox initramfs for vmfork's tests, in build/linux/ at the repo root.
# Idempotent and quiet: prints nothing on success, a clear message on stderr (and exit status 1) on failure.
# Set VERBOSE=1 to see the steps. See guests/linux/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${VMFORK_LINUX_OUT:-$root/build/linux}
meta=${VMFORK_KERNEL_META:-linux-image-cloud-amd64}   # Debian metapackage to resolve
busybox=/bin/busybox
bb_list=/var/lib/dpkg/info/busybox-static.list   # rewritten when busybox-static is (re)installed

die() { echo "guests/linux/build.sh: error: $*" >&2; exit 1; }
warn() { echo "guests/linux/build.sh: warning: $*" >&2; }
say() { if [ -n "${VERBOSE:-}" ]; then echo "guests/linux/build.sh: $*"; fi; return 0; }

# newer TARGET DEP...: TARGET exists and is newer than every DEP.
newer() {
    local t=$1 d; shift
    [ -e "$t" ] || return 1
    for d in "$@"; do [ "$t" -nt "$d" ] || return 1; done
}

outputs_current() {
    [ -e "$out/vmlinuz" ] &&
    newer "$out/vmlinux" "$out/vmlinuz" "$here/extract_vmlinux.py" &&
    newer "$out/kernel.env" "$out/vmlinux" "$here/build.sh" &&
    newer "$out/initramfs.cpio.gz" "$busybox" "$bb_list" "$here/init" "$here/mkinitramfs.py" "$here/vmfork-env.c" &&
    newer "$out/initramfs-shell.cpio.gz" "$busybox" "$bb_list" "$here/init-shell" "$here/mkinitramfs.py" "$here/vmfork-env.c" &&
    newer "$out/initramfs-shell.cpio" "$out/initramfs-shell.cpio.gz"
}

# Fast path: everything built and up to date; no locking, no apt.
if outputs_current; then exit 0; fi

mkdir -p "$out" || die "cannot create $out"
exec 9>"$out/.lock"
flock 9 || die "cannot lock $out/.lock"
if outputs_current; then exit 0; fi   # another build.sh finished while we waited

log=$(mktemp "$out/.log.XXXXXX")
trap 'rm -f "$log"' EXIT

# run CMD...: run quietly; on failure print the command's output and stop.
run() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        die "command failed: $*"
    fi
}

is_root() { [ "$(id -u)" = 0 ]; }
apt_updated=
apt_update() {
    if [ -z "$apt_updated" ]; then
        is_root || die "apt-get update needs root"
        say "apt-get update"
        run apt-get -q update
        apt_updated=1
    fi
}

# need CMD PKG: make sure command CMD exists, installing Debian package PKG if we are root.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    is_root || die "\`$1\` is missing: apt-get install $2 (as root)"
    say "apt-get install $2"
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q -y install "$2" >"$log" 2>&1; then
        apt_update
        DEBIAN_FRONTEND=noninteractive run apt-get -q -y install "$2"
    fi
    command -v "$1" >/dev/null 2>&1 || die "installed $2 but \`$1\` is still missing"
}

need python3 python3
need dpkg-deb dpkg
need apt-get apt
need readelf binutils
need lz4 lz4      # Debian's x86 kernels are lz4-compressed bzImages
need zstd zstd

# --- 1. the kernel package ------------------------------------------------------------------------------------------
# The .deb already in $out pins the kernel: delete it (or all of build/linux) to move to a newer one.
shopt -s nullglob
debs=("$out"/linux-image-[0-9]*.deb)
shopt -u nullglob
if [ ${#debs[@]} -gt 1 ]; then
    die "several kernel packages in $out (${debs[*]##*/}): delete all but one"
elif [ ${#debs[@]} -eq 0 ]; then
    resolve() {
        apt-cache depends --important "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
    }
    pkg=$(resolve || true)
    if [ -z "$pkg" ]; then
        apt_update
        pkg=$(resolve || true)
    fi
    [ -n "$pkg" ] || die "cannot resolve metapackage $meta to a linux-image-<version> package (apt-cache depends $meta)"
    say "$meta -> $pkg; apt-get download $pkg"
    aptopt=()
    if is_root; then aptopt=(-o APT::Sandbox::User=root); fi
    (cd "$out" && run apt-get -q "${aptopt[@]}" download "$pkg")
    shopt -s nullglob
    debs=("$out/$pkg"_*.deb)
    shopt -u nullglob
    [ ${#debs[@]} -eq 1 ] || die "apt-get download $pkg did not leave one ${pkg}_*.deb in $out"
fi
deb=${debs[0]}
pkg=$(dpkg-deb -f "$deb" Package) || die "$deb is not a Debian package"
version=$(dpkg-deb -f "$deb" Version)
release=${pkg#linux-image-}

# --- 2. vmlinuz (bzImage) and its config ------------------------------------------------------------------------------
if ! newer "$out/vmlinuz" "$deb"; then
    say "dpkg-deb -x $(basename "$deb")"
    tree="$out/.unpack"
    rm -rf "$tree"
    run dpkg-deb -x "$deb" "$tree"
    [ -f "$tree/boot/vmlinuz-$release" ] || die "$deb has no /boot/vmlinuz-$release"
    cp "$tree/boot/config-$release" "$out/config"
    cp "$tree/boot/vmlinuz-$release" "$out/vmlinuz.tmp"
    rm -rf "$tree"
    [ "$(head -c 518 "$out/vmlinuz.tmp" | tail -c 4)" = HdrS ] || die "vmlinuz-$release is not a bzImage"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

# --- 3. vmlinux (ELF64) ---------------------------------------------------------------------------------------------
if ! newer "$out/vmlinux" "$out/vmlinuz" "$here/extract_vmlinux.py"; then
    say "extract vmlinux"
    run python3 "$here/extract_vmlinux.py" "$out/vmlinuz" "$out/vmlinux"
fi

# --- 4. facts about the kernel: PVH entry note (Xen, type 18 = XEN_ELFNOTE_PHYS32_ENTRY) -------------------------------
if ! newer "$out/kernel.env" "$out/vmlinux" "$here/build.sh"; then
    say "readelf -n vmlinux"
    run readelf -hn "$out/vmlinux"
    elf_entry=$(awk '/Entry point address:/ { print $4 }' "$log")
    # readelf prints the note as "Xen 0x... Unknown note type: (0x00000012)", then "description data: 50 08 00 01 ...";
    # the data is the little-endian 32-bit physical entry (padded to 8 bytes on x86-64).
    pvh_entry=$(awk '
        $1 == "Xen" && /\(0x00000012\)/ { want = 1; next }
        want && /description data:/ {
            v = ""; for (i = NF; i >= 3; i--) v = v $i; sub(/^0+/, "", v); print "0x" (v == "" ? "0" : v); exit
        }' "$log")
    if [ -z "$pvh_entry" ]; then
        warn "$pkg's vmlinux has NO PVH entry note (Xen ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted through PVH"
    fi
    {
        echo "# written by guests/linux/build.sh"
        echo "KERNEL_PACKAGE=$pkg"
        echo "KERNEL_VERSION=$version"
        echo "KERNEL_RELEASE=$release"
        echo "VMLINUX_ENTRY=$elf_entry"
        echo "PVH_ENTRY=$pvh_entry"
    } >"$out/kernel.env.tmp"
    mv "$out/kernel.env.tmp" "$out/kernel.env"
fi

# --- 5. busybox initramfs -------------------------------------------------------------------------------------------
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]; then
    is_root || die "Debian's busybox-static is not installed: apt-get install busybox-static (as root)"
    say "apt-get install busybox-static"
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q -y install busybox-static >"$log" 2>&1; then
        apt_update
        DEBIAN_FRONTEND=noninteractive run apt-get -q -y install busybox-static
    fi
fi
[ -x "$busybox" ] || die "$busybox is missing although busybox-static is installed"
if ! newer "$out/initramfs.cpio.gz" "$busybox" "$bb_list" "$here/init" "$here/mkinitramfs.py" "$here/vmfork-env.c"; then
    say "build initramfs.cpio.gz"
    run python3 "$here/mkinitramfs.py" "$busybox" "$here/init" "$out/initramfs.cpio.gz"
fi
# the same busybox with an interactive shell as /init (tests/test_linux.py, bench/linux.py), also uncompressed:
# unpacking gzip costs the kernel about 50 s where its mode is emulated
if ! newer "$out/initramfs-shell.cpio.gz" "$busybox" "$bb_list" "$here/init-shell" "$here/mkinitramfs.py" "$here/vmfork-env.c"; then
    say "build initramfs-shell.cpio.gz"
    run python3 "$here/mkinitramfs.py" "$busybox" "$here/init-shell" "$out/initramfs-shell.cpio.gz"
fi
if ! newer "$out/initramfs-shell.cpio" "$out/initramfs-shell.cpio.gz"; then
    gzip -dc "$out/initramfs-shell.cpio.gz" >"$out/initramfs-shell.cpio.tmp"
    mv "$out/initramfs-shell.cpio.tmp" "$out/initramfs-shell.cpio"
fi

outputs_current || die "internal: outputs still out of date after the build"
say "done: $(grep -v '^#' "$out/kernel.env" | tr '\n' ' ')"
