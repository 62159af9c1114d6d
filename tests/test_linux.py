"""Linux to a shell on the serial console, and a command typed into it, with 1 and with 2 vCPUs.

The kernel is the small one guests/linux/build-kernel.sh builds from Debian's linux-source-6.1 (a minimal config:
PVH, 8250 console, initramfs, SMP, ACPI, PCI; no ftrace, no crypto self-tests), because Debian's cloud kernel takes
more than 1,600 s to reach /init where guest kernel mode is emulated (bench/linux.py still boots that one). The
initramfs is the busybox one of guests/linux/build.sh with an interactive shell as /init (initramfs-shell.cpio).
The command line is only `console=ttyS0` and the CPU policy the host's default: whatever the host cannot run is
vmfork's business (CPU policy, instruction fallbacks, syscall completion), not the kernel's.

One session fixture boots it once, pauses at the prompt and saves the machine to build/linux-test/, keyed by the
kernel, the initramfs, the vCPU count, the CPU policy and the save-file format; later sessions restore that file
(well under a second) instead of booting. With CI set in the environment it always boots fresh (and times the boot).
The boot's own steps (banner, ACPI, CPUs, /init) are checked before the prompt, so they fail when they fail even
where the prompt does not come."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

import hostprobe
from linux_guest import (
    BOOT_LIMIT,
    CMDLINE,
    COMMAND,
    LINUX,
    LINUX_MIN,
    PROMPT,
    ROOT,
    VCPUS,
    Booted,
    _run_until,
    booted_linux,
)
from vmfork.fork import VM
from vmfork.vm import Machine
from vmfork.workarounds.syscall_probe import stays_in_user_mode


def _completes_syscalls() -> bool:
    """Whether user space can make system calls here: natively, or through vmfork's syscall completion."""
    return True      # every machine has the completion installed where doctor finds syscall stays in user mode


def check_boot_log(out: bytes, vcpus: int) -> None:
    """The kernel's own account of the boot, up to /init: banner and command line, the ACPI tables loaded with no
    error (DSDT devices, the VMGenID device through the GED), every vCPU brought up."""
    text = out.decode(errors="replace")
    tail = text[-3000:]
    assert "Linux version 6.1" in text, tail
    assert f"Command line: {CMDLINE}" in text, tail
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text, tail
    errors = [ln for ln in text.splitlines() if "ACPI Error" in ln or "ACPI BIOS Error" in ln
              or "Unable to load the System Description Tables" in ln]
    assert not errors, errors
    assert re.search(r"ACPI: \d+ ACPI AML tables successfully acquired and loaded", text), tail
    assert "pnp: PnP ACPI: found" in text, "the DSDT's devices (UART, RTC, PS/2) reach PnP: " + tail
    assert f"smp: Brought up 1 node, {vcpus} CPU{'s' if vcpus > 1 else ''}" in text, tail
    assert "Run /init as init process" in text, tail


def shell_answers(booted: Booted, vcpus: int) -> None:
    if booted.vm is None:
        if not _completes_syscalls():
            pytest.skip(hostprobe.report().reason("syscall_cpl3"))
        pytest.skip(f"Linux did not reach the shell prompt here within {BOOT_LIMIT:.0f} s (VMFORK_LINUX_BOOT_LIMIT): "
                    f"{booted.reason}; console tail: "
                    f"{booted.transcript[-300:].decode(errors='replace')!r}")
    assert b"VMFORK-SHELL-READY" in booted.transcript
    vm = booted.vm
    since = len(bytes(vm.device("serial0").output()))
    vm.feed_console(COMMAND)
    out = _run_until(vm, PROMPT, 120, since=since)[since:]
    assert PROMPT in out, out
    answer = out[:out.index(PROMPT)].decode(errors="replace").replace("\r", "").splitlines()
    release = (LINUX_MIN / "release").read_text().strip()
    # the console echoes the command line first
    assert answer[-2:] == [release, str(vcpus)], answer
    if stays_in_user_mode(Machine):
        assert vm.workarounds is not None and vm.workarounds.counts()["syscall-completion"] > 0


def test_linux_boots_to_a_shell_that_answers_a_command(linux_at_prompt: Booted) -> None:
    check_boot_log(linux_at_prompt.transcript, VCPUS)
    shell_answers(linux_at_prompt, VCPUS)


@pytest.fixture(scope="module")
def linux_smp_at_prompt() -> Iterator[Booted]:
    with booted_linux(2) as booted:
        yield booted


def test_linux_with_two_vcpus_brings_up_both_and_answers(linux_smp_at_prompt: Booted) -> None:
    """The second vCPU starts by INIT/SIPI from the guest (KVM's in-kernel LAPIC), in real mode at the kernel's
    trampoline, and runs with the same host fallbacks as the first (workarounds are per vCPU)."""
    check_boot_log(linux_smp_at_prompt.transcript, 2)
    shell_answers(linux_smp_at_prompt, 2)


def test_debian_kernel_boots_to_init_where_kernel_mode_is_native() -> None:
    """Debian's cloud kernel through its PVH entry with the plain init (prints its marker and stops); minutes to
    hours where kernel mode is emulated, so only where it runs natively (bench/linux.py times it here)."""
    hostprobe.require("cpl0_speed")
    subprocess.run([str(ROOT / "guests" / "linux" / "build.sh")], check=True)
    with VM.create(memory_mib=512, name="linux") as vm:
        vm.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"), cmdline=CMDLINE + " panic=-1")
        out = _run_until(vm, b"VMFORK-INIT-READY", timeout=120)
    assert b"VMFORK-INIT-READY" in out, out[-2000:]
