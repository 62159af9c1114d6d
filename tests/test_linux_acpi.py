"""The real Debian kernel (guests/linux/build.sh) reads vmfork's ACPI tables: its own log lines say it found the
RSDP and the MADT, set up the IO-APIC and counted every vCPU. About a minute and a half on a host whose guest
kernel mode is emulated (CI), a second on VT-x/AMD-V."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from vmfork.arch.x86.acpi import TABLES_ADDR
from vmfork.fork import VM

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"
CMDLINE = "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr panic=-1"
BOOT_LIMIT_S = 300


@pytest.fixture(scope="module")
def linux() -> tuple[Path, Path]:
    vmlinux, initrd = LINUX / "vmlinux", LINUX / "initramfs.cpio.gz"
    if not (vmlinux.exists() and initrd.exists()):
        subprocess.run([str(ROOT / "guests" / "linux" / "build.sh")], check=True)
    return vmlinux, initrd


def _boot_until(vm: VM, marker: bytes, timeout: float) -> bytes:
    serial = vm.device("serial0")
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.state == "running":
            if marker in serial.output():
                break
            time.sleep(0.2)
    finally:
        vm.pause()
    return bytes(serial.output())


def test_linux_finds_the_madt_the_ioapic_and_both_vcpus(linux: tuple[Path, Path]) -> None:
    vmlinux, initrd = linux
    with VM.create(memory_mib=256, vcpus=2, name="linux-acpi") as vm:
        vm.load_kernel(vmlinux, initrd=str(initrd), cmdline=CMDLINE)
        # The marker is the end of the line asserted below, so the whole line has been read when the boot stops.
        out = _boot_until(vm, b" hotplug CPUs", timeout=BOOT_LIMIT_S).decode(errors="replace")
    tail = out[-3000:]
    assert f"ACPI: RSDP 0x{TABLES_ADDR:016X} 000024 (v02 VMFORK)" in out, tail
    for sig in ("XSDT", "FACP", "DSDT", "APIC"):
        assert f"ACPI: {sig} 0x" in out and "VMFORK VMFORKVM" in out, (sig, tail)
    assert "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23" in out, tail
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in out, tail
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in out, tail
    assert "MADT or MP tables are not detected" not in out
