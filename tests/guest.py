"""Helpers for tests that boot the test guests."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from vmfork.fork import VM
from vmfork.vm import StopEvent


def boot(kernel: Path, cmdline: str, machines: list, *, memory_mib: int = 64, vcpus: int = 1,  # type: ignore[type-arg]
         protocol: str = "auto", name: str = "test") -> VM:
    vm = VM.create(memory_mib=memory_mib, vcpus=vcpus, name=name)
    machines.append(vm)
    vm.load_kernel(kernel, cmdline=cmdline, protocol=protocol)
    return vm


def console(vm: VM) -> str:
    return vm.device("serial0").output().decode(errors="replace")


def run_to_ready(vm: VM, timeout: float = 30) -> tuple[int, int]:
    """Run until the guest's ready marker; returns (input buffer address, size)."""
    ev = vm.run(timeout=timeout)
    assert ev.reason == "harness-start", f"expected the ready marker, got {ev} / console: {console(vm)!r}"
    regs = vm.vcpus[0].get_regs()
    return regs.rdi, regs.rsi


def run_to_exit(vm: VM, timeout: float = 30) -> StopEvent:
    ev = vm.run(timeout=timeout)
    assert ev.reason == "exit", f"expected an exit, got {ev} / console: {console(vm)!r}"
    return ev


def write_input(vm: VM, addr: int, data: bytes) -> None:
    vm.memory.write(addr, struct.pack("<Q", len(data)) + data)


def field(text: str, key: str) -> str:
    m = re.search(rf"{key}=(\S+)", text)
    assert m, f"no {key}= in {text!r}"
    return m.group(1)


# XSAVE's header: XSTATE_BV at byte 512 of the standard-format area (KVM_GET_XSAVE's)
_XSTATE_BV = slice(512, 520)


def state_part(st: object, name: str) -> bytes:
    """A captured vCPU state part's bytes, for comparing two states: the same bytes, except that the XSAVE area's
    XSTATE_BV is left out. It says which components are in use, and the CPU may clear a bit whenever its component
    holds its initial values (the init optimisation), as it may happen to when the host saves the guest's FPU state
    around a preemption; KVM then reports those initial values in the area all the same. So two vCPUs in the same
    architectural state can differ there, by timing alone."""
    data = bytes(getattr(st, name))
    if name == "xsave":
        data = data[:_XSTATE_BV.start] + bytes(8) + data[_XSTATE_BV.stop:]
    return data


LOOP_SCRATCH = 64 << 20      # where the test guest's `loop` program writes its pages


def run_loop(vm: VM, addr: int, npages: int, seed: int) -> None:
    """One input of the `loop` program (input buffer at `addr`): write `npages` pages from LOOP_SCRATCH on."""
    vm.memory.write(addr, struct.pack("<QQ", npages, seed))
    ev = vm.run(timeout=20)
    assert ev.reason == "harness-end", ev


def assert_same_runs(a: VM, b: VM, addr: int, seeds: tuple[int, ...], *, consoles: bool = False) -> None:
    """Twin forks of the `loop` program run each seed's 16-page input alike: registers, the pages written (and
    with `consoles`, the console); both are reset after each."""
    for seed in seeds:
        run_loop(a, addr, 16, seed)
        run_loop(b, addr, 16, seed)
        assert bytes(a.vcpus[0].get_regs()) == bytes(b.vcpus[0].get_regs())
        assert a.memory.read(LOOP_SCRATCH, 16 * 4096) == b.memory.read(LOOP_SCRATCH, 16 * 4096)
        if consoles:
            assert console(a) == console(b)
        a.reset()
        b.reset()
