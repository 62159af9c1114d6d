"""Guest memory as the guest sees it: physical access, virtual access through the guest's own page tables, the
walk of a translation, and hexdumps.

Paging modes, chosen from a vCPU's control registers exactly as the CPU does:

| CR0.PG | CR4.PAE | EFER.LMA | CR4.LA57 | mode      | levels                     | pages            |
|--------|---------|----------|----------|-----------|----------------------------|------------------|
| 0      |         |          |          | none      | linear = physical          |                  |
| 1      | 0       |          |          | 32-bit    | PD, PT (4-byte entries)    | 4 KiB, 4 MiB (PSE) |
| 1      | 1       | 0        |          | pae       | PDPT (4 entries), PD, PT   | 4 KiB, 2 MiB     |
| 1      | 1       | 1        | 0        | 4-level   | PML4, PDPT, PD, PT         | 4 KiB, 2 MiB, 1 GiB |
| 1      | 1       | 1        | 1        | 5-level   | PML5, PML4, PDPT, PD, PT   | 4 KiB, 2 MiB, 1 GiB |

A "virtual" address here is a linear address (segment bases are not added; they are 0 in 64-bit code except FS and
GS, which the caller adds). Protection keys, reserved-bit checks and the access/dirty bits are reported, not
enforced: a walk succeeds whenever every entry on the way is present.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MemoryAccessError
from ..kvm import structs as s
from .errors import NonCanonicalAddress, UnmappedAddress
from .target import Target, as_target

__all__ = ["AddressSpace", "PagingMode", "Translation", "WalkLevel", "find_virtual", "hexdump", "paging_mode",
           "read_phys", "read_virt", "translate", "write_phys", "write_virt"]

PAGE_SIZE = 4096
PTE_P, PTE_RW, PTE_US, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS, PTE_G = (1 << i for i in range(9))
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

_FLAG_NAMES = ((PTE_P, "P"), (PTE_RW, "RW"), (PTE_US, "US"), (PTE_PWT, "PWT"), (PTE_PCD, "PCD"), (PTE_A, "A"),
               (PTE_D, "D"), (PTE_G, "G"), (PTE_NX, "NX"))


def _size_text(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


@dataclass(frozen=True, slots=True)
class WalkLevel:
    """One entry read during a walk."""

    name: str           # PML5, PML4, PDPT, PD, PT
    table: int          # guest-physical address of the table
    index: int
    entry_addr: int     # guest-physical address of the entry
    entry: int
    entry_size: int     # 8, or 4 in 32-bit paging
    page_size: int = 0  # size of the page this entry maps, 0 if it points to a table (or is not present)

    @property
    def present(self) -> bool:
        return bool(self.entry & PTE_P)

    @property
    def flags(self) -> str:
        names = [n for bit, n in _FLAG_NAMES if self.entry & bit]
        if self.page_size and self.name != "PT":
            names.append("PS")
        return " ".join(names) if names else "-"

    def describe(self) -> str:
        width = self.entry_size * 2
        text = (f"{self.name}[{self.index}]".ljust(10) + f" table {self.table:#x}".ljust(20)
                + f" entry {self.entry:0{width}x}  {self.flags}")
        if not self.present:
            return text + "  (not present)"
        if self.page_size:
            return text + f"  -> {_size_text(self.page_size)} page"
        return text


@dataclass(frozen=True, slots=True)
class PagingMode:
    """A vCPU's paging configuration (from CR0, CR3, CR4 and EFER)."""

    name: str           # none, 32-bit, pae, 4-level, 5-level
    root: int           # CR3
    nxe: bool = False
    pse: bool = False
    wp: bool = False

    @property
    def address_bits(self) -> int:
        return {"5-level": 57, "4-level": 48}.get(self.name, 32)

    @property
    def long(self) -> bool:
        return self.name in ("4-level", "5-level")


def paging_mode(sregs: s.Sregs, cr3: int | None = None) -> PagingMode:
    root = sregs.cr3 if cr3 is None else cr3
    nxe = bool(sregs.efer & EFER_NXE)
    wp = bool(sregs.cr0 & CR0_WP)
    if not sregs.cr0 & CR0_PG:
        return PagingMode("none", root)
    if not sregs.cr4 & CR4_PAE:
        return PagingMode("32-bit", root, False, bool(sregs.cr4 & CR4_PSE), wp)
    if not sregs.efer & EFER_LMA:
        return PagingMode("pae", root, nxe, True, wp)
    return PagingMode("5-level" if sregs.cr4 & CR4_LA57 else "4-level", root, nxe, True, wp)


@dataclass(frozen=True, slots=True)
class Translation:
    """Where a virtual address leads, and how: each level's table, entry and flags."""

    vaddr: int
    paddr: int
    page_size: int
    mode: str
    root: int
    levels: tuple[WalkLevel, ...]
    writable: bool
    user: bool
    executable: bool

    @property
    def page_base(self) -> int:
        """Guest-physical address of the (possibly large) page."""
        return self.paddr - (self.vaddr & (self.page_size - 1))

    def describe(self) -> str:
        head = f"virtual {self.vaddr:#x}: {self.mode} paging, CR3 {self.root:#x}"
        if self.mode == "none":
            return f"virtual {self.vaddr:#x}: paging is off, physical {self.paddr:#x}"
        lines = [head] + ["  " + lv.describe() for lv in self.levels]
        access = ", ".join([
            "writable" if self.writable else "read-only",
            "user" if self.user else "supervisor-only",
            "executable" if self.executable else "not executable"])
        lines.append(f"  physical {self.paddr:#x} (in the {_size_text(self.page_size)} page at {self.page_base:#x};"
                     f" {access})")
        return "\n".join(lines)


_LONG_LEVELS = (("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))


class AddressSpace:
    """The virtual address space of one vCPU (or of an explicit CR3 in that vCPU's paging mode).

    The paging mode and root are read once, when the object is made; translations are cached per 4 KiB page for the
    object's lifetime, so make a new one after the guest may have changed its page tables."""

    def __init__(self, target: Target | object, vcpu: int = 0, *, cr3: int | None = None,
                 sregs: s.Sregs | None = None, cache: bool = True) -> None:
        self.target: Target = as_target(target)
        self.vcpu = vcpu
        self.sregs = self.target.get_sregs(vcpu) if sregs is None else sregs
        self.mode = paging_mode(self.sregs, cr3)
        self._cache: dict[int, Translation] | None = {} if cache else None
        self._fast: dict[int, tuple[int, int]] | None = {} if cache else None
        self._top = (1 << (65 - self.mode.address_bits)) - 1
        self._sign_bit = self.mode.address_bits - 1

    # --- translation --------------------------------------------------------------------------------------------

    def _entry(self, level: str, table: int, index: int, size: int, vaddr: int,
               walk: list[WalkLevel]) -> int:
        addr = table + index * size
        try:
            raw = self.target.read_phys(addr, size)
        except MemoryAccessError:
            raise UnmappedAddress(
                f"virtual address {vaddr:#x} is not mapped: its {level} table at {table:#x} is outside guest RAM",
                vaddr, level, tuple(walk)) from None
        return int.from_bytes(raw, "little")

    def translate(self, vaddr: int) -> Translation:
        if vaddr < 0 or vaddr >= 1 << 64:
            raise NonCanonicalAddress(f"{vaddr:#x} is not a 64-bit address", vaddr, "canonical")
        cache = self._cache
        if cache is not None:
            hit = cache.get(vaddr >> 12)
            if hit is not None:
                off = vaddr & (hit.page_size - 1)
                return Translation(vaddr, hit.page_base + off, hit.page_size, hit.mode, hit.root, hit.levels,
                                   hit.writable, hit.user, hit.executable)
        t = self._walk(vaddr)
        if cache is not None:
            cache[vaddr >> 12] = t
        return t

    def _walk_8byte(self, vaddr: int, table: int, levels: tuple[tuple[str, int], ...],
                    walk: list[WalkLevel]) -> Translation:
        """The levels with 8-byte entries (long mode, and PAE below its PDPT, whose entries carry no RW/US/NX);
        a PDPT or PD entry with PS set maps a large page."""
        m = self.mode
        writable = user = True
        nx = False
        for name, shift in levels:
            index = (vaddr >> shift) & 0x1FF
            entry = self._entry(name, table, index, 8, vaddr, walk)
            large = name in ("PDPT", "PD") and bool(entry & PTE_PS)
            page_size = (1 << shift) if (name == "PT" or large) and entry & PTE_P else 0
            walk.append(WalkLevel(name, table, index, table + index * 8, entry, 8, page_size))
            if not entry & PTE_P:
                raise self._not_present(vaddr, walk)
            writable &= bool(entry & PTE_RW)
            user &= bool(entry & PTE_US)
            nx |= bool(entry & PTE_NX) and m.nxe
            if page_size:
                base = entry & ADDR_MASK & ~(page_size - 1)
                return Translation(vaddr, base | (vaddr & (page_size - 1)), page_size, m.name, m.root,
                                   tuple(walk), writable, user, not nx)
            table = entry & ADDR_MASK
        raise AssertionError("unreachable")

    def _walk(self, vaddr: int) -> Translation:
        m = self.mode
        if m.name == "none":
            if vaddr >= 1 << 32:
                raise NonCanonicalAddress(f"{vaddr:#x} is beyond 4 GiB with paging off", vaddr, "canonical")
            return Translation(vaddr, vaddr, PAGE_SIZE, "none", m.root, (), True, True, True)
        walk: list[WalkLevel] = []
        writable = user = True
        if m.long:
            bits = m.address_bits
            top = vaddr >> (bits - 1)
            if top not in (0, (1 << (65 - bits)) - 1):
                raise NonCanonicalAddress(
                    f"virtual address {vaddr:#x} is not canonical for {m.name} paging (bits 63..{bits - 1} must "
                    f"all equal bit {bits - 1})", vaddr, "canonical")
            levels = _LONG_LEVELS if m.name == "5-level" else _LONG_LEVELS[1:]
            return self._walk_8byte(vaddr, m.root & ADDR_MASK, levels, walk)
        if vaddr >= 1 << 32:
            raise NonCanonicalAddress(f"virtual address {vaddr:#x} is beyond 4 GiB in {m.name} paging", vaddr,
                                      "canonical")
        if m.name == "pae":
            table = m.root & 0xFFFFFFE0
            index = vaddr >> 30
            entry = self._entry("PDPT", table, index, 8, vaddr, walk)
            walk.append(WalkLevel("PDPT", table, index, table + index * 8, entry, 8))
            if not entry & PTE_P:
                raise self._not_present(vaddr, walk)
            return self._walk_8byte(vaddr, entry & ADDR_MASK, (("PD", 21), ("PT", 12)), walk)
        # 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE (PSE-36: bits 13..20 are physical bits 32..39)
        table = m.root & 0xFFFFF000
        index = vaddr >> 22
        entry = self._entry("PD", table, index, 4, vaddr, walk)
        large = m.pse and bool(entry & PTE_PS)
        walk.append(WalkLevel("PD", table, index, table + index * 4, entry, 4, 4 * MiB if large and entry & 1 else 0))
        if not entry & PTE_P:
            raise self._not_present(vaddr, walk)
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        if large:
            base = (entry & 0xFFC00000) | ((entry >> 13) & 0xFF) << 32
            return Translation(vaddr, base | (vaddr & (4 * MiB - 1)), 4 * MiB, m.name, m.root, tuple(walk),
                               writable, user, True)
        table = entry & 0xFFFFF000
        index = (vaddr >> 12) & 0x3FF
        entry = self._entry("PT", table, index, 4, vaddr, walk)
        walk.append(WalkLevel("PT", table, index, table + index * 4, entry, 4, PAGE_SIZE if entry & 1 else 0))
        if not entry & PTE_P:
            raise self._not_present(vaddr, walk)
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        return Translation(vaddr, (entry & 0xFFFFF000) | (vaddr & 0xFFF), PAGE_SIZE, m.name, m.root, tuple(walk),
                           writable, user, True)

    def _not_present(self, vaddr: int, walk: list[WalkLevel]) -> UnmappedAddress:
        last = walk[-1]
        return UnmappedAddress(
            f"virtual address {vaddr:#x} is not mapped: {last.name}[{last.index}] (entry {last.entry:#x} at "
            f"{last.entry_addr:#x}, table {last.table:#x}) is not present ({self.mode.name} paging, CR3 "
            f"{self.mode.root:#x})", vaddr, last.name, tuple(walk))

    # --- access -------------------------------------------------------------------------------------------------

    def resolve(self, vaddr: int) -> tuple[int, int]:
        """(guest-physical address, bytes left in its page) for `vaddr`: translate() without the walk's record,
        cached per 4 KiB page (the hot path of virtual reads and of the breakpoint handler)."""
        cache = self._fast
        base = cache.get(vaddr >> 12) if cache is not None else None
        if base is None:
            m = self.mode
            if m.long and 0 <= vaddr < 1 << 64 and (vaddr >> self._sign_bit) in (0, self._top):
                base = self._walk_fast(vaddr)
            if base is None:
                t = self._walk(vaddr)
                base = (t.paddr & ~0xFFF, min(t.page_size, 4096))
            if cache is not None:
                cache[vaddr >> 12] = base
        off = vaddr & 0xFFF
        return base[0] | off, base[1] - off

    def _walk_fast(self, vaddr: int) -> tuple[int, int] | None:
        """A long-mode walk with plain integers; None when anything is unusual (the full walk then explains)."""
        read = self.target.read_phys
        table = self.mode.root & ADDR_MASK
        shifts = (48, 39, 30, 21, 12) if self.mode.name == "5-level" else (39, 30, 21, 12)
        for shift in shifts:
            try:
                entry = int.from_bytes(read(table + ((vaddr >> shift) & 0x1FF) * 8, 8), "little")
            except MemoryAccessError:
                return None
            if not entry & PTE_P:
                return None
            if shift == 12 or (shift in (30, 21) and entry & PTE_PS):
                size = 1 << shift
                gpa = (entry & ADDR_MASK & ~(size - 1)) | (vaddr & (size - 1) & ~0xFFF)
                return gpa, 4096
            table = entry & ADDR_MASK
        return None

    def _pieces(self, vaddr: int, length: int) -> Iterable[tuple[int, int]]:
        """(guest-physical address, length) pieces of a virtual range, one per page it touches."""
        if length < 0:
            raise ValueError(f"negative length {length}")
        limit = 1 << (64 if self.mode.long else 32)
        if vaddr < 0 or vaddr + length > limit:
            raise NonCanonicalAddress(f"virtual range {vaddr:#x}+{length:#x} runs past the end of the address space",
                                      vaddr, "canonical")
        pos, end = vaddr, vaddr + length
        while pos < end:
            gpa, left = self.resolve(pos)
            n = min(end - pos, left)
            yield gpa, n
            pos += n

    def read(self, vaddr: int, length: int) -> bytes:
        if 0 < length <= 4096 - (vaddr & 0xFFF):        # one page: the common case
            gpa, _ = self.resolve(vaddr)
            return self.target.read_phys(gpa, length)
        pieces = list(self._pieces(vaddr, length))
        return b"".join(self.target.read_phys(gpa, n) for gpa, n in pieces)

    def write(self, vaddr: int, data: bytes) -> None:
        """Translate the whole range first, so a write to a partly unmapped range changes nothing."""
        pieces = list(self._pieces(vaddr, len(data)))
        pos = 0
        for gpa, n in pieces:
            self.target.write_phys(gpa, data[pos:pos + n])
            pos += n

    def read_u64(self, vaddr: int) -> int:
        return int.from_bytes(self.read(vaddr, 8), "little")

    def write_u64(self, vaddr: int, value: int) -> None:
        self.write(vaddr, (value & ((1 << 64) - 1)).to_bytes(8, "little"))


# --- functions --------------------------------------------------------------------------------------------------


def read_phys(target: Target | object, gpa: int, length: int) -> bytes:
    return as_target(target).read_phys(gpa, length)


def write_phys(target: Target | object, gpa: int, data: bytes) -> None:
    as_target(target).write_phys(gpa, bytes(data))


def translate(target: Target | object, vaddr: int, *, vcpu: int = 0, cr3: int | None = None) -> Translation:
    """Walk the guest's page tables (of vCPU `vcpu`, or of `cr3` in that vCPU's paging mode) for `vaddr`."""
    return AddressSpace(target, vcpu, cr3=cr3, cache=False).translate(vaddr)


def read_virt(target: Target | object, vaddr: int, length: int, *, vcpu: int = 0, cr3: int | None = None) -> bytes:
    return AddressSpace(target, vcpu, cr3=cr3).read(vaddr, length)


def write_virt(target: Target | object, vaddr: int, data: bytes, *, vcpu: int = 0, cr3: int | None = None) -> None:
    AddressSpace(target, vcpu, cr3=cr3).write(vaddr, bytes(data))


def find_virtual(space: AddressSpace, gpa: int, *, supervisor_exec: bool = False, limit: int = 4096,
                 prefer_high: bool = True) -> list[int]:
    """Virtual addresses that map guest-physical `gpa` in a long-mode address space (at most `limit` tables read).

    `supervisor_exec`: only mappings kernel code can execute (no NX on the way, when EFER.NXE is on).
    `prefer_high`: search the upper half (where kernels live) before the lower half."""
    m = space.mode
    if m.name == "none":
        return [gpa] if gpa < 1 << 32 else []
    if not m.long:
        raise MemoryAccessError(f"reverse lookup is implemented for 4- and 5-level paging, not {m.name} paging")
    target = space.target
    budget = [limit]
    found: list[int] = []
    levels = _LONG_LEVELS if m.name == "5-level" else _LONG_LEVELS[1:]
    bits = m.address_bits
    page = gpa & ~0xFFF

    def canon(va: int) -> int:
        return va | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if va >> (bits - 1) & 1 else va

    def scan(table: int, depth: int, base: int) -> None:
        if budget[0] <= 0 or found:
            return
        budget[0] -= 1
        try:
            entries = np.frombuffer(target.read_phys(table, PAGE_SIZE), "<u8")
        except MemoryAccessError:
            return
        name, shift = levels[depth]
        present = np.flatnonzero(entries & np.uint64(1))
        if supervisor_exec and m.nxe:
            present = present[(entries[present] >> np.uint64(63)) == 0]
        order = present.tolist()
        if depth == 0 and prefer_high:
            half = 1 << (bits - 1 - shift)
            order = [i for i in order if i >= half] + [i for i in order if i < half]
        for i in order:
            e = int(entries[i])
            va = base | (i << shift)
            leaf = name == "PT" or (name in ("PDPT", "PD") and e & PTE_PS)
            if leaf:
                size = 1 << shift
                frame = e & ADDR_MASK & ~(size - 1)
                if frame <= page < frame + size:
                    found.append(canon(va | (page - frame) | (gpa & 0xFFF)))
                    return
            else:
                scan(e & ADDR_MASK, depth + 1, va)
                if found or budget[0] <= 0:
                    return

    scan(m.root & ADDR_MASK, 0, 0)
    return found


# --- hexdump ----------------------------------------------------------------------------------------------------

_PRINTABLE = frozenset(string.ascii_letters + string.digits + string.punctuation + " ")


def _ascii(chunk: bytes) -> str:
    return "".join(chr(b) if chr(b) in _PRINTABLE else "." for b in chunk)


def hexdump_line(address: int, chunk: bytes, width: int = 16) -> str:
    cells = [f"{b:02x}" for b in chunk] + ["  "] * (width - len(chunk))
    half = width // 2
    return f"{address:016x}  {' '.join(cells[:half])}  {' '.join(cells[half:])}  |{_ascii(chunk)}|"


def hexdump(data: bytes, address: int = 0, width: int = 16) -> list[str]:
    """Classic hexdump lines: address, 16 bytes in two groups, the printable characters."""
    return [hexdump_line(address + i, data[i:i + width], width) for i in range(0, len(data), width)]


def ranges_text(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{a:#x}..{a + n:#x}" for a, n in ranges)
