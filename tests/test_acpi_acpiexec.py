"""vmfork's ACPI tables loaded and run by ACPICA itself (`acpiexec`, Debian's acpica-tools, the same interpreter
Linux carries in drivers/acpi/acpica): the namespace loads with no error or warning, the devices are where the
kernel will look for them, and the Generic Event Device's _EVT notifies the VMGenID device (what a fork's
interrupt on GSI 5 makes Linux do).

Linux's "ACPI Error: AE_BAD_PARAMETER, During Region initialization" with the CI kernel was not these tables: ACPICA
installs a PCI_Config region handler before it loads any table, and a kernel built without CONFIG_PCI has none
(guests/linux/minimal.config). acpiexec has it, so these tests check the tables alone; tests/test_linux.py checks
that the booted kernel's log has no "ACPI Error" line."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmfork.arch.x86.acpi import Device, aml, build, standard_devices, vmgenid

ACPIEXEC = shutil.which("acpiexec")
pytestmark = pytest.mark.skipif(ACPIEXEC is None,
                                reason="acpiexec (Debian's acpica-tools, installed by ./dev test) is not installed")


def _write_tables(tmp_path: Path, vcpus: int, devices: list[Device]) -> list[Path]:
    """The FADT, MADT and DSDT as acpiexec takes them (it makes its own RSDP and XSDT)."""
    t = build(vcpus, devices=devices)
    files = []
    for sig in ("FACP", "APIC", "DSDT"):
        off = t.tables[sig] - t.base
        length = struct.unpack_from("<I", t.blob, off + 4)[0]
        f = tmp_path / f"{sig.lower()}.dat"
        f.write_bytes(t.blob[off:off + length])
        files.append(f)
    return files


def acpiexec(tables: list[Path], *commands: str) -> str:
    """Run acpiexec in batch mode on `tables` with `commands`; its whole output."""
    run = subprocess.run([str(ACPIEXEC), "-b", "; ".join(commands) if commands else "quit",
                          *(str(t) for t in tables)], capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    return out


def _problems(out: str) -> list[str]:
    words = ("Error", "Exception", "Warning", "AE_", "Could not", "failed")
    return [ln for ln in out.splitlines() if any(w in ln for w in words)]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_acpica_loads_every_table_with_no_error(vcpus: int, tmp_path: Path) -> None:
    devices = [*standard_devices(), *vmgenid.acpi_devices()]
    out = acpiexec(_write_tables(tmp_path, vcpus, devices))
    assert not _problems(out), out
    assert "ACPI: FACP" in out and "ACPI: APIC" in out and "ACPI: DSDT" in out, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out, out
    assert f"{len(devices)} Devices" in out, out


def test_acpica_finds_the_devices_and_runs_the_vmgenid_notification(tmp_path: Path) -> None:
    out = acpiexec(_write_tables(tmp_path, 2, [*standard_devices(), *vmgenid.acpi_devices()]),
                   "evaluate \\_SB.VGEN.ADDR", "evaluate \\_SB.COM1._CRS", "evaluate \\_SB.GED0._CRS",
                   f"evaluate \\_SB.GED0._EVT {vmgenid.GSI}", f"evaluate \\_SB.GED0._EVT {vmgenid.GSI + 1}")
    assert not _problems(out), out
    low, high = vmgenid.GUID_ADDR & 0xFFFFFFFF, vmgenid.GUID_ADDR >> 32
    assert f"[Integer] = {low:016X}\n    [Integer] = {high:016X}" in out, out
    assert "47 01 F8 03 F8 03 01 08 22 10 00 79 00" in out, "COM1: IO 0x3F8/8, IRQ 4"
    # Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 }
    assert "89 06 00 03 01 05 00 00 00 79 00" in out, out
    # _EVT(5) notifies VGEN with 0x80 (the generation changed); _EVT(6) does nothing
    assert out.count("Received a Device Notify on [VGEN]") == 1, out
    assert "Value 0x80" in out, out


def test_acpica_reports_a_broken_dsdt(tmp_path: Path) -> None:
    """The check can fail: a method that notifies a device that does not exist is an error ACPICA prints."""
    broken = Device("BAD0", "PNP0C02", extra=(aml.method("_INI", [aml.notify("\\_SB.NONE", 0x80)]),))
    files = _write_tables(tmp_path, 1, [*standard_devices(), broken])
    run = subprocess.run([str(ACPIEXEC), "-b", "evaluate \\_SB.BAD0._INI", *(str(t) for t in files)],
                         capture_output=True, text=True, timeout=120)
    assert _problems(run.stdout + run.stderr), run.stdout + run.stderr
