"""Guest-virtual memory and instruction access for workarounds: what a fallback needs to read the guest's IDT,
TSS, GDT and stack and to write an exception frame, through the guest's own page tables (KVM_TRANSLATE).

Host writes go through `GuestMemory.write`, so a fork's reset puts the pages back like any other write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import VmforkError

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["GuestAccessError", "decode", "read_virt", "write_virt"]

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
