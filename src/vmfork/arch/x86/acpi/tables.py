"""ACPI tables for a vmfork machine, built from its shape: RSDP, RSDT, XSDT, FADT (hardware-reduced), MADT and a
DSDT describing the fixed ISA devices (the UART, the RTC, the PS/2 controller).

The whole set is one blob placed at TABLES_ADDR (inside [0xE0000, 0x100000), which Linux scans for the RSDP and
which the e820 map reports reserved), RSDP first: the boot loaders also pass its address where the protocol has a
field for it (PVH hvm_start_info.rsdp_paddr, Linux boot_params.acpi_rsdp_addr).

    TABLES_ADDR + 0x000   RSDP (36 bytes, ACPI 2.0+), 16-byte aligned as the BIOS-area scan needs
    then, each 8-byte aligned:  XSDT, RSDT, FADT, MADT, DSDT

The machine's platform: vCPU i has LAPIC ID i (KVM's default), the in-kernel IOAPIC at 0xFEC00000 (ID 0, GSIs
0-23, ISA IRQ n on pin n with KVM's default routing, so no interrupt source overrides are needed), the 8259 PICs
(PCAT_COMPAT), LINT1 of every LAPIC wired to NMI. Hardware-reduced ACPI: no PM timer, SCI or GPE blocks (nothing
in vmfork answers them); the reset register is the PS/2 controller's reset pulse (port 0x64, value 0xFE).

Devices are added to the DSDT through `Device` values (name, _HID, _CID, _UID, resources and any extra AML
terms), so a later device (e.g. VMGenID, with its ADDR method) is one more entry in `devices`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import aml

TABLES_ADDR = 0xE0000               # the region vmfork's ACPI tables may use: [TABLES_ADDR, TABLES_END)
TABLES_END = 0xF0000
TABLES_LIMIT = TABLES_END - 0x100   # the last 256 bytes of the area hold small data blocks (acpi/vmgenid.py)
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_ID = 0
IOAPIC_GSI_BASE = 0

OEM_ID = b"VMFORK"
OEM_TABLE_ID = b"VMFORKVM"
OEM_REVISION = 1
CREATOR_ID = b"VMFK"
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")     # signature, length, revision, checksum, OEM ID, table ID, ...
RSDP = struct.Struct("<8sB6sBII Q B3s".replace(" ", ""))
GAS = struct.Struct("<BBBBQ")               # generic address: space, bit width, bit offset, access size, address

# FADT (ACPI 6.x, revision 6, 276 bytes)
FADT_REVISION = 6
FADT_MINOR = 3
FADT_LENGTH = 276
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4            # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5            # no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
SPACE_SYSTEM_IO = 1
RESET_PORT = 0x64
RESET_VALUE = 0xFE

# MADT
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1
MADT_LAPIC = 0
MADT_IOAPIC = 1
MADT_INT_OVERRIDE = 2
MADT_LAPIC_NMI = 4
LAPIC_ENABLED = 1


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (length and checksum filled in) and `body`."""
    length = HEADER.size + len(body)
    raw = bytearray(HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID,
                                CREATOR_REVISION) + body)
    raw[9] = checksum(raw)
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class Device:
    """A DSDT device under \\_SB: Device (name) { _HID, [_CID], _UID, [_CRS], extra terms }."""

    name: str
    hid: str                                  # "PNP0501" (an EISA id) or another string ("QEMUVGID")
    uid: int = 0
    cid: str | None = None
    resources: tuple[bytes, ...] = ()         # aml.io_port(...), aml.irq_no_flags(...), ...
    extra: tuple[bytes, ...] = ()             # more AML terms: names, methods

    def aml(self) -> bytes:
        def ident(text: str) -> bytes:
            try:
                return aml.eisa_id(text)
            except ValueError:
                return aml.string(text)
        terms = [aml.name("_HID", ident(self.hid))]
        if self.cid is not None:
            terms.append(aml.name("_CID", ident(self.cid)))
        terms.append(aml.name("_UID", self.uid))
        if self.resources:
            terms.append(aml.name("_CRS", aml.resource_template(self.resources)))
        return aml.device(self.name, [*terms, *self.extra])


def standard_devices() -> list[Device]:
    """The fixed ISA devices of every vmfork machine (vmfork.devices.standard_devices)."""
    return [
        Device("COM1", "PNP0501", 0, resources=(aml.io_port(0x3F8, 8), aml.irq_no_flags(4))),
        Device("RTC", "PNP0B00", 0, resources=(aml.io_port(0x70, 2), aml.irq_no_flags(8))),
        Device("PS2K", "PNP0303", 0, resources=(aml.io_port(0x60, 1), aml.io_port(0x64, 1), aml.irq_no_flags(1))),
    ]


def dsdt(devices: Sequence[Device]) -> bytes:
    return table(b"DSDT", 2, aml.scope("\\_SB", [d.aml() for d in devices]))


def madt(vcpus: int) -> bytes:
    body = bytearray(struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT))
    for i in range(vcpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED)   # processor UID i, APIC ID i
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_ADDR, IOAPIC_GSI_BASE)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)             # all processors: LINT1 is NMI
    return table(b"APIC", MADT_REVISION, bytes(body))


def fadt(dsdt_addr: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(45, "<B", 0)                                             # preferred PM profile: unspecified
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED)
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    put(116, "<BBBBQ", SPACE_SYSTEM_IO, 8, 0, 1, RESET_PORT)      # RESET_REG: byte access to port 0x64
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt_addr)                                    # X_DSDT (DSDT, the 32-bit field, stays 0)
    put(268, "<8s", b"VMFORK\0\0")                               # hypervisor vendor identity
    return table(b"FACP", FADT_REVISION, bytes(body))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class AcpiTables:
    """The table set for one machine: `blob` goes at `base`; the RSDP is at `rsdp`."""

    base: int
    blob: bytes
    rsdp: int
    tables: dict[str, int] = field(default_factory=dict)     # signature -> address

    @property
    def end(self) -> int:
        return self.base + len(self.blob)


def build(vcpus: int, *, devices: Sequence[Device] | None = None, base: int = TABLES_ADDR) -> AcpiTables:
    """The ACPI tables for a machine with `vcpus` vCPUs and `devices` (default: the standard ISA devices)."""
    if not 1 <= vcpus <= 255:
        raise ValueError(f"the MADT's xAPIC entries describe 1-255 vCPUs, not {vcpus}")
    devs = standard_devices() if devices is None else list(devices)
    at: dict[str, int] = {}
    pos = base + _align(RSDP.size, 16)
    order = ("XSDT", "RSDT", "FACP", "APIC", "DSDT")
    # sizes first (the XSDT/RSDT and FADT hold addresses, not sizes, so two passes settle the layout)
    dsdt_raw = dsdt(devs)
    madt_raw = madt(vcpus)
    sizes = {"XSDT": HEADER.size + 8 * 2, "RSDT": HEADER.size + 4 * 2, "FACP": FADT_LENGTH,
             "APIC": len(madt_raw), "DSDT": len(dsdt_raw)}
    for sig in order:
        at[sig] = pos
        pos = _align(pos + sizes[sig], 8)
    if pos > TABLES_LIMIT and base == TABLES_ADDR:
        raise ValueError(f"the ACPI tables need {pos - base} bytes, more than [{TABLES_ADDR:#x}, {TABLES_LIMIT:#x})")
    raw = {
        "XSDT": table(b"XSDT", 1, struct.pack("<QQ", at["FACP"], at["APIC"])),
        "RSDT": table(b"RSDT", 1, struct.pack("<II", at["FACP"], at["APIC"])),
        "FACP": fadt(at["DSDT"]),
        "APIC": madt_raw,
        "DSDT": dsdt_raw,
    }
    blob = bytearray(pos - base)
    rsdp = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, at["RSDT"], RSDP.size, at["XSDT"], 0, b"\0\0\0"))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    blob[0:len(rsdp)] = rsdp
    for sig in order:
        assert len(raw[sig]) == sizes[sig], sig
        off = at[sig] - base
        blob[off:off + len(raw[sig])] = raw[sig]
    return AcpiTables(base, bytes(blob), base, {"RSDP": base, **at})


__all__ = ["TABLES_ADDR", "TABLES_END", "TABLES_LIMIT", "AcpiTables", "Device", "build", "checksum", "dsdt", "fadt",
           "madt", "standard_devices", "table"]
