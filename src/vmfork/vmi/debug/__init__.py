"""The debugger: breakpoints and stepping on any machine, one `Debugger` API over one module per mechanism.

    values.py     Breakpoint, Hit and the debugger's bookkeeping
    base.py       shared state and helpers (host probes)
    debugger.py   the public API: breakpoint sets, running, stepping, the view of the interrupted code, detach
    stepping.py   one instruction: single-step or temporary breakpoints
    stub.py       the #BP stub route (hosts that ignore software breakpoints), lent IDTs
    kernel.py     kernel-mode breakpoints through the emulation-failure exit, single-step in kernel mode
    kvm.py        KVM's own guest debugging (VT-x/AMD-V)

The host-specific pieces (the stub's code and assembler, the lent IDT and TSS, the recognition of vmfork's int3 at
an emulation failure) are host workarounds in vmfork.workarounds (bp_stub, lent_idt, cpl0_breakpoints).
"""

from ...workarounds.bp_stub import STUB_GPA, stub_code
from .debugger import Debugger, debugger
from .values import Breakpoint, GuestInt3Hook, Hit

__all__ = ["STUB_GPA", "Breakpoint", "Debugger", "GuestInt3Hook", "Hit", "debugger", "stub_code"]
