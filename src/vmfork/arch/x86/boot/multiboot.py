"""Multiboot (version 0.6.96) kernels: an ELF (PT_LOAD segments at their physical addresses) or, with header flag
bit 16, any image loaded by the header's a.out-kludge address fields. Entered in 32-bit protected mode, paging off,
with EAX = 0x2BADB002 and EBX = the multiboot_info structure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ....errors import BootError
from .. import layout
from ..acpi import AcpiTables
from . import elf
from .entry import EntryState, GuestRam, protected32_entry
from .plan import LoadPlan, align_up, load_segments, span

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192             # the header lies, 4-byte aligned, entirely within the first 8 KiB

# header flags: bits 0-15 are requirements a loader must meet or refuse the kernel
HF_PAGE_ALIGN = 1 << 0          # modules page aligned (vmfork always does)
HF_MEMORY_INFO = 1 << 1         # mem_* and mmap_* fields (always given)
HF_VIDEO_MODE = 1 << 2          # a video mode table: accepted, but no graphics mode is set and no vbe/fb info given
HF_AOUT_KLUDGE = 1 << 16        # load by the header's address fields instead of the ELF headers
HF_SUPPORTED_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# multiboot_info flags
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

MBI_SIZE = 116                  # up to and including the framebuffer fields
MODULE = struct.Struct("<IIII")           # mod_start, mod_end (exclusive), string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")       # size (20, not counting itself), base_addr, length, type
LOADER_NAME = b"vmfork"


@dataclass(frozen=True, slots=True)
class MultibootHeader:
    offset: int                 # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(data: bytes, path: str) -> MultibootHeader | None:
    """The first valid Multiboot header in the first 8 KiB, or None; raises on a truncated a.out-kludge header."""
    limit = min(len(data), SEARCH_LIMIT)
    for off in range(0, limit - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        if not flags & HF_AOUT_KLUDGE:
            return MultibootHeader(off, flags)
        if off + 32 > len(data):
            raise BootError(f"{path}: truncated file: the Multiboot header at {off:#x} needs its address fields "
                            f"up to {off + 32:#x}")
        return MultibootHeader(off, flags, *struct.unpack_from("<5I", data, off + 12))
    return None


def describe_missing_header(data: bytes) -> str:
    """Why find_header found nothing, for error messages."""
    limit = min(len(data), SEARCH_LIMIT)
    bad = [off for off in range(0, limit - 11, 4) if struct.unpack_from("<I", data, off)[0] == HEADER_MAGIC]
    if bad:
        return f"the Multiboot header at {bad[0]:#x} has a bad checksum (magic + flags + checksum must be 0)"
    return f"no Multiboot header (magic {HEADER_MAGIC:#x}) in the first {SEARCH_LIMIT} bytes"


def _load_aout(plan: LoadPlan, data: bytes, hdr: MultibootHeader) -> tuple[int, int]:
    """Load by the a.out-kludge fields; returns (entry, end of the loaded image including bss)."""
    if hdr.header_addr < hdr.load_addr:
        raise plan.error(f"Multiboot header_addr {hdr.header_addr:#x} is below load_addr {hdr.load_addr:#x}")
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_start < 0:
        raise plan.error(f"Multiboot load_addr {hdr.load_addr:#x} lies before the start of the file "
                         f"(header_addr {hdr.header_addr:#x} at file offset {hdr.offset:#x})")
    load_end = hdr.load_end_addr or hdr.load_addr + len(data) - file_start
    if load_end < hdr.load_addr:
        raise plan.error(f"Multiboot load_end_addr {load_end:#x} is below load_addr {hdr.load_addr:#x}")
    size = load_end - hdr.load_addr
    if file_start + size > len(data):
        raise plan.error(f"truncated file: the Multiboot header asks to load {size:#x} bytes from file offset "
                         f"{file_start:#x} but the file has {len(data):#x}")
    bss_end = hdr.bss_end_addr or load_end
    if bss_end < load_end:
        raise plan.error(f"Multiboot bss_end_addr {bss_end:#x} is below load_end_addr {load_end:#x}")
    if bss_end > 1 << 32:
        raise plan.error(f"the Multiboot image at {span(hdr.load_addr, bss_end - hdr.load_addr)} is not below 4 GiB")
    plan.put(hdr.load_addr, memoryview(data)[file_start:file_start + size], "the kernel image (Multiboot a.out kludge)",
             size=bss_end - hdr.load_addr)
    if not hdr.load_addr <= hdr.entry_addr < bss_end:
        raise plan.error(f"Multiboot entry_addr {hdr.entry_addr:#x} is not inside the loaded image "
                         f"{span(hdr.load_addr, bss_end - hdr.load_addr)}")
    return hdr.entry_addr, bss_end


def _load_elf(plan: LoadPlan, data: bytes, path: str) -> tuple[int, int]:
    image = elf.parse_elf(data, path)
    load_segments(plan, data, image)
    entry = image.phys_of_virt(image.entry)
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in image.segments):
        raise plan.error(f"ELF entry point {image.entry:#x} is not inside any loaded segment")
    return entry, max(s.paddr + s.memsz for s in image.segments)


def load_multiboot(data: bytes, hdr: MultibootHeader, path: str, ram: GuestRam, *, cmdline: bytes,
                   initrd: bytes | None, initrd_path: str, acpi: AcpiTables | None = None) -> EntryState:
    plan = LoadPlan(path, ram.size, acpi)
    unsupported = hdr.flags & 0xFFFF & ~HF_SUPPORTED_REQUIRED
    if unsupported:
        raise plan.error(f"the Multiboot header requires features vmfork does not support (flags {unsupported:#x})")
    strings = (LOADER_NAME,) if initrd is None else (LOADER_NAME, initrd_path.encode())
    string_addrs = plan.put_common(cmdline, strings)
    plan.claim(layout.MBI_ADDR, layout.MB_AREA_END - layout.MBI_ADDR, "the loader's Multiboot info")
    if hdr.flags & HF_AOUT_KLUDGE:
        entry, kernel_end = _load_aout(plan, data, hdr)
    else:
        if not elf.is_elf(data):
            raise plan.error("not an ELF file and the Multiboot header has no a.out-kludge address fields (flag 16)")
        entry, kernel_end = _load_elf(plan, data, path)

    mods = b""
    if initrd is not None:
        addr = plan.place_low(len(initrd), floor=align_up(kernel_end, layout.PAGE_SIZE))
        if addr is None or addr + len(initrd) > 1 << 32:
            raise plan.error(f"initrd {initrd_path} ({len(initrd)} bytes) does not fit in free guest RAM after the "
                             f"kernel's end {kernel_end:#x} ({plan.describe_ram()})")
        plan.put(addr, initrd, f"initrd {initrd_path}")
        mods = MODULE.pack(addr, addr + len(initrd), string_addrs[1], 0)

    e820 = layout.e820_map(ram.size)
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, a, s, t) for a, s, t in e820)
    if layout.MB_MMAP_ADDR + len(mmap) > layout.MB_AREA_END:
        raise plan.error(f"the memory map has {len(e820)} entries, too many for the Multiboot area")
    low_end = layout.low_ram_end(ram.size)
    mbi = bytearray(MBI_SIZE)
    struct.pack_into("<IIII", mbi, 0, MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
                     min(low_end, layout.EBDA_START) // 1024, max(0, low_end - layout.HIGH_MEMORY_START) // 1024, 0)
    struct.pack_into("<III", mbi, 16, layout.CMDLINE_ADDR, 1 if mods else 0, layout.MB_MODS_ADDR)
    struct.pack_into("<II", mbi, 44, len(mmap), layout.MB_MMAP_ADDR)
    struct.pack_into("<I", mbi, 64, string_addrs[0])
    area = bytearray(layout.MB_AREA_END - layout.MBI_ADDR)
    area[0:MBI_SIZE] = mbi
    mods_off = layout.MB_MODS_ADDR - layout.MBI_ADDR
    area[mods_off:mods_off + len(mods)] = mods
    mmap_off = layout.MB_MMAP_ADDR - layout.MBI_ADDR
    area[mmap_off:mmap_off + len(mmap)] = mmap
    plan.write(layout.MBI_ADDR, bytes(area))
    plan.commit(ram)
    return protected32_entry("multiboot", entry, {"rax": BOOTLOADER_MAGIC, "rbx": layout.MBI_ADDR})
