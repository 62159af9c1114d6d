"""A loader first plans every write into guest RAM, checking that each piece lies in RAM and overlaps no other piece;
only a complete, consistent plan is written (so a failed load leaves RAM untouched)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ....errors import BootError
from .. import layout
from ..acpi import AcpiTables
from . import elf, gdt
from .entry import GuestRam

_ZERO_CHUNK = 1 << 20


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BootError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from e


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def span(start: int, size: int) -> str:
    return f"[{start:#x}, {start + size:#x})"


@dataclass(frozen=True, slots=True)
class Claim:
    start: int
    end: int
    what: str


class LoadPlan:
    """The pieces a loader puts into guest RAM. Error messages start with the kernel image's path."""

    def __init__(self, image: str, ram_size: int, acpi: AcpiTables | None = None) -> None:
        self.image = image
        self.acpi = acpi                # put by put_common, at its fixed address
        self.ram_size = ram_size
        self.regions = layout.ram_regions(ram_size)
        self.claims: list[Claim] = []
        self._writes: list[tuple[int, bytes | bytearray | memoryview]] = []
        self._zeros: list[tuple[int, int]] = []

    def error(self, message: str) -> BootError:
        return BootError(f"{self.image}: {message}")

    def describe_ram(self) -> str:
        return " and ".join(span(start, size) for start, size in self.regions) + f" ({self.ram_size >> 20} MiB)"

    def in_ram(self, start: int, size: int) -> bool:
        return any(rs <= start and start + size <= rs + rsize for rs, rsize in self.regions)

    def overlapping(self, start: int, size: int) -> Claim | None:
        end = start + size
        for c in self.claims:
            if start < c.end and c.start < end:
                return c
        return None

    def claim(self, start: int, size: int, what: str) -> None:
        """Reserve [start, start+size) for `what`; it must be RAM and not yet claimed."""
        if size <= 0:
            return
        if start < 0 or not self.in_ram(start, size):
            raise self.error(f"{what} at {span(start, size)} does not fit in guest RAM {self.describe_ram()}")
        other = self.overlapping(start, size)
        if other is not None:
            raise self.error(f"{what} at {span(start, size)} overlaps {other.what} at "
                             f"{span(other.start, other.end - other.start)}")
        self.claims.append(Claim(start, start + size, what))

    def put(self, gpa: int, data: bytes | bytearray | memoryview, what: str, *, size: int | None = None) -> None:
        """Claim `size` bytes (default len(data)) at gpa for `what`: `data` followed by zeros."""
        total = len(data) if size is None else size
        if total < len(data):
            raise ValueError(f"{what}: size {total:#x} smaller than its data {len(data):#x}")
        self.claim(gpa, total, what)
        if len(data):
            self._writes.append((gpa, data))
        if total > len(data):
            self._zeros.append((gpa + len(data), total - len(data)))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write into an area claimed before."""
        end = gpa + len(data)
        if not any(c.start <= gpa and end <= c.end for c in self.claims):
            raise AssertionError(f"write to {span(gpa, len(data))} outside every claimed area")
        self._writes.append((gpa, data))

    def place_high(self, size: int, *, floor: int, ceiling: int, align: int = layout.PAGE_SIZE) -> int | None:
        """The highest `align`ed address a with floor <= a and a + size <= ceiling that is free RAM."""
        for rstart, rsize in sorted(self.regions, reverse=True):
            low, top = max(floor, rstart), min(ceiling, rstart + rsize)
            addr = align_down(top - size, align)
            while addr >= low:
                other = self.overlapping(addr, size)
                if other is None:
                    return addr
                addr = align_down(other.start - size, align)
        return None

    def place_low(self, size: int, *, floor: int, align: int = layout.PAGE_SIZE) -> int | None:
        """The lowest `align`ed free RAM address at or above `floor` with room for `size` bytes."""
        for rstart, rsize in sorted(self.regions):
            addr = align_up(max(floor, rstart), align)
            while addr + size <= rstart + rsize:
                other = self.overlapping(addr, size)
                if other is None:
                    return addr
                addr = align_up(other.end, align)
        return None

    def put_common(self, cmdline: bytes, strings: tuple[bytes, ...] = ()) -> list[int]:
        """Claim and write what every protocol has: the GDT, the boot stack, the NUL-terminated command line at
        layout.CMDLINE_ADDR and after it `strings` (each NUL-terminated), and the ACPI tables if the plan has them.
        Returns the addresses of `strings`."""
        self.put(layout.GDT_ADDR, gdt.gdt_bytes(), "the loader's GDT")
        self.put(layout.BOOT_STACK_ADDR, b"", "the loader's boot stack",
                 size=layout.BOOT_STACK_TOP - layout.BOOT_STACK_ADDR)
        if b"\0" in cmdline:
            raise self.error("the command line contains a NUL character")
        blob = bytearray(cmdline + b"\0")
        if len(blob) > layout.CMDLINE_MAX:
            raise self.error(f"the command line is {len(cmdline)} bytes, more than the {layout.CMDLINE_MAX - 1} "
                             "vmfork supports")
        addrs = []
        for s in strings:
            addrs.append(layout.CMDLINE_ADDR + len(blob))
            blob += s + b"\0"
        if layout.CMDLINE_ADDR + len(blob) > layout.STRINGS_END:
            raise self.error(f"the command line and boot strings need {len(blob)} bytes, more than the "
                             f"{layout.CMDLINE_MAX} vmfork has room for")
        self.put(layout.CMDLINE_ADDR, bytes(blob), "the loader's command line and strings")
        if self.acpi is not None:
            self.put(self.acpi.base, self.acpi.blob, "the ACPI tables")
        return addrs

    @property
    def rsdp(self) -> int:
        """The ACPI RSDP's address, 0 without ACPI tables."""
        return 0 if self.acpi is None else self.acpi.rsdp

    def commit(self, ram: GuestRam) -> None:
        for gpa, size in self._zeros:
            zeros = memoryview(bytes(min(size, _ZERO_CHUNK)))
            for off in range(0, size, _ZERO_CHUNK):
                ram.write(gpa + off, zeros[:min(_ZERO_CHUNK, size - off)])
        for gpa, data in self._writes:
            ram.write(gpa, data)


def load_segments(plan: LoadPlan, data: bytes, image: elf.ElfImage) -> None:
    """Put every PT_LOAD segment at its physical address, with its bss zeroed; all must lie below 4 GiB."""
    if not image.segments:
        raise plan.error("the ELF file has no loadable (PT_LOAD) segments")
    view = memoryview(data)
    for seg in image.segments:
        if seg.paddr + seg.memsz > 1 << 32:
            raise plan.error(f"ELF segment {seg.index} at {span(seg.paddr, seg.memsz)} is not below 4 GiB")
        plan.put(seg.paddr, view[seg.offset:seg.offset + seg.filesz], f"ELF segment {seg.index}", size=seg.memsz)
