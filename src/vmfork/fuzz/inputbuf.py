"""Where each input goes: the target's input buffer, a guest-VIRTUAL address (as in KF/x), written page by page.

The buffer address a target hands over (RDI at the start marker, or `--input-addr`) is a virtual address of the
code that hit the marker: a Linux kernel passes a direct-map pointer (0xffff888000000000 + physical), a vmalloc'ed
buffer spans pages that are not contiguous in physical memory. So the buffer is translated through the page tables
of the vCPU that hit the marker, page by page, once: every fuzz fork starts from that same fork point (its reset
puts the page tables back), so the list of (guest-physical address, length) pieces stays valid for as long as the
fuzzer lives. An input is then one `memory.write` per piece (one for a buffer inside one page), the same cost as a
physical write. `phys:ADDR` names a guest-physical buffer (no translation), the meaning `--input-addr` used to have.

Formats of an input in the buffer:

    raw     the input's bytes at the buffer's start, nothing else (KF/x: up to --input-limit bytes); the rest of the
            buffer keeps what the fork point had. The target knows the size from its own harness (RSI).
    len64   a little-endian u64 length, then the bytes (vmfork's test guests' convention)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import VmforkError
from ..vmi import as_target
from ..vmi.memory import AddressSpace
from .errors import FuzzError

__all__ = ["FORMATS", "InputBuffer", "parse_input_addr"]

FORMATS = ("raw", "len64")
LEN64_PREFIX = 8


def parse_input_addr(text: str) -> tuple[int, bool]:
    """`--input-addr`: "ADDR" (virtual) or "phys:ADDR" -> (address, physical?). ValueError names the problem."""
    physical = text.startswith("phys:")
    number = text[5:] if physical else text
    try:
        value = int(number, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an address (ADDR or phys:ADDR)") from None
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{text!r} is not a 64-bit address")
    return value, physical


@dataclass(frozen=True, slots=True)
class InputBuffer:
    """The input buffer of one fork point: `address` (virtual, unless `physical`), `size` bytes, its `pieces`
    (guest-physical address, length) in order, the CR3 they were translated under, and the input `format`."""

    address: int
    size: int
    pieces: tuple[tuple[int, int], ...]
    cr3: int
    format: str
    physical: bool = False

    @classmethod
    def at(cls, vm: Any, address: int, size: int, *, format: str = "raw", physical: bool = False,
           vcpu: int = 0) -> InputBuffer:
        """Translate the buffer through vCPU `vcpu`'s page tables (paused `vm`). FuzzError, naming the first
        address that does not translate, when a page of it is not mapped (or outside guest RAM)."""
        if format not in FORMATS:
            raise FuzzError(f"input format must be one of {', '.join(FORMATS)}, not {format!r}")
        if size <= 0:
            raise FuzzError(f"an input buffer of {size} bytes has no room for input")
        space = AddressSpace(vm, vcpu)
        cr3 = int(space.sregs.cr3)
        if physical:
            pieces: tuple[tuple[int, int], ...] = ((address, size),)
            _check_ram(vm, address, size)
        else:
            pieces = _translate(space, address, size)
            for gpa, n in pieces:
                _check_ram(vm, gpa, n, virtual=address)
        return cls(address, size, _merge(pieces), cr3, format, physical)

    @property
    def prefix(self) -> int:
        return LEN64_PREFIX if self.format == "len64" else 0

    @property
    def capacity(self) -> int:
        """The longest input that fits (the buffer less the length prefix)."""
        return self.size - self.prefix

    def describe(self) -> str:
        where = f"guest-physical {self.address:#x}" if self.physical else f"{self.address:#x}"
        spread = "" if len(self.pieces) == 1 else f" in {len(self.pieces)} physical pieces"
        return f"{where} ({self.size} bytes){spread}, {self.format} inputs"

    def writer(self, memory: Any) -> Any:
        """A function writing one input (at most `capacity` bytes) into `memory` (a fork's GuestMemory): the
        per-input hot path, with everything that can be decided once decided here."""
        write = memory.write
        pieces = self.pieces
        if self.format == "len64":
            pack = struct.Struct("<Q").pack

            def write_len64(data: bytes) -> None:
                _scatter(write, pieces, pack(len(data)) + data)
            return write_len64
        if len(pieces) == 1:
            gpa = pieces[0][0]

            def write_one(data: bytes) -> None:
                write(gpa, data)
            return write_one

        def write_raw(data: bytes) -> None:
            _scatter(write, pieces, data)
        return write_raw


def _scatter(write: Any, pieces: tuple[tuple[int, int], ...], data: bytes) -> None:
    view = memoryview(data)
    pos, end = 0, len(data)
    for gpa, n in pieces:
        if pos >= end:
            return
        write(gpa, view[pos:pos + n])
        pos += n


def _translate(space: AddressSpace, address: int, size: int) -> tuple[tuple[int, int], ...]:
    pieces: list[tuple[int, int]] = []
    pos, end = address, address + size
    while pos < end:
        try:
            gpa, left = space.resolve(pos)
        except VmforkError as e:
            at = f" (byte {pos - address:#x} of the buffer)" if pos != address else ""
            raise FuzzError(f"input buffer {address:#x}: the page at {pos & ~0xFFF:#x}{at} does not translate "
                            f"in the page tables of the vCPU at the start marker (CR3 {space.sregs.cr3:#x}): "
                            f"{e}; give the address as phys:ADDR if it is guest-physical") from None
        n = min(end - pos, left)
        pieces.append((gpa, n))
        pos += n
    return tuple(pieces)


def _merge(pieces: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Neighbouring pieces that are contiguous in physical memory too become one (one write instead of several)."""
    out: list[tuple[int, int]] = []
    for gpa, n in pieces:
        if out and out[-1][0] + out[-1][1] == gpa:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((gpa, n))
    return tuple(out)


def _check_ram(vm: Any, gpa: int, size: int, *, virtual: int | None = None) -> None:
    """The piece lies inside guest RAM (a page table may well point outside it)."""
    end = gpa + size
    for start, length in as_target(vm).ram_ranges():
        if start <= gpa and end <= start + length:
            return
    what = f"input buffer {virtual:#x} maps to guest-physical {gpa:#x}" if virtual is not None else \
        f"guest-physical input buffer {gpa:#x}"
    raise FuzzError(f"{what}+{size:#x}, which is outside guest RAM")
