"""ACPI tables (vmfork.arch.x86.acpi): parsed back byte by byte, checked by an independent disassembler (iasl from
Debian's acpica-tools) where installed, found in a booted guest's memory, and read by a real Linux kernel."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from guest import boot, console, run_to_exit
from vmfork.arch.x86 import layout
from vmfork.arch.x86.acpi import TABLES_ADDR, TABLES_END, Device, aml, build, standard_devices
from vmfork.arch.x86.acpi.tables import IOAPIC_ADDR, LAPIC_ADDR

HEADER = struct.Struct("<4sIBB6s8sI4sI")


def _table(blob: bytes, base: int, addr: int) -> tuple[bytes, bytes]:
    """(signature, whole table) at guest address `addr`, checking its length and checksum."""
    off = addr - base
    assert 0 <= off and off + HEADER.size <= len(blob), f"table address {addr:#x} outside the blob"
    sig, length = struct.unpack_from("<4sI", blob, off)
    assert off + length <= len(blob), f"{sig!r} runs past the blob"
    raw = blob[off:off + length]
    assert sum(raw) % 256 == 0, f"{sig!r} checksum"
    return sig, raw


def parse(blob: bytes, base: int) -> dict[bytes, bytes]:
    """Every table reachable from the RSDP at `base`, by signature; asserts the structure on the way."""
    rsdp = blob[0:36]
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0, "RSDP checksum (ACPI 1.0 part)"
    assert sum(rsdp) % 256 == 0, "RSDP extended checksum"
    revision, rsdt_addr, length, xsdt_addr = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, length) == (2, 36)
    out: dict[bytes, bytes] = {}
    sig, xsdt = _table(blob, base, xsdt_addr)
    assert sig == b"XSDT"
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    sig, rsdt = _table(blob, base, rsdt_addr)
    assert sig == b"RSDT"
    assert struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36) == entries, "RSDT and XSDT list the same"
    out[b"XSDT"], out[b"RSDT"] = xsdt, rsdt
    for addr in entries:
        sig, raw = _table(blob, base, addr)
        out[sig] = raw
    fadt = out[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    x_dsdt = struct.unpack_from("<Q", fadt, 140)[0]
    sig, out[b"DSDT"] = _table(blob, base, x_dsdt)
    assert sig == b"DSDT"
    return out


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2 and pos + length <= len(madt), "MADT entry length"
        entries.append((kind, madt[pos:pos + length]))
        pos += length
    assert pos == len(madt)
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_tables_parse_back(vcpus: int) -> None:
    t = build(vcpus)
    assert t.base == t.rsdp == TABLES_ADDR and t.end <= TABLES_END
    tables = parse(t.blob, t.base)
    assert set(tables) == {b"XSDT", b"RSDT", b"FACP", b"APIC", b"DSDT"}
    for sig, raw in tables.items():
        assert HEADER.unpack_from(raw)[4] == b"VMFORK", sig
    fadt = tables[b"FACP"]
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "hardware-reduced ACPI"
    assert struct.unpack_from("<H", fadt, 109)[0] & 2, "the PS/2 controller is announced (IAPC_BOOT_ARCH 8042)"
    assert fadt[116] == 1 and struct.unpack_from("<Q", fadt, 120)[0] == 0x64 and fadt[128] == 0xFE, "reset reg"
    madt = tables[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (LAPIC_ADDR, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic_id, flags) for _, _, uid, apic_id, flags in lapics] == [(i, i, 1) for i in range(vcpus)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert [(io_id, addr, gsi) for _, _, io_id, _, addr, gsi in ioapics] == [(0, IOAPIC_ADDR, 0)]
    assert any(k == 4 for k, _ in entries), "LINT1 wired to NMI"


def test_the_dsdt_describes_the_uart() -> None:
    dsdt = parse(build(1).blob, TABLES_ADDR)[b"DSDT"]
    com1 = aml.device("COM1", [aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", 0),
                               aml.name("_CRS", aml.resource_template([aml.io_port(0x3F8, 8),
                                                                       aml.irq_no_flags(4)]))])
    assert com1 in dsdt
    # the same bytes, spelled out: Device (COM1) { Name (_HID, EisaId ("PNP0501")) ... }
    assert b"\x5b\x82" in com1 and b"COM1\x08_HID\x0c\x41\xd0\x05\x01" in com1
    assert b"\x47\x01\xf8\x03\xf8\x03\x01\x08" in com1, "IO (Decode16, 0x3F8, 0x3F8, 1, 8)"
    assert b"\x22\x10\x00" in com1, "IRQNoFlags () {4}"


def test_aml_encodings() -> None:
    assert aml.pkg_length(0) == b"\x01" and aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == b"\x41\x04"           # 65 = 0x41: two bytes, low nibble 1, then 0x04
    n = 0x1000 + 3
    enc = aml.pkg_length(0x1000)
    assert enc[0] >> 6 == 2 and (enc[0] & 0xF) | enc[1] << 4 | enc[2] << 12 == n
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01" and aml.integer(0x10) == b"\x0a\x10"
    assert aml.integer(0x1234) == b"\x0b\x34\x12" and aml.integer(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1" and aml.name_string("RTC") == b"RTC_"
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    with pytest.raises(ValueError):
        aml.name_string("1BAD")


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl (Debian's acpica-tools, installed by ./dev test) is not installed")
@pytest.mark.parametrize("vcpus", [1, 2])
def test_iasl_disassembles_every_table(vcpus: int, tmp_path: Path) -> None:
    """An independent reader: ACPICA's disassembler must read each table without complaint, and see what we
    meant (the UART's _HID, ports and IRQ; one LAPIC per vCPU; a VMGenID-style device with _CID and ADDR)."""
    vmgenid = Device("VGEN", "VMGENCTR", cid="VM_Gen_Counter",
                     extra=(aml.method("ADDR", [aml.return_(aml.package([0x1000, 0]))]),))
    t = build(vcpus, devices=[*standard_devices(), vmgenid])
    text = {}
    for sig, raw in parse(t.blob, t.base).items():
        f = tmp_path / f"{sig.decode().lower()}.dat"
        f.write_bytes(raw)
        run = subprocess.run([str(IASL), "-d", str(f)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        out = f.with_suffix(".dsl").read_text()
        assert "Error" not in out and "Invalid" not in out and "Warning" not in out, out
        text[sig] = out
    dsdt = text[b"DSDT"]
    assert "Device (COM1)" in dsdt and 'EisaId ("PNP0501")' in dsdt
    assert "0x03F8,             // Range Minimum" in dsdt and "{4}" in dsdt
    assert 'Name (_HID, "VMGENCTR")' in dsdt and 'Name (_CID, "VM_Gen_Counter")' in dsdt
    assert "Method (ADDR, 0, NotSerialized)" in dsdt
    assert text[b"APIC"].count("[Processor Local APIC]") == vcpus
    assert "Hardware Reduced (V5) : 1" in text[b"FACP"]


def test_a_booted_guest_finds_the_tables(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "hello", machines, vcpus=2)
    t = build(2)
    assert vm.memory.read(TABLES_ADDR, len(t.blob)) == t.blob
    rsdp_paddr = struct.unpack_from("<Q", vm.memory.read(layout.START_INFO_ADDR, 56), 32)[0]
    assert rsdp_paddr == TABLES_ADDR, "PVH start info points at the RSDP"
    e820 = layout.e820_map(vm.memory.size)
    assert any(a <= TABLES_ADDR and t.end <= a + s and kind == layout.E820_RESERVED for a, s, kind in e820)
    run_to_exit(vm)                 # the test guest, which ignores ACPI, still runs its program
    assert "vmfork-guest: hello pvh ram=64MiB" in console(vm)


def test_a_machine_can_describe_one_more_device(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    """What a VMGenID device (issue 15) needs: an extra DSDT device with _HID, _CID and an ADDR method."""
    from vmfork.fork import VM
    vgen = Device("VGEN", "VMGENCTR", cid="VM_Gen_Counter",
                  extra=(aml.method("ADDR", [aml.return_(aml.package([0xEF000, 0]))]),))
    vm = VM.create(memory_mib=64, name="vgen")
    machines.append(vm)
    vm.load_kernel(pvh_guest, cmdline="hello", acpi_devices=[vgen])
    t = build(1, devices=[*standard_devices(), vgen])
    dsdt = parse(vm.memory.read(TABLES_ADDR, len(t.blob)), TABLES_ADDR)[b"DSDT"]
    assert vgen.aml() in dsdt and standard_devices()[0].aml() in dsdt


def test_without_acpi_the_bios_area_stays_empty(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    from vmfork.fork import VM
    vm = VM.create(memory_mib=64, name="noacpi")
    machines.append(vm)
    vm.load_kernel(pvh_guest, cmdline="hello", acpi=False)
    assert vm.memory.read(TABLES_ADDR, 64) == bytes(64)
    assert struct.unpack_from("<Q", vm.memory.read(layout.START_INFO_ADDR, 56), 32)[0] == 0
