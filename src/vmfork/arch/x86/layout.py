"""The guest-physical address map of a vmfork x86 machine: where RAM is, the e820 map, and the fixed low addresses
the boot loaders (vmfork.arch.x86.boot) write their structures to.

RAM starts at 0. Up to 3 GiB of it lies below the PCI hole [3 GiB, 4 GiB); the rest continues at 4 GiB.

Low memory, as the loaders use it (every structure is below 0x20000, far from the EBDA/ROM area 0x9fc00-0x100000):

    0x00000-0x004ff   real-mode IVT and BIOS data area: never written
    0x00500-0x0052f   GDT: null, 0x08 flat 32-bit code, 0x10 flat 64-bit code, 0x18 flat data, 0x20 TSS (16 bytes)
    0x01000-0x06fff   identity-mapping page tables (Linux only): PML4, PDPT, 4 page directories of 2 MiB pages
    0x07000-0x07fff   Linux zero page (struct boot_params)
    0x08000-0x08fff   PVH: hvm_start_info at 0x8000, module list at 0x8040, memory map at 0x8080
    0x09000-0x09fff   Multiboot: multiboot_info at 0x9000, module list at 0x9080, memory map at 0x9100
    0x0e000-0x0ffff   boot stack (RSP = 0x10000 at entry)
    0x10000-0x1ffff   kernel command line, then other strings (module names, boot loader name)
    0x20000-0x9fbff   free for the guest

Reserved, up to 1 MiB (one E820_RESERVED entry in the e820, Multiboot and PVH maps alike: a guest allocates none of
it): the EBDA at 0x9fc00, the legacy VGA window 0xa0000-0xbffff, option and BIOS ROM space 0xc0000-0xfffff. vmfork
has RAM there, and the VGA window is **vmfork's own area**: what vmfork must place in the guest lives there and
nowhere else (no guest page is taken behind the user's back):

    0xae000-0xaefff   the fuzzer's instruction-budget stub (vmfork.fuzz.pmu)
    0xaf000-0xb4fff   the debug area (vmfork.workarounds.bp_stub): the #BP stub and its table, and the IDT, TSS and
                      stack vmfork lends a vCPU whose guest has no #BP gate of its own

A user may point the debug area elsewhere (`stub_gpa=`, `--stub-addr`) in memory the guest does not use; vmfork
checks, before it writes there, that the guest has not used it (an error otherwise, not a silent corruption).
"""

from __future__ import annotations

from ...errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# --- the physical address map ---------------------------------------------------------------------------------------

PCI_HOLE_START = 3 << 30            # [PCI_HOLE_START, HIGH_RAM_START) holds no RAM (MMIO: IOAPIC, LAPIC, ...)
HIGH_RAM_START = 4 << 30            # RAM beyond the first 3 GiB continues here
EBDA_START = 0x9FC00                # reserved: EBDA, VGA hole, option and BIOS ROMs, up to 1 MiB
HIGH_MEMORY_START = 0x100000        # 1 MiB, where "upper memory" (Multiboot mem_upper) starts

VMFORK_AREA_START = 0xA0000         # the legacy VGA window: vmfork's own reserved area (see the module docstring)
VMFORK_AREA_END = 0xC0000
BUDGET_STUB_ADDR = 0xAE000          # vmfork.fuzz.pmu
DEBUG_AREA_ADDR = 0xAF000           # vmfork.workarounds.bp_stub: stub page, lent IDT, lent TSS, lent stack
DEBUG_AREA_SIZE = 0x6000

E820_RAM = 1
E820_RESERVED = 2

# --- fixed low addresses used by the boot loaders -------------------------------------------------------------------

GDT_ADDR = 0x500
GDT_SIZE = 0x30                     # 6 descriptors; the GDT limit is GDT_SIZE - 1
GDT_CODE32_SELECTOR = 0x08          # flat 4 GiB 32-bit code (PVH and Multiboot entry)
GDT_CODE64_SELECTOR = 0x10          # 64-bit code (Linux's __BOOT_CS)
GDT_DATA_SELECTOR = 0x18            # flat 4 GiB data (Linux's __BOOT_DS)
GDT_TSS_SELECTOR = 0x20             # busy TSS, base 0, limit 0x67 (a 16-byte system descriptor)

PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000                    # PD_COUNT page directories, one per GiB
PD_COUNT = 4                        # identity map of [0, 4 GiB) with 2 MiB pages
PAGE_TABLES_END = PD_ADDR + PD_COUNT * PAGE_SIZE

ZERO_PAGE_ADDR = 0x7000             # Linux struct boot_params, 4 KiB

START_INFO_ADDR = 0x8000            # PVH struct hvm_start_info (56 bytes)
PVH_MODLIST_ADDR = 0x8040           # hvm_modlist_entry[] (32 bytes each)
PVH_MEMMAP_ADDR = 0x8080            # hvm_memmap_table_entry[] (24 bytes each)
PVH_AREA_END = 0x9000

MBI_ADDR = 0x9000                   # struct multiboot_info (116 bytes)
MB_MODS_ADDR = 0x9080               # multiboot module entries (16 bytes each)
MB_MMAP_ADDR = 0x9100               # multiboot memory map entries (24 bytes each, with their size prefix)
MB_AREA_END = 0xA000

BOOT_STACK_ADDR = 0xE000
BOOT_STACK_TOP = 0x10000            # initial RSP/ESP

CMDLINE_ADDR = 0x10000              # NUL-terminated kernel command line
STRINGS_END = 0x20000               # the command line and other strings live in [CMDLINE_ADDR, STRINGS_END)
CMDLINE_MAX = STRINGS_END - CMDLINE_ADDR   # command line limit including its NUL

LOADER_AREA_END = STRINGS_END       # every loader structure is below this address


def _check_size(ram_size: int) -> None:
    if ram_size <= 0 or ram_size % PAGE_SIZE:
        raise ConfigError(f"RAM size {ram_size:#x} must be a positive multiple of 4 KiB")


def ram_regions(ram_size: int) -> list[tuple[int, int]]:
    """Guest-physical (start, size) ranges of RAM: [0, min(size, 3 GiB)) and, above 3 GiB, [4 GiB, 4 GiB + rest)."""
    _check_size(ram_size)
    low = min(ram_size, PCI_HOLE_START)
    regions = [(0, low)]
    if ram_size > low:
        regions.append((HIGH_RAM_START, ram_size - low))
    return regions


def low_ram_end(ram_size: int) -> int:
    """End of the RAM below 4 GiB (at most 3 GiB)."""
    _check_size(ram_size)
    return min(ram_size, PCI_HOLE_START)


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """The memory map given to guests, as (addr, size, type) sorted by address.

    Usable [0, 0x9fc00), reserved [0x9fc00, 1 MiB), usable [1 MiB, low RAM end) and [4 GiB, ...) for RAM above 3 GiB.
    Only RAM is described: the PCI hole is absent from the map. The reserved entry covers vmfork's own area
    [VMFORK_AREA_START, VMFORK_AREA_END) (see the module docstring).
    """
    out: list[tuple[int, int, int]] = []
    for start, size in ram_regions(ram_size):
        end = start + size
        if start < HIGH_MEMORY_START:
            out.append((start, min(end, EBDA_START) - start, E820_RAM))
            if end > EBDA_START:
                out.append((EBDA_START, min(end, HIGH_MEMORY_START) - EBDA_START, E820_RESERVED))
            if end > HIGH_MEMORY_START:
                out.append((HIGH_MEMORY_START, end - HIGH_MEMORY_START, E820_RAM))
        else:
            out.append((start, size, E820_RAM))
    return out


def is_vmfork_reserved(gpa: int, size: int = 1) -> bool:
    """Whether [gpa, gpa + size) lies in vmfork's own area, which every memory map vmfork gives a guest reserves."""
    return VMFORK_AREA_START <= gpa and gpa + size <= VMFORK_AREA_END


assert EBDA_START <= VMFORK_AREA_START and VMFORK_AREA_END <= HIGH_MEMORY_START   # inside the reserved e820 entry
assert is_vmfork_reserved(DEBUG_AREA_ADDR, DEBUG_AREA_SIZE) and is_vmfork_reserved(BUDGET_STUB_ADDR, PAGE_SIZE)
