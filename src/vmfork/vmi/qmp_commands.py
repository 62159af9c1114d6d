"""Introspection through a domain's control socket: QMP commands that run in the domain process, next to its VM.

The domain imports this module at start (`vmfork.toolstack.domain.EXTENSION_MODULES`) and these commands join its
command table. Every failure a user can cause (an address outside guest RAM, a non-canonical or unmapped virtual
address, a vCPU that does not exist, a GDB port in use) is a QMP error with a one-line message; the domain keeps
running.

    vmfork-mem-read        {addr, length, virt?, vcpu?, raw?}  -> {text} (hexdump), or {data} (base64) with raw
    vmfork-mem-write       {addr, data, encoding?: "hex" | "base64" (default hex), virt?, vcpu?} -> {length, text}
    vmfork-regs            {vcpu?}  -> {text, regs: {"<vcpu>": {name: value}}}; without vcpu: every vCPU
    vmfork-translate       {vaddr, vcpu?}  -> {text (the walk, level by level), paddr, page_size, mode}
    vmfork-disasm          {addr?, count?, vcpu?}  -> {text}; addr defaults to the vCPU's rip
    vmfork-diff            {ancestor?, max_pages?, max_lines?}  -> {text, fork, ancestor, pages, registers}
    vmfork-gdbserver-start {host?, port?, hold?}  -> {host, port}
    vmfork-gdbserver-stop  -> {stopped: bool}
    vmfork-gdbserver-status -> {running, host, port, client}

Addresses are guest-physical unless `virt` is true (then linear addresses through vCPU `vcpu`'s page tables,
default vCPU 0). Reads and writes of a running domain are allowed: memory is read as it is at that moment and vCPU
state is that of the vCPU's last exit, so the result is racy (consistent for a paused domain), as with `vmfork.vmi`.

Diff across domains: a fork domain holds its parent's memory as the parent was at the fork point (its MemoryImage
mapped read-only: `memory.base_pages`; the parent stays paused with read-only RAM while the fork lives, so that is
the parent's memory now) and its own fork-time state (`fork_state`). So `vmfork-diff` compares the fork with its
direct parent without asking the parent's process. An `ancestor` further up is refused with an error: the domain's
image merges the ancestors' pages, and their processes hold them; diff each level instead.

GDB server: `vmfork-gdbserver-start` starts `GdbServer` in a thread of the domain process. Host default
127.0.0.1 (loopback). Port: when given, exactly that one (0: any free port; a busy port is an error); when not given,
1234, or the next free port up to 1333 if 1234 is taken. The reply names the port. One server per domain. `hold`:
the server stops when the QMP connection that started it closes (what `vmfork gdbserver` uses, so a killed command
leaves no listening port behind); without it the server runs until `vmfork-gdbserver-stop` or the domain's end.
A client that detaches or drops its connection leaves the domain without breakpoints, running again if it was
running when GDB attached (or GDB ran it since), unless the toolstack holds it paused (`vmfork pause` before or
during the session): the debugger's and the toolstack's pauses are kept apart, like Xen's pause count, and
`vmfork list` shows who holds a paused domain (DomainTarget.debugger_attached / debugger_detached).

Run control from the GDB thread goes through the domain's main thread (which owns every change to the machine):
`DomainTarget` is a `LocalTarget` whose start/pause/wait/run are carried out by the domain loop, so the domain's
state (`vmfork list`, query-status, STOP/RESUME events, on_poweroff and friends) follows what GDB does, and the
domain's own commands (`pause`, `unpause`) work while GDB is connected.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import os
import queue
import selectors
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import VmStateError
from ..toolstack import domain as _domain
from ..toolstack.qmp import ArgSpec, QmpError
from .commands import MAX_READ, disasm_text, mem_read, mem_read_partial, mem_write, regs_text
from .errors import VmiError
from .memory import hexdump
from .target import LocalTarget

if TYPE_CHECKING:
    from ..fork import VM
    from ..toolstack.domain import Connection, Domain
    from ..vm import StopEvent
    from .gdbserver import GdbServer

__all__ = ["GDB_DEFAULT_PORT", "GDB_PORT_TRIES", "MAX_TEXT_READ", "DomainTarget"]

MAX_TEXT_READ = 1 << 20         # bytes one hexdump read may cover (its text is about 5x as long)
MAX_DISASM = 1000
GDB_DEFAULT_PORT = 1234
GDB_PORT_TRIES = 100            # without an explicit port: 1234..1333
DEBUGGER = "debugger"           # the GDB server's name among a domain's pause holders
U64 = 1 << 64

T = TypeVar("T")


qmp_command = _domain.qmp_command


# --- argument checks ------------------------------------------------------------------------------------------------

def _u64(value: int) -> str | None:
    return None if 0 <= value < U64 else "must be an integer from 0 to 2^64-1"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port number (0-65535)"


def _encoding(value: str) -> str | None:
    return None if value in ("base64", "hex") else "must be \"hex\" or \"base64\""


# --- running things on the domain's main thread ---------------------------------------------------------------------

class MainThreadCalls:
    """Lets other threads (the GDB server's) run functions on the domain's main thread, which owns the machine.

    A pipe registered in the domain's selector wakes the main loop; it runs the queued calls between its other
    work. Made on the main thread (a QMP handler)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.main = threading.get_ident()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        domain.sel.register(self._r, selectors.EVENT_READ, self._on_ready)

    def _on_ready(self, mask: int = 0) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass
        self.run_pending()

    def run_pending(self) -> None:
        """Run the queued calls (on the main thread)."""
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on the main thread (directly when called there); its exceptions are raised here."""
        if threading.get_ident() == self.main:
            return fn()
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"\0")
        while True:
            try:
                return fut.result(timeout=0.25)
            except TimeoutError:
                if self.domain.quitting:
                    fut.cancel()
                    raise VmStateError(f"{self.domain.label()} is ending") from None


# --- the machine as the GDB server sees it --------------------------------------------------------------------------

class DomainTarget(LocalTarget):
    """A `LocalTarget` for a domain's machine whose run control goes through the domain's main thread: started and
    paused by the domain (so its state, events and on_* actions follow), waited for through the machine's stop
    callbacks (the domain's own waiter thread is the only one in `VM.wait`)."""

    def __init__(self, domain: Domain, calls: MainThreadCalls) -> None:
        super().__init__(domain.machine)
        self.domain = domain
        self.calls = calls
        self._cond = threading.Condition()
        self._stops = 0
        self.machine.on_stop.append(self._on_stop)

    def _on_stop(self, ev: StopEvent) -> None:
        with self._cond:
            self._stops += 1
            self._cond.notify_all()

    def _settle(self) -> None:
        """(Main thread) Let the domain handle a stop of its machine now rather than at its next loop turn."""
        d = self.domain
        if d.vm is self.machine and self.machine.state != "running":
            d._collect_stops(block=True)

    # Pause holders (issue 14): while a GDB client is attached, the debugger's stops hold the domain paused under
    # the name "debugger", apart from the toolstack's ("vmfork pause"). The debugger runs the guest when GDB says
    # so; when it lets go (detach), the domain runs again only if no other holder is left. The GDB server may say
    # so explicitly (debugger_attached / debugger_detached); until it does, a client connection tells.

    def debugger_attached(self) -> None:
        """(any thread) A debugger takes hold: the domain is paused, and held paused for it."""
        self.calls.call(lambda: self.domain.hold_pause(DEBUGGER))

    def debugger_detached(self, resume: bool = True) -> None:
        """(any thread) The debugger lets go; with `resume`, the domain runs again unless another holder (the
        toolstack) still holds it paused."""
        def release() -> None:
            self._settle()
            d = self.domain
            if resume and d.state == "paused":
                d.release_pause(DEBUGGER)
            else:
                d.pause_holders.discard(DEBUGGER)
                d._publish_holders()
        self.calls.call(release)

    def _client_attached(self) -> bool:
        server = _gdb.server
        return server is not None and server.target is self and server._conn is not None

    def start(self) -> None:
        attached = self._client_attached()

        def start() -> None:
            d = self.domain
            self._settle()
            if d.vm is not self.machine or self.machine.state == "destroyed":
                raise VmStateError(f"{self.machine.name} is destroyed")
            if d.state == "running":
                return
            if d.state in ("shutdown", "crashed"):
                raise VmStateError(f"cannot resume {d.label()}: {d.reason}")
            if not attached:
                d.release_pause(DEBUGGER)       # the GDB server resuming after its client left
                return
            d._start()
        self.calls.call(start)

    def wait(self, timeout: float | None = None) -> StopEvent:
        from ..vm import StopEvent
        with self._cond:
            if self.machine.state == "running":
                self._cond.wait_for(lambda: self.machine.state != "running", timeout)
            if self.machine.state == "running":
                return StopEvent("timeout")
        ev = self.machine.stop_event or StopEvent("pause")
        attached = self._client_attached()

        def settle() -> None:
            self._settle()
            # A stop the attached debugger waited for (a breakpoint, a step, its interrupt) is the debugger's.
            if attached and self.domain.state == "paused" and self.domain.vm is self.machine:
                self.domain.hold_pause(DEBUGGER)
        with contextlib.suppress(VmStateError):
            self.calls.call(settle)
        return ev

    def pause(self) -> StopEvent:
        from ..vm import StopEvent

        attached = self._client_attached()

        def pause() -> None:
            self._settle()
            if self.domain.vm is self.machine:
                if attached:
                    self.domain.hold_pause(DEBUGGER)
                else:
                    self.domain._pause()
        self.calls.call(pause)
        if self.machine.state == "destroyed":
            raise VmStateError(f"{self.machine.name} is destroyed")
        return self.machine.stop_event or StopEvent("pause")

    def run(self, timeout: float | None = None) -> StopEvent:
        self.start()
        ev = self.wait(timeout)
        if ev.reason == "timeout":
            self.pause()
        return ev

    def __repr__(self) -> str:
        return f"<DomainTarget {self.domain.label()}>"


class _GdbState:
    """The domain's GDB server, if any (one per domain process)."""

    def __init__(self) -> None:
        self.calls: MainThreadCalls | None = None
        self.target: DomainTarget | None = None
        self.server: GdbServer | None = None
        self.thread: threading.Thread | None = None
        self.owner: Connection | None = None

    def target_for(self, d: Domain) -> DomainTarget:
        if self.calls is None:
            self.calls = MainThreadCalls(d)
        vm = d.machine
        if self.target is None or self.target.machine is not vm:
            self.target = DomainTarget(d, self.calls)
        return self.target


_gdb = _GdbState()


def _log(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


# --- helpers --------------------------------------------------------------------------------------------------------

def _vm(d: Domain) -> VM:
    vm = d.machine
    if vm.state == "destroyed" or vm.memory.closed:
        raise QmpError(f"{d.label()} has no machine")
    return vm


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- memory, registers, translation, disassembly --------------------------------------------------------------------

@qmp_command("vmfork-mem-read", addr=ArgSpec(int, True, _u64), length=ArgSpec(int, True, _non_negative),
             virt=ArgSpec(bool), vcpu=ArgSpec(int, False, _non_negative), raw=ArgSpec(bool), partial=ArgSpec(bool),
             help="read guest memory (physical, or virtual through a vCPU's page tables): a hexdump, or base64 "
                  "bytes with raw; with partial, a range running into unreadable memory gives the readable part "
                  "and stopped_at (the first unreadable address) with the reason")
def _mem_read(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    raw = args.get("raw", False)
    length = args["length"]
    limit = MAX_READ if raw else MAX_TEXT_READ
    if not 0 < length <= limit:
        raise QmpError(f"length must be 1..{limit} bytes{'' if raw else ' for a hexdump (raw: up to 16 MiB)'}, "
                       f"got {length}")
    addr, virt, vcpu = args["addr"], args.get("virt", False), args.get("vcpu", 0)
    if args.get("partial"):
        part = mem_read_partial(_vm(d), addr, length, virt=virt, vcpu=vcpu)
        out: dict[str, Any] = {"length": len(part.data), "stopped_at": part.stopped_at, "error": part.error}
        if raw:
            out["data"] = base64.b64encode(part.data).decode()
        else:
            out["text"] = "\n".join(hexdump(part.data, addr)) if part.data else ""
        return out
    data = mem_read(_vm(d), addr, length, virt=virt, vcpu=vcpu, raw=raw)
    if isinstance(data, bytes):
        return {"data": base64.b64encode(data).decode(), "length": len(data)}
    return {"text": data, "length": length}


@qmp_command("vmfork-mem-write", addr=ArgSpec(int, True, _u64), data=ArgSpec(str, True),
             encoding=ArgSpec(str, False, _encoding), virt=ArgSpec(bool), vcpu=ArgSpec(int, False, _non_negative),
             help="write guest memory (physical, or virtual through a vCPU's page tables); data in hex (default) "
                  "or base64")
def _mem_write(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    enc = args.get("encoding", "hex")
    if enc == "hex":
        from .commands import parse_bytes
        data = parse_bytes(args["data"])
    else:
        try:
            data = base64.b64decode(args["data"], validate=True)
        except (ValueError, binascii.Error):
            raise QmpError("Parameter 'data' is not valid base64") from None
    if len(data) > MAX_READ:
        raise QmpError(f"Parameter 'data' holds more than {MAX_READ} bytes")
    text = mem_write(_vm(d), args["addr"], data, virt=args.get("virt", False), vcpu=args.get("vcpu", 0))
    return {"length": len(data), "text": text}


@qmp_command("vmfork-regs", vcpu=ArgSpec(int, False, _non_negative),
             help="a vCPU's registers (every vCPU's without vcpu) as text and as values")
def _regs(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    from .regs import regs_dict
    from .target import as_target
    t = as_target(_vm(d))
    vcpu = args.get("vcpu")
    text = regs_text(t, vcpu)
    indexes = range(t.vcpu_count) if vcpu is None else [vcpu]
    return {"text": text, "regs": {str(i): regs_dict(t.get_regs(i), t.get_sregs(i)) for i in indexes},
            "running": t.state == "running"}


@qmp_command("vmfork-translate", vaddr=ArgSpec(int, True, _u64), vcpu=ArgSpec(int, False, _non_negative),
             help="translate a virtual address through a vCPU's page tables, showing the walk")
def _translate(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    from .commands import _check_vcpu
    from .memory import translate
    from .target import as_target
    t = as_target(_vm(d))
    vcpu = args.get("vcpu", 0)
    _check_vcpu(t, vcpu)
    tr = translate(t, args["vaddr"], vcpu=vcpu)     # TranslationError: its one-line message names the level
    return {"text": tr.describe(), "paddr": tr.paddr, "page_size": tr.page_size, "mode": tr.mode}


@qmp_command("vmfork-disasm", addr=ArgSpec(int, False, _u64), count=ArgSpec(int, False, _non_negative),
             vcpu=ArgSpec(int, False, _non_negative),
             help="disassemble guest code (virtual addresses; default: from the vCPU's rip)")
def _disasm(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    count = args.get("count", 10)
    if not 0 < count <= MAX_DISASM:
        raise QmpError(f"count must be 1..{MAX_DISASM}, got {count}")
    return {"text": disasm_text(_vm(d), args.get("addr"), count, vcpu=args.get("vcpu", 0))}


# --- diff -----------------------------------------------------------------------------------------------------------

class _ParentView:
    """The fork's parent as `vmi.diff` needs it: its memory as it was at the fork point (the fork's base mapping)."""

    def __init__(self, name: str, pages: Any) -> None:
        self.name = name
        self.state = "paused"
        self.parent = None
        self.memory = _Pages(pages)


class _Pages:
    def __init__(self, pages: Any) -> None:
        self.pages = pages


class _ForkView:
    """A fork domain's machine with a parent (`vmi.diff` walks `fork.parent`; a domain's parent is another process)."""

    def __init__(self, vm: VM, parent: _ParentView) -> None:
        self._vm = vm
        self.parent = parent
        self.name = vm.name
        self.fork_state = vm.fork_state
        self.memory = vm.memory
        self.vcpus = vm.vcpus

    @property
    def state(self) -> str:
        return self._vm.state

    def capture(self) -> Any:
        return self._vm.capture()


def _parent_label(d: Domain) -> str:
    pid = d.parent_domid
    if pid is None:
        return "its parent"
    try:
        rec = d.registry.get(pid)
    except Exception:
        rec = None
    return rec.label() if rec is not None else f"domain {pid}"


def _parent_name(d: Domain) -> str:
    pid = d.parent_domid
    try:
        rec = d.registry.get(pid) if pid is not None else None
    except Exception:
        rec = None
    return rec.name if rec is not None else f"domain {pid}"


@qmp_command("vmfork-diff", ancestor=ArgSpec(str), max_pages=ArgSpec(int, False, _non_negative),
             max_lines=ArgSpec(int, False, _non_negative),
             help="what this fork changed: every page it owns compared byte by byte with its parent's, and the "
                  "registers that differ from its fork point (max_pages/max_lines limit the text; 0: no limit)")
def _diff(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    from .diff import diff
    vm = _vm(d)
    if vm.fork_state is None or vm.memory.base_pages is None or d.parent_domid is None:
        raise VmiError(f"{d.label()} is not a fork: only a fork has a parent to compare with")
    if "ancestor" in args:
        wanted = args["ancestor"]
        try:
            rec = d.registry.find(wanted)
        except Exception as e:
            raise QmpError(f"ancestor {wanted}: {_one_line(e)}") from None
        if rec.domid != d.parent_domid:
            raise QmpError(f"diff of {d.label()} against {rec.label()}: only its parent ({_parent_label(d)}) is "
                           "supported across domains (each fork holds only its own fork point); diff each level "
                           "of the tree instead")
    view = _ForkView(vm, _ParentView(_parent_name(d), vm.memory.base_pages))
    result = diff(view)
    max_pages, max_lines = args.get("max_pages", 64), args.get("max_lines", 16)
    text = result.text(max_pages=max_pages or None, max_lines=max_lines or None)
    return {
        "text": text, "fork": result.fork, "ancestor": result.ancestor,
        "pages": [{"gpa": p.gpa, "changed_bytes": p.changed_bytes, "owner": p.owner,
                   "lines": [{"offset": ln.offset, "old": ln.old.hex(), "new": ln.new.hex()} for ln in p.lines]}
                  for p in result.pages[:max_pages or None]],
        "changed_pages": len(result.changed_pages), "owned_pages": len(result.pages),
        "changed_bytes": result.changed_bytes,
        "registers": [{"vcpu": r.vcpu, "name": r.name, "old": r.old, "new": r.new} for r in result.registers],
        "other_state": [[v, part] for v, part in result.other_state],
    }


# --- the GDB server -------------------------------------------------------------------------------------------------

def _bind(target: DomainTarget, host: str, port: int | None) -> GdbServer:
    from .gdbserver import GdbServer
    ports = [port] if port is not None else list(range(GDB_DEFAULT_PORT, GDB_DEFAULT_PORT + GDB_PORT_TRIES))
    for p in ports:
        try:
            return GdbServer(target, host, p, log=_log)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and port is None and p != ports[-1]:
                continue
            where = _hostport(host, p) if port is not None or e.errno != errno.EADDRINUSE else \
                f"{host} ports {ports[0]}-{ports[-1]} (all in use)"
            raise QmpError(f"cannot listen on {where}: {e.strerror or e}") from None
    raise AssertionError("unreachable")


def _serve(server: GdbServer) -> None:
    try:
        server.serve_forever()
    except Exception as e:          # the listener failed: report, end the thread; the domain runs on
        _log(f"gdbserver: {e!r}")


def _watch_owner(server: GdbServer, owner: Connection, calls: MainThreadCalls) -> None:
    """Stop the server when the QMP connection that asked for it (with hold) closes."""
    while _gdb.server is server and not server._closed:
        if owner.sock.fileno() < 0:
            with contextlib.suppress(VmStateError):
                calls.call(lambda: _stop_server(server))
            return
        time.sleep(0.2)


def _stop_server(server: GdbServer | None = None) -> bool:
    """(Main thread) Close the server and wait for its thread, running the calls it makes meanwhile."""
    if server is None:
        server = _gdb.server
    if server is None or _gdb.server is not server:
        return False
    thread, calls = _gdb.thread, _gdb.calls
    server.close()
    if thread is not None and calls is not None:
        for _ in range(200):                   # up to about 10 s: a client's breakpoints removed, machine resumed
            calls.run_pending()
            thread.join(0.05)
            if not thread.is_alive():
                break
    _gdb.server = _gdb.thread = _gdb.owner = None
    return True


@qmp_command("vmfork-gdbserver-start", host=ArgSpec(str), port=ArgSpec(int, False, _port), hold=ArgSpec(bool),
             help="start a GDB server in the domain (loopback, port 1234 or the next free one unless told); "
                  "with hold it stops when this connection closes")
def _gdbserver_start(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    _vm(d)
    if _gdb.server is not None:
        if _gdb.thread is not None and _gdb.thread.is_alive():
            s = _gdb.server
            raise QmpError(f"{d.label()} already has a GDB server on {_hostport(s.host, s.port)} "
                           f"(stop it with: vmfork qmp {d.domid} vmfork-gdbserver-stop)")
        _stop_server()
    target = _gdb.target_for(d)
    server = _bind(target, args.get("host", "127.0.0.1"), args.get("port"))
    thread = threading.Thread(target=_serve, args=(server,), name="vmfork-gdbserver", daemon=True)
    _gdb.server, _gdb.thread = server, thread
    thread.start()
    if args.get("hold"):
        _gdb.owner = conn
        calls = _gdb.calls
        assert calls is not None
        threading.Thread(target=_watch_owner, args=(server, conn, calls), name="vmfork-gdbserver-hold",
                         daemon=True).start()
    return {"host": server.host, "port": server.port}


@qmp_command("vmfork-gdbserver-stop", help="stop the domain's GDB server (a connected client is detached)")
def _gdbserver_stop(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    return {"stopped": _stop_server()}


@qmp_command("vmfork-gdbserver-status", help="whether the domain has a GDB server, where, and whether a client is "
                                             "connected")
def _gdbserver_status(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    s = _gdb.server
    if s is None or _gdb.thread is None or not _gdb.thread.is_alive():
        return {"running": False}
    return {"running": True, "host": s.host, "port": s.port, "client": s._conn is not None,
            "hold": _gdb.owner is not None}


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
