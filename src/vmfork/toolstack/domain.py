"""A domain: one VM in a process of its own, with a numeric domid, a unique name, a QMP control socket and a console.

The CLI starts it as a detached process (its own session, stdio on /dev/null):

    python -m vmfork.toolstack.domain --run-dir DIR --report-fd FD --spec JSON

and reads one line from the report pipe: `ready <domid>` once the domain is registered and listening, or
`error <message>`. The spec says what to build:

    {"kind": "create", "config": {DomainConfig fields}, "paused": bool}
    {"kind": "fork", "parent": DOMID, "name": str | null, "overrides": {on_* keys}, "launch_dm": "yes" | "no",
     "device_state": PATH | null, "paused": bool, "block_interrupts": bool, "env": {NAME: VALUE} (optional)}
    {"kind": "restore", "file": PATH, "name": str | null, "paused": bool, "template": bool | null}

Threads: the main thread owns everything (registry writes, sockets, every change to the machine) and waits in a
selector; the vCPUs run in the machine's own threads (`VM.start()`); a waiter thread per run turns "the machine
stopped" into a wake-up of the main thread. Console output arrives on the vCPU threads through ConsoleHub.

Forks between domains: a fork domain connects to its parent's control socket and runs `vmfork-fork-source`; the
parent (which must be paused) answers with its frozen RAM (MemoryImage: the RAM files travel as SCM_RIGHTS file
descriptors with the reply) and its machine state (`MachineState.to_bytes()`, base64). The fork keeps that
connection open for as long as it lives: while it is open the parent holds the fork (stays paused, RAM read-only,
`cont` and `quit` refused); when the fork's process ends for any reason, the kernel closes it and the parent is free.
The client side (receiving the RAM files and state, building the machine) is in attach.py, shared with held forks.

Resets asked for by the host (QMP `system_reset`, `vmfork reboot`) are QEMU's hard reset, not a request to the guest:
the machine restarts the way a guest reset with on_reboot = "restart" restarts it (a created domain boots its kernel
again in a fresh VM, a fork goes back to its fork point), whatever on_reboot says, because on_reboot is the answer to
the guest's own reset and the host has asked for this one. As in QEMU, a running domain runs again afterwards and a
paused, shut-down or crashed one is left paused at the restart point; the RESET event says
`{"guest": false, "reason": "host-qmp-system-reset"}`. Refused: a parent with live forks (they share its RAM), and a
restored domain (no kernel to boot, no fork point). The guests have no ACPI and no PV shutdown channel, so
`system_powerdown` has nothing to press and is refused (`quit` ends a domain).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import importlib
import json
import os
import queue
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import DomainConfig
from ..errors import VmforkError
from . import jail as _jail
from .console import ConsoleClient, ConsoleHub
from .domfile import DomainFile
from .qmp import (
    ArgSpec,
    Framed,
    JsonSplitter,
    QmpChannel,
    QmpError,
    check_args,
    command_of,
    encode,
    error_reply,
    event,
    greeting,
    parse_message,
)
from .registry import DomainRecord, Registry
from .runtime import RunDir, ToolstackError, pid_start_time

if __name__ == "__main__":
    # Started as `python -m vmfork.toolstack.domain`: let modules that import this one by name (the QMP extension
    # modules registering commands with qmp_command) share this module's command table.
    sys.modules.setdefault("vmfork.toolstack.domain", sys.modules[__name__])

if TYPE_CHECKING:
    from ..devices import DeviceSetState
    from ..fork import VM
    from ..vm import StopEvent

__all__ = ["COMMANDS", "Domain", "main", "qmp_command"]

MAX_MEMORY_IO = 16 << 20            # bytes one vmfork-memory-read/-write may move
MAX_FDS_PER_MESSAGE = 8             # descriptors a client may pass (getfd) and keep on one connection
SO_PEERCRED_FMT = "3i"              # struct ucred: pid, uid, gid


def _version() -> str:
    from .. import __version__
    return __version__


# --- the command table (extensible) -------------------------------------------------------------------------------

Handler = Callable[["Domain", "Connection", dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    name: str
    handler: Handler
    args: dict[str, ArgSpec]
    help: str


COMMANDS: dict[str, Command] = {}


def qmp_command(command: str, /, *, help: str = "", **args: ArgSpec) -> Callable[[Handler], Handler]:
    """Register a QMP command of the domain. The handler gets (domain, connection, checked arguments) and returns
    the "return" value (JSON-able), or a (value, fds) tuple to pass file descriptors with the reply. Raising
    QmpError or VmforkError gives an error reply; the domain keeps running. Extension modules (e.g. introspection)
    register their `vmfork-...` commands with this decorator; the domain imports EXTENSION_MODULES at start."""
    def register(fn: Handler) -> Handler:
        COMMANDS[command] = Command(command, fn, dict(args), help)
        return fn
    return register


EXTENSION_MODULES = ("vmfork.vmi.qmp_commands", "vmfork.toolstack.jail_probe")


def _load_extensions() -> None:
    """Import the modules that add QMP commands. A missing module is skipped; one that fails to import is reported
    on stderr and skipped (the domain works without its commands)."""
    for mod in EXTENSION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                traceback.print_exc()
        except Exception:
            traceback.print_exc()


def _absolute(value: str) -> str | None:
    return None if os.path.isabs(value) else "must be an absolute path"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


def _encoding(value: str) -> str | None:
    return None if value in ("base64", "hex") else "must be \"base64\" or \"hex\""


# --- connections ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Connection:
    """One client of the control socket."""

    sock: socket.socket
    peer_pid: int
    peer_uid: int
    splitter: JsonSplitter = dataclasses.field(default_factory=JsonSplitter)
    out: bytearray = dataclasses.field(default_factory=bytearray)
    negotiated: bool = False
    closing: bool = False           # close once `out` is flushed
    draining: float = 0.0           # after an oversized message: input discarded until EOF or this time
    received_fds: list[int] = dataclasses.field(default_factory=list)    # SCM_RIGHTS not yet claimed by getfd
    named_fds: dict[str, int] = dataclasses.field(default_factory=dict)  # getfd's names (QEMU's fdname)
    hold: ForkHold | None = None    # this connection is a fork's hold on this domain


@dataclasses.dataclass(eq=False)
class ForkHold:
    """A live fork of this domain, as the machine's `children` sees it (so run/reset/writes are refused)."""

    domid: int
    name: str

    def destroy(self, *, tree: bool = False) -> None:
        pass

    def label(self) -> str:
        return f"{self.name} (domain {self.domid})"


def _peer(sock: socket.socket) -> tuple[int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FMT))
    pid, uid, _gid = struct.unpack(SO_PEERCRED_FMT, raw)
    return pid, uid


def peer_allowed(uid: int) -> bool:
    """Who may use a domain's sockets: its owner, and root (root can do anything to the process anyway)."""
    return uid == os.geteuid() or uid == 0


# --- the domain -----------------------------------------------------------------------------------------------------

class Domain:
    def __init__(self, run_dir: RunDir, spec: dict[str, Any]) -> None:
        self.rd = run_dir
        self.spec = spec
        self.kind: str = spec["kind"]
        self.registry = Registry(run_dir)
        self.record: DomainRecord | None = None
        self.domfile: DomainFile | None = None      # held (locked) for the life of the process: see domfile.py
        self.vm: VM | None = None
        self.config: DomainConfig | None = None
        self.state = "creating"     # creating | prelaunch | running | paused | shutdown | crashed
        self.reason = ""
        self.pause_holders: set[str] = set()    # who holds the domain paused ("toolstack", "debugger"): see hold_pause
        self.fork_point_reason = ""     # a fork's parent's pause reason when it is the harness ready marker
        self.parent_link: QmpChannel | None = None
        self.parent_domid: int | None = None
        self.restored_from: str | None = None
        self.console_rx = 0
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.qmp_listener: socket.socket | None = None
        self.console_listener: socket.socket | None = None
        self.console: ConsoleHub | None = None
        self.conns: dict[int, Connection] = {}
        self.console_clients: dict[int, ConsoleClient] = {}
        self.holds: list[Connection] = []
        self.stops: queue.SimpleQueue[tuple[VM, StopEvent]] = queue.SimpleQueue()
        self.waiter: threading.Thread | None = None
        self.quitting = False
        self.exit_reason = ""
        self.terminate = False
        self.has_run = False
        self.jail: _jail.Jail | None = None      # set by main() when the domain is jailed

    # --- properties --------------------------------------------------------------------------------------------

    @property
    def domid(self) -> int:
        assert self.record is not None
        return self.record.domid

    @property
    def name(self) -> str:
        assert self.record is not None
        return self.record.name

    def label(self) -> str:
        return f"{self.name} (domain {self.domid})"

    @property
    def machine(self) -> VM:
        if self.vm is None:
            raise QmpError(f"{self.label()} has no machine")
        return self.vm

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"\0")

    # --- start-up ----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        os.chdir("/")
        if self.kind == "create":
            self._setup_create()
        elif self.kind == "fork":
            self._setup_fork()
        elif self.kind == "restore":
            self._setup_restore()
        else:
            raise ToolstackError(f"unknown domain kind {self.kind!r}")
        _load_extensions()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(self.wake_w)
        if self.jail is not None:
            # before the jail hides /sys: fork.py reads it at import (kernel_mode_emulated), for this domain's forks
            from .. import fork  # noqa: F401
            self.jail.enter(self, COMMANDS)       # before the guest's first instruction
        if self.spec.get("paused"):
            self._set_state("paused", self.fork_point_reason or "created paused")
        else:
            self._start()

    def _reserve(self, *, name: str | None, auto_name: str | None = None, config: dict[str, Any], launch_dm: str,
                 memory: int, vcpus: int, parent: int | None = None) -> None:
        def claim(record: DomainRecord) -> None:
            data = {**dataclasses.asdict(record), "spec": self.spec}
            self.domfile = DomainFile(self.rd.domain_file(record.domid), data)
        self.record = self.registry.reserve(name=name, auto_name=auto_name, parent=parent, kind=self.kind,
                                            config=config, launch_dm=launch_dm, pid=_jail.host_pid(),
                                            pid_start=pid_start_time(_jail.host_pid()), memory=memory, vcpus=vcpus,
                                            claim=claim)
        log_max = int(config.get("console_log_max", DomainConfig.__dataclass_fields__["console_log_max"].default))
        self.console = ConsoleHub(self.record.console_log, self.wake, log_max=log_max << 10)
        self.qmp_listener = self._listen(self.record.qmp_socket, self._on_qmp_accept)
        self.console_listener = self._listen(self.record.console_socket, self._on_console_accept)

    def _listen(self, path: str, callback: Callable[[int], None]) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)         # a stale file with this (never reused) domid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, callback)
        return sock

    def _setup_create(self) -> None:
        from ..fork import VM
        cfg = DomainConfig(**self.spec["config"])
        if cfg.kernel is None:
            raise ToolstackError(f"{cfg.name}: the config gives no kernel")
        self.config = cfg
        self._reserve(name=cfg.name, config=cfg.to_dict(), launch_dm="yes", memory=cfg.memory, vcpus=cfg.vcpus)
        vm = VM.create(memory_mib=cfg.memory, vcpus=cfg.vcpus, name=cfg.name, cpuid=cfg.cpuid)
        assert isinstance(vm, VM)
        self._adopt(vm)
        vm.load_kernel(cfg.kernel, cmdline=cfg.cmdline, initrd=cfg.ramdisk, protocol=cfg.boot_protocol)

    def _setup_fork(self) -> None:
        from ..fork import _blocked
        from .attach import fork_machine, receive_fork_source
        spec = self.spec
        parent = self.registry.find(int(spec["parent"]))
        if not parent.alive:
            raise ToolstackError(f"cannot fork {parent.label()}: its process is gone")
        self.parent_domid = parent.domid
        # A fork starts exactly where its paused parent stopped: at its harness marker if the parent is there.
        self.fork_point_reason = parent.reason if parent.reason == "harness-start" else ""
        base = {k: v for k, v in parent.config.items() if k in DomainConfig.__dataclass_fields__}
        base.update(name=parent.name)
        cfg = DomainConfig(**base).with_overrides(**spec.get("overrides", {}))
        launch_dm = spec["launch_dm"]
        self._reserve(name=spec.get("name"), auto_name=parent.name, parent=parent.domid, config=cfg.to_dict(),
                      launch_dm=launch_dm, memory=parent.memory, vcpus=parent.vcpus)
        self.config = cfg.with_overrides(name=self.name)
        self.update_record(config=self.config.to_dict())
        link = QmpChannel.connect(parent.qmp_socket, timeout=60, pid=parent.pid, label=parent.label())
        self.parent_link = link
        # The received files stay open for the life of this process (the fork's RAM and its reset source).
        src = receive_fork_source(link, child=self.domid, name=self.name)
        image, state = src.image, src.state
        if spec.get("device_state"):
            from ..snapshot import load_device_state
            state = dataclasses.replace(state, devices=load_device_state(spec["device_state"]))
        if spec.get("env"):         # fork-vm --set: the fork's env channel strings (launch_dm "no": for its late DM)
            if state.devices is None:
                raise ToolstackError(f"--set: {parent.label()} has no device model, so its forks have no env "
                                     "channel for the strings")
            state = dataclasses.replace(state, devices=state.devices.with_env(spec["env"]))
        block = bool(spec.get("block_interrupts"))
        if block:
            state = dataclasses.replace(state, vcpus=tuple(_blocked(v) for v in state.vcpus))
        vm = fork_machine(image, state, name=self.name, with_devices=launch_dm == "yes", dirty_ring=src.dirty_ring,
                          flush_translations=src.flush_translations)
        vm.irqs_blocked = block
        self._adopt(vm)

    def _setup_restore(self) -> None:
        from ..snapshot import restore
        path = self.spec["file"]
        self.restored_from = path
        vm = restore(path, paused=True, name=self.spec.get("name"), template=self.spec.get("template"))
        try:
            if self.spec.get("env"):        # fork-vm --from FILE --set: strings for this fork of the file
                _set_env(vm, self.spec["env"], what=path)
            cfg = DomainConfig(name=vm.name, memory=vm.shape.memory_mib, vcpus=vm.shape.vcpus)
            self.config = cfg
            extra = {"template": path} if vm.template is not None else {}
            self._reserve(name=vm.name, config={**cfg.to_dict(), "restored_from": path, **extra},
                          launch_dm="yes" if vm.devices else "no", memory=vm.shape.memory_mib, vcpus=vm.shape.vcpus)
        except BaseException:
            vm.destroy(tree=True)
            raise
        self._adopt(vm)

    def _adopt(self, vm: VM) -> None:
        self.vm = vm
        # the concrete CPUID policy its vCPUs got, for `vmfork list --json` (and a fork's config)
        self.update_record(config={**self.registry.find(self.domid).config, "cpuid": vm.shape.cpuid})
        if any(d.name == "serial0" for d in vm.devices) and self.console is not None:
            vm.device("serial0").add_listener(self.console.write)

    # --- state -------------------------------------------------------------------------------------------------

    def _set_state(self, state: str, reason: str = "") -> None:
        self.state = state
        self.reason = reason
        if self.record is not None:
            try:
                self.registry.update(self.domid, state=state, reason=reason)
            except VmforkError:
                pass
        if self.domfile is not None:
            self.domfile.update(state=state, reason=reason)

    def update_record(self, **values: Any) -> None:
        """Change the registry row and the domain file alike (config, name, launch_dm...)."""
        self.registry.update(self.domid, **values)
        if self.domfile is not None:
            self.domfile.update(**values)

    # --- pause holders (Xen's pause count, by name) ---------------------------------------------------------------

    def hold_pause(self, holder: str) -> None:
        """`holder` ("toolstack" for vmfork pause / QMP stop, "debugger" for a GDB session) holds the domain paused
        (pausing it if it runs). It runs again only when no holder is left (release_pause): a debugger detaching
        does not resume a domain the toolstack paused, nor does the toolstack's unpause run a domain under a
        debugger's stop."""
        self.pause_holders.add(holder)
        self._publish_holders()
        while self.state == "running" and not self.quitting:
            self._pause()

    def release_pause(self, holder: str) -> bool:
        """`holder` lets go; the domain runs again if it is paused and no other holder is left. Returns whether it
        was started."""
        self.pause_holders.discard(holder)
        self._publish_holders()
        if self.pause_holders or self.state != "paused" or self.quitting:
            return False
        self._start()
        return True

    def _publish_holders(self) -> None:
        holders = ",".join(sorted(self.pause_holders))
        if self.record is not None:
            with contextlib.suppress(VmforkError):
                self.update_record(holders=holders)

    def _start(self) -> None:
        vm = self.machine
        vm.start()
        self.has_run = True
        self._set_state("running")
        self.broadcast(event("RESUME"))
        t = threading.Thread(target=self._wait_for_stop, args=(vm,), name="vmfork-domain-waiter", daemon=True)
        self.waiter = t
        t.start()

    def _wait_for_stop(self, vm: VM) -> None:
        ev = vm.wait()
        self.stops.put((vm, ev))
        self.wake()

    def _pause(self) -> bool:
        """Pause a running machine and handle the stop; returns whether it was running."""
        if self.state != "running":
            return False
        self.machine.request_stop("pause", None)
        self._collect_stops(block=True)
        return True

    def _collect_stops(self, *, block: bool = False) -> None:
        if block and self.waiter is not None:
            self.waiter.join()
        while True:
            try:
                vm, ev = self.stops.get_nowait()
            except queue.Empty:
                break
            if self.waiter is not None:
                self.waiter.join()
                self.waiter = None
            if vm is self.vm:
                self._on_stop(ev)

    def _on_stop(self, ev: StopEvent) -> None:
        cfg = self.config
        assert cfg is not None
        if ev.reason in ("exit", "poweroff"):
            what = f"the guest exited with status {ev.status}" if ev.reason == "exit" else "the guest powered off"
            self._guest_ended("poweroff", cfg.on_poweroff, what)
        elif ev.reason == "reset":
            self._guest_ended("reboot", cfg.on_reboot, "the guest reset itself")
        elif ev.crashed:
            self._guest_ended("crash", cfg.on_crash, f"crashed: {ev.detail}")
        else:
            reason = {"pause": "", "timeout": ""}.get(ev.reason, ev.reason)
            if ev.reason == "harness":
                reason = f"harness marker {ev.status}"
            elif ev.reason == "debug":
                reason = f"debug: {ev.detail}"
            self._set_state("paused", reason)
            self.broadcast(event("STOP"))

    def _guest_ended(self, kind: str, action: str, what: str) -> None:
        qmp_reason = {"poweroff": "guest-shutdown", "reboot": "guest-reset", "crash": "guest-panic"}[kind]
        if kind == "crash":
            self.broadcast(event("GUEST_PANICKED", {"action": "poweroff" if "destroy" in action else "pause"}))
        restarts = action not in ("destroy", "coredump-destroy", "preserve")
        # QEMU reports a guest reset it carries out as RESET, and as SHUTDOWN only when it ends the machine instead
        # (-no-reboot): a QMP client waiting for SHUTDOWN must not take a reboot for the end.
        self.broadcast(event("RESET" if kind == "reboot" and restarts else "SHUTDOWN",
                             {"guest": True, "reason": qmp_reason}))
        if action in ("destroy", "coredump-destroy"):
            self.quit(what)
        elif action == "preserve":
            self._set_state("crashed" if kind == "crash" else "shutdown", what)
            self.broadcast(event("STOP"))
        else:
            self._restart(what)

    def _restart(self, what: str) -> None:
        vm = self.machine
        cfg = self.config
        assert cfg is not None
        if self.console is not None:
            self.console.note(f"\r\n[vmfork: {what}; restarting {self.name}]\r\n")
        if vm.fork_state is not None:
            vm.reset()
        elif self.kind == "create" and cfg.kernel is not None:
            self._boot_fresh_machine()
        else:
            self.quit(f"{what}; a restored domain has no kernel to restart")
            return
        self._start()

    def _boot_fresh_machine(self) -> None:
        """A created domain's reboot: a new VM with the kernel loaded replaces the old one (fresh RAM, the boot path
        from its start). The new one is built first, so a failure leaves the domain with its old machine."""
        from ..fork import VM
        cfg = self.config
        assert cfg is not None and cfg.kernel is not None
        new = VM.create(memory_mib=cfg.memory, vcpus=cfg.vcpus, name=self.name, cpuid=cfg.cpuid)
        assert isinstance(new, VM)
        try:
            new.load_kernel(cfg.kernel, cmdline=cfg.cmdline, initrd=cfg.ramdisk, protocol=cfg.boot_protocol)
        except BaseException:
            new.destroy(tree=True)
            raise
        old, self.vm = self.vm, None
        if old is not None:
            old.destroy(tree=True)
        self._adopt(new)

    def host_reset(self) -> None:
        """A hard reset asked for by the host (QMP system_reset): see the module docstring for the rules."""
        vm = self.machine
        forks = self._forks_text()
        if forks:
            raise QmpError(f"cannot reset {self.label()}: it has live forks ({forks}) that share its memory; "
                           f"destroy them first, or the whole tree (vmfork destroy --force {self.domid})")
        if vm.fork_state is None and self.kind != "create":
            raise QmpError(f"cannot reset {self.label()}: it was restored from {self.restored_from}, so it has no "
                           "kernel to boot again and no fork point to go back to; destroy it and restore the "
                           "file again")
        was_running = self.state == "running"
        # The guest may stop on its own while being paused (and restart, or end): pause whatever machine it has.
        while self.state == "running" and not self.quitting:
            self._pause()
        if self.quitting:
            raise QmpError(f"cannot reset {self.label()}: it ended first ({self.exit_reason})")
        if self.console is not None:
            self.console.note(f"\r\n[vmfork: reset by the host; restarting {self.name}]\r\n")
        if self.machine.fork_state is not None:
            self.machine.reset()
        else:
            self._boot_fresh_machine()
        self.broadcast(event("RESET", {"guest": False, "reason": "host-qmp-system-reset"}))
        if was_running:
            self._start()
            return
        # QEMU leaves a reset machine that was not running in "prelaunch": a created domain before its first
        # instruction shows so again (query-status); a fork is at its fork point.
        if self.kind == "create":
            self.has_run = False
        self._set_state("paused", self.fork_point_reason or "reset")

    # --- forks of this domain ----------------------------------------------------------------------------------

    def _prune_holds(self) -> None:
        """Release holds whose fork is gone (its end of the connection closed) without waiting for the loop."""
        for conn in list(self.holds):
            try:
                data = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._close_conn(conn)

    def _release_hold(self, conn: Connection) -> None:
        hold = conn.hold
        if hold is None or conn not in self.holds:
            return
        self.holds.remove(conn)
        vm = self.vm
        if vm is not None:
            if hold in vm.children:
                vm.children.remove(hold)  # type: ignore[arg-type]
            if not vm.children:
                vm.memory.readonly = None

    def live_forks(self) -> list[ForkHold]:
        """The forks holding this domain. A fork whose process has just ended may still hold it for a moment
        (a multi-threaded process shows as gone before its last thread has closed its files): holds of forks the
        registry no longer lists as alive get up to 3 s to close."""
        self._prune_holds()
        ending = []
        for conn in self.holds:
            assert conn.hold is not None
            try:
                rec = self.registry.get(conn.hold.domid)
            except VmforkError:
                rec = None
            if rec is None or not rec.alive:
                ending.append(conn)
        deadline = time.monotonic() + 3.0
        while ending and time.monotonic() < deadline:
            select.select([c.sock for c in ending], [], [], max(0.0, deadline - time.monotonic()))
            self._prune_holds()
            ending = [c for c in ending if c in self.holds]
        return [c.hold for c in self.holds if c.hold is not None]

    def _forks_text(self) -> str:
        return ", ".join(h.label() for h in self.live_forks())

    # --- the loop ----------------------------------------------------------------------------------------------

    def serve(self) -> int:
        while not self.quitting:
            for key, mask in self.sel.select():
                if self.quitting:
                    break
                try:
                    key.data(mask)
                except Exception:           # a bug in one connection's handling must not end the domain
                    traceback.print_exc()
            self._collect_stops()
            if self.terminate and not self.quitting:
                self.quit("terminated by SIGTERM")
        return self._exit()

    def _on_wake(self, mask: int = 0) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        self._flush_console()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.terminate = True

    # --- QMP connections -----------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, int, int] | None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        try:
            pid, uid = _peer(sock)
        except OSError:
            sock.close()
            return None
        if not peer_allowed(uid):
            msg = error_reply(QmpError(f"permission denied: {self.label()} belongs to uid {os.geteuid()}; "
                                       f"a peer with uid {uid} may not use it"))
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(encode(msg))
            sock.close()
            return None
        sock.setblocking(False)
        return sock, pid, uid

    def _on_qmp_accept(self, mask: int) -> None:
        assert self.qmp_listener is not None
        got = self._accept(self.qmp_listener)
        if got is None:
            return
        sock, pid, uid = got
        conn = Connection(sock, pid, uid)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, lambda mask, c=conn: self._on_conn_event(c, mask))
        conn.out += encode(greeting(_version()))
        self._flush(conn)

    def _on_conn_event(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if not mask & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data, anc, _flags, _addr = conn.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * MAX_FDS_PER_MESSAGE),
                                                          socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = [int.from_bytes(cdata[i:i + 4], sys.byteorder, signed=True)
                       for i in range(0, len(cdata) - len(cdata) % 4, 4)]
                keep = max(0, MAX_FDS_PER_MESSAGE - len(conn.received_fds) - len(conn.named_fds))
                conn.received_fds += fds[:keep]
                for fd in fds[keep:]:
                    os.close(fd)
        if conn.hold is not None:
            if not data:
                self._close_conn(conn)
            return          # a fork's hold connection carries nothing more
        if conn.draining:
            # The error reply is out and our side is shut: read and drop the rest of the oversized message, so
            # closing does not reset the connection before the client has read the reply.
            if not data or time.monotonic() > conn.draining:
                self._close_conn(conn)
            return
        if data:
            items = conn.splitter.feed(data)
        else:
            items = conn.splitter.finish()
            conn.closing = True
        for framed in items:
            self._handle(conn, framed)
            if self.quitting:
                break
        if conn.splitter.broken:
            conn.closing = True
        self._flush(conn)

    def _handle(self, conn: Connection, framed: Framed) -> None:
        msg_id: Any = None
        has_id = False
        fds: list[int] = []
        try:
            msg, msg_id, has_id = parse_message(framed)
            name, args = command_of(msg)
            if not conn.negotiated:
                if name != "qmp_capabilities":
                    raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
                check_args({"enable": ArgSpec(list)}, args)
                if args.get("enable"):
                    raise QmpError(f"Capability '{args['enable'][0]}' not available")
                conn.negotiated = True
                result: Any = {}
            elif name == "qmp_capabilities":
                raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            else:
                cmd = COMMANDS.get(name)
                if cmd is None:
                    raise QmpError(f"The command {name} has not been found", "CommandNotFound")
                checked = check_args(cmd.args, args)
                try:
                    result = cmd.handler(self, conn, checked)
                except QmpError:
                    raise
                except VmforkError as e:
                    raise QmpError(str(e)) from None
                except OSError as e:
                    raise QmpError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
                if isinstance(result, tuple):
                    result, fds = result
            reply: dict[str, Any] = {"return": result}
            if has_id:
                reply["id"] = msg_id
        except QmpError as e:
            reply = error_reply(e, msg_id, has_id)
        except Exception as e:  # a bug: report it, keep the domain running
            reply = error_reply(QmpError(f"internal error: {e!r}"), msg_id, has_id)
        if fds:
            self._send_with_fds(conn, encode(reply), fds)
        else:
            conn.out += encode(reply)

    def _send_with_fds(self, conn: Connection, data: bytes, fds: list[int]) -> None:
        sock = conn.sock
        sock.setblocking(True)
        sock.settimeout(10.0)
        try:
            if conn.out:
                sock.sendall(conn.out)
                conn.out.clear()
            sent = socket.send_fds(sock, [data], fds)
            if sent < len(data):
                sock.sendall(data[sent:])
        except OSError:
            conn.closing = True
        finally:
            sock.setblocking(False)

    def _flush(self, conn: Connection) -> None:
        sock = conn.sock
        if sock.fileno() < 0:
            return
        while conn.out:
            try:
                n = sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                conn.out.clear()
                conn.closing = True
                break
            del conn.out[:n]
        if conn.out:
            if len(conn.out) > 64 << 20:          # a client that never reads
                self._close_conn(conn)
                return
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                            self.sel.get_key(sock).data)
        else:
            if conn.closing and conn.splitter.broken and not conn.draining:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                conn.draining = time.monotonic() + 10.0
            elif conn.closing and not conn.draining:
                self._close_conn(conn)
                return
            self.sel.modify(sock, selectors.EVENT_READ, self.sel.get_key(sock).data)

    def _close_conn(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
            self.conns.pop(fd, None)
        if conn.hold is not None:
            self._release_hold(conn)
        for fd in [*conn.received_fds, *conn.named_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.received_fds.clear()
        conn.named_fds.clear()
        conn.sock.close()

    def broadcast(self, msg: dict[str, Any]) -> None:
        data = encode(msg)
        for conn in list(self.conns.values()):
            if conn.negotiated and conn.hold is None:
                conn.out += data
                self._flush(conn)

    # --- console connections -------------------------------------------------------------------------------------

    def _on_console_accept(self, mask: int) -> None:
        assert self.console_listener is not None and self.console is not None
        got = self._accept(self.console_listener)
        if got is None:
            return
        sock, _pid, _uid = got
        c = self.console.add(sock, device_model=bool(self.vm is not None and self.vm.devices))
        self.console_clients[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, lambda mask, c=c: self._on_console_event(c, mask))
        self._flush_console()

    def _on_console_event(self, c: ConsoleClient, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_console()
        if not mask & selectors.EVENT_READ or c.sock.fileno() < 0:
            return
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_console(c)
            return
        vm = self.vm
        if vm is not None and vm.devices and vm.state != "destroyed":
            taken = vm.feed_console(data)
            self.console_rx += taken
            if taken < len(data):
                # The UART's input queue is full (the guest reads slower than this): the rest is dropped, once
                # scanned, and the client is told rather than left guessing.
                c.dropped_input += len(data) - taken
                if not c.told_dropped:
                    c.told_dropped = True
                    assert self.console is not None
                    self.console.note_to(c, "\r\n[vmfork: console input dropped: the guest reads slower than it "
                                            "arrives (its UART queue is full)]\r\n")
                    self._flush_console()
            else:
                c.told_dropped = False

    def _flush_console(self) -> None:
        hub = self.console
        if hub is None:
            return
        for c in hub.pending():
            if c.sock.fileno() < 0:
                continue
            data = hub.take(c)
            try:
                n = c.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close_console(c)
                continue
            if n < len(data):
                hub.put_back(c, data[n:])
                self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.sel.get_key(c.sock).data)
            else:
                self.sel.modify(c.sock, selectors.EVENT_READ, self.sel.get_key(c.sock).data)

    def _close_console(self, c: ConsoleClient) -> None:
        if self.console is not None:
            self.console.remove(c)
        fd = c.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
            self.console_clients.pop(fd, None)
        c.sock.close()

    # --- ending ------------------------------------------------------------------------------------------------

    def quit(self, reason: str) -> None:
        self.quitting = True
        self.exit_reason = reason

    def _exit(self) -> int:
        """Stop the guest, tell the clients, remove the sockets and the registry entry, and end the process."""
        vm = self.vm
        if vm is not None and vm.state == "running":
            vm.request_stop("pause", None)
            if self.waiter is not None:
                self.waiter.join(5.0)
        self.broadcast(event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        deadline = time.monotonic() + 2.0
        for conn in list(self.conns.values()):
            if conn.out and conn.sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
                    conn.sock.sendall(conn.out)
        if self.console is not None:
            self.console.note(f"\r\n[vmfork: {self.label()} ended: {self.exit_reason}]\r\n")
            for c in self.console.pending():
                with contextlib.suppress(OSError):
                    c.sock.setblocking(True)
                    c.sock.settimeout(max(0.05, deadline - time.monotonic()))
                    c.sock.sendall(self.console.take(c))
            self.console.close()
        self.cleanup()
        return 0

    def cleanup(self, *, failed_start: bool = False) -> None:
        """Remove this domain's sockets, registry entry and domain file, and its console log if the guest never
        wrote to it (also after a failed start)."""
        for listener in (self.qmp_listener, self.console_listener):
            if listener is not None:
                listener.close()
        if self.record is not None:
            for path in (self.record.qmp_socket, self.record.console_socket):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(VmforkError):
                self.registry.remove(self.domid)
            if self.domfile is not None:
                self.domfile.remove()
            # The log stays (the guest's last words) unless the guest never wrote to it.
            if self.console is not None:
                self.console.close()
            with contextlib.suppress(OSError):
                if os.path.getsize(self.record.console_log) == 0:
                    os.unlink(self.record.console_log)

    # --- helpers for commands ------------------------------------------------------------------------------------

    def require_paused(self, what: str) -> VM:
        vm = self.machine
        if self.state == "running":
            raise QmpError(f"cannot {what} {self.label()} while it runs: pause it first")
        return vm

    def paused_for(self, fn: Callable[[], Any]) -> Any:
        """Run fn with the machine paused (pausing and resuming it around fn if it runs)."""
        was_running = self._pause()
        try:
            return fn()
        finally:
            if was_running and self.state == "paused" and not self.quitting:
                self._start()

    def query(self) -> dict[str, Any]:
        vm = self.vm
        pages: int | None = None
        if vm is not None and vm.fork_state is not None and not vm.memory.closed:
            pages = int(vm.memory.owned_pages().size)
        return {
            "domid": self.domid, "name": self.name, "kind": self.kind, "parent": self.parent_domid,
            "state": self.state, "reason": self.reason, "pid": _jail.host_pid(),
            "pause_holders": sorted(self.pause_holders),
            "memory": self.record.memory if self.record else None, "vcpus": self.record.vcpus if self.record else None,
            "launch_dm": "yes" if vm is not None and vm.devices else "no",
            "irqs_blocked": bool(vm is not None and vm.irqs_blocked),
            "pages_owned": pages,
            "forks": [{"domid": h.domid, "name": h.name} for h in self.live_forks()],
            "exits": vm.exits if vm is not None else 0,
            "unknown_port_accesses": {f"{p:#x}": n for p, n in sorted(vm.bus.unknown_accesses.items())}
            if vm is not None else {},
            "console_input_bytes": self.console_rx,
            "uptime": round(time.time() - self.started, 3),
            "restored_from": self.restored_from,
            "workarounds": vm.workarounds.counts() if vm is not None and vm.workarounds is not None else {},
            "vmgenid": _vmgenid_status(vm),
        }


def _vmgenid_status(vm: Any) -> dict[str, Any] | None:
    """vmfork.vmgenid.status of the domain's machine (None when it has none)."""
    if vm is None:
        return None
    from .. import vmgenid
    return vmgenid.status(vm)


# --- QMP commands ---------------------------------------------------------------------------------------------------

_QMP_STATUS = {"creating": "prelaunch", "prelaunch": "prelaunch", "running": "running", "paused": "paused",
               "shutdown": "shutdown", "crashed": "guest-panicked"}


@qmp_command("query-status", help="the run state: running, paused, prelaunch, debug, shutdown or guest-panicked")
def _query_status(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    status = _QMP_STATUS.get(d.state, d.state)
    if d.state == "paused" and not d.has_run and d.kind == "create":
        status = "prelaunch"
    if d.state == "paused" and d.reason.startswith("debug"):
        status = "debug"
    return {"status": status, "running": d.state == "running", "singlestep": False}


@qmp_command("query-name")
def _query_name(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    return {"name": d.name}


@qmp_command("query-version")
def _query_version(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    return greeting(_version())["QMP"]["version"]


@qmp_command("query-commands")
def _query_commands(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    return [{"name": n} for n in ("qmp_capabilities", *sorted(COMMANDS))]


@qmp_command("stop", help="pause the domain")
def _stop(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    if d.vm is None:
        raise QmpError(f"{d.label()} has no machine")
    d.hold_pause("toolstack")
    return {}


@qmp_command("cont", help="resume the domain")
def _cont(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    if d.state == "running":
        d.pause_holders.discard("toolstack")
        d._publish_holders()
        return {}
    if d.pause_holders - {"toolstack"}:
        # Xen's unpause: the toolstack lets go of its pause; another holder (a debugger) keeps the domain paused.
        d.pause_holders.discard("toolstack")
        d._publish_holders()
        return {}
    forks = d._forks_text()
    if forks:
        raise QmpError(f"cannot resume {d.label()}: it has live forks ({forks}); a parent stays paused until "
                       "its forks are destroyed")
    # A restored domain cannot be reset (see host_reset): only destroy is left to suggest for it.
    way_out = "destroy it" if vm.fork_state is None and d.kind == "restore" else \
        f"reset it (vmfork reboot {d.domid}) or destroy it"
    if d.state == "shutdown":
        raise QmpError(f"cannot resume {d.label()}: the guest has shut down ({d.reason}); {way_out}")
    if d.state == "crashed":
        raise QmpError(f"cannot resume {d.label()}: it has crashed ({d.reason}); {way_out}")
    try:
        d._start()
    except VmforkError as e:
        raise QmpError(f"cannot resume {vm.name}: {e}") from None
    d.pause_holders.discard("toolstack")
    d._publish_holders()
    return {}


@qmp_command("quit", help="destroy the domain (refused while it has live forks)")
def _quit(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    forks = d._forks_text()
    if forks:
        raise QmpError(f"cannot destroy {d.label()}: it has live forks ({forks}); destroy them first, or the "
                       f"whole tree (vmfork destroy --force {d.domid})")
    d.quit("destroyed (quit)")
    return {}


@qmp_command("system_reset", help="reset the machine (QEMU's hard reset): a created domain boots again, a fork goes "
                                  "back to its fork point; a paused domain stays paused")
def _system_reset(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    d.host_reset()
    return {}


@qmp_command("system_powerdown", help="(refused: the guests have no ACPI power button or PV shutdown channel)")
def _system_powerdown(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    # QEMU presses the ACPI power button and leaves the rest to the guest; vmfork's machines have no ACPI and no
    # paravirtual shutdown channel, so there is no way to ask the guest, and pretending would leave it running.
    raise QmpError(f"cannot shut down {d.label()}: its machine has no ACPI power button or PV shutdown channel "
                   f"to ask the guest with; end it with quit (vmfork destroy {d.domid}) or reset it with "
                   f"system_reset (vmfork reboot {d.domid})")


def _file_argument(conn: Connection, args: dict[str, Any]) -> tuple[str, int | None]:
    """A file command's target: its `filename`, or `/proc/self/fd/N` for the descriptor named `fdname` (passed with
    getfd; the caller closes it with `_drop_fd`). Exactly one of the two."""
    if ("filename" in args) == ("fdname" in args):
        raise QmpError("give either 'filename' or 'fdname'")
    if "fdname" not in args:
        return args["filename"], None
    fd = conn.named_fds.get(args["fdname"])
    if fd is None:
        raise QmpError(f"File descriptor named '{args['fdname']}' not found")
    return f"/proc/self/fd/{fd}", fd


def _drop_fd(conn: Connection, args: dict[str, Any]) -> None:
    if "fdname" in args:
        fd = conn.named_fds.pop(args["fdname"], None)
        if fd is not None:
            os.close(fd)


@qmp_command("xen-save-devices-state", filename=ArgSpec(str, False, _absolute), fdname=ArgSpec(str),
             live=ArgSpec(bool),
             help="write the device model's state to a file (QEMU's command for Xen), or to a descriptor passed "
                  "with getfd (fdname)")
def _xen_save_devices_state(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    if not vm.devices:
        raise QmpError(f"{d.label()} has no device model (it was forked with --launch-dm no)")
    # "live" (QEMU's default: true) only decides whether QEMU hands its disk images' locks over for a migration.
    # vmfork's device models have no disk images, and the state is written while the domain is paused either way.
    from ..snapshot import save_device_state
    from ..snapshot.container import save_target
    if "filename" not in args and "fdname" not in args:
        raise QmpError("Parameter 'filename' is missing")
    target, _fd = _file_argument(conn, args)
    try:
        save_target(target, "device-state file")     # refused before the domain is paused
        d.paused_for(lambda: save_device_state(vm, target))
    finally:
        _drop_fd(conn, args)
    return {}


@qmp_command("vmfork-query", help="everything about the domain: name, domid, parent, forks, pages owned, ...")
def _vmfork_query(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    return d.query()


@qmp_command("vmfork-fork-source", child=ArgSpec(int, True, _non_negative), name=ArgSpec(str, True),
             help="(used by a new fork domain) freeze this paused domain and hand over its RAM files and state; "
                  "the connection then holds the fork until it closes")
def _vmfork_fork_source(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    if d.state == "running":
        raise QmpError(f"cannot fork {d.label()} while it runs: pause it first (vmfork pause {d.domid})")
    if d.state in ("crashed", "shutdown"):
        raise QmpError(f"cannot fork {d.label()}: it has {'crashed' if d.state == 'crashed' else 'shut down'} "
                       f"({d.reason})")
    image = vm.memory.freeze()
    state = vm.capture()
    hold = ForkHold(args["child"], args["name"])
    conn.hold = hold
    d.holds.append(conn)
    vm.children.append(hold)  # type: ignore[arg-type]
    vm.memory.readonly = f"{d.label()} has live forks"
    from ..fork import _linux_where_kernel_mode_is_emulated, dirty_log_mode
    from ..memory import describe_image
    desc, fds = describe_image(image)
    # how the fork must track its memory, decided here where the guest is known (a Linux where kernel mode is
    # emulated: bitmaps, and translations dropped at reset), as for in-process forks
    return {"image": desc, "state": base64.b64encode(state.to_bytes()).decode(), "parent": d.domid,
            "dirty_log": dirty_log_mode(vm), "flush_translations": _linux_where_kernel_mode_is_emulated(vm)}, fds


@qmp_command("vmfork-reset", memory=ArgSpec(bool), state=ArgSpec(bool),
             help="reset a fork to its fork-time memory and/or state (both by default)")
def _vmfork_reset(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    memory, state = args.get("memory", True), args.get("state", True)
    if not (memory or state):
        raise QmpError("nothing to reset: memory and state are both false")
    if vm.fork_state is None:
        raise QmpError(f"{d.label()} is not a fork: only forks can be reset")

    def reset() -> int:
        pages = vm.reset(memory=memory, state=state)
        if d.state in ("shutdown", "crashed") and state:
            d._set_state("paused", "fork-reset")
        return pages
    return {"pages": d.paused_for(reset)}


def _decode(data: str, encoding: str) -> bytes:
    try:
        return bytes.fromhex(data) if encoding == "hex" else base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise QmpError(f"Parameter 'data' is not valid {encoding}") from None


@qmp_command("vmfork-memory-read", gpa=ArgSpec(int, True, _non_negative), length=ArgSpec(int, True, _non_negative),
             encoding=ArgSpec(str, False, _encoding), help="read guest-physical memory")
def _vmfork_memory_read(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    if args["length"] > MAX_MEMORY_IO:
        raise QmpError(f"Parameter 'length' is larger than {MAX_MEMORY_IO} bytes")
    data = vm.memory.read(args["gpa"], args["length"])
    enc = args.get("encoding", "base64")
    return {"data": data.hex() if enc == "hex" else base64.b64encode(data).decode(), "encoding": enc}


@qmp_command("vmfork-memory-write", gpa=ArgSpec(int, True, _non_negative), data=ArgSpec(str, True),
             encoding=ArgSpec(str, False, _encoding),
             help="write guest-physical memory (a fork's next reset undoes it)")
def _vmfork_memory_write(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    data = _decode(args["data"], args.get("encoding", "base64"))
    if len(data) > MAX_MEMORY_IO:
        raise QmpError(f"Parameter 'data' holds more than {MAX_MEMORY_IO} bytes")
    vm.memory.write(args["gpa"], data)
    return {"length": len(data)}


_SREG_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@qmp_command("vmfork-regs-get", vcpu=ArgSpec(int, False, _non_negative),
             help="a vCPU's general-purpose registers, rip, rflags, control registers and segments")
def _vmfork_regs_get(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    from ..kvm.structs import GPR_NAMES
    vm = d.require_paused("read the registers of")
    index = args.get("vcpu", 0)
    if index >= len(vm.vcpus):
        raise QmpError(f"{d.label()} has no vCPU {index} (it has {len(vm.vcpus)})")
    v = vm.vcpus[index]
    regs, sregs = v.get_regs(), v.get_sregs()
    out: dict[str, Any] = {n: int(getattr(regs, n)) for n in GPR_NAMES}
    out.update({n: int(getattr(sregs, n)) for n in _SREG_NAMES})
    out["segments"] = {n: {"selector": int(getattr(sregs, n).selector), "base": int(getattr(sregs, n).base),
                           "limit": int(getattr(sregs, n).limit), "dpl": int(getattr(sregs, n).dpl)}
                       for n in _SEGMENTS}
    out["gdt"] = {"base": int(sregs.gdt.base), "limit": int(sregs.gdt.limit)}
    out["idt"] = {"base": int(sregs.idt.base), "limit": int(sregs.idt.limit)}
    return out


@qmp_command("vmfork-regs-set", regs=ArgSpec(dict, True), vcpu=ArgSpec(int, False, _non_negative),
             help="change general-purpose registers, rip and rflags of a paused vCPU")
def _vmfork_regs_set(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    from ..kvm.structs import GPR_NAMES
    vm = d.require_paused("change the registers of")
    index = args.get("vcpu", 0)
    if index >= len(vm.vcpus):
        raise QmpError(f"{d.label()} has no vCPU {index} (it has {len(vm.vcpus)})")
    values = args["regs"]
    unknown = sorted(set(values) - set(GPR_NAMES))
    if unknown:
        raise QmpError(f"unknown registers: {', '.join(unknown)} (known: {', '.join(GPR_NAMES)})")
    for k, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val < 1 << 64:
            raise QmpError(f"register {k}: expected an integer from 0 to 2^64-1")
    v = vm.vcpus[index]
    regs = v.get_regs()
    for k, val in values.items():
        setattr(regs, k, val)
    v.set_regs(regs)
    vm.touch()
    return {}


@qmp_command("getfd", fdname=ArgSpec(str, True),
             help="name the file descriptor passed with this command (SCM_RIGHTS), as in QEMU")
def _getfd(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    if not conn.received_fds:
        raise QmpError("No file descriptor supplied via SCM_RIGHTS")
    name = args["fdname"]
    if name and name[0].isdigit():
        raise QmpError(f"Parameter 'fdname' {name!r} may not start with a digit")
    old = conn.named_fds.pop(name, None)
    if old is not None:
        os.close(old)
    conn.named_fds[name] = conn.received_fds.pop(0)
    return {}


@qmp_command("closefd", fdname=ArgSpec(str, True), help="close a descriptor named with getfd")
def _closefd(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    fd = conn.named_fds.pop(args["fdname"], None)
    if fd is None:
        raise QmpError(f"File descriptor named '{args['fdname']}' not found")
    os.close(fd)
    return {}


@qmp_command("vmfork-save", filename=ArgSpec(str, False, _absolute), fdname=ArgSpec(str), template=ArgSpec(bool),
             help="save the whole domain (RAM and state) to a file, or to a descriptor passed with getfd (fdname: "
                  "streamed, e.g. the CLI's stdout); a running domain is paused for it and resumed; template: RAM "
                  "as a sparse image that restores map copy-on-write")
def _vmfork_save(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    from ..snapshot import save
    from ..snapshot.container import save_target
    target, _fd = _file_argument(conn, args)
    try:
        save_target(target, "save file")        # refused before the domain is paused or anything is written
        d.paused_for(lambda: save(vm, target, template=bool(args.get("template", False))))
    finally:
        _drop_fd(conn, args)
    return {}


def _set_env(vm: VM, env: dict[str, Any], *, what: str) -> None:
    """Set `env` in a machine's env channel, and in its fork-time state so that a reset keeps the strings (a
    ToolstackError, nothing changed, for a machine without a device model or bad strings)."""
    from ..devices.envchannel import ENV_NAME
    if not vm.devices:
        raise ToolstackError(f"--set: {what} has no device model, so it has no env channel for the strings")
    captured = vm.capture().devices
    assert captured is not None             # a machine with devices captures their states
    devices = captured.with_env(env)
    fork_devices = (vm.fork_state.devices.with_env(env)
                    if vm.fork_state is not None and vm.fork_state.devices is not None else None)
    vm.device(ENV_NAME).restore(devices.states[ENV_NAME])
    if fork_devices is not None:
        assert vm.fork_state is not None
        vm.fork_state = dataclasses.replace(vm.fork_state, devices=fork_devices)
        vm.touch()


@qmp_command("vmfork-attach-dm", filename=ArgSpec(str, False, _absolute), fdname=ArgSpec(str), actions=ArgSpec(dict),
             name=ArgSpec(str), env=ArgSpec(dict),
             help="give a fork without a device model its devices, from a device-state file or a descriptor of one "
                  "passed with getfd (fdname) (default: the device state it was forked with), with the strings "
                  "in env set in its env channel")
def _vmfork_attach_dm(d: Domain, conn: Connection, args: dict[str, Any]) -> Any:
    vm = d.machine
    if vm.devices:
        raise QmpError(f"{d.label()} already has a device model")
    actions = args.get("actions", {})
    bad = sorted(set(actions) - {"on_poweroff", "on_reboot", "on_crash"})
    if bad:
        raise QmpError(f"Parameter 'actions' may only hold on_poweroff, on_reboot and on_crash, not {bad[0]}")
    assert d.config is not None and d.record is not None
    # Everything is checked before anything changes (issue 14): the device-state file is read and checked, the
    # name and actions are validated, and only then is the machine given devices and renamed, together.
    config = d.config.with_overrides(**actions)
    rename = "name" in args and args["name"] != d.name
    if rename:
        config = config.with_overrides(name=args["name"])
        other = d.registry.by_name(config.name)
        if other is not None and other.domid != d.domid:
            raise QmpError(f"name {config.name!r} is already used by domain {other.domid}")
    device_state: DeviceSetState | None
    if "filename" in args or "fdname" in args:
        from ..snapshot import load_device_state
        source, _fd = _file_argument(conn, args)
        try:
            device_state = load_device_state(source)
        finally:
            _drop_fd(conn, args)
    else:
        device_state = vm.fork_state.devices if vm.fork_state is not None else None
    if "env" in args:
        if device_state is None:
            raise QmpError(f"{d.label()} has no device state to put the env strings in (give one with a "
                           "device-state file)")
        device_state = device_state.with_env(args["env"])      # an EnvError names a bad string
    if rename:
        d.update_record(name=config.name)       # the last check: a name a racing command took is refused here

    def attach() -> None:
        vm.attach_device_model(device_state)
        d._adopt(vm)
    try:
        d.paused_for(attach)
    except BaseException:
        if rename:
            with contextlib.suppress(VmforkError):
                d.update_record(name=d.name)
        raise
    if rename:
        d.record = dataclasses.replace(d.record, name=config.name)
        vm.name = config.name
    d.config = config
    d.update_record(launch_dm="yes", config=config.to_dict())
    return {}


# --- entry point ----------------------------------------------------------------------------------------------------

def _report(fd: int | None, line: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmfork.toolstack.domain")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--report-fd", type=int, default=None)
    p.add_argument("--spec", required=True)
    args = p.parse_args(argv)
    os.umask(0o077)
    report: int | None = args.report_fd
    domain: Domain | None = None
    try:
        spec = json.loads(args.spec)
        jail = _jail.start(spec, args.run_dir, report)      # in a jail: from here on, the domain in its namespaces
        domain = Domain(RunDir.open(args.run_dir), spec)
        domain.jail = jail
        domain.setup()
    except VmforkError as e:
        msg = str(e)
    except FileNotFoundError as e:
        msg = f"{e.filename or e}: no such file"
    except OSError as e:
        msg = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    except Exception as e:
        msg = f"internal error while starting the domain: {e!r}"
    else:
        msg = ""
    if msg:
        if domain is not None:
            domain.cleanup(failed_start=True)
        _report(report, f"error {msg}")
        return 1
    assert domain is not None
    _report(report, f"ready {domain.domid}")
    try:
        return domain.serve()
    except BaseException as e:
        # A bug: leave the domain listed as crashed with the reason, and end.
        with contextlib.suppress(Exception):
            domain.registry.update(domain.domid, state="crashed", reason=f"domain process failed: {e!r}")
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)      # no interpreter teardown under live vCPU threads: the kernel frees the VM
