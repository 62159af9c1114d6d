"""Files a domain writes or reads for a command: opened by the command (the invoking user), passed as descriptors.

A domain never opens a path a QMP message names on the CLI's behalf: `vmfork save`, `save-devices-state` and
`fork-vm --launch-dm late -Q` open the file here, with the invoking user's identity, and hand the domain the
descriptor (QMP `getfd`, SCM_RIGHTS, as QEMU takes descriptors), then name the command's `fdname`. A jailed domain
(jail.py) can then write its save file without any way to write anywhere else, and the file is the invoking user's.

Writing (OutputFile), by what is at the target path (snapshot.container.save_target):
- nothing, or a regular file: an unnamed temporary file (O_TMPFILE) in the target's directory is passed; the domain
  writes it in place (holes kept); once the command has succeeded it gets its mode, a temporary name carrying this
  process's pid and is renamed over the target. A domain killed mid-save leaves nothing behind (the unnamed file
  goes with the descriptors); where the file system has no O_TMPFILE the temporary file is named from the start and
  removed on failure, or by the next save into that directory if this process was killed too.
- a FIFO or a character device: opened for writing here and passed; the domain streams the finished file to it.
- `-`: this process's stdout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import sys
from types import TracebackType

from .._libc import link_open_file, replace_durably
from ..errors import VmforkError
from ..snapshot.container import remove_stale_temporaries, save_target
from .qmp import QmpCommandError

__all__ = ["OutputFile", "named", "open_input"]

_PROC_FD = re.compile(r"/proc/self/fd/\d+")


class OutputFile:
    """A file the command gets written by a domain: `fd` to pass, `commit()` once the domain reported success."""

    def __init__(self, path: str, what: str, *, mode: int = 0o600) -> None:
        self.path = path
        self.what = what
        self.mode = mode
        self.kind = "stdout" if path == "-" else save_target(path, what)     # refused before anything changes
        self._tmp: str | None = None
        self.fd = -1
        try:
            if self.kind == "stdout":
                sys.stdout.flush()
                self.fd = os.dup(sys.stdout.fileno())
            elif self.kind == "stream":
                self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                directory = os.path.dirname(os.path.abspath(path))
                remove_stale_temporaries(directory)
                name = f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
                self._tmp = os.path.join(directory, name)
                try:
                    self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                    self._named = False
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                        raise
                    self.fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    self._named = True
        except OSError as e:
            self.close()
            raise VmforkError(f"cannot write {what} {path}: {e.strerror or e}") from None

    def commit(self) -> None:
        """The domain has written the file: give it its name (a regular target) atomically."""
        if self.kind != "replace":
            return
        assert self._tmp is not None
        try:
            os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            if not self._named:
                link_open_file(self.fd, self._tmp)
                self._named = True
            replace_durably(self._tmp, self.path)
            self._tmp = None
        except OSError as e:
            raise VmforkError(f"cannot write {self.what} {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        """Drop the descriptor, and a named temporary file that was never committed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp is not None and getattr(self, "_named", False):
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
        self._tmp = None

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_input(path: str, what: str) -> int:
    """A file a domain is to read (a device-state file), opened here for reading: its descriptor."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise VmforkError(f"cannot read {what} {path}: {e.strerror or e}") from None


def named(e: QmpCommandError, path: str) -> QmpCommandError:
    """The domain's error about the descriptor it was passed (`/proc/self/fd/N` in its messages), naming the file."""
    desc = _PROC_FD.sub(path, e.desc)
    return QmpCommandError(e.command, e.cls, desc)
