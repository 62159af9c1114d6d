"""Memory limits for fork processes through a memory cgroup (v2, or v1's memory controller).

A process fork given a limit is moved into a cgroup of its own right after it is created. Pages it allocates from
then on (the guest's copy-on-write copies, mostly) are charged there; when the fork goes over its limit the kernel's
OOM killer ends that process only, and the cgroup's OOM counter says why it died, so the parent and the other
forks go on and the report can name the cause."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import VmforkError

V2_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _own_v1_path() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"


class MemoryCgroup:
    """One cgroup holding one process, with a memory limit."""

    def __init__(self, path: Path, version: int, limit_bytes: int) -> None:
        self.path = path
        self.version = version
        self.limit_bytes = limit_bytes

    @classmethod
    def create(cls, name: str, limit_mib: int) -> MemoryCgroup:
        if limit_mib < 1:
            raise VmforkError(f"a memory limit must be at least 1 MiB, got {limit_mib}")
        limit = limit_mib << 20
        if (V2_ROOT / "cgroup.controllers").exists():
            if "memory" not in (V2_ROOT / "cgroup.controllers").read_text().split():
                raise VmforkError("memory limits need the cgroup v2 memory controller, which this host lacks")
            parent = V2_ROOT / "vmfork"
            try:
                parent.mkdir(exist_ok=True)
                (V2_ROOT / "cgroup.subtree_control").write_text("+memory")
                (parent / "cgroup.subtree_control").write_text("+memory")
                path = parent / name
                path.mkdir()
                (path / "memory.max").write_text(str(limit))
                (path / "memory.swap.max").write_text("0") if (path / "memory.swap.max").exists() else None
            except OSError as e:
                raise VmforkError(f"cannot create a memory cgroup for {name}: {e.strerror} ({e.filename})") from None
            return cls(path, 2, limit)
        if V1_MEMORY.is_dir():
            path = V1_MEMORY / _own_v1_path().lstrip("/") / name
            try:
                path.mkdir()
                (path / "memory.limit_in_bytes").write_text(str(limit))
            except OSError as e:
                raise VmforkError(f"cannot create a memory cgroup for {name}: {e.strerror} ({e.filename})") from None
            return cls(path, 1, limit)
        raise VmforkError("memory limits need a memory cgroup controller (cgroup v2 or v1), which this host lacks")

    def add(self, pid: int) -> None:
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise VmforkError(f"cannot move pid {pid} into {self.path}: {e.strerror}") from None

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass
