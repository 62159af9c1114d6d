"""Process-isolated forks: creation with a pre-started worker and without (cold), and requests (reset, a no-op).

    .venv/bin/python bench/procfork.py [--forks 20] [--cold 5] [--resets 300] [--memory 128] [--check]
    .venv/bin/python bench/procfork.py --linux [--forks 5]

Prints medians (and p90) in milliseconds / microseconds. Not a test. `--check` also prints each median's ratio to
docs/benchmarks.md's "Reference medians for `--check`", else its "Process-isolated forks" table (> 1: slower than
documented). `--linux`: process forks of
the Linux at its shell prompt (the save file tests/linux_guest.py caches in build/linux-test/), side by side with
in-process forks of it: fork, one command's answer, reset after it.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from pathlib import Path

from rows import REFERENCE_SECTION, documented_medians, parse_duration

from vmfork.fork import VM
from vmfork.procfork import ProcessFork, fork_process, worker_pool

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"


def med(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[max(0, int(len(xs) * 0.9) - 1)]
    return f"median {statistics.median(xs):8.3f}  p90 {p90:8.3f}  (n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forks", type=int, default=20)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--resets", type=int, default=300)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--check", action="store_true", help="compare the medians with docs/benchmarks.md")
    ap.add_argument("--linux", action="store_true", help="process forks of the Linux at its prompt")
    args = ap.parse_args()
    if args.linux:
        linux(args.forks)
        return

    parent = VM.create(memory_mib=args.memory, name="bench")
    parent.load_kernel(GUEST, cmdline="loop")
    ev = parent.run(timeout=30)
    assert ev.reason == "harness-start", ev
    addr = parent.vcpus[0].get_regs().rdi
    pool = worker_pool(parent.shape)

    # Warm: idle workers ready, no background refill competing for the CPUs while measuring.
    warm: list[float] = []
    worker_side: list[float] = []
    batch = 5
    forks: list[ProcessFork] = []
    pool.target = 0
    done = 0
    while done < args.forks:
        n = min(batch, args.forks - done)
        pool.prefill(n)
        time.sleep(0.2)
        for _ in range(n):
            t0 = time.perf_counter()
            h = fork_process(parent)
            warm.append((time.perf_counter() - t0) * 1e3)
            worker_side.append(h.spawn_us / 1e3)
            forks.append(h)
        done += n
    # Prepared workers (WorkerPool.prefer: the image mapped and the clock-free state loaded ahead) against
    # unprepared ones, alternating, each round from freshly prefilled idle workers.
    from vmfork import procfork
    side: dict[bool, list[float]] = {True: [], False: []}
    side_worker: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.forks // 2):
        for prepared in (True, False) if round_ % 2 == 0 else (False, True):
            procfork.PREPARE_WORKERS = prepared
            pool.prefill(1)
            time.sleep(0.5)             # the preparer gets the idle worker ready meanwhile
            t0 = time.perf_counter()
            h = fork_process(parent)
            side[prepared].append((time.perf_counter() - t0) * 1e3)
            side_worker[prepared].append(h.spawn_us / 1e3)
            forks.append(h)
    procfork.PREPARE_WORKERS = True
    # a warm fork is runnable: check one
    h = forks[0]
    h.memory_write(addr, struct.pack("<QQ", 4, 7))
    assert h.run(timeout=10).reason == "harness-end"
    h.reset()

    # Requests on a fork: a no-op round trip, reset after a 4-page iteration, reset with nothing dirty.
    ping: list[float] = []
    for _ in range(args.resets):
        t0 = time.perf_counter()
        h.ping()
        ping.append((time.perf_counter() - t0) * 1e6)
    reset: list[float] = []
    for i in range(args.resets):
        h.memory_write(addr, struct.pack("<QQ", 4, i))
        assert h.run(timeout=10).reason == "harness-end"
        t0 = time.perf_counter()
        h.reset()
        reset.append((time.perf_counter() - t0) * 1e6)
    reset_clean: list[float] = []
    for _ in range(args.resets):
        t0 = time.perf_counter()
        h.reset()
        reset_clean.append((time.perf_counter() - t0) * 1e6)
    iteration: list[float] = []
    for i in range(args.resets):
        t0 = time.perf_counter()
        h.memory_write(addr, struct.pack("<QQ", 4, i))
        h.run(timeout=10)
        h.reset()
        iteration.append((time.perf_counter() - t0) * 1e6)
    for f in forks:
        f.destroy()

    # In-process reset for comparison.
    child = parent.fork()
    inproc: list[float] = []
    for i in range(args.resets):
        child.memory.write(addr, struct.pack("<QQ", 4, i))
        child.run(timeout=10)
        t0 = time.perf_counter()
        child.reset()
        inproc.append((time.perf_counter() - t0) * 1e6)
    child.destroy()

    # Cold: no idle worker, the fork starts its process (Python start-up, imports, VM shell).
    cold: list[float] = []
    for _ in range(args.cold):
        time.sleep(0.3)
        t0 = time.perf_counter()
        h = fork_process(parent)
        cold.append((time.perf_counter() - t0) * 1e3)
        h.destroy()

    print(f"memory {args.memory} MiB, 1 vCPU, guest 'loop'")
    print(f"fork, pre-started worker (ms)      {med(warm)}")
    print(f"  of which in the worker (ms)      {med(worker_side)}")
    print(f"fork, prepared worker (ms)         {med(side[True])}   (alternating with the next row)")
    print(f"  of which in the worker (ms)      {med(side_worker[True])}")
    print(f"fork, unprepared worker (ms)       {med(side[False])}")
    print(f"  of which in the worker (ms)      {med(side_worker[False])}")
    print(f"  prepared vs unprepared: {statistics.median(side[False]) / statistics.median(side[True]):.2f}x faster")
    print(f"fork, cold (ms)                    {med(cold)}")
    print(f"request round trip, ping (us)      {med(ping)}")
    print(f"reset via RPC, 4-page loop (us)    {med(reset)}")
    print(f"reset via RPC, nothing dirty (us)  {med(reset_clean)}")
    print(f"write+run+reset via RPC (us)       {med(iteration)}")
    print(f"reset in-process, same work (us)   {med(inproc)}")
    parent.destroy()
    if args.check:
        # (row of the docs table, this run's median in seconds)
        check([("fork, pre-started worker", statistics.median(warm) / 1e3),
               ("… of which inside the worker", statistics.median(worker_side) / 1e3),
               ("fork, cold (starts the worker process: Python start-up and imports)", statistics.median(cold) / 1e3),
               ("request round trip (ping)", statistics.median(ping) / 1e6),
               ("reset through the worker, 4-page loop", statistics.median(reset) / 1e6),
               ("reset in-process, same work", statistics.median(inproc) / 1e6)])


def _answer(f: VM | ProcessFork, command: bytes, marker: bytes, timeout: float = 300) -> float:
    """Seconds from typing `command` into the fork's console to `marker` in its output."""
    def console() -> bytes:
        return f.console() if isinstance(f, ProcessFork) else bytes(f.device("serial0").output())
    since = len(console())
    t0 = time.perf_counter()
    f.feed_console(command)
    f.start()
    try:
        while marker not in console()[since:]:
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"{f.name}: no answer in {timeout} s: {console()[since:][-200:]!r}")
            f.wait(0.05)
        return time.perf_counter() - t0
    finally:
        if f.state == "running":
            f.pause()


def linux(n: int) -> None:
    """Process forks of the Linux at its prompt against in-process forks of it, alternating."""
    from vmfork.fork import dirty_log_mode
    from vmfork.snapshot import restore
    saves = sorted((ROOT / "build" / "linux-test").glob("*.save"))
    if not saves:
        raise SystemExit("no cached Linux at its prompt in build/linux-test/: run tests/test_linux_forks.py once")
    parent = restore(saves[0])
    mode = dirty_log_mode(parent)
    pool = worker_pool(parent.shape, dirty_ring=mode == "ring")
    pool.target = 0
    fork_ms: dict[str, list[float]] = {"process": [], "in-process": []}
    answer_s: dict[str, list[float]] = {"process": [], "in-process": []}
    reset_ms: dict[str, list[float]] = {"process": [], "in-process": []}
    for i in range(n):
        for kind in ("process", "in-process") if i % 2 == 0 else ("in-process", "process"):
            if kind == "process":
                pool.prefill(1)
                time.sleep(0.5)             # the preparer gets the idle worker ready meanwhile
            t0 = time.perf_counter()
            f: VM | ProcessFork = parent.fork(isolation="process") if kind == "process" else parent.fork()
            fork_ms[kind].append((time.perf_counter() - t0) * 1e3)
            answer_s[kind].append(_answer(f, f"echo a-$(({i}+42))\n".encode(), f"a-{i + 42}".encode()))
            t0 = time.perf_counter()
            f.reset()
            reset_ms[kind].append((time.perf_counter() - t0) * 1e3)
            f.destroy()
    parent.destroy()
    print(f"Linux at its prompt ({saves[0].name}), dirty log {mode}; process vs in-process forks, alternating")
    for kind in ("process", "in-process"):
        print(f"fork, {kind:<10} (ms)             {med(fork_ms[kind])}")
        print(f"  one command answered (s)         {med(answer_s[kind])}")
        print(f"  reset after it (ms)              {med(reset_ms[kind])}")
    ratio = statistics.median(fork_ms["process"]) / statistics.median(fork_ms["in-process"])
    print(f"  process / in-process fork: {ratio:.1f}x")


def check(now: list[tuple[str, float]]) -> None:
    """Print now/documented per row: the reference medians of docs/benchmarks.md first, else its "Process-isolated
    forks" table (> 1: slower than documented)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    documented = documented_medians(text, REFERENCE_SECTION, "## Process-isolated forks")
    print("check against docs/benchmarks.md (now / documented median; > 1 is slower):")
    for name, seconds in now:
        doc = parse_duration(documented.get(name, ""))
        ratio = f"{seconds / doc:5.2f}x" if doc else "(not documented)"
        print(f"  {name:<70} {ratio}")


if __name__ == "__main__":
    main()
