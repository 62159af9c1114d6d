"""The GDB server, driven by Debian's real `gdb` in batch mode and by a raw protocol client (Ctrl-C, a client that
drops the connection)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from guest import boot, console, run_to_ready
from vmfork.fork import VM
from vmfork.vmi.breakpoints import debugger
from vmfork.vmi.gdbserver import REGNUM, TARGET_XML, GdbServer
from vmfork.vmi.memory import read_phys

GDB = shutil.which("gdb")


def target_of(vm: VM) -> int:
    m = re.search(r"target=(0x[0-9a-f]+)", console(vm))
    assert m, console(vm)
    return int(m.group(1), 16)


def serve(vm: VM) -> tuple[GdbServer, threading.Thread]:
    server = GdbServer(vm, port=0)
    thread = threading.Thread(target=server.serve_one, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.skipif(GDB is None, reason="needs gdb (Debian package gdb)")
def test_real_gdb_reads_breaks_steps_and_detaches(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "vmi 3", machines)
    run_to_ready(vm)
    target = target_of(vm)
    rip = vm.vcpus[0].get_regs().rip
    server, thread = serve(vm)
    assert server.host == "127.0.0.1"
    cmds = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{server.port}",
            "info registers rip", "x/8xb 0x101000", f"break *{target:#x}", "continue",
            "info registers rip rdi", "stepi", "info registers rip", "x/i $pc", "info threads", "detach"]
    r = subprocess.run([str(GDB), "-nx", "-batch", *[a for c in cmds for a in ("-ex", c)]],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout
    thread.join(10)
    server.close()
    assert "0x101000:\t0x56\t0x4d\t0x46\t0x4b\t0x49\t0x4e\t0x46\t0x4f" in out, out + r.stderr
    assert f"Breakpoint 1, {target:#018x} in ?? ()" in out, out + r.stderr
    rips = re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)
    assert len(rips) == 3 and int(rips[1], 16) == target and int(rips[2], 16) == target + 3, out
    assert int(rips[0], 16) != target and int(rips[0], 16) >= rip
    assert re.search(r"^rdi\s+0x0\s", out, re.M), out
    assert "imul   %rdi,%rax" in out and "Thread 1 (vCPU 0)" in out
    assert "detached" in out, out + r.stderr
    ev = vm.wait(10)                            # the domain runs on to its exit, without breakpoints
    assert ev.reason == "exit" and ev.status == 0, ev
    assert "vmi sum=8 svc=ffffffffffffffff" in console(vm)
    assert read_phys(vm, target, 1) == b"\x48"


class Client:
    """A minimal GDB protocol client."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def send(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$" + data + b"#" + b"%02x" % (sum(data) & 0xFF))

    def reply(self) -> str:
        while True:
            self.buf = self.buf.lstrip(b"+")
            start, end = self.buf.find(b"$"), self.buf.find(b"#")
            if start >= 0 and end > start and len(self.buf) >= end + 3:
                payload = self.buf[start + 1:end]
                self.buf = self.buf[end + 3:]
                self.sock.sendall(b"+")
                return payload.decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def ask(self, payload: str) -> str:
        self.send(payload)
        return self.reply()


def test_protocol_registers_memory_xml_and_ctrl_c(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "vmi 2000000000", machines)     # long enough to be interrupted
    run_to_ready(vm)
    vm.start()                                  # a running domain: attaching pauses it
    time.sleep(0.1)
    server, thread = serve(vm)
    c = Client(server.port)
    assert "qXfer:features:read+" in c.ask("qSupported:swbreak+;xmlRegisters=i386")
    assert vm.state == "paused" and c.ask("?").startswith("T02")
    xml = ""
    while True:
        part = c.ask(f"qXfer:features:read:target.xml:{len(xml):x},200")
        xml += part[1:]
        if part[0] == "l":
            break
    assert xml == TARGET_XML and "org.gnu.gdb.i386.core" in xml
    g = c.ask("g")
    rip = vm.vcpus[0].get_regs().rip
    assert int.from_bytes(bytes.fromhex(g[16 * 16:17 * 16]), "little") == rip
    assert c.ask(f"p{REGNUM['rip']:x}") == rip.to_bytes(8, "little").hex()
    assert c.ask(f"p{REGNUM['fs_base']:x}") == bytes(8).hex()
    assert bytes.fromhex(c.ask("m101000,8")) == b"VMFKINFO"
    assert c.ask("m123456789000,8").startswith("E")
    assert c.ask(f"P{REGNUM['r12']:x}=" + (5).to_bytes(8, "little").hex()) == "OK"
    assert vm.vcpus[0].get_regs().r12 == 5
    assert c.ask(f"P{REGNUM['r12']:x}=" + (2000000000).to_bytes(8, "little").hex()) == "OK"
    assert c.ask("M900000,4:deadbeef") == "OK" and read_phys(vm, 0x900000, 4) == bytes.fromhex("deadbeef")
    assert c.ask("qfThreadInfo") == "m1" and c.ask("qsThreadInfo") == "l"
    assert c.ask("Z1,10a391,1") == ""           # hardware breakpoints: unsupported
    c.send("vCont;c")
    time.sleep(0.3)
    assert vm.state == "running"
    c.sock.sendall(b"\x03")                     # Ctrl-C
    assert c.reply().startswith("T02")
    assert vm.state == "paused"
    c.send("k")
    thread.join(10)
    server.close()
    assert vm.state == "paused"                 # kill leaves the domain paused (the toolstack decides)


def test_a_client_that_drops_leaves_the_domain_running_without_breakpoints(
        pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "vmi 3", machines)
    run_to_ready(vm)
    target = target_of(vm)
    server, thread = serve(vm)
    c = Client(server.port)
    c.ask("qSupported")
    assert c.ask(f"Z0,{target:x},1") == "OK"
    assert read_phys(vm, target, 1) == b"\xcc"
    assert bytes.fromhex(c.ask(f"m{target:x},1")) == b"\x48"     # GDB sees the original byte
    assert c.ask("c").startswith("T05swbreak:;thread:1;")
    c.sock.close()                              # no detach: the connection just drops
    thread.join(10)
    server.close()
    ev = vm.wait(10)
    assert ev.reason == "exit" and ev.status == 0, ev
    assert "vmi sum=8 svc=ffffffffffffffff" in console(vm)
    assert read_phys(vm, target, 1) == b"\x48"
    assert not debugger(vm).breakpoints


def test_the_server_binds_to_loopback_by_default(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "hello", machines)
    server = GdbServer(vm, port=0)
    try:
        assert server.host == "127.0.0.1"
    finally:
        server.close()
