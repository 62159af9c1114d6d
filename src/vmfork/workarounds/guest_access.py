"""Guest-virtual memory and instruction access for workarounds: what a fallback needs to read the guest's IDT,
TSS, GDT and stack (through KVM_TRANSLATE), and the one way a fallback writes guest memory or reads its operands:
`access`, which checks present, R/W, U/S, CR0.WP and SMAP as the CPU would for the vCPU's CPL and raises PageFault
where the CPU raises #PF (KVM_TRANSLATE cannot tell: it always reports a page writable).

Host writes go through `GuestMemory.write`, so a fork's reset puts the pages back like any other write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import MemoryAccessError, VmforkError

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["CheckedRange", "GuestAccessError", "PageFault", "access", "decode", "read_virt", "write_checked"]

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


# #PF error code bits (Intel SDM vol. 3, 4.7)
PF_PRESENT, PF_WRITE, PF_USER = 1, 2, 4
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG, CR0_WP = 1 << 31, 1 << 16
CR4_LA57, CR4_SMAP = 1 << 12, 1 << 21
EFER_LMA = 1 << 10
RFLAGS_AC = 1 << 18


class PageFault(GuestAccessError):
    """The access raises #PF on the CPU: `cr2` is the first byte it cannot access, `error_code` what the CPU
    pushes. The fallback delivers it through the guest's IDT (idt.deliver_page_fault) instead of completing the
    instruction."""

    def __init__(self, cr2: int, error_code: int) -> None:
        super().__init__(f"#PF at {cr2:#x} (error code {error_code:#x})")
        self.cr2, self.error_code = cr2, error_code


class CheckedRange:
    """[addr, addr + length) of guest-virtual memory, checked once for an access as the CPU checks it
    (`access` below): offsets into the range, read and written through guest-physical memory. Host writes go
    through `GuestMemory.write`, so a fork's reset puts the pages back like any other write."""

    __slots__ = ("addr", "memory", "pieces")

    def __init__(self, memory: GuestMemory, addr: int, pieces: list[tuple[int, int, int]]) -> None:
        self.memory, self.addr = memory, addr
        self.pieces = pieces                # (offset in the range, guest-physical address, bytes)

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        out = []
        for start, gpa, n in self.pieces:
            lo, hi = max(offset, start), min(offset + length, start + n)
            if lo < hi:
                out.append((lo - offset, gpa + lo - start, hi - lo))
        return out

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.memory.read(gpa, n) for _, gpa, n in self._spans(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        for pos, gpa, n in self._spans(offset, len(data)):
            self.memory.write(gpa, data[pos:pos + n])


def _walk(memory: GuestMemory, sregs: Any, addr: int) -> tuple[int, int, list[int]] | None:
    """Long-mode page walk: (guest-physical address, AND of the entries' flags, the entries' guest-physical
    addresses), or None where an entry on the way is not present."""
    table = sregs.cr3 & ADDR_MASK
    shifts = (48, 39, 30, 21, 12) if sregs.cr4 & CR4_LA57 else (39, 30, 21, 12)
    flags = PTE_RW | PTE_US
    entries = []
    for shift in shifts:
        where = table + ((addr >> shift) & 0x1FF) * 8
        try:
            entry = int.from_bytes(memory.read(where, 8), "little")
        except MemoryAccessError:
            raise GuestAccessError(f"a page table of {addr:#x} is outside guest RAM ({where:#x})") from None
        if not entry & PTE_P:
            return None
        flags &= entry
        entries.append(where)
        if shift == 12 or (shift in (30, 21) and entry & PTE_PS):
            size = 1 << shift
            return (entry & ADDR_MASK & ~(size - 1)) | (addr & (size - 1)), flags, entries
        table = entry & ADDR_MASK
    raise AssertionError("unreachable")


def access(vcpu: Vcpu, memory: GuestMemory, addr: int, length: int, *, write: bool, implicit: bool = False,
           sregs: Any = None, rflags: int | None = None) -> CheckedRange:
    """Check a data access to [addr, addr + length) the way the CPU checks it at the vCPU's CPL, and set the
    accessed (and, for a write, dirty) bits it would set; raises PageFault where the CPU raises #PF. Every
    fallback that writes guest memory goes through this: the host's own writes bypass the guest's protections.

    Intel SDM vol. 3, 4.6: a user access (CPL 3, not `implicit`) needs U/S at every level, and R/W for a write.
    A supervisor access (CPL < 3, or an `implicit` one: the frame an exception delivery pushes, descriptor tables)
    may write a read-only page only while CR0.WP is clear, and may not touch a user page at all with CR4.SMAP set
    unless it is explicit and RFLAGS.AC is set. Protection keys and shadow stacks are not checked. Long mode only
    (the fallbacks decode 64-bit code); with paging off every address is its own physical one."""
    sregs = vcpu.get_sregs() if sregs is None else sregs
    if not sregs.cr0 & CR0_PG:
        return CheckedRange(memory, addr, [(0, addr, length)])
    if not sregs.efer & EFER_LMA:
        raise GuestAccessError("protection checks of guest memory are done in long mode only")
    user = (sregs.cs.selector & 3) == 3 and not implicit
    if rflags is None:
        rflags = vcpu.get_regs().rflags if sregs.cr4 & CR4_SMAP and not user else 0
    smap_blocks = bool(sregs.cr4 & CR4_SMAP) and not user and (implicit or not rflags & RFLAGS_AC)
    error = (PF_WRITE if write else 0) | (PF_USER if user else 0)
    pieces: list[tuple[int, int, int]] = []
    walked: list[tuple[int, list[int]]] = []
    pos, end = addr, addr + length
    while pos < end:
        n = min(end - pos, PAGE - (pos & (PAGE - 1)))
        w = _walk(memory, sregs, pos & 0xFFFF_FFFF_FFFF_FFFF)
        if w is None:
            raise PageFault(pos, error)
        gpa, flags, entries = w
        if user:
            allowed = bool(flags & PTE_US) and (not write or bool(flags & PTE_RW))
        else:
            allowed = not (flags & PTE_US and smap_blocks) and (
                not write or bool(flags & PTE_RW) or not sregs.cr0 & CR0_WP)
        if not allowed:
            raise PageFault(pos, error | PF_PRESENT)
        pieces.append((pos - addr, gpa, n))
        walked.append((gpa, entries))
        pos += n
    for _, entries in walked:               # only once the whole range may be accessed, as the CPU sets them
        for i, where in enumerate(entries):
            bits = PTE_A | (PTE_D if write and i == len(entries) - 1 else 0)
            entry = int.from_bytes(memory.read(where, 8), "little")
            if entry & bits != bits:
                memory.write(where, (entry | bits).to_bytes(8, "little"))
    return CheckedRange(memory, addr, pieces)


def write_checked(vcpu: Vcpu, memory: GuestMemory, addr: int, data: bytes, **kw: Any) -> None:
    """Write `data` at guest-virtual `addr` as an instruction of the vCPU would (see `access`)."""
    access(vcpu, memory, addr, len(data), write=True, **kw).write(0, data)


def read_virt(vcpu: Vcpu, memory: GuestMemory, addr: int, length: int) -> bytes:
    return b"".join(memory.read(gpa, n) for gpa, n in _pieces(vcpu, addr, length))


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
