"""vmfork._fastpath, the compiled ioctl loop of the reset path: built by the normal install, and giving exactly the
results of the pure-Python loop it replaces."""

from __future__ import annotations

import ctypes
import struct

import pytest

from guest import boot, run_to_ready
from vmfork.errors import KvmError
from vmfork.kvm import PackedPlan, fastpath_built
from vmfork.kvm import constants as c
from vmfork.kvm import structs as s

SCRATCH = 64 << 20


def test_the_extension_is_built_by_the_install() -> None:
    assert fastpath_built(), "vmfork._fastpath is missing: run ./dev setup (pip install -e .) to build it"


@pytest.mark.parametrize("compiled", [True, False])
def test_a_failing_step_names_its_ioctl_and_stops_the_plan(compiled: bool) -> None:
    regs = s.Regs()
    plan = PackedPlan([(-1, c.KVM_SET_REGS, ctypes.byref(regs)), (-1, c.KVM_SET_SREGS, ctypes.byref(regs))],
                      compiled=compiled)
    assert plan.compiled == (compiled and fastpath_built())
    with pytest.raises(KvmError, match=r"KVM_SET_REGS failed: Bad file descriptor"):
        plan.run()


def test_compiled_and_python_resets_give_identical_machines(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    forks = {True: parent.fork(), False: parent.fork()}
    seen: dict[bool, list[tuple[object, ...]]] = {True: [], False: []}
    for compiled, child in forks.items():
        child.reset()
        plan = child._reset_plan[1]
        plan._full.compiled = plan._without_mp_state.compiled = compiled
        assert plan._full.compiled == (compiled and fastpath_built())
        for seed in range(6):       # 16, 17, then 18 pages: the last resets are the steady state's
            child.memory.write(addr, struct.pack("<QQ", 16 + min(seed, 2), seed))
            assert child.run(timeout=20).reason == "harness-end"
            run_rip = child.vcpus[0].get_regs().rip     # (the other registers may hold interrupt-timing effects)
            child.reset()
            v = child.vcpus[0]
            v.flush_sync()
            st = v.capture()
            seen[compiled].append((run_rip, child.memory.read(SCRATCH, 32 * 4096), *(
                bytes(getattr(st, n)) for n in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs"))))
        # the steady-state resets went through one kvm.Entry call (copy-back, sync area, state ioctls)
        assert any(e[2].compiled == (compiled and fastpath_built()) for e in child._entries.values())
    assert seen[True] == seen[False]


def _iteration_record(child, ev, addr: int) -> tuple[object, ...]:
    regs = child.vcpus[0].get_regs()
    return (ev.reason, ev.status, regs.rip, child.memory.read(SCRATCH, 80 * 4096), child.memory.read(addr, 64))


@pytest.mark.parametrize("compiled", [True, False])
def test_reset_and_run_gives_what_reset_write_run_give(pvh_guest, machines, compiled: bool) -> None:
    """VM.reset_and_run (one call into vmfork._fastpath for the copy-back, the input, the state and KVM_RUN; with
    compiled=False the same steps in Python) against reset(), memory.write(), run() on a twin fork: the same
    outcomes, RAM and state, through inputs that write few pages (the steady state the call is for), more pages
    than the hot-page limit, shorter inputs after longer ones, and the state after the last reset."""
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    fast, slow = parent.fork(), parent.fork()
    inputs = [struct.pack("<QQ", n, seed) + b"x" * pad
              for n, seed, pad in [(16, 1, 0), (16, 2, 0), (16, 3, 0), (3, 4, 40), (70, 5, 0), (16, 6, 0),
                                   (16, 7, 0), (1, 8, 3000), (16, 9, 0), (16, 10, 0), (0, 11, 0), (16, 12, 0)]]
    entries = 0
    original = fast._iteration_entry

    def counting(*args: object) -> object:
        nonlocal entries
        entry = original(*args)  # type: ignore[arg-type]
        entries += entry is not None
        return entry

    fast._iteration_entry = counting  # type: ignore[method-assign]
    pieces = ((addr, 4096),)
    for data in inputs:
        ev_fast = fast.reset_and_run(data, pieces, timeout=20, compiled=compiled)
        slow.reset()
        slow.memory.write(addr, data)
        ev_slow = slow.run(timeout=20)
        assert ev_fast.reason == "harness-end"
        assert _iteration_record(fast, ev_fast, addr) == _iteration_record(slow, ev_slow, addr)
    assert entries >= 6, "the steady state never took the one-call path"
    states = []
    for child in (fast, slow):
        child.reset()
        v = child.vcpus[0]
        v.flush_sync()
        st = v.capture()
        states.append((child.memory.read(SCRATCH, 80 * 4096), child.memory.read(addr, 4096), *(
            bytes(getattr(st, n)) for n in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs"))))
    assert states[0] == states[1]


def test_a_fuzzer_finds_the_same_with_and_without_the_one_call_iteration(guest_dir) -> None:
    """The jsmn example's fuzzer (Fuzzer.compiled_iteration on and off) gives the same result for every input:
    valid documents, the planted crash, and what the mutator makes of the seeds."""
    import random

    from vmfork.fork import VM
    from vmfork.fuzz import Fuzzer
    from vmfork.fuzz.mutate import Mutator

    seeds = sorted((guest_dir.parent.parent / "guests" / "jsmn" / "seeds").iterdir())
    corpus = [p.read_bytes() for p in seeds]
    crash = b"[" + b"1," * 30 + b"1]"
    rng = random.Random(5)
    mutator = Mutator(rng)
    inputs = corpus + [crash] + [mutator.mutate(rng.choice(corpus)) for _ in range(150)] + [crash] + corpus
    vm = VM.create(memory_mib=64, name="jsmn-fastpath")
    try:
        vm.load_kernel(guest_dir / "jsmn-pvh.elf", cmdline="jsmn")
        assert vm.run(timeout=30).reason == "harness-start"
        results = {}
        for compiled in (True, False):
            with Fuzzer(vm, budget_s=0.5) as fz:
                fz.compiled_iteration = compiled
                results[compiled] = [fz.execute(data) for data in inputs]
        assert [r.outcome for r in results[True]].count("crash") >= 2
        assert results[True] == results[False]
    finally:
        vm.destroy(tree=True)
