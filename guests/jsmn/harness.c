/*
 * vmfork's fuzzing example on a third-party parser: jsmn, the JSON tokenizer from Debian's libjsmn-dev
 * (/usr/include/jsmn.h, header only), compiled freestanding and run in the test guest's user mode (CPL3) by its
 * `jsmn` program (guests/testguest/programs.asm), once per input, between the harness's ready and end markers.
 *
 * The jsmn.h included here is the Debian header with one planted bug (guests/jsmn/build.sh applies it): the bounds
 * check in jsmn_alloc_token is off by one, so a document with more tokens than the array holds writes one token
 * past the end of fuzz_json's `t` below. The array lives on the stack, and a function with an array on its stack
 * carries a canary (-fstack-protector-strong, as Debian builds its packages; the guard in the global
 * __stack_chk_guard), so the overwrite is caught the way it is in production code: the canary differs when fuzz_json
 * returns, __stack_chk_fail runs `ud2`, and the guest reports #UD (vector 6) with the RIP of that `ud2`. Nothing here
 * looks at the input to fake a crash.
 *
 * What the harness does with the tokens is what a small configuration reader would do, so that block coverage has
 * something to follow beyond the tokenizer: the top level must be an object; a few keys are recognised and their
 * values checked.
 */
#define JSMN_STATIC     /* jsmn's functions become static: one translation unit, nothing exported */
#define JSMN_STRICT     /* RFC 8259 primitives only; more branches for the fuzzer to find */
#include "jsmn.h"

/* Tokens the harness can take: more than any seed has (guests/jsmn/seeds/: 10, 11 and 19 tokens), so the fuzzer has
 * to grow a document past it; 25 tokens and more reach the planted bug. */
#define MAX_TOKENS 24

/* The stack protector's guard (-mstack-protector-guard=global). Neither of its 32-bit halves is a value a token field
 * can hold (a type 1 to 4, -1, a position or size below 65536), so whichever 8 of the 16 bytes past the array it
 * occupies, a token written there changes it. (The low byte is zero, as in glibc's canaries.) */
unsigned long __stack_chk_guard = 0x5eed0fc0ffee1200UL;

/* Where the failed check was (the return address into the function whose canary changed), for a look at a crashed
 * fork kept by `vmfork fuzz --keep`: `vmfork mem read` of this symbol's address (`nm build/guests/jsmn/jsmn.elf`). */
void *stack_chk_failed_in;

/* Called by a function whose canary changed. No libc, no kernel to panic in: remember where, then `ud2`, which the
 * test guest's kernel reports as "EXCEPTION vec=6 rip=<here>" (exit status 0x86), a crash to the fuzzer. Not
 * instrumented in the jsmn-afl build (no_sanitize_coverage): its one block says nothing the crash does not. */
__attribute__((noreturn, no_stack_protector, no_sanitize_coverage, used)) void __stack_chk_fail(void)
{
    stack_chk_failed_in = __builtin_return_address(0);
    __builtin_trap();
}

static int key_is(const char *js, const jsmntok_t *t, const char *s)
{
    int n = t->end - t->start;
    int i;

    if (t->type != JSMN_STRING)
        return 0;
    for (i = 0; i < n; i++)
        if (s[i] == '\0' || js[t->start + i] != s[i])
            return 0;
    return s[n] == '\0';
}

/* A JSON number token as a (saturating, integer-part only) value; -1 for anything else. */
static long number(const char *js, const jsmntok_t *t)
{
    long v = 0;
    int i = t->start;

    if (t->type != JSMN_PRIMITIVE || js[i] < '0' || js[i] > '9')
        return -1;
    for (; i < t->end && js[i] >= '0' && js[i] <= '9'; i++)
        v = v < 100000000 ? v * 10 + (js[i] - '0') : v;
    return v;
}

/* Index of the token after t[i] and everything inside it. */
static int skip(const jsmntok_t *t, int i, int n)
{
    int end = t[i].end;

    for (i++; i < n && t[i].start < end; i++)
        ;
    return i;
}

/* The entry point (first in the image, see link.ld): data and its length, as the guest program passes them.
 * Returns a small score of what it understood; the guest ignores it. */
__attribute__((section(".text.entry"))) long fuzz_json(const char *js, unsigned long len)
{
    jsmn_parser p;
    jsmntok_t t[MAX_TOKENS];
    long score = 0;
    int n, i;

    jsmn_init(&p);
    n = jsmn_parse(&p, js, len, t, MAX_TOKENS);
    if (n < 1 || t[0].type != JSMN_OBJECT)
        return n;
    for (i = 1; i + 1 < n; i = skip(t, i + 1, n)) {
        const jsmntok_t *k = &t[i], *v = &t[i + 1];

        if (key_is(js, k, "name") && v->type == JSMN_STRING && v->end > v->start)
            score += 1;
        else if (key_is(js, k, "vcpus") && number(js, v) >= 1 && number(js, v) <= 64)
            score += 2;
        else if (key_is(js, k, "memory") && number(js, v) >= 16)
            score += 4;
        else if (key_is(js, k, "disks") && v->type == JSMN_ARRAY)
            score += 8 * v->size;
        else if (key_is(js, k, "net") && v->type == JSMN_OBJECT)
            score += 16;
        else if (key_is(js, k, "debug") && v->type == JSMN_PRIMITIVE && js[v->start] == 't')
            score += 32;
    }
    return score;
}
