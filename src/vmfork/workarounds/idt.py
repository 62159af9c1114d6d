"""Delivering an exception through the guest's 64-bit IDT from user space, exactly as the CPU would.

Used by the fallbacks for instructions the host cannot emulate in guest kernel mode (an `int3` delivers #BP, an
`fwait` with an x87 exception pending delivers #MF): the 16-byte interrupt/trap gate, the IST or privilege-level
stack switch from the TSS, RSP aligned down to 16, the frame SS, RSP, RFLAGS, CS, RIP (and an error code), then
TF, NT, RF and VM cleared, and IF too for an interrupt gate (Intel SDM vol. 3, 6.14 "Exception and interrupt handling
in 64-bit mode")."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .guest_access import GuestAccessError, PageFault, read_virt, write_checked

if TYPE_CHECKING:
    from ..kvm import structs as s
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["Gate", "deliver_exception", "deliver_page_fault", "read_gate"]

EFER_LMA = 1 << 10
TF, IF, NT, RF, VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF
DF_VECTOR, PF_VECTOR = 8, 14


class Gate:
    """One 64-bit IDT gate."""

    __slots__ = ("dpl", "handler", "ist", "kind", "present", "selector")

    def __init__(self, raw: bytes) -> None:
        lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", raw)
        self.handler = lo | (mid << 16) | (hi << 32)
        self.selector = sel
        self.ist = ist & 7
        self.kind = attr & 0xF
        self.dpl = (attr >> 5) & 3
        self.present = bool(attr & 0x80)


def read_gate(vcpu: Vcpu, memory: GuestMemory, sregs: s.Sregs, vector: int) -> Gate:
    if not sregs.efer & EFER_LMA:
        raise GuestAccessError("the guest is not in long mode")
    if sregs.idt.limit < vector * 16 + 15:
        raise GuestAccessError(f"IDT vector {vector} is beyond the IDT limit {sregs.idt.limit:#x}")
    gate = Gate(read_virt(vcpu, memory, sregs.idt.base + vector * 16, 16))
    if not gate.present or gate.kind not in (INTERRUPT_GATE, TRAP_GATE):
        raise GuestAccessError(f"IDT vector {vector} is not a present 64-bit interrupt or trap gate")
    return gate


def _load_code_segment(vcpu: Vcpu, memory: GuestMemory, sregs: s.Sregs, selector: int) -> int:
    """Load CS from the GDT descriptor of `selector` into sregs; returns its DPL (the new CPL)."""
    index = selector & ~7
    if selector & 4 or index == 0 or index + 7 > sregs.gdt.limit:
        raise GuestAccessError(f"gate selector {selector:#x} is not a GDT code segment")
    d = int.from_bytes(read_virt(vcpu, memory, sregs.gdt.base + index, 8), "little")
    access, flags = (d >> 40) & 0xFF, (d >> 52) & 0xF
    if not access & 0x80 or access & 0x18 != 0x18:
        raise GuestAccessError(f"gate selector {selector:#x} is not a present code segment")
    dpl = (access >> 5) & 3
    cs = sregs.cs
    cs.selector = index | dpl
    cs.base = 0
    cs.limit = 0xFFFFFFFF if flags & 8 else ((d & 0xFFFF) | ((d >> 32) & 0xF0000))
    cs.type = access & 0xF
    cs.present, cs.dpl, cs.s = 1, dpl, 1
    cs.l, cs.db, cs.g, cs.avl = (flags >> 1) & 1, (flags >> 2) & 1, (flags >> 3) & 1, flags & 1
    cs.unusable = 0
    return dpl


def deliver_page_fault(vcpu: Vcpu, memory: GuestMemory, rip: int, fault: PageFault) -> None:
    """Raise the #PF of the instruction at `rip` (a fault: the handler returns to it) with its CR2 and error code."""
    deliver_exception(vcpu, memory, PF_VECTOR, return_rip=rip, error_code=fault.error_code, cr2=fault.cr2)


def deliver_exception(vcpu: Vcpu, memory: GuestMemory, vector: int, *, return_rip: int,
                      error_code: int | None = None, cr2: int | None = None, fault_rip: int | None = None) -> None:
    """Enter the guest's handler for `vector` as the CPU would, with `return_rip` as the saved RIP (the next
    instruction for a trap such as #BP from int3, the faulting one for a fault) and CR2 set to `cr2` if given.
    A page fault while pushing the frame is delivered instead, with `fault_rip` (the instruction that raised the
    first exception; default `return_rip`) as its saved RIP, or becomes a double fault (CR2 = the stack address, as
    Linux's stack-overflow check reads it) when the first was a #PF. Raises GuestAccessError, changing nothing,
    where the CPU would raise something else (no gate, bad selector) or shut down (a triple fault)."""
    try:
        _deliver(vcpu, memory, vector, return_rip, error_code, cr2)
    except PageFault as pf:
        if vector == DF_VECTOR:
            raise GuestAccessError(f"triple fault: {pf} while delivering a double fault") from None
        rip = return_rip if fault_rip is None else fault_rip
        if vector == PF_VECTOR:
            deliver_exception(vcpu, memory, DF_VECTOR, return_rip=rip, error_code=0, cr2=pf.cr2)
        else:
            deliver_exception(vcpu, memory, PF_VECTOR, return_rip=rip, error_code=pf.error_code, cr2=pf.cr2)


def _deliver(vcpu: Vcpu, memory: GuestMemory, vector: int, return_rip: int, error_code: int | None,
             cr2: int | None) -> None:
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    gate = read_gate(vcpu, memory, sregs, vector)
    cpl = sregs.cs.selector & 3
    old_cs, old_ss = sregs.cs.selector, sregs.ss.selector
    if gate.selector & ~3 == old_cs & ~3:
        new_cpl = sregs.cs.dpl
    else:
        new_cpl = _load_code_segment(vcpu, memory, sregs, gate.selector)
    if new_cpl > cpl:
        raise GuestAccessError(f"gate {vector} leads to a less privileged code segment")
    tss = sregs.tr.base
    if gate.ist:
        rsp = int.from_bytes(read_virt(vcpu, memory, tss + 0x24 + 8 * (gate.ist - 1), 8), "little")
    elif new_cpl < cpl:
        rsp = int.from_bytes(read_virt(vcpu, memory, tss + 4 + 8 * new_cpl, 8), "little")
    else:
        rsp = regs.rsp
    rsp &= ~0xF
    frame = [old_ss, regs.rsp, regs.rflags, old_cs, return_rip]
    if error_code is not None:
        frame.append(error_code)
    rsp -= 8 * len(frame)
    write_checked(vcpu, memory, rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame)), implicit=new_cpl < 3,
                  sregs=sregs, rflags=regs.rflags)
    if new_cpl < cpl:
        sregs.ss.selector = new_cpl       # a NULL SS with RPL = the new CPL, as in 64-bit mode
        sregs.ss.dpl = new_cpl
    regs.rsp = rsp
    regs.rip = gate.handler
    regs.rflags &= ~(TF | NT | RF | VM | (IF if gate.kind == INTERRUPT_GATE else 0))
    if cr2 is not None:
        sregs.cr2 = cr2
    if sregs.cs.selector != old_cs or new_cpl < cpl or cr2 is not None:
        vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
