"""The fast fork and reset paths (issue 17): shells preloaded with a parent's clock-free state give forks identical
to a full restore, a reset returns every piece of vCPU state the guest (or anyone) changed, and forks beyond the
shell pool are made at a sustained rate with a clear error when the process runs out of file descriptors."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from typing import Any

from guest import LOOP_SCRATCH, assert_same_runs, boot, console, field, run_loop, run_to_exit, run_to_ready, state_part
from vmfork.fork import VM, shell_pool
from vmfork.kvm import constants as c
from vmfork.kvm import structs as s
from vmfork.vcpu import TIMED_MSRS, VcpuState
from vmfork.vm import Shell

SCRATCH = LOOP_SCRATCH
LAPIC_TIMER_CURRENT = 0x390


def applied_state(vm: VM) -> VcpuState:
    """vCPU 0's state as KVM holds it (pending sync-area writes pushed in first)."""
    v = vm.vcpus[0]
    v.flush_sync()
    return v.capture()


def same_clock_free_parts(a: VcpuState, b: VcpuState) -> None:
    """Every part equal, except what follows the clock: the TSC MSRs and the LAPIC timer's current count."""
    for name in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs"):
        assert state_part(a, name) == state_part(b, name), f"{name} differs"
    ma: Any = a.msrs
    mb: Any = b.msrs
    da = {ma.entries[i].index: ma.entries[i].data for i in range(ma.nmsrs) if ma.entries[i].index not in TIMED_MSRS}
    db = {mb.entries[i].index: mb.entries[i].data for i in range(mb.nmsrs) if mb.entries[i].index not in TIMED_MSRS}
    assert da == db, {k: (da[k], db.get(k)) for k in da if da[k] != db.get(k)}
    la, lb = bytearray(bytes(a.lapic)), bytearray(bytes(b.lapic))
    la[LAPIC_TIMER_CURRENT:LAPIC_TIMER_CURRENT + 4] = lb[LAPIC_TIMER_CURRENT:LAPIC_TIMER_CURRENT + 4] = bytes(4)
    assert la == lb, "lapic differs"


def test_fork_from_a_preloaded_shell_equals_a_full_restore(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    parent.prepare_forks(2)
    pool = shell_pool(parent.shape)
    assert pool._ready[0].preloaded is parent._state_for_forks(), "prepare_forks did not preload the shells"
    fast = parent.fork()
    pool._ready.appendleft(Shell(parent.kvm, parent.shape, dirty_logging=True))     # no preload: full restore
    full = parent.fork()
    same_clock_free_parts(applied_state(fast), applied_state(full))
    same_clock_free_parts(applied_state(fast), parent._state_for_forks().vcpus[0])
    assert_same_runs(fast, full, addr, (7, 8))


def test_preloaded_timer_fork_ticks_like_a_fully_restored_one(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "timer 40", machines)
    parent.prepare_forks(2)
    fast = parent.fork()
    shell_pool(parent.shape)._ready.appendleft(Shell(parent.kvm, parent.shape, dirty_logging=True))
    full = parent.fork()
    run_to_exit(fast)
    run_to_exit(full)
    ticks = int(field(console(fast), "ticks")), int(field(console(full), "ticks"))
    # Both see the periodic LAPIC timer (the count itself depends on how much CPU the host gave each run).
    assert min(ticks) > 0, ticks


def test_reset_restores_every_piece_of_vcpu_state(pvh_guest, machines) -> None:
    """After a run, change each piece of vCPU state under the fork (FPU/SSE in xsave, XCR0, an armed LAPIC
    timer, MSRs, debug registers, a pending NMI, registers, segment registers, a halted MP state, as if the guest
    had been paused while halted), then reset: KVM holds exactly the fork-time state again."""
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    child = parent.fork()
    run_loop(child, addr, 16, 1)
    v = child.vcpus[0]
    fd = v.fd
    v.flush_sync()
    saved = child.fork_state.vcpus[0]

    xsave: Any = type(saved.xsave)()
    fd.get_xsave(xsave)
    raw = ctypes.cast(ctypes.byref(xsave), ctypes.POINTER(ctypes.c_uint8 * ctypes.sizeof(xsave))).contents
    for i in range(160, 160 + 64):            # XMM0-XMM3
        raw[i] ^= 0x5A
    raw[512] |= 3                             # XSTATE_BV: x87 and SSE in use
    fd.set_xsave(xsave)
    xcrs = s.Xcrs()
    fd.get_xcrs(xcrs)
    xcrs.xcrs[0].value = 1 if xcrs.xcrs[0].value != 1 else 3
    fd.set_xcrs(xcrs)
    lapic = s.LapicState()
    fd.get_lapic(lapic)
    ctypes.c_uint32.from_buffer(lapic.regs, 0x320).value = 0x20020      # LVT timer: periodic, vector 0x20
    ctypes.c_uint32.from_buffer(lapic.regs, 0x380).value = 10_000_000   # initial count: armed
    fd.set_lapic(lapic)
    msrs: Any = s.msrs_type(2)()
    msrs.nmsrs = 2
    msrs.entries[0].index, msrs.entries[0].data = 0xC0000102, 0xFFFF8880DEAD0000     # KERNEL_GS_BASE
    msrs.entries[1].index, msrs.entries[1].data = 0x175, 0x123456                    # SYSENTER_ESP
    assert fd.set_msrs(msrs) == 2
    dr = s.DebugRegs()
    fd.get_debugregs(dr)
    dr.db[0], dr.db[1], dr.dr7 = 0x401000, 0x402000, 0x405
    fd.set_debugregs(dr)
    events = s.VcpuEvents()
    fd.get_vcpu_events(events)
    events.nmi.pending = 1
    events.flags |= c.KVM_VCPUEVENT_VALID_NMI_PENDING
    fd.set_vcpu_events(events)
    regs = s.Regs()
    fd.get_regs(regs)
    regs.rax, regs.rip = 0x1111, regs.rip + 1
    fd.set_regs(regs)
    sregs = s.Sregs()
    fd.get_sregs(sregs)
    sregs.cr8 = 7
    fd.set_sregs(sregs)
    mp = s.MpState()
    mp.mp_state = c.KVM_MP_STATE_HALTED
    fd.set_mp_state(mp)
    v.sync_valid = False                       # the sync area no longer holds what KVM has
    v.exit_reason.value = c.KVM_EXIT_INTR      # ... and the vCPU's last run ended in a stop, not a port access
    changed = v.capture()
    for name in ("xsave", "xcrs", "lapic", "msrs", "debugregs", "events", "regs", "sregs", "mp_state"):
        assert bytes(getattr(changed, name)) != bytes(getattr(saved, name)), f"{name} did not change"

    child.reset()
    same_clock_free_parts(applied_state(child), saved)
    run_loop(child, addr, 16, 2)               # and the fork still runs correctly from there


def test_forks_beyond_the_pool_and_past_the_file_limit(pvh_guest) -> None:
    """Forks without prepare_forks come from shells made ahead of demand; once the process runs out of file
    descriptors the fork is refused with one clear error, and nothing is left half made."""
    script = textwrap.dedent(f"""
        import resource
        from vmfork.errors import ForkError
        from vmfork.fork import VM, shell_pool
        vm = VM.create(memory_mib=64, name="p")
        vm.load_kernel({str(pvh_guest)!r}, cmdline="loop")
        assert vm.run(timeout=30).reason == "harness-start"
        kids = [vm.fork() for _ in range(60)]
        shell_pool(vm.shape).settle()
        used = len(__import__("os").listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 40, used + 40))
        try:
            while True:
                kids.append(vm.fork())
        except ForkError as e:
            print("ERROR", e)
        print("CHILDREN", len(vm.children), len(kids))
        kids[-1].reset()
        for k in kids:
            k.destroy()
        vm.destroy()
        print("OK")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    assert "RLIMIT_NOFILE" in lines["ERROR"] and "ulimit -Hn" in lines["ERROR"], p.stdout
    children, made = map(int, lines["CHILDREN"].split())
    assert children == made > 60, p.stdout
    assert p.stdout.rstrip().endswith("OK")
