// SPDX-License-Identifier: GPL-2.0
/*
 * kfx_target: a small out-of-tree Linux module to fuzz with vmfork the way KF/x fuzzes one: KF/x's breakpoint
 * harness (int3 with RAX = 0x13371337, RDI/RSI = the input buffer and its size, the same magic at the end) around a
 * record parser with a planted bug. Loading it runs the harness once (`insmod kfx_target.ko`); vmfork pauses the
 * kernel at the start marker, forks, and writes each input into the buffer (a vmalloc address: two pages that are
 * not contiguous in physical memory, translated through the kernel's page tables).
 *
 * The input: records of [type u8][length u8][payload]. Type 1 copies the payload into a 16-byte field (its length
 * is checked); type 2 picks a handler from a table of 4 by the payload's first byte, and the planted bug is that
 * this index is not checked: indexes 4..255 read past the table and call whatever is there (#GP/#PF in kernel mode:
 * an oops, seen by vmfork's default Linux sinks: oops_begin, __die, asm_exc_page_fault, ...).
 *
 * Built against Debian's linux-headers for the cloud kernel by guests/linux-kfx/build.sh.
 */
#include <linux/module.h>
#include <linux/vmalloc.h>
#include <linux/string.h>

#define KFX_MAGIC 0x13371337UL
#define BUF_SIZE (2 * PAGE_SIZE)

static unsigned char *input;

struct state {
	unsigned char name[16];
	unsigned long sum;
};

/*
 * The code under test lives in one section, in source order (Kbuild: -fno-toplevel-reorder), from kfx_parse to
 * kfx_parse_end: the module prints that range at load as `parse=0x... end=0x...`, which `vmfork fuzz --cover auto`
 * reads from the console.
 */
#define FUZZED __section(".text.kfx_fuzzed") noinline

static FUZZED int kfx_parse(const unsigned char *buf, size_t size);
static FUZZED void add(struct state *st, const unsigned char *p, size_t n) { while (n--) st->sum += *p++; }
static FUZZED void mul(struct state *st, const unsigned char *p, size_t n) { while (n--) st->sum *= *p++ | 1; }
static FUZZED void neg(struct state *st, const unsigned char *p, size_t n) { st->sum = -st->sum; }
static FUZZED void clr(struct state *st, const unsigned char *p, size_t n) { st->sum = 0; }

static void (*const handlers[4])(struct state *, const unsigned char *, size_t) = { add, mul, neg, clr };

static FUZZED int kfx_parse(const unsigned char *buf, size_t size)
{
	struct state st = { .sum = 0 };
	size_t pos = 0;

	while (pos + 2 <= size) {
		unsigned char type = buf[pos], len = buf[pos + 1];
		const unsigned char *payload = buf + pos + 2;

		if (pos + 2 + len > size)
			return -EINVAL;
		switch (type) {
		case 0:
			return 0;                               /* end of records */
		case 1:
			if (len > sizeof(st.name))
				return -EINVAL;
			memcpy(st.name, payload, len);
			break;
		case 2:
			if (len < 1)
				return -EINVAL;
			/* BUG (planted): payload[0] is not checked against ARRAY_SIZE(handlers) */
			handlers[payload[0]](&st, payload + 1, len - 1);
			break;
		default:
			return -EINVAL;
		}
		pos += 2 + len;
	}
	return (int)(st.sum & 0x7f);
}

static FUZZED void kfx_parse_end(void) { }

/* KF/x's breakpoint harness: the magic in RAX, the buffer and its size in RDI/RSI */
static __always_inline void kfx_harness(void *buf, unsigned long size)
{
	unsigned long rax = KFX_MAGIC;

	asm volatile("int3" : "+a"(rax) : "D"(buf), "S"(size) : "memory");
}

static int __init kfx_target_init(void)
{
	int ret;

	input = vmalloc(BUF_SIZE);
	if (!input)
		return -ENOMEM;
	memset(input, 0, BUF_SIZE);
	/* the section's start: kfx_parse or add, whichever the compiler put first */
	pr_info("kfx_target: input=0x%px size=%lu parse=0x%px end=0x%px\n", input, BUF_SIZE,
		(void *)min((unsigned long)kfx_parse, (unsigned long)add), kfx_parse_end);
	kfx_harness(input, BUF_SIZE);                          /* start */
	ret = kfx_parse(input, BUF_SIZE);
	kfx_harness(input, BUF_SIZE);                          /* end: the same magic */
	pr_info("kfx_target: parse returned %d\n", ret);
	return 0;
}

static void __exit kfx_target_exit(void)
{
	vfree(input);
}

module_init(kfx_target_init);
module_exit(kfx_target_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("A KF/x-style fuzzing target for vmfork");
