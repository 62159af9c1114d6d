"""Pooled forks (issue 17, fourth round): prepare_forks builds each fork's machine ahead in the shells it prepares
(ShellPool.prepare_machines) and loads the interrupt controllers and quiet LAPICs ahead too (_platform_ahead); a
fork with the default arguments takes such a machine. Such a fork must be exactly what the full path makes, other
arguments must not take it, a recycled shell must not bring anything of its last fork (a ticking PIT above all),
and a machine built for a state the parent has since left must not be used."""

from __future__ import annotations

import ctypes
import fcntl
import time
from typing import Any

import pytest

from guest import LOOP_SCRATCH, assert_same_runs, boot, run_loop, run_to_ready, state_part
from linux_guest import Booted
from vmfork import vmgenid
from vmfork.devices import DeviceSetState
from vmfork.fork import VM, _drop_machine, shell_pool
from vmfork.kvm import constants as c
from vmfork.kvm import structs as s
from vmfork.vm import Shell

SCRATCH = LOOP_SCRATCH
KVM_REINJECT_CONTROL = c._io(0x71)      # struct kvm_reinject_control {u8 pit_reinject; u8 reserved[31]}
PIC_IRR = 9                             # struct kvm_irqchip: chip_id, pad, then kvm_pic_state {last_irr, irr, ...}


def pooled(parent: VM) -> list[Any]:
    """The machines the pool built for forks of `parent`, in the order forks take them."""
    pool = shell_pool(parent.shape)
    return [sh.machine[0] for sh in pool._ready if sh.machine is not None]


def chips(vm: VM) -> tuple[bytes, bytes, bytes]:
    p = vm.capture_platform()
    return bytes(p.pic_master), bytes(p.pic_slave), bytes(p.ioapic)


def full_restore_fork(parent: VM, **kwargs: Any) -> VM:
    """A fork made the full way: a new shell, nothing loaded ahead, every state ioctl at fork time."""
    shell_pool(parent.shape)._ready.appendleft(Shell(parent.kvm, parent.shape, dirty_logging=True))
    return parent.fork(**kwargs)


def test_a_pooled_fork_is_what_the_full_path_makes(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    parent.prepare_forks(3)
    built = pooled(parent)
    assert len(built) >= 3, "prepare_forks built no machines"
    state = parent._state_for_forks()
    fast = parent.fork(name="fast")
    assert fast is built[0] and fast.name == "fast" and fast.parent is parent and fast in parent.children
    full = full_restore_fork(parent, name="full")
    assert full not in built
    assert parent.id < fast.id < full.id, "forks are numbered in the order they are made"
    # the state KVM and the devices hold right after the fork: the parent's
    for child in (fast, full):
        assert chips(child) == tuple(bytes(x) for x in (state.platform.pic_master, state.platform.pic_slave,
                                                        state.platform.ioapic))
        assert DeviceSetState.capture_all(child.devices) == state.devices
        assert child.fork_state is state and child.launch_dm == "yes" and not child.irqs_blocked
    fv, uv = fast.vcpus[0], full.vcpus[0]
    fv.flush_sync()
    uv.flush_sync()
    a, b = fv.capture(), uv.capture()
    for name in ("regs", "sregs", "events", "xsave", "xcrs", "mp_state", "debugregs", "lapic"):
        assert state_part(a, name) == state_part(b, name), f"{name} differs"
    assert_same_runs(fast, full, addr, (3, 4), consoles=True)
    # a fork of the pooled fork sees it as it is now
    run_loop(fast, addr, 2, 9)
    grandchild = fast.fork()
    assert grandchild.memory.read(SCRATCH, 2 * 4096) == fast.memory.read(SCRATCH, 2 * 4096)
    grandchild.destroy()


@pytest.mark.parametrize("kwargs", [{"block_interrupts": True}, {"env": {"role": "web"}}, {"launch_dm": "no"},
                                    {"console_log": "LOG"}, {"device_state": "OTHER"}],
                         ids=["block_interrupts", "env", "launch_dm", "console_log", "device_state"])
def test_forks_with_other_arguments_do_not_take_the_pooled_machine(pvh_guest, machines, tmp_path, monkeypatch,
                                                                  kwargs: dict[str, Any]) -> None:
    """... but all except block_interrupts (which changes the vCPU state) still use the vCPU and platform state
    the shell holds ahead, env and device_state too (they change only the devices' state)."""
    loads: list[bool] = []
    original = VM._load_fork_state

    def recording(self: VM, child: VM, state: Any, *, devices: bool, preloaded: bool) -> None:
        loads.append(preloaded)
        original(self, child, state, devices=devices, preloaded=preloaded)

    monkeypatch.setattr(VM, "_load_fork_state", recording)
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    parent.prepare_forks(2)
    built = pooled(parent)
    if kwargs.get("console_log") == "LOG":
        kwargs = {"console_log": str(tmp_path / "console.log")}
    if kwargs.get("device_state") == "OTHER":
        kwargs = {"device_state": parent._state_for_forks().devices.with_env({"from": "device-state"})}
    child = parent.fork(**kwargs)
    assert child not in built
    assert loads == ["block_interrupts" not in kwargs]      # (its vCPU state blocks interrupts: another state)
    assert all(d._log is None for d in built[0].devices if hasattr(d, "_log")), "the dropped machine stays open"
    if "block_interrupts" in kwargs:
        assert child.irqs_blocked
    if "env" in kwargs:
        assert child.device("env").env["role"] == "web"
    if "device_state" in kwargs:
        assert child.device("env").env["from"] == "device-state"
    if "launch_dm" in kwargs:
        assert child.devices == [] and child.launch_dm == "no"
    else:
        run_loop(child, addr, 16, 1)
    if "console_log" in kwargs:
        printed = bytes(child.device("serial0").output())
        child.destroy()
        assert (tmp_path / "console.log").read_bytes() == printed     # the fork's own console, written out
    # the pool's next machine still serves a default fork exactly
    nxt = parent.fork()
    assert nxt is built[1]
    run_loop(nxt, addr, 16, 1)


def test_a_recycled_shell_brings_nothing_of_its_last_fork(pvh_guest, machines) -> None:
    """A fork whose PIT ticks (channel 0 periodic, 1 kHz, without KVM's reinjection, so every tick raises IRQ 0)
    is destroyed; its shell goes back to the pool and is prepared for another parent, whose PIT never ran. While it
    waits in the pool, nothing may reach its interrupt controllers: the fork taken from it holds exactly that
    parent's PICs and IOAPIC (a tick sets the PIC's IRR bit 0), and runs like a fork from a new shell."""
    ticking = boot(pvh_guest, "loop", machines, memory_mib=128, name="ticking")
    run_to_ready(ticking)
    pit = s.PitState2()
    ticking.vm.get_pit2(pit)
    pit.channels[0].mode, pit.channels[0].count, pit.channels[0].rw_mode = 2, 1193, 3
    ticking.vm.set_pit2(pit)
    ticking.touch()
    pool = shell_pool(ticking.shape)
    pool.drain()
    pool.settle()
    child = ticking.fork()
    no_reinject = (ctypes.c_uint8 * 32)()
    fcntl.ioctl(child.vm.fd, KVM_REINJECT_CONTROL, no_reinject)
    pic = s.IrqChip()
    pic.chip_id = c.KVM_IRQCHIP_PIC_MASTER
    child.vm.get_irqchip(pic)
    pic.data[PIC_IRR - 8] = 0
    child.vm.set_irqchip(pic)
    time.sleep(0.05)
    child.vm.get_irqchip(pic)
    assert pic.data[PIC_IRR - 8] & 1, "the PIT did not tick into the fork's PIC: the test would show nothing"
    shell = child.shell
    child.destroy()
    with pool._lock:
        assert shell in pool._ready, "the fork's shell was not recycled"
        pool._ready.remove(shell)
        pool._ready.appendleft(shell)

    quiet = boot(pvh_guest, "loop", machines, memory_mib=128, name="quiet")
    addr, _ = run_to_ready(quiet)
    quiet.prepare_forks(1)
    assert shell.machine is not None and shell.preloaded is quiet._state_for_forks()
    time.sleep(0.1)             # about 100 PIT periods
    fork = quiet.fork()
    assert fork.shell is shell
    assert chips(fork)[0][PIC_IRR] & 1 == 0 and chips(fork) == chips(quiet)
    mode = s.PitState2()
    fork.vm.get_pit2(mode)
    assert mode.channels[0].mode == quiet.capture_platform().pit.channels[0].mode
    full = full_restore_fork(quiet)
    assert_same_runs(fork, full, addr, (1, 2))


def test_a_machine_built_for_a_state_the_parent_left_is_not_used(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    parent.prepare_forks(2)
    built = pooled(parent)
    run_loop(parent, addr, 4, 5)            # the parent runs on: a new fork-time state
    regs = bytes(parent.vcpus[0].get_regs())
    child = parent.fork()
    assert child not in built
    assert bytes(child.vcpus[0].get_regs()) == regs
    assert child.memory.read(SCRATCH, 4 * 4096) == parent.memory.read(SCRATCH, 4 * 4096)
    child.destroy()
    parent.prepare_forks(2)                 # prepared again: for the new state
    again = pooled(parent)
    assert again and not set(map(id, again)) & set(map(id, built))
    child = parent.fork()
    assert child is again[0] and bytes(child.vcpus[0].get_regs()) == regs


def test_a_parent_going_away_takes_its_pooled_machines_with_it(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    run_to_ready(parent)
    parent.prepare_forks(2)
    built = pooled(parent)
    assert built
    parent.destroy()
    pool = shell_pool(parent.shape)
    assert all(sh.machine is None for sh in pool._ready)
    assert all(m.memory.closed for m in built)
    other = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(other)
    other.prepare_forks(2)
    first = pooled(other)[0]
    child = other.fork()
    assert child is first and child.memory.base.base_fd == other.memory.fd
    run_loop(child, addr, 16, 1)


def test_dropping_a_pooled_machine_keeps_its_shell(pvh_guest, machines) -> None:
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    parent.prepare_forks(1)
    pool = shell_pool(parent.shape)
    shell = pool._ready[0]
    vm = shell.machine[0]
    _drop_machine(shell)
    assert shell.machine is None and vm.memory.closed and shell.vcpus
    child = parent.fork()           # the shell, still premapped and preloaded, serves a fork the usual way
    assert child.shell is shell and child is not vm
    run_loop(child, addr, 16, 1)


def test_pooled_forks_of_linux_answer(linux_at_prompt: Booted) -> None:
    """Linux (a guest following only public conventions): pooled forks of its shell prompt (bitmap dirty logging,
    the translation flush) answer a command, each with a new VM generation."""
    from linux_guest import ask
    parent = linux_at_prompt.vm
    if parent is None:
        pytest.skip(f"Linux did not reach its shell here: {linux_at_prompt.reason}")
    parent.prepare_forks(2)
    pool = shell_pool(parent.shape, dirty_ring=False)
    built = [sh.machine[0] for sh in pool._ready if sh.machine is not None]
    assert built, "prepare_forks built no machines for the Linux parent"
    kids = [parent.fork(), parent.fork()]
    try:
        assert kids == built[:2]
        assert len({vmgenid.current(k) for k in (parent, *kids)}) == 3, "each fork gets a new VM generation"
        for i, k in enumerate(kids):
            assert f"answer-{42 + i}".encode() in ask(k, f"echo answer-$((6*7+{i}))\n".encode())
    finally:
        for k in kids:
            k.destroy()
