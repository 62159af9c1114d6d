"""Guest-virtual memory and instruction access for workarounds: what a fallback needs to read the guest's IDT,
TSS, GDT and stack and to write an exception frame, through the guest's own page tables (KVM_TRANSLATE).

Host writes go through `GuestMemory.write`, so a fork's reset puts the pages back like any other write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import VmforkError

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["GuestAccessError", "decode", "page_fault", "read_virt", "write_virt"]

PAGE = 4096


class GuestAccessError(VmforkError):
    """A guest-virtual address the workaround needed is not mapped."""


def _pieces(vcpu: Vcpu, addr: int, length: int) -> list[tuple[int, int]]:
    out = []
    while length > 0:
        n = min(length, PAGE - (addr & (PAGE - 1)))
        t = vcpu.fd.translate(addr & 0xFFFF_FFFF_FFFF_FFFF)
        if not t.valid:
            raise GuestAccessError(f"guest-virtual address {addr:#x} is not mapped")
        out.append((t.physical_address, n))
        addr += n
        length -= n
    return out


PF_PRESENT, PF_WRITE = 1, 2


def page_fault(vcpu: Vcpu, addr: int, length: int, *, write: bool) -> tuple[int, int] | None:
    """(CR2, error code) of the page fault a kernel-mode access to [addr, addr + length) raises on the CPU (a page
    not present, or one not writable for a write: a copy-on-write page of a user process), or None when the whole
    range may be accessed. Host writes bypass the guest's protections, so a fallback that writes guest-virtual
    memory asks first: the guest's fault handler (an exception-table fixup, a copy-on-write copy) does the rest."""
    end = addr + length
    page = addr & ~(PAGE - 1)
    while page < end:
        t = vcpu.fd.translate(page & 0xFFFF_FFFF_FFFF_FFFF)
        first = max(page, addr)
        if not t.valid:
            return first, PF_WRITE if write else 0
        if write and not t.writeable:
            return first, PF_PRESENT | PF_WRITE
        page += PAGE
    return None


def read_virt(vcpu: Vcpu, memory: GuestMemory, addr: int, length: int) -> bytes:
    return b"".join(memory.read(gpa, n) for gpa, n in _pieces(vcpu, addr, length))


def write_virt(vcpu: Vcpu, memory: GuestMemory, addr: int, data: bytes) -> None:
    pos = 0
    for gpa, n in _pieces(vcpu, addr, len(data)):
        memory.write(gpa, data[pos:pos + n])
        pos += n


_CS: Any = None


def decode(code: bytes, address: int) -> tuple[str, str, int] | None:
    """(mnemonic, operands, length) of the first 64-bit instruction in `code`, or None if it does not decode."""
    global _CS
    if _CS is None:
        import capstone
        _CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for insn in _CS.disasm(code, address, 1):
        return str(insn.mnemonic), str(insn.op_str), int(insn.size)
    return None
