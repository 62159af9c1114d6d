"""The fork engine on real /dev/kvm with the test guest: copy-on-write memory, complete state, forks of forks,
reset, blocked interrupts, and the rules about parents."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from guest import boot, console, field, run_to_exit, run_to_ready, write_input
from vmfork.demo import fnv1a64
from vmfork.errors import ForkError, VmStateError
from vmfork.fork import shell_pool
from vmfork.procfork import ProcessFork

SCRATCH = 64 << 20          # where the `loop` program writes its pages
MIB = 1 << 20


def loop_input(vm, addr: int, npages: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    vm.memory.write(addr, struct.pack("<QQ", npages, seed))


def scratch_words(vm, npages: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [struct.unpack("<Q", vm.memory.read(SCRATCH + i * 4096, 8))[0] for i in range(npages)]


def ram_digest(vm) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


def test_fork_shares_memory_copy_on_write_and_siblings_are_isolated(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    before = ram_digest(parent)
    a, b = parent.fork(), parent.fork()
    loop_input(a, addr, 16, 0xAAAA)
    loop_input(b, addr, 16, 0xBBBB)
    assert a.run(timeout=20).reason == "harness-end"
    assert b.run(timeout=20).reason == "harness-end"
    assert scratch_words(a, 16) == [0xAAAA ^ i for i in range(16)]
    assert scratch_words(b, 16) == [0xBBBB ^ i for i in range(16)]
    assert scratch_words(parent, 16) == [0] * 16
    assert ram_digest(parent) == before, "a fork changed its parent's memory"


def test_fork_continues_exactly_like_its_parent(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "det 30", machines)
    run_to_ready(parent)
    before_fork = console(parent)
    child = parent.fork()
    run_to_exit(child)
    child_out = console(child)
    child.destroy()
    run_to_exit(parent)
    parent_after = console(parent)[len(before_fork):]
    assert child_out.count("det ") == 30
    assert child_out == parent_after


def test_reset_restores_memory_and_state(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    base_regs = bytes(child.vcpus[0].get_regs())
    for seed in (1, 2, 3):
        loop_input(child, addr, 16, seed)
        assert child.run(timeout=20).reason == "harness-end"
        assert scratch_words(child, 16) == [seed ^ i for i in range(16)]
        pages = child.reset()
        assert 16 <= pages < 64, f"reset restored {pages} pages for a 16-page write"
        assert scratch_words(child, 16) == [0] * 16
        assert bytes(child.vcpus[0].get_regs()) == base_regs
        assert np.array_equal(child.memory.pages, parent.memory.pages)


def test_reset_memory_only_and_state_only(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    fork_rip = child.vcpus[0].get_regs().rip
    loop_input(child, addr, 4, 7)
    assert child.run(timeout=20).reason == "harness-end"
    end_rip = child.vcpus[0].get_regs().rip
    assert end_rip != fork_rip
    child.reset(memory=False, state=True)
    assert child.vcpus[0].get_regs().rip == fork_rip
    assert scratch_words(child, 4) == [7 ^ i for i in range(4)], "state-only reset must keep memory"
    loop_input(child, addr, 4, 9)
    assert child.run(timeout=20).reason == "harness-end"
    child.reset(memory=True, state=False)
    assert scratch_words(child, 4) == [0] * 4
    assert child.vcpus[0].get_regs().rip == end_rip, "memory-only reset must keep the vCPU state"


def test_reset_undoes_writes_made_by_vmfork(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    run_to_ready(parent)
    child = parent.fork()
    original = parent.memory.read(SCRATCH + 123, 64)
    child.memory.write(SCRATCH + 123, b"\xee" * 64)
    child.memory.write(2 * MIB - 8, b"\x11" * 16)          # crosses a page boundary
    assert child.memory.read(SCRATCH + 123, 64) == b"\xee" * 64
    assert child.reset() == 3
    assert child.memory.read(SCRATCH + 123, 64) == original
    assert child.memory.read(2 * MIB - 8, 16) == parent.memory.read(2 * MIB - 8, 16)


def test_forks_of_forks_see_their_parent_fork_at_fork_time(pvh_guest, machines) -> None:
    root = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(root)
    child = root.fork()
    loop_input(child, addr, 8, 0x1000)
    assert child.run(timeout=20).reason == "harness-end"
    child_digest = ram_digest(child)
    grandchild = child.fork()
    assert scratch_words(grandchild, 8) == [0x1000 ^ i for i in range(8)]
    # The grandchild continues from the end marker back to the ready marker, then writes its own pages.
    assert grandchild.run(timeout=20).reason == "harness-start"
    loop_input(grandchild, addr, 12, 0x2000)
    assert grandchild.run(timeout=20).reason == "harness-end"
    assert scratch_words(grandchild, 12) == [0x2000 ^ i for i in range(12)]
    assert ram_digest(child) == child_digest, "a grandchild changed its parent fork's memory"
    grandchild.reset()
    # Back to the parent fork's state, not the root's.
    assert scratch_words(grandchild, 12) == [0x1000 ^ i for i in range(8)] + [0] * 4
    great = grandchild.fork()
    assert scratch_words(great, 8) == [0x1000 ^ i for i in range(8)]
    assert scratch_words(root, 8) == [0] * 8


def test_blocked_interrupts_fork_sees_no_timer_ticks(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "timer 40", machines)
    blocked = parent.fork(block_interrupts=True)
    normal = parent.fork()
    run_to_exit(blocked)
    run_to_exit(normal)
    assert int(field(console(blocked), "ticks")) == 0
    assert int(field(console(normal), "ticks")) > 0
    blocked.reset()
    run_to_exit(blocked)
    assert console(blocked).count("ticks=0") == 2, "a reset blocked fork must stay blocked"


def test_parent_stays_paused_while_it_has_forks(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    run_to_ready(parent)
    child = parent.fork(name="kid-1")
    with pytest.raises(VmStateError, match="kid-1"):
        parent.run(timeout=1)
    with pytest.raises(VmStateError, match="kid-1"):
        parent.destroy()
    with pytest.raises(Exception, match="read-only"):
        parent.memory.write(SCRATCH, b"x")
    child.destroy()
    assert parent.run(timeout=20).reason == "harness-end"
    again = parent.fork()
    parent.destroy(tree=True)
    assert again.state == "destroyed" and parent.state == "destroyed"


def test_bad_fork_requests_create_nothing(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "timer 3000", machines)
    with pytest.raises(ForkError, match="64 MiB, not 128"):
        parent.fork(memory_mib=128)
    with pytest.raises(ForkError, match="vCPUs"):
        parent.fork(vcpus=2)
    with pytest.raises(ForkError, match="launch_dm"):
        parent.fork(launch_dm="maybe")  # type: ignore[arg-type]
    assert parent.children == []
    parent.start()
    try:
        with pytest.raises(ForkError, match="while it runs"):
            parent.fork()
    finally:
        parent.pause()
    assert parent.children == []
    parent.destroy()
    with pytest.raises(ForkError, match="destroyed"):
        parent.fork()


def test_a_hundred_forks_run_side_by_side(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "demo", machines, memory_mib=64)
    addr, _ = run_to_ready(parent)
    shell_pool(parent.shape).prefill(20)
    forks = [parent.fork() for _ in range(100)]
    inputs = [f"input-{i}".encode() * (1 + i % 4) for i in range(100)]
    for f, data in zip(forks, inputs, strict=True):
        write_input(f, addr, data)
    for f in forks:
        f.start()
    for f, data in zip(forks, inputs, strict=True):
        ev = f.wait(60)
        assert ev.reason == "exit", (ev, console(f))
        assert f"fnv={fnv1a64(data):016x}" in console(f)
        assert ev.status == fnv1a64(data) & 0x3F


def test_large_resets_restore_every_page(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    for npages in (3000, 16384):     # 16384 is clamped by the guest to the RAM above its scratch area
        loop_input(child, addr, npages, 0x55)
        assert child.run(timeout=60).reason == "harness-end"
        touched = min(npages, (128 - 64) * 256)
        assert scratch_words(child, 3) == [0x55, 0x54, 0x57]
        restored = child.reset()
        assert restored >= touched
        assert np.array_equal(child.memory.pages, parent.memory.pages)


def test_fork_isolation_levels(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "det 4", machines)
    run_to_ready(parent)
    with pytest.raises(ForkError, match="isolation must be thread or process"):
        parent.fork(isolation="vm")  # type: ignore[call-overload]
    thread_fork = parent.fork()
    process_fork = parent.fork(isolation="process")
    assert isinstance(process_fork, ProcessFork)
    assert process_fork.pid != thread_fork.memory.fd and process_fork.alive()
    assert run_to_exit(thread_fork).status == 0
    assert process_fork.run(timeout=20).reason == "exit"
    assert process_fork.console().decode() == console(thread_fork)
    process_fork.destroy()


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_reset_and_fork_of_fork_in_both_dirty_log_modes(pvh_guest, machines, monkeypatch, mode: str) -> None:
    """Forks log guest writes into per-vCPU dirty rings where KVM has them, else into bitmaps: both must restore
    every page, including past a full ring (KVM_EXIT_DIRTY_RING_FULL), and report what a fork owns."""
    from vmfork.vm import dirty_ring_bytes
    monkeypatch.setenv("VMFORK_DIRTY_RING", "1" if mode == "ring" else "0")
    parent = boot(pvh_guest, "loop", machines, memory_mib=112 if mode == "ring" else 104)   # a pool of its own
    if mode == "ring" and not dirty_ring_bytes(parent.kvm):
        pytest.skip("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    assert bool(child.memory._rings) == (mode == "ring")
    for npages in (16, 3000, 10000):        # one by one, with numpy, past the 4096-entry ring
        loop_input(child, addr, npages, npages)
        assert child.run(timeout=60).reason == "harness-end"
        assert scratch_words(child, 2) == [npages, npages ^ 1]
        assert child.reset() >= npages
        assert np.array_equal(child.memory.pages, parent.memory.pages)
    loop_input(child, addr, 40, 0x77)
    assert child.run(timeout=60).reason == "harness-end"
    owned = set(child.memory.owned_pages().tolist())
    scratch_page = SCRATCH >> 12            # RAM-file page = guest page below 3 GiB
    assert set(range(scratch_page, scratch_page + 10000)) <= owned
    grandchild = child.fork()
    assert scratch_words(grandchild, 40) == [0x77 ^ i for i in range(40)]
    assert scratch_words(grandchild, 41)[40] == 0


def _ring_has_new_entries(vm) -> bool:  # type: ignore[no-untyped-def]
    ring = vm.memory._rings[0]
    return bool(ring.words[(ring.fetch & ring.mask) << 1] & 1)     # KVM_DIRTY_GFN_F_DIRTY at the next entry


def test_hot_pages_stay_writable_and_every_reset_restores_them(pvh_guest, machines, monkeypatch) -> None:
    """A fuzzer writes the same few pages for every input. Their ring entries are not re-armed, so the guest writes
    them again without a fault or an entry, and each reset copies them back anyway; more pages than hot_limit
    (or a large reset) write-protects them again."""
    from vmfork.vm import dirty_ring_bytes
    monkeypatch.setenv("VMFORK_DIRTY_RING", "1")
    parent = boot(pvh_guest, "loop", machines, memory_mib=120)          # a pool of its own
    if not dirty_ring_bytes(parent.kvm):
        pytest.skip("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    mem = child.memory
    assert mem._rings and mem.hot_limit >= 32
    loop_input(child, addr, 16, 1)
    assert child.run(timeout=20).reason == "harness-end"
    assert _ring_has_new_entries(child)
    first = child.reset()
    assert 16 <= first <= mem.hot_limit and len(mem._hot) >= 16
    assert np.array_equal(mem.pages, parent.memory.pages)
    for seed in (2, 3):                                 # the same pages again: no fault, no entry, still restored
        loop_input(child, addr, 16, seed)
        assert child.run(timeout=20).reason == "harness-end"
        assert scratch_words(child, 16) == [seed ^ i for i in range(16)]
        assert not _ring_has_new_entries(child), "a hot page was write-protected again"
        assert child.reset() == first
        assert np.array_equal(mem.pages, parent.memory.pages)
    # A fork of the fork sees what the fork wrote into its hot pages, which left no trace in the ring.
    loop_input(child, addr, 16, 4)
    assert child.run(timeout=20).reason == "harness-end"
    assert not _ring_has_new_entries(child)
    grandchild = child.fork()
    assert scratch_words(grandchild, 16) == [4 ^ i for i in range(16)]
    grandchild.destroy()
    child.reset()
    assert not mem._hot, "forking the fork must write-protect its hot pages again (they are in its image now)"
    assert np.array_equal(mem.pages, parent.memory.pages)
    # A large reset and one over hot_limit both write-protect every page again: the next write is logged.
    for npages, limit in ((3000, mem.hot_limit), (16, 8)):
        mem.hot_limit = limit
        loop_input(child, addr, npages, 5)
        assert child.run(timeout=60).reason == "harness-end"
        assert child.reset() >= npages
        assert not mem._hot
        assert np.array_equal(mem.pages, parent.memory.pages)
        loop_input(child, addr, 16, 6)
        assert child.run(timeout=20).reason == "harness-end"
        assert _ring_has_new_entries(child)
        child.reset()


def test_hot_pages_on_a_two_vcpu_fork(pvh_guest, machines, monkeypatch) -> None:
    """Every vCPU has its own ring; the hot pages cover them all (here the boot vCPU writes, the other waits)."""
    from vmfork.vm import dirty_ring_bytes
    monkeypatch.setenv("VMFORK_DIRTY_RING", "1")
    parent = boot(pvh_guest, "loop", machines, memory_mib=120, vcpus=2)
    if not dirty_ring_bytes(parent.kvm):
        pytest.skip("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    assert len(child.memory._rings) == 2
    for seed in (1, 2, 3):
        loop_input(child, addr, 16, seed)
        assert child.run(timeout=20).reason == "harness-end"
        assert scratch_words(child, 16) == [seed ^ i for i in range(16)]
        assert (seed == 1) == _ring_has_new_entries(child)
        assert child.reset() >= 16
        assert np.array_equal(child.memory.pages, parent.memory.pages)
    assert len(child.memory._hot) >= 16


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_reset_after_the_fork_had_a_fork_of_its_own(pvh_guest, machines, monkeypatch, mode: str) -> None:
    """A fork that was itself forked (its RAM frozen under a grandchild) and is then reset comes back to its own fork
    point exactly: pages it wrote before and after the grandchild's fork are both put back (seen on Linux forks: a
    reset after a fork of a fork left a shell that crashed)."""
    from vmfork.vm import dirty_ring_bytes
    monkeypatch.setenv("VMFORK_DIRTY_RING", "1" if mode == "ring" else "0")
    parent = boot(pvh_guest, "loop", machines, memory_mib=112 if mode == "ring" else 104)
    if mode == "ring" and not dirty_ring_bytes(parent.kvm):
        pytest.skip("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    loop_input(child, addr, 40, 0x55)
    assert child.run(timeout=60).reason == "harness-end"
    grandchild = child.fork()
    loop_input(grandchild, addr, 30, 0x66)
    grandchild.run(timeout=60)                  # on from the child's end marker, to wherever it stops
    grandchild.destroy()
    loop_input(child, addr, 20, 0x77)
    child.run(timeout=60)
    child.reset()
    assert np.array_equal(child.memory.pages, parent.memory.pages)
    assert child.vcpus[0].get_regs().rip == parent.vcpus[0].get_regs().rip
