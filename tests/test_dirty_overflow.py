"""A fork whose dirty ring overflows still resets exactly.

Where the host emulates guest kernel mode (kvm_pvm), every emulated store logs a dirty-ring entry, and a kernel
that writes a lot within one exit pushes entries past the ring's end: entries are lost. vmfork notices (a ring
filled to its last entry, or pending entries that no longer start at its fetch index), resynchronises, and the next
reset restores every page the fork holds privately (from /proc/self/pagemap). The guest is a real Debian kernel
booting from its first instruction in a fork."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from vmfork.fork import VM

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "build" / "linux"


def digest(vm: VM) -> str:
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


@pytest.mark.skipif(not (LINUX / "vmlinux").exists(), reason="no Debian kernel in build/linux (guests/linux/build.sh)")
@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_linux_fork_resets_exactly_even_after_ring_overflow(machines: list, mode: str) -> None:  # type: ignore[type-arg]
    parent = VM.create(memory_mib=256, name="linux")
    machines.append(parent)
    parent.load_kernel(LINUX / "vmlinux", initrd=str(LINUX / "initramfs.cpio.gz"),
                       cmdline="console=ttyS0 nokaslr panic=-1")
    want = digest(parent)
    # RAM exactly the parent's (no VMGenID of its own); "auto" would choose bitmaps for Linux on this host
    fork = parent.fork(new_generation=False, dirty_log=mode)  # type: ignore[arg-type]
    machines.insert(0, fork)
    if mode == "ring" and not fork.memory._rings:
        pytest.skip("this host gives forks dirty bitmaps, not rings (no overflow to provoke)")
    fork.start()
    # Early boot writes every page of its memory map and page tables: on this host the ring overflows within
    # seconds; elsewhere the fork just boots on. Either way it must not crash, loop or lose a page.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (mode == "ring" and fork.memory._ever_lost) \
            and fork.state == "running":
        time.sleep(0.2)
    fork.pause()
    assert fork.state == "paused", fork.stop_event
    assert len(fork.memory.owned_pages()) > 0
    fork.reset()
    assert digest(fork) == want
    # And the fork runs on from there like a fresh one.
    fork.start()
    time.sleep(1)
    fork.pause()
    assert fork.state == "paused", fork.stop_event
    fork.reset()
    assert digest(fork) == want
