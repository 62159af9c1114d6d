"""The Linux guest the Linux tests share: the small CI kernel and the busybox shell initramfs, booted once per session
to its shell prompt (see tests/test_linux.py). A session fixture in conftest.py, so that every module using it
shares the one boot."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmfork.fork import VM
from vmfork.procfork import ProcessFork
from vmfork.snapshot import savefile

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"
LINUX_MIN = ROOT / "build" / "linux-min"
CACHE = ROOT / "build" / "linux-test"
CMDLINE = "console=ttyS0"
PROMPT = b"vmfork# "
PANIC = b"Kernel panic - not syncing"
COMMAND = b"uname -r; cat /proc/cpuinfo | grep -c processor\n"
BOOT_LIMIT = float(os.environ.get("VMFORK_LINUX_BOOT_LIMIT", "900"))
VCPUS = 1
# The host's default policy, nothing more: where guest kernel mode is emulated it hides tsc-deadline too
# (arch/x86/emulator_probe.py: probe_tsc_deadline), which this kernel's periodic tick needs.
CPUID = "default"


@dataclass
class Booted:
    """The machine paused at the shell prompt, and what its console printed on the way."""

    vm: VM | None               # None when the boot did not reach the prompt
    transcript: bytes
    how: str                    # "booted in N s" or "restored in N s"
    reason: str = ""            # why the prompt was not reached


def _build() -> tuple[Path, Path, str]:
    subprocess.run([str(ROOT / "guests" / "linux" / "build.sh")], check=True)
    subprocess.run([str(ROOT / "guests" / "linux" / "build-kernel.sh")], check=True)
    return (LINUX_MIN / "vmlinux", LINUX / "initramfs-shell.cpio",
            (LINUX_MIN / "release").read_text().strip())


def _key(kernel: Path, initrd: Path, vcpus: int = VCPUS) -> str:
    h = hashlib.sha256()
    for f in (kernel, initrd):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    from vmfork.arch.x86 import emulator_probe
    from vmfork.vm import open_kvm
    policy = emulator_probe.concrete(open_kvm(), CPUID)        # the policy as this host makes it concrete
    h.update(f"{CMDLINE}|{vcpus}|{policy}|{savefile.FORMAT}|{savefile.MAGIC!r}".encode())
    h.update((ROOT / "src" / "vmfork" / "snapshot" / "container.py").read_bytes())
    return f"{vcpus}cpu-{h.hexdigest()[:20]}"


def _run_until(vm: VM, marker: bytes, timeout: float, *, since: int = 0) -> bytes:
    serial = vm.device("serial0")
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        # wait() returns a "timeout" event while the machine runs, and finishes it once it stopped (a crash)
        while time.monotonic() < deadline and vm.wait(0.2).reason == "timeout":
            out = bytes(serial.output())[since:]
            if marker in out or PANIC in out:       # a panicked kernel never prints the marker: stop waiting
                break
    finally:
        if vm.state == "running":
            vm.pause()
    return bytes(serial.output())


def spawning_command(i: int) -> tuple[bytes, bytes]:
    """A shell command that starts new processes (a command substitution and a pipe), so that the fork's page
    tables change, and the answer it must print; a different one for each `i`."""
    return (f"echo r{i}-$(({i}*7+3)) $(echo x{i} | cat)\n".encode(), f"r{i}-{i * 7 + 3} x{i}".encode())


def ask(vm: VM | ProcessFork, command: bytes, timeout: float = 300) -> bytes:
    """Type `command` at the fork's prompt and return what it printed up to its next prompt or a kernel panic (a
    process fork's console is read over its control channel, so it is polled less often)."""
    if isinstance(vm, ProcessFork):
        output, poll = vm.console, 0.5
    else:
        serial = vm.device("serial0")
        output, poll = (lambda: bytes(serial.output())), 0.2
    since = len(output())
    vm.feed_console(command)
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.wait(poll).reason == "timeout":
            out = output()[since:]
            if PROMPT in out or PANIC in out:
                break
    finally:
        if vm.state == "running":
            vm.pause()
    return output()[since:]


def _boot(kernel: Path, initrd: Path, vcpus: int = VCPUS) -> Booted:
    vm = VM.create(memory_mib=256, vcpus=vcpus, name="linux", cpuid=CPUID)
    assert vm.load_kernel(kernel, initrd=str(initrd), cmdline=CMDLINE) == "linux-pvh"
    t0 = time.monotonic()
    out = _run_until(vm, PROMPT, BOOT_LIMIT)
    took = time.monotonic() - t0
    if PROMPT in out:
        return Booted(vm, out, f"booted in {took:.0f} s")
    ev = vm.stop_event
    reason = f"no prompt within {took:.0f} s ({ev.reason}: {ev.detail})" if ev else f"no prompt within {took:.0f} s"
    if PANIC in out:
        line = out[out.index(PANIC):].split(b"\n")[0].decode(errors="replace").strip()
        reason = f"the kernel panicked after {took:.0f} s: {line}"
    vm.destroy()
    return Booted(None, out, "", reason)


@contextlib.contextmanager
def booted_linux(vcpus: int = VCPUS) -> Iterator[Booted]:
    """Linux with `vcpus` vCPUs paused at its shell prompt: restored from build/linux-test/ when a save for the same
    inputs is there (not under CI), else booted (and saved). Destroyed on exit."""
    kernel, initrd, _ = _build()
    saved = CACHE / f"{_key(kernel, initrd, vcpus)}.save"
    transcript = saved.with_suffix(".log")
    if saved.exists() and transcript.exists() and not os.environ.get("CI"):
        t0 = time.monotonic()
        vm = savefile.restore(saved)
        booted = Booted(vm, transcript.read_bytes(), f"restored in {time.monotonic() - t0:.2f} s")
    else:
        booted = _boot(kernel, initrd, vcpus)
        if booted.vm is not None:
            CACHE.mkdir(parents=True, exist_ok=True)
            for old in (*CACHE.glob(f"{vcpus}cpu-*.save"), *CACHE.glob("[!0-9]*.save")):
                old.unlink()
            tmp = saved.with_suffix(".tmp")
            savefile.save(booted.vm, tmp)
            transcript.write_bytes(booted.transcript)
            tmp.rename(saved)
    print(f"\nLinux ({vcpus} vCPU{'s' if vcpus > 1 else ''}) at the shell prompt: {booted.how or booted.reason}")
    try:
        yield booted
    finally:
        if booted.vm is not None:
            booted.vm.destroy()


@pytest.fixture(scope="session")
def linux_at_prompt() -> Iterator[Booted]:
    with booted_linux(VCPUS) as booted:
        yield booted
