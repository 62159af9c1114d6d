"""The debugger on guests vmfork did not prepare (guests/bare: a Multiboot kernel with NO IDT, and a twin with only
its own #BP handler), driven by Debian's real gdb and through the API: breakpoints and steps in guest kernel mode
(this host: the emulation-failure exit; VT-x/AMD-V: KVM's guest debugging) and user mode (this host: the #BP stub,
through an IDT vmfork lends the vCPU), and after detaching the guest's output is byte-identical to an undebugged
twin's."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import hostprobe
from vmfork.doctor import probe_host
from vmfork.fork import VM
from vmfork.vmi import debugger
from vmfork.vmi.errors import BreakpointError
from vmfork.vmi.gdbserver import GdbServer
from vmfork.vmi.memory import read_phys

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="needs gdb (Debian package gdb)")


def labels(guest_dir: Path, name: str) -> dict[str, int]:
    out = {}
    for line in (guest_dir / f"{name}.map").read_text().splitlines():
        m = re.match(r"\s*([0-9A-F]+)\s+([0-9A-F]+)\s+(\w+)$", line)
        if m:
            out[m.group(3)] = int(m.group(2), 16)
    assert {"kernel_tick", "user_tick", "user_entry"} <= set(out), out
    return out


def boot(guest_dir: Path, name: str, machines: list) -> VM:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=64, name=name)
    machines.append(vm)
    vm.load_kernel(guest_dir / f"{name}.elf", cmdline="")
    return vm


def output(vm: VM) -> bytes:
    return bytes(vm.device("serial0").output())


def twin_output(guest_dir: Path, name: str, machines: list) -> bytes:  # type: ignore[type-arg]
    vm = boot(guest_dir, name, machines)
    ev = vm.run(timeout=30)
    assert ev.reason == "exit" and ev.status == 0, ev
    return output(vm)


def gdb(port: int, *cmds: str) -> str:
    assert GDB is not None
    args = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{port}", *cmds]
    r = subprocess.run([GDB, "-nx", "-batch", *[a for c in args for a in ("-ex", c)]],
                       capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def serve(vm: VM, **kw: object) -> tuple[GdbServer, threading.Thread]:
    server = GdbServer(vm, port=0, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_one, daemon=True)
    thread.start()
    return server, thread


def run_to_user_mode(vm: VM, sym: dict[str, int]) -> None:
    """Run the guest to its first user-mode turn (breakpoints set in 32-bit mode are kernel-mode ones)."""
    dbg = debugger(vm)
    dbg.add_breakpoint(sym["kernel_tick"])
    assert dbg.run(timeout=30).reason == "breakpoint"
    dbg.clear()
    dbg.add_breakpoint(sym["user_tick"])
    assert dbg.run(timeout=30).reason == "breakpoint"
    dbg.detach()


def kernel_path() -> str:
    """How this host stops at vmfork's int3 in guest kernel mode; skips naming the probe when it cannot."""
    r = probe_host(cached=True)
    if r.supports("sw_breakpoints"):
        return "kvm"
    if r.item("int3_cpl0").status == "emulation-failure":
        return "emulation-failure"
    pytest.skip(f"no kernel-mode breakpoints here: {r.reason('sw_breakpoints')}; {r.reason('int3_cpl0')}")


@needs_gdb
@pytest.mark.parametrize("name", ["bare-noidt", "bare-bp"])
def test_real_gdb_breaks_steps_reads_and_detaches_on_a_guest_vmfork_did_not_prepare(
        guest_dir: Path, machines: list, name: str) -> None:  # type: ignore[type-arg]
    kernel_path()
    sym = labels(guest_dir, name)
    twin = twin_output(guest_dir, name, machines)
    vm = boot(guest_dir, name, machines)
    server, thread = serve(vm)
    out = gdb(server.port,
              f"break *{sym['kernel_tick']:#x}", "continue", "info registers rip",
              "stepi", "stepi", "info registers rip", "delete",
              f"break *{sym['user_tick']:#x}", "continue", "info registers rip cs",
              *["stepi"] * 10, "info registers rip",
              f"x/4xb {sym['user_tick']:#x}", "info registers", "continue", "info registers rip", "detach")
    thread.join(20)
    server.close()
    rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert len(rips) == 6, out
    assert rips[0] == sym["kernel_tick"] and rips[1] != rips[0], out        # kernel mode: break, 2 steps
    assert rips[2] == sym["user_tick"] and re.search(r"^cs\s+0x1b\s", out, re.M), out   # user mode (CPL3)
    assert rips[3] != rips[2] and rips[4] == rips[3], out                  # 10 steps (and `info registers`)
    assert rips[5] == sym["user_tick"], out                                 # then once around the loop
    assert f"{sym['user_tick']:#x}:\t0x4d\t0x6b\t0xed\t0x21" in out, out    # imul r13, r13, 33: no int3 shows
    assert re.search(r"^r13\s+0x", out, re.M) and re.search(r"^eflags\s", out, re.M), out
    assert "Cannot access memory" not in out and "[Inferior 1 (Remote target) detached]" in out, out
    ev = vm.wait(30)
    assert ev.reason == "exit" and ev.status == 0, ev
    assert output(vm) == twin                   # byte-identical: no vmfork int3 reached the guest, nothing left over
    sregs = vm.vcpus[0].get_sregs()
    own_idt = 0 if name == "bare-noidt" else sym["idt"]
    assert sregs.idt.base == own_idt            # the lent IDT was given back
    assert read_phys(vm, sym["user_tick"], 4) == b"\x4d\x6b\xed\x21"


@needs_gdb
@pytest.mark.parametrize("name", ["bare-noidt", "bare-bp"])
def test_stepi_right_after_attaching_without_breakpoints(guest_dir: Path, machines: list,  # type: ignore[type-arg]
                                                          name: str) -> None:
    """The issue's first finding: `stepi` with no breakpoint set destroyed a guest without an IDT (and on a guest
    with one, its own #BP handler got vmfork's temporary int3s)."""
    kernel_path()
    sym = labels(guest_dir, name)
    twin = twin_output(guest_dir, name, machines)
    vm = boot(guest_dir, name, machines)
    dbg = debugger(vm)
    dbg.add_breakpoint(sym["kernel_tick"])     # set in 32-bit mode: hit in kernel mode
    assert dbg.run(timeout=30).reason == "breakpoint"
    dbg.clear()
    dbg.add_breakpoint(sym["user_tick"])
    assert dbg.run(timeout=30).reason == "breakpoint"
    dbg.detach()                                # the guest runs in user mode; no breakpoints
    server, thread = serve(vm)
    # 400 steps: through an int3 of bare-bp (its own handler runs, the step ends after it)
    out = gdb(server.port, "info registers rip", *["stepi"] * 400, "info registers rip", "detach")
    thread.join(20)
    server.close()
    rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert rips[0] == sym["user_tick"] and rips[1] > rips[0], out
    assert "Remote connection closed" not in out and "detached" in out, out
    ev = vm.wait(30)                            # gdb ran it: detaching lets it run on
    assert ev.reason == "exit" and output(vm) == twin, ev


def test_kernel_mode_breakpoint_and_step_through_the_emulation_failure_exit(
        guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    if kernel_path() != "emulation-failure":
        pytest.skip("KVM intercepts breakpoints on this host (sw_breakpoints works): see the KVM path's test")
    sym = labels(guest_dir, "bare-noidt")
    vm = boot(guest_dir, "bare-noidt", machines)
    dbg = debugger(vm)
    bp = dbg.add_breakpoint(sym["kernel_tick"])
    assert not bp.user or bp.user                # either way it is hit in kernel mode
    ev = dbg.run(timeout=30)
    assert (ev.reason, ev.vcpu, dbg.get_regs(0).rip) == ("breakpoint", 0, sym["kernel_tick"]), ev
    assert vm.exit_hooks.counts.get("debugger-cpl0-int3", 0) >= 1
    assert read_phys(vm, sym["kernel_tick"], 1) == b"\xcc"
    assert dbg.read_phys(sym["kernel_tick"], 1) != b"\xcc"      # the debugger's view: the guest's byte
    rip = sym["kernel_tick"]
    for _ in range(4):
        ev = dbg.step()
        assert ev.reason == "step", ev
        assert dbg.get_regs(0).rip != rip
        rip = dbg.get_regs(0).rip
    assert dbg.run(timeout=30).reason == "breakpoint"          # the next turn of the kernel loop
    assert bp.hits == 2
    dbg.detach()
    assert vm.exit_hooks.emulation_failure == [] or all(n != "debugger-cpl0-int3"
                                                        for n, _h in vm.exit_hooks.emulation_failure)
    assert vm.run(timeout=30).reason == "exit"


def test_kernel_mode_breakpoint_through_kvm_guest_debugging(guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    hostprobe.require("sw_breakpoints")
    sym = labels(guest_dir, "bare-noidt")
    vm = boot(guest_dir, "bare-noidt", machines)
    dbg = debugger(vm)
    assert dbg.mechanism == "kvm"
    dbg.add_breakpoint(sym["kernel_tick"])
    ev = dbg.run(timeout=30)
    assert ev.reason == "breakpoint" and dbg.get_regs(0).rip == sym["kernel_tick"], ev
    assert "debugger" in vm.vcpus[0].debug.owners()
    assert dbg.step().reason == "step" and dbg.get_regs(0).rip != sym["kernel_tick"]
    dbg.detach()
    assert vm.run(timeout=30).reason == "exit"


def test_a_guest_with_its_own_bp_handler_keeps_its_int3s_while_vmfork_steps(
        guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    kernel_path()
    sym = labels(guest_dir, "bare-bp")
    twin = twin_output(guest_dir, "bare-bp", machines)
    vm = boot(guest_dir, "bare-bp", machines)
    dbg = debugger(vm)
    dbg.add_breakpoint(sym["kernel_tick"])     # a first stop in long mode, with the guest's IDT loaded
    assert dbg.run(timeout=30).reason == "breakpoint"
    dbg.clear()
    dbg.add_breakpoint(sym["user_tick"])
    steps = 0
    for _ in range(6):                          # six turns of the user loop, stepping through each one
        assert dbg.run(timeout=30).reason == "breakpoint"
        while True:
            ev = dbg.step()
            assert ev.reason == "step", ev
            steps += 1
            if dbg.get_regs(0).rip == sym["user_tick"]:
                break
    assert steps > 6 * 20
    dbg.detach()
    assert vm.run(timeout=30).reason == "exit"
    assert output(vm) == twin and output(vm).count(b"[bp]") == 5


@needs_gdb
def test_gdb_shows_why_a_breakpoint_cannot_work(guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    """A stub address inside memory the guest uses: refused with the reason (not "Cannot access memory"), and the
    guest's memory is left alone."""
    kernel_path()
    if probe_host(cached=True).supports("sw_breakpoints"):
        pytest.skip("KVM intercepts breakpoints on this host (sw_breakpoints works): no stub")
    sym = labels(guest_dir, "bare-noidt")
    vm = boot(guest_dir, "bare-noidt", machines)
    run_to_user_mode(vm, sym)
    image = read_phys(vm, 0x100000, 0x7000)
    server, thread = serve(vm, stub_gpa=0x100000)
    out = gdb(server.port, f"break *{sym['user_tick'] + 4:#x}", "continue", "info registers rip", "detach")
    thread.join(20)
    server.close()
    assert "vmfork: the guest uses the memory at 0x100000" in out, out
    assert "Cannot access memory" not in out, out
    assert read_phys(vm, 0x100000, 0x7000) == image
    assert vm.run(timeout=30).reason == "exit"


def test_a_stub_address_the_guest_uses_is_refused_before_anything_is_written(
        guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    if probe_host(cached=True).supports("sw_breakpoints"):
        pytest.skip("KVM intercepts breakpoints on this host (sw_breakpoints works): no stub")
    sym = labels(guest_dir, "bare-noidt")
    vm = boot(guest_dir, "bare-noidt", machines)
    run_to_user_mode(vm, sym)
    image = read_phys(vm, 0x100000, 0x7000)
    dbg = debugger(vm, stub_gpa=0x100000)
    with pytest.raises(BreakpointError, match=r"the guest uses the memory at 0x100000"):
        dbg.add_breakpoint(sym["user_tick"] + 4)
    assert read_phys(vm, 0x100000, 0x7000) == image and not dbg.breakpoints
    dbg.detach()
    with pytest.raises(BreakpointError, match="not page-aligned"):
        debugger(vm, stub_gpa=0xAF010)
    with pytest.raises(BreakpointError, match="is not guest RAM"):
        debugger(vm, stub_gpa=1 << 40)


@needs_gdb
def test_detach_leaves_a_machine_the_toolstack_paused_paused(guest_dir: Path, machines: list) -> None:  # type: ignore[type-arg]
    kernel_path()
    sym = labels(guest_dir, "bare-noidt")
    vm = boot(guest_dir, "bare-noidt", machines)
    held = {"paused": False}
    server, thread = serve(vm, paused_by_toolstack=lambda: held["paused"])
    held["paused"] = True                       # e.g. `vmfork pause` while gdb has the machine stopped
    out = gdb(server.port, f"break *{sym['user_tick']:#x}", "continue", "detach")
    thread.join(20)
    server.close()
    assert "detached" in out, out
    assert vm.state == "paused" and vm.vcpus[0].get_regs().rip == sym["user_tick"]
    assert read_phys(vm, sym["user_tick"], 1) == b"\x4d"


@needs_gdb
def test_gdb_shows_why_real_mode_cannot_be_debugged_here(machines: list) -> None:  # type: ignore[type-arg]
    """A machine at its reset vector (real mode): on a host that ignores software breakpoints, gdb prints the
    reason for `break` + `continue` and for `stepi`, and the machine does not move."""
    if probe_host(cached=True).supports("sw_breakpoints"):
        pytest.skip("KVM intercepts breakpoints on this host (sw_breakpoints works): real mode is debuggable")
    vm = VM.create(memory_mib=16, name="realmode")
    machines.append(vm)
    rip = vm.vcpus[0].get_regs().rip
    server, thread = serve(vm)
    out = gdb(server.port, "break *0x1000", "continue", "stepi", "detach")
    thread.join(20)
    server.close()
    assert out.count("vmfork: vCPU 0 runs in real mode") == 2, out
    assert "Remote failure reply: E.vCPU 0 runs in real mode" in out, out
    assert "Cannot access memory" not in out, out
    assert vm.state == "paused" and vm.vcpus[0].get_regs().rip == rip and read_phys(vm, 0x1000, 1) == b"\0"


@pytest.mark.parametrize("name", ["bare-noidt", "bare-bp"])
def test_a_user_mode_breakpoint_set_at_the_32_bit_entry(guest_dir: Path, machines: list,  # type: ignore[type-arg]
                                                        name: str) -> None:
    """Set before the guest has 64-bit paging or its IDT: the debugger steps its kernel mode until it is about to
    enter user mode, then arms the #BP route; the breakpoint is hit in user mode and nothing reaches the guest."""
    kernel_path()
    sym = labels(guest_dir, name)
    twin = twin_output(guest_dir, name, machines)
    vm = boot(guest_dir, name, machines)
    dbg = debugger(vm)
    bp = dbg.add_breakpoint(sym["user_tick"])
    assert vm.vcpus[0].get_sregs().efer & (1 << 10) == 0           # 32-bit protected mode, paging off
    for turn in range(3):
        ev = dbg.run(timeout=60)
        assert ev.reason == "breakpoint" and dbg.get_regs(0).rip == sym["user_tick"], ev
        assert dbg.get_regs(0).r12 == turn and dbg.get_sregs(0).cs.selector == 0x1B
    assert bp.hits == 3 and bp.user is True
    dbg.detach()
    assert vm.run(timeout=30).reason == "exit" and output(vm) == twin


@pytest.mark.parametrize("ram_mib", [2, 64, 4096 + 512])
def test_the_debug_area_is_reserved_in_every_memory_map(ram_mib: int) -> None:
    """e820, Multiboot and PVH maps are all built from layout.e820_map: vmfork's area is inside a reserved entry."""
    from vmfork.arch.x86 import layout
    entries = layout.e820_map(ram_mib << 20)
    assert any(kind == layout.E820_RESERVED and start <= layout.VMFORK_AREA_START
               and layout.VMFORK_AREA_END <= start + size for start, size, kind in entries), entries
    assert layout.is_vmfork_reserved(layout.DEBUG_AREA_ADDR, layout.DEBUG_AREA_SIZE)
    from vmfork.workarounds.bp_stub import LENT_AREA_SIZE, STUB_GPA
    assert (STUB_GPA, LENT_AREA_SIZE) == (layout.DEBUG_AREA_ADDR, layout.DEBUG_AREA_SIZE)


def test_the_host_specific_pieces_are_workarounds_doctor_can_list() -> None:
    import vmfork.vmi.debug  # noqa: F401  (imports them)
    from vmfork.workarounds import CATALOG
    assert {"bp-stub", "lent-idt", "cpl0-breakpoints"} <= set(CATALOG)
    assert CATALOG["cpl0-breakpoints"].probe == "int3_cpl0" and CATALOG["bp-stub"].probe == "sw_breakpoints"
