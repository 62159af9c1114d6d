"""Completing `syscall` on hosts where it stays in guest user mode (kvm_pvm; doctor's `syscall_cpl3` probe).

There, `syscall` from CPL3 does everything but the privilege switch: RCX = the return RIP, R11 = RFLAGS,
RFLAGS &= ~SFMASK, RIP = LSTAR, with CS/SS still the user's. The guest's entry page is supervisor-only, so the
instruction fetch at LSTAR raises a #PF from user mode, which the guest's handler (IDT gate 14) receives in emulated
kernel mode. A hardware breakpoint on that handler (owner "syscall", through `vcpu.debug`) stops there. At the hit the
6-qword frame at RSP is [error, rip, cs, rflags, rsp, ss]; it is a user `syscall` iff cs is a CPL3 selector, the
error code says user + instruction fetch (0x14; user and not a write where neither NX nor SMEP is on, since only
they make the CPU report fetches), rip == CR2 == LSTAR, and the saved RFLAGS equal (R11 & ~SFMASK) | 2
(what `syscall` left, IF clear; a user `jmp` to LSTAR has IF set). vmfork then enters the entry in kernel mode as the
CPU would: RIP = LSTAR, RSP = the user's (the frame is dropped), RFLAGS = (R11 & ~SFMASK) | 2, CS = STAR[47:32]
(64-bit code, DPL 0), SS = CS + 8, every other register kept. `sysretq` and `iretq` back to user mode work natively.
Every other #PF goes on to the guest's handler: the breakpoint is stepped past (`vcpu.debug.step_past`, the next
instruction decoded at every hit, since Linux patches its entry code during boot).

The gate-14 handler is (re-)read at every point where vmfork sees the guest's state anyway: when the mechanism is
installed, after a state load (restore, fork, save-file restore), at every emulation failure (Linux's int3 self-test
comes right after its final IDT and syscall MSRs) and at every hit."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..guest_debug import HwBreakpoint
from ..kvm import structs as s
from . import Workaround, register
from .guest_access import GuestAccessError, decode, read_virt
from .idt import read_gate

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "OWNER", "SyscallCompletion"]

INFO = register(Workaround(
    "syscall-completion", "syscall from user mode entered in kernel mode (breakpoint on the guest's #PF handler)",
    "syscall_cpl3"))

OWNER = "syscall"
MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000084
EFER_SCE, EFER_LMA = 1, 1 << 10
PF_VECTOR = 14
PF_WRITE, PF_USER, PF_USER_FETCH = 0x2, 0x4, 0x14
EFER_NXE, CR4_SMEP = 1 << 11, 1 << 20
RF = 1 << 16
AC = 1 << 18


@dataclass(slots=True)
class SyscallCounts:
    completed: int = 0          # user syscalls entered in kernel mode
    passed_on: int = 0          # other page faults sent on to the guest's handler


class SyscallCompletion:
    """One machine's syscall completion: a debug exit hook and a refresh of each vCPU's breakpoint."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.handlers: dict[int, int] = {}        # vCPU index -> the #PF handler its breakpoint sits on
        self.counts = SyscallCounts()
        self._msrs: Any = s.msrs_type(3)()

    # --- the breakpoint ---------------------------------------------------------------------------------------

    def _read_msrs(self, vcpu: Vcpu) -> tuple[int, int, int]:
        m = self._msrs
        m.nmsrs = 3
        for e, index in zip(m.entries, (MSR_STAR, MSR_LSTAR, MSR_SFMASK), strict=True):
            e.index = index
        vcpu.fd.get_msrs(m)
        return int(m.entries[0].data), int(m.entries[1].data), int(m.entries[2].data)

    def refresh(self, vcpu: Vcpu) -> None:
        """Put (or move, or lift) the breakpoint where the guest's #PF handler now is."""
        handler = None
        sregs = vcpu.get_sregs()
        if sregs.efer & EFER_SCE and sregs.efer & EFER_LMA and self._read_msrs(vcpu)[1]:
            try:
                handler = read_gate(vcpu, self.memory, sregs, PF_VECTOR).handler
            except GuestAccessError:
                handler = None
        if handler == self.handlers.get(vcpu.index) and (handler is None) == (OWNER not in vcpu.debug.owners()):
            return
        if handler is None:
            self.handlers.pop(vcpu.index, None)
            vcpu.debug.release(OWNER)
        else:
            self.handlers[vcpu.index] = handler
            vcpu.debug.claim(OWNER, breakpoints=[HwBreakpoint(handler)])

    def release(self, vcpu: Vcpu) -> None:
        self.handlers.pop(vcpu.index, None)
        if OWNER in vcpu.debug.owners():
            vcpu.debug.release(OWNER)

    # --- the debug exit hook ----------------------------------------------------------------------------------

    def __call__(self, vcpu: Vcpu) -> bool:
        hits = [bp for owner, bp in vcpu.debug.hit(vcpu.run.exit.debug.dr6) if owner == OWNER]
        if not hits:
            return False
        bp = hits[0]
        regs = vcpu.get_regs()
        if regs.rip != bp.address:
            return False
        try:
            err, rip, cs, rflags, rsp, _ss = struct.unpack("<6Q", read_virt(vcpu, self.memory, regs.rsp, 48))
            star, lstar, sfmask = self._read_msrs(vcpu)
            sregs = vcpu.get_sregs()
            # the fetch bit is only reported where NX or SMEP is on; without, a user read fault at rip is the same
            fetch = PF_USER_FETCH if sregs.efer & EFER_NXE or sregs.cr4 & CR4_SMEP else PF_USER
            if (cs & 3 == 3 and err & (fetch | PF_WRITE) == fetch and rip == lstar == sregs.cr2
                    and rflags & ~RF == (regs.r11 & ~sfmask) | 2):
                self._enter(vcpu, regs, sregs, lstar, star, sfmask, rsp)
                self.counts.completed += 1
                return True
            code = read_virt(vcpu, self.memory, regs.rip, 16)
        except GuestAccessError:
            return False
        insn = decode(code, regs.rip)
        if insn is None:
            return False
        self.counts.passed_on += 1
        if insn[0] in ("nop", "endbr64", "clac"):
            # Linux's handler starts with one of these (patched by its alternatives): done here, the vCPU resumes
            # after it and the breakpoint stays where it is. Stepping past a `clac` would not do: it is itself an
            # emulation failure here, and the one-shot breakpoint after it is not seen once vmfork moved RIP.
            if insn[0] == "clac":
                regs.rflags &= ~AC
            regs.rip += insn[2]
            vcpu.set_regs(regs)
            return True
        vcpu.debug.step_past(OWNER, bp, regs.rip + insn[2])
        return True

    @staticmethod
    def _enter(vcpu: Vcpu, regs: s.Regs, sregs: s.Sregs, lstar: int, star: int, sfmask: int, user_rsp: int) -> None:
        """The privilege switch `syscall` should have made, as the CPU makes it."""
        sel = (star >> 32) & 0xFFFC
        cs, ss = sregs.cs, sregs.ss
        cs.selector, cs.base, cs.limit, cs.type = sel, 0, 0xFFFFFFFF, 0xB
        cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g, cs.avl, cs.unusable = 1, 0, 0, 1, 1, 1, 0, 0
        ss.selector, ss.base, ss.limit, ss.type = sel + 8, 0, 0xFFFFFFFF, 0x3
        ss.present, ss.dpl, ss.db, ss.s, ss.l, ss.g, ss.avl, ss.unusable = 1, 0, 1, 1, 0, 1, 0, 0
        regs.rip = lstar
        regs.rsp = user_rsp
        regs.rflags = (regs.r11 & ~sfmask & ~RF) | 2
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
