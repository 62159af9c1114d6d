"""Files outside a jailed domain's root: the jailer's side (Broker) and the domain's QMP commands that name files.

A jailed domain sees only its private root, so a command that names a file anywhere (`vmfork-save`,
`xen-save-devices-state`, `vmfork-attach-dm`) cannot open it itself. Instead:

- writing: the domain writes the file with the ordinary code into its staging directory (`<run dir>/.jail-<domid>`,
  owned by the jail's uid and visible in its root), then asks the jailer to deliver it: the jailer (the domain
  process's parent, outside the jail, with the invoking user's identity) moves it to the path asked for (a rename on
  the same file system, else a copy to a temporary beside the target and a rename), owned by the invoking user; a
  FIFO or character device at that path is streamed to in place; a directory or socket is refused;
- reading: the jailer copies the file into the staging directory, only if it is a regular file that starts with one
  of vmfork's own magics (a device-state or save file), so the domain cannot read anything else through it.

What a compromised domain can still do through the jailer (it names the paths in its requests): create or replace
files wherever the invoking user can write, with contents of its choosing; read any vmfork-format file the invoking
user can read (other domains' save files hold their guests' RAM); listen on unprivileged TCP ports. It cannot read
other files, run programs, or open connections. Closing that door needs the QMP client to open the file and pass
the descriptor (QEMU's `getfd`/`add-fd`), which the CLI does not do yet.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VmforkError
from .qmp import QmpError

if TYPE_CHECKING:
    from .jail import Jail

__all__ = ["KILLED_BY_JAIL", "Broker", "jail_file_commands"]

MAGICS = (b"VMFKSAVE", b"VMFKDEVS")
KILLED_BY_JAIL = "killed by the jail: a system call outside its seccomp allow-list (SIGSYS)"
COPY_CHUNK = 1 << 20


class _Refused(Exception):
    pass


class _Errno(Exception):
    """An OSError to hand to the domain with its errno (e.g. EADDRINUSE, which callers try the next port on)."""

    def __init__(self, errno: int, strerror: str) -> None:
        super().__init__(strerror)
        self.errno = errno


class Broker:
    """The jailer's loop body: one request from the domain, one reply (with a descriptor for "open")."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.domid: int | None = None
        self.staging: Path | None = None
        self.root: str | None = None
        self.fetched = 0

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
            from .jail import make_root_dir
            self.domid = int(msg["domid"])
            self.staging = Path(msg["staging"])
            self.root = make_root_dir()
            return {"root": self.root}, None
        if op == "deliver" and self.staging is not None:
            self._deliver(Path(msg["src"]), str(msg["dst"]))
            return {}, None
        if op == "listen":
            return {}, self._listen(str(msg["host"]), int(msg["port"]))
        if op == "fetch" and self.staging is not None:
            return {"path": self._fetch(str(msg["path"]))}, None
        raise _Refused(f"unknown request {op!r}")

    def _staged(self, src: Path) -> Path:
        """A file the domain wrote in its staging directory: a regular file with one link (not a symlink or a hard
        link to something else the domain wants moved or copied)."""
        assert self.staging is not None
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise _Refused(f"{src} is not a file in the staging directory") from None
        if src.parent != self.staging or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise _Refused(f"{src} is not a file in the staging directory")
        return src

    def _deliver(self, src: Path, dst: str) -> None:
        src = self._staged(src)
        if not os.path.isabs(dst):
            raise _Refused(f"{dst}: not an absolute path")
        try:
            st: os.stat_result | None = os.stat(dst)
        except FileNotFoundError:
            st = None
        uid, gid = os.geteuid(), os.getegid()
        try:
            if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout, COPY_CHUNK)
                return
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise _Refused(f"{dst}: not a regular file, FIFO or device (it is a "
                               f"{'directory' if stat.S_ISDIR(st.st_mode) else 'socket or special file'})")
            try:
                os.chown(src, uid, gid, follow_symlinks=False)
                os.rename(src, dst)
                return
            except OSError as e:
                if e.errno != 18:           # EXDEV: another file system, copy
                    raise
            tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.jail.tmp")
            try:
                with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fin, open(tmp, "xb") as fout:
                    os.fchmod(fout.fileno(), stat.S_IMODE(os.fstat(fin.fileno()).st_mode) & 0o644)
                    shutil.copyfileobj(fin, fout, COPY_CHUNK)
                    fout.flush()
                    os.fsync(fout.fileno())
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(src)

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

    def _fetch(self, path: str) -> str:
        """Copy a vmfork file into the staging directory (owned by the domain's uid); its path there."""
        assert self.staging is not None
        fd = self._open_vmfork_file(path)
        self.fetched += 1
        dst = self.staging / f"in-{self.fetched}"
        st = os.stat(self.staging)
        try:
            with open(fd, "rb", closefd=False) as fin, open(dst, "xb") as fout:
                shutil.copyfileobj(fin, fout, COPY_CHUNK)
            os.chown(dst, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        return str(dst)

    @staticmethod
    def _open_vmfork_file(path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Refused(f"{path}: not a regular file")
            if os.pread(fd, 8, 0) not in MAGICS:
                raise _Refused(f"{path}: not a vmfork device-state or save file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def after_exit(self, status: int, run_dir: str) -> None:
        """The domain has ended: report a jail kill, remove what the domain could not."""
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
                    for path in (rd.qmp_socket(self.domid), rd.console_socket(self.domid)):
                        with contextlib.suppress(OSError):
                            path.unlink()
                reg.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.root is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)


# --- the domain's side ------------------------------------------------------------------------------------------------

_WRITERS = ("vmfork-save", "xen-save-devices-state")
_READERS = ("vmfork-attach-dm",)


def jail_file_commands(jail: Jail) -> None:
    """Re-route the domain's QMP commands that name files through the staging directory and the jailer."""
    import dataclasses

    from . import domain as dom
    counter = itertools.count(1)

    def writer(orig: Any) -> Any:
        def handler(d: Any, conn: Any, args: dict[str, Any]) -> Any:
            assert jail.staging is not None
            dst = args["filename"]
            staged = jail.staging / f"out-{next(counter)}"
            try:
                result = orig(d, conn, {**args, "filename": str(staged)})
            except BaseException as e:
                with contextlib.suppress(OSError):
                    staged.unlink()
                if isinstance(e, QmpError):
                    raise QmpError(e.desc.replace(str(staged), dst), e.cls) from None
                if isinstance(e, VmforkError):
                    raise QmpError(str(e).replace(str(staged), dst)) from None
                if isinstance(e, OSError):
                    raise QmpError(f"{dst}: {e.strerror or e}") from None
                raise
            reply, _ = jail.request({"op": "deliver", "src": str(staged), "dst": dst})
            if "error" in reply:
                raise QmpError(reply["error"])
            return result
        return handler

    def reader(orig: Any) -> Any:
        def handler(d: Any, conn: Any, args: dict[str, Any]) -> Any:
            if "filename" not in args:
                return orig(d, conn, args)
            path = args["filename"]
            reply, _ = jail.request({"op": "fetch", "path": path})
            if "error" in reply:
                raise QmpError(reply["error"])
            staged = reply["path"]
            try:
                return orig(d, conn, {**args, "filename": staged})
            except QmpError as e:
                raise QmpError(e.desc.replace(staged, path), e.cls) from None
            except VmforkError as e:
                raise QmpError(str(e).replace(staged, path)) from None
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(staged)
        return handler

    def create_server(address: tuple[Any, ...], *, family: int = socket.AF_INET, backlog: int | None = None,
                      reuse_port: bool = False, dualstack_ipv6: bool = False) -> socket.socket:
        reply, fd = jail.request({"op": "listen", "host": address[0], "port": address[1]})
        if fd is None:
            raise OSError(reply.get("errno", errno.EPERM), reply.get("error", "the jailer refused"))
        return socket.socket(fileno=fd)

    # TCP listeners (the GDB server's) come from the jailer, in the host's network namespace: the domain has no
    # network of its own and its seccomp filter refuses AF_INET sockets.
    socket.create_server = create_server        # type: ignore[assignment]
    for name in _WRITERS + _READERS:
        cmd = dom.COMMANDS.get(name)
        if cmd is not None:
            wrap = writer if name in _WRITERS else reader
            dom.COMMANDS[name] = dataclasses.replace(cmd, handler=wrap(cmd.handler))
