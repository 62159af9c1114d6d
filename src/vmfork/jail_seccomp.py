"""The jail's seccomp allow-list (libseccomp through the pyseccomp binding).

What a running domain process needs, found by running the toolstack tests with the filter in log mode
(`VMFORK_JAIL_SECCOMP=log`: nothing is refused, every call outside the list is logged by the kernel's audit) and
reading the log: its Python runtime (memory, threads, futexes, signals, time), the KVM ioctls by number, its own file
descriptors (read/write/seek/sync on fds it holds; open only for what the private root holds), and the socket calls
of its QMP and console servers on Unix sockets. A call outside the list kills the process (SIGSYS,
SECCOMP_RET_KILL_PROCESS: the jailer reports the domain as killed by the jail); a few calls inside the list are
refused with an errno for arguments outside it (a socket of another family than AF_UNIX: EPERM; clone with
namespace flags: EPERM; clone3, whose flags live in memory the filter cannot read: ENOSYS, so the C library falls
back to clone).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from .errors import VmforkError

__all__ = ["ALLOWED", "KVM_IOCTLS", "install"]

# The Python runtime, memory and threads.
_RUNTIME = (
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise",
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield", "sched_getaffinity",
    "exit", "exit_group", "gettid", "getpid", "getppid", "tgkill", "kill",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "restart_syscall",      # a sleep or wait interrupted by SIGSTOP/SIGCONT (or a debugger) goes on through it
    "clock_gettime", "clock_getres", "gettimeofday", "nanosleep", "clock_nanosleep",
    "getrandom", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid", "uname",
    "getrlimit", "prlimit64", "umask", "getcwd", "prctl", "arch_prctl",
)
# Files: its own descriptors, and the few paths its private root holds (the kernel on a reboot, /proc/self, the
# staging directory where file commands write).
_FILES = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "lseek", "close", "fstat", "newfstatat", "stat", "lstat", "statx", "fstatfs",
    "openat", "open", "fcntl", "dup", "dup2", "dup3", "pipe2", "pipe", "eventfd2", "memfd_create",
    "ftruncate", "fallocate", "fsync", "fdatasync",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "link", "linkat",
    "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2", "fchmod", "close_range",
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
)
# Sockets: its QMP and console servers (Unix sockets; socket() itself is checked below).
_SOCKETS = (
    "socketpair", "bind", "listen", "accept", "accept4", "connect", "sendmsg", "recvmsg", "sendto", "recvfrom",
    "sendmmsg", "recvmmsg", "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown",
)
ALLOWED: tuple[str, ...] = _RUNTIME + _FILES + _SOCKETS

# ioctl requests outside KVM's that the runtime makes: isatty (TCGETS), FIONBIO, FIOCLEX/FIONCLEX (Python's
# set_inheritable), FIONREAD.
_TTY_IOCTLS = (0x5401, 0x5421, 0x5451, 0x5450, 0x541B)

CLONE_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                    | 0x00000080)   # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME


def _kvm_ioctls() -> tuple[int, ...]:
    from .kvm import constants as c
    return tuple(sorted({v for k, v in vars(c).items()
                         if k.startswith("KVM_") and isinstance(v, int) and v >= 0xAE00
                         and (v >> 8) & 0xFF == c.KVMIO}))


KVM_IOCTLS = _kvm_ioctls()


def install(*, log_only: bool = False) -> None:
    """Install the filter on every thread of this process (TSYNC; no_new_privs must be set already).
    log_only: allow everything and let the kernel log each call outside the list (for finding what is missing)."""
    try:
        import pyseccomp as sc
    except ImportError as e:
        raise VmforkError(f"the jail needs libseccomp and its Python binding pyseccomp ({e}); run ./dev setup, or "
                          "run without the jail (jail = 0 in the config, or --no-jail)") from None
    deny = sc.LOG if log_only else sc.KILL_PROCESS
    f: Any = sc.SyscallFilter(deny)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    for name in ALLOWED:
        try:
            f.add_rule(sc.ALLOW, name)
        except (OSError, RuntimeError, ValueError):
            pass                            # a name this libseccomp or architecture does not know
    f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, socket.AF_UNIX))
    f.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NAMESPACES, 0))
    for bit in range(32):
        if CLONE_NAMESPACES >> bit & 1:
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, 1 << bit, 1 << bit))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (*KVM_IOCTLS, *_TTY_IOCTLS):
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    try:
        f.load()
    except OSError as e:
        raise VmforkError(f"cannot install the jail's seccomp filter: {os.strerror(e.errno or 0)}") from None
