"""The IDT (and TSS) vmfork lends a vCPU whose guest has no #BP gate, so that vmfork's int3s in guest user mode reach
the #BP stub on hosts whose KVM ignores software breakpoints (see bp_stub for the debug area they live in).

The lent IDT is a copy of the guest's own gates (so its other exceptions and interrupts go where they went) with
vector 3 pointing at the stub. A #BP from user mode switches to the stack in the TSS's RSP0; when the guest's TSS has
none usable, vmfork lends a copy of that TSS (I/O bitmap included) with RSP0 at the lent stack. Both are installed
through KVM_SET_SREGS (IDTR base/limit, TR base/limit: the guest's GDT is not touched) and given back, with the
guest's own values, as soon as the debugger no longer needs the stub. Only what needs no guest memory access lives
here; the debugger (vmfork.vmi.debug.stub) reads the guest's tables and writes these bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..kvm import structs as s
from . import Workaround, register
from .bp_stub import LENT_IDT, LENT_TSS, LENT_TSS_MAX, idt_gate

__all__ = [
    "TSS_MIN", "Lent", "give_back", "is_lent", "kernel_code_selector", "lend", "lent_idt", "lent_tss", "own_view",
]

GATE_3 = 3 * 16
TSS_MIN = 0x68              # a 64-bit TSS without I/O bitmap
IDT_SIZE = 0x1000


@dataclass(frozen=True)
class Lent:
    """A vCPU's own IDTR and TR while it runs on the IDT (and TSS) vmfork lent it."""

    idt_base: int
    idt_limit: int
    tr_base: int | None                 # None: the TR was not lent
    tr_limit: int


def kernel_code_selector(gdt: bytes) -> int | None:
    """The first present 64-bit code segment of DPL 0 in the guest's GDT (its bytes from the base), or None."""
    for sel in range(8, len(gdt) - 7, 8):
        d = struct.unpack_from("<Q", gdt, sel)[0]
        if (d >> 47) & 1 and (d >> 43) & 3 == 3 and (d >> 53) & 1 and not (d >> 45) & 3:
            return sel
    return None


def lent_idt(own: bytes, stub_va: int, selector: int) -> bytes:
    """The lent IDT: the guest's own gates (`own`, up to 256), vector 3 an interrupt gate (DPL 3) to the stub."""
    table = bytearray(own[:IDT_SIZE].ljust(IDT_SIZE, b"\0"))
    table[GATE_3:GATE_3 + 16] = idt_gate(stub_va, selector)
    return bytes(table)


def lent_tss(own: bytes, stack_top: int) -> bytes:
    """The lent TSS: a copy of the guest's (`own`, its bytes up to its limit; b"" for none) with RSP0 = the lent
    stack; without a guest TSS, no I/O bitmap."""
    copy = bytearray(own[:LENT_TSS_MAX].ljust(TSS_MIN, b"\0"))
    if not own:
        struct.pack_into("<H", copy, 0x66, TSS_MIN)
    struct.pack_into("<Q", copy, 4, stack_top)
    return bytes(copy)


def lend(sregs: s.Sregs, new: s.Sregs, area_va: int, tss: bytes | None) -> Lent:
    """Point `new` (a copy of `sregs`) at the lent IDT, and at the lent TSS if `tss` is given; what was there."""
    new.idt.base, new.idt.limit = area_va + LENT_IDT, IDT_SIZE - 1
    tr_base = None
    if tss is not None:
        tr_base = sregs.tr.base
        new.tr.base, new.tr.limit = area_va + LENT_TSS, len(tss) - 1
        new.tr.type, new.tr.present, new.tr.s = 11, 1, 0       # busy 64-bit TSS
    return Lent(sregs.idt.base, sregs.idt.limit, tr_base, sregs.tr.limit)


def is_lent(sregs: s.Sregs, area_va: int) -> bool:
    return bool(sregs.idt.base == area_va + LENT_IDT)


def own_view(sregs: s.Sregs, lent: Lent, area_va: int) -> None:
    """Show the guest's own IDTR and TR in `sregs` (a copy of a vCPU's on the lent ones)."""
    sregs.idt.base, sregs.idt.limit = lent.idt_base, lent.idt_limit
    if lent.tr_base is not None and sregs.tr.base == area_va + LENT_TSS:
        sregs.tr.base, sregs.tr.limit = lent.tr_base, lent.tr_limit


give_back = own_view    # the same change, on the vCPU's real registers when the debugger no longer needs them

register(Workaround(
    "lent-idt", "a vCPU whose guest has no #BP gate is lent an IDT (and a kernel stack) in vmfork's reserved debug "
    "area while the debugger needs the #BP stub; the guest's own IDTR and TR come back after", "sw_breakpoints"))
