"""`fwait` (`wait`) in guest kernel mode: the host's emulator cannot run it. vmfork completes it as the CPU would:
#NM when CR0.TS and CR0.MP are both set, #MF (a fault: the saved RIP is the fwait) when the x87 status word has an
unmasked exception pending (FSW.ES) and CR0.NE is set, and otherwise it does nothing but move on one byte. Linux
runs one in its FPU initialisation (fpu__init_check_bugs, the "fninit; fwait" of early FPU probing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kvm import structs as s
from . import Workaround, register
from .guest_access import GuestAccessError, read_virt

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "FwaitFallback"]

INFO = register(Workaround(
    "fwait-cpl0", "fwait in guest kernel mode: completed when no x87 exception is pending (else #MF, or #NM)",
    "doctor's fwait-cpl0 check (a tiny guest runs fninit; fwait in kernel mode)"))

CR0_MP, CR0_TS, CR0_NE = 1 << 1, 1 << 3, 1 << 5
FSW_ES = 1 << 7
NM_VECTOR, MF_VECTOR = 7, 16


class FwaitFallback:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def __call__(self, vcpu: Vcpu) -> bool:
        from .idt import deliver_exception
        regs = vcpu.get_regs()
        try:
            if read_virt(vcpu, self.memory, regs.rip, 1) != b"\x9b":
                return False
            cr0 = vcpu.get_sregs().cr0
            if cr0 & CR0_TS and cr0 & CR0_MP:
                deliver_exception(vcpu, self.memory, NM_VECTOR, return_rip=regs.rip)
                return True
            fpu = s.Fpu()
            vcpu.fd.get_fpu(fpu)
            if fpu.fsw & FSW_ES:
                if not cr0 & CR0_NE:
                    return False        # legacy FERR#/IRQ 13 reporting: not modelled; the crash report says where
                deliver_exception(vcpu, self.memory, MF_VECTOR, return_rip=regs.rip)
                return True
        except GuestAccessError:
            return False
        regs.rip += 1
        vcpu.set_regs(regs)
        return True
