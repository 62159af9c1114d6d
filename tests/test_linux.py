"""A real Debian kernel (prepared by guests/linux/build.sh) booted through its PVH entry.

On a host whose guest kernel mode is emulated (this project's CI), Linux gets far enough to print its banner but
cannot reach user space (it dies on `lock cmpxchg16b`), so the second test needs native kernel mode."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

import hostprobe
from vmfork.fork import VM

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"


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


def test_linux_prints_its_banner_on_the_uart(linux: tuple[Path, Path]) -> None:
    vmlinux, initrd = linux
    with VM.create(memory_mib=256, name="linux") as vm:
        protocol = vm.load_kernel(vmlinux, initrd=str(initrd),
                                  cmdline="earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr panic=-1")
        assert protocol == "linux-pvh"
        # Wait for the whole command-line line: the kernel prints it right after the banner, a byte per emulated
        # UART write, so stopping at the banner alone can cut it off on a busy host.
        out = _boot_until(vm, b"Command line: earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr panic=-1",
                          timeout=300)
    assert b"Linux version 6.1" in out, out[-2000:]
    assert b"Command line: earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr panic=-1" in out, out[-2000:]


def test_linux_boots_to_init(linux: tuple[Path, Path]) -> None:
    hostprobe.require("cpl0_speed")
    vmlinux, initrd = linux
    with VM.create(memory_mib=512, name="linux") as vm:
        vm.load_kernel(vmlinux, initrd=str(initrd), cmdline="console=ttyS0 panic=-1")
        out = _boot_until(vm, b"VMFORK-INIT-READY", timeout=120)
    assert b"VMFORK-INIT-READY" in out, out[-2000:]
