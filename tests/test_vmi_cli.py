"""Introspection of domains through the CLI (`vmfork mem|regs|translate|disasm|diff|gdbserver`), on real /dev/kvm:
every command in a subprocess, every domain a process of its own, GDB the real Debian `gdb`.

Every test has its own runtime directory (VMFORK_RUN_DIR); a finalizer kills whatever domain processes and CLI
processes a test left, even when it fails."""

from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_harness import CliHarness, result_line

GDB = shutil.which("gdb")
INPUT_BUFFER = 0x800000         # the test guest's harness input buffer (guests/README.md)
KINFO = 0x101000                # its kernel info block, identity-mapped
RAM = 64 << 20


@pytest.fixture
def cli(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    with CliHarness(tmp_path, pvh_guest) as c:
        yield c


def _input(data: bytes) -> str:
    """The demo program's input (u64 length, then the bytes) as the hex DATA of `mem write`."""
    return (len(data).to_bytes(8, "little") + data).hex(" ")


# --- memory, registers, translation, bad input -----------------------------------------------------------------------

def test_mem_regs_translate_and_bad_input(cli: CliHarness) -> None:
    demo = cli.create_program("demo", "demo")
    assert cli.wait_state(demo, "paused").reason == "harness-start"

    # A hexdump of the (empty) input buffer, then a write the guest will read.
    out = cli.ok("mem", "read", "demo", hex(INPUT_BUFFER), "32")
    assert out.splitlines() == [f"{INPUT_BUFFER + k:016x}  " + "00 " * 8 + " " + "00 " * 7 + "00  |" + "." * 16 + "|"
                                for k in (0, 16)]
    assert cli.ok("mem", "write", str(demo), hex(INPUT_BUFFER), _input(b"hello")) == \
        f"wrote 13 bytes at physical {INPUT_BUFFER:#x}\n"
    out = cli.ok("mem", "read", "demo", str(INPUT_BUFFER), "16")
    assert out == f"{INPUT_BUFFER:016x}  05 00 00 00 00 00 00 00  68 65 6c 6c 6f 00 00 00  |........hello...|\n"

    # @FILE data, and --raw bytes on stdout.
    blob = bytes(range(256)) * 5
    (cli.base / "blob.bin").write_bytes(blob)
    cli.ok("mem", "write", "demo", hex(INPUT_BUFFER + 0x1000), "@blob.bin")
    raw = cli.run_bytes("mem", "read", "demo", hex(INPUT_BUFFER + 0x1000), str(len(blob)), "--raw")
    assert raw.returncode == 0 and raw.stdout == blob, raw.stderr

    # Virtual: the kernel info block through the guest's page tables (identity-mapped) equals the physical bytes.
    virt = cli.ok("mem", "read", "demo", hex(KINFO), "64", "--virt", "--vcpu", "0")
    assert virt.startswith(f"{KINFO:016x}  56 4d 46 4b 49 4e 46 4f  01 00 00 00 02 00 00 00  |VMFKINFO........|")
    assert virt == cli.ok("mem", "read", "demo", hex(KINFO), "64")

    # Registers: at the ready marker rdi holds the input buffer address.
    regs = cli.ok("regs", "demo")
    assert regs.startswith("vCPU 0: 64-bit long mode, CPL3\n"), regs
    assert f"rdi {INPUT_BUFFER:016x}" in regs
    rip = int(re.search(r"rip ([0-9a-f]{16})", regs).group(1), 16)  # type: ignore[union-attr]
    assert 0x100000 < rip < 0x120000
    assert cli.ok("regs", "demo", "--vcpu", "0") == regs

    # The walk of a virtual address, level by level.
    walk = cli.ok("translate", "demo", hex(KINFO)).splitlines()
    assert walk[0] == "virtual 0x101000: 4-level paging, CR3 0x102000", walk
    assert [ln.split()[0] for ln in walk[1:4]] == ["PML4[0]", "PDPT[0]", "PD[0]"]
    assert walk[3].endswith("-> 2 MiB page") and walk[4].startswith("  physical 0x101000 (in the 2 MiB page at 0x0")

    # Disassembly at rip.
    dis = cli.ok("disasm", "demo", "-n", "2").splitlines()
    assert len(dis) == 2 and dis[0].startswith(f"=> {rip:#x}:"), dis

    # Bad input: one line, exit 1, and the domain answers afterwards.
    cli.fail("mem", "read", "demo", hex(RAM), "16", match=f"guest-physical address {RAM:#x} is outside guest RAM")
    cli.fail("mem", "write", "demo", hex(RAM - 2), "01 02 03 04", match="outside guest RAM")
    cli.fail("mem", "read", "demo", "0x7ffffffff000", "16", "--virt",
             match="virtual address 0x7ffffffff000 is not mapped: PML4[255]")
    cli.fail("mem", "read", "demo", "0x800000000000", "8", "--virt", match="is not canonical")
    cli.fail("translate", "demo", "0x123456789000", match="virtual address 0x123456789000 is not mapped")
    cli.fail("translate", "demo", "0xffff800000000000", match="is not mapped")
    cli.fail("regs", "demo", "--vcpu", "3", match="demo has no vCPU 3 (it has 1")
    cli.fail("mem", "read", "demo", hex(KINFO), "8", "--virt", "--vcpu", "1", match="no vCPU 1")
    cli.fail("translate", "demo", hex(KINFO), "--vcpu", "2", match="no vCPU 2")
    cli.fail("mem", "read", "demo", "zz", "16", match="ADDR: not a number: 'zz'")
    cli.fail("mem", "read", "demo", "0x800000", "0", match="LEN: must be at least 1")
    cli.fail("mem", "write", "demo", "0x800000", "xyz", match="not hex bytes")
    cli.fail("mem", "write", "demo", "0x800000", "@nothere.bin", match="nothere.bin: no such file")
    cli.fail("regs", "nosuch", match="no domain named 'nosuch'")
    cli.fail("diff", "demo", match="is not a fork")
    cli.fail("gdbserver", "demo", "--listen", "127.0.0.1:99999", match="port must be 0-65535")
    entry = cli.listed("demo")
    assert (entry["state"], entry["reason"], entry["alive"]) == ("paused", "harness-start", True)
    assert cli.execute("demo", "query-status")["status"] == "paused"

    # The guest reads what was written: demo's result for the 5-byte input "hello".
    cli.ok("unpause", "demo")
    cli.wait_gone(demo)
    assert result_line(cli.log(demo)).startswith("result: len=5 fnv=a430d84680aabd0b primes=")


# --- diff across domains --------------------------------------------------------------------------------------------

def test_diff_of_a_fork_domain(cli: CliHarness) -> None:
    demo = cli.create_program("demo", "demo")
    cli.wait_state(demo, "paused")
    fork = int(cli.ok("fork-vm", "-p", "demo").strip())
    name = cli.record(fork).name
    assert name == "demo-fork-1"
    out = cli.ok("diff", name)
    assert out.startswith(f"{name} against demo: 0 pages owned, 0 with differing bytes (0 bytes)\n"), out

    cli.ok("mem", "write", name, hex(INPUT_BUFFER + 0x104), "de ad be ef")
    cli.ok("mem", "write", name, hex(0x300000), "00")           # written with the bytes it had: no difference
    out = cli.ok("diff", str(fork)).splitlines()
    assert out[0] == f"{name} against demo: 2 pages owned, 1 with differing bytes (4 bytes)", out
    assert out[1:5] == [
        "page 0x300000: no differing bytes",
        f"page {INPUT_BUFFER:#x}: 4 bytes differ in 1 lines",
        f"  - {INPUT_BUFFER + 0x100:016x}  " + "00 " * 8 + " " + "00 " * 7 + "00  |" + "." * 16 + "|",
        f"  + {INPUT_BUFFER + 0x100:016x}  00 00 00 00 de ad be ef  " + "00 " * 7 + "00  |" + "." * 16 + "|",
    ], out
    assert "registers: no differences" in out
    # The structured form, over QMP.
    d = cli.execute(name, "vmfork-diff")
    assert (d["fork"], d["ancestor"], d["changed_pages"], d["changed_bytes"]) == (name, "demo", 1, 4)
    page = next(p for p in d["pages"] if p["gpa"] == INPUT_BUFFER)
    assert page["lines"] == [{"offset": 0x100, "old": "00" * 16, "new": "00000000deadbeef" + "00" * 8}]

    # The parent is untouched, and read-only while it has a fork.
    assert cli.ok("mem", "read", "demo", hex(INPUT_BUFFER + 0x104), "4").split()[1:5] == ["00"] * 4
    cli.fail("mem", "write", "demo", hex(INPUT_BUFFER), "01", match="read-only")
    cli.ok("diff", name, "--ancestor", "demo")
    cli.fail("diff", name, "--ancestor", name, match="only its parent (demo (domain")

    # After a reset the page is still the fork's, with no differing bytes.
    cli.ok("fork-reset", name)
    out = cli.ok("diff", name)
    assert f"page {INPUT_BUFFER:#x}: no differing bytes" in out and "1 with" not in out, out
    assert out.splitlines()[0].endswith("0 with differing bytes (0 bytes)")
    cli.ok("destroy", "--force", "demo")


# --- the GDB server -------------------------------------------------------------------------------------------------

def _start_gdbserver(cli: CliHarness, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    p = cli.popen("gdbserver", *args)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    m = re.fullmatch(r"gdb: target remote 127\.0\.0\.1:(\d+)\n", line)
    assert m, f"{line!r} {p.stderr.read().decode() if p.poll() is not None and p.stderr else ''}{cli.debug()}"
    return p, int(m.group(1))


def _gdb(port: int, *commands: str) -> str:
    assert GDB is not None
    cmds = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{port}", *commands, "detach"]
    r = subprocess.run([GDB, "-nx", "-batch", *[a for c in cmds for a in ("-ex", c)]], capture_output=True,
                       text=True, timeout=60)
    assert "[Inferior 1 (Remote target) detached]" in r.stdout, r.stdout + r.stderr
    return r.stdout


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.skipif(GDB is None, reason="needs gdb (Debian package gdb)")
def test_gdbserver_with_real_gdb(cli: CliHarness) -> None:
    demo = cli.create_program("demo", "demo")
    cli.wait_state(demo, "paused")
    cli.ok("mem", "write", "demo", hex(INPUT_BUFFER), _input(b"hello"))
    rip = int(re.search(r"rip ([0-9a-f]{16})", cli.ok("regs", "demo")).group(1), 16)  # type: ignore[union-attr]

    server, port = _start_gdbserver(cli, "demo", "--listen", "127.0.0.1:0")
    status = cli.execute("demo", "vmfork-gdbserver-status")
    assert status == {"running": True, "host": "127.0.0.1", "port": port, "client": False, "hold": True}
    cli.fail("gdbserver", "demo", match="already has a GDB server on 127.0.0.1:")

    out = _gdb(port, "info registers rip", f"x/4xb {INPUT_BUFFER + 8:#x}")
    assert re.search(rf"^rip\s+{rip:#x}\s", out, re.M), out
    assert f"{INPUT_BUFFER + 8:#x}:\t0x68\t0x65\t0x6c\t0x6c" in out, out
    entry = cli.listed("demo")
    assert (entry["state"], entry["alive"]) == ("paused", True)       # paused it was, paused it stays

    # Ctrl-C ends the command and the server; the port is closed.
    server.send_signal(signal.SIGINT)
    assert server.wait(20) == 0
    assert server.stderr is not None and b"stopped" in server.stderr.read()
    assert cli.execute("demo", "vmfork-gdbserver-status") == {"running": False}
    assert _refused(port)

    # A busy port is a one-line error; a killed command leaves no server behind (it held the server).
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        cli.fail("gdbserver", "demo", "--listen", f"127.0.0.1:{taken}",
                 match=f"cannot listen on 127.0.0.1:{taken}: Address already in use")
    killed, port2 = _start_gdbserver(cli, "demo", "--listen", "0")
    killed.kill()
    killed.wait()
    cli.wait("the server of a killed command to stop",
             lambda: cli.execute("demo", "vmfork-gdbserver-status") == {"running": False}, timeout=10)
    assert _refused(port2)

    # The domain still runs: it reads its input and exits.
    cli.ok("unpause", "demo")
    cli.wait_gone(demo)
    assert result_line(cli.log(demo)).startswith("result: len=5 fnv=a430d84680aabd0b primes=")


@pytest.mark.skipif(GDB is None, reason="needs gdb (Debian package gdb)")
def test_gdbserver_breakpoint_continue_step_and_a_running_domain(cli: CliHarness) -> None:
    # Breakpoint, continue and step run the domain through its own loop: its state follows, and after the detach
    # it runs on to its exit.
    vmi = cli.create_program("vmi", "vmi 3", on_poweroff="preserve")
    cli.wait_state(vmi, "paused")
    m = re.search(r"target=(0x[0-9a-f]+)", cli.log(vmi))
    assert m, cli.log(vmi)
    target = int(m.group(1), 16)
    server, port = _start_gdbserver(cli, "vmi", "--listen", "127.0.0.1:0")
    out = _gdb(port, f"break *{target:#x}", "continue", "info registers rip", "stepi", "info registers rip")
    assert f"Breakpoint 1, {target:#018x} in ?? ()" in out, out
    rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert rips == [target, target + 3], out
    rec = cli.wait_state(vmi, "shutdown")
    assert rec.reason == "the guest exited with status 0"
    assert "vmfork-guest: vmi sum=8 svc=ffffffffffffffff" in cli.log(vmi)
    assert cli.ok("mem", "read", "vmi", hex(target), "1").split()[1] == "48"     # the int3 is gone
    server.send_signal(signal.SIGINT)
    assert server.wait(20) == 0

    # A running domain: GDB's attach pauses it, its detach resumes it.
    spin = cli.create_program("spin", "timer 60000")
    cli.wait_state(spin, "running")
    server, port = _start_gdbserver(cli, "spin", "--listen", "127.0.0.1:0")
    out = _gdb(port, "info registers rip", "info threads")
    assert re.search(r"^rip\s+0x10[0-9a-f]{4}\s", out, re.M) and "Thread 1 (vCPU 0)" in out, out
    cli.wait_state(spin, "running")
    ticks = cli.execute("spin", "vmfork-mem-read", addr=KINFO + 0x20, length=8, raw=True)["data"]
    cli.wait("the timer to tick on", lambda: cli.execute("spin", "vmfork-mem-read", addr=KINFO + 0x20, length=8,
                                                         raw=True)["data"] != ticks)
    assert int.from_bytes(base64.b64decode(ticks), "little") > 0
    server.send_signal(signal.SIGINT)
    assert server.wait(20) == 0
    assert cli.record(spin).state == "running"
    cli.ok("destroy", "spin")
