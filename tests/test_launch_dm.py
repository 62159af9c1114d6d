"""Forks by device-model mode (Xen's `xl fork-vm --launch-dm yes|no|late`): a fork without a device model answers
every port like absent hardware and counts the accesses, can stop at the first one, and gets its device model late
(from a device-state file or its parent); device interrupts exist exactly while a device model does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guest import boot, console, run_to_ready, write_input
from vmfork.demo import fnv1a64
from vmfork.devices import DeviceSetState
from vmfork.devices.serial import IER_THRI, LSR_TEMT, LSR_THRE
from vmfork.errors import DeviceStateError, ForkError, VmStateError
from vmfork.fork import VM, _DeviceAccess
from vmfork.snapshot import load_device_state, save_device_state, write_device_state

COM1 = 0x3F8
EXIT_PORT = 0xF4
INPUT = b"launch-dm"


def result_line(data: bytes) -> str:
    """What the demo guest prints after its ready marker for this input."""
    return f"result: len={len(data)} fnv={fnv1a64(data):016x} "


@pytest.fixture
def demo(pvh_guest: Path, machines: list[VM]) -> tuple[VM, int, str]:
    """The demo guest paused at its ready marker, its input buffer address, and the full line a normal fork
    prints for INPUT."""
    parent = boot(pvh_guest, "demo", machines, memory_mib=64)
    addr, _ = run_to_ready(parent)
    ref = parent.fork()
    write_input(ref, addr, INPUT)
    ev = ref.run(timeout=20)
    assert ev.reason == "exit" and ev.status == fnv1a64(INPUT) & 0x3F
    line = console(ref)
    assert line.startswith(result_line(INPUT))
    ref.destroy()
    return parent, addr, line


def pic_line_high(vm: VM, irq: int) -> bool:
    """The in-kernel master PIC's view of an ISA interrupt line (kvm_pic_state.last_irr, its first byte)."""
    return bool(vm.capture_platform().pic_master.data[0] >> irq & 1)


def test_yes_fork_has_its_parents_devices(demo) -> None:
    parent, addr, line = demo
    child = parent.fork(launch_dm="yes")
    assert [d.name for d in child.devices] == [d.name for d in parent.devices]
    write_input(child, addr, INPUT)
    assert child.run(timeout=20).reason == "exit"
    assert console(child) == line and child.device_accesses() == {}


def test_no_fork_answers_like_absent_hardware_and_counts(demo) -> None:
    parent, addr, line = demo
    child = parent.fork(launch_dm="no")
    assert child.devices == [] and child.launch_dm == "no"
    write_input(child, addr, INPUT)
    # Its console and exit device are absent: the guest computes, prints into the void, writes its exit status
    # into the void and spins (as it does after an exit nobody stops).
    assert child.run(timeout=0.5).reason == "timeout"
    assert child.device_accesses() == {COM1: len(line), EXIT_PORT: 1}
    assert child.bus.unknown_accesses == child.device_accesses()


def test_no_fork_pauses_at_each_new_port(demo) -> None:
    parent, addr, line = demo
    child = parent.fork(launch_dm="no", pause_on_device_access=True)
    write_input(child, addr, INPUT)
    ev = child.run(timeout=20)
    assert ev.reason == "device-access" and ev.vcpu == 0
    assert ev.detail.startswith(f"port {COM1:#x} write, 1 byte, value {ord('r'):#x}")
    assert child.device_accesses() == {COM1: 1}
    ev = child.run(timeout=20)                              # the rest of the line goes to a port already seen
    assert ev.reason == "device-access" and ev.detail.startswith(f"port {EXIT_PORT:#x} write, 1 byte")
    assert child.device_accesses() == {COM1: len(line), EXIT_PORT: 1}
    assert child.run(timeout=0.3).reason == "timeout"
    # Reset brings back the fork-time state; the counters keep counting.
    child.reset()
    write_input(child, addr, INPUT)
    assert child.run(timeout=0.5).reason == "timeout"
    assert child.device_accesses() == {COM1: 2 * len(line), EXIT_PORT: 2}


def test_late_device_model_from_a_device_state_file(demo, tmp_path) -> None:
    """The seed's flow: fork without a device model, run CPU-only code, save the parent's device state to a file,
    attach it to the fork: the console works, and the access that paused the fork is not lost."""
    parent, addr, line = demo
    child = parent.fork(launch_dm="late", pause_on_device_access=True)
    write_input(child, addr, INPUT)
    ev = child.run(timeout=20)                              # hash and primes in CPL3, then the first console byte
    assert ev.reason == "device-access" and f"port {COM1:#x} write" in ev.detail
    save_device_state(parent, tmp_path / "parent.dm")
    child.attach_device_model(load_device_state(tmp_path / "parent.dm"))
    assert child.launch_dm == "yes"
    assert [d.name for d in child.devices] == ["serial0", "i8042", "rtc", "exit", "harness", "env"]
    ev = child.run(timeout=20)
    assert ev.reason == "exit" and ev.status == fnv1a64(INPUT) & 0x3F
    assert console(child) == line
    assert child.device_accesses() == {COM1: 1}             # the one access made before the device model came
    # A reset returns to the fork point with the device model the fork got.
    child.reset()
    write_input(child, addr, b"again")
    assert child.run(timeout=20).reason == "exit"
    assert console(child)[len(line):].startswith(result_line(b"again"))


def test_late_device_model_without_a_pause_and_from_the_parent(demo) -> None:
    parent, addr, line = demo
    child = parent.fork(launch_dm="late")
    child.attach_device_model(DeviceSetState.capture_all(parent.devices), console_log=None)
    write_input(child, addr, INPUT)
    assert child.run(timeout=20).reason == "exit"
    assert console(child) == line
    with pytest.raises(ForkError, match="already has a device model"):
        child.attach_device_model()


def test_attach_refuses_another_device_set_and_changes_nothing(demo, tmp_path) -> None:
    parent, addr, line = demo
    full = DeviceSetState.capture_all(parent.devices)
    fewer = DeviceSetState({name: s for name, s in full.states.items() if name != "rtc"})
    write_device_state(fewer, tmp_path / "fewer.dm")
    child = parent.fork(launch_dm="no")
    with pytest.raises(DeviceStateError, match="device-state file has devices serial0, i8042, exit, harness, env, "
                                               "this VM has serial0, i8042, rtc, exit, harness, env"):
        child.attach_device_model(load_device_state(tmp_path / "fewer.dm"))
    assert child.devices == [] and child.bus.device_at(COM1) is None and child.launch_dm == "no"
    wrong_kind = DeviceSetState({**full.states, "rtc": full.states["i8042"]})
    with pytest.raises(DeviceStateError, match=r"rtc state is a .* state"):
        child.attach_device_model(wrong_kind)
    assert child.devices == []
    child.attach_device_model(full)
    write_input(child, addr, INPUT)
    assert child.run(timeout=20).reason == "exit" and console(child) == line


def test_attach_needs_a_paused_machine(demo) -> None:
    parent, addr, _ = demo
    child = parent.fork(launch_dm="no")
    write_input(child, addr, INPUT)
    child.start()
    try:
        with pytest.raises(VmStateError, match="while it runs"):
            child.attach_device_model()
    finally:
        child.pause()
    assert child.devices == []


def test_device_interrupts_follow_the_device_model(demo, monkeypatch) -> None:
    parent, addr, _ = demo
    child = parent.fork(launch_dm="no", pause_on_device_access=True)
    lines: list[tuple[int, int]] = []
    real = child.vm.irq_line

    def irq_line(irq: int, level: int) -> None:
        lines.append((irq, level))
        real(irq, level)

    monkeypatch.setattr(child.vm, "irq_line", irq_line)
    write_input(child, addr, INPUT)
    assert child.run(timeout=20).reason == "device-access"
    assert lines == [], "a fork without a device model raised an interrupt line"
    assert not pic_line_high(child, 4)
    # A UART whose transmitter-empty interrupt is enabled and pending asserts IRQ 4 as soon as it exists.
    full = DeviceSetState.capture_all(parent.devices)
    serial = dataclasses.replace(full.states["serial0"], ier=IER_THRI, thr_ipending=True)
    child.attach_device_model(DeviceSetState({**full.states, "serial0": serial}))
    assert (4, 1) in lines
    assert pic_line_high(child, 4)
    before = len(lines)
    assert child.run(timeout=20).reason == "exit"
    assert len(lines) > before, "the UART's interrupt line stopped following its transmitter"
    assert not pic_line_high(parent, 4)                     # the parent's line was never touched


def test_a_read_that_paused_the_fork_gets_the_device_answer(demo) -> None:
    """The test guests never read a port after their ready marker, so this drives the replay directly: a fork
    paused at an `in al, dx` from the UART's line status register gets the UART's answer once attached."""
    parent, _, _ = demo
    child = parent.fork(launch_dm="no")
    regs = child.vcpus[0].get_regs()
    regs.rax = 0x1122_3344_5566_77FF                        # AL = 0xff: what absent hardware answered
    child.vcpus[0].set_regs(regs)
    child._dm_pending = _DeviceAccess(0, COM1 + 5, False, 1, 1, (), child._generation)
    child.attach_device_model(DeviceSetState.capture_all(parent.devices))
    assert child.vcpus[0].get_regs().rax == 0x1122_3344_5566_7700 | LSR_THRE | LSR_TEMT
    # Once it has run since, nothing is replayed.
    other = parent.fork(launch_dm="no")
    other._dm_pending = _DeviceAccess(0, COM1 + 5, False, 1, 1, (), other._generation - 1)
    rax = other.vcpus[0].get_regs().rax
    other.attach_device_model()
    assert other.vcpus[0].get_regs().rax == rax


def test_pause_on_device_access_is_about_ports_without_a_device(demo) -> None:
    parent, addr, line = demo
    child = parent.fork(pause_on_device_access=True)        # with a device model: nothing to pause for
    write_input(child, addr, INPUT)
    assert child.run(timeout=20).reason == "exit" and console(child) == line
    with pytest.raises(ForkError, match="process forks"):
        parent.fork(isolation="process", pause_on_device_access=True)  # type: ignore[call-overload]
