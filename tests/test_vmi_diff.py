"""What did a fork change: owned pages compared byte by byte with the ancestor's, and register differences."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from guest import boot, run_to_ready
from vmfork.fork import VM
from vmfork.vmi import commands
from vmfork.vmi.diff import diff
from vmfork.vmi.errors import VmiError

INBUF = 0x800000
SCRATCH = 0x4000000
KINFO = 0x101000


@pytest.fixture
def parent(pvh_guest: Path, machines: list) -> VM:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "loop", machines, memory_mib=128)
    run_to_ready(vm)
    return vm


def one_iteration(fork: VM, npages: int, seed: int) -> None:
    fork.memory.write(INBUF, struct.pack("<QQ", npages, seed))
    ev = fork.run(timeout=10)
    assert ev.reason == "harness-end", ev


def test_a_forks_diff_is_exactly_what_it_wrote(parent: VM) -> None:
    fork = parent.fork()
    one_iteration(fork, 3, 0x55)
    d = diff(fork)
    assert d.fork == fork.name and d.ancestor == parent.name
    changed = {p.gpa: p for p in d.changed_pages}
    for i in range(3):                                       # the loop program's scratch qwords: seed ^ i
        page = changed[SCRATCH + i * 4096]
        assert page.changed_bytes == 1 and len(page.lines) == 1
        assert page.lines[0].offset == 0 and page.lines[0].new[0] == 0x55 ^ i and page.lines[0].old[0] == 0
    inbuf = changed[INBUF]
    assert inbuf.lines[0].new[:16] == struct.pack("<QQ", 3, 0x55) and inbuf.lines[0].old == bytes(16)
    kinfo = changed[KINFO]                                   # iteration counter and page count
    assert {line.offset for line in kinfo.lines} == {0x90}
    assert SCRATCH + 3 * 4096 not in changed
    rip = [r for r in d.registers if r.name == "rip"]
    assert rip and rip[0].old == parent.vcpus[0].get_regs().rip and rip[0].new == fork.vcpus[0].get_regs().rip
    text = d.text()
    assert text.startswith(f"{fork.name} against {parent.name}: ")
    assert "  - 0000000004000000  00 00" in text and "  + 0000000004000000  55 00" in text
    assert "vCPU 0 rip" in text
    assert commands.diff_report(fork) == text


def test_pages_written_back_are_listed_without_differing_bytes(parent: VM) -> None:
    fork = parent.fork()
    original = fork.memory.read(0x900000, 8)
    fork.memory.write(0x900000, b"changed!")
    fork.memory.write(0x900000, original)
    d = diff(fork, registers=False)
    page = next(p for p in d.pages if p.gpa == 0x900000)
    assert not page.changed and page.lines == () and page.changed_bytes == 0
    assert d.changed_pages == () and d.registers == ()
    assert "page 0x900000: no differing bytes" in d.text()


def test_a_grandchild_against_the_root_and_its_owners(parent: VM) -> None:
    child = parent.fork()
    one_iteration(child, 2, 0x10)
    grandchild = child.fork()
    grandchild.memory.write(INBUF, struct.pack("<QQ", 1, 0x20))
    ev = grandchild.run(timeout=10)                          # resumes at the next ready marker
    assert ev.reason == "harness-start"
    one_iteration(grandchild, 1, 0x20)
    own = diff(grandchild)
    assert {p.gpa for p in own.changed_pages} >= {SCRATCH, INBUF}
    assert SCRATCH + 4096 not in {p.gpa for p in own.changed_pages}   # written by the child, not the grandchild
    whole = diff(grandchild, ancestor=parent)
    pages = {p.gpa: p for p in whole.changed_pages}
    assert pages[SCRATCH].lines[0].new[0] == 0x20 and pages[SCRATCH].owner == grandchild.name
    assert pages[SCRATCH + 4096].lines[0].new[0] == 0x10 ^ 1 and pages[SCRATCH + 4096].owner == child.name
    assert whole.chain == (grandchild.name, child.name)
    assert f"(through {child.name})" in whole.text()


def test_diff_needs_a_fork_and_an_ancestor(parent: VM, pvh_guest: Path,
                                           machines: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(VmiError, match="not a fork"):
        diff(parent)
    other = boot(pvh_guest, "hello", machines)
    fork = parent.fork()
    with pytest.raises(VmiError, match="not an ancestor"):
        diff(fork, ancestor=other)
