#!/bin/bash
# Build the small CI kernel (guests/linux/minimal.config) from Debian's linux-source-6.1, in build/linux-min/.
# Idempotent: the result is keyed by its inputs (the config fragment, this script, the source package's version);
# when build/linux-min/key matches, it only compares that file (milliseconds). Quiet on success; a clear message on
# stderr and exit status 1 on failure. VERBOSE=1 shows the steps. See guests/linux/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${VMFORK_LINUX_MIN_OUT:-$root/build/linux-min}
tarball=/usr/src/linux-source-6.1.tar.xz
pkgs=(linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc)

die() { echo "guests/linux/build-kernel.sh: error: $*" >&2; exit 1; }
say() { if [ -n "${VERBOSE:-}" ]; then echo "guests/linux/build-kernel.sh: $*"; fi; return 0; }

src_version() { dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true; }
want_key() {
    { src_version; cat "$here/minimal.config" "$here/build-kernel.sh"; } | sha256sum | cut -c1-16
}
current() { [ -f "$out/vmlinux" ] && [ "$(cat "$out/key" 2>/dev/null)" = "$(want_key)" ]; }

if current; then exit 0; fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (apt-get install ${missing[*]}, as root)"
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null; } || die "apt-get install ${missing[*]} failed"
fi
[ -f "$tarball" ] || die "$tarball is missing although linux-source-6.1 is installed"

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9 || die "cannot lock $out/.lock"
if current; then exit 0; fi

log=$out/build.log
: >"$log"
run() { "$@" >>"$log" 2>&1 || { tail -30 "$log" >&2; die "command failed: $* (full log: $log)"; }; }

version=$(src_version)
src=$out/src-$version
if [ ! -f "$src/.unpacked" ]; then
    say "unpack $tarball ($version)"
    rm -rf "$src" "$out/.unpack"
    mkdir -p "$out/.unpack"
    run tar -xJf "$tarball" -C "$out/.unpack"
    mv "$out/.unpack/linux-source-6.1" "$src"
    rmdir "$out/.unpack"
    touch "$src/.unpacked"
fi

jobs=$(nproc)
say "configure (allnoconfig + minimal.config) and build with $jobs jobs"
run make -C "$src" ARCH=x86_64 KCONFIG_ALLCONFIG="$here/minimal.config" allnoconfig
# Every option the fragment sets must have survived Kconfig's dependency resolution.
while IFS= read -r line; do
    case $line in
        CONFIG_*=n) opt=${line%%=*}; grep -q "^$opt=" "$src/.config" && die "$opt is set in .config, fragment says n" ;;
        CONFIG_*) grep -qxF "$line" "$src/.config" || die "Kconfig dropped '$line' (a dependency is missing)" ;;
    esac
done <"$here/minimal.config"
run nice -n 10 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux
cp "$src/vmlinux" "$out/vmlinux.tmp"
strip --strip-debug "$out/vmlinux.tmp" 2>/dev/null || true
mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$src/.config" "$out/config"
cp "$src/System.map" "$out/System.map"
release=$(make -s -C "$src" ARCH=x86_64 kernelrelease)
echo "$release" >"$out/release"
want_key >"$out/key"
say "done: $out/vmlinux ($release)"
