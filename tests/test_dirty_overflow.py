"""A fork whose dirty ring overflows still resets exactly.

Where the host emulates guest kernel mode (kvm_pvm), every emulated store logs a dirty-ring entry, and a kernel
that writes a lot within one exit pushes entries past the ring's end: entries are lost. vmfork notices (a ring
filled to its last entry, or pending entries that no longer start at its fetch index), resynchronises, and the next
reset restores every page the fork holds privately (from /proc/self/pagemap). The guest is a real Debian kernel
booting from its first instruction in a fork."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from vmfork.errors import ForkError
from vmfork.fork import VM
from vmfork.vm import RING_OVERFLOW

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"


def digest(vm: VM) -> str:
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


@pytest.mark.skipif(not (LINUX / "vmlinux").exists(), reason="no Debian kernel in build/linux (guests/linux/build.sh)")
@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_linux_fork_resets_exactly_even_after_ring_overflow(machines: list, mode: str) -> None:  # type: ignore[type-arg]
    parent = VM.create(memory_mib=256, name="linux")
    machines.append(parent)
    parent.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"),
                       cmdline="console=ttyS0 nokaslr panic=-1")
    want = digest(parent)
    # RAM exactly the parent's (no VMGenID of its own); "auto" would choose bitmaps for Linux on this host
    fork = parent.fork(new_generation=False, dirty_log=mode)  # type: ignore[arg-type]
    machines.insert(0, fork)
    if mode == "ring" and not fork.memory._rings:
        pytest.skip("this host gives forks dirty bitmaps, not rings (no overflow to provoke)")
    fork.start()
    # Early boot writes every page of its memory map and page tables: on this host the ring overflows within
    # seconds; elsewhere the fork just boots on. Either way it must not crash, loop or lose a page.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (mode == "ring" and fork.memory._ever_lost) \
            and fork.state == "running":
        time.sleep(0.2)
    fork.pause()
    if mode == "ring" and fork.broken is not None:
        # KVM's ring indices went wrong for good (test_a_fork_whose_dirty_ring_overflows_never_loops): the fork
        # stopped, saying so
        assert fork.broken == RING_OVERFLOW and fork.state == "crashed", fork.stop_event
        return
    assert fork.state == "paused", fork.stop_event
    assert len(fork.memory.owned_pages()) > 0
    fork.reset()
    assert digest(fork) == want
    # And the fork runs on from there like a fresh one.
    fork.start()
    time.sleep(1)
    fork.pause()
    if mode == "ring" and fork.broken is not None:
        assert fork.broken == RING_OVERFLOW and fork.state == "crashed", fork.stop_event
        return
    assert fork.state == "paused", fork.stop_event
    fork.reset()
    assert digest(fork) == want


def _page_writer(guest_dir: Path, machines: list) -> VM:  # type: ignore[type-arg]
    """guests/pagewriter paused at its start marker: each run of a fork stores into 8,000 pages in kernel mode,
    then exits with 0x2a."""
    vm = VM.create(memory_mib=64, name="pagewriter")
    machines.append(vm)
    vm.load_kernel(guest_dir / "pagewriter.elf")
    assert vm.run(timeout=20).reason == "harness-start"
    return vm


def test_a_fork_whose_dirty_ring_overflows_never_loops(guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    """Where kernel mode is emulated, one run of the page writer pushes about twice the ring's entries (KVM does not
    stop at the ring's soft limit there). vmfork resynchronises with KVM's ring indices and re-arms what KVM still
    counts used; a ring it cannot bring back stops the fork at once with RING_OVERFLOW, and the fork can only be
    destroyed (before, such a fork looped on "ring full" exits until its timeout, at every later run too). Every
    run ends within a second, and a fork that goes on resets to exactly its parent's RAM."""
    parent = _page_writer(guest_dir, machines)
    want = digest(parent)
    outcomes = []
    for _ in range(4):
        fork = parent.fork(dirty_log="ring")
        for _ in range(3):
            t = time.monotonic()
            ev = fork.run(timeout=20)
            assert time.monotonic() - t < 5, "the run looped on ring-full exits"
            if fork.broken is not None:
                assert fork.broken == RING_OVERFLOW and ev.reason == "crash" and ev.detail == RING_OVERFLOW
                outcomes.append("broken")
                with pytest.raises(ForkError, match="dirty ring overflowed"):
                    fork.reset()
                break
            assert (ev.reason, ev.status) == ("exit", 0x2A), ev
            outcomes.append("exit")
            fork.reset()
            assert digest(fork) == want
        fork.destroy()
    assert "exit" in outcomes, outcomes


def test_a_fuzzer_whose_fork_overflows_its_dirty_ring_goes_on_with_bitmaps(guest_dir: Path,
                                                                           machines: list) -> None:  # type: ignore[type-arg]
    """A fuzz fork stopped with RING_OVERFLOW is replaced by one that logs into dirty bitmaps, and the input runs
    again there: every input gets its real outcome (the page writer's exit 0x2a), none a crash of the host's."""
    from vmfork.fuzz import Fuzzer

    parent = _page_writer(guest_dir, machines)
    with Fuzzer(parent, input_addr=0x200000, input_size=64, input_physical=True, faults=False,
                budget_s=10) as fz:
        results = [fz.execute(bytes([i])) for i in range(8)]
        assert all((r.outcome, r.kind, r.status) == ("ok", "exit", 0x2A) for r in results), results
        if fz.dirty_log == "bitmap":
            assert not fz.fork.memory._rings
