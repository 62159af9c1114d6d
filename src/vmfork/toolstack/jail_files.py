"""Files outside a jailed domain's root: the jailer's side (Broker) and the domain's file commands.

A jailed domain sees only its private root. What it writes or reads for a command comes as a descriptor:

- saves, device-state files and late device models' files are opened by the command that asks for them (the CLI,
  as the invoking user; passfd.py) and passed with QMP `getfd` (SCM_RIGHTS), then named with `fdname`. The domain
  writes to (or reads from) that descriptor and nothing else. A QMP message that names a `filename` is refused with
  one line saying so: the domain has no way to open it, and the jailer writes nothing on a path the domain names.
- its console log is the descriptor it opened before entering the jail; rotating it (`console_log_max`) is the
  jailer's job: the domain asks, the jailer renames `<domid>.log` to `<domid>.log.1` in the run directory and passes
  back a descriptor of the new log. The domid is the one the domain gave in its first message, before its guest
  ran; the jailer touches no other path for it.
- a FIFO or stdout target gets the finished file streamed to it; the domain builds it first in an unnamed
  temporary file in its staging directory (`<run dir>/.jail-<domid>`, the jail's own, removed by the jailer).
- TCP listeners (the GDB server's) are made by the jailer in the host's network namespace, on unprivileged ports.

What a compromised domain can still do through the jailer: rotate its own console log as often as it likes, and
listen on unprivileged TCP ports of the host (it cannot connect anywhere or accept on other sockets than those).
It cannot open, create or replace any file by name, read other files, or run programs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VmforkError
from .qmp import QmpError

if TYPE_CHECKING:
    from .domain import Command, Domain
    from .jail import Jail

__all__ = ["KILLED_BY_JAIL", "Broker", "jail_file_commands"]

KILLED_BY_JAIL = "killed by the jail: a system call outside its seccomp allow-list (SIGSYS)"


class _Refused(Exception):
    pass


class _Errno(Exception):
    """An OSError to hand to the domain with its errno (e.g. EADDRINUSE, which callers try the next port on)."""

    def __init__(self, errno: int, strerror: str) -> None:
        super().__init__(strerror)
        self.errno = errno


class Broker:
    """The jailer's loop body: one request from the domain, one reply (with a descriptor for "open")."""

    def __init__(self, sock: socket.socket, run_dir: str) -> None:
        self.sock = sock
        self.run_dir = run_dir
        self.domid: int | None = None
        self.staging: Path | None = None
        self.root: str | None = None

    def serve_one(self) -> bool:
        """Handle one request; False when the domain's end is closed."""
        try:
            data, _fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 0)
        except OSError:
            return False
        if not data:
            return False
        fd: int | None = None
        try:
            reply, fd = self._handle(json.loads(data))
        except _Refused as e:
            reply = {"error": str(e)}
        except _Errno as e:
            reply = {"error": str(e), "errno": e.errno}
        except OSError as e:
            reply = {"error": f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"}
        except Exception as e:             # a bug: the domain gets an error reply, the jailer goes on
            reply = {"error": f"the jailer failed: {e!r}"}
        try:
            socket.send_fds(self.sock, [json.dumps(reply).encode()], [fd] if fd is not None else [])
        except OSError:
            return False
        finally:
            if fd is not None:
                os.close(fd)
        return True

    def _handle(self, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        op = msg.get("op")
        if op == "hello" and self.domid is None:
            self.domid = int(msg["domid"])
            self.staging = Path(msg["staging"])
            self.root = tempfile.mkdtemp(prefix="vmfork-jail-")     # the jailer removes it
            return {"root": self.root}, None
        if op == "listen":
            return {}, self._listen(str(msg["host"]), int(msg["port"]))
        if op == "rotate-log" and self.domid is not None:
            return {}, self._rotate_log()
        raise _Refused(f"unknown request {op!r}")

    def _rotate_log(self) -> int:
        """The domain's console log is full: `<domid>.log` becomes `<domid>.log.1` (replacing an older one) and a
        new log starts; its descriptor goes back to the domain."""
        assert self.domid is not None
        from .runtime import RunDir
        log = str(RunDir(Path(self.run_dir)).console_log(self.domid))
        os.replace(log, log + ".1")
        return os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    @staticmethod
    def _listen(host: str, port: int) -> int:
        """A TCP listener in the host's network namespace (the domain has none), on an unprivileged port."""
        if port != 0 and not 1024 <= port <= 65535:
            raise _Refused(f"a jailed domain may listen on ports 1024-65535 only, not {port}")
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise _Errno(e.errno or 0, e.strerror or str(e)) from None
        return sock.detach()

    def after_exit(self, status: int, run_dir: str) -> None:
        """The domain has ended: report a jail kill, remove what the domain could not."""
        from .domfile import remove_stale
        from .registry import Registry
        from .runtime import RunDir
        if self.domid is not None:
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
            with contextlib.suppress(VmforkError, OSError):
                rd = RunDir.open(run_dir)
                reg = Registry(rd)
                rec = reg.get(self.domid)
                if killed:
                    with contextlib.suppress(OSError):
                        fd = os.open(rd.console_log(self.domid), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                        os.write(fd, f"\r\n[vmfork: domain {self.domid} {KILLED_BY_JAIL}]\r\n".encode())
                        os.close(fd)
                    if rec is not None:
                        reg.mark_crashed(self.domid, KILLED_BY_JAIL)
                if rec is None:
                    # What the domain's own clean-up could not reach from inside its root: its sockets, its domain
                    # file (no longer locked: the process is gone), a log its guest never wrote to.
                    for path in (rd.qmp_socket(self.domid), rd.console_socket(self.domid)):
                        with contextlib.suppress(OSError):
                            path.unlink()
                    remove_stale(rd.path, self.domid)
                    log = rd.console_log(self.domid)
                    with contextlib.suppress(OSError):
                        if log.stat().st_size == 0:
                            log.unlink()
                reg.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.root is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)


# --- the domain's side ------------------------------------------------------------------------------------------------

FILE_COMMANDS = ("vmfork-save", "xen-save-devices-state", "vmfork-attach-dm")


def jail_file_commands(jail: Jail, domain: Domain, commands: dict[str, Command]) -> None:
    """The domain's side, set up as it enters its jail: file commands take descriptors only, console-log rotation
    and TCP listeners go through the jailer, temporary files go to the staging directory. `commands`: the domain's
    QMP command table, whose file commands are wrapped."""
    import dataclasses

    def by_descriptor(orig: Any) -> Any:
        def handler(d: Any, conn: Any, args: dict[str, Any]) -> Any:
            if "filename" in args:
                raise QmpError(f"{d.label()} runs in the jail and opens no file by name ({args['filename']}): pass "
                               "the file's descriptor with getfd and name it with 'fdname' (vmfork save, "
                               "save-devices-state and fork-vm -Q do so), or run the domain with jail = 0")
            return orig(d, conn, args)
        return handler

    def create_server(address: tuple[Any, ...], *, family: int = socket.AF_INET, backlog: int | None = None,
                      reuse_port: bool = False, dualstack_ipv6: bool = False) -> socket.socket:
        reply, fd = jail.request({"op": "listen", "host": address[0], "port": address[1]})
        if fd is None:
            raise OSError(reply.get("errno", errno.EPERM), reply.get("error", "the jailer refused"))
        return socket.socket(fileno=fd)

    def reopen_log() -> int:
        reply, fd = jail.request({"op": "rotate-log"})
        if fd is None:
            raise OSError(errno.EPERM, reply.get("error", "the jailer refused"))
        return fd

    # TCP listeners (the GDB server's) come from the jailer, in the host's network namespace: the domain has no
    # network of its own and its seccomp filter refuses AF_INET sockets.
    socket.create_server = create_server        # type: ignore[assignment]
    for name in FILE_COMMANDS:
        cmd = commands.get(name)
        if cmd is not None:
            commands[name] = dataclasses.replace(cmd, handler=by_descriptor(cmd.handler))
    if domain.console is not None:
        domain.console.rotate_log = reopen_log
    # Saves streamed to a FIFO or stdout are built in an unnamed temporary file first: in the staging directory,
    # the one writable place in the jail's root.
    tempfile.tempdir = str(jail.staging)
