"""What a boot loader needs from guest RAM (GuestRam) and what it hands to the machine (EntryState)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from .. import layout

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 0x2           # bit 1 always reads as 1; IF, TF and VM clear


class GuestRam(Protocol):
    """Guest RAM as the loaders see it: vmfork.memory.GuestMemory satisfies this, and so does a test fake."""

    @property
    def size(self) -> int:
        """Total RAM in bytes (laid out by layout.ram_regions)."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` to guest-physical `gpa`; raises on an address outside RAM."""
        ...


@dataclass(frozen=True, slots=True)
class EntryState:
    """The vCPU state at the kernel's entry point.

    Registers not named in `gprs` are zero. Segments: CS = `cs_selector`, DS/ES/FS/GS/SS = `ds_selector`, all with
    base 0 and limit 4 GiB as described by the GDT at `gdt_base` (see boot.gdt.GDT_DESCRIPTORS for their decoded
    values); TR = layout.GDT_TSS_SELECTOR, a busy TSS with base 0 and limit 0x67 (what PVH asks for); IDT empty;
    interrupts disabled.
    """

    mode: Literal["protected32", "long64"]
    rip: int
    rsp: int
    rflags: int
    gprs: Mapping[str, int]
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt_base: int
    gdt_limit: int
    cs_selector: int
    ds_selector: int
    protocol: str


def protected32_entry(protocol: str, rip: int, gprs: Mapping[str, int]) -> EntryState:
    """32-bit protected mode, paging off, flat segments (PVH and Multiboot)."""
    return EntryState(
        mode="protected32", rip=rip, rsp=layout.BOOT_STACK_TOP, rflags=RFLAGS_RESERVED, gprs=dict(gprs),
        cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0, gdt_base=layout.GDT_ADDR, gdt_limit=layout.GDT_SIZE - 1,
        cs_selector=layout.GDT_CODE32_SELECTOR, ds_selector=layout.GDT_DATA_SELECTOR, protocol=protocol)


def long64_entry(protocol: str, rip: int, gprs: Mapping[str, int]) -> EntryState:
    """64-bit long mode with the identity-mapping page tables at layout.PML4_ADDR (Linux's 64-bit boot protocol)."""
    return EntryState(
        mode="long64", rip=rip, rsp=layout.BOOT_STACK_TOP, rflags=RFLAGS_RESERVED, gprs=dict(gprs),
        cr0=CR0_PE | CR0_ET | CR0_PG, cr3=layout.PML4_ADDR, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
        gdt_base=layout.GDT_ADDR, gdt_limit=layout.GDT_SIZE - 1, cs_selector=layout.GDT_CODE64_SELECTOR,
        ds_selector=layout.GDT_DATA_SELECTOR, protocol=protocol)
