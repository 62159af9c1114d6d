/*
 * AFL-style edge coverage inside the guest, for the jsmn-afl-* image (guests/README.md, "The jsmn example"): with
 * it, `vmfork fuzz --afl --afl-map auto` copies this map into AFL++'s shared memory once per input instead of taking
 * a VM exit per basic block (a breakpoint each, `--cover`).
 *
 * gcc 12 offers only `-fsanitize-coverage=trace-pc` (not clang's trace-pc-guard): a call to
 * __sanitizer_cov_trace_pc at the start of every basic block, with nothing to initialise. The block's identity is
 * the call's return address, hashed into the map; the edge is that hash XOR half the previous one, AFL's formula,
 * so A->B and B->A count separately and a loop's back edge differs from its way in.
 *
 * This file is compiled WITHOUT the instrumentation (the callback must not call itself). Nothing here is reset by
 * the guest: the map and the previous location are zero in the parent paused at the ready marker (the loader zeroes
 * .bss, and no instrumented code runs before the first input), and vmfork's reset of a fork between inputs restores
 * the pages the last input wrote, so every input starts from a zero map and prev = 0 with no clearing pass.
 */

/* 8 KiB, not AFL++'s default 64 KiB: jsmn has about 210 edges (a few collisions expected in 8,192 slots), and
 * every byte of the map costs per input: the fork's reset copies back each map page an input wrote (the hash spreads
 * one input's edges over all of them), vmfork copies the map into AFL++'s, and afl-fuzz clears, classifies and
 * compares the size the fork server announces (docs/benchmarks.md, "To the floor, third round: AFL++": 1.3-1.8x
 * the execs/s of the 64 KiB map under afl-fuzz). */
#define AFL_MAP_SHIFT 13
#define AFL_MAP_SIZE (1UL << AFL_MAP_SHIFT)

/* Page aligned (and 64 KiB aligned, so its address is a round number the guest prints and the README gives); in
 * .bss, so the image's file does not grow and the loader zeroes it. */
unsigned char __afl_area[AFL_MAP_SIZE] __attribute__((aligned(0x10000)));

static unsigned long afl_prev;

void __sanitizer_cov_trace_pc(void)
{
    unsigned long pc = (unsigned long)__builtin_return_address(0);
    /* Fibonacci hashing: the top bits of pc * 2^64/phi spread nearby call sites over the whole map, which the low
     * bits of the address (a few hundred bytes of code) would not. */
    unsigned long cur = (pc * 0x9e3779b97f4a7c15UL) >> (64 - AFL_MAP_SHIFT);

    __afl_area[cur ^ afl_prev]++;
    afl_prev = cur >> 1;
}
