"""Introspection costs (issue 5): memory reads, a page walk, breakpoint round trips and single steps.

    .venv/bin/python bench/vmi.py [--samples 500] [--hits 2000] [--markdown]

Everything uses the `vmi` test guest (guests/README.md) paused at its ready marker. The breakpoint round trip is a
breakpoint on `vmi_target`, which the guest calls once per iteration: the guest hits it, vmfork's callback runs, the
guest continues (on hosts where KVM ignores software breakpoints: #BP through the stub, one exit to vmfork for the
hit and one for the temporary breakpoint that re-inserts it). "Stop and continue" is the same with the machine
stopping at every hit and `Debugger.run()` continuing it.

The debugger rows of issue 14, side by side in the same run, use guests/bare (a Multiboot guest with no IDT, whose
user-mode breakpoints go through the IDT vmfork lends it): a kernel-mode breakpoint round trip (on hosts that emulate
kernel mode: the emulation-failure exit, then a KVM single-step over it), a single step in kernel mode (KVM
single-step) and in user mode (temporary breakpoints through the #BP stub where the host cannot single-step there).
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmfork.fork import VM  # noqa: E402
from vmfork.vmi import debugger, read_phys, read_virt, translate  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"
BARE = ROOT / "build" / "guests" / "bare-noidt"


def bare_labels() -> dict[str, int]:
    out = {}
    for line in BARE.with_suffix(".map").read_text().splitlines():
        m = re.match(r"\s*([0-9A-F]+)\s+([0-9A-F]+)\s+(\w+)$", line)
        if m:
            out[m.group(3)] = int(m.group(2), 16)
    return out


def bare_rows(samples: int) -> list[tuple[str, str, str]]:
    """Kernel-mode breakpoint round trip, and single steps in kernel and user mode, on the bare guest."""
    rows = []
    sym = bare_labels()
    vm = VM.create(memory_mib=64, name="bench-bare")
    try:
        vm.load_kernel(BARE.with_suffix(".elf"), cmdline="")
        dbg = debugger(vm)
        dbg.add_breakpoint(sym["kernel_tick"])
        if dbg.run(timeout=60).reason != "breakpoint":
            raise SystemExit("the bare guest did not reach kernel_tick")
        times = []
        for _ in range(min(samples, 150)):
            t = time.perf_counter()
            ev = dbg.step()
            times.append(time.perf_counter() - t)
            if ev.reason != "step":
                raise SystemExit(f"expected a step, got {ev}")
        rows.append((f"single step, guest kernel mode ({dbg.mechanism})", fmt(statistics.median(times)),
                     f"median of {len(times)} `Debugger.step()`: KVM single-step (one debug exit)"))
        dbg.clear()
        bp = dbg.add_breakpoint(sym["kernel_spin"], callback=lambda hit: True)
        dbg.add_breakpoint(sym["user_tick"])
        t = time.perf_counter()
        ev = dbg.run(timeout=600)
        elapsed = time.perf_counter() - t
        if ev.reason != "breakpoint":
            raise SystemExit(f"the kernel breakpoint run ended with {ev}")
        rows.append((f"breakpoint round trip, guest kernel mode ({dbg.mechanism}), callback continues",
                     fmt(elapsed / bp.hits), f"{bp.hits} hits in {elapsed:.2f} s: the emulation-failure exit at the "
                     "int3, then a single step over it"))
        dbg.remove_breakpoint(bp)
        times = []
        for _ in range(min(samples, 150)):
            t = time.perf_counter()
            ev = dbg.step()
            times.append(time.perf_counter() - t)
            if ev.reason not in ("step", "breakpoint"):
                raise SystemExit(f"expected a step, got {ev}")
        rows.append((f"single step, guest user mode ({dbg.mechanism})", fmt(statistics.median(times)),
                     f"median of {len(times)} `Debugger.step()`: temporary int3s, #BP through the stub and a lent "
                     "IDT where the host cannot single-step user mode"))
        dbg.detach()
    finally:
        vm.destroy(tree=True)
    return rows


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f} µs" if us < 100 else f"{us:,.0f} µs"


def us(text: str) -> float:
    """The µs value of a `fmt` result."""
    return float(text.split()[0].replace(",", ""))


def median_of(fn: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ready_vm(n: int) -> tuple[VM, int]:
    vm = VM.create(memory_mib=64, name="bench-vmi")
    vm.load_kernel(GUEST, cmdline=f"vmi {n}")
    ev = vm.run(timeout=60)
    if ev.reason != "harness-start":
        raise SystemExit(f"the vmi guest did not reach its ready marker: {ev}")
    m = re.search(rb"target=(0x[0-9a-f]+)", vm.device("serial0").output())
    assert m
    return vm, int(m.group(1), 16)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--hits", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    rows: list[tuple[str, str, str]] = []
    vm, target = ready_vm(args.hits)
    try:
        read_phys(vm, 0x200000, 4096)
        rows.append(("physical read, 4 KiB", fmt(median_of(lambda: read_phys(vm, 0x200000, 4096), args.samples)),
                     "`read_phys`: one slot lookup, one copy"))
        rows.append(("virtual read, 4 KiB", fmt(median_of(lambda: read_virt(vm, 0x200000, 4096), args.samples)),
                     "`read_virt`: CR3 from the vCPU, a 3-level walk (2 MiB pages), one copy"))
        rows.append(("virtual read, 4 KiB across a page boundary",
                     fmt(median_of(lambda: read_virt(vm, 0x1FF800, 4096), args.samples)),
                     "two walks, two copies"))
        rows.append(("translate with the walk recorded", fmt(median_of(lambda: translate(vm, target), args.samples)),
                     "`translate`: each level's table, entry and flags"))

        fork = vm.fork()
        dbg = debugger(fork)
        dbg.add_breakpoint(target, callback=lambda hit: True)
        t = time.perf_counter()
        ev = dbg.run(timeout=600)
        elapsed = time.perf_counter() - t
        if ev.reason != "exit":
            raise SystemExit(f"the breakpoint run ended with {ev}")
        per_hit = elapsed / args.hits
        bp_hits = dbg.list()[0].hits
        rows.append((f"breakpoint round trip ({dbg.mechanism}), callback continues", fmt(per_hit),
                     f"{bp_hits} hits in {elapsed:.2f} s, {dbg.round_trips} exits to vmfork"))
        fork.destroy()

        fork = vm.fork()
        dbg = debugger(fork)
        dbg.add_breakpoint(target)
        stops = min(args.hits, 300)
        times = []
        for _ in range(stops):
            t = time.perf_counter()
            ev = dbg.run(timeout=60)
            times.append(time.perf_counter() - t)
            if ev.reason != "breakpoint":
                raise SystemExit(f"expected a breakpoint stop, got {ev}")
        rows.append((f"breakpoint stop + continue ({dbg.mechanism})", fmt(statistics.median(times)),
                     f"median of {stops}: `Debugger.run()` from one stop to the next"))
        fork.destroy()
    finally:
        vm.destroy(tree=True)
    rows += bare_rows(args.samples)
    # side by side: every debugger row as a multiple of the user-mode breakpoint round trip of this same run
    base = next(us(v) for n, v, _ in rows if n.startswith("breakpoint round trip (") and "callback" in n)
    rows = [(n, v, f"{note}; {us(v) / base:.2f}x the user-mode round trip") if ("step" in n or "breakpoint" in n)
            and not n.startswith("breakpoint round trip (") else (n, v, note) for n, v, note in rows]

    host = f"{platform.node()}, Python {platform.python_version()}"
    if args.markdown:
        print(f"### Introspection (`bench/vmi.py`, {host})\n")
        print("| operation | median | notes |")
        print("|---|---:|---|")
        for name, value, note in rows:
            print(f"| {name} | {value} | {note} |")
    else:
        print(f"introspection costs on {host}")
        for name, value, note in rows:
            print(f"  {name:<50} {value:>12}   {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
