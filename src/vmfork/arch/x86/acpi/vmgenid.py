"""The ACPI side of VMGenID (Microsoft's "Virtual Machine Generation ID"; Linux: drivers/virt/vmgenid.c).

A guest learns that it was cloned from a 128-bit generation ID in memory the firmware describes, and an ACPI
Notify (0x80) on the device when the ID changes; Linux then reseeds its RNG (add_vmfork_randomness). vmfork's
tables describe it as

    Device (VGEN) { _HID "VMGENCTR", _CID "VM_GEN_COUNTER", _UID 0, Name (ADDR, Package { low, high }) }
    Device (GED0) { _HID "ACPI0013", _CRS { Interrupt (Edge, ActiveHigh) { 5 } },
                    Method (_EVT, 1) { If (Arg0 == 5) { Notify (\\_SB.VGEN, 0x80) } } }

A hardware-reduced platform has no GPE block, so the notification goes through a Generic Event Device: an edge on
GSI 5 (a free ISA line of the IO-APIC) runs _EVT. The ID lives in a block of the reserved ACPI area:

    BLOCK_ADDR + 0    b"VMFKVGID"    marks a machine whose tables carry the device (it travels with the RAM: forks,
                                     save files and templates know they have VMGenID without a flag of their own)
    BLOCK_ADDR + 16   the 16-byte generation ID (GUID_ADDR, what ADDR points at)
"""

from __future__ import annotations

from . import aml
from .tables import TABLES_END, Device

BLOCK_ADDR = TABLES_END - 0x100      # the last 256 bytes of the ACPI area: the tables stay below
GUID_ADDR = BLOCK_ADDR + 16
MAGIC = b"VMFKVGID"
GSI = 5
NOTIFY_CHANGED = 0x80


def acpi_devices() -> list[Device]:
    """The DSDT devices of VMGenID: the ID and the event device that notifies it."""
    vgen = Device("VGEN", "VMGENCTR", 0, cid="VM_GEN_COUNTER",
                  extra=(aml.name("_DDN", "VM_Gen_Counter"),
                         aml.name("ADDR", aml.package([GUID_ADDR & 0xFFFFFFFF, GUID_ADDR >> 32]))))
    ged = Device("GED0", "ACPI0013", 0, resources=(aml.extended_interrupt(GSI),),
                 extra=(aml.method("_EVT", [aml.if_(aml.lequal(aml.arg(0), GSI),
                                                    [aml.notify("\\_SB.VGEN", NOTIFY_CHANGED)])], args=1),))
    return [vgen, ged]


__all__ = ["BLOCK_ADDR", "GSI", "GUID_ADDR", "MAGIC", "acpi_devices"]
