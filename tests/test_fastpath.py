"""vmfork._fastpath, the compiled ioctl loop of the reset path: built by the normal install, and giving exactly the
results of the pure-Python loop it replaces."""

from __future__ import annotations

import copy
import ctypes
import struct

import pytest

from guest import boot, run_to_ready, state_part
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
                state_part(st, n) for n in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs"))))
        # the steady-state resets went through one kvm.Entry call (copy-back, sync area, state ioctls)
        assert any(e[2].compiled == (compiled and fastpath_built()) for e in child._entries.values())
    assert seen[True] == seen[False]


def _after_reset(child, addr: int) -> tuple[object, ...]:
    """RAM (the scratch area and the input page) and vCPU state after a reset."""
    child.reset()
    v = child.vcpus[0]
    v.flush_sync()
    st = v.capture()
    return (child.memory.read(SCRATCH, 80 * 4096), child.memory.read(addr, 4096),
            *(state_part(st, n) for n in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs")))


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
    assert _after_reset(fast, addr) == _after_reset(slow, addr)


def _jsmn_inputs(guest_dir, *, seed: int, mutated: int) -> list[bytes]:
    """The jsmn example's seeds, the planted crash, `mutated` mutations of the seeds, the crash and the seeds again."""
    import random

    from vmfork.fuzz.mutate import Mutator

    corpus = [p.read_bytes() for p in sorted((guest_dir.parent.parent / "guests" / "jsmn" / "seeds").iterdir())]
    rng = random.Random(seed)
    mutator = Mutator(rng)
    return corpus + [JSMN_CRASH] + [mutator.mutate(rng.choice(corpus)) for _ in range(mutated)] + [JSMN_CRASH] + corpus


def _jsmn_parent(guest_dir, name: str):
    """The jsmn example paused at its start marker (the caller destroys it)."""
    from vmfork.fork import VM

    vm = VM.create(memory_mib=64, name=name)
    vm.load_kernel(guest_dir / "jsmn-pvh.elf", cmdline="jsmn")
    assert vm.run(timeout=30).reason == "harness-start"
    return vm


@pytest.mark.parametrize("compiled", [True, False])
def test_reset_then_run_input_gives_what_reset_and_run_gives(pvh_guest, machines, compiled: bool) -> None:
    """reset() and later run_input() (a fork server resets ahead, while its client makes the next input) against
    reset_and_run() on a twin fork: the same outcomes, RAM and state through the same inputs as above, and
    run_input() without a reset before it runs on from where the fork is, as memory.write() and run() do."""
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    ahead, twin = parent.fork(), parent.fork()
    inputs = [struct.pack("<QQ", n, seed) + b"x" * pad
              for n, seed, pad in [(16, 1, 0), (16, 2, 0), (16, 3, 0), (3, 4, 40), (70, 5, 0), (16, 6, 0),
                                   (16, 7, 0), (1, 8, 3000), (16, 9, 0), (16, 10, 0), (0, 11, 0), (16, 12, 0)]]
    pieces = ((addr, 4096),)
    ahead.reset()
    for data in inputs:
        assert ahead.just_reset
        ev_ahead = ahead.run_input(data, pieces, timeout=20, compiled=compiled, settle=False)
        assert not ahead.just_reset
        ev_twin = twin.reset_and_run(data, pieces, timeout=20, settle=False)
        assert ev_ahead.reason == "harness-end"
        assert _iteration_record(ahead, ev_ahead, addr) == _iteration_record(twin, ev_twin, addr)
        ahead.reset()
    assert any(e[0] is None and e[2].compiled == (compiled and fastpath_built()) for e in ahead._entries.values())
    assert _after_reset(ahead, addr) == _after_reset(twin, addr)
    # without a reset first: the input goes in over what the last run left, as memory.write() would
    data = struct.pack("<QQ", 5, 99)
    for child in (ahead, twin):
        child.reset()
        assert child.run(timeout=20).reason == "harness-end"
    ev_ahead = ahead.run_input(data, pieces, timeout=20, compiled=compiled)
    twin.memory.write(addr, data)
    ev_twin = twin.run(timeout=20)
    assert _iteration_record(ahead, ev_ahead, addr) == _iteration_record(twin, ev_twin, addr)
    # and the next reset takes back the input's pages too
    for child in (ahead, twin):
        child.reset()
    assert ahead.memory.read(addr, 64) == twin.memory.read(addr, 64) == parent.memory.read(addr, 64)


def test_a_fuzzer_that_resets_ahead_finds_what_one_that_does_not_finds(guest_dir) -> None:
    """Fuzzer.reset_ahead() between inputs (as the AFL++ fork server calls it) gives the same result for every input
    as execute() alone: valid documents, the planted crash, mutated seeds; a fork that was looked at or run between
    reset_ahead() and execute() is reset again as usual."""
    from vmfork.fuzz import Fuzzer

    inputs = _jsmn_inputs(guest_dir, seed=7, mutated=120)
    vm = _jsmn_parent(guest_dir, "jsmn-ahead")
    try:
        with Fuzzer(vm, budget_s=0.5) as fz:
            plain = [fz.execute(data) for data in inputs]
        with Fuzzer(vm, budget_s=0.5) as fz:
            ahead, used = [], 0
            for i, data in enumerate(inputs):
                fz.reset_ahead()
                if i % 10 == 5:
                    fz.fork.touch()             # an out-of-band change: execute() must reset again
                used += fz.fork.just_reset
                ahead.append(fz.execute(data))
        assert [r.outcome for r in plain].count("crash") >= 2
        assert ahead == plain
        assert used >= len(inputs) - len(inputs) // 10 - 1
    finally:
        vm.destroy(tree=True)


def test_a_fuzzer_finds_the_same_with_and_without_the_one_call_iteration(guest_dir) -> None:
    """The jsmn example's fuzzer (Fuzzer.compiled_iteration on and off) gives the same result for every input:
    valid documents, the planted crash, and what the mutator makes of the seeds."""
    from vmfork.fuzz import Fuzzer

    inputs = _jsmn_inputs(guest_dir, seed=5, mutated=150)
    vm = _jsmn_parent(guest_dir, "jsmn-fastpath")
    try:
        results = {}
        for compiled in (True, False):
            with Fuzzer(vm, budget_s=0.5) as fz:
                fz.compiled_iteration = compiled
                results[compiled] = [fz.execute(data) for data in inputs]
        assert [r.outcome for r in results[True]].count("crash") >= 2
        assert results[True] == results[False]
    finally:
        vm.destroy(tree=True)


def _jsmn_fork(guest_dir, machines, ud_handler: bytes = b""):
    """A fork of the jsmn example at its start marker, and (input pieces, a function making a run's payload);
    `ud_handler`: code that replaces the guest's #UD handler (in the parent, before the fork)."""
    from vmfork.fork import VM
    from vmfork.fuzz import Fuzzer

    vm = VM.create(memory_mib=64, name="jsmn-reset")
    machines.append(vm)
    vm.load_kernel(guest_dir / "jsmn-pvh.elf", cmdline="jsmn")
    assert vm.run(timeout=30).reason == "harness-start"
    if ud_handler:
        gate = vm.memory.read(vm.vcpus[0].get_sregs().idt.base + 6 * 16, 16)     # the guest maps its kernel 1:1
        lo, hi = struct.unpack("<QQ", gate)
        vm.memory.write((lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32), ud_handler)
    with Fuzzer(vm, budget_s=0.5) as fz:
        at, fmt = fz.input.pieces, fz.input.format
    return vm, vm.fork(), at, (lambda d: struct.pack("<Q", len(d)) + d if fmt == "len64" else d)


JSMN_VALID = b'{"a": [1, 2, {"b": "c"}], "d": true}'
JSMN_CRASH = b"[" + b"1," * 30 + b"1]"      # the planted bug: __stack_chk_fail, ud2, the guest's #UD handler
_STATE_PARTS = ("regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state", "debugregs")


def _state_after_reset(child) -> tuple[object, ...]:
    """The vCPU's state after a plain reset (the MSRs without those that follow the clock: they differ by the
    time between two captures)."""
    from vmfork.vcpu import TIMED_MSRS

    child.reset()
    v = child.vcpus[0]
    v.flush_sync()
    st = v.capture()
    msrs = [(e.index, e.data) for e in st.msrs.entries[:st.msrs.nmsrs] if e.index not in TIMED_MSRS]
    return (*(state_part(st, n) for n in _STATE_PARTS if n != "msrs"), msrs)


def _kernel_parts(st) -> tuple[object, ...]:
    """The parts a lean reset leaves out: XCRs, debug registers, the MSRs that do not follow the clock."""
    from vmfork.vcpu import TIMED_MSRS

    msrs = [(e.index, e.data) for e in st.msrs.entries[:st.msrs.nmsrs] if e.index not in TIMED_MSRS]
    return bytes(st.xcrs), bytes(st.debugregs), msrs


def test_a_stop_left_unsettled_looks_settled(guest_dir, machines) -> None:
    """reset_and_run(settle=False) stops at the end marker without the KVM_RUN that completes its `out`: registers
    read then, a fork made there and the fork's run are what they are after a settled stop (on VT-x/AMD-V RIP would
    still be on the `out` until then; a fork made there would run the marker again)."""
    _, fork, at, payload = _jsmn_fork(guest_dir, machines)
    seen = {}
    for settle in (True, False):
        assert fork.reset_and_run(payload(JSMN_VALID), at, timeout=5, settle=settle).reason == "harness-end"
        assert fork.vcpus[0].io_unsettled == (not settle)
        regs = bytes(fork.vcpus[0].get_regs())
        assert not fork.vcpus[0].io_unsettled
        child = fork.fork()
        seen[settle] = (regs, child.run(timeout=5).reason)
        child.destroy()
    assert seen[True] == seen[False]
    assert seen[False][1] == "harness-start"        # the child went on past the end marker, to the next start


def test_lean_resets_give_the_machines_full_resets_give(guest_dir, machines) -> None:
    """Resets that leave out the XCRs, debug registers and clock-free MSRs where the last run provably did not touch
    them (VM.reset_and_run, lean) against resets that restore everything, on twin forks: the same outcome and the
    same state after every reset, through valid inputs and the planted crash (whose #UD handler runs in kernel
    mode)."""
    from vmfork.fork import kernel_mode_emulated

    _, fork, at, payload = _jsmn_fork(guest_dir, machines)
    twin = fork.parent.fork()
    lean_entries = 0
    for data in [JSMN_VALID] * 4 + [JSMN_CRASH] + [JSMN_VALID] * 4:
        before = {e[2] for e in fork._entries.values()}
        ev = fork.reset_and_run(payload(data), at, timeout=5, settle=False)
        lean_entries += sum(len(e._plan) < len(twin._plan_for_reset()._without_mp_state)
                            for e in {e[2] for e in fork._entries.values()} - before)
        ev_twin = twin.reset_and_run(payload(data), at, timeout=5, lean=False)
        assert (ev.reason, ev.status) == (ev_twin.reason, ev_twin.status)
        # (nothing looks at the fork's vCPU here: that would settle its stop, and the next reset be a full one)
        if data == JSMN_VALID and kernel_mode_emulated():
            # a run in user mode whose only exit was the end marker: the next reset may be lean (after the first,
            # which the proof needs to start from)
            assert fork._lean_count()[0] == (fork._lean_base is not None)
    assert _state_after_reset(fork) == _state_after_reset(twin)
    if not kernel_mode_emulated():
        pytest.skip("guest kernel mode runs natively on this host: KVM's emulation count proves nothing, every "
                    "reset restores every part (checked above)")
    assert lean_entries >= 1, "no reset was lean where the proof holds"


def test_a_kernel_mode_msr_or_debug_register_write_is_undone_by_the_next_reset(guest_dir, machines) -> None:
    """A harness in kernel mode that writes IA32_SYSENTER_CS (wrmsr), DR0 and the LAPIC's TPR (CR8) when its input
    starts with "W", then the end marker, and nothing else (no store to memory: the resets stay in the one-call
    steady state, where lean resets are decided): after an input that wrote them, the next input must find the
    fork-time values."""
    from vmfork.fork import kernel_mode_emulated
    from vmfork.vcpu import TIMED_MSRS

    if not kernel_mode_emulated():
        pytest.skip("lean resets are used only where guest kernel mode is emulated (kvm_pvm)")
    _, fork0, at, payload = _jsmn_fork(guest_dir, machines)
    parent = fork0.parent
    fork0.destroy()
    inbuf = at[0][0] + (8 if payload(b"") else 0)
    code = (b"\x48\xbe" + struct.pack("<Q", inbuf)                # mov rsi, the input's first byte
            + bytes.fromhex("803e57" "751f"                         # cmp byte [rsi], "W"; jne .end
                            "b974010000" "b85a5a0000" "31d2" "0f30"  # wrmsr IA32_SYSENTER_CS = 0x5a5a
                            "b800100000" "0f23c0"                    # mov dr0, 0x1000
                            "b805000000" "440f22c0"                  # mov cr8, 5 (the LAPIC's TPR)
                            "b802000000" "e7f6" "ebfe"))             # .end: end marker; jmp $
    v = parent.vcpus[0]
    sregs = v.get_sregs()
    gate = parent.memory.read(sregs.idt.base + 6 * 16, 16)          # the guest maps its kernel 1:1
    lo, hi = struct.unpack("<QQ", gate)
    where = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
    parent.memory.write(where, code)                                 # over the #UD handler
    sregs.cs.selector, sregs.cs.dpl = (lo >> 16) & 0xFFFF, 0         # the handler's code segment, kernel mode
    sregs.ss.selector, sregs.ss.dpl = 0, 0
    v.set_sregs(sregs)
    regs = v.get_regs()
    regs.rip = where
    v.set_regs(regs)
    parent.touch()
    fork = parent.fork()
    assert _kernel_parts(fork.fork_state.vcpus[0])[1:] != (bytes(fork.fork_state.vcpus[0].debugregs),
                                                           [(0x174, 0x5A5A)])
    for data in (b"r", b"r", b"r", b"W", b"r", b"r"):
        assert fork.reset_and_run(payload(data), at, timeout=5, settle=False).reason == "harness-end"
        # read through the fd: Vcpu.capture would settle the stop, and the next reset then restores everything
        v = fork.vcpus[0]
        msrs = copy.deepcopy(fork.fork_state.vcpus[0].msrs)
        v.fd.get_msrs(msrs)
        dr = s.DebugRegs()
        v.fd.get_debugregs(dr)
        lapic = s.LapicState()
        v.fd.get_lapic(lapic)
        tpr = lapic.regs[0x80] >> 4
        assert v.io_unsettled
        now = [(e.index, e.data) for e in msrs.entries[:msrs.nmsrs] if e.index not in TIMED_MSRS]
        # kernel-mode instructions ran (KVM emulated them all): no proof for a lean reset after any of these runs
        proven, count = fork._lean_count()
        assert not proven and count is not None
        if data == b"W":
            assert (0x174, 0x5A5A) in now and dr.db[0] == 0x1000 and tpr == 5
        else:           # what the reset before the run left (the run itself wrote none of them)
            assert (now, bytes(dr), tpr) == (_kernel_parts(fork.fork_state.vcpus[0])[2],
                                             bytes(fork.fork_state.vcpus[0].debugregs),
                                             fork.fork_state.vcpus[0].lapic.regs[0x80] >> 4)
