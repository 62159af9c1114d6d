"""Breakpoints and stepping in the test guest's user code (the `vmi` program), with the mechanism the host probe
picks: on this project's CI host the #BP stub (KVM ignores software breakpoints there)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import hostprobe
from guest import boot, console, run_to_ready
from vmfork.fork import VM
from vmfork.vmi import breakpoints as bpmod
from vmfork.vmi.breakpoints import STUB_GPA, Debugger, Hit, debugger
from vmfork.vmi.errors import BreakpointError
from vmfork.vmi.memory import read_phys, read_virt
from vmfork.vmi.symbols import SymbolTable


def ready_vm(pvh_guest: Path, machines: list, n: int = 3) -> VM:  # type: ignore[type-arg]
    vm = boot(pvh_guest, f"vmi {n}", machines)
    run_to_ready(vm)
    return vm


def expected_sum(n: int) -> int:
    return sum(i * i + 1 for i in range(n))


def test_the_mechanism_follows_the_host_probe(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    dbg = debugger(vm)
    report = hostprobe.report()
    assert dbg.mechanism == ("kvm" if report.supports("sw_breakpoints") else "stub")
    assert debugger(vm) is dbg


def test_breakpoint_by_symbol_stops_every_call_and_the_guest_int3_still_works(
        pvh_guest: Path, machines: list, symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    target = symbols.address("vmi_target")
    assert f"target={target:#x}" in console(vm)
    dbg = debugger(vm, symbols=symbols)
    hits: list[Hit] = []
    bp = dbg.add_breakpoint("vmi_target", callback=hits.append)
    assert bp.address == target and bp.label == "vmi_target"
    assert read_virt(dbg, target, 3) == bytes.fromhex("4889f8")           # the debugger shows the original bytes
    for i in range(3):
        ev = dbg.run(timeout=10)
        assert (ev.reason, ev.vcpu) == ("breakpoint", 0), ev
        assert ev.detail == f"{target:#x} <vmi_target>"
        regs = dbg.get_regs(0)
        assert regs.rip == target and regs.rdi == i                         # the interrupted code's registers
        assert hits[-1].regs.rdi == i and hits[-1].address == target
        assert dbg.get_sregs(0).cs.dpl == 3
    ev = dbg.run(timeout=10)
    assert ev.reason == "exit" and ev.status == 0
    assert f"vmi sum={expected_sum(3)} svc=ffffffffffffffff" in console(vm)   # the guest's own int3 service
    assert bp.hits == 3 and len(hits) == 3


def test_step_through_a_function_and_return_through_the_stack(
        pvh_guest: Path, machines: list, symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    dbg = debugger(vm, symbols=symbols)
    target = symbols.address("vmi_target")
    dbg.add_breakpoint(target)
    assert dbg.run(timeout=10).reason == "breakpoint"
    ret_addr = struct.unpack("<Q", read_virt(dbg, dbg.get_regs(0).rsp, 8))[0]
    rips = []
    for _ in range(4):
        ev = dbg.step(0)
        assert ev.reason == "step", ev
        rips.append(dbg.get_regs(0).rip)
    assert rips == [target + 3, target + 7, target + 10, ret_addr]
    assert dbg.get_regs(0).rax == 1                                        # 0 * 0 + 1
    ev = dbg.run(timeout=10)                                                # next call: the breakpoint is still set
    assert ev.reason == "breakpoint" and dbg.get_regs(0).rdi == 1
    dbg.remove_breakpoint(target)
    assert read_phys(vm, target, 1) == b"\x48"
    assert dbg.run(timeout=10).reason == "exit"
    assert f"vmi sum={expected_sum(3)} " in console(vm)


def test_callbacks_that_continue_and_registers_changed_at_a_breakpoint(
        pvh_guest: Path, machines: list, symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines, n=50)
    dbg = debugger(vm, symbols=symbols)
    seen: list[int] = []

    def count(hit: Hit) -> bool:
        seen.append(hit.regs.rdi)
        if hit.regs.rdi == 7:                   # change the argument of one call from the callback
            regs = dbg.get_regs(hit.vcpu)
            regs.rdi = 100
            dbg.set_regs(hit.vcpu, regs)
        return True                             # keep going: no stop

    dbg.add_breakpoint("vmi_target", callback=count)
    ev = dbg.run(timeout=30)
    assert ev.reason == "exit", ev
    assert seen == list(range(50))
    assert f"vmi sum={expected_sum(50) - (7 * 7 + 1) + (100 * 100 + 1)} " in console(vm)


def test_a_stopped_vcpus_registers_can_be_changed(pvh_guest: Path, machines: list,
                                                  symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    dbg = debugger(vm, symbols=symbols)
    dbg.add_breakpoint("vmi_target")
    dbg.run(timeout=10)
    regs = dbg.get_regs(0)
    regs.rdi, regs.rax = 10, 0x1234
    dbg.set_regs(0, regs)
    assert dbg.get_regs(0).rdi == 10 and dbg.get_regs(0).rax == 0x1234
    dbg.detach()
    assert vm.run(timeout=10).reason == "exit"
    assert f"vmi sum={expected_sum(3) - 1 + 101} " in console(vm)


def test_detach_gives_every_byte_and_the_idt_gate_back(pvh_guest: Path, machines: list,
                                                       symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    gate = symbols.address("idt") + 3 * 16
    before = read_phys(vm, gate, 16)
    dbg = debugger(vm, symbols=symbols)
    if dbg.mechanism != "stub":
        pytest.skip("the #BP stub is not used on this host (KVM intercepts breakpoints)")
    target = symbols.address("vmi_target")
    dbg.add_breakpoint(target)
    assert read_phys(vm, target, 1) == b"\xcc" and read_phys(vm, gate, 16) != before
    assert read_phys(vm, STUB_GPA, len(bpmod.STUB_CODE)) == bpmod.STUB_CODE
    dbg.detach()
    assert read_phys(vm, target, 1) == b"\x48" and read_phys(vm, gate, 16) == before
    assert debugger(vm) is not dbg
    with pytest.raises(BreakpointError, match="detached"):
        dbg.add_breakpoint(target)
    assert vm.run(timeout=10).reason == "exit"


def test_forks_inherit_breakpoints_and_a_fork_without_a_debugger_runs_through_them(
        pvh_guest: Path, machines: list, symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    parent = ready_vm(pvh_guest, machines)
    dbg = debugger(parent, symbols=symbols)
    if dbg.mechanism != "stub":
        pytest.skip("forks without a debugger pass breakpoints through the #BP stub only")
    target = symbols.address("vmi_target")
    dbg.add_breakpoint(target)
    plain = parent.fork()
    ev = plain.run(timeout=10)                  # nobody debugs it: the stub restores each byte itself
    assert ev.reason == "exit" and ev.status == 0, ev
    assert f"vmi sum={expected_sum(3)} svc=ffffffffffffffff" in console(plain)
    assert read_phys(plain, target, 1) == b"\x48" and read_phys(parent, target, 1) == b"\xcc"
    child = parent.fork()
    cdbg = debugger(child)                      # a copy of the parent's set
    assert cdbg is not dbg and [b.address for b in cdbg.list()] == [target]
    assert cdbg.run(timeout=10).reason == "breakpoint" and cdbg.get_regs(0).rdi == 0
    with pytest.raises(BreakpointError, match="read-only"):
        dbg.add_breakpoint(symbols.address("prog_vmi.done"))
    # a reset takes the fork back to the fork point; the set stays and is put back in memory
    cdbg.remove_breakpoint(target)
    cdbg.add_breakpoint("prog_vmi.done")
    child.reset()
    assert read_phys(child, symbols.address("prog_vmi.done"), 1) != b"\xcc"
    ev = cdbg.run(timeout=10)
    assert ev.reason == "breakpoint" and ev.detail.endswith("<prog_vmi.done>"), ev
    assert cdbg.run(timeout=10).reason == "exit"
    assert f"vmi sum={expected_sum(3)} " in console(child)


def test_bad_breakpoints_are_clear_errors(pvh_guest: Path, machines: list,
                                          symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    vm = ready_vm(pvh_guest, machines)
    dbg = debugger(vm, symbols=symbols)
    with pytest.raises(BreakpointError, match="not mapped"):
        dbg.add_breakpoint(0x123456789000)
    with pytest.raises(Exception, match="no symbol 'no_such_function'"):
        dbg.add_breakpoint("no_such_function")
    with pytest.raises(BreakpointError, match="no breakpoint"):
        dbg.remove_breakpoint(symbols.address("vmi_target"))
    bare = Debugger(vm, mechanism="stub")
    with pytest.raises(BreakpointError, match="no symbols"):
        bare.add_breakpoint("vmi_target")
    vm.start()
    try:
        with pytest.raises(BreakpointError, match="while it runs"):
            dbg.add_breakpoint(symbols.address("vmi_target"))
    finally:
        vm.wait(10)


def test_kvm_guest_debugging_where_the_host_supports_it(pvh_guest: Path, machines: list,
                                                         symbols: SymbolTable) -> None:  # type: ignore[type-arg]
    hostprobe.require("sw_breakpoints")
    vm = ready_vm(pvh_guest, machines)
    dbg = Debugger(vm, mechanism="kvm", symbols=symbols)
    dbg.add_breakpoint("vmi_target")
    ev = dbg.run(timeout=10)
    assert ev.reason == "breakpoint" and dbg.get_regs(0).rip == symbols.address("vmi_target")
    dbg.detach()
    assert vm.run(timeout=10).reason == "exit"
    assert f"vmi sum={expected_sum(3)} svc=ffffffffffffffff" in console(vm)
