"""A GDB remote-serial-protocol server for a machine: `gdb -ex "target remote 127.0.0.1:1234"`.

    server = GdbServer(vm, port=1234)      # binds 127.0.0.1 unless told otherwise
    server.serve_forever()                 # or serve_gdb(vm, port=1234)

What GDB gets: an x86-64 target description (general registers, rip, eflags, segment selectors, x87 and SSE
registers, fs_base/gs_base); one thread per vCPU; `g/G/p/P` registers (those of the interrupted code when a vCPU
is stopped at a breakpoint), `m/M/X` memory at virtual addresses through the selected vCPU's page tables (original
bytes under breakpoints), software breakpoints `Z0/z0` (vmfork.vmi.debug: KVM, the #BP stub or the kernel-mode
exit, per host and mode), `c`, `s`, `vCont`, Ctrl-C (pauses the machine), `D` (detach), `k`. Hardware breakpoints
and watchpoints are answered as unsupported, so GDB falls back to software ones.

When a client connects, a running machine is paused (GDB expects a stopped target). When it detaches, or its
connection drops, every breakpoint it set is removed and the machine runs on if it was running when GDB attached or
GDB ran it since, unless the toolstack paused it meanwhile (`paused_by_toolstack`, a callable the domain process
passes: the toolstack's pause and the debugger's are kept apart, as in Xen and QEMU); `k` leaves it paused (the
toolstack may pass `on_kill` to destroy it instead).

Errors reach GDB as text it shows, never as a bare error number that GDB would explain as "Cannot access memory":
a breakpoint, step or continue vmfork cannot do (a guest in real mode on a host that ignores software breakpoints,
a stub address the guest uses, ...) is answered with the reason in a console `O` packet and an `E.errtext` reply.
GDB inserts breakpoints lazily, right before it resumes, and shows only "Cannot access memory" for a refused `Z0`, so
a `Z0` that fails for a reason other than unreadable memory is accepted, and the resume that follows fails with the
reason instead (the machine does not move).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import VmforkError
from ..kvm import structs as s
from .debug import Debugger, debugger
from .errors import BreakpointError, TranslationError
from .memory import AddressSpace
from .target import Target, as_target

if TYPE_CHECKING:
    from ..vm import StopEvent

__all__ = ["TARGET_XML", "GdbServer", "serve_gdb"]

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
TERMINAL = ("exit", "poweroff", "reset", "crash", "debugger-error")

# (name, bits, type, group) in GDB's amd64 register order; the regnum is the index.
CORE_REGS = [(n, 64, "int64" if n not in ("rbp", "rsp") else "data_ptr") for n in
             ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")]
CORE_REGS += [("rip", 64, "code_ptr"), ("eflags", 32, "i386_eflags")]
CORE_REGS += [(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")]
CORE_REGS += [(f"st{i}", 80, "i387_ext") for i in range(8)]
CORE_REGS += [(n, 32, "int") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
SSE_REGS = [(f"xmm{i}", 128, "vec128") for i in range(16)] + [("mxcsr", 32, "i386_mxcsr")]
SEGMENT_REGS = [("fs_base", 64, "int"), ("gs_base", 64, "int")]
ALL_REGS = CORE_REGS + SSE_REGS + SEGMENT_REGS
REGNUM = {name: i for i, (name, _b, _t) in enumerate(ALL_REGS)}


def _reg_xml(start: int, regs: list[tuple[str, int, str]]) -> str:
    return "\n".join(f'    <reg name="{n}" bitsize="{b}" type="{t}" regnum="{start + i}"/>'
                     for i, (n, b, t) in enumerate(regs))


_EFLAGS = "\n".join(f'      <field name="{n}" start="{b}" end="{b}"/>' for b, n in
                    ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"),
                     (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"),
                     (21, "ID")))
_MXCSR = "\n".join(f'      <field name="{n}" start="{b}" end="{b}"/>' for b, n in
                   ((0, "IE"), (1, "DE"), (2, "ZE"), (3, "OE"), (4, "UE"), (5, "PE"), (6, "DAZ"), (7, "IM"),
                    (8, "DM"), (9, "ZM"), (10, "OM"), (11, "UM"), (12, "PM"), (15, "FZ")))

TARGET_XML = f"""<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
  <architecture>i386:x86-64</architecture>
  <feature name="org.gnu.gdb.i386.core">
    <flags id="i386_eflags" size="4">
{_EFLAGS}
    </flags>
{_reg_xml(0, CORE_REGS)}
  </feature>
  <feature name="org.gnu.gdb.i386.sse">
    <vector id="v8bf16" type="bfloat16" count="8"/>
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
{_MXCSR}
    </flags>
{_reg_xml(len(CORE_REGS), SSE_REGS)}
  </feature>
  <feature name="org.gnu.gdb.i386.segments">
{_reg_xml(len(CORE_REGS) + len(SSE_REGS), SEGMENT_REGS)}
  </feature>
</target>
"""


def _checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def _escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes([0x7D, b ^ 0x20])
        else:
            out.append(b)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


class _Disconnected(Exception):
    pass


class GdbServer:
    """Serves one GDB client at a time. `port=0` picks a free port (see `.port`)."""

    def __init__(self, target: Target | object, host: str = "127.0.0.1", port: int = 1234, *,
                 on_kill: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
                 paused_by_toolstack: Callable[[], bool] | None = None, stub_gpa: int | None = None) -> None:
        self.target = as_target(target)
        self.stub_gpa = stub_gpa
        self.dbg: Debugger = debugger(self.target, stub_gpa=stub_gpa)
        self.paused_by_toolstack = paused_by_toolstack
        self.on_kill = on_kill
        self.log = log
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._closed = False
        self._conn: socket.socket | None = None
        self._buf = b""
        self._ack = True
        self._g_thread = 0          # vCPU for g/m/...
        self._resume_on_detach = False
        self.last_stop: StopEvent | None = None
        self.packets = 0
        self._deferred: list[str] = []      # errors of accepted Z0 packets, reported at the next resume

    # --- serving --------------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        while not self._closed:
            self.serve_one()

    def serve_one(self) -> None:
        """Accept one client and serve it until it detaches, kills or disconnects."""
        try:
            conn, _addr = self._listener.accept()
        except OSError:
            if self._closed:
                return
            raise
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn, self._buf, self._ack = conn, b"", True
        ending = "disconnect"
        try:
            self._attach()
            ending = self._session()
        except (_Disconnected, ConnectionError, OSError):
            ending = "disconnect"
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._conn = None
            self._end(ending)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    def _attach(self) -> None:
        self.dbg = debugger(self.target, stub_gpa=self.stub_gpa)
        self._deferred = []
        self._resume_on_detach = False
        if self.target.state == "running":
            self._resume_on_detach = True
            self.last_stop = self.dbg.pause()
        else:
            self.last_stop = None
        self._g_thread = 0

    def _end(self, how: str) -> None:
        """Detach, kill or a dropped connection: breakpoints out, and the machine running again unless killed."""
        try:
            if self.target.state == "running":
                self.dbg.interrupt()
                self.dbg.wait()
            if self.target.state == "destroyed":
                return
            self.dbg.clear(owner="gdb")
            if not self.dbg.breakpoints:
                self.dbg.detach()
            if how == "kill":
                if self.on_kill is not None:
                    self.on_kill()
                return
            last = self.last_stop
            if self._resume_on_detach and not (last is not None and last.reason in TERMINAL) \
                    and self.target.state == "paused" and not self._toolstack_holds():
                dbg = debugger(self.target)
                if dbg.breakpoints:
                    dbg.resume()
                else:
                    self.target.start()
        except VmforkError as e:
            self._say(f"gdbserver: cleaning up after the client failed: {e}")

    def _toolstack_holds(self) -> bool:
        """The toolstack paused the machine (e.g. `vmfork pause` while GDB had it stopped): detaching keeps it so."""
        return self.paused_by_toolstack is not None and bool(self.paused_by_toolstack())

    def _error(self, text: str) -> None:
        """An error GDB shows: the reason on its console (`O`), then `E.errtext`."""
        line = f"vmfork: {text}\n"
        self._send("O" + line.encode().hex())
        self._send("E." + text.replace("#", " ").replace("$", " ").replace("}", ")").replace("*", " "))

    # --- packets --------------------------------------------------------------------------------------------------

    def _recv(self) -> bytes:
        assert self._conn is not None
        data = self._conn.recv(65536)
        if not data:
            raise _Disconnected()
        return data

    def _read_packet(self) -> bytes | None:
        """The next packet's payload; None for a Ctrl-C byte."""
        while True:
            buf = self._buf
            while buf and buf[:1] in (b"+", b"-"):
                buf = buf[1:]
            if buf[:1] == b"\x03":
                self._buf = buf[1:]
                return None
            start = buf.find(b"$")
            if start >= 0:
                end = buf.find(b"#", start)
                if end >= 0 and len(buf) >= end + 3:
                    payload = buf[start + 1:end]
                    self._buf = buf[end + 3:]
                    if self._ack:
                        ok = _checksum(payload) == buf[end + 1:end + 3].lower()
                        self._send_raw(b"+" if ok else b"-")
                        if not ok:
                            continue
                    self.packets += 1
                    return payload
            self._buf = buf
            self._buf += self._recv()

    def _send_raw(self, data: bytes) -> None:
        assert self._conn is not None
        self._conn.sendall(data)

    def _send(self, payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._send_raw(b"$" + data + b"#" + _checksum(data))

    def _session(self) -> str:
        while True:
            packet = self._read_packet()
            if packet is None:
                continue            # Ctrl-C while stopped: nothing to do
            result = self._handle(packet)
            if result in ("detach", "kill"):
                return result

    # --- commands ---------------------------------------------------------------------------------------------

    def _handle(self, p: bytes) -> str | None:
        cmd = p[:1]
        try:
            if p.startswith(b"qSupported"):
                self._send("PacketSize=4000;qXfer:features:read+;QStartNoAckMode+;swbreak+;vContSupported+")
            elif p == b"QStartNoAckMode":
                self._send("OK")
                self._ack = False
            elif p.startswith(b"qXfer:features:read:target.xml:"):
                off, length = (int(x, 16) for x in p.split(b":")[-1].split(b","))
                chunk = TARGET_XML.encode()[off:off + length]
                more = off + length < len(TARGET_XML.encode())
                self._send((b"m" if more else b"l") + _escape(chunk))
            elif p.startswith(b"qXfer:"):
                self._send("")
            elif p == b"?":
                self._send(self._stop_reply(self.last_stop))
            elif p in (b"qfThreadInfo",):
                self._send("m" + ",".join(f"{i + 1:x}" for i in range(self.target.vcpu_count)))
            elif p == b"qsThreadInfo":
                self._send("l")
            elif p == b"qC":
                self._send(f"QC{self._g_thread + 1:x}")
            elif p.startswith(b"qThreadExtraInfo,"):
                tid = int(p.split(b",")[1], 16)
                self._send(f"vCPU {tid - 1}".encode().hex())
            elif p == b"qAttached" or p.startswith(b"qAttached:"):
                self._send("1")
            elif p.startswith(b"qSymbol"):
                self._send("OK")
            elif cmd == b"H":
                selected = self._thread(p[2:])
                if p[1:2] == b"g" and selected is not None:
                    self._g_thread = selected
                self._send("OK")
            elif cmd == b"T":
                self._send("OK" if self._thread(p[1:]) is not None else "E01")
            elif cmd == b"g":
                self._send(self._read_all_regs(self._g_thread))
            elif cmd == b"G":
                self._write_all_regs(self._g_thread, bytes.fromhex(p[1:].decode()))
                self._send("OK")
            elif cmd == b"p":
                self._send(self._read_reg(self._g_thread, int(p[1:], 16)))
            elif cmd == b"P":
                regnum, value = p[1:].split(b"=")
                self._write_reg(self._g_thread, int(regnum, 16), bytes.fromhex(value.decode()))
                self._send("OK")
            elif cmd == b"m":
                addr, length = (int(x, 16) for x in p[1:].split(b","))
                self._send(self._read_mem(addr, length))
            elif cmd in (b"M", b"X"):
                head, data = p[1:].split(b":", 1)
                addr, length = (int(x, 16) for x in head.split(b","))
                raw = bytes.fromhex(data.decode()) if cmd == b"M" else _unescape(data)
                if len(raw) != length:
                    self._send("E01")
                else:
                    AddressSpace(self.dbg, self._g_thread).write(addr, raw)
                    self._send("OK")
            elif cmd in (b"Z", b"z"):
                self._breakpoint(p)
            elif p == b"vCont?":
                self._send("vCont;c;C;s;S")
            elif p.startswith(b"vCont;"):
                return self._vcont(p[6:])
            elif cmd in (b"c", b"C"):
                if cmd == b"c" and len(p) > 1:
                    self._set_pc(self._g_thread, int(p[1:], 16))
                return self._resume(None)
            elif cmd in (b"s", b"S"):
                if cmd == b"s" and len(p) > 1:
                    self._set_pc(self._g_thread, int(p[1:], 16))
                return self._resume(self._g_thread)
            elif cmd == b"D":
                self._send("OK")
                return "detach"
            elif cmd == b"k":
                return "kill"
            else:
                self._send("")
        except (VmforkError, ValueError, IndexError, struct.error) as e:
            self._say(f"gdbserver: {p[:40]!r}: {e}")
            if cmd in (b"m", b"M", b"X"):
                self._send("E14")
            else:
                self._error(str(e))
        return None

    def _thread(self, text: bytes) -> int | None:
        if text.startswith(b"p"):
            text = text.split(b".")[-1]
        tid = int(text, 16) if text not in (b"-1", b"") else 0
        if tid == -1 or tid == 0:
            return 0
        if 1 <= tid <= self.target.vcpu_count:
            return tid - 1
        return None

    # --- registers ----------------------------------------------------------------------------------------------

    def _values(self, vcpu: int) -> list[bytes]:
        regs, sregs = self.dbg.get_regs(vcpu), self.dbg.get_sregs(vcpu)
        out = [int(getattr(regs, n)).to_bytes(8, "little") for n, _b, _t in CORE_REGS[:16]]
        out.append(regs.rip.to_bytes(8, "little"))
        out.append((regs.rflags & 0xFFFFFFFF).to_bytes(4, "little"))
        out += [int(getattr(sregs, seg).selector).to_bytes(4, "little") for seg in ("cs", "ss", "ds", "es", "fs", "gs")]
        try:
            fpu = self.dbg.get_fpu(vcpu)
        except VmforkError:
            fpu = s.Fpu()
        out += [bytes(fpu.fpr[i])[:10] for i in range(8)]
        out += [v.to_bytes(4, "little") for v in (fpu.fcw, fpu.fsw, _full_tag(fpu), 0, fpu.last_ip & 0xFFFFFFFF, 0,
                                                  fpu.last_dp & 0xFFFFFFFF, fpu.last_opcode)]
        out += [bytes(fpu.xmm[i]) for i in range(16)]
        out.append(fpu.mxcsr.to_bytes(4, "little"))
        out += [sregs.fs.base.to_bytes(8, "little"), sregs.gs.base.to_bytes(8, "little")]
        return out

    def _read_all_regs(self, vcpu: int) -> str:
        return b"".join(self._values(vcpu)).hex()

    def _read_reg(self, vcpu: int, n: int) -> str:
        if not 0 <= n < len(ALL_REGS):
            return "E45"
        return self._values(vcpu)[n].hex()

    def _write_reg(self, vcpu: int, n: int, raw: bytes) -> None:
        value = int.from_bytes(raw, "little")
        name = ALL_REGS[n][0]
        if n < 16 or name == "rip":
            regs = self.dbg.get_regs(vcpu)
            setattr(regs, name, value)
            self.dbg.set_regs(vcpu, regs)
        elif name == "eflags":
            regs = self.dbg.get_regs(vcpu)
            regs.rflags = (regs.rflags & ~0xFFFFFFFF) | value
            self.dbg.set_regs(vcpu, regs)
        elif name in ("fs_base", "gs_base"):
            sregs = self.dbg.get_sregs(vcpu)
            getattr(sregs, name[:2]).base = value
            self.dbg.set_sregs(vcpu, sregs)
        else:
            current = self._values(vcpu)[n]
            if current != raw[:len(current)]:
                raise VmforkError(f"register {name} cannot be written through the GDB server")

    def _write_all_regs(self, vcpu: int, raw: bytes) -> None:
        current = self._values(vcpu)
        pos = 0
        regs = self.dbg.get_regs(vcpu)
        changed = False
        for n, value in enumerate(current):
            new = raw[pos:pos + len(value)]
            pos += len(value)
            if len(new) < len(value) or new == value:
                continue
            name = ALL_REGS[n][0]
            if n < 16 or name == "rip":
                setattr(regs, name, int.from_bytes(new, "little"))
                changed = True
            elif name == "eflags":
                regs.rflags = (regs.rflags & ~0xFFFFFFFF) | int.from_bytes(new, "little")
                changed = True
        if changed:
            self.dbg.set_regs(vcpu, regs)

    def _set_pc(self, vcpu: int, pc: int) -> None:
        regs = self.dbg.get_regs(vcpu)
        regs.rip = pc
        self.dbg.set_regs(vcpu, regs)

    # --- memory and breakpoints ---------------------------------------------------------------------------------

    def _read_mem(self, addr: int, length: int) -> str:
        space = AddressSpace(self.dbg, self._g_thread)
        out = b""
        pos, end = addr, addr + min(length, 0x1000)
        while pos < end:
            n = min(end - pos, 0x1000 - (pos & 0xFFF))
            try:
                out += space.read(pos, n)
            except VmforkError:
                if not out:
                    raise
                break
            pos += n
        return out.hex()

    def _breakpoint(self, p: bytes) -> None:
        kind, addr_text, *_rest = p[1:].split(b",")
        if kind != b"0":
            self._send("")      # hardware breakpoints and watchpoints: unsupported, GDB uses software ones
            return
        addr = int(addr_text, 16)
        if p[:1] == b"Z":
            try:
                self.dbg.add_breakpoint(addr, owner="gdb", vcpu=self._g_thread)
            except BreakpointError as e:
                if isinstance(e.__cause__, TranslationError) or "cannot set a breakpoint at" in str(e):
                    raise           # unmapped: GDB's "Cannot access memory" is the truth
                self._deferred.append(str(e))
        else:
            bp = self.dbg.find(addr, vcpu=self._g_thread)
            if bp is not None:
                self.dbg.remove_breakpoint(bp)
        self._send("OK")

    # --- running ------------------------------------------------------------------------------------------------

    def _vcont(self, actions: bytes) -> str | None:
        step = None
        for action in actions.split(b";"):
            verb, _, tid = action.partition(b":")
            if verb[:1] in (b"s", b"S"):
                step = self._thread(tid) if tid else self._g_thread
                if step is None:
                    self._send("E01")
                    return None
        return self._resume(step)

    def _resume(self, step: int | None) -> str | None:
        if self._deferred:
            text = "; ".join(dict.fromkeys(self._deferred))
            self._deferred = []
            self._say(f"gdbserver: cannot resume: {text}")
            self._error(text)
            return None
        try:
            self.dbg.resume(step_vcpu=step)
        except VmforkError as e:
            self._say(f"gdbserver: cannot resume: {e}")
            self._error(str(e))
            return None
        self._resume_on_detach = True
        ev = self._wait_running()
        self.last_stop = ev
        self._send(self._stop_reply(ev))
        if ev.reason in TERMINAL:
            self._resume_on_detach = False
        return None

    def _wait_running(self) -> StopEvent:
        """Wait for the machine to stop, pausing it on Ctrl-C; a dropped client pauses it too (and is re-raised)."""
        done = threading.Event()
        result: list[StopEvent] = []
        rfd, wfd = os.pipe()

        def waiter() -> None:
            try:
                result.append(self.dbg.wait())
            finally:
                done.set()
                os.write(wfd, b"x")

        thread = threading.Thread(target=waiter, name="vmfork-gdb-wait", daemon=True)
        thread.start()
        dropped = False
        try:
            conn = self._conn
            assert conn is not None
            while not done.is_set():
                readable, _, _ = select.select([rfd] if dropped else [conn.fileno(), rfd], [], [])
                if conn.fileno() in readable and not dropped:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        dropped = True
                        self.dbg.interrupt()
                        continue
                    if b"\x03" in data:
                        self.dbg.interrupt()
                        data = data.replace(b"\x03", b"")
                    self._buf += data
            thread.join()
        finally:
            os.close(rfd)
            os.close(wfd)
        if dropped:
            if result:
                self.last_stop = result[0]
            raise _Disconnected()
        return result[0]

    def _stop_reply(self, ev: StopEvent | None) -> str:
        if ev is None:
            return f"T{SIGTRAP:02x}thread:{self._g_thread + 1:x};"
        if ev.reason in ("exit", "poweroff", "reset"):
            return f"W{(ev.status or 0) & 0xFF:02x}"
        if ev.reason in ("crash", "debugger-error"):
            return f"X{SIGSEGV:02x}"
        vcpu = ev.vcpu if ev.vcpu is not None else self._g_thread
        self._g_thread = vcpu
        if ev.reason == "breakpoint":
            return f"T{SIGTRAP:02x}swbreak:;thread:{vcpu + 1:x};"
        if ev.reason == "pause":
            return f"T{SIGINT:02x}thread:{vcpu + 1:x};"
        return f"T{SIGTRAP:02x}thread:{vcpu + 1:x};"


def _full_tag(fpu: s.Fpu) -> int:
    """KVM gives the abridged x87 tag (1 bit per register, 1 = valid); GDB wants the full one (2 bits, 11 =
    empty). Valid registers are reported as 00 (valid)."""
    tag = 0
    for i in range(8):
        if not fpu.ftwx >> i & 1:
            tag |= 3 << (2 * i)
    return tag


def serve_gdb(target: Target | object, host: str = "127.0.0.1", port: int = 1234, *, once: bool = False,
              on_kill: Callable[[], None] | None = None, paused_by_toolstack: Callable[[], bool] | None = None,
              stub_gpa: int | None = None) -> None:
    """Serve GDB clients on host:port (loopback by default) until interrupted (or after one client, `once`)."""
    server = GdbServer(target, host, port, on_kill=on_kill, paused_by_toolstack=paused_by_toolstack,
                       stub_gpa=stub_gpa)
    try:
        if once:
            server.serve_one()
        else:
            server.serve_forever()
    finally:
        server.close()
