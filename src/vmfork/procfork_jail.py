"""The jail of process forks (`isolation="process"`, procfork.py): what a fork worker gives up before it becomes a
fork, so a guest that breaks its worker's device models has no more reach than a jailed domain's.

A worker confines itself once its VM shell is built (its /dev/kvm, VM and vCPU descriptors open, its imports
warmed up) and before it tells the VMM it is ready, so the confinement is off the fork path. As a jailed domain
(toolstack/jail.py) it:

- enters new mount, IPC and network namespaces and moves into a private root (a tmpfs, pivot_root) holding only
  /dev/kvm, a read-only /proc and the read-only Python runtime (a Python VMM imports lazily); every descriptor it
  opened from a path is closed (its socket to the VMM, KVM's descriptors and memfds stay);
- switches to an unprivileged uid and gid of its own (WORKER_UID_RANGE + its pid, so sibling workers cannot signal
  one another), with no supplementary groups and so no capabilities;
- sets no_new_privs and installs the same seccomp allow-list (jail_seccomp.py).

What does not apply to a worker, and why:
- **PID namespace.** Entering one takes a fork (unshare(CLONE_NEWPID) moves only the caller's children), which
  would put a process between the VMM and its worker: the VMM pauses a worker with a signal to its pid
  (procfork.PAUSE_SIGNAL), reaps it as its own child to report how it ended, and relies on PR_SET_PDEATHSIG of that
  child. The worker's own uid gives it what the namespace would for signals (it may signal only itself) and
  seccomp refuses ptrace.
- **cgroup leaf.** The workers are the VMM's own processes, in the VMM's cgroup (procfork's MemoryCgroup limits
  the forks' memory where asked); a domain's leaf belongs to the toolstack's accounting per domain.
- Sharing memory with the parent needs nothing from the file system: the RAM files come as descriptors over the
  worker's socket (SCM_RIGHTS) and are mapped by descriptor, which works under any uid and in any mount namespace.

On by default when the VMM runs as root, as domains are; `VMFORK_PROCFORK_JAIL=0` in the VMM's environment turns
it off. A jail that cannot be set up fails the worker's start, and so the fork, with one line naming what is
missing; never a silently unjailed worker. Other users' workers run unjailed, as their domains do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

from .errors import ForkError

__all__ = ["ENV", "WORKER_UID_RANGE", "confine_worker", "pivot_into", "wanted"]

ENV = "VMFORK_PROCFORK_JAIL"                # "0": process forks' workers run unjailed
WORKER_UID_RANGE = (465536, 65536)          # above the domains' range (toolstack/jail.py: 400000 + 65536)
NO_JAIL_HINT = f"set {ENV}=0 to run process forks without the jail"

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = 155
_MOUNT_POINTS = ("/mnt", "/media", "/srv", "/opt", "/run", "/tmp", "/var/tmp")

_libc = ctypes.CDLL(None, use_errno=True)


class WorkerJailError(ForkError):
    """A process fork's worker could not be jailed (the fork is refused)."""


def wanted() -> bool:
    """Whether workers started now are jailed: root, unless VMFORK_PROCFORK_JAIL=0."""
    return os.geteuid() == 0 and os.environ.get(ENV, "1") != "0"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise WorkerJailError(f"the process fork's jail cannot be set up: {what}: {os.strerror(err)}; {NO_JAIL_HINT}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {dst}")


def pivot_into(root: str, check: Callable[[int, str], None]) -> None:
    """Make `root` the process's root (pivot_root, the old root detached and its mount point removed), then the new
    root read-only: shared by process-fork workers and the domains' jail (toolstack/jail.py), each with the
    `check` that raises its own error."""
    old = os.path.join(root, ".old")
    os.mkdir(old, 0o700)
    check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    check(_libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    check(_libc.mount(None, b"/", None, ctypes.c_ulong(flags), None), "mount /")


def runtime_dirs() -> list[str]:
    """The Python runtime's directories (standard library, site-packages, vmfork's own package), for read-only
    binds: a Python VMM imports lazily. They hold code that is public anyway."""
    import sysconfig

    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib")}
    dirs.add(os.path.realpath(os.path.dirname(__file__)))       # vmfork's own package
    return sorted(d for d in dirs if os.path.isdir(d) and not any(d.startswith(o + os.sep) for o in dirs))


def _uid() -> int:
    first, count = WORKER_UID_RANGE
    return first + os.getpid() % count


def keep_own_pagemap(check: Callable[[int, str], None]) -> None:
    """Open this process's /proc/self/pagemap for good (memory.pagemap_fd), right after the jail's uid switch, in a
    moment of dumpability. For domains (toolstack/jail.py) and process forks' workers alike.

    A fork counts its pages (vmfork list's Pages) and resets after its dirty ring lost entries from its own page
    table entries there. The uid switch made the process non-dumpable, so its /proc files belong to root and it
    could not open it any more. Made dumpable for the open and non-dumpable again at once, the jail keeps what
    non-dumpability is for: no core dump of guest memory, no ptrace or /proc access by another process of the
    uid. The descriptor is opened as the jail's uid without capabilities, so the kernel hides physical frame
    numbers in it (opened as root before the switch, it would show them to a compromised process: the addresses a
    Rowhammer attack wants); it shows only what the process may know of itself: which of its pages are present,
    swapped or private."""
    from .memory import pagemap_fd
    check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    try:
        pagemap_fd()
    except OSError as e:
        ctypes.set_errno(e.errno or 0)
        check(-1, "its own /proc/self/pagemap")       # the caller's error, with its hint
    finally:
        check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")


def close_path_fds(keep_fds: set[int], keep_paths: set[str]) -> None:
    """Close descriptors opened from paths (files not needed once jailed); keep sockets, pipes, KVM's anonymous
    inodes, memfds, stdio, /dev/kvm and /dev/null, `keep_fds` and descriptors of `keep_paths`."""
    keep_paths = keep_paths | {"/dev/kvm", "/dev/null"}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if fd <= 2 or fd in keep_fds or not target.startswith("/") or target.startswith("/memfd:") or \
                target in keep_paths:
            continue
        with contextlib.suppress(OSError):
            os.close(fd)


def _build_root(root: str) -> None:
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    old_umask = os.umask(0o022)

    def bind(src: str, *, directory: bool, readonly: bool) -> None:
        dst = root + os.path.abspath(src)
        os.makedirs(dst if directory else os.path.dirname(dst), mode=0o755, exist_ok=True)
        if not directory:
            with open(dst, "a"):
                pass
        _mount(src, dst, None, MS_BIND)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if readonly else 0) | \
            (0 if src.startswith("/dev/") else MS_NODEV)
        _mount(None, dst, None, flags)
    try:
        bind("/dev/kvm", directory=False, readonly=False)
        bind("/proc", directory=True, readonly=True)
        for d in runtime_dirs():
            bind(d, directory=True, readonly=True)
    finally:
        os.umask(old_umask)


def _mount_point(avoid: list[str]) -> str:
    """An existing directory to build the private root on, in this (private) mount namespace: one that holds none
    of what gets bound into the root, so covering it hides nothing the binds need."""
    for cand in _MOUNT_POINTS:
        if os.path.isdir(cand) and not any(a == cand or a.startswith(cand + os.sep) for a in avoid):
            return cand
    raise WorkerJailError(f"the process fork's jail cannot be set up: no directory to build its root on (tried "
                          f"{', '.join(_MOUNT_POINTS)}); {NO_JAIL_HINT}")


def confine_worker(*, keep_fds: set[int], parent_pid: int) -> None:
    """Jail this worker process (see the module docstring). Raises WorkerJailError naming what is missing."""
    try:
        import pyseccomp  # noqa: F401

        from .jail_seccomp import install
    except ImportError:
        raise WorkerJailError(f"the process fork's jail needs libseccomp and its Python binding pyseccomp (./dev "
                              f"setup installs them); {NO_JAIL_HINT}") from None
    for ns in ("mnt", "ipc", "net"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise WorkerJailError(f"the process fork's jail needs {ns} namespaces, which this kernel lacks; "
                                  f"{NO_JAIL_HINT}")
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET)), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = _mount_point(["/dev/kvm", "/proc", *runtime_dirs()])
    _build_root(root)
    close_path_fds(keep_fds, set())
    pivot_into(root, _check)
    uid = _uid()
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise WorkerJailError(f"the process fork's jail cannot switch to uid {uid}: {e.strerror}; "
                              f"{NO_JAIL_HINT}") from None
    # A change of credentials clears the parent-death signal: set it again (the worker must die with its VMM).
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent_pid:
        sys.exit(1)
    keep_own_pagemap(_check)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    install()
