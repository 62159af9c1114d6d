"""A machine's VM generation ID: a new one for every fork and every restore, so a cloned Linux reseeds its RNG.

Firecracker added VMGenID because snapshot clones shared their RNG state; under Xen, forks do too. vmfork gives
every fork and every restored machine a fresh random 128-bit ID in the block the ACPI tables describe
(arch/x86/acpi/vmgenid.py) and raises the Generic Event Device's interrupt, whose _EVT notifies the VGEN device:
Linux's vmgenid driver (5.18+) reads the new ID and calls add_vmfork_randomness(). A fork's `reset()` writes the
same fork's ID again and notifies again, so every run of a fork starts the same way (the fork-time state is the
parent's, taken before the notification).

Whether a machine has the device is in its RAM (the block's magic), so forks, save files and templates carry it.
A machine with `block_interrupts` gets its new ID but no notification (it takes no interrupts)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .arch.x86.acpi import vmgenid as acpi_vmgenid
from .arch.x86.acpi.tables import AcpiTables

if TYPE_CHECKING:
    from .vm import Machine

__all__ = ["current", "install", "new_generation", "present", "renotify", "status"]


def install(machine: Machine, tables: AcpiTables, *, extra: Sequence[Any] = ()) -> None:
    """Describe the device in `tables` (rewritten in place: same address, so the kernel's RSDP pointer holds) and
    give the machine its first ID."""
    from .arch.x86 import acpi as acpi_tables
    from .arch.x86.acpi.tables import standard_devices
    full = acpi_tables.build(machine.shape.vcpus,
                             devices=[*standard_devices(), *extra, *acpi_vmgenid.acpi_devices()], base=tables.base)
    machine.memory.write(full.base, full.blob)
    machine.memory.write(acpi_vmgenid.BLOCK_ADDR, acpi_vmgenid.MAGIC + bytes(8) + os.urandom(16))


def present(machine: Machine) -> bool:
    """Whether this machine's tables carry a VMGenID device (cached: the block is in reserved memory that only
    vmfork writes)."""
    cached: bool | None = getattr(machine, "_vmgenid", None)
    if cached is None:
        try:
            cached = machine.memory.read(acpi_vmgenid.BLOCK_ADDR, 8) == acpi_vmgenid.MAGIC
        except Exception:       # RAM too small to hold the block: no device
            cached = False
        machine._vmgenid = cached      # type: ignore[attr-defined]
    return cached


def current(machine: Machine) -> bytes | None:
    """The machine's generation ID, or None without the device."""
    return machine.memory.read(acpi_vmgenid.GUID_ADDR, 16) if present(machine) else None


def _notify(machine: Machine) -> None:
    machine.set_irq(acpi_vmgenid.GSI, True)        # an edge on the GED's line (set_irq skips blocked machines)
    machine.set_irq(acpi_vmgenid.GSI, False)


def new_generation(machine: Machine) -> bytes | None:
    """A fresh ID for a new fork or a restored machine, and the guest notified; None (nothing done) without the
    device."""
    if not present(machine):
        return None
    guid = os.urandom(16)
    machine.memory.write(acpi_vmgenid.GUID_ADDR, guid)
    machine._vmgenid_id = guid      # type: ignore[attr-defined]
    _notify(machine)
    return guid


def renotify(machine: Machine) -> None:
    """After a fork's reset (its RAM holds the parent's ID again): the fork's own ID back, and the notification."""
    guid: bytes | None = getattr(machine, "_vmgenid_id", None)
    if guid is not None:
        machine.memory.write(acpi_vmgenid.GUID_ADDR, guid)
        _notify(machine)


_IOAPIC_REDIRTBL = 24        # struct kvm_ioapic_state: base_address u64, ioregsel, id, irr, pad (u32 each), then
_REDIR_MASKED = 1 << 16      # 24 redirection entries of 64 bits; bit 16 masks the pin


def status(machine: Machine) -> dict[str, Any]:
    """Whether the guest uses the device, as the host can tell: {"present": bool, "active": bool | None, "why": str}.

    Active means the guest unmasked the Generic Event Device's line (GSI 5) in its IO-APIC, which its ACPI GED
    driver does when it binds the device from the DSDT: then the notification reaches the DSDT's _EVT, which
    notifies VGEN. A guest whose ACPI interpreter rejected the tables (or that has no ACPI, or no GED driver) leaves
    the line masked: forks still get a new ID in memory, but the guest is not told. Before the guest has booted
    that far, it is inactive too (the reason says so)."""
    from .kvm import constants as c
    from .kvm import structs as s
    if not present(machine):
        return {"present": False, "active": None,
                "why": "no VMGenID device (only Linux kernels get one by default; load_kernel(vmgenid=True) asks)"}
    chip = s.IrqChip()
    chip.chip_id = c.KVM_IRQCHIP_IOAPIC
    try:
        machine.vm.get_irqchip(chip)
    except Exception as e:          # a machine without an in-kernel irqchip cannot be told either
        return {"present": True, "active": False, "why": f"cannot read the IO-APIC: {e}"}
    entry = int.from_bytes(bytes(chip.data[_IOAPIC_REDIRTBL + 8 * acpi_vmgenid.GSI:
                                           _IOAPIC_REDIRTBL + 8 * acpi_vmgenid.GSI + 8]), "little")
    if entry & _REDIR_MASKED:
        return {"present": True, "active": False,
                "why": f"the guest has not enabled the Generic Event Device (GSI {acpi_vmgenid.GSI} is masked in its "
                       "IO-APIC): its ACPI interpreter rejected the tables, it has no ACPI GED driver, or it has not "
                       "booted that far; forks get a new ID in memory, but the guest is not notified"}
    return {"present": True, "active": True,
            "why": f"the guest enabled the Generic Event Device (GSI {acpi_vmgenid.GSI}): forks notify it"}
