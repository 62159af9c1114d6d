"""A vCPU and its complete architectural state as a value.

Registers, segment registers and pending events travel through kvm_run's sync-regs area when the host supports it
(KVM_CAP_SYNC_REGS): after every exit KVM leaves them there, and values written there with a dirty bit are loaded on
the next KVM_RUN, which saves three ioctls on every capture and restore."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .arch.x86 import cpu
from .errors import KvmError
from .guest_debug import DebugClaims
from .kvm import FdPlan, IoctlPlan, Kvm, PackedPlan, VcpuFd, plan_entry, run_plan
from .kvm import constants as c
from .kvm import structs as s
from .kvm.stats import StatsCounter

SYNC_ALL = c.KVM_SYNC_X86_REGS | c.KVM_SYNC_X86_SREGS | c.KVM_SYNC_X86_EVENTS
_SYNC_SIZE = ctypes.sizeof(s.SyncRegs)
_RUNNING_EXITS = frozenset((c.KVM_EXIT_IO, c.KVM_EXIT_MMIO))
_DIRTY_REGS_OFFSET = s.Run.kvm_dirty_regs.offset
_SYNC_ALL_WORD = ctypes.c_uint64(SYNC_ALL)      # the source of an Entry's kvm_dirty_regs copy
_memmove = ctypes.memmove
# memmove that keeps the GIL (ctypes.memmove releases it): for the fork path's copy of a sync-area image, which
# runs while the shell pool's threads want the GIL; releasing it for a ~1 KiB copy cost the fork ~0.5 ms of waiting
# for it back during a burst of forks.
_memmove_keeping_gil = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes._memmove_addr)   # type: ignore[attr-defined]
_addressof = ctypes.addressof


# The MSRs whose value follows the clock (see VcpuState.preload_plans): IA32_TSC, IA32_TSC_ADJUST,
# IA32_TSC_DEADLINE.
TIMED_MSRS = frozenset((0x10, 0x3B, 0x6E0))
_MSR_TSC_DEADLINE = 0x6E0
_APIC_LVTT, _APIC_TMICT = 0x320, 0x380     # LAPIC register offsets: LVT timer, timer initial count


def _msr_list(entries: list[Any]) -> Any:
    """A kvm_msrs holding copies of `entries`."""
    out: Any = s.msrs_type(len(entries))()
    out.nmsrs = len(entries)
    for dst, src in zip(out.entries, entries, strict=False):
        dst.index, dst.data = src.index, src.data
    return out


def _copy(struct: ctypes.Structure) -> Any:
    new = type(struct)()
    ctypes.pointer(new)[0] = struct
    return new


@dataclass(frozen=True, slots=True, eq=False)
class VcpuState:
    """Everything a guest can observe of one vCPU. The ctypes values are owned by the state: never mutate them."""

    VERSION: ClassVar[int] = 1
    index: int
    regs: s.Regs
    sregs: s.Sregs
    events: s.VcpuEvents
    xsave: Any              # kvm_xsave (size from KVM_CAP_XSAVE2)
    xcrs: s.Xcrs
    msrs: Any               # kvm_msrs with nmsrs entries
    lapic: s.LapicState
    mp_state: s.MpState
    debugregs: s.DebugRegs
    # Built on first restore (a state is restored many times): the restore ioctls with pointers into this state,
    # the same without KVM_SET_MP_STATE, and regs/sregs/events laid out as kvm_run's sync area.
    _plan: tuple[IoctlPlan, IoctlPlan, s.SyncRegs] | None = field(default=None, compare=False, repr=False)
    # Built on first preload: (the time-independent ioctls a pooled shell gets ahead of a fork, the ones left for
    # fork time). See Vcpu.preload.
    _split: tuple[IoctlPlan, IoctlPlan, tuple[Any, ...]] | None = field(default=None, compare=False, repr=False)

    def restore_plan(self) -> tuple[IoctlPlan, IoctlPlan, s.SyncRegs]:
        """(all restore ioctls, the same without KVM_SET_MP_STATE, the sync-area image)."""
        if self._plan is None:
            head = [plan_entry(c.KVM_SET_XSAVE, self.xsave), plan_entry(c.KVM_SET_XCRS, self.xcrs),
                    plan_entry(c.KVM_SET_LAPIC, self.lapic), plan_entry(c.KVM_SET_MSRS, self.msrs)]
            tail = [plan_entry(c.KVM_SET_DEBUGREGS, self.debugregs)]
            sync = s.SyncRegs(self.regs, self.sregs, self.events)
            plan = ([*head, plan_entry(c.KVM_SET_MP_STATE, self.mp_state), *tail], head + tail, sync)
            object.__setattr__(self, "_plan", plan)
            return plan
        return self._plan

    def preload_plans(self) -> tuple[IoctlPlan, IoctlPlan]:
        """(ioctls a pooled shell can take ahead of the fork, the ones that must wait for fork time).

        Ahead: xsave, XCRs, the MSRs that do not follow the clock, the MP state, the debug registers: nothing
        changes them in a vCPU that does not run. At fork time: the LAPIC (its timer counts from when it is set,
        and a shell's in-kernel PIT may raise interrupts into it meanwhile), the TSC, TSC_ADJUST and TSC deadline
        MSRs (KVM sets the TSC offset from the time of the write; and KVM treats a second host write of a TSC value
        within a second of the expected one as an attempt to synchronise, keeping the old offset: so the TSC is
        not written ahead at all), and the MP state again when it is not RUNNABLE (it decides how a halted vCPU
        wakes)."""
        if self._split is None:
            msrs: Any = self.msrs
            entries = [msrs.entries[i] for i in range(msrs.nmsrs)]
            timed = [e for e in entries if e.index in TIMED_MSRS]
            fixed = [e for e in entries if e.index not in TIMED_MSRS]
            fixed_msrs, timed_msrs = _msr_list(fixed), _msr_list(timed)
            ahead = [plan_entry(c.KVM_SET_XSAVE, self.xsave), plan_entry(c.KVM_SET_XCRS, self.xcrs)]
            if fixed:
                ahead.append(plan_entry(c.KVM_SET_MSRS, fixed_msrs))
            ahead += [plan_entry(c.KVM_SET_MP_STATE, self.mp_state), plan_entry(c.KVM_SET_DEBUGREGS, self.debugregs)]
            later = [plan_entry(c.KVM_SET_LAPIC, self.lapic)]
            if timed:
                later.append(plan_entry(c.KVM_SET_MSRS, timed_msrs))
            if not self.runnable:
                later.append(plan_entry(c.KVM_SET_MP_STATE, self.mp_state))
            object.__setattr__(self, "_split", (ahead, later, (fixed_msrs, timed_msrs)))
            return ahead, later
        return self._split[0], self._split[1]

    def lean_restore_plan(self, *, lapic: bool = True) -> IoctlPlan:
        """The restore ioctls for a vCPU whose XCRs, debug registers and clock-free MSRs provably still hold this
        state (ResetPlan.entry_parts(lean=True)): xsave (guest user mode changes it natively), the LAPIC (its timer
        runs on its own; `lapic` False where it provably holds this state too) and the MSRs that follow the clock
        (IA32_TSC, TSC_ADJUST, TSC deadline)."""
        self.preload_plans()
        assert self._split is not None
        timed = self._split[2][1]
        plan = [plan_entry(c.KVM_SET_XSAVE, self.xsave)]
        if lapic:
            plan.append(plan_entry(c.KVM_SET_LAPIC, self.lapic))
        if timed.nmsrs:
            plan.append(plan_entry(c.KVM_SET_MSRS, timed))
        return plan

    def lapic_timer_off(self) -> bool:
        """Whether this state's LAPIC timer is disarmed: no initial count in one-shot/periodic mode, no deadline in
        TSC-deadline mode (then it changes nothing by itself after a restore)."""
        regs = bytes(self.lapic.regs)
        lvt = int.from_bytes(regs[_APIC_LVTT:_APIC_LVTT + 4], "little")
        if (lvt >> 17) & 3 == 2:        # TSC-deadline mode
            msrs: Any = self.msrs
            return not any(msrs.entries[i].index == _MSR_TSC_DEADLINE and msrs.entries[i].data
                           for i in range(msrs.nmsrs))
        return int.from_bytes(regs[_APIC_TMICT:_APIC_TMICT + 4], "little") == 0

    @property
    def runnable(self) -> bool:
        return self.mp_state.mp_state == c.KVM_MP_STATE_RUNNABLE  # type: ignore[no-any-return]

    def parts(self) -> dict[str, bytes]:
        """Raw bytes of every part (for file formats)."""
        return {name: bytes(getattr(self, name)) for name in
                ("regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state", "debugregs")}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VcpuState) and self.index == other.index and self.parts() == other.parts()

    def __hash__(self) -> int:
        return hash((self.index, self.parts()["regs"]))

    # --- binary form (process forks, save files) ----------------------------------------------------------------
    #
    # Shared by VcpuState, PlatformState and MachineState: an 8-byte magic, u32 format version, u32 part count,
    # then per part: u16 name length, the name (ASCII), u32 data length, the data. Little-endian, no padding, no
    # trailing bytes. Parts are read by name; any mismatch is a VmStateError naming the part.

    @staticmethod
    def _pack_parts(magic: bytes, version: int, parts: list[tuple[str, bytes]]) -> bytes:
        import struct
        out = [magic, struct.pack("<II", version, len(parts))]
        for name, data in parts:
            raw = name.encode("ascii")
            out += [struct.pack("<H", len(raw)), raw, struct.pack("<I", len(data)), data]
        return b"".join(out)

    @staticmethod
    def _unpack_parts(data: bytes | bytearray | memoryview, magic: bytes, version: int, what: str) -> dict[str, bytes]:
        import struct

        from .errors import VmStateError
        buf = memoryview(data).cast("B")
        head = len(magic) + 8
        if len(buf) < head:
            raise VmStateError(f"{what}: {len(buf)} bytes is too short for the header")
        if bytes(buf[:len(magic)]) != magic:
            raise VmStateError(f"{what}: bad magic {bytes(buf[:len(magic)])!r}, expected {magic!r}")
        stored, count = struct.unpack_from("<II", buf, len(magic))
        if stored != version:
            raise VmStateError(f"{what}: format version {stored}, this vmfork supports {version}")
        parts: dict[str, bytes] = {}
        pos = head
        for i in range(count):
            if pos + 2 > len(buf):
                raise VmStateError(f"{what}: truncated before part #{i}")
            (nlen,) = struct.unpack_from("<H", buf, pos)
            if pos + 2 + nlen + 4 > len(buf):
                raise VmStateError(f"{what}: truncated in the header of part #{i}")
            try:
                name = bytes(buf[pos + 2:pos + 2 + nlen]).decode("ascii")
            except UnicodeDecodeError:
                raise VmStateError(f"{what}: part #{i} has a non-ASCII name") from None
            (dlen,) = struct.unpack_from("<I", buf, pos + 2 + nlen)
            pos += 2 + nlen + 4
            if pos + dlen > len(buf):
                raise VmStateError(f"{what}: part {name!r} is truncated ({len(buf) - pos} of {dlen} bytes)")
            if name in parts:
                raise VmStateError(f"{what}: part {name!r} appears twice")
            parts[name] = bytes(buf[pos:pos + dlen])
            pos += dlen
        if pos != len(buf):
            raise VmStateError(f"{what}: {len(buf) - pos} unexpected bytes after the last part")
        return parts

    @staticmethod
    def _expect_parts(parts: dict[str, bytes], names: list[str], what: str) -> None:
        from .errors import VmStateError
        for name in names:
            if name not in parts:
                raise VmStateError(f"{what}: part {name!r} is missing")
        for name in parts:
            if name not in names:
                raise VmStateError(f"{what}: unknown part {name!r}")

    @staticmethod
    def _struct_part(parts: dict[str, bytes], name: str, ctype: type[Any], what: str) -> Any:
        from .errors import VmStateError
        data = parts[name]
        if len(data) != ctypes.sizeof(ctype):
            raise VmStateError(f"{what}: part {name!r} is {len(data)} bytes, expected {ctypes.sizeof(ctype)}")
        return ctype.from_buffer_copy(data)

    _FIXED_PARTS: ClassVar[tuple[tuple[str, type[Any]], ...]] = (
        ("regs", s.Regs), ("sregs", s.Sregs), ("events", s.VcpuEvents), ("xcrs", s.Xcrs), ("lapic", s.LapicState),
        ("mp_state", s.MpState), ("debugregs", s.DebugRegs))

    def to_bytes(self) -> bytes:
        """This state in the versioned binary part format (magic b"VMFKVCPU")."""
        import struct
        parts = [("index", struct.pack("<I", self.index))]
        parts += [(name, bytes(getattr(self, name))) for name in
                  ("regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state", "debugregs")]
        return VcpuState._pack_parts(b"VMFKVCPU", self.VERSION, parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VcpuState:
        """Rebuild a state from `to_bytes()` output; bad input is a VmStateError naming the part."""
        import struct

        from .errors import VmStateError
        what = "vCPU state"
        parts = cls._unpack_parts(data, b"VMFKVCPU", cls.VERSION, what)
        cls._expect_parts(parts, ["index", "regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state",
                                  "debugregs"], what)
        if len(parts["index"]) != 4:
            raise VmStateError(f"{what}: part 'index' is {len(parts['index'])} bytes, expected 4")
        index = struct.unpack("<I", parts["index"])[0]
        what = f"vCPU {index} state"
        fixed = {name: cls._struct_part(parts, name, ctype, what) for name, ctype in cls._FIXED_PARTS}
        xsave = parts["xsave"]
        if len(xsave) < 4096 or len(xsave) % 4:
            raise VmStateError(f"{what}: part 'xsave' is {len(xsave)} bytes, expected a multiple of 4 >= 4096")
        msrs_raw = parts["msrs"]
        n = (len(msrs_raw) - 8) // 16
        if len(msrs_raw) < 8 or (len(msrs_raw) - 8) % 16:
            raise VmStateError(f"{what}: part 'msrs' is {len(msrs_raw)} bytes, expected 8 + 16 per MSR")
        msrs = s.msrs_type(n).from_buffer_copy(msrs_raw)
        if msrs.nmsrs > n:  # type: ignore[attr-defined]
            raise VmStateError(f"{what}: part 'msrs' claims {msrs.nmsrs} MSRs but holds {n}")  # type: ignore[attr-defined]
        return cls(index, xsave=s.xsave_type(len(xsave)).from_buffer_copy(xsave), msrs=msrs, **fixed)


class Vcpu:
    """One vCPU of a machine."""

    def __init__(self, kvm: Kvm, fd: VcpuFd, index: int, *, sync_regs: bool) -> None:
        self.kvm = kvm
        self.fd = fd
        self.index = index
        self.run = fd.run
        self._sync = sync_regs
        # True while kvm_run.s holds the authoritative regs/sregs/events (after an exit, or after a set).
        self.sync_valid = False
        xsave_size = max(4096, kvm.check_extension(c.KVM_CAP_XSAVE2))
        self._xsave_type = s.xsave_type(xsave_size)
        self.msr_indices = cpu.usable_msrs(fd, kvm)
        self._msrs_type = s.msrs_type(len(self.msr_indices))
        if sync_regs:
            self.run.kvm_valid_regs = SYNC_ALL
        run_addr = fd.run_addr
        self.sync_addr = run_addr + s.Run.s.offset
        self.sync_apic_base = ctypes.c_uint64.from_address(
            self.sync_addr + s.SyncRegs.sregs.offset + s.Sregs.apic_base.offset)
        self.exit_reason = ctypes.c_uint32.from_address(run_addr + s.Run.exit_reason.offset)
        # KVM_SET_GUEST_DEBUG, shared by the debugger, host workarounds and the fuzzer (vmfork.guest_debug).
        self.debug = DebugClaims(fd, kvm.check_extension(c.KVM_CAP_SET_GUEST_DEBUG2))
        # True after a run stopped at a port write without the KVM_RUN that completes it (Machine.run(settle=
        # False)): see settle().
        self.io_unsettled = False
        # KVM's count of instructions it emulated for this vCPU (binary stats), opened on first use; False: none
        self._emulation: StatsCounter | bool | None = None

    def emulated_instructions(self) -> int | None:
        """KVM's `insn_emulation` statistic of this vCPU (a pread, no vCPU ioctl), or None where KVM has no binary
        statistics. Where guest kernel mode is emulated (kvm_pvm) it counts every kernel-mode instruction."""
        counter = self._emulation
        if counter is None:
            try:
                counter = self._emulation = StatsCounter(self.fd.fd, "insn_emulation")
            except KvmError:
                counter = self._emulation = False
        return counter.read() if isinstance(counter, StatsCounter) else None

    def settle_before(self, st: VcpuState) -> None:
        """Before loading `st`: a pending `out` is dropped by KVM when `st` moves RIP elsewhere (nothing to do but
        forget it), and completed now otherwise (see settle())."""
        if self.io_unsettled:
            at = self.run.s.regs
            if (self._sync and self.sync_valid
                    and at.sregs.cs.base + at.regs.rip != st.sregs.cs.base + st.regs.rip):
                self.io_unsettled = False
            else:
                self.settle()

    def settle(self) -> None:
        """Complete the port write the last exit left pending (KVM_RUN with immediate_exit), so registers read or
        written now are the guest's after the `out`. KVM completes a pending `out` at the next KVM_RUN while the
        vCPU's linear RIP is the instruction's (on VT-x/AMD-V the fast-PIO exit leaves RIP on the `out`; it skips
        it then), and drops the completion when RIP changed meanwhile (complete_fast_pio_out): so a reset to
        another RIP needs no settle (ResetPlan.entry_parts), everything that looks at or sets registers does."""
        if self.io_unsettled:
            self.io_unsettled = False
            run = self.run
            run.immediate_exit = 1
            self.fd.run_once()
            run.immediate_exit = 0
            self.after_run()

    # --- registers ----------------------------------------------------------------------------------------------

    def get_regs(self) -> s.Regs:
        if self.io_unsettled:
            self.settle()
        if self._sync and self.sync_valid:
            return _copy(self.run.s.regs.regs)  # type: ignore[no-any-return]
        r = s.Regs()
        self.fd.get_regs(r)
        return r

    def set_regs(self, regs: s.Regs) -> None:
        if self.io_unsettled:
            self.settle()
        if self._sync:
            self._load_sync_area()
            self.run.s.regs.regs = regs
            self.run.kvm_dirty_regs |= c.KVM_SYNC_X86_REGS
        else:
            self.fd.set_regs(regs)

    def get_sregs(self) -> s.Sregs:
        if self._sync and self.sync_valid:
            return _copy(self.run.s.regs.sregs)  # type: ignore[no-any-return]
        r = s.Sregs()
        self.fd.get_sregs(r)
        return r

    def set_sregs(self, sregs: s.Sregs) -> None:
        """Takes effect at once (not deferred to the next KVM_RUN): the LAPIC and MSR ioctls that may follow
        interpret the APIC mode and EFER from sregs."""
        if self.io_unsettled:
            self.settle()
        self.fd.set_sregs(sregs)
        if self._sync and self.sync_valid:
            self.run.s.regs.sregs = sregs
            self.run.kvm_dirty_regs &= ~c.KVM_SYNC_X86_SREGS

    def get_events(self) -> s.VcpuEvents:
        if self._sync and self.sync_valid:
            return _copy(self.run.s.regs.events)  # type: ignore[no-any-return]
        e = s.VcpuEvents()
        self.fd.get_vcpu_events(e)
        return e

    def _load_sync_area(self) -> None:
        """Before a partial write into the sync area, make the parts not being written current too."""
        if self.io_unsettled:
            self.settle()
        if not self.sync_valid:
            self.fd.get_regs(self.run.s.regs.regs)
            self.fd.get_sregs(self.run.s.regs.sregs)
            self.fd.get_vcpu_events(self.run.s.regs.events)
            self.sync_valid = True

    def forget_runs(self) -> None:
        """For a recycled VM shell: no pending immediate exit or sync-area writes, and the sync area no longer
        holds this vCPU's registers (the next restore sets them in full)."""
        self.settle()           # KVM would otherwise complete a dead fork's `out` in the next fork's first run
        self.run.immediate_exit = 0
        self.run.kvm_dirty_regs = 0
        self.sync_valid = False

    def after_run(self) -> None:
        """Called after each KVM_RUN: KVM refreshed the sync area (and consumed pending dirty bits)."""
        self.sync_valid = self._sync
        self.run.kvm_dirty_regs = 0

    # --- whole state --------------------------------------------------------------------------------------------

    def capture(self) -> VcpuState:
        self.settle()
        fd = self.fd
        xsave = self._xsave_type()
        fd.get_xsave(xsave)
        xcrs = s.Xcrs()
        fd.get_xcrs(xcrs)
        msrs: Any = self._msrs_type()
        msrs.nmsrs = len(self.msr_indices)
        for e, index in zip(msrs.entries, self.msr_indices, strict=True):
            e.index = index
        fd.get_msrs(msrs)
        lapic = s.LapicState()
        fd.get_lapic(lapic)
        mp = s.MpState()
        fd.get_mp_state(mp)
        dr = s.DebugRegs()
        fd.get_debugregs(dr)
        return VcpuState(self.index, self.get_regs(), self.get_sregs(), self.get_events(), xsave, xcrs, msrs,
                         lapic, mp, dr)

    def restore(self, st: VcpuState) -> None:
        """Load a captured state. Regs/sregs/events go through the sync area: applied at the next KVM_RUN."""
        self.settle_before(st)
        fd = self.fd
        full, without_mp_state, sync_image = st.restore_plan()
        if self._sync:
            # KVM_SET_LAPIC interprets the LAPIC in the vCPU's current APIC mode (xAPIC/x2APIC, from apic_base in
            # sregs), so sregs must be in place first unless the APIC base does not change (the reset case).
            dirty = SYNC_ALL
            if not (self.sync_valid and self.sync_apic_base.value == st.sregs.apic_base):
                fd.set_sregs(st.sregs)
                dirty &= ~c.KVM_SYNC_X86_SREGS
            _memmove(self.sync_addr, _addressof(sync_image), _SYNC_SIZE)
            self.run.kvm_dirty_regs = dirty
            self.sync_valid = True
        else:
            fd.set_sregs(st.sregs)
            fd.set_regs(st.regs)
            fd.set_vcpu_events(st.events)
        # xsave, xcrs, lapic, msrs, mp_state, debugregs: after sregs (the LAPIC follows the APIC mode).
        # A vCPU whose last KVM_RUN ended in a port or MMIO exit was executing guest code, so its MP state is
        # RUNNABLE: nothing to restore when the saved one is RUNNABLE too (the reset after each fuzzing input).
        if self.exit_reason.value in _RUNNING_EXITS and st.runnable:
            run_plan(fd.fd, without_mp_state)
        else:
            run_plan(fd.fd, full)
            if not st.runnable:
                # The vCPU is not running any more: forget the last exit (kvm_run's exit_reason is output only,
                # KVM rewrites it at the next exit), so the next restore sets the MP state.
                self.exit_reason.value = c.KVM_EXIT_UNKNOWN

    def preload(self, st: VcpuState) -> None:
        """Load the parts of `st` that do not follow the clock into this vCPU of a pooled shell, ahead of a fork:
        sregs first (the MSRs and, at fork time, the LAPIC are read in its APIC mode), then
        `VcpuState.preload_plans()[0]`. `finish_preload()` does the rest at fork time."""
        self.settle()
        self.fd.set_sregs(st.sregs)
        run_plan(self.fd.fd, st.preload_plans()[0])
        self.sync_valid = False

    def finish_preload(self, st: VcpuState, *, ioctls: bool = True) -> None:
        """The fork-time half of a preloaded restore: registers, sregs and events through the sync area, then the
        LAPIC and the clock-following MSRs (and the MP state of a vCPU that is not RUNNABLE): `preload_plans()[1]`,
        which the caller issues itself when `ioctls` is False."""
        if self._sync:
            _memmove_keeping_gil(self.sync_addr, _addressof(st.restore_plan()[2]), _SYNC_SIZE)
            self.run.kvm_dirty_regs = SYNC_ALL
            self.sync_valid = True
        else:
            self.fd.set_regs(st.regs)
            self.fd.set_vcpu_events(st.events)
        if ioctls:
            run_plan(self.fd.fd, st.preload_plans()[1])
        if not st.runnable:
            self.exit_reason.value = c.KVM_EXIT_UNKNOWN

    def flush_sync(self) -> None:
        """Push pending sync-area writes into KVM now (KVM_RUN with immediate_exit), e.g. before closing."""
        self.settle()
        if self._sync and self.run.kvm_dirty_regs:
            self.run.immediate_exit = 1
            self.fd.run_once()
            self.run.immediate_exit = 0
            self.after_run()

    def close(self) -> None:
        if isinstance(self._emulation, StatsCounter):
            self._emulation.close()
        self.fd.close()


class ResetPlan:
    """One saved state restored into the same vCPUs and VM again and again (a fork's reset), everything prepared:
    each vCPU's sync-area image, and one list of (fd, request, pointer) ioctls over the vCPU fds and the VM fd
    (`platform`: the VM's part, e.g. irqchips, PIT, clock), with and without KVM_SET_MP_STATE. A vCPU whose sync
    area does not hold its registers, or whose APIC base would change, goes through Vcpu.restore instead."""

    def __init__(self, vcpus: Sequence[Vcpu], states: Sequence[VcpuState], vm_fd: int,
                 platform: IoctlPlan, *, compiled: bool = True, interrupts_masked: bool = False) -> None:
        self.vcpus = list(vcpus)
        self.states = list(states)
        self.vm_fd = vm_fd
        self.platform = platform
        plans = [vs.restore_plan() for vs in self.states]
        self._sync = [(v, v.sync_addr, _addressof(image), vs.sregs.apic_base)
                      for v, vs, (_, _, image) in zip(self.vcpus, self.states, plans, strict=True)]
        tail: FdPlan = [(vm_fd, request, ptr) for request, ptr in platform]
        # Each list is one call into vmfork._fastpath when it is built (`compiled`), else a Python loop.
        self._full = PackedPlan([(v.fd.fd, request, ptr) for v, (full, _, _) in zip(self.vcpus, plans, strict=True)
                                 for request, ptr in full] + tail, compiled=compiled)
        self._without_mp_state = PackedPlan([(v.fd.fd, request, ptr)
                                             for v, (_, part, _) in zip(self.vcpus, plans, strict=True)
                                             for request, ptr in part] + tail, compiled=compiled)
        # `interrupts_masked` (every IOAPIC input masked in the saved platform state: nothing outside the vCPU can
        # put an interrupt into its LAPIC) with a disarmed LAPIC timer: the LAPIC changes only through the guest's
        # kernel-mode instructions, so a lean reset leaves it out too
        self.lapic_quiet = interrupts_masked and len(self.states) == 1 and self.states[0].lapic_timer_off()
        self._lean = PackedPlan([(v.fd.fd, request, ptr) for v, vs in zip(self.vcpus, self.states, strict=True)
                                 for request, ptr in vs.lean_restore_plan(lapic=not self.lapic_quiet)] + tail,
                                compiled=compiled)
        self._runnable = all(vs.runnable for vs in self.states)
        self._stopped = [v for v, vs in zip(self.vcpus, self.states, strict=True) if not vs.runnable]
        self._fast = all(v._sync for v in self.vcpus)

    def restore(self) -> None:
        for v, st in zip(self.vcpus, self.states, strict=True):
            v.settle_before(st)
        running = self._runnable
        if self._fast:
            for v, _, _, apic_base in self._sync:
                if not (v.sync_valid and v.sync_apic_base.value == apic_base):
                    self._restore_each()
                    return
                if v.exit_reason.value not in _RUNNING_EXITS:
                    running = False
        else:
            self._restore_each()
            return
        for v, dst, src, _ in self._sync:
            _memmove(dst, src, _SYNC_SIZE)
            v.run.kvm_dirty_regs = SYNC_ALL
        # MP state: see Vcpu.restore.
        (self._without_mp_state if running else self._full).run()
        for v in self._stopped:
            v.exit_reason.value = c.KVM_EXIT_UNKNOWN

    def entry_parts(self, *, lean: bool = False) -> tuple[list[tuple[int, int, int]], PackedPlan] | None:
        """What restore() would do, as values for a kvm.Entry (one C call with the next KVM_RUN): the memmoves of
        the sync-area images and of kvm_dirty_regs, and the ioctl plan; None where restore() must run as is (a
        vCPU whose sync area is stale or whose APIC base would change, a saved state that is not RUNNABLE).
        `lean`: the caller has proven that no vCPU's XCRs, debug registers or clock-free MSRs changed since this
        plan last restored them (fork.VM.reset_and_run): those ioctls are left out (VcpuState.lean_restore_plan),
        and the LAPIC's where `lapic_quiet`."""
        if not (self._fast and self._runnable):
            return None
        for v, st in zip(self.vcpus, self.states, strict=True):
            # the `out` the last run stopped at may still be pending: KVM drops it when the reset moves RIP
            # elsewhere; if the reset returns to that very instruction KVM would skip it, so it is completed first
            v.settle_before(st)
        running = True
        for v, _, _, apic_base in self._sync:
            if not (v.sync_valid and v.sync_apic_base.value == apic_base):
                return None
            if v.exit_reason.value not in _RUNNING_EXITS:
                running = False
        copies = []
        for v, dst, src, _ in self._sync:
            copies.append((dst, src, _SYNC_SIZE))
            copies.append((v.fd.run_addr + _DIRTY_REGS_OFFSET, _addressof(_SYNC_ALL_WORD), 8))
        if not running:
            return copies, self._full
        return copies, (self._lean if lean else self._without_mp_state)

    def _restore_each(self) -> None:
        for v, vs in zip(self.vcpus, self.states, strict=True):
            v.restore(vs)
        run_plan(self.vm_fd, self.platform)
