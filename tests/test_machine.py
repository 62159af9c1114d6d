"""The core machine on real /dev/kvm: booting the test guests through Multiboot and PVH, devices, state capture and
restore, crash reports, and the `vmfork run` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest import boot, console, field, run_to_exit, run_to_ready
from vmfork.devices.serial import FLUSH_DELAY
from vmfork.errors import KvmUnavailableError
from vmfork.fork import VM
from vmfork.kvm import Kvm

VMFORK = [sys.executable, "-m", "vmfork.cli"]


@pytest.mark.parametrize("protocol", ["multiboot", "pvh"])
def test_boots_through_each_protocol(protocol: str, guest_dir: Path, machines) -> None:
    kernel = guest_dir / f"testguest-{protocol}.elf"
    vm = boot(kernel, "hello", machines, protocol=protocol, memory_mib=96)
    t = time.perf_counter()
    ev = run_to_exit(vm)
    assert ev.status == 0
    out = console(vm)
    assert f"hello ({protocol})" in out.replace(f"hello {protocol}", f"hello ({protocol})")
    assert "ram=96MiB" in out.replace(" MiB", "MiB")
    assert time.perf_counter() - t < 5


def test_lapic_timer_interrupts_reach_the_guest(pvh_guest, machines) -> None:
    vm = boot(pvh_guest, "timer 30", machines)
    run_to_exit(vm)
    assert int(field(console(vm), "ticks")) > 0


def test_two_vcpus_machine_boots(pvh_guest, machines) -> None:
    vm = boot(pvh_guest, "hello", machines, vcpus=2)
    ev = vm.run(timeout=20)
    assert ev.reason == "exit" and ev.status == 0, (ev, console(vm))


def test_captured_state_restored_in_a_new_machine_continues_identically(pvh_guest, machines) -> None:
    src = boot(pvh_guest, "det 25", machines)
    run_to_ready(src)
    state = src.capture()
    ram = src.memory.pages.tobytes()
    mark = len(console(src))
    dst = VM.create(memory_mib=64, name="copy")
    machines.append(dst)
    dst.memory.write(0, ram)
    dst.restore(state)
    run_to_exit(dst)
    run_to_exit(src)
    assert console(dst).count("det ") == 25
    assert console(dst) == console(src)[mark:]


def test_state_values_are_versioned_and_complete(pvh_guest, machines) -> None:
    vm = boot(pvh_guest, "loop", machines)
    run_to_ready(vm)
    st = vm.capture()
    assert st.VERSION >= 1 and st.platform.VERSION >= 1 and st.vcpus[0].VERSION >= 1
    assert set(st.vcpus[0].parts()) == {"regs", "sregs", "events", "xsave", "xcrs", "msrs", "lapic", "mp_state",
                                        "debugregs"}
    assert st.vcpus[0].msrs.nmsrs >= 10
    assert st.devices is not None and set(st.devices.names) >= {"serial0", "i8042", "rtc", "exit", "harness"}
    # Guest time (TSC, kvmclock, PIT) runs on while a machine is paused; everything else must be stable.
    again = vm.capture()
    for part in ("regs", "sregs", "xsave", "xcrs", "debugregs", "mp_state", "events"):
        assert again.vcpus[0].parts()[part] == st.vcpus[0].parts()[part], part
    assert again.platform.ioapic.data[:] == st.platform.ioapic.data[:]
    assert again.devices == st.devices


def test_triple_fault_stops_the_machine_with_a_report(pvh_guest, machines) -> None:
    vm = boot(pvh_guest, "fault", machines)
    ev = vm.run(timeout=20)
    assert ev.crashed, ev
    assert "shut down" in ev.detail and "rip=" in ev.detail
    assert vm.state == "crashed"
    with pytest.raises(Exception, match="crashed"):
        vm.run(timeout=1)


def test_instruction_the_host_cannot_run_is_reported(pvh_guest, machines) -> None:
    vm = boot(pvh_guest, "xrstor", machines)
    ev = vm.run(timeout=20)
    if not ev.crashed:
        pytest.skip(f"this host runs xrstor in guest kernel mode ({ev}); the failure report cannot be provoked")
    assert "emulation failure" in ev.detail
    assert "instruction bytes: " in ev.detail and "0f ae" in ev.detail
    assert "CPL0" in ev.detail


def test_missing_kvm_is_one_clear_error() -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm("/nonexistent/kvm")


def _cfg(tmp_path: Path, kernel: Path, body: str) -> Path:
    p = tmp_path / "vm.cfg"
    p.write_text(f'name = "t1"\nkernel = "{kernel}"\n{body}')
    return p


def test_vmfork_run_boots_a_config(pvh_guest, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, pvh_guest, 'memory = 64\ncmdline = "hello"\n')
    r = subprocess.run([*VMFORK, "run", str(cfg), "--timeout", "30"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"vmfork-guest: ready" in r.stdout


def test_vmfork_run_reports_guest_exit_status(pvh_guest, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, pvh_guest, 'memory = 64\nextra = "ud2"\n')
    r = subprocess.run([*VMFORK, "run", str(cfg), "--timeout", "30"], capture_output=True, timeout=60)
    assert r.returncode == 0x86, (r.returncode, r.stdout, r.stderr)
    assert b"EXCEPTION vec=6" in r.stdout


def test_bad_config_is_one_line_naming_the_problem(pvh_guest, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, pvh_guest, "memroy = 64\n")
    r = subprocess.run([*VMFORK, "run", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "memroy" in r.stderr and "vm.cfg" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_ends_a_run_cleanly(pvh_guest, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, pvh_guest, 'memory = 64\ncmdline = "timer 600000"\n')
    proc = subprocess.Popen([*VMFORK, "run", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (out, err)
    assert b"Traceback" not in err


def test_console_log_file(pvh_guest, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, pvh_guest, 'memory = 64\ncmdline = "hello"\n')
    log = tmp_path / "console.log"
    r = subprocess.run([*VMFORK, "run", str(cfg), "--console-log", str(log)], capture_output=True, timeout=60)
    assert r.returncode == 0
    assert b"vmfork-guest: ready" in log.read_bytes()
    assert os.stat(log).st_size == len(r.stdout)


def test_ram_above_the_pci_hole(pvh_guest, machines) -> None:
    from vmfork.errors import MemoryAccessError
    vm = boot(pvh_guest, "hello", machines, memory_mib=3584)
    assert [(sl.gpa, sl.size) for sl in vm.memory.slots] == [(0, 3 << 30), (4 << 30, 512 << 20)]
    vm.memory.write((4 << 30) + 4096, b"high")
    assert vm.memory.read((4 << 30) + 4096, 4) == b"high"
    with pytest.raises(MemoryAccessError, match="outside guest RAM"):
        vm.memory.write((3 << 30) + 4096, b"hole")
    run_to_exit(vm)
    assert "ram=3584MiB" in console(vm)


# --- the console log: batched, nothing lost ------------------------------------------------------------------------

# The code of one `PRINT 10` of the test guest (jmp over the string "\n\0"; push rsi; lea rsi, [string]; call puts;
# pop rsi) followed by the instruction after it, so each names one newline: det's line end and the end of pattern's
# first line (before it writes and sums its memory for about a second).
PRINT_NEWLINE = rb"\xeb\x02\x0a\x00\x56\x48\x8d\x35\xf6\xff\xff\xff\xe8.{4}\x5e"
DET_LINE_END = re.compile(PRINT_NEWLINE + rb"\x49\xff\xc5", re.S)                    # inc r13
PATTERN_LINE_END = re.compile(PRINT_NEWLINE + rb"\x4c\x89\xe0\x48\x85\xc0", re.S)   # mov rax, r12; test rax, rax


def _no_newline(vm: VM, code: re.Pattern[bytes]) -> None:
    """Make one newline the loaded guest prints a space, so its output has a partial line where a line ended."""
    found = list(code.finditer(vm.memory.read(0, 16 << 20)))
    assert len(found) == 1, f"{len(found)} matches of {code.pattern!r} in the guest image (the test guest changed?)"
    vm.memory.write(found[0].start() + 2, b" ")


def _logged_vm(machines: list, kernel: Path, cmdline: str, log: Path, *, memory_mib: int = 64) -> VM:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=memory_mib, name="logged", console_log=str(log))
    machines.append(vm)
    vm.load_kernel(kernel, cmdline=cmdline)
    return vm


def test_console_log_gets_every_byte_in_order_a_line_per_write(pvh_guest, machines, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    vm = _logged_vm(machines, pvh_guest, "det 300", log)
    calls: list[bytes] = []
    vm.device("serial0").add_listener(calls.append)
    run_to_ready(vm)
    run_to_exit(vm)
    out = vm.device("serial0").output()
    assert [int(n) for n in re.findall(rb"\ndet (\d+) ", out)] == list(range(300))
    assert log.read_bytes() == out and b"".join(calls) == out
    # Batched: a call per line plus the odd partial line the flush timer wrote out, not a call per byte.
    assert len(calls) < len(out) // 5, (len(calls), len(out))


def test_console_output_is_written_out_when_the_machine_stops(pvh_guest, machines, tmp_path: Path) -> None:
    """With the flush timer out of the way (an hour's delay), a partial line reaches the log when the guest exits,
    when the machine is paused and when it is destroyed while running."""
    log = tmp_path / "exit.log"
    vm = _logged_vm(machines, pvh_guest, "det 40", log)
    serial = vm.device("serial0")
    serial.flush_delay = 3600
    _no_newline(vm, DET_LINE_END)                 # det's lines become one line, unfinished when the guest exits
    run_to_ready(vm)
    run_to_exit(vm)
    out = serial.output()
    assert out.count(b" det ") == 39 and not out.endswith(b"\n")
    assert log.read_bytes() == out

    for how in ("pause", "destroy"):
        log = tmp_path / f"{how}.log"
        vm = _logged_vm(machines, pvh_guest, "det 2000", log)
        serial = vm.device("serial0")
        serial.flush_delay = 3600
        _no_newline(vm, DET_LINE_END)
        run_to_ready(vm)
        vm.start()
        deadline = time.monotonic() + 30
        while len(serial.output()) < 3000 and time.monotonic() < deadline:
            time.sleep(0.01)
        if how == "pause":
            ev = vm.pause()
            assert ev.reason == "pause", ev
        else:
            vm.destroy()
        out = serial.output()
        assert 3000 <= len(out) and out.count(b" det ") < 1999, f"{how}: the guest was not stopped half-way"
        assert log.read_bytes() == out, f"{how}: {len(out) - log.stat().st_size} bytes missing from the log"


def test_partial_line_reaches_log_and_console_clients_while_the_guest_runs(pvh_guest, machines,
                                                                           tmp_path: Path) -> None:
    """A prompt without a newline (here: pattern's first line, made unfinished) is in the log and on the live
    console stream within the flush delay, while the guest goes on computing for about a second."""
    from vmfork.toolstack.console import ConsoleHub
    vm = _logged_vm(machines, pvh_guest, "pattern 1 200", tmp_path / "console.log", memory_mib=256)
    _no_newline(vm, PATTERN_LINE_END)
    serial = vm.device("serial0")
    hub = ConsoleHub(str(tmp_path / "domain.log"), lambda: None)       # the domain's side, as in a domain process
    ours, theirs = socket.socketpair()
    try:
        client = hub.add(ours, device_model=True)
        hub.take(client)                                                # its header
        serial.add_listener(hub.write)
        prompt = b"mib=200 "
        vm.start()
        deadline = time.monotonic() + 30
        while prompt not in serial.output() and time.monotonic() < deadline:
            time.sleep(0.001)
        sent = time.monotonic()
        assert prompt in serial.output(), serial.output()
        while time.monotonic() < deadline:
            logged_text = (tmp_path / "domain.log").read_bytes()
            logged = time.monotonic()
            later = serial.output()                                     # read after the log: the guest's progress
            if prompt in logged_text or b"checksum" in later:
                break
            time.sleep(0.001)
        assert prompt in logged_text and b"checksum" not in later, \
            "the partial line was not written out while the guest computed (only when it exited)"
        assert logged - sent < FLUSH_DELAY + 0.3, logged - sent        # slack for a loaded 2-core host
        assert (tmp_path / "console.log").read_bytes() == serial.output()
        assert hub.take(client).endswith(prompt)                        # the live stream has it too
        ev = vm.wait(60)
        assert ev.reason == "exit", ev
        out = serial.output()
        assert out.endswith(b"\n") and b"checksum=" in out
        assert (tmp_path / "domain.log").read_bytes() == out == (tmp_path / "console.log").read_bytes()
    finally:
        hub.close()
        ours.close()
        theirs.close()
