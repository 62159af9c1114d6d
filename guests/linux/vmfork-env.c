/* vmfork-env: read the per-fork strings of vmfork's env channel (src/vmfork/devices/envchannel.py) and apply them.
 *
 *   eval "$(vmfork-env)"      in a fork's shell: sets the hostname (key `hostname`) and exports every string
 *   vmfork-env --serve        as /init of a test initramfs: prints VMFORK-ENV-READY, then for every line read on the
 *                             console prints the exports again and VMFORK-ENV-END (for tests without a shell)
 *
 * Output, one line each: `# vmfork env generation N`, `# random HEX` (16 bytes of getrandom(2): the guest's RNG,
 * which Linux reseeds when vmfork's VMGenID notifies it, so forks differ), then `export NAME='value'` (single quotes escaped as '\''),
 * in the order the host gave them. Exit status 0; 1 (and a message on stderr) when ioperm fails or no channel
 * answers (the signature at selector 0 is not "VMFKENV1").
 *
 * Freestanding (no libc: built with -nostdlib -static, so it runs as the first process of a bare initramfs).
 * The protocol: write a 16-bit selector to port 0x520 (this rewinds the data offset), then read bytes from port
 * 0x521. Selector 0: "VMFKENV1", u32 count, u32 generation. Selector 1: count directory entries of 64 bytes
 * (u32 size, u16 selector, u16 reserved, char name[56] NUL-padded). Little endian. */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define SEL_PORT 0x520
#define DATA_PORT 0x521
#define MAX_ENTRIES 64
#define MAX_VALUE 4096

static long sys3(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static long sys_read(int fd, void *buf, long n) { return sys3(0, fd, (long)buf, n); }
static long sys_write(int fd, const void *buf, long n) { return sys3(1, fd, (long)buf, n); }
static long sys_ioperm(long from, long num, long on) { return sys3(173, from, num, on); }
static long sys_sethostname(const char *name, long len) { return sys3(170, (long)name, len, 0); }
static long sys_getpid(void) { return sys3(39, 0, 0, 0); }
static long sys_getrandom(void *buf, long n) { return sys3(318, (long)buf, n, 0); }
static void sys_exit(int status) { for (;;) sys3(60, status, 0, 0); }

static void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static u64 slen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void put(const char *s, u64 n) { while (n) { long w = sys_write(1, s, n); if (w <= 0) return; s += w; n -= w; } }
static void puts_(const char *s) { put(s, slen(s)); }

static void putu(u32 v) {
    char b[12]; int i = 11; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    puts_(b + i);
}

static void select_item(u16 sel) { outw(SEL_PORT, sel); }
static void read_bytes(u8 *buf, u32 n) { for (u32 i = 0; i < n; i++) buf[i] = inb(DATA_PORT); }
static u32 le32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }

int __attribute__((used)) memcmp(const void *a, const void *b, u64 n) {
    const u8 *x = a, *y = b;
    for (u64 i = 0; i < n; i++) if (x[i] != y[i]) return x[i] - y[i];
    return 0;
}

static int emit(void) {
    u8 head[16];
    select_item(0);
    read_bytes(head, 16);
    static const char sig[] = "VMFKENV1";
    for (int i = 0; i < 8; i++)
        if (head[i] != (u8)sig[i]) {
            sys_write(2, "vmfork-env: no vmfork env channel at port 0x520\n", 48);
            return 1;
        }
    u32 count = le32(head + 8), generation = le32(head + 12);
    if (count > MAX_ENTRIES) count = MAX_ENTRIES;
    static u8 dir[MAX_ENTRIES * 64];
    select_item(1);
    read_bytes(dir, count * 64);
    puts_("# vmfork env generation "); putu(generation); puts_("\n");
    u8 rnd[16];                     /* the kernel's RNG as this fork sees it (VMGenID reseeds it per fork) */
    if (sys_getrandom(rnd, 16) == 16) {
        static const char hex[] = "0123456789abcdef";
        char line[33];
        for (int i = 0; i < 16; i++) { line[2 * i] = hex[rnd[i] >> 4]; line[2 * i + 1] = hex[rnd[i] & 15]; }
        line[32] = 0;
        puts_("# random "); puts_(line); puts_("\n");
    }
    static u8 value[MAX_VALUE + 1];
    for (u32 i = 0; i < count; i++) {
        const u8 *e = dir + i * 64;
        u32 size = le32(e);
        u16 sel = e[4] | e[5] << 8;
        char name[57];
        for (int k = 0; k < 56; k++) name[k] = (char)e[8 + k];
        name[56] = 0;
        if (size > MAX_VALUE) size = MAX_VALUE;
        select_item(sel);
        read_bytes(value, size);
        value[size] = 0;
        if (name[0] == 'h' && !memcmp(name, "hostname", 9))
            sys_sethostname((const char *)value, size);
        puts_("export "); puts_(name); puts_("='");
        for (u32 k = 0; k < size; k++) {
            if (value[k] == '\'') puts_("'\\''");
            else put((const char *)value + k, 1);
        }
        puts_("'\n");
    }
    return 0;
}

static int main_(int argc, char **argv) {
    if (sys_ioperm(SEL_PORT, 2, 1) != 0) {
        sys_write(2, "vmfork-env: ioperm(0x520, 2) failed (not root?)\n", 48);
        return 1;
    }
    int serve = (argc > 1 && !memcmp(argv[1], "--serve", 8)) || sys_getpid() == 1;
    if (!serve) return emit();
    puts_("VMFORK-ENV-READY\n");
    for (;;) {
        char c;
        long n = sys_read(0, &c, 1);
        if (n <= 0) continue;
        if (c != '\n') continue;
        emit();
        puts_("VMFORK-ENV-END\n");
    }
}

__attribute__((used)) void start_c(long *sp) {
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    sys_exit(main_(argc, argv));
}

__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n hlt\n");
