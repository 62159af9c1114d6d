"""`cmpxchg16b` in guest kernel mode (SLUB's lockless freelist updates, whenever CPUID shows CX16, which the guest
reads natively on kvm_pvm): completed by vmfork while the vCPU is stopped, which makes it atomic with respect to
that vCPU (other vCPUs keep running: on a machine with several, a racing write between the read and the write here
is the remaining risk). RDX:RAX compared with the 16 bytes; equal: RCX:RBX stored, ZF set; else: the 16 bytes
loaded into RDX:RAX, ZF cleared. The destination is checked as the CPU checks a write (guest_access.access): a page
that is absent, read-only (with CR0.WP) or a user page under SMAP raises #PF through the guest's IDT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Workaround, register
from .guest_access import GuestAccessError, PageFault, access
from .operands import decode_one_of, finish, mem_address

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "Cmpxchg16bFallback"]

INFO = register(Workaround(
    "cmpxchg16b-cpl0", "cmpxchg16b in guest kernel mode: compared and exchanged with the vCPU stopped",
    "doctor cpl0_instructions: cmpxchg16b"))

ZF = 1 << 6
M64 = (1 << 64) - 1


class Cmpxchg16bFallback:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def __call__(self, vcpu: Vcpu) -> bool:
        regs = vcpu.get_regs()
        d = decode_one_of(vcpu, self.memory, regs.rip, ("cmpxchg16b",))
        if d is None:
            return False
        try:
            sregs = vcpu.get_sregs()
            addr = mem_address(d.operands[0], regs, sregs, regs.rip + d.size)
            if addr & 0xF:
                return False            # the CPU raises #GP; the crash report says where
            # a write access even when the comparison fails (the CPU then writes the old value back)
            dest = access(vcpu, self.memory, addr, 16, write=True, sregs=sregs, rflags=regs.rflags)
            old = int.from_bytes(dest.read(0, 16), "little")
            if old == (regs.rdx << 64) | regs.rax:
                dest.write(0, ((regs.rcx << 64) | regs.rbx).to_bytes(16, "little"))
                regs.rflags |= ZF
            else:
                regs.rax, regs.rdx = old & M64, old >> 64
                regs.rflags &= ~ZF
        except PageFault as pf:
            from .idt import deliver_page_fault
            deliver_page_fault(vcpu, self.memory, regs.rip, pf)
            return True
        except GuestAccessError:
            return False
        return finish(vcpu, regs, d)
