"""The env channel read by a real Linux guest: the CI kernel boots an initramfs whose /init is
guests/linux/vmfork-env itself (it serves: prints the strings for every line typed on the console), is paused at
its ready line, and every fork prints its own strings, through the kernel's console, system calls and ioperm.
The boot is cached as a save file under build/linux-test/ (vmfork.demo_linux.boot_to_prompt: keyed by kernel,
initramfs, CPU policy and vmfork's save format); bench/linux_fork.py --guest env shares it."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork.demo_linux import boot_to_prompt, run_until
from vmfork.errors import VmforkError
from vmfork.fork import VM

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "build" / "linux-min" / "vmlinux"
CACHE = ROOT / "build" / "linux-test" / "env"      # not beside the shell fixture's *.save (it clears those)
READY = b"VMFORK-ENV-READY"
END = b"VMFORK-ENV-END"
BOOT_LIMIT = float(os.environ.get("VMFORK_LINUX_BOOT_LIMIT", "900"))


def env_initrd() -> Path:
    """The initramfs whose /init is vmfork-env (written to build/linux-test/env/env-init.cpio when it changed)."""
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
    data = a.finish()
    path = CACHE / "env-init.cpio"
    CACHE.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def env_linux() -> Iterator[VM]:
    if not KERNEL.exists():
        pytest.skip("no CI kernel in build/linux-min (guests/linux/build-kernel.sh)")
    try:
        at = boot_to_prompt(kernel=KERNEL, initrd=env_initrd(), prompt=READY, cache=CACHE, limit=BOOT_LIMIT,
                            log=False)
    except VmforkError as e:
        pytest.fail(f"the env helper as /init did not start: {e}")
    try:
        yield at.vm
    finally:
        at.vm.destroy(tree=True)


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


def test_linux_enabled_the_vmgenid_notification(env_linux: VM) -> None:
    """This kernel (CONFIG_VMGENID, ACPI GED) loads the DSDT and binds the GED: vmgenid.status says active (a guest
    without the driver reads inactive: tests/test_vmgenid.py)."""
    from vmfork import vmgenid
    st = vmgenid.status(env_linux)
    assert (st["present"], st["active"]) == (True, True), st


def _random(out: str) -> str:
    m = re.search(r"# random ([0-9a-f]{32})", out)
    assert m, out
    return m.group(1)


def test_linux_forks_and_restores_reseed_their_rng(env_linux: VM, tmp_path: Path) -> None:
    """Every fork (and every restore of one save file) reads different getrandom() bytes.

    Measured 2026-12-07: forks made with new_generation=False differed too, so this guest cannot show VMGenID's own
    effect: its kernel is minutes into its boot (the crng reseeds from the input pool every few seconds that early)
    and interrupt timings, which differ between forks under emulation, feed that pool. The test checks what users
    rely on; that the notification reaches the guest is test_linux_enabled_the_vmgenid_notification."""
    from vmfork.snapshot import restore, save
    fresh = [env_linux.fork() for _ in range(3)]
    try:
        got = [_random(ask(f)) for f in fresh]
        assert len(set(got)) == 3, got
    finally:
        for f in fresh:
            f.destroy()
    save(env_linux, tmp_path / "env.save")
    restored = [restore(tmp_path / "env.save") for _ in range(3)]
    try:
        got = [_random(ask(r)) for r in restored]
        assert len(set(got)) == 3, got
    finally:
        for r in restored:
            r.destroy()
