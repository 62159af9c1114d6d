"""Dirty rings versus bitmaps for forks of a Linux busy in kernel mode (issue 15 item 3): the CI kernel is booted for
BOOT seconds and paused mid-boot; forks of that point run RUN seconds of wall time each, alternately with
fork(dirty_log="ring") and fork(dirty_log="bitmap"), twice; printed: exits, the last printk timestamp reached (how
far the guest got), the pages its dirty log reports, and its reset.

    .venv/bin/python bench/linux_dirtylog.py BOOT RUN [KERNEL]      # e.g. 150 25
"""

from __future__ import annotations

import re
import sys
import time

from vmfork.fork import VM

NL = b"\n"
STAMP = re.compile(rb"\[\s*(\d+\.\d+)\]")


def main() -> int:
    boot, run = float(sys.argv[1]), float(sys.argv[2])
    kernel = sys.argv[3] if len(sys.argv) > 3 else "build/linux-min/vmlinux"
    vm = VM.create(memory_mib=256, name="lx", cpuid="default")
    vm.load_kernel(kernel, initrd="build/linux/initramfs-shell.cpio", cmdline="console=ttyS0")
    serial = vm.device("serial0")
    vm.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < boot and vm.wait(0.5).reason == "timeout":
        pass
    vm.pause()
    stamps = STAMP.findall(bytes(serial.output()))
    print(f"parent paused at printk {stamps[-1].decode() if stamps else '-'}", flush=True)
    for _ in range(2):
        for mode in ("ring", "bitmap"):
            f = vm.fork(dirty_log=mode, new_generation=False)  # type: ignore[arg-type]
            fs = f.device("serial0")
            since = len(fs.output())
            e0 = f.exits
            t0 = time.monotonic()
            f.start()
            while time.monotonic() - t0 < run and f.wait(0.5).reason == "timeout":
                pass
            f.pause()
            wall = time.monotonic() - t0
            out = bytes(fs.output())[since:]
            stamps = STAMP.findall(out)
            dirty = len(f.memory.dirty_pages())
            t1 = time.perf_counter()
            pages = f.reset()
            rs = time.perf_counter() - t1
            print(f"{mode:6} wall {wall:.1f} s, exits {f.exits - e0}, last printk "
                  f"{stamps[-1].decode() if stamps else '-'}, {out.count(NL)} lines, dirty log {dirty} pages, "
                  f"reset {rs * 1e3:.1f} ms ({pages} pages)", flush=True)
            f.destroy()
    vm.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
