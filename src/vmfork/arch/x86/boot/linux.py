"""Linux bzImage kernels through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

The real-mode setup code is not run: the loader fills the zero page (struct boot_params) itself, loads the
protected-mode kernel at its preferred address and enters it in long mode at load address + 0x200 with RSI = the
zero page, identity-mapped page tables for [0, 4 GiB) and a GDT with __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
"""

from __future__ import annotations

import struct

from .. import layout
from ..acpi import AcpiTables
from .entry import EntryState, GuestRam, long64_entry
from .plan import LoadPlan, align_up, span

HDR_MAGIC = b"HdrS"
MIN_VERSION = 0x020C            # 2.12: xloadflags and the 64-bit entry point
SECTOR = 512
ENTRY_64_OFFSET = 0x200
ZERO_PAGE_SIZE = 4096
HDR_START = 0x1F1
HDR_LIMIT = 0x290               # edd_mbr_sig_buffer follows the setup header in boot_params
E820_MAX = 128                  # entries in boot_params.e820_table

# setup header / boot_params offsets
OFF_SETUP_SECTS = 0x1F1
OFF_JUMP_LEN = 0x201            # the header ends at 0x202 + this byte
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_SETUP_DATA = 0x250
OFF_ACPI_RSDP_ADDR = 0x070      # boot_params.acpi_rsdp_addr (protocol 2.14+; older kernels scan for the RSDP)
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
HDR_MIN_END = OFF_INIT_SIZE + 4
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0

LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
KERNEL_DEFAULT_ADDR = 0x100000  # where a bzImage's protected-mode code goes traditionally (1 MiB)

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_LARGE = 1 << 7
E820_ENTRY = struct.Struct("<QQI")


def is_bzimage(data: bytes) -> bool:
    return data[OFF_HEADER:OFF_HEADER + 4] == HDR_MAGIC


def page_tables() -> bytes:
    """PML4, PDPT and PD_COUNT page directories identity-mapping [0, PD_COUNT GiB) with 2 MiB pages, contiguous
    from layout.PML4_ADDR."""
    table = PTE_PRESENT | PTE_WRITE
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | table).ljust(layout.PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{layout.PD_COUNT}Q", *(layout.PD_ADDR + i * layout.PAGE_SIZE | table
                                                  for i in range(layout.PD_COUNT))).ljust(layout.PAGE_SIZE, b"\0")
    count = 512 * layout.PD_COUNT
    pds = struct.pack(f"<{count}Q", *((i << 21) | table | PTE_LARGE for i in range(count)))
    return pml4 + pdpt + pds


def _u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def load_bzimage(data: bytes, path: str, ram: GuestRam, *, cmdline: bytes, initrd: bytes | None,
                 initrd_path: str, acpi: AcpiTables | None = None) -> EntryState:
    plan = LoadPlan(path, ram.size, acpi)
    if len(data) < OFF_VERSION + 2:
        raise plan.error(f"truncated file: {len(data)} bytes is too short for a bzImage setup header")
    if not is_bzimage(data):
        raise plan.error(f"not a bzImage (wrong magic {data[OFF_HEADER:OFF_HEADER + 4]!r} at {OFF_HEADER:#x}, "
                         f"expected {HDR_MAGIC!r})")
    version = _u16(data, OFF_VERSION)
    if version < MIN_VERSION:
        raise plan.error(f"boot protocol version {version >> 8}.{version & 0xFF:02d} is too old: the 64-bit entry "
                         f"needs {MIN_VERSION >> 8}.{MIN_VERSION & 0xFF:02d} or later")
    hdr_end = OFF_HEADER + data[OFF_JUMP_LEN]
    setup_sects = data[OFF_SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * SECTOR
    if not HDR_MIN_END <= hdr_end <= HDR_LIMIT:
        raise plan.error(f"setup header end {hdr_end:#x} (0x202 + byte at 0x201) is outside "
                         f"[{HDR_MIN_END:#x}, {HDR_LIMIT:#x}]")
    if len(data) < hdr_end:
        raise plan.error(f"truncated file: {len(data)} bytes but the setup header ends at {hdr_end:#x}")
    if len(data) <= setup_size:
        raise plan.error(f"truncated file: {len(data)} bytes but the real-mode setup alone takes {setup_size:#x} "
                         f"({setup_sects} setup sectors + boot sector), leaving no protected-mode kernel")
    loadflags = data[OFF_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise plan.error("a zImage (loadflags bit LOADED_HIGH clear) cannot be booted, only a bzImage")
    if not _u16(data, OFF_XLOADFLAGS) & XLF_KERNEL_64:
        raise plan.error("32-bit-only kernel: xloadflags lacks XLF_KERNEL_64, so there is no 64-bit entry point")

    relocatable = data[OFF_RELOCATABLE] != 0
    alignment = _u32(data, OFF_KERNEL_ALIGNMENT) or 1
    pref_address = int(struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)[0]) or KERNEL_DEFAULT_ADDR
    init_size = _u32(data, OFF_INIT_SIZE)
    initrd_addr_max = _u32(data, OFF_INITRD_ADDR_MAX)
    cmdline_size = _u32(data, OFF_CMDLINE_SIZE)
    if relocatable:
        load_addr = align_up(pref_address, alignment)
        runtime_start = load_addr
    else:
        load_addr = KERNEL_DEFAULT_ADDR
        runtime_start = pref_address        # a non-relocatable kernel moves itself there
    kernel = memoryview(data)[setup_size:]
    if runtime_start < load_addr:
        raise plan.error(f"pref_address {pref_address:#x} is below the load address {load_addr:#x}")
    kernel_end = max(load_addr + len(kernel), runtime_start + init_size)
    if kernel_end > 1 << 32:
        raise plan.error(f"the kernel at {span(load_addr, kernel_end - load_addr)} is not below 4 GiB")
    if len(cmdline) > cmdline_size:
        raise plan.error(f"the command line is {len(cmdline)} bytes, more than the kernel's cmdline_size "
                         f"{cmdline_size}")

    plan.put_common(cmdline)
    plan.put(layout.PML4_ADDR, page_tables(), "the loader's page tables")
    plan.claim(layout.ZERO_PAGE_ADDR, ZERO_PAGE_SIZE, "the loader's zero page")
    # The kernel needs [runtime_start, runtime_start + init_size) before it reads the memory map; that memory is
    # claimed but not written (fresh RAM is zero, and the kernel does not rely on it being zero anyway).
    plan.claim(load_addr, kernel_end - load_addr, "the kernel (its image and init_size)")
    plan.write(load_addr, kernel)

    ramdisk_addr = ramdisk_size = 0
    if initrd is not None:
        ceiling = min(initrd_addr_max + 1, layout.low_ram_end(ram.size))
        addr = plan.place_high(len(initrd), floor=kernel_end, ceiling=ceiling)
        if addr is None:
            raise plan.error(f"initrd {initrd_path} ({len(initrd)} bytes) does not fit in guest RAM between the "
                             f"kernel's end {kernel_end:#x} and {ceiling:#x} (initrd_addr_max {initrd_addr_max:#x}, "
                             f"RAM {plan.describe_ram()})")
        plan.put(addr, initrd, f"initrd {initrd_path}")
        ramdisk_addr, ramdisk_size = addr, len(initrd)

    zp = bytearray(ZERO_PAGE_SIZE)
    zp[HDR_START:hdr_end] = data[HDR_START:hdr_end]
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zp[OFF_LOADFLAGS] = loadflags
    struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, ramdisk_addr & 0xFFFFFFFF, ramdisk_size & 0xFFFFFFFF)
    struct.pack_into("<II", zp, OFF_EXT_RAMDISK_IMAGE, ramdisk_addr >> 32, ramdisk_size >> 32)
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, layout.CMDLINE_ADDR & 0xFFFFFFFF)
    struct.pack_into("<I", zp, OFF_EXT_CMD_LINE_PTR, layout.CMDLINE_ADDR >> 32)
    struct.pack_into("<Q", zp, OFF_SETUP_DATA, 0)
    struct.pack_into("<Q", zp, OFF_ACPI_RSDP_ADDR, plan.rsdp)
    e820 = layout.e820_map(ram.size)
    if len(e820) > E820_MAX:
        raise plan.error(f"the memory map has {len(e820)} entries, more than the zero page's {E820_MAX}")
    zp[OFF_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(zp, OFF_E820_TABLE + i * E820_ENTRY.size, *entry)
    plan.write(layout.ZERO_PAGE_ADDR, bytes(zp))
    plan.commit(ram)
    return long64_entry("linux-bzimage", load_addr + ENTRY_64_OFFSET, {"rsi": layout.ZERO_PAGE_ADDR})
