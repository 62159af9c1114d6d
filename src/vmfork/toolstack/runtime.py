"""The runtime directory: where domains keep their control sockets, console sockets, console logs and the registry.

    root:        /run/vmfork/
    other users: $XDG_RUNTIME_DIR/vmfork (or /tmp/vmfork-<uid> when XDG_RUNTIME_DIR is unset)
    override:    $VMFORK_RUN_DIR

The directory is created with mode 0700 and must belong to the caller and not be writable by anyone else (a
directory others can write to would let them plant sockets). Per domain, named by its domid:

    <domid>.qmp       the control socket (QMP), mode 0600
    <domid>.console   the console socket (output stream, input), mode 0600
    <domid>.log       the console log (everything the guest wrote to its console), mode 0600
    <domid>.stats     a fuzzer's live numbers, for a fork it holds (`vmfork fuzz --domain`), mode 0600
    <domid>.dom       the domain file: its process holds a lock on it while it lives (domfile.py), mode 0600
    registry.db       the registry of domains (SQLite, WAL), an index of the domain files
    alloc.lock        serialises the allocation of domids and names

Also here: process liveness checks that survive pid reuse (a pid plus its start time).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmforkError

__all__ = ["RunDir", "ToolstackError", "pid_alive", "pid_start_time"]


class ToolstackError(VmforkError):
    """A toolstack operation failed (unknown domain, refused command, unreachable domain...)."""


def default_run_dir() -> Path:
    env = os.environ.get("VMFORK_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/vmfork")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vmfork"
    return Path(f"/tmp/vmfork-{os.geteuid()}")


@dataclass(frozen=True, slots=True)
class RunDir:
    """A checked runtime directory."""

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> RunDir:
        """The runtime directory (created 0700 if missing), after checking who owns it and who may write to it."""
        p = Path(path) if path is not None else default_run_dir()
        p = p.absolute()
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(p)
        except OSError as e:
            raise ToolstackError(f"runtime directory {p}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ToolstackError(f"runtime directory {p} is not a directory")
        if st.st_uid != os.geteuid():
            raise ToolstackError(f"runtime directory {p} belongs to uid {st.st_uid}, not to you (uid "
                                 f"{os.geteuid()}); set VMFORK_RUN_DIR to a directory of your own")
        if st.st_mode & 0o022:
            raise ToolstackError(f"runtime directory {p} is writable by other users (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); chmod 700 it")
        return cls(p)

    def qmp_socket(self, domid: int) -> Path:
        return self.path / f"{domid}.qmp"

    def console_socket(self, domid: int) -> Path:
        return self.path / f"{domid}.console"

    def console_log(self, domid: int) -> Path:
        return self.path / f"{domid}.log"

    def domain_file(self, domid: int) -> Path:
        return self.path / f"{domid}.dom"

    @property
    def registry(self) -> Path:
        return self.path / "registry.db"

    def socket_files(self) -> dict[int, list[Path]]:
        """Socket files in the directory by the domid in their name."""
        out: dict[int, list[Path]] = {}
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return out
        for e in entries:
            stem, dot, ext = e.name.partition(".")
            if dot and ext in ("qmp", "console") and stem.isdigit():
                out.setdefault(int(stem), []).append(Path(e.path))
        return out


def pid_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), or None if there is no such live process (a zombie
    counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[-1].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int | None, start_time: int | None) -> bool:
    """Whether the process `pid` that started at `start_time` still runs (not a later process with the same pid)."""
    if not pid:
        return False
    now = pid_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time
