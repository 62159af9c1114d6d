"""Process forks (`isolation="process"`) are jailed as domains are (procfork_jail.py): each worker in its own mount,
IPC and network namespaces and private root, under its own uid, with no_new_privs and the seccomp allow-list; and
it still forks, runs, resets and forks again. `VMFORK_PROCFORK_JAIL=0` turns it off. Needs root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork import VM
from vmfork.procfork import ProcessFork, fork_process
from vmfork.procfork_jail import ENV, WORKER_UID_RANGE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail is set up by root (vmfork runs as non-root)")


def _status(pid: int) -> dict[str, list[str]]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.split()
    return out


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.fixture
def parent(pvh_guest: Path) -> Iterator[VM]:
    vm = VM.create(memory_mib=48, name="pj")       # a shape of its own: its worker pool is this test's
    vm.load_kernel(str(pvh_guest), cmdline="demo")
    assert vm.run(timeout=20).reason == "harness-start"
    yield vm
    vm.destroy(tree=True)


def test_a_process_fork_runs_jailed(parent: VM) -> None:
    child = fork_process(parent)
    assert isinstance(child, ProcessFork)
    st = _status(child.pid)
    uid = int(st["Uid"][0])
    assert WORKER_UID_RANGE[0] <= uid < sum(WORKER_UID_RANGE) and st["Uid"] == [str(uid)] * 4
    assert st["Gid"] == [str(uid)] * 4 and st["Groups"] == [] and st["CapEff"] == ["0000000000000000"]
    assert st["NoNewPrivs"] == ["1"] and st["Seccomp"] == ["2"]
    for kind in ("mnt", "ipc", "net"):
        assert _ns(child.pid, kind) != _ns("self", kind), kind
    root = os.listdir(f"/proc/{child.pid}/root")
    assert "etc" not in root and "dev" in root and "proc" in root
    # it works as a fork: runs to the end, resets, runs again alike, and forks
    buf = child.get_regs()["rdi"]
    child.memory_write(buf, (5).to_bytes(8, "little") + b"hello")
    ev = child.run(timeout=20)
    assert ev.reason == "exit", ev
    first = child.console()
    child.reset()
    child.memory_write(buf, (5).to_bytes(8, "little") + b"hello")
    assert child.run(timeout=20).reason == "exit" and child.console().endswith(first.splitlines(True)[-1])
    child.reset()
    grandchild = child.fork()
    assert _status(grandchild.pid)["Seccomp"] == ["2"] and grandchild.pid != child.pid
    assert _status(grandchild.pid)["Uid"][0] != str(uid)         # siblings and descendants: uids of their own
    assert grandchild.run(timeout=20).reason == "exit"
    child.destroy(tree=True)


def test_process_forks_unjailed_when_asked(pvh_guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    vm = VM.create(memory_mib=40, name="pu")        # another shape: workers started with the variable set
    try:
        vm.load_kernel(str(pvh_guest), cmdline="demo")
        assert vm.run(timeout=20).reason == "harness-start"
        child = fork_process(vm)
        st = _status(child.pid)
        assert st["Uid"][0] == "0" and st["Seccomp"] == ["0"]
        assert _ns(child.pid, "mnt") == _ns("self", "mnt")
        assert child.run(timeout=20).reason == "exit"
    finally:
        vm.destroy(tree=True)


def test_a_jailed_process_fork_resets_after_its_dirty_ring_lost_entries(guest_dir: Path) -> None:
    """The page writer (guests/pagewriter: 8,000 kernel-mode stores) overflows its fork's dirty ring where kernel
    mode is emulated; the reset then copies back every page the fork holds, found in the worker's own
    /proc/self/pagemap, which the jailed worker (another uid: not dumpable) opens on its way into the jail. Before,
    the reset failed with "Permission denied"."""
    from vmfork.fork import kernel_mode_emulated
    if not kernel_mode_emulated():
        pytest.skip("kernel mode runs natively on this host: no dirty-ring entries are lost, pagemap is not read")
    vm = VM.create(memory_mib=72, name="pw")       # a shape of its own: a new worker (recycled ones, see test_jail.py)
    try:
        vm.load_kernel(str(guest_dir / "pagewriter.elf"))
        assert vm.run(timeout=20).reason == "harness-start"
        p = vm.fork(isolation="process")
        assert _status(p.pid)["Uid"][0] != "0"
        ev = p.run(timeout=60)
        assert (ev.reason, ev.status) == ("exit", 0x2A), ev
        assert p.reset() >= 8000
    finally:
        vm.destroy(tree=True)
