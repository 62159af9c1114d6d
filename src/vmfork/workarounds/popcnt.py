"""`popcnt` in guest kernel mode (Linux's hweight helpers, patched in by alternatives where CPUID shows POPCNT, which
the guest reads natively on kvm_pvm): computed by vmfork. Flags as the CPU sets them: ZF = (source == 0), OF, SF,
AF, CF and PF cleared."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Workaround, register
from .guest_access import GuestAccessError, PageFault, access
from .operands import decode_one_of, finish, mem_address, read_reg, reg_name, write_reg

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "PopcntFallback"]

INFO = register(Workaround(
    "popcnt-cpl0", "popcnt in guest kernel mode: computed, ZF set as the CPU sets it",
    "doctor cpl0_instructions: popcnt"))

FLAGS = (1 << 0) | (1 << 2) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 11)     # CF PF AF ZF SF OF
ZF = 1 << 6


class PopcntFallback:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def __call__(self, vcpu: Vcpu) -> bool:
        import capstone.x86 as x86
        regs = vcpu.get_regs()
        d = decode_one_of(vcpu, self.memory, regs.rip, ("popcnt",))
        if d is None or len(d.operands) != 2:
            return False
        dst, src = d.operands
        try:
            if src.type == x86.X86_OP_REG:
                value = read_reg(regs, reg_name(src.reg))
            else:
                sregs = vcpu.get_sregs()
                addr = mem_address(src, regs, sregs, regs.rip + d.size)
                value = int.from_bytes(access(vcpu, self.memory, addr, src.size, write=False, sregs=sregs,
                                              rflags=regs.rflags).read(0, src.size), "little")
        except PageFault as pf:
            from .idt import deliver_page_fault
            deliver_page_fault(vcpu, self.memory, regs.rip, pf)
            return True
        except (GuestAccessError, KeyError):
            return False
        write_reg(regs, reg_name(dst.reg), bin(value).count("1"))
        regs.rflags = (regs.rflags & ~FLAGS) | (ZF if value == 0 else 0)
        return finish(vcpu, regs, d)
