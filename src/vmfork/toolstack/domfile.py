"""Domain files: what says a domain exists (the registry is only an index of them).

Every domain process holds an exclusive flock on a small file of its own in the runtime directory, `<domid>.dom`,
for its whole life. The file holds what is needed to find and rebuild its registry row: domid, name, pid, kind,
parent, config, sockets, log, state and pause holders (JSON, rewritten in place when they change). The kernel drops
the lock when the process ends however it ends, so "the lock is held" is the liveness test that survives a deleted
or damaged registry, pid reuse and a full disk:

- `vmfork list` lists every live domain, rebuilding registry rows that are missing from these files;
- allocation (Registry.reserve) never hands out a domid, name or socket path that a live domain file holds, and
  takes domids above every file in the directory, so a new domain never writes into an old domain's files.

Readers test the lock with a shared, non-blocking flock (LOCK_SH | LOCK_NB): readers do not disturb each other, and
they fail to get it exactly while the domain process holds its exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DomainFile", "allocation_lock", "highest_domid", "live_domains"]

SUFFIX = ".dom"
ALLOC_LOCK = "alloc.lock"


class DomainFile:
    """The domain process's side: create the file, hold its lock, publish changes, remove it at the end."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = dict(data)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"{path} is held by another live domain") from None
        self.fd = fd
        self._write()

    def update(self, **values: Any) -> None:
        """Publish changed values (best effort: a full disk must not stop the domain)."""
        self.data.update(values)
        with contextlib.suppress(OSError):
            self._write()

    def _write(self) -> None:
        text = json.dumps(self.data).encode() + b"\n"
        os.pwrite(self.fd, text, 0)
        os.ftruncate(self.fd, len(text))

    def remove(self) -> None:
        """Unlink the file, then drop the lock (the domain is gone from then on)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _held(path: str) -> dict[str, Any] | None:
    """The file's data if a live process holds its lock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass                        # held: a live domain
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        for _ in range(3):              # a rewrite in progress: read again
            raw = os.pread(fd, 1 << 20, 0)
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            return data if isinstance(data, dict) else None
        return None
    finally:
        os.close(fd)


def live_domains(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every live domain of the directory by domid, from the files their processes hold."""
    out: dict[int, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return out
    for e in entries:
        stem, _, ext = e.name.partition(".")
        if "." + ext != SUFFIX or not stem.isdigit():
            continue
        data = _held(e.path)
        if data is not None and data.get("domid") == int(stem):
            out[int(stem)] = data
    return out


def highest_domid(run_dir: Path) -> int:
    """The highest domid any file in the directory is named after (0 if none): new domids go above it, so a domain
    never appends to an old domain's log or takes its socket paths."""
    best = 0
    with contextlib.suppress(OSError):
        for e in os.scandir(run_dir):
            stem = e.name.lstrip(".").partition(".")[0]
            if stem.isdigit():
                best = max(best, int(stem))
    return best


def remove_stale(run_dir: Path, domid: int) -> None:
    """Remove a dead domain's file (no-op while a process holds it)."""
    path = run_dir / f"{domid}{SUFFIX}"
    if _held(str(path)) is None:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextmanager
def allocation_lock(run_dir: Path) -> Iterator[None]:
    """Serialises allocation of domids and names across processes, registry or not."""
    fd = os.open(run_dir / ALLOC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
