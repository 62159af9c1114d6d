"""The jailer: every domain process runs as an unprivileged, namespaced, cgroup-limited, seccomp-filtered process.

vmfork's guests are untrusted (malware in introspection clones, fuzz inputs, sandboxed code), and a bug in a device
model, the QMP or GDB servers or a file parser must not have root's reach. As Firecracker's jailer does for its VMM,
each domain process, before its guest's first instruction:

- runs in new PID, mount, IPC and network namespaces (no network: the guests have no NIC). The PID namespace is
  entered at the start: the process forks once, and its child, pid 1 of the new namespace, is the domain; the
  parent stays outside as the jailer (see below);
- joins a cgroup leaf (jail_cgroup.py: v2 where the host has the controllers, v1 otherwise) limited to the config's
  `memory` plus MEMORY_OVERHEAD_MIB, PIDS_MAX tasks and `cap` percent of a CPU (xl.cfg's credit-scheduler cap);
- once its resources are open (its /dev/kvm, VM and vCPU fds, RAM memfds, registry, console log, listening sockets,
  a fork's parent connection), moves into a private root (a tmpfs, pivot_root) that holds only its run directory's
  files it uses (the registry database, a staging directory), its kernel and initrd (read-only bind mounts, for a
  reboot), /dev/kvm and a read-only /proc; every other file descriptor is closed;
- switches to its own unprivileged uid and gid (JAIL_UID_RANGE + domid, or the config's `jail_user`), with no
  supplementary groups and so no capabilities;
- sets no_new_privs and installs the seccomp allow-list (vmfork/jail_seccomp.py, shared with process forks'
  workers: procfork_jail.py; a call outside it kills the process with SIGSYS).

The jailer (the parent outside the namespaces, root, about a page of work) then waits for the domain to end and
cleans what the domain cannot: its socket files, its domain file, an empty console log, the staging directory, the
cgroup leaf. It reports a domain killed by SIGSYS as "killed by the jail" (registry reason and a line in the
console log). It writes no file a domain names: saves, device-state files and late device models' files are opened
by the CLI as the invoking user and passed to the domain as descriptors (passfd.py), and a QMP message naming a
`filename` is refused by a jailed domain; the jailer only rotates the domain's own console log and makes the GDB
server's TCP listener (jail_files.py).

On by default when vmfork runs as root; `jail = 0` in the config, or `--no-jail`, turns it off (with a warning).
For other users it is off by default, silently (they cannot set it up); asking for it (`jail = 1`, `--jail`) is
refused saying it needs root. A jail that cannot be set up (no cgroup controllers, no namespaces, no libseccomp)
refuses the domain with one line naming what is missing and how to run without the jail: never a silently unjailed
domain. Process forks' workers are jailed by procfork_jail.py (the same seccomp allow-list).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import select
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VmforkError
from ..procfork_jail import close_path_fds, keep_own_pagemap, pivot_into
from .jail_files import Broker, jail_file_commands

if TYPE_CHECKING:
    from .domain import Command, Domain

__all__ = ["Jail", "JailError", "host_pid", "start", "wanted"]

JAIL_UID_RANGE = (400000, 65536)        # first uid (= gid) of the per-domain range, and its size
UID_RANGE_ENV = "VMFORK_JAIL_UIDS"      # "FIRST-LAST" overrides the range
SECCOMP_ENV = "VMFORK_JAIL_SECCOMP"     # "log": log calls outside the list instead of killing (finding what's missing)
TEST_ENV = "VMFORK_JAIL_TEST"           # set by the tests: the domain gets the jail-probe QMP command (jail_probe.py)
MEMORY_OVERHEAD_MIB = 384               # the domain process's own memory (Python, numpy, capstone, buffers)
PIDS_MAX = 128                          # tasks: vCPU threads, timers, the waiter, ...
NO_JAIL_HINT = "set jail = 0 in the config or use --no-jail to run without the jail"

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(VmforkError):
    """The jail cannot be set up (the domain is refused)."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(f"the jail cannot be set up: {what}: {os.strerror(err)}; {NO_JAIL_HINT}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare ({what})")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {dst}")


_host_pid: int | None = None


def host_pid() -> int:
    """This process's pid as the host sees it (inside the jail's PID namespace os.getpid() is 1): the registry and
    `vmfork destroy` work with host pids."""
    global _host_pid
    if _host_pid is None:
        try:
            _host_pid = int(os.readlink("/proc/self"))
        except (OSError, ValueError):
            _host_pid = os.getpid()
    return _host_pid


NO_JAIL_HELP = "run the domain without the jail (as the invoking user, unconfined; see vmfork.toolstack.jail)"
JAIL_HELP = "run the domain in the jail (as `jail = 1`; needs root; see vmfork.toolstack.jail)"


def jail_spec(spec: dict[str, Any], *, no_jail: bool, config_jail: int | None = None, label: str = "the domain",
              jail: bool = False) -> dict[str, Any]:
    """The CLI's part: `--no-jail` (or `--jail`) into the domain's spec, and the warning when root runs a domain
    unjailed on purpose."""
    if no_jail:
        spec = {**spec, "jail": False}
    elif jail:
        spec = {**spec, "jail": True}
    if (no_jail or config_jail == 0) and os.geteuid() == 0:
        why = "--no-jail" if no_jail else "jail = 0"
        print(f"vmfork: warning: {label} runs without the jail ({why}): as root, with every system call and the "
              "whole file system", file=sys.stderr)
    return spec


# --- deciding ---------------------------------------------------------------------------------------------------------

def wanted(spec: dict[str, Any], run_dir: str) -> bool:
    """Whether this domain is jailed: the spec's "jail" (False from --no-jail), else the config's `jail` key (a fork
    takes its parent's), else on for root. An explicit jail for a non-root user is refused."""
    value: Any = spec.get("jail")
    if value is None:
        if spec.get("kind") == "create":
            value = spec.get("config", {}).get("jail")
        elif spec.get("kind") == "fork":
            with contextlib.suppress(VmforkError, KeyError, ValueError, TypeError):
                from .registry import Registry
                from .runtime import RunDir
                value = Registry(RunDir.open(run_dir)).find(int(spec["parent"])).config.get("jail")
    if value is None:
        return os.geteuid() == 0
    if not value:
        return False
    if os.geteuid() != 0:
        raise JailError(f"the jail needs root (vmfork runs as uid {os.geteuid()}); {NO_JAIL_HINT}")
    return True


def _preflight() -> None:
    """What the jail needs, checked before anything is changed (one line naming the first thing missing)."""
    try:
        import pyseccomp  # noqa: F401
    except ImportError:
        raise JailError(f"the jail needs libseccomp and its Python binding pyseccomp (./dev setup installs them); "
                        f"{NO_JAIL_HINT}") from None
    for ns in ("mnt", "pid", "ipc", "net"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise JailError(f"the jail needs {ns} namespaces, which this kernel lacks; {NO_JAIL_HINT}")
    if not os.path.exists("/dev/kvm"):
        raise JailError("/dev/kvm does not exist")


# --- start: the PID namespace and the jailer ------------------------------------------------------------------------

def start(spec: dict[str, Any], run_dir: str, report_fd: int | None) -> Jail | None:
    """Called first thing in the domain process: returns None (no jail), or, in the domain (the child in the new
    namespaces), its Jail. The parent becomes the jailer and never returns."""
    if not wanted(spec, run_dir):
        return None
    _preflight()
    from .jail_cgroup import CgroupLeaf, JailCgroupError
    try:
        leaf = CgroupLeaf.create(f"dom-{os.getpid()}")
    except JailCgroupError as e:
        raise JailError(f"{e}; {NO_JAIL_HINT}") from None
    # The leaf was joined by this process; the domain (its child) is in it from birth. The jailer leaves it again.
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _unshare(CLONE_NEWPID, "PID namespace")
    except JailError:
        leaf.remove()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        # The jailer: a small program of its own (its command line names it, not the domain), with the broker's
        # socket and the child to wait for.
        child_sock.close()
        if report_fd is not None:
            with contextlib.suppress(OSError):
                os.close(report_fd)     # the domain reports; the CLI must see the pipe close if the domain dies
        os.set_inheritable(parent_sock.fileno(), True)
        dirs = json.dumps({k: str(v) for k, v in leaf.dirs.items()})
        try:
            os.execv(sys.executable, [sys.executable, "-m", "vmfork.toolstack.jail", "--jailer", str(pid),
                                      str(parent_sock.fileno()), run_dir, str(leaf.version), dirs])
        finally:
            os._exit(127)
    parent_sock.close()
    _unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET, "mount, IPC and network namespaces")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    return Jail(child_sock, leaf)


def _leave_cgroup(leaf: Any) -> None:
    """Move the jailer back to its original cgroups so only the domain counts against the leaf."""
    for leaf_dir in leaf.dirs.values():
        parent = leaf_dir.parent.parent
        with contextlib.suppress(OSError):
            (parent / "cgroup.procs").write_text(str(os.getpid()))


def _supervise(pid: int, sock: socket.socket, leaf: Any, run_dir: str) -> None:
    """The jailer: serve the domain's file requests until it ends, then clean up after it and exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda s, f: os.kill(pid, signal.SIGTERM))
    _leave_cgroup(leaf)
    broker = Broker(sock, run_dir)
    status = 0
    done = 0
    try:
        while True:
            try:
                ready, _, _ = select.select([sock], [], [], 1.0)
            except InterruptedError:
                continue
            if ready and not broker.serve_one():
                break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        if not done:
            _, status = os.waitpid(pid, 0)
        broker.after_exit(status, run_dir)
    finally:
        for _ in range(50):
            leaf.remove()
            if not any(d.exists() for d in leaf.dirs.values()):
                break
            select.select([], [], [], 0.02)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _jailer_main(argv: list[str]) -> None:
    from .jail_cgroup import CgroupLeaf
    pid, fd, run_dir, version, dirs = int(argv[0]), int(argv[1]), argv[2], int(argv[3]), json.loads(argv[4])
    leaf = CgroupLeaf(version, {k: Path(v) for k, v in dirs.items()})
    _supervise(pid, socket.socket(fileno=fd), leaf, run_dir)


# --- enter: after the domain has its resources, before the guest's first instruction ------------------------------

def _uid_for(domid: int, user: str | None) -> tuple[int, int]:
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise JailError(f"jail_user: no user named {user!r} on this host") from None
        if pw.pw_uid == 0:
            raise JailError(f"jail_user: {user!r} is root")
        return pw.pw_uid, pw.pw_gid
    first, count = JAIL_UID_RANGE
    env = os.environ.get(UID_RANGE_ENV)
    if env:
        try:
            a, b = (int(x) for x in env.split("-"))
        except ValueError:
            raise JailError(f"{UID_RANGE_ENV}={env!r}: expected FIRST-LAST") from None
        if not 0 < a <= b:
            raise JailError(f"{UID_RANGE_ENV}={env!r}: expected 0 < FIRST <= LAST")
        first, count = a, b - a + 1
    uid = first + domid % count
    return uid, uid


def _runtime_dirs() -> list[str]:
    """The Python runtime's directories (standard library, site-packages, vmfork's own package): bound read-only
    into the private root, since a Python VMM imports lazily (numpy's submodules on first use, a command's
    modules on first call). They hold code that is public anyway; nothing there is writable from the jail."""
    import sysconfig

    import vmfork
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib")}
    dirs.update(os.path.realpath(p) for p in vmfork.__path__)
    return sorted(d for d in dirs if os.path.isdir(d) and not any(d.startswith(o + os.sep) for o in dirs))


@dataclass
class Jail:
    """The domain's side of its jail."""

    sock: socket.socket
    leaf: Any
    uid: int = -1
    gid: int = -1
    staging: Path | None = None
    entered: bool = False
    limits: dict[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Ask the jailer (jail_files.Broker) for something; its reply, and a file descriptor if it sent one."""
        with self.lock:
            self.sock.sendall(json.dumps(msg).encode())
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 1)
        reply = json.loads(data or b"{}")
        return reply, (fds[0] if fds else None)

    def enter(self, domain: Domain, commands: dict[str, Command]) -> None:
        """Everything after the namespaces: limits, private root, uid, no_new_privs, seccomp (`commands`: the
        domain's QMP command table, whose file commands then take descriptors only)."""
        rec = domain.record
        cfg = domain.config
        assert rec is not None
        domid = rec.domid
        user = getattr(cfg, "jail_user", None) if cfg is not None else None
        cap = getattr(cfg, "cap", 0) if cfg is not None else 0
        self.uid, self.gid = _uid_for(domid, user)
        from .jail_cgroup import JailCgroupError
        try:
            self.leaf.limit(memory_bytes=(rec.memory + MEMORY_OVERHEAD_MIB) << 20, pids=PIDS_MAX,
                            cpu_percent=cap or 0)
        except JailCgroupError as e:
            raise JailError(f"{e}; {NO_JAIL_HINT}") from None
        self.limits = self.leaf.limits()
        run_dir = domain.rd.path
        self.staging = run_dir / f".jail-{domid}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(mode=0o700)
        os.chown(self.staging, self.uid, self.gid)
        reply, _ = self.request({"op": "hello", "domid": domid, "staging": str(self.staging)})
        root = reply["root"]
        self._close_other_fds(domain)
        self._build_root(root, domain)
        self._pivot(root)
        try:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        except OSError as e:
            raise JailError(f"the jail cannot switch to uid {self.uid}: {e.strerror}; {NO_JAIL_HINT}") from None
        keep_own_pagemap(_check)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        from ..jail_seccomp import install
        install(log_only=os.environ.get(SECCOMP_ENV) == "log")
        jail_file_commands(self, domain, commands)
        self.entered = True

    def _build_root(self, root: str, domain: Domain) -> None:
        """A tmpfs at `root` with the files the domain uses, each at its own absolute path."""
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        old_umask = os.umask(0o022)         # the root's directories: searchable by the jail's uid
        try:
            self._bind_all(root, domain)
        finally:
            os.umask(old_umask)

    def _bind_all(self, root: str, domain: Domain) -> None:

        def bind(src: str, *, readonly: bool, directory: bool = False) -> None:
            dst = root + os.path.abspath(src)
            os.makedirs(dst if directory else os.path.dirname(dst), mode=0o755, exist_ok=True)
            if not directory:
                with open(dst, "a"):
                    pass
            _mount(src, dst, None, MS_BIND)
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if readonly else 0)
            if not src.startswith("/dev/"):
                flags |= MS_NODEV
            _mount(None, dst, None, flags)

        bind("/dev/kvm", readonly=False)
        bind("/proc", readonly=True, directory=True)
        for d in _runtime_dirs():
            bind(d, readonly=True, directory=True)
        registry = str(domain.rd.registry)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(registry + suffix):
                bind(registry + suffix, readonly=False)
        assert self.staging is not None
        bind(str(self.staging), readonly=False, directory=True)
        cfg = domain.config
        for path in (getattr(cfg, "kernel", None), getattr(cfg, "ramdisk", None)):
            if path and os.path.isfile(path) and domain.kind == "create":
                bind(path, readonly=True)

    def _pivot(self, root: str) -> None:
        pivot_into(root, _check)

    def _close_other_fds(self, domain: Domain) -> None:
        """Keep the descriptors a domain uses (sockets, pipes, KVM's anonymous inodes, memfds, /dev/kvm, its
        registry and console log, stdio); close files opened from paths that it does not need any more."""
        keep_paths = {str(domain.rd.registry), f"{domain.rd.registry}-wal", f"{domain.rd.registry}-shm"}
        if domain.record is not None:
            keep_paths.add(domain.record.console_log)
        if os.environ.get("VMFORK_DOMAIN_STDERR"):
            keep_paths.add(os.path.abspath(os.environ["VMFORK_DOMAIN_STDERR"]))
        keep_fds = set()
        if domain.domfile is not None:
            keep_fds.add(domain.domfile.fd)     # its lock is the domain's liveness (domfile.py): held for life
        close_path_fds(keep_fds, keep_paths)


if __name__ == "__main__" and sys.argv[1:2] == ["--jailer"]:
    _jailer_main(sys.argv[2:])
