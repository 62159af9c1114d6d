"""Template save files: RAM saved as a sparse page-aligned image and restored by mapping it copy-on-write.

The foreign guest is a real Debian kernel (guests/linux/build.sh) saved mid-boot: its template, mapped, boots on.
The test guests check exactness (byte-identical RAM, same results as a classic restore) and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from cli_harness import CliHarness
from guest import boot, console, run_to_exit, run_to_ready, write_input
from vmfork.errors import ForkError, SnapshotFormatError, VmStateError
from vmfork.fork import VM, kernel_mode_emulated
from vmfork.snapshot import restore, save
from vmfork.snapshot.template import TemplateError

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"


def ram_digest(vm: VM) -> str:
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of checked templates of the test's own, so every test checks its files afresh."""
    d = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    return d


@pytest.fixture
def parent(pvh_guest: Path, machines: list) -> tuple[VM, int]:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "demo", machines)
    buf, _ = run_to_ready(vm)
    return vm, buf


def test_template_is_sparse_readonly_and_restores_by_mapping(parent: tuple[VM, int], tmp_path: Path,
                                                             cache_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm, buf = parent
    path = tmp_path / "t.tpl"
    info = save(vm, path, template=True)
    st = path.stat()
    assert st.st_mode & 0o777 == 0o444
    assert st.st_size >= vm.memory.size
    assert st.st_blocks * 512 < (info.stored_pages + 64) * 4096      # zero pages are holes
    mapped = restore(path)
    machines.append(mapped)
    assert mapped.template == str(path)
    assert ram_digest(mapped) == ram_digest(vm)
    # A classic restore of the same machine gives the same results.
    classic_path = tmp_path / "t.sav"
    save(vm, classic_path)
    classic = restore(classic_path)
    machines.append(classic)
    for m in (mapped, classic):
        write_input(m, buf, b"hello")
        run_to_exit(m)
    assert console(mapped) == console(classic)
    # The mapped machine is a fork of the file: reset goes back to the file's state.
    mapped.reset()
    assert ram_digest(mapped) == ram_digest(vm)
    write_input(mapped, buf, b"hello")
    run_to_exit(mapped)
    # Its pages come from the file: nothing of the guest's RAM is copied into this process up front.
    assert mapped.memory.fd is None


def test_template_forks_and_copy_restore(parent: tuple[VM, int], tmp_path: Path, cache_dir: Path,
                                         machines: list) -> None:  # type: ignore[type-arg]
    vm, buf = parent
    path = tmp_path / "t.tpl"
    save(vm, path, template=True)
    mapped = restore(path)
    machines.append(mapped)
    child = mapped.fork()
    machines.insert(0, child)
    write_input(child, buf, b"forked")
    run_to_exit(child)
    assert "len=6" in console(child)
    child.destroy()
    copy = restore(path, template=False)
    machines.append(copy)
    assert copy.template is None and copy.memory.fd is not None
    assert ram_digest(copy) == ram_digest(vm)


def test_template_refusals_change_nothing(parent: tuple[VM, int], tmp_path: Path, cache_dir: Path) -> None:
    vm, _ = parent
    compact = tmp_path / "c.sav"
    save(vm, compact)
    with pytest.raises(SnapshotFormatError, match="compact save file"):
        restore(compact, template=True)
    path = tmp_path / "t.tpl"
    save(vm, path, template=True)
    os.chmod(path, 0o644)
    with pytest.raises(TemplateError, match="is writable"):
        restore(path)
    # Damaged: the checksum check refuses it (the check result is cached per file version, so a change is seen).
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - vm.memory.size + 0x200000)
        f.write(b"\xff")
    os.chmod(path, 0o444)
    with pytest.raises(SnapshotFormatError, match=r"ram-image.*checksum"):
        restore(path)
    # Truncated: the container's size check.
    os.chmod(path, 0o644)
    os.truncate(path, path.stat().st_size - 4096)
    os.chmod(path, 0o444)
    with pytest.raises(SnapshotFormatError):
        restore(path)


def test_a_template_changed_under_a_live_machine_breaks_it(parent: tuple[VM, int], tmp_path: Path,
                                                           cache_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm, _ = parent
    path = tmp_path / "t.tpl"
    save(vm, path, template=True)
    mapped = restore(path)
    machines.append(mapped)
    child = mapped.fork()
    machines.insert(0, child)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:                       # what root can always do, read-only or not
        f.seek(path.stat().st_size - 4096)
        f.write(b"\x01")
    deadline = time.monotonic() + 5
    while mapped.broken is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mapped.broken and "changed while mapped" in mapped.broken
    assert child.broken is not None
    with pytest.raises(VmStateError, match="changed while mapped"):
        mapped.run(timeout=1)
    with pytest.raises(ForkError, match="changed while mapped"):
        mapped.reset()


def test_checked_once_per_file_version(parent: tuple[VM, int], tmp_path: Path, cache_dir: Path,
                                       machines: list) -> None:  # type: ignore[type-arg]
    vm, _ = parent
    path = tmp_path / "t.tpl"
    save(vm, path, template=True)
    machines.append(restore(path))
    known = json.loads((cache_dir / "vmfork" / "templates.json").read_text())
    assert list(known.values()) == [str(path)]
    machines.append(restore(path))                      # no new entry: the same version of the file
    assert json.loads((cache_dir / "vmfork" / "templates.json").read_text()) == known


def _lines(out: bytes) -> list[bytes]:
    """Console lines without their printk timestamps, and long numbers (kvm-clock's "sched offset of N cycles"
    counts the host time since the machine was created): the parts that depend on timing."""
    return [re.sub(rb"[0-9]{7,}", b"N", re.sub(rb"^\[ *[0-9.]+\] ", b"", line)) for line in out.splitlines()]


@pytest.mark.skipif(not (LINUX / "vmlinux").exists(), reason="no Debian kernel in build/linux (guests/linux/build.sh)")
def test_a_linux_template_boots_on_like_a_classic_restore(tmp_path: Path, cache_dir: Path,
                                                          machines: list) -> None:  # type: ignore[type-arg]
    """A foreign guest: Debian's kernel saved mid-boot, once as a template and once as a classic save file. The
    mapped machine and the restored one print the same lines from there (timestamps aside), for the same time."""
    cmdline = "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr panic=-1"
    vm = VM.create(memory_mib=256, name="linux")
    machines.append(vm)
    vm.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"), cmdline=cmdline)

    def run_for(m: VM, marker: bytes, timeout: float, *, line: bool = False) -> bytes:
        """Run until `marker` is printed (`line`: printed as a line of _lines), for `timeout` seconds at most."""
        out = m.device("serial0")
        m.start()
        deadline = time.monotonic() + timeout

        def printed() -> bool:
            return marker in _lines(bytes(out.output())) if line else marker in out.output()
        try:
            while not printed() and time.monotonic() < deadline and m.state == "running":
                time.sleep(0.1)
        finally:
            if m.state == "running":
                m.pause()
        return bytes(out.output())

    assert f"Command line: {cmdline}".encode() in run_for(vm, f"Command line: {cmdline}".encode(), 300)
    tpl, sav = tmp_path / "linux.tpl", tmp_path / "linux.sav"
    save(vm, tpl, template=True)
    save(vm, sav)
    mapped, classic = restore(tpl), restore(sav)
    machines[:0] = [mapped, classic]
    assert mapped.template == str(tpl) and classic.template is None
    # Where kernel mode is emulated, a Linux template logs into bitmaps like a Linux fork (rings: the crawl above).
    assert mapped.flush_translations_on_reset == kernel_mode_emulated()
    seen = run_for(classic, b"\nNEVER\n", 20)
    # The mapped machine is a fork (dirty-logged into bitmaps where kernel mode is emulated), so it may be slower:
    # give it time to print as many lines as the classic one did.
    a = _lines(seen)
    target = a[max(len(a) - 2, 0)] if a else b"\n"
    got = run_for(mapped, target, 240, line=True)
    b = _lines(got)
    n = min(len(a), len(b)) - 1                         # the last line of each may be cut off
    assert n >= 2, (seen[-800:], got[-800:])
    assert a[:n] == b[:n], (seen[-1500:], got[-1500:])


def test_cli_template_fork_tree(tmp_path: Path, pvh_guest: Path, cache_dir: Path) -> None:
    tpl = tmp_path / "tp.tpl"
    with CliHarness(tmp_path, pvh_guest) as ts:
        ts.env["XDG_CACHE_HOME"] = str(cache_dir)
        cfg = ts.config("tp", "demo")
        ts.create(cfg)
        ts.ok("save", "--template", "tp", str(tpl))
        ts.ok("destroy", "tp")
        fork = ts.ok("fork-vm", "--from", str(tpl), "-p").strip()
        tree = ts.ok("list", "--tree")
        assert f"{tpl} (template file)" in tree and "tp-fork-1" in tree, tree
        ts.ok("fork-reset", fork)
        def domains() -> list[tuple[object, ...]]:
            return [(e["domid"], e["name"], e["state"]) for e in json.loads(ts.ok("list", "--json"))]
        before = domains()
        ts.fail("fork-vm", "--from", str(cfg), match="not a vmfork save file")
        ts.fail("fork-vm", "--from", str(tpl), "tp-fork-1", match="forks the file")
        assert domains() == before
        ts.ok("destroy", fork)


def test_pss_of_template_restores_is_shared(tmp_path: Path, parent: tuple[VM, int], cache_dir: Path) -> None:
    """Processes restoring one template share its pages in the page cache: a page the guest only reads is not
    anyone's private memory (the 100-process figure is bench/snapshot.py's)."""
    vm, _ = parent
    path = tmp_path / "t.tpl"
    save(vm, path, template=True)
    code = ("import sys, time; from vmfork.snapshot import restore; vm = restore(sys.argv[1]); "
            "vm.memory.pages.sum(); print('ready', flush=True); time.sleep(30)")
    procs = [subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-c", code, str(path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        private = []
        for p in procs:
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
            fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
            private.append(fields["Private_Clean"] + fields["Private_Dirty"])
        # Each process read all 64 MiB of the guest's RAM; almost none of it is private to either.
        assert all(kib < 48 * 1024 for kib in private), private
    finally:
        for p in procs:
            p.kill()
            p.wait()
