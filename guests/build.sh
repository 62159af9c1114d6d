#!/usr/bin/env bash
# Build the vmfork test guest kernels from guests/testguest/ (nasm only, no linker):
#   build/guests/testguest-multiboot.elf   ELF32 with a Multiboot v1 header
#   build/guests/testguest-pvh.elf         ELF32 with a Xen PVH entry note
# and the same two with the jsmn fuzzing example (guests/jsmn/: Debian's jsmn JSON parser compiled by gcc, with a
# planted bug) in a second PT_LOAD, and the `jsmn` program that calls it:
#   build/guests/jsmn-multiboot.elf, build/guests/jsmn-pvh.elf
# and build/guests/kfx-multiboot.elf (+ .map), a target with KF/x's conventions (guests/kfx/kfx.asm)
# and build/guests/jsmn-afl-pvh.elf, the same with the C code built for AFL++ (an edge map in the guest)
# An image is rebuilt only when a source file (or this script) is newer than it; --force rebuilds all of them.
# VMFORK_GUEST_DIR overrides the output directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
src="$here/testguest"
inc="$here/include"         # nasm includes the foreign-convention guests share (PVH header, long-mode entry, IDT gates)
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

# build NAME VARIANT-DEFINE [DEPENDENCY...] [-- NASM-ARGUMENTS...]: assemble $out/NAME.elf from main.asm when a
# source, this script or a dependency is newer than it
build() {
    local name="$1" define="$2"
    shift 2
    local deps=() extra=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do deps+=("$1"); shift; done
    if [[ $# -gt 0 ]]; then shift; extra=("$@"); fi
    local target="$out/$name.elf"
    if [[ $force == 0 && -f "$target" &&
          -z "$(find "$src" "$here/build.sh" "${deps[@]}" -newer "$target" -print -quit)" ]]; then
        return 0
    fi
    local tmp
    tmp="$(mktemp "$out/.$name.XXXXXX")"
    if ! nasm -f bin -w+all -D"$define" -I "$src/" "${extra[@]}" -o "$tmp" "$src/main.asm"; then
        rm -f "$tmp"
        echo "guests/build.sh: nasm failed for $name" >&2
        exit 1
    fi
    chmod 644 "$tmp"
    mv -f "$tmp" "$target"       # atomic: concurrent builds never see a half-written image
    echo "built $target"
}

build testguest-multiboot VARIANT_MULTIBOOT
build testguest-pvh VARIANT_PVH

# The bare debugger-test guests (guests/bare/): Multiboot, one without any IDT, one with only a #BP handler; each
# with a .map of its labels beside it
bare() {
    local name="$1"
    shift
    local target="$out/$name.elf"
    if [[ $force == 0 && -f "$target" && -f "$out/$name.map" &&
          -z "$(find "$here/bare" "$inc" "$here/build.sh" -newer "$target" -print -quit)" ]]; then
        return 0
    fi
    local tmp
    tmp="$(mktemp "$out/.$name.XXXXXX")"
    if ! nasm -f bin -I "$inc/" -DMAPFILE="$out/$name.map" "$@" -o "$tmp" "$here/bare/bare.asm"; then
        rm -f "$tmp"
        echo "guests/build.sh: nasm failed for $name" >&2
        exit 1
    fi
    chmod 644 "$tmp"
    mv -f "$tmp" "$target"
    echo "built $target"
}
bare bare-noidt
bare bare-bp -DWITH_BP_HANDLER
# The KF/x-style foreign target (guests/kfx/kfx.asm: its own page tables with a direct map and a vmalloc-style
# buffer, its own fault handlers, KF/x's int3 harness), with its nasm symbol map beside it
kfx="$out/kfx-multiboot.elf"
if [[ $force == 1 || ! -f "$kfx" || ! -f "${kfx%.elf}.map" ||
      -n "$(find "$here/kfx" "$inc" "$here/build.sh" -newer "$kfx" -print -quit)" ]]; then
    tmp="$(mktemp "$out/.kfx.XXXXXX")"
    if ! nasm -f bin -w+all -I "$inc/" --before "[map symbols $tmp.map]" -o "$tmp" "$here/kfx/kfx.asm"; then
        rm -f "$tmp" "$tmp.map"
        echo "guests/build.sh: nasm failed for kfx-multiboot" >&2
        exit 1
    fi
    chmod 644 "$tmp" "$tmp.map"
    mv -f "$tmp.map" "${kfx%.elf}.map"
    mv -f "$tmp" "$kfx"
    echo "built $kfx"
fi
# the foreign-convention guests with a source of their own and no variants: guests/syscallguest/main.asm (system
# calls), guests/protguest/main.asm (page protection in the instruction fallbacks) and guests/pagewriter/main.asm
# (dirty-ring loss in a jailed fork)
single() {
    local name="$1" source="$here/$2/main.asm"
    local target="$out/$name.elf"
    if [[ $force == 0 && -f "$target" && -z "$(find "$source" "$inc" -newer "$target" -print -quit)" ]]; then
        return 0
    fi
    local tmp
    tmp="$(mktemp "$out/.$name.XXXXXX")"
    nasm -f bin -w+all -I "$inc/" -o "$tmp" "$source" || { rm -f "$tmp"; echo "guests/build.sh: nasm failed for $name" >&2; exit 1; }
    chmod 644 "$tmp"
    mv -f "$tmp" "$target"
    echo "built $target"
}
single syscallguest syscallguest
single protguest protguest
single pagewriter pagewriter

# The jsmn example: its C part first (guests/jsmn/build.sh; says what is missing and fails without gcc, binutils or
# libjsmn-dev), under a lock so that a concurrent build never pairs one build's jsmn.bin with another's jsmn.inc.
exec 9>"$out/.jsmn.lock"
flock 9
force_arg=()
if [[ $force == 1 ]]; then force_arg=(--force); fi
"$here/jsmn/build.sh" "${force_arg[@]}"
jsmn="$out/jsmn"
build jsmn-multiboot VARIANT_MULTIBOOT "$jsmn/jsmn.inc" "$jsmn/jsmn.bin" -- -DWITH_JSMN -I "$jsmn/"
build jsmn-pvh VARIANT_PVH "$jsmn/jsmn.inc" "$jsmn/jsmn.bin" -- -DWITH_JSMN -I "$jsmn/"
# ... and the AFL++ build of the same C code (edge map in the guest: guests/jsmn/afl_cov.c), PVH only
build jsmn-afl-pvh VARIANT_PVH "$out/jsmn-afl/jsmn.inc" "$out/jsmn-afl/jsmn.bin" -- -DWITH_JSMN -I "$out/jsmn-afl/"
exec 9>&-
