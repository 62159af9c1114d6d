#!/usr/bin/env bash
# Build the vmfork test guest kernels from guests/testguest/ (nasm only, no linker):
#   build/guests/testguest-multiboot.elf   ELF32 with a Multiboot v1 header
#   build/guests/testguest-pvh.elf         ELF32 with a Xen PVH entry note
# An image is rebuilt only when a source file (or this script) is newer than it; --force rebuilds both.
# VMFORK_GUEST_DIR overrides the output directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
src="$here/testguest"
out="${VMFORK_GUEST_DIR:-$root/build/guests}"
force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
fi

if ! command -v nasm >/dev/null 2>&1; then
    echo "guests/build.sh: nasm not found (Debian/Ubuntu: apt-get install nasm)" >&2
    exit 1
fi
mkdir -p "$out"

build() {
    local variant="$1" define="$2"
    local target="$out/testguest-$variant.elf"
    if [[ $force == 0 && -f "$target" && -z "$(find "$src" "$here/build.sh" -newer "$target" -print -quit)" ]]; then
        return 0
    fi
    local tmp
    tmp="$(mktemp "$out/.testguest-$variant.XXXXXX")"
    if ! nasm -f bin -w+all -D"$define" -I "$src/" -o "$tmp" "$src/main.asm"; then
        rm -f "$tmp"
        echo "guests/build.sh: nasm failed for $variant" >&2
        exit 1
    fi
    chmod 644 "$tmp"
    mv -f "$tmp" "$target"       # atomic: concurrent builds never see a half-written image
    echo "built $target"
}

build multiboot VARIANT_MULTIBOOT
build pvh VARIANT_PVH
