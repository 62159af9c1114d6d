"""x86 guest loaders: Linux bzImage (64-bit boot protocol), PVH ELF (including a Linux vmlinux) and Multiboot v1.

`load_kernel` writes the kernel, initrd and boot structures into guest RAM and returns the vCPU state to start it
with; the fixed addresses it uses are in vmfork.arch.x86.layout.
"""

from __future__ import annotations

import os
from typing import Literal

from ....errors import BootError, ConfigError
from ..acpi import AcpiTables
from . import elf, linux, multiboot, pvh
from .entry import EntryState, GuestRam
from .plan import read_file

__all__ = ["BootProtocol", "EntryState", "GuestRam", "load_kernel"]

BootProtocol = Literal["auto", "multiboot", "pvh", "linux"]
_PROTOCOLS = ("auto", "multiboot", "pvh", "linux")


def load_kernel(path: str | os.PathLike[str], ram: GuestRam, *, cmdline: str = "",
                initrd: str | os.PathLike[str] | None = None, protocol: BootProtocol = "auto",
                acpi: AcpiTables | None = None) -> EntryState:
    """Load the kernel image at `path` (and `initrd`, if given) into `ram`; return the state to enter it with.

    protocol "auto" picks, in this order: a bzImage ("HdrS" at 0x202) -> Linux 64-bit boot protocol; an ELF with a
    PVH note (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY) -> PVH ("linux-pvh" for a Linux vmlinux); a Multiboot header
    in the first 8 KiB -> Multiboot. "linux" accepts a bzImage or a PVH-capable vmlinux. `acpi`: ACPI tables to
    place (at their fixed address, see arch/x86/acpi) and to point the kernel at where the protocol can (PVH's
    rsdp_paddr, Linux's acpi_rsdp_addr). Raises BootError naming the file and the problem.
    """
    if protocol not in _PROTOCOLS:
        raise ConfigError(f"unknown boot protocol {protocol!r} (expected one of {', '.join(_PROTOCOLS)})")
    name = os.fspath(path)
    data = read_file(path, "kernel image")
    initrd_data: bytes | None = None
    initrd_name = ""
    if initrd is not None:
        initrd_name = os.fspath(initrd)
        initrd_data = read_file(initrd, "initrd")
        if not initrd_data:
            raise BootError(f"initrd {initrd_name}: the file is empty")
    cmd = cmdline.encode()

    if protocol in ("auto", "linux") and linux.is_bzimage(data):
        return linux.load_bzimage(data, name, ram, cmdline=cmd, initrd=initrd_data, initrd_path=initrd_name,
                                  acpi=acpi)

    if protocol == "multiboot":
        header = multiboot.find_header(data, name)
        if header is None:
            raise BootError(f"{name}: {multiboot.describe_missing_header(data)}")
        return multiboot.load_multiboot(data, header, name, ram, cmdline=cmd, initrd=initrd_data,
                                        initrd_path=initrd_name, acpi=acpi)

    if protocol == "linux" and not elf.is_elf(data):
        raise BootError(f"{name}: not a Linux kernel: wrong magic (no bzImage 'HdrS' setup header at 0x202, and not "
                        f"an ELF vmlinux)")
    if protocol == "pvh" or elf.is_elf(data):
        try:
            image = elf.parse_elf(data, name)
        except BootError:
            # a broken ELF may still be a Multiboot a.out-kludge image, which does not need its ELF headers
            header = multiboot.find_header(data, name) if protocol == "auto" else None
            if header is None or not header.flags & multiboot.HF_AOUT_KLUDGE:
                raise
            return multiboot.load_multiboot(data, header, name, ram, cmdline=cmd, initrd=initrd_data,
                                            initrd_path=initrd_name, acpi=acpi)
        entry = pvh.pvh_entry(image, name)
        if entry is not None:
            kind = "linux-pvh" if pvh.is_linux(image, data) else "pvh"
            return pvh.load_pvh(data, image, entry, name, ram, protocol=kind, cmdline=cmd, initrd=initrd_data,
                                initrd_path=initrd_name, acpi=acpi)
        if protocol != "auto":
            linux_hint = " (a Linux vmlinux needs CONFIG_PVH)" if protocol == "linux" else ""
            raise BootError(f"{name}: no PVH entry: no ELF note 'Xen' of type {pvh.XEN_ELFNOTE_PHYS32_ENTRY} "
                            f"(XEN_ELFNOTE_PHYS32_ENTRY) in its PT_NOTE segments or SHT_NOTE sections{linux_hint}")

    header = multiboot.find_header(data, name)
    if header is not None:
        return multiboot.load_multiboot(data, header, name, ram, cmdline=cmd, initrd=initrd_data,
                                        initrd_path=initrd_name, acpi=acpi)
    raise BootError(f"{name}: no supported boot format: not a bzImage (no 'HdrS' setup header at 0x202), no PVH "
                    f"ELF note ('Xen', type {pvh.XEN_ELFNOTE_PHYS32_ENTRY}), and "
                    f"{multiboot.describe_missing_header(data)}")
