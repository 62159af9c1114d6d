"""`int3` in guest kernel mode: the host's emulator cannot run it (an emulation failure), so vmfork delivers the
#BP itself through the guest's IDT (vmfork.workarounds.idt), with trap semantics: the saved RIP is the instruction
after the int3. Linux needs it for its alternatives self-test and for every text_poke_bp (static keys, jump labels).

A debugger's own int3 breakpoints in kernel mode are not the guest's: its emulation-failure hook goes first and
takes those; this one handles the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Workaround, register
from .guest_access import GuestAccessError, read_virt

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "Int3Fallback"]

INFO = register(Workaround(
    "int3-cpl0", "int3 in guest kernel mode: #BP delivered through the guest's IDT (IST stacks, trap frame)",
    "int3_cpl0"))

BP_VECTOR = 3


class Int3Fallback:
    """The emulation-failure hook. Returns False (the machine stops with its crash report) for anything else."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def __call__(self, vcpu: Vcpu) -> bool:
        from .idt import deliver_exception
        regs = vcpu.get_regs()
        try:
            if read_virt(vcpu, self.memory, regs.rip, 1) != b"\xcc":
                return False
            deliver_exception(vcpu, self.memory, BP_VECTOR, return_rip=regs.rip + 1, fault_rip=regs.rip)
        except GuestAccessError:
            return False
        return True
