#!/usr/bin/env bash
# Build the C half of the jsmn fuzzing example (guests/README.md, "The jsmn example") into $out/jsmn/:
#   jsmn.h     Debian's /usr/include/jsmn.h (package libjsmn-dev) with the planted bug applied
#   jsmn.elf   harness.c with that header: freestanding, static, linked at 0x400000 by link.ld
#   jsmn.bin   its loadable bytes as a flat image, for the test guest's `incbin`
#   jsmn.inc   nasm constants from its symbols: JSMN_TEXT_START/_END (the code), JSMN_FILE_END, JSMN_MEM_END
# and the same three files (jsmn.elf, jsmn.bin, jsmn.inc) in $out/jsmn-afl/ for the AFL++ build: harness.c compiled
# with -fsanitize-coverage=trace-pc and linked with afl_cov.c, which keeps an AFL-style edge map in the guest
# (jsmn.inc adds JSMN_AFL_MAP and JSMN_AFL_MAP_SIZE).
# guests/build.sh calls this, then assembles build/guests/jsmn-{pvh,multiboot}.elf around jsmn/jsmn.bin and
# build/guests/jsmn-afl-pvh.elf around jsmn-afl/jsmn.bin. Rebuilds only when an input (harness.c, afl_cov.c, link.ld,
# this script, the header) is newer than jsmn-afl/jsmn.inc (written last), or with --force; prints
# nothing when up to date. Needs gcc, binutils (ld, objcopy, nm) and libjsmn-dev. VMFORK_GUEST_DIR overrides the
# output directory as for guests/build.sh; JSMN_H overrides the header (to check that a changed one is refused).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${VMFORK_GUEST_DIR:-$root/build/guests}/jsmn"
header="${JSMN_H:-/usr/include/jsmn.h}"
force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
fi

die() { echo "guests/jsmn/build.sh: $*" >&2; exit 1; }

# The planted bug: jsmn_alloc_token's bounds check, off by one. With `>` a parser that has handed out every token
# of the caller's array hands out one more, tokens[num_tokens], and writes it: 16 bytes past the array.
original='  if (parser->toknext >= num_tokens) {'
planted='  if (parser->toknext > num_tokens) {'

for tool in gcc ld objcopy objdump nm; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install gcc binutils)"
done
[[ -f "$header" ]] || die "$header not found: the example fuzzes Debian's jsmn (apt-get install libjsmn-dev)"

afl_out="$(dirname "$out")/jsmn-afl"
inputs=("$here/harness.c" "$here/afl_cov.c" "$here/link.ld" "$here/build.sh" "$header")
if [[ $force == 0 && -f "$out/jsmn.inc" && -f "$out/jsmn.bin" && -f "$afl_out/jsmn.bin" && -f "$afl_out/jsmn.inc" &&
      -z "$(find "${inputs[@]}" -newer "$afl_out/jsmn.inc" -print -quit)" ]]; then
    exit 0
fi
mkdir -p "$out" "$afl_out"
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Apply the change only to the one line it was written for, and refuse anything else: a jsmn.h that does not have
# that line exactly once is a different jsmn, and the example's bug (and its README) would no longer be true.
found="$(grep -cxF -- "$original" "$header" || true)"
if [[ "$found" != 1 ]]; then
    die "the planted bug no longer applies to $header: expected the line '$original' (jsmn_alloc_token's" \
        "bounds check) exactly once, found it $found times; update the change in guests/jsmn/build.sh for this jsmn"
fi
awk -v from="$original" -v to="$planted" '$0 == from { print to; next } { print }' "$header" > "$tmp/jsmn.h"
if [[ "$(diff "$header" "$tmp/jsmn.h" | grep -c '^[<>]')" != 2 ]]; then
    die "applying the planted bug to $header changed more than one line"
fi

# Freestanding code for the guest's user mode: no libc (-nostdlib; jsmn needs only <stddef.h>, from gcc itself),
# absolute addresses (-fno-pic, linked at 0x400000), general registers only (the test guest leaves SSE disabled:
# CR4.OSFXSR is clear), no jump tables (`--cover` finds blocks by following direct branches only), no unwind tables,
# no CET (endbr64). -fstack-protector-strong as Debian builds its packages: functions with arrays on the stack
# (fuzz_json) get a canary, read from the global __stack_chk_guard (the guest has no TLS for the usual %fs:0x28).
cflags=(-std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-pic -fno-pie -fno-builtin -mcmodel=small
        -mno-red-zone -mgeneral-regs-only -fno-jump-tables -fno-asynchronous-unwind-tables -fno-unwind-tables
        -fcf-protection=none -fno-stack-clash-protection -fstack-protector-strong -mstack-protector-guard=global -g)
# (-g: jsmn.elf has line numbers for addr2line and gdb, e.g. `vmfork gdbserver` on a kept crash; the flat jsmn.bin
# has no debug sections. The debug information names jsmn.h where it ends up, not in this temporary directory.)
sym() {     # sym ELF NAME: the symbol's value as 0x...
    local v
    v="$(nm "$1" | awk -v s="$2" '$3 == s { print $1 }')"
    [[ -n "$v" ]] || die "$(basename "$(dirname "$1")")/jsmn.elf has no symbol $2"
    echo "0x$v"
}

# link DIR EXTRA-OBJECTS...: link DIR/jsmn.elf from DIR/harness.o (and the extra objects), make DIR/jsmn.bin and
# DIR/jsmn.inc, and check the layout link.ld promises
link() {
    local dir="$1"
    shift
    gcc -nostdlib -static -no-pie -Wl,-T,"$here/link.ld" -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
        -o "$dir/jsmn.elf" "$dir/harness.o" "$@" || die "linking $dir/jsmn.elf failed"
    objcopy -O binary "$dir/jsmn.elf" "$dir/jsmn.bin"
    local elf="$dir/jsmn.elf" text_start text_end file_end mem_end entry size
    text_start="$(sym "$elf" __text_start)"; text_end="$(sym "$elf" __text_end)"
    file_end="$(sym "$elf" __file_end)"; mem_end="$(sym "$elf" __end)"
    entry="$(sym "$elf" fuzz_json)"
    [[ $((entry)) == $((text_start)) ]] || die "fuzz_json is not the first thing in jsmn.elf (link.ld)"
    size="$(stat -c %s "$dir/jsmn.bin")"
    [[ $((text_start + size)) == $((file_end)) ]] || die "jsmn.bin is $size bytes, expected $((file_end - text_start))"
    cat > "$dir/jsmn.inc" <<INC
; generated by guests/jsmn/build.sh from jsmn.elf: do not edit
JSMN_TEXT_START equ $text_start     ; fuzz_json, the entry point: rdi = data, rsi = length
JSMN_TEXT_END   equ $text_end
JSMN_FILE_END   equ $file_end
JSMN_MEM_END    equ $mem_end
INC
}

gcc "${cflags[@]}" -ffile-prefix-map="$tmp"="$out" -I "$tmp" -c "$here/harness.c" -o "$tmp/harness.o" ||
    die "gcc failed on harness.c"
link "$tmp"

# The AFL++ build: the same harness and header with gcc's basic-block callback (-fsanitize-coverage=trace-pc; gcc 12
# has no trace-pc-guard), which afl_cov.c implements uninstrumented; __stack_chk_fail opts out in harness.c
# (no_sanitize_coverage). Everything else, the planted bug and the canary included, is as above.
mkdir "$tmp/afl"
gcc "${cflags[@]}" -fsanitize-coverage=trace-pc -ffile-prefix-map="$tmp"="$out" -I "$tmp" \
    -c "$here/harness.c" -o "$tmp/afl/harness.o" || die "gcc failed on harness.c (trace-pc)"
gcc "${cflags[@]}" -c "$here/afl_cov.c" -o "$tmp/afl/afl_cov.o" || die "gcc failed on afl_cov.c"
link "$tmp/afl" "$tmp/afl/afl_cov.o"
afl_map="$(sym "$tmp/afl/jsmn.elf" __afl_area)"
afl_size="$(nm -S "$tmp/afl/jsmn.elf" | awk '$4 == "__afl_area" { print "0x" $2 }')"
[[ $((afl_map % 4096)) == 0 && $((afl_map + afl_size)) -le $(($(sym "$tmp/afl/jsmn.elf" __end))) ]] ||
    die "the AFL map $afl_map (size $afl_size) is not page aligned inside the image's .bss"
if objdump -d "$tmp/afl/jsmn.elf" | awk '/^[0-9a-f]+ <(__sanitizer_cov_trace_pc|__stack_chk_fail)>:/ { f = 1; next }
                                         /^[0-9a-f]+ </ { f = 0 } f && /call/' | grep -q .; then
    die "__sanitizer_cov_trace_pc or __stack_chk_fail is instrumented in jsmn-afl/jsmn.elf"
fi
cat >> "$tmp/afl/jsmn.inc" <<INC
%define JSMN_AFL_MAP      $afl_map  ; the edge map (afl_cov.c): the jsmn program prints afl-map=... size=...
%define JSMN_AFL_MAP_SIZE $afl_size
INC

chmod 644 "$tmp"/jsmn.* "$tmp"/afl/jsmn.*
for f in jsmn.h jsmn.elf jsmn.bin jsmn.inc; do      # jsmn.inc last: it marks the set complete
    mv -f "$tmp/$f" "$out/$f"
done
for f in jsmn.elf jsmn.bin jsmn.inc; do             # and jsmn-afl/jsmn.inc marks both sets complete
    mv -f "$tmp/afl/$f" "$afl_out/$f"
done
