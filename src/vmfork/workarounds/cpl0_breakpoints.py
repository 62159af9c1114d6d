"""vmfork's own `int3`s in guest kernel mode, on hosts where `int3` in (emulated) CPL0 is an emulation failure.

On kvm_pvm hosts guest kernel mode is emulated, and the emulator cannot run `int3`: the VM stops with
KVM_EXIT_INTERNAL_ERROR (emulation failure) with RIP at the `int3`. For a breakpoint vmfork planted, that stop *is*
the breakpoint exit. `cpl0_int3_hook` makes the `Machine.exit_hooks` emulation-failure hook that recognises it: in
CPL0, at an `int3` byte, it asks the debugger (`recognise(vcpu index, rip)`) whether the address is one of its
breakpoints, and the debugger carries on (a stop, or a step over it). The guest's own `int3`s are not the debugger's:
the hook returns False and the next hook (the `int3-cpl0` workaround, which delivers them as #BP through the guest's
IDT) handles them. The hook is registered first, before host workarounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import ExitHook, Workaround, register

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["HOOK_NAME", "cpl0_int3_hook"]

HOOK_NAME = "debugger-cpl0-int3"
INT3 = 0xCC


def cpl0_int3_hook(read_byte: Callable[[int, int], int | None],
                   recognise: Callable[[int, int], bool]) -> ExitHook:
    """The emulation-failure hook. `read_byte(vcpu index, virtual address)` reads guest code (None: unmapped);
    `recognise(vcpu index, rip)` handles one of the debugger's breakpoints and returns True, or returns False."""

    def hook(vcpu: Vcpu) -> bool:
        sregs = vcpu.get_sregs()
        if sregs.cs.dpl != 0 and sregs.cr0 & 1:
            return False
        rip = vcpu.get_regs().rip
        if read_byte(vcpu.index, rip) != INT3:
            return False
        return recognise(vcpu.index, rip)

    return hook


register(Workaround(
    "cpl0-breakpoints", "vmfork's int3s in emulated guest kernel mode: the emulation failure at one is its "
    "breakpoint exit (the guest's own go on to int3-cpl0)", "int3_cpl0"))
