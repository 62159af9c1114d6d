// SPDX-License-Identifier: GPL-2.0
/*
 * /init of the kfx initramfs (guests/linux-kfx/mkinitramfs.sh): PID 1 loads /kfx_target.ko with finit_module(2),
 * whose init runs KF/x's harness. No libc and no shell: four kinds of system call (write, open, finit_module,
 * pause), each a `syscall` instruction, so the target depends on nothing in user space but the kernel's entry.
 *
 * Under vmfork the machine stops at the module's start marker, inside finit_module; every fuzz fork starts there
 * and ends at the end marker, so nothing after finit_module runs in a fork. Without a fuzzer, the module's int3s
 * are the kernel's to handle: Linux oopses on an int3 in kernel mode that no one claims (a KF/x target is meant to
 * run under its fuzzer).
 *
 * Build: gcc -static -nostdlib -ffreestanding (guests/linux-kfx/build.sh).
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_pause 34
#define SYS_finit_module 313
#define O_RDONLY 0

static long sys3(long n, long a, long b, long c)
{
	long ret;

	asm volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

static void say(const char *s)
{
	long n = 0;

	while (s[n])
		n++;
	sys3(SYS_write, 1, (long)s, n);
}

static void say_number(long v)
{
	char buf[24], *p = buf + sizeof(buf) - 1;
	int neg = v < 0;
	unsigned long u = neg ? -(unsigned long)v : (unsigned long)v;

	*p = 0;
	do {
		*--p = '0' + u % 10;
		u /= 10;
	} while (u);
	if (neg)
		*--p = '-';
	say(p);
}

void __attribute__((noreturn)) _start(void)
{
	long fd, ret;

	say("kfx-init: finit_module /kfx_target.ko\n");
	fd = sys3(SYS_open, (long)"/kfx_target.ko", O_RDONLY, 0);
	if (fd < 0) {
		say("kfx-init: cannot open /kfx_target.ko: ");
		say_number(fd);
		say("\n");
	} else {
		ret = sys3(SYS_finit_module, fd, (long)"", 0);
		say("kfx-init: finit_module returned ");
		say_number(ret);
		say("\n");
	}
	for (;;)            /* PID 1 must not exit */
		sys3(SYS_pause, 0, 0, 0);
}
