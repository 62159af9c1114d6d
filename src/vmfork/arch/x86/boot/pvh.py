"""The PVH (x86/HVM direct boot) protocol: an ELF with a XEN_ELFNOTE_PHYS32_ENTRY note, entered in 32-bit protected
mode with paging off and EBX pointing to a struct hvm_start_info (version 1, with a memory map).

Covers any PVH kernel, including an uncompressed Linux vmlinux built with CONFIG_PVH.
"""

from __future__ import annotations

import struct

from ....errors import BootError
from .. import layout
from ..acpi import AcpiTables
from . import elf
from .entry import EntryState, GuestRam, protected32_entry
from .plan import LoadPlan, load_segments

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC = 0x336EC578
START_INFO_VERSION = 1
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")       # addr, size, type, reserved

_E820_TO_PVH = {layout.E820_RAM: XEN_HVM_MEMMAP_TYPE_RAM, layout.E820_RESERVED: XEN_HVM_MEMMAP_TYPE_RESERVED}


def pvh_entry(image: elf.ElfImage, path: str) -> int | None:
    """The 32-bit physical entry point from the Xen PHYS32_ENTRY note, or None if the image has no such note."""
    note = image.find_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) == 4:
        return int(struct.unpack("<I", note.desc)[0])
    if len(note.desc) == 8:
        return int(struct.unpack("<Q", note.desc)[0])
    raise BootError(f"{path}: malformed XEN_ELFNOTE_PHYS32_ENTRY note ({len(note.desc)} bytes, expected 4 or 8)")


def is_linux(image: elf.ElfImage, data: bytes) -> bool:
    """A Linux vmlinux: it has a note named "Linux" or contains the kernel banner "Linux version"."""
    return any(n.name == b"Linux" for n in image.notes) or b"Linux version" in data


def load_pvh(data: bytes, image: elf.ElfImage, entry: int, path: str, ram: GuestRam, *, cmdline: bytes,
             initrd: bytes | None, initrd_path: str, protocol: str, acpi: AcpiTables | None = None) -> EntryState:
    plan = LoadPlan(path, ram.size, acpi)
    plan.put_common(cmdline)
    plan.claim(layout.START_INFO_ADDR, layout.PVH_AREA_END - layout.START_INFO_ADDR, "the loader's PVH start info")
    load_segments(plan, data, image)
    if not 0 < entry < 1 << 32:
        raise plan.error(f"PVH entry point {entry:#x} is not a 32-bit physical address")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in image.segments):
        raise plan.error(f"PVH entry point {entry:#x} is not inside any loaded segment")

    nr_modules = 0
    modlist = b""
    if initrd is not None:
        top = min(layout.low_ram_end(ram.size), 1 << 32)
        addr = plan.place_high(len(initrd), floor=layout.HIGH_MEMORY_START, ceiling=top)
        if addr is None:
            raise plan.error(f"initrd {initrd_path} ({len(initrd)} bytes) does not fit in free guest RAM below "
                             f"{top:#x} ({plan.describe_ram()})")
        plan.put(addr, initrd, f"initrd {initrd_path}")
        modlist = MODLIST_ENTRY.pack(addr, len(initrd), 0, 0)
        nr_modules = 1

    e820 = layout.e820_map(ram.size)
    memmap = b"".join(MEMMAP_ENTRY.pack(a, s, _E820_TO_PVH[t], 0) for a, s, t in e820)
    if layout.PVH_MEMMAP_ADDR + len(memmap) > layout.PVH_AREA_END:
        raise plan.error(f"the memory map has {len(e820)} entries, too many for the PVH area")
    info = START_INFO.pack(XEN_HVM_START_MAGIC, START_INFO_VERSION, 0, nr_modules,
                           layout.PVH_MODLIST_ADDR if nr_modules else 0, layout.CMDLINE_ADDR, plan.rsdp,
                           layout.PVH_MEMMAP_ADDR, len(e820), 0)
    area = bytearray(layout.PVH_AREA_END - layout.START_INFO_ADDR)
    area[0:len(info)] = info
    mod_off = layout.PVH_MODLIST_ADDR - layout.START_INFO_ADDR
    area[mod_off:mod_off + len(modlist)] = modlist
    map_off = layout.PVH_MEMMAP_ADDR - layout.START_INFO_ADDR
    area[map_off:map_off + len(memmap)] = memmap
    plan.write(layout.START_INFO_ADDR, bytes(area))
    plan.commit(ram)
    return protected32_entry(protocol, entry, {"rbx": layout.START_INFO_ADDR})

