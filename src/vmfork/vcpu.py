"""A vCPU and its complete architectural state as a value.

Registers, segment registers and pending events travel through kvm_run's sync-regs area when the host supports it
(KVM_CAP_SYNC_REGS): after every exit KVM leaves them there, and values written there with a dirty bit are loaded on
the next KVM_RUN, which saves three ioctls on every capture and restore."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, ClassVar

from .arch.x86 import cpu
from .kvm import Kvm, VcpuFd
from .kvm import constants as c
from .kvm import structs as s

SYNC_ALL = c.KVM_SYNC_X86_REGS | c.KVM_SYNC_X86_SREGS | c.KVM_SYNC_X86_EVENTS


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

    def parts(self) -> dict[str, bytes]:
        """Raw bytes of every part (for file formats)."""
        return {name: bytes(getattr(self, name)) for name in
                ("regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state", "debugregs")}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VcpuState) and self.index == other.index and self.parts() == other.parts()

    def __hash__(self) -> int:
        return hash((self.index, self.parts()["regs"]))


class Vcpu:
    """One vCPU of a machine."""

    def __init__(self, kvm: Kvm, fd: VcpuFd, index: int, *, sync_regs: bool) -> None:
        self.kvm = kvm
        self.fd = fd
        self.index = index
        self.run = fd.run
        self._sync = sync_regs
        # True while kvm_run.s holds the authoritative regs/sregs/events (after an exit, or after a set).
        self._sync_valid = False
        xsave_size = max(4096, kvm.check_extension(c.KVM_CAP_XSAVE2))
        self._xsave_type = s.xsave_type(xsave_size)
        self.msr_indices = cpu.usable_msrs(fd, kvm)
        self._msrs_type = s.msrs_type(len(self.msr_indices))
        if sync_regs:
            self.run.kvm_valid_regs = SYNC_ALL

    # --- registers ----------------------------------------------------------------------------------------------

    def get_regs(self) -> s.Regs:
        if self._sync and self._sync_valid:
            return _copy(self.run.s.regs.regs)  # type: ignore[no-any-return]
        r = s.Regs()
        self.fd.get_regs(r)
        return r

    def set_regs(self, regs: s.Regs) -> None:
        if self._sync:
            self._load_sync_area()
            self.run.s.regs.regs = regs
            self.run.kvm_dirty_regs |= c.KVM_SYNC_X86_REGS
        else:
            self.fd.set_regs(regs)

    def get_sregs(self) -> s.Sregs:
        if self._sync and self._sync_valid:
            return _copy(self.run.s.regs.sregs)  # type: ignore[no-any-return]
        r = s.Sregs()
        self.fd.get_sregs(r)
        return r

    def set_sregs(self, sregs: s.Sregs) -> None:
        if self._sync:
            self._load_sync_area()
            self.run.s.regs.sregs = sregs
            self.run.kvm_dirty_regs |= c.KVM_SYNC_X86_SREGS
        else:
            self.fd.set_sregs(sregs)

    def get_events(self) -> s.VcpuEvents:
        if self._sync and self._sync_valid:
            return _copy(self.run.s.regs.events)  # type: ignore[no-any-return]
        e = s.VcpuEvents()
        self.fd.get_vcpu_events(e)
        return e

    def _load_sync_area(self) -> None:
        """Before a partial write into the sync area, make the parts not being written current too."""
        if not self._sync_valid:
            self.fd.get_regs(self.run.s.regs.regs)
            self.fd.get_sregs(self.run.s.regs.sregs)
            self.fd.get_vcpu_events(self.run.s.regs.events)
            self._sync_valid = True

    def after_run(self) -> None:
        """Called after each KVM_RUN: KVM refreshed the sync area (and consumed pending dirty bits)."""
        self._sync_valid = self._sync
        self.run.kvm_dirty_regs = 0

    # --- whole state --------------------------------------------------------------------------------------------

    def capture(self) -> VcpuState:
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
        fd = self.fd
        if self._sync:
            sync = self.run.s.regs
            # KVM_SET_LAPIC interprets the LAPIC in the vCPU's current APIC mode (xAPIC/x2APIC, from apic_base in
            # sregs), so sregs must be in place first unless the APIC base does not change (the reset case).
            dirty = SYNC_ALL
            if not (self._sync_valid and sync.sregs.apic_base == st.sregs.apic_base):
                fd.set_sregs(st.sregs)
                dirty &= ~c.KVM_SYNC_X86_SREGS
            sync.regs = st.regs
            sync.sregs = st.sregs
            sync.events = st.events
            self.run.kvm_dirty_regs = dirty
            self._sync_valid = True
        else:
            fd.set_sregs(st.sregs)
            fd.set_regs(st.regs)
        fd.set_xsave(st.xsave)
        fd.set_xcrs(st.xcrs)
        fd.set_lapic(st.lapic)
        fd.set_msrs(st.msrs)
        if not self._sync:
            fd.set_vcpu_events(st.events)
        fd.set_mp_state(st.mp_state)
        fd.set_debugregs(st.debugregs)

    def flush_sync(self) -> None:
        """Push pending sync-area writes into KVM now (KVM_RUN with immediate_exit), e.g. before closing."""
        if self._sync and self.run.kvm_dirty_regs:
            self.run.immediate_exit = 1
            self.fd.run_once()
            self.run.immediate_exit = 0
            self.after_run()

    def close(self) -> None:
        self.fd.close()
