"""Process-isolated forks: creation with a pre-started worker and without (cold), and requests (reset, a no-op).

    .venv/bin/python bench/procfork.py [--forks 20] [--cold 5] [--resets 300] [--memory 128]

Prints medians (and p90) in milliseconds / microseconds. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from pathlib import Path

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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
