"""The env channel read by a real Linux guest: the CI kernel boots an initramfs whose /init is
guests/linux/vmfork-env itself (it serves: prints the strings for every line typed on the console), is paused at
its ready line, and every fork prints its own strings, through the kernel's console, system calls and ioperm.
The boot is cached as a save file under build/linux-test/ (keyed by kernel, helper and vmfork's save format)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork.fork import VM
from vmfork.snapshot import savefile

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "build" / "linux-min" / "vmlinux"
CACHE = ROOT / "build" / "linux-test"
READY = b"VMFORK-ENV-READY"
END = b"VMFORK-ENV-END"
CPUID = "default"
BOOT_LIMIT = float(os.environ.get("VMFORK_LINUX_BOOT_LIMIT", "900"))


def _initramfs() -> bytes:
    sys.path.insert(0, str(ROOT / "guests" / "linux"))
    try:
        import mkinitramfs
    finally:
        sys.path.pop(0)
    a = mkinitramfs.Cpio()
    for d in ("dev", "proc", "sys"):
        a.dir(d)
    a.chardev("dev/console", 5, 1, 0o600)
    a.file("init", mkinitramfs.env_helper())
    return a.finish()


def run_until(vm: VM, marker: bytes, timeout: float) -> bytes:
    serial = vm.device("serial0")
    since = len(serial.output())
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.wait(0.2).reason == "timeout":
            if marker in bytes(serial.output())[since:]:
                break
    finally:
        if vm.state == "running":
            vm.pause()
    return bytes(serial.output())[since:]


@pytest.fixture(scope="module")
def env_linux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    if not KERNEL.exists():
        pytest.skip("no CI kernel in build/linux-min (guests/linux/build-kernel.sh)")
    cpio = _initramfs()
    key = hashlib.sha256(KERNEL.read_bytes() + cpio + f"{CPUID}|{savefile.FORMAT}".encode()).hexdigest()[:16]
    saved = CACHE / f"env-{key}.save"
    if saved.exists() and not os.environ.get("CI"):
        vm = savefile.restore(saved)
    else:
        initrd = tmp_path_factory.mktemp("envlinux") / "env.cpio"
        initrd.write_bytes(cpio)
        vm = VM.create(memory_mib=256, name="envlinux", cpuid=CPUID)
        vm.load_kernel(KERNEL, initrd=str(initrd), cmdline="console=ttyS0")
        out = run_until(vm, READY, BOOT_LIMIT)
        if READY not in out:
            vm.destroy()
            pytest.fail(f"the env helper as /init did not start within {BOOT_LIMIT:.0f} s: {out[-2000:]!r}")
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob("env-*.save"):
            old.unlink()
        savefile.save(vm, saved.with_suffix(".tmp"))
        saved.with_suffix(".tmp").rename(saved)
    try:
        yield vm
    finally:
        vm.destroy(tree=True)


def ask(vm: VM, timeout: float = 120) -> str:
    vm.feed_console(b"\n")
    out = run_until(vm, END, timeout)
    assert END in out, out
    return out.decode(errors="replace").replace("\r", "")


def test_each_linux_fork_reads_its_own_strings(env_linux: VM) -> None:
    forks = [env_linux.fork(env={"hostname": f"web-{i}", "ROLE": f"it's #{i}"}) for i in range(3)]
    plain = env_linux.fork()
    try:
        for i, f in enumerate(forks):
            out = ask(f)
            assert "# vmfork env generation 1\n" in out, out
            assert f"export hostname='web-{i}'\n" in out and f"export ROLE='it'\\''s #{i}'\n" in out, out
        assert "export" not in ask(plain)
        # a reset goes back to the fork point with the fork's strings; a fork of the fork adds its own
        forks[0].reset()
        assert "export hostname='web-0'" in ask(forks[0])
        forks[1].reset()
        grandchild = forks[1].fork(env={"ZONE": "b"})
        out = ask(grandchild)
        assert "export hostname='web-1'" in out and "export ZONE='b'" in out and "generation 2" in out, out
        grandchild.destroy()
    finally:
        for f in [*forks, plain]:
            f.destroy(tree=True)
