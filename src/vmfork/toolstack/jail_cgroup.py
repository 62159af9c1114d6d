"""The jail's cgroup leaf: memory, pids and cpu limits for one domain process.

cgroup v2 where the unified hierarchy offers all three controllers; otherwise the v1 controllers, each in its own
hierarchy under /sys/fs/cgroup/<controller> (hosts with a v1/v2 hybrid, like the CI host, have memory, pids and cpu
only in v1). The leaf is `vmfork/dom-<host pid>` under the process's own cgroup of each hierarchy; the process joins
it at its start (so the guest's RAM, allocated later, is charged to it) and the limits are written once the domain
knows its size. The jailer removes the leaves after the process has ended.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmforkError

__all__ = ["CPU_PERIOD_US", "CgroupLeaf", "JailCgroupError"]

# Where the cgroup hierarchies are mounted; VMFORK_JAIL_CGROUP_ROOT points it elsewhere (the tests: a host without
# the controllers).
ROOT = Path(os.environ.get("VMFORK_JAIL_CGROUP_ROOT", "/sys/fs/cgroup"))
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class JailCgroupError(VmforkError):
    """The cgroup part of the jail cannot be set up."""


def _own_paths() -> dict[str, str]:
    """The process's cgroup in each hierarchy: {"memory": "/user.slice", ..., "": "/..." for v2}."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _v2_root() -> Path | None:
    """The unified hierarchy's mount point when it has all of CONTROLLERS, else None."""
    for cand in (ROOT, ROOT / "unified"):
        ctl = cand / "cgroup.controllers"
        if ctl.exists():
            have = set(ctl.read_text().split())
            if set(CONTROLLERS) <= have:
                return cand
    return None


@dataclass(slots=True)
class CgroupLeaf:
    """One leaf per controller hierarchy (v1), or one leaf (v2)."""

    version: int
    dirs: dict[str, Path]           # controller (or "" for v2) -> leaf directory

    @classmethod
    def create(cls, name: str) -> CgroupLeaf:
        """Make the leaf (and its `vmfork` parent) and move this process into it."""
        own = _own_paths()
        v2 = _v2_root()
        dirs: dict[str, Path] = {}
        try:
            if v2 is not None:
                parent = v2 / own.get("", "/").lstrip("/") / "vmfork"
                parent.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    (parent.parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
                leaf = parent / name
                leaf.mkdir()
                dirs[""] = leaf
                version = 2
            else:
                missing = [c for c in CONTROLLERS if not (ROOT / c / "cgroup.procs").exists()]
                if missing:
                    raise JailCgroupError(f"the jail needs the cgroup controllers {', '.join(CONTROLLERS)} (v2, or "
                                          f"v1 under {ROOT}); this host lacks {', '.join(missing)}")
                for c in CONTROLLERS:
                    base = ROOT / c / own.get(c, "/").lstrip("/") / "vmfork"
                    base.mkdir(exist_ok=True)
                    leaf = base / name
                    leaf.mkdir()
                    dirs[c] = leaf
                version = 1
            for leaf in dirs.values():
                (leaf / "cgroup.procs").write_text("0")     # "0": the writing process itself
        except OSError as e:
            for leaf in dirs.values():
                with contextlib.suppress(OSError):
                    leaf.rmdir()
            raise JailCgroupError(f"cannot create the jail's cgroup: {e.strerror} ({e.filename})") from None
        return cls(version, dirs)

    def limit(self, *, memory_bytes: int, pids: int, cpu_percent: int) -> None:
        """memory: a hard limit; pids: tasks (threads count); cpu_percent: of one CPU, 0 = no cap (xl.cfg's cap)."""
        quota = -1 if cpu_percent <= 0 else cpu_percent * CPU_PERIOD_US // 100
        try:
            if self.version == 2:
                leaf = self.dirs[""]
                (leaf / "memory.max").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):
                    (leaf / "memory.swap.max").write_text("0")
                (leaf / "pids.max").write_text(str(pids))
                (leaf / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}")
            else:
                (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
                (self.dirs["pids"] / "pids.max").write_text(str(pids))
                (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as e:
            raise JailCgroupError(f"cannot set the jail's cgroup limits: {e.strerror} ({e.filename})") from None

    def limits(self) -> dict[str, str]:
        """The limits as the kernel holds them (for tests and `vmfork-jail-probe`)."""
        if self.version == 2:
            leaf = self.dirs[""]
            names = {"memory": leaf / "memory.max", "pids": leaf / "pids.max", "cpu": leaf / "cpu.max"}
        else:
            names = {"memory": self.dirs["memory"] / "memory.limit_in_bytes", "pids": self.dirs["pids"] / "pids.max",
                     "cpu": self.dirs["cpu"] / "cpu.cfs_quota_us"}
        return {k: p.read_text().strip() for k, p in names.items()}

    def remove(self) -> None:
        for leaf in self.dirs.values():
            with contextlib.suppress(OSError):
                os.rmdir(leaf)
