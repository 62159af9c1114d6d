"""The boot GDT every loader writes at layout.GDT_ADDR, and segment descriptor encoding/decoding.

The machine loads the hidden parts of the segment registers itself (KVM_SET_SREGS); `GDT_DESCRIPTORS` and
`decode_descriptor` give it the same values the guest would load from the GDT in RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout

# access byte: P (0x80) | DPL | S (0x10, code/data) | type
ACCESS_CODE = 0x9B          # present, DPL 0, code, execute/read, accessed
ACCESS_DATA = 0x93          # present, DPL 0, data, read/write, accessed
ACCESS_TSS_BUSY = 0x8B      # present, DPL 0, system, busy 32/64-bit TSS
# flags nibble: G (8) | D/B (4) | L (2) | AVL (1)
FLAGS_32 = 0xC              # 4 KiB granularity, 32-bit
FLAGS_64 = 0xA              # 4 KiB granularity, long mode code
TSS_LIMIT = 0x67


def encode_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor; `limit` is the raw 20-bit field (in pages when flags has G)."""
    if not 0 <= base <= 0xFFFFFFFF or not 0 <= limit <= 0xFFFFF:
        raise ValueError(f"descriptor base {base:#x} or limit {limit:#x} out of range")
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | (access & 0xFF) << 40 | (limit >> 16) << 48
            | (flags & 0xF) << 52 | (base >> 24) << 56)


@dataclass(frozen=True, slots=True)
class SegmentDescriptor:
    """A decoded descriptor, with the fields of KVM's struct kvm_segment (limit in bytes, already scaled by G)."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int              # the long-mode (64-bit code) bit
    g: int
    avl: int


def decode_descriptor(raw: int, selector: int = 0) -> SegmentDescriptor:
    """Decode an 8-byte descriptor (the low half for 16-byte system descriptors)."""
    base = (raw >> 16) & 0xFFFFFF | ((raw >> 56) & 0xFF) << 24
    limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    g = flags >> 3 & 1
    return SegmentDescriptor(
        selector=selector, base=base, limit=(limit << 12 | 0xFFF) if g else limit, type=access & 0xF,
        present=access >> 7 & 1, dpl=access >> 5 & 3, db=flags >> 2 & 1, s=access >> 4 & 1, l=flags >> 1 & 1, g=g,
        avl=flags & 1)


GDT_DESCRIPTORS: dict[int, int] = {
    layout.GDT_CODE32_SELECTOR: encode_descriptor(0, 0xFFFFF, ACCESS_CODE, FLAGS_32),
    layout.GDT_CODE64_SELECTOR: encode_descriptor(0, 0xFFFFF, ACCESS_CODE, FLAGS_64),
    layout.GDT_DATA_SELECTOR: encode_descriptor(0, 0xFFFFF, ACCESS_DATA, FLAGS_32),
    layout.GDT_TSS_SELECTOR: encode_descriptor(0, TSS_LIMIT, ACCESS_TSS_BUSY, 0),
}
"""Selector -> raw descriptor of the boot GDT (the TSS's upper 8 bytes, at selector 0x28, are zero)."""


def gdt_bytes() -> bytes:
    """The boot GDT as written to guest RAM (layout.GDT_SIZE bytes)."""
    table = bytearray(layout.GDT_SIZE)
    for selector, raw in GDT_DESCRIPTORS.items():
        struct.pack_into("<Q", table, selector, raw)
    return bytes(table)
