"""The guest-physical address map (vmfork.arch.x86.layout) and the boot GDT."""

from __future__ import annotations

import itertools

import pytest

from vmfork.arch.x86 import layout
from vmfork.arch.x86.boot import gdt
from vmfork.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def test_pci_hole_constants() -> None:
    assert layout.PCI_HOLE_START == 3 * GiB
    assert layout.HIGH_RAM_START == 4 * GiB


@pytest.mark.parametrize(("size", "expected"), [
    (128 * MiB, [(0, 128 * MiB)]),
    (3 * GiB, [(0, 3 * GiB)]),
    (3 * GiB + 4096, [(0, 3 * GiB), (4 * GiB, 4096)]),
    (5 * GiB, [(0, 3 * GiB), (4 * GiB, 2 * GiB)]),
    (4096, [(0, 4096)]),
])
def test_ram_regions(size: int, expected: list[tuple[int, int]]) -> None:
    assert layout.ram_regions(size) == expected
    assert sum(s for _, s in expected) == size


@pytest.mark.parametrize("size", [0, -4096, 4095, 128 * MiB + 1])
def test_ram_regions_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ConfigError, match="multiple of 4 KiB"):
        layout.ram_regions(size)
    with pytest.raises(ConfigError):
        layout.e820_map(size)


def test_e820_small_machine() -> None:
    assert layout.e820_map(128 * MiB) == [
        (0, 0x9FC00, layout.E820_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, layout.E820_RESERVED),
        (0x100000, 127 * MiB, layout.E820_RAM),
    ]


def test_e820_with_ram_above_4g() -> None:
    assert layout.e820_map(5 * GiB) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x60400, 2),
        (0x100000, 3 * GiB - MiB, 1),
        (4 * GiB, 2 * GiB, 1),
    ]


@pytest.mark.parametrize(("size", "expected"), [
    (256 * 1024, [(0, 256 * 1024, 1)]),
    (0xA0000, [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2)]),
    (MiB, [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2)]),
])
def test_e820_tiny_machines(size: int, expected: list[tuple[int, int, int]]) -> None:
    assert layout.e820_map(size) == expected


@pytest.mark.parametrize("size", [4096, MiB, 2 * MiB, 128 * MiB, 3 * GiB, 3 * GiB + 8192, 4 * GiB, 64 * GiB])
def test_e820_covers_exactly_the_ram(size: int) -> None:
    entries = layout.e820_map(size)
    assert sum(s for _, s, _ in entries) == size
    for (a, s, _), (b, _, _) in itertools.pairwise(entries):
        assert a + s <= b                                   # sorted, no overlap
    for a, s, _ in entries:
        assert s > 0
        assert a + s <= layout.PCI_HOLE_START or a >= layout.HIGH_RAM_START
        assert any(r <= a and a + s <= r + rs for r, rs in layout.ram_regions(size))


def test_low_ram_end() -> None:
    assert layout.low_ram_end(128 * MiB) == 128 * MiB
    assert layout.low_ram_end(8 * GiB) == 3 * GiB


def test_fixed_structures_are_low_and_disjoint() -> None:
    areas = [
        ("gdt", layout.GDT_ADDR, layout.GDT_SIZE),
        ("page tables", layout.PML4_ADDR, layout.PAGE_TABLES_END - layout.PML4_ADDR),
        ("zero page", layout.ZERO_PAGE_ADDR, 4096),
        ("pvh", layout.START_INFO_ADDR, layout.PVH_AREA_END - layout.START_INFO_ADDR),
        ("mbi", layout.MBI_ADDR, layout.MB_AREA_END - layout.MBI_ADDR),
        ("stack", layout.BOOT_STACK_ADDR, layout.BOOT_STACK_TOP - layout.BOOT_STACK_ADDR),
        ("strings", layout.CMDLINE_ADDR, layout.STRINGS_END - layout.CMDLINE_ADDR),
    ]
    areas.sort(key=lambda a: a[1])
    assert areas[0][1] >= 0x500                             # the IVT and BIOS data area stay untouched
    for (_, a, s), (_, b, _) in itertools.pairwise(areas):
        assert a + s <= b
    assert areas[-1][1] + areas[-1][2] <= layout.LOADER_AREA_END <= layout.EBDA_START
    for addr in (layout.PML4_ADDR, layout.PDPT_ADDR, layout.PD_ADDR, layout.ZERO_PAGE_ADDR):
        assert addr % 4096 == 0
    assert layout.PDPT_ADDR == layout.PML4_ADDR + 4096 and layout.PD_ADDR == layout.PDPT_ADDR + 4096
    assert layout.START_INFO_ADDR < layout.PVH_MODLIST_ADDR < layout.PVH_MEMMAP_ADDR < layout.PVH_AREA_END
    assert layout.MBI_ADDR < layout.MB_MODS_ADDR < layout.MB_MMAP_ADDR < layout.MB_AREA_END
    assert layout.BOOT_STACK_TOP % 16 == 0


def test_gdt_descriptors() -> None:
    code32 = gdt.decode_descriptor(gdt.GDT_DESCRIPTORS[layout.GDT_CODE32_SELECTOR])
    code64 = gdt.decode_descriptor(gdt.GDT_DESCRIPTORS[layout.GDT_CODE64_SELECTOR])
    data = gdt.decode_descriptor(gdt.GDT_DESCRIPTORS[layout.GDT_DATA_SELECTOR])
    tss = gdt.decode_descriptor(gdt.GDT_DESCRIPTORS[layout.GDT_TSS_SELECTOR])
    for seg in (code32, code64, data):
        assert (seg.base, seg.limit, seg.present, seg.dpl, seg.s, seg.g) == (0, 0xFFFFFFFF, 1, 0, 1, 1)
    assert (code32.type, code32.db, code32.l) == (0xB, 1, 0)
    assert (code64.type, code64.db, code64.l) == (0xB, 0, 1)
    assert (data.type, data.db, data.l) == (0x3, 1, 0)
    assert (tss.base, tss.limit, tss.type, tss.s, tss.present, tss.g) == (0, 0x67, 0xB, 0, 1, 0)
    assert gdt.GDT_DESCRIPTORS[layout.GDT_CODE64_SELECTOR] == 0x00AF9B000000FFFF
    assert gdt.GDT_DESCRIPTORS[layout.GDT_DATA_SELECTOR] == 0x00CF93000000FFFF


def test_gdt_bytes() -> None:
    table = gdt.gdt_bytes()
    assert len(table) == layout.GDT_SIZE
    assert table[:8] == bytes(8)
    for selector, raw in gdt.GDT_DESCRIPTORS.items():
        assert int.from_bytes(table[selector:selector + 8], "little") == raw
    assert table[layout.GDT_TSS_SELECTOR + 8:layout.GDT_TSS_SELECTOR + 16] == bytes(8)


def test_descriptor_round_trip() -> None:
    raw = gdt.encode_descriptor(0x12345678, 0xABCDE, 0x9A, 0x4)
    seg = gdt.decode_descriptor(raw, 0x28)
    assert (seg.selector, seg.base, seg.limit, seg.type, seg.db, seg.g) == (0x28, 0x12345678, 0xABCDE, 0xA, 1, 0)
    with pytest.raises(ValueError):
        gdt.encode_descriptor(1 << 32, 0, 0, 0)
