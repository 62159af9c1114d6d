"""Fork and reset costs, measured side by side in one run (issue: the fork engine).

    .venv/bin/python bench/fork.py [--samples 200] [--markdown] [--check]
    .venv/bin/python bench/fork.py --floor-runs 9 --samples 100 [--against main]

`--check` compares this run's medians with docs/benchmarks.md, row by row: its "Reference medians for `--check`"
(today's numbers), else the first round's "Fork and reset" table (a ratio per metric; timings here drift by ±30%, so it
is a guard to read before landing hot-path changes, not a test).
`--against REV` (with `--floor-runs R`): the floor runs alternate between this tree and git revision REV's src/
(extracted to a temporary directory), one process per run, and the ratio of the medians is printed.

Everything uses the `loop` test guest (guests/README.md): at its ready marker the parent is paused; a fork writes
one qword into each of N pages of a scratch area and stops at its end marker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# VMFORK_BENCH_SRC: another tree's src/ to measure (--against runs this script on one)
sys.path.insert(0, os.environ.get("VMFORK_BENCH_SRC") or str(ROOT / "src"))

from rows import REFERENCE_SECTION, documented_medians, parse_duration  # noqa: E402

from vmfork.demo import pss_kib, sustained_forks  # noqa: E402
from vmfork.fork import VM, shell_pool  # noqa: E402
from vmfork.vm import Shell  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f} µs" if us < 10_000 else f"{us / 1000:,.1f} ms"


def boot_parent(memory_mib: int) -> tuple[VM, int, float]:
    t = time.perf_counter()
    vm = VM.create(memory_mib=memory_mib, name="bench")
    vm.load_kernel(GUEST, cmdline="loop")
    ev = vm.run(timeout=60)
    boot_s = time.perf_counter() - t
    if ev.reason != "harness-start":
        raise SystemExit(f"the loop guest did not reach its ready marker: {ev}")
    return vm, vm.vcpus[0].get_regs().rdi, boot_s


def run_pages(child: VM, addr: int, npages: int, seed: int) -> None:
    child.memory.write(addr, struct.pack("<QQ", npages, seed))
    ev = child.run(timeout=60)
    if ev.reason != "harness-end":
        raise SystemExit(f"fork did not reach the end marker: {ev}")


def reset_samples(child: VM, addr: int, n: int, *, memory: bool = True, state: bool = True,
                  runs: list[float] | None = None) -> list[float]:
    """n timings of child.reset(memory=, state=) right after the fork wrote 16 pages (a full reset in between);
    `runs` receives the timings of writing the input and running the fork."""
    samples = []
    child.reset()
    for i in range(n):
        t = time.perf_counter()
        run_pages(child, addr, 16, i)
        t1 = time.perf_counter()
        child.reset(memory=memory, state=state)
        samples.append(time.perf_counter() - t1)
        if runs is not None:
            runs.append(t1 - t)
        child.reset()
    return samples


def floor_runs(parent: VM, addr: int, runs: int, n: int) -> tuple[list[float], list[float], list[float]]:
    """Issue 17's two in-process numbers, `runs` times in this process (each run: n pooled forks, then n resets
    of one fork after it wrote 16 pages): the median of each run (forks, resets, resets' thread CPU). The pool is
    refilled (prepare_forks) before each run's forks, and a second's pause lets its threads finish first."""
    forks: list[float] = []
    resets: list[float] = []
    cpu_resets: list[float] = []
    for _ in range(runs):
        parent.prepare_forks(n + 5)
        time.sleep(1.0)
        samples, kids = [], []
        for _ in range(n):
            t = time.perf_counter()
            kids.append(parent.fork())
            samples.append(time.perf_counter() - t)
        forks.append(statistics.median(samples))
        child = kids.pop()
        for k in kids:
            k.destroy()
        child.reset()
        samples, cpu = [], []
        for i in range(n):
            run_pages(child, addr, 16, i)
            t, c = time.perf_counter(), time.thread_time()
            child.reset()
            cpu.append(time.thread_time() - c)
            samples.append(time.perf_counter() - t)
        resets.append(statistics.median(samples))
        cpu_resets.append(statistics.median(cpu))
        child.destroy()
    return forks, resets, cpu_resets


def listed(xs: list[float]) -> str:
    return ", ".join(f"{x * 1e6:.0f}" for x in xs)


def floor_rows(forks: list[float], resets: list[float], cpu_resets: list[float],
               n: int) -> list[tuple[str, str, str, str]]:
    runs = len(forks)
    return [("fork, in-process, shell pool", fmt(statistics.median(forks)), "",
             f"median of {runs} runs of {n} (per run, µs: {listed(forks)})"),
            ("reset after writing 16 pages", fmt(statistics.median(resets)), "",
             f"median of {runs} runs of {n} (per run, µs: {listed(resets)}); thread CPU "
             f"{fmt(statistics.median(cpu_resets))}")]


def old_tree(rev: str, into: Path) -> Path:
    """git revision `rev`'s src/ under `into`, with this tree's compiled vmfork._fastpath when its source is the
    same (the extension is built by the install, not committed)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    src = into / "src"
    old_c = src / "vmfork" / "_fastpath.c"
    built = sorted((ROOT / "src" / "vmfork").glob("_fastpath*.so"))
    if built and old_c.exists() and old_c.read_bytes() == (ROOT / "src" / "vmfork" / "_fastpath.c").read_bytes():
        shutil.copy2(built[0], src / "vmfork" / built[0].name)
    else:
        print(f"  note: {rev} has another _fastpath.c: its tree runs without the compiled fast path")
    return src


def against(rev: str, runs: int, n: int, markdown: bool) -> int:
    """The floor runs alternating between this tree and `rev`'s, one process per run (each: boot, then one
    floor run), and the ratios of the medians over the runs."""
    results: dict[str, tuple[list[float], list[float], list[float]]] = {"this tree": ([], [], []), rev: ([], [], [])}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT / "src", rev: old_tree(rev, Path(tmp))}
        for i in range(runs):
            order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
            for label, src in order:
                env = {**os.environ, "VMFORK_BENCH_SRC": str(src)}
                out = subprocess.run([sys.executable, __file__, "--floor-runs", "1", "--samples", str(n), "--raw"],
                                     env=env, check=True, capture_output=True, text=True).stdout
                raw = json.loads(out.strip().splitlines()[-1])
                for acc, xs in zip(results[label], (raw["forks"], raw["resets"], raw["cpu_resets"]), strict=True):
                    acc.extend(xs)
    print(f"  floor runs alternating between this tree and {rev}: {runs} runs of {n} each, one process per run")
    for label, (forks, resets, cpu) in results.items():
        for name, med, _, note in floor_rows(forks, resets, cpu, n):
            title = f"{name} ({label})"
            print(f"| {title} | {med} | {note} |" if markdown else f"  {title:<52} {med:>9}  {note}")
    new, old = results["this tree"], results[rev]
    print(f"  fork: this tree {statistics.median(old[0]) / statistics.median(new[0]):.2f}x faster than {rev} "
          f"(median of runs); reset after 16 pages (untouched, a control): "
          f"{statistics.median(old[1]) / statistics.median(new[1]):.2f}x")
    print(f"  load average {os.getloadavg()[0]:.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--burst", type=int, default=1000, help="forks in a row without prepare_forks (0: skip)")
    ap.add_argument("--check", action="store_true", help="compare the medians with docs/benchmarks.md")
    ap.add_argument("--floor-runs", type=int, default=0, metavar="R",
                    help="only issue 17's pooled fork and 16-page reset, R runs of --samples each, and their medians")
    ap.add_argument("--against", metavar="REV",
                    help="with --floor-runs: alternate the runs between this tree and git revision REV")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)   # --against's child: JSON medians
    args = ap.parse_args()
    n = args.samples
    if args.against:
        if not args.floor_runs:
            ap.error("--against needs --floor-runs")
        return against(args.against, args.floor_runs, n, args.markdown)
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, samples: list[float], note: str = "") -> tuple[float, float]:
        med, p99 = stats(samples)
        rows.append((name, fmt(med), fmt(p99), note))
        return med, p99

    if args.floor_runs:
        parent, addr, _ = boot_parent(args.memory)
        forks, resets, cpu_resets = floor_runs(parent, addr, args.floor_runs, n)
        parent.destroy(tree=True)
        if args.raw:
            print(json.dumps({"forks": forks, "resets": resets, "cpu_resets": cpu_resets}))
            return 0
        for name, med, _, note in floor_rows(forks, resets, cpu_resets, n):
            print(f"| {name} | {med} | {note} |" if args.markdown else f"  {name:<40} {med:>9}  {note}")
        print(f"  load average {os.getloadavg()[0]:.1f}")
        return 0

    # Boot (whole machine creation + kernel load + boot to the ready marker), a few times.
    boots = []
    for _ in range(5):
        vm, _, b = boot_parent(args.memory)
        boots.append(b)
        vm.destroy()
    boot_med, _ = row("boot to ready marker (new VM)", boots, "5 samples")

    parent, addr, _ = boot_parent(args.memory)
    pool = shell_pool(parent.shape)

    # Fork with a warm pool of VM shells.
    parent.prepare_forks(n + 5)
    samples = []
    kids = []
    for _ in range(n):
        t = time.perf_counter()
        kids.append(parent.fork())
        samples.append(time.perf_counter() - t)
    fork_med, _ = row("fork, in-process, shell pool", samples)
    for k in kids:
        k.destroy()

    # Fork with no pool: the VM shell (KVM VM, vCPU, irqchip, PIT, slots) is created on the request.
    samples = []
    for _ in range(min(n, 50)):
        t = time.perf_counter()
        shell = Shell(parent.kvm, parent.shape, dirty_logging=True)
        pool._ready.appendleft(shell)
        k = parent.fork()
        samples.append(time.perf_counter() - t)
        k.destroy()
        pool._ready.clear()
    cold_med, _ = row("fork, in-process, no pool", samples, f"{min(n, 50)} samples")

    # Restore of the same paused parent from a save file (vmfork.snapshot; the file is in the page cache), into a
    # new paused machine: the other way to get a copy of it.
    from vmfork.snapshot import restore, save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parent.vmfork"
        save(parent, path)
        samples = []
        for _ in range(10):
            t = time.perf_counter()
            copy = restore(path)
            samples.append(time.perf_counter() - t)
            copy.destroy()
    restore_med, _ = row("restore from a save file (new VM, paused)", samples, "10 samples")

    # Process-isolated forks: each fork is a pre-started worker process (the pool is filled first).
    from vmfork.procfork import fork_process, worker_pool

    m = min(n, 20)
    worker_pool(parent.shape).prefill(m)
    time.sleep(2.0)     # the workers just started: let their start-up work finish before timing forks
    samples = []
    handles = []
    for _ in range(m):
        t = time.perf_counter()
        handles.append(fork_process(parent))
        samples.append(time.perf_counter() - t)
    for h in handles:
        h.destroy()
    row("fork, process-isolated (pre-started worker)", samples, f"{m} samples")

    # Reset after the fork wrote N pages. The pools refill in the background after the forks above (new VM shells
    # here, new worker processes); let that finish first, as it has in a fuzzer's steady state, so the timings
    # below do not share the two cores with it.
    child = parent.fork()
    time.sleep(3.0)
    reset_meds: dict[int, float] = {}
    for npages in (16, 256, 4096, 65536):
        count = n if npages <= 4096 else max(20, n // 10)
        samples = []
        restored: list[int] = []
        child.reset()
        for i in range(count):
            run_pages(child, addr, npages, i)
            t = time.perf_counter()
            restored.append(child.reset())
            samples.append(time.perf_counter() - t)
        med, _ = row(f"reset after writing {npages} pages", samples,
                     f"{statistics.median(restored):.0f} pages restored, {count} samples")
        reset_meds[npages] = med
    # The two halves of a reset, for the 16-page case.
    row("reset after 16 pages, memory only", reset_samples(child, addr, n, state=False))
    row("reset after 16 pages, state only", reset_samples(child, addr, n, memory=False))
    # Hot pages on and off, alternating blocks: with hot_limit 0 every written page is write-protected again at
    # each reset, so the next input's first write to it faults and is logged again.
    hot: dict[int, tuple[list[float], list[float]]] = {child.memory.hot_limit: ([], []), 0: ([], [])}
    for _ in range(4):
        for limit, (resets, runs) in hot.items():
            child.memory.hot_limit = limit
            resets += reset_samples(child, addr, n // 4, runs=runs)
    (on_reset, on_run), (off_reset, off_run) = hot.values()
    child.memory.hot_limit = next(iter(hot))
    hot_on = row("reset after 16 pages, hot pages on (the default)", on_reset, "alternating with the next rows")[0]
    hot_off = row("reset after 16 pages, hot pages off", off_reset)[0]
    run_on = row("write input + run writing 16 pages, hot pages on", on_run)[0]
    run_off = row("write input + run writing 16 pages, hot pages off", off_run)[0]
    # The fuzzer loop's reset (issue 17, third round): the run stops at the end marker without the KVM_RUN that
    # completes its `out` (run(settle=False)), and the reset leaves out the XCRs, debug registers and clock-free
    # MSRs where the run provably did not touch them (VM.reset(lean=True), where guest kernel mode is emulated),
    # against the same reset restoring every part; alternating blocks, wall and thread CPU time per reset.
    loop: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    for _ in range(4):
        for lean, (walls, cpus) in loop.items():
            child.reset()
            for i in range(n // 4):
                child.memory.write(addr, struct.pack("<QQ", 16, i))
                if child.run(timeout=60, settle=False).reason != "harness-end":
                    raise SystemExit("fork did not reach the end marker")
                t, c = time.perf_counter(), time.thread_time()
                child.reset(lean=lean)
                cpus.append(time.thread_time() - c)
                walls.append(time.perf_counter() - t)
    (lean_wall, lean_cpu), (full_wall, full_cpu) = loop.values()
    lean_med = row("reset after 16 pages, fuzzer loop (lean, the default)", lean_wall,
                   f"thread CPU {fmt(statistics.median(lean_cpu))}; run(settle=False) before it; alternating with "
                   "the next row")[0]
    full_med = row("reset after 16 pages, fuzzer loop, every part restored", full_wall,
                   f"thread CPU {fmt(statistics.median(full_cpu))}")[0]
    rings = bool(child.memory._rings)
    child.destroy()

    # The same 16-page reset on a fork whose VM logs dirty pages into bitmaps (KVM_GET_DIRTY_LOG and a scan)
    # instead of per-vCPU dirty rings: what the rings save, side by side.
    if rings:
        os.environ["VMFORK_DIRTY_RING"] = "0"
        try:
            shell = Shell(parent.kvm, parent.shape, dirty_logging=True)
        finally:
            del os.environ["VMFORK_DIRTY_RING"]
        pool._ready.appendleft(shell)
        bitmap_child = parent.fork()
        assert not bitmap_child.memory._rings
        row("reset after 16 pages, bitmap dirty log", reset_samples(bitmap_child, addr, n))
        row("reset after 16 pages, memory only, bitmap dirty log", reset_samples(bitmap_child, addr, n, state=False))
        bitmap_child.destroy()

    # Forks beyond the pool: `--burst` forks in a row with the pool emptied first and no prepare_forks, all kept
    # alive: the shells are made by the pool's background threads as the forks use them.
    burst_note = ""
    if args.burst:
        rate, first, last, cpu = sustained_forks(parent, args.burst)
        rows.append((f"{args.burst} forks in a row, no prepare_forks", f"{rate:,.0f}/s", "",
                     f"p50 of the first 20 {fmt(first)}, of the last 20 {fmt(last)}; CPU {fmt(cpu)} per fork, all "
                     f"threads ({1 / cpu:,.0f} forks/s per core)"))
        burst_note = f"{args.burst} forks in a row without prepare_forks: {rate:,.0f} forks/s, last-20 p50 " \
                     f"{last / first:.2f}x the first 20; {1 / cpu:,.0f} forks per CPU-second"

    # Memory: 100 live forks, each having written 1 MiB (256 pages).
    parent.prepare_forks(100)
    before = pss_kib()
    forks = []
    for i in range(100):
        f = parent.fork()
        run_pages(f, addr, 256, i)
        forks.append(f)
    used_mib = (pss_kib() - before) / 1024
    for f in forks:
        f.destroy()
    parent.destroy()

    ratio_boot = boot_med / fork_med
    print(f"vmfork fork benchmark — {args.memory} MiB guest, 1 vCPU, {n} samples unless noted")
    print(f"host: {platform.node()} {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print()
    if args.markdown:
        print("| measurement | median | p99 | note |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    else:
        for r in rows:
            print(f"  {r[0]:<44} {r[1]:>10}  p99 {r[2]:>10}  {r[3]}")
    print()
    print(f"  fork vs boot: a fork is {ratio_boot:,.0f}x faster than booting the same guest to the same point")
    print(f"  fork without the pool: {cold_med / fork_med:.1f}x the pooled fork")
    print(f"  fork vs restore from a file: a fork is {restore_med / fork_med:,.0f}x faster than restoring the same "
          f"paused guest")
    growth = " → ".join(f"{k}: {fmt(v)}" for k, v in reset_meds.items())
    print(f"  reset cost by dirty pages: {growth}")
    print(f"  hot pages: reset {hot_off / hot_on:.2f}x, input run {run_off / run_on:.2f}x, "
          f"run + reset {(hot_off + run_off) / (hot_on + run_on):.2f}x faster than without")
    print(f"  fuzzer loop reset: lean {full_med / lean_med:.2f}x faster than restoring every part "
          f"(thread CPU {statistics.median(full_cpu) / statistics.median(lean_cpu):.2f}x)")
    print(f"  100 live forks, each wrote 1 MiB: {used_mib:,.1f} MiB PSS beyond the parent "
          f"(budget 100 x 2 MiB = 200 MiB)")
    if burst_note:
        print(f"  {burst_note}")
    if args.check:
        check_against_docs(rows)
    return 0


def check_against_docs(rows: list[tuple[str, str, str, str]]) -> None:
    """Print now/docs per row: the reference medians of docs/benchmarks.md first (the current numbers), else the
    first round's "Fork and reset" table (> 1: slower than documented)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    documented = documented_medians(text, REFERENCE_SECTION, "## Fork and reset")
    print()
    print("  check against docs/benchmarks.md (now / documented median; > 1 is slower):")
    for name, median, _, _ in rows:
        doc = documented.get(name)
        if doc is None:
            print(f"    {name:<52} {median:>10}  (not documented)")
            continue
        now_v, doc_v = parse_duration(median), parse_duration(doc)
        if median.endswith("/s") and doc.endswith("/s"):
            now_r, doc_r = float(median[:-2].replace(",", "")), float(doc[:-2].replace(",", ""))
            print(f"    {name:<52} {median:>10} vs {doc:>10}  {doc_r / now_r:5.2f}x")
        elif now_v is not None and doc_v is not None:
            print(f"    {name:<52} {median:>10} vs {doc:>10}  {now_v / doc_v:5.2f}x")
        else:
            print(f"    {name:<52} {median:>10} vs {doc:>10}")




if __name__ == "__main__":
    sys.exit(main())
