"""`vmfork demo`: boot the demo guest to its ready point, fork it N times, give every fork its own input, run them
all, and show what it cost."""

from __future__ import annotations

import os
import re
import statistics
import struct
import sys
import time
from pathlib import Path

from .errors import VmforkError
from .fork import VM

RESULT = re.compile(rb"result: len=(\d+) fnv=([0-9a-f]+) primes=(\d+)")
WORDS = ("apple", "kernel", "fork", "page", "vcpu", "reset", "fuzz", "xen", "kvm", "python")


def default_kernel() -> Path:
    root = Path(__file__).resolve().parents[2]
    return root / "build" / "guests" / "testguest-pvh.elf"


def pss_kib() -> int:
    """Proportional set size of this process (what its memory really costs when pages are shared)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


KERNEL_FIELDS = ("Slab", "PageTables", "SecPageTables", "VmallocUsed", "KernelStack")


def kernel_memory_kib() -> dict[str, int]:
    """The host's kernel memory by kind (/proc/meminfo, KiB): what VMs cost beyond their processes' PSS."""
    out = dict.fromkeys(KERNEL_FIELDS, 0)
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0])
    return out


def scaling_line(fork_times: list[float]) -> str:
    """Fork p50 around 1, 10, 100 and 1,000 live forks (the 10 forks up to each count)."""
    parts = []
    for k in (1, 10, 100, 1000):
        if k <= len(fork_times):
            parts.append(f"{k:,}: {_fmt_us(statistics.median(fork_times[max(0, k - 10):k]))}")
    return ", ".join(parts)


def sustained_forks(parent: VM, n: int) -> tuple[float, float, float, float]:
    """n forks in a row with no shells prepared (the pool emptied first): (forks/s, p50 of the first 20, p50 of
    the last 20, CPU seconds per fork: this process's user + system time over the burst, every thread, shells made
    by the pool included; on a shared host 1/that is the rate one core of our own would sustain). The forks are
    destroyed afterwards."""
    from .fork import shell_pool
    pool = shell_pool(parent.shape)
    pool.drain()
    pool.settle(120.0)          # shells of destroyed forks still closing would compete with the ones made now
    times: list[float] = []
    kids: list[VM] = []
    progress = _Progress("forks without prepare", n)
    t0 = time.perf_counter()
    c0 = os.times()
    try:
        for i in range(n):
            t = time.perf_counter()
            kids.append(parent.fork())
            times.append(time.perf_counter() - t)
            progress.update(i + 1)
        elapsed = time.perf_counter() - t0
        c1 = os.times()
    finally:
        for k in kids:
            k.destroy()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return n / elapsed, statistics.median(times[:20]), statistics.median(times[-20:]), cpu / n


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.tty = label, total, sys.stderr.isatty()
        self.last = -1

    def update(self, done: int) -> None:
        pct = done * 100 // max(1, self.total)
        if self.tty:
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\r  {self.label:<22} [{bar:<25}] {done}/{self.total}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif pct // 25 != self.last // 25 or done == self.total:
            self.last = pct
            print(f"  {self.label}: {done}/{self.total}", file=sys.stderr)


def _fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def run_demo(*, forks: int = 100, memory_mib: int = 256, kernel: str | None = None) -> int:
    path = Path(kernel) if kernel else default_kernel()
    if not path.exists():
        raise VmforkError(f"{path} does not exist: build the guests first (guests/build.sh, or ./dev demo)")
    if forks < 1:
        raise VmforkError(f"--forks must be at least 1, got {forks}")
    print(f"vmfork demo: {forks} forks of a {memory_mib} MiB guest ({path.name})\n")

    t0 = time.perf_counter()
    parent = VM.create(memory_mib=memory_mib, name="demo")
    try:
        parent.load_kernel(path, cmdline="demo")
        ev = parent.run(timeout=60)
        boot_s = time.perf_counter() - t0
        if ev.reason != "harness-start":
            raise VmforkError(f"the demo guest did not reach its ready point: {ev.reason} {ev.detail}".strip())
        console = parent.device("serial0").output().decode(errors="replace").strip()
        regs = parent.vcpus[0].get_regs()
        buf_addr, buf_size = regs.rdi, regs.rsi
        print(f"  parent booted to its ready point in {_fmt_us(boot_s)} and paused; its console said:")
        for line in console.splitlines():
            print(f"    | {line}")
        print(f"  input buffer at guest-physical {buf_addr:#x}, {buf_size} bytes\n")

        kernel_before = kernel_memory_kib()
        progress = _Progress("preparing VM shells", forks)
        t = time.perf_counter()
        step = max(1, min(16, forks // 10))
        for i in range(step, forks + step, step):
            parent.prepare_forks(min(i, forks))
            progress.update(min(i, forks))
        shells_s = time.perf_counter() - t

        pss_before = pss_kib()
        children: list[VM] = []
        fork_times: list[float] = []
        progress = _Progress("forking", forks)
        for i in range(forks):
            t = time.perf_counter()
            children.append(parent.fork(name=f"demo-fork-{i}"))
            fork_times.append(time.perf_counter() - t)
            progress.update(i + 1)

        inputs = [f"{WORDS[i % len(WORDS)]}-{i}".encode() * (1 + i % 3) for i in range(forks)]
        results: list[tuple[int, bytes, int | None, str]] = []
        progress = _Progress("running forks", forks)
        t_run = time.perf_counter()
        for i, child in enumerate(children):
            data = inputs[i][: buf_size - 8]
            child.memory.write(buf_addr, struct.pack("<Q", len(data)) + data)
            ev = child.run(timeout=30)
            out = child.device("serial0").output()
            m = RESULT.search(out)
            results.append((i, data, ev.status, m.group(0).decode() if m else f"({ev.reason}: {ev.detail})"))
            progress.update(i + 1)
        run_s = time.perf_counter() - t_run
        pss_after = pss_kib()
        kernel_after = kernel_memory_kib()

        reset_times: list[float] = []
        for child in children:
            t = time.perf_counter()
            child.reset()
            reset_times.append(time.perf_counter() - t)

        ok = 0
        for _i, data, _status, line in results:
            expect = fnv1a64(data)
            if f"fnv={expect:016x}" in line or f"fnv={expect:x}" in line:
                ok += 1
        print()
        print("  fork   input                       exit  guest output")
        shown = results if forks <= 12 else results[:5] + results[-5:]
        for i, data, status, line in shown:
            print(f"  {i:>4}   {data.decode()[:26]:<26}  {status if status is not None else '-':>4}  {line}")
            if forks > 12 and i == 4:
                print(f"  {'...':>4}   ({forks - 10} more)")
        fork_med = statistics.median(fork_times)
        print()
        print(f"  boot to ready point         {_fmt_us(boot_s):>10}")
        print(f"  {f'fork (median of {forks})':<27} {_fmt_us(fork_med):>10}   "
              f"{boot_s / fork_med:,.0f}x faster than booting")
        print(f"  fork (p99)                  {_fmt_us(sorted(fork_times)[int(0.99 * (forks - 1))]):>10}")
        print(f"  reset, once per fork (median) {_fmt_us(statistics.median(reset_times)):>8}   "
              "after its whole run: first reset")
        print(f"  VM shells prepared ahead    {_fmt_us(shells_s / forks):>10} each (off the fork path)")
        print(f"  running all {forks} forks       {run_s:>9.2f} s")
        print(f"  memory per fork (PSS)       {(pss_after - pss_before) / forks:>7.0f} KiB "
              f"of a {memory_mib} MiB guest")
        kmem = {k: (kernel_after[k] - kernel_before[k]) / forks for k in kernel_after}
        print(f"  kernel memory per fork      {sum(kmem.values()):>7.0f} KiB "
              f"(slab {kmem['Slab']:.0f}, page tables {kmem['PageTables']:.0f}, "
              f"KVM page tables {kmem['SecPageTables']:.0f}, vmalloc {kmem['VmallocUsed']:.0f}, "
              f"kernel stacks {kmem['KernelStack']:.0f}; whole host, so other work adds noise)")
        print(f"  correct results             {ok}/{forks}")
        print(f"  fork p50 by live forks      {scaling_line(fork_times)}")
        for child in children:
            child.destroy()
        rate, first, last, cpu = sustained_forks(parent, min(forks, 1000))
        print(f"  {min(forks, 1000)} forks in a row, no prepare_forks: {rate:,.0f} forks/s; p50 of the first 20 "
              f"{_fmt_us(first)}, of the last 20 {_fmt_us(last)}; CPU {_fmt_us(cpu)} per fork (all threads: "
              f"{1 / cpu:,.0f} forks/s per core)")
        return 0 if ok == forks else 1
    finally:
        parent.destroy(tree=True)
