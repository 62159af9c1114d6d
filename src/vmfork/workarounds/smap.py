"""`clac` / `stac` in guest kernel mode (SMAP's user-access brackets around every copy to or from user memory): the
host's emulator cannot run them, and on a host whose CPUID the guest reads natively (kvm_pvm) SMAP cannot be hidden.
vmfork completes them: RFLAGS.AC cleared or set, RIP past the 3 bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Workaround, register
from .guest_access import GuestAccessError, read_virt

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "SmapFallback"]

INFO = register(Workaround(
    "clac-stac-cpl0", "clac/stac in guest kernel mode: RFLAGS.AC cleared/set", "doctor cpl0_instructions: smap"))

AC = 1 << 18
CLAC, STAC = b"\x0f\x01\xca", b"\x0f\x01\xcb"


class SmapFallback:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def __call__(self, vcpu: Vcpu) -> bool:
        regs = vcpu.get_regs()
        try:
            code = read_virt(vcpu, self.memory, regs.rip, 3)
        except GuestAccessError:
            return False
        if code == CLAC:
            regs.rflags &= ~AC
        elif code == STAC:
            regs.rflags |= AC
        else:
            return False
        regs.rip += 3
        vcpu.set_regs(regs)
        return True
