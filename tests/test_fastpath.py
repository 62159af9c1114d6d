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
        for seed in range(6):
            child.memory.write(addr, struct.pack("<QQ", 16 + seed, seed))
            assert child.run(timeout=20).reason == "harness-end"
            run_rip = child.vcpus[0].get_regs().rip     # (the other registers may hold interrupt-timing effects)
            child.reset()
            v = child.vcpus[0]
            v.flush_sync()
            st = v.capture()
            seen[compiled].append((run_rip, child.memory.read(SCRATCH, 32 * 4096), *(
                bytes(getattr(st, n)) for n in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs"))))
    assert seen[True] == seen[False]
