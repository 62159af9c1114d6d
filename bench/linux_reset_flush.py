"""A Linux fork's reset with its two ways of dropping KVM's stale shadow translations, side by side in one run:
re-registering the RAM slots (GuestMemory.reregister_slots, the fallback) and moving the flush slot
(vmfork.shadow_flush, what GuestMemory.drop_translations does where KVM accepts the slot).

The Linux at its busybox prompt (the save file tests/linux_guest.py caches in build/linux-test/) is forked once; the
fork answers `--resets` x 2 commands, each starting new processes (`echo rI-$((I*7+3)) $(echo xI | cat)`), and is
reset after each, the two ways alternating (ABBA, so that drift in the host's load hits both alike). Each command
right after a reset is checked against its answer: the reset's way of flushing is then proven on it. Then a second
fork resets once without any flush (the control: its shell dies). Wall and CPU time (this thread's, which includes
the ioctls' kernel work) per reset and per flush, medians; KVM's leaf translations left right after each flush.

    .venv/bin/python bench/linux_reset_flush.py [--resets N] [--limit S] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from rows import print_rows  # noqa: E402

from linux_guest import PANIC, PROMPT, ask, spawning_command  # noqa: E402
from vmfork.fork import kernel_mode_emulated  # noqa: E402
from vmfork.kvm.stats import StatsCounter  # noqa: E402
from vmfork.snapshot import restore  # noqa: E402

WAYS = ("re-registering the RAM slots", "moving the flush slot")


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:,.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resets", type=int, default=20, help="resets each way (default 20)")
    ap.add_argument("--limit", type=float, default=300, help="seconds a command may take (default 300)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if not kernel_mode_emulated():
        raise SystemExit("this host does not emulate guest kernel mode: KVM does not shadow page tables, no flush")
    saves = sorted((ROOT / "build" / "linux-test").glob("*.save"))
    if not saves:
        raise SystemExit("no cached Linux at its prompt in build/linux-test/: run tests/test_linux_forks.py once")
    parent = restore(saves[0])
    fork = parent.fork()
    assert fork.flush_translations_on_reset
    mem = fork.memory
    leaves = [StatsCounter(fork.shell.vm.fd, f"pages_{s}") for s in ("4k", "2m", "1g")]
    ways: dict[str, Callable[[], None]] = {WAYS[0]: mem.reregister_slots, WAYS[1]: mem.drop_translations}
    reset_wall: dict[str, list[float]] = {w: [] for w in WAYS}
    reset_cpu: dict[str, list[float]] = {w: [] for w in WAYS}
    flush_wall: dict[str, list[float]] = {w: [] for w in WAYS}
    flush_cpu: dict[str, list[float]] = {w: [] for w in WAYS}
    left: dict[str, list[int]] = {w: [] for w in WAYS}
    right: dict[str, int] = dict.fromkeys(WAYS, 0)
    pages: list[int] = []
    current = WAYS[0]

    def timed_flush() -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        ways[current]()
        flush_wall[current].append(time.perf_counter() - w0)
        flush_cpu[current].append(time.thread_time() - c0)
        left[current].append(sum(c.read() for c in leaves))

    mem.drop_translations = timed_flush         # type: ignore[method-assign]
    t_start = time.monotonic()
    previous: str | None = None                 # the way the last reset flushed
    try:
        order = [WAYS[(i // 2 + i) % 2] for i in range(2 * args.resets)]     # A B B A A B B A ...
        for i, way in enumerate([*order, None]):
            command, answer = spawning_command(i)
            out = ask(fork, command, args.limit)
            ok = answer in out and PROMPT in out
            if previous is not None:
                right[previous] += ok
            if not ok:
                print(f"command {i} after a reset by {previous}: no answer: {out[-300:]!r}", file=sys.stderr)
                break
            if way is None:
                break
            current = way
            w0, c0 = time.perf_counter(), time.thread_time()
            pages.append(fork.reset())
            reset_wall[way].append(time.perf_counter() - w0)
            reset_cpu[way].append(time.thread_time() - c0)
            previous = way
    finally:
        for c in leaves:
            c.close()
        fork.destroy()
    took = time.monotonic() - t_start
    # the control: a fork that resets without any flush
    control = parent.fork()
    try:
        control.flush_translations_on_reset = False
        first = ask(control, spawning_command(100)[0], args.limit)
        control.reset()
        command, answer = spawning_command(101)
        out = ask(control, command, args.limit)
        died = PANIC in out
        verdict = ("answered" if answer in out else
                   "the shell (init) died: " + out[out.index(PANIC):].split(b"\n")[0].decode(errors="replace").strip()
                   if died else "no answer")
        if spawning_command(100)[1] not in first:
            verdict = "its first command failed already"
    finally:
        control.destroy()
        parent.destroy()

    rows = []
    for w in WAYS:
        n = len(reset_wall[w])
        rows.append((f"reset after a command, {w} (median of {n}): wall / CPU",
                     f"{_ms(reset_wall[w])} / {_ms(reset_cpu[w])}"))
    for w in WAYS:
        rows.append((f"  of which the flush, {w}: wall / CPU", f"{_ms(flush_wall[w])} / {_ms(flush_cpu[w])}"))
    a, b = (statistics.median(reset_wall[w]) for w in WAYS)
    fa, fb = (statistics.median(flush_wall[w]) for w in WAYS)
    rows.append(("reset wall time, re-registering / flush slot", f"{a / b:.1f}x (flush alone {fa / fb:.1f}x)"))
    for w in WAYS:
        rows.append((f"commands answered right after a reset {w}", f"{right[w]}/{len(reset_wall[w])}"))
        rows.append((f"KVM leaf translations left after the flush, {w} (max)", f"{max(left[w], default=-1)}"))
    rows.append(("pages restored per reset (median)", f"{statistics.median(pages):.0f}"))
    rows.append(("without a flush (the control), the command after a reset", verdict))
    print_rows(f"A Linux fork reset {len(pages)} times, the flush alternating, in {took:.0f} s "
               f"(save file {saves[0].name})", rows, markdown=args.markdown, width=70)


if __name__ == "__main__":
    main()
