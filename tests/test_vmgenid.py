"""VMGenID: the ACPI description (checked by ACPICA's own disassembler) and a new generation ID per fork and
restore, for Linux kernels only; a Linux at its shell prompt reseeds its RNG in every fork."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmfork import vmgenid
from vmfork.arch.x86 import acpi
from vmfork.arch.x86.acpi import vmgenid as acpi_vmgenid
from vmfork.arch.x86.acpi.tables import standard_devices
from vmfork.fork import VM
from vmfork.snapshot import restore, save

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"


@pytest.mark.skipif(shutil.which("iasl") is None, reason="no iasl (Debian's acpica-tools) to disassemble with")
def test_the_dsdt_disassembles_to_the_vgen_and_ged_devices(tmp_path: Path) -> None:
    tables = acpi.build(2, devices=[*standard_devices(), *acpi_vmgenid.acpi_devices()])
    off = tables.tables["DSDT"] - tables.base
    length = int.from_bytes(tables.blob[off + 4:off + 8], "little")
    (tmp_path / "dsdt.dat").write_bytes(tables.blob[off:off + length])
    p = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    guid = f"{acpi_vmgenid.GUID_ADDR:#X}"[2:]
    for want in ('Device (VGEN)', '"VMGENCTR"', '"VM_GEN_COUNTER"', "Name (ADDR, Package", guid,
                 "Device (GED0)", '"ACPI0013"', "Method (_EVT, 1", "Notify (\\_SB.VGEN, 0x80)", "0x00000005"):
        assert want.upper() in dsl.upper(), (want, dsl)


@pytest.fixture
def linux_machine(machines: list) -> VM:  # type: ignore[type-arg]
    if not (LINUX / "vmlinux").exists():
        pytest.skip("no Debian kernel in build/linux (guests/linux/build.sh)")
    vm = VM.create(memory_mib=256, name="linux")
    machines.append(vm)
    vm.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"), cmdline="console=ttyS0")
    return vm


def test_forks_and_restores_get_their_own_generation(linux_machine: VM, machines: list,  # type: ignore[type-arg]
                                                     tmp_path: Path) -> None:
    parent = linux_machine
    assert vmgenid.present(parent)
    mine = vmgenid.current(parent)
    forks = [parent.fork() for _ in range(3)]
    machines[:0] = forks
    ids = [vmgenid.current(f) for f in forks]
    assert len({mine, *ids}) == 4, ids
    forks[0].memory.write(acpi_vmgenid.GUID_ADDR, bytes(16))     # whatever happens to it: a reset gives it back
    forks[0].reset()
    assert vmgenid.current(forks[0]) == ids[0]
    for f in forks:
        f.destroy()
    path = tmp_path / "l.sav"
    save(parent, path)
    a, b = restore(path), restore(path)
    machines[:0] = [a, b]
    assert len({mine, vmgenid.current(a), vmgenid.current(b)}) == 3


def test_other_guests_get_no_vmgenid(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=64, name="t")
    machines.append(vm)
    vm.load_kernel(pvh_guest, cmdline="demo")
    assert not vmgenid.present(vm)
    child = vm.fork()
    machines.insert(0, child)
    assert vmgenid.current(child) is None and child._vmgenid_id is None


def test_vmgenid_can_be_asked_for_and_refused(pvh_guest: Path, linux_machine: VM, machines: list) -> None:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=64, name="t")
    machines.append(vm)
    vm.load_kernel(pvh_guest, cmdline="demo", vmgenid=True)
    assert vmgenid.present(vm)
    off = VM.create(memory_mib=256, name="l")
    machines.append(off)
    off.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"), cmdline="console=ttyS0",
                    vmgenid=False)
    assert not vmgenid.present(off)


def test_a_guest_without_the_driver_boots_and_the_device_reads_inactive(pvh_guest: Path,
                                                                         machines: list) -> None:  # type: ignore[type-arg]
    """The test guest knows no ACPI: it leaves the GED line masked. It runs to its ready marker with the device
    described, its forks get new IDs in memory, and vmgenid.status says the device is inactive and why."""
    vm = VM.create(memory_mib=64, name="t")
    machines.append(vm)
    vm.load_kernel(pvh_guest, cmdline="demo", vmgenid=True)
    assert vm.run(timeout=30).reason == "harness-start"
    st = vmgenid.status(vm)
    assert (st["present"], st["active"]) == (True, False), st
    assert "GSI 5 is masked" in st["why"] and "not notified" in st["why"], st
    child = vm.fork()
    machines.insert(0, child)
    assert vmgenid.current(child) != vmgenid.current(vm)
    assert vmgenid.status(child)["active"] is False
    assert child.run(timeout=30).reason == "exit"
    plain = VM.create(memory_mib=64, name="p")
    machines.append(plain)
    plain.load_kernel(pvh_guest, cmdline="demo")
    assert vmgenid.status(plain) == {"present": False, "active": None, "why": vmgenid.status(plain)["why"]}
