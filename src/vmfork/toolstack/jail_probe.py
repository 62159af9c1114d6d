"""A test-only QMP command that tries to break out of the jail from inside the domain process.

Registered only when the environment variable VMFORK_JAIL_TEST is set in the domain's environment (the jail tests
set it); without it the module adds nothing. `vmfork-jail-probe {"action": A}`:

    status          /proc/self/status's Uid, Gid, NoNewPrivs, Seccomp and the cgroup limits, plus whether
                    /etc/shadow, /etc/passwd and the host's root are visible
    open-shadow     open("/etc/shadow")             -> the errno it fails with
    tcp-socket      socket(AF_INET, SOCK_STREAM)    -> EPERM
    ptrace          ptrace(PTRACE_ATTACH, 1)        -> SIGSYS (the process is killed)
    execve          execve("/bin/sh")               -> SIGSYS
    forbidden       personality(0xffffffff), a call outside the list -> SIGSYS
    write-outside   {"path": P}: create P directly (open O_CREAT), then ask the jailer to write it for the domain
                    (the requests an older jailer served: "deliver" a staged file to P, "fetch" P) -> every one
                    refused; the results of each

Each attempt is noted in the domain's console log first, so a killed domain leaves the line of what it tried.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import Any

from .jail import TEST_ENV

_libc = ctypes.CDLL(None, use_errno=True)
SYS_PTRACE, SYS_PERSONALITY = 101, 135


def _errno_of(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except OSError as e:
        return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno or 0, str(e.errno))}
    return {"ok": True}


def _status(d: Any) -> dict[str, Any]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "NoNewPrivs", "Seccomp", "CapEff", "Groups"):
                fields[key] = value.split()
    jail = getattr(d, "jail", None)
    return {"status": fields, "jailed": bool(jail is not None and jail.entered),
            "limits": jail.limits if jail is not None else None,
            "root": sorted(os.listdir("/")), "shadow_visible": os.path.exists("/etc/shadow")}


def _write_outside(d: Any, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"open": _errno_of(lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)))}
    jail = getattr(d, "jail", None)
    if jail is None or jail.staging is None:
        return out
    staged = jail.staging / "probe-out"
    with open(staged, "wb") as f:
        f.write(b"VMFKSAVE written by a jailed domain")
    for op, msg in (("deliver", {"src": str(staged), "dst": path}), ("fetch", {"path": path}),
                    ("rotate-log", {"path": path})):
        reply, fd = jail.request({"op": op, **msg})
        if fd is not None:
            os.close(fd)
        out[op] = reply
    return out


def _syscall(nr: int, *args: int) -> dict[str, Any]:
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    e = ctypes.get_errno()
    return {"ok": ret >= 0, "errno": e if ret < 0 else 0}


ACTIONS = {
    "open-shadow": lambda d: _errno_of(lambda: os.close(os.open("/etc/shadow", os.O_RDONLY))),
    "tcp-socket": lambda d: _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "ptrace": lambda d: _syscall(SYS_PTRACE, 16, 1, 0, 0),
    "execve": lambda d: _errno_of(lambda: os.execv("/bin/sh", ["sh", "-c", "true"])),
    "forbidden": lambda d: _syscall(SYS_PERSONALITY, 0xFFFFFFFF),
}


if os.environ.get(TEST_ENV):
    from .domain import qmp_command
    from .qmp import ArgSpec, QmpError

    @qmp_command("vmfork-jail-probe", action=ArgSpec(str, True), path=ArgSpec(str),
                 help="(tests only) try something the jail must refuse, from inside the domain process")
    def _probe(d: Any, conn: Any, args: dict[str, Any]) -> Any:
        action = args["action"]
        if action == "status":
            return _status(d)
        fn = ACTIONS.get(action)
        if action == "write-outside":
            def fn(d: Any) -> dict[str, Any]:
                return _write_outside(d, args.get("path", "/tmp/vmfork-jail-probe"))
        if fn is None:
            raise QmpError(f"unknown action {action!r} (known: status, {', '.join(ACTIONS)})")
        if d.console is not None:
            d.console.write(f"\r\n[vmfork: jail probe: {action}]\r\n".encode())
        result: dict[str, Any] = fn(d)
        if d.console is not None:
            d.console.write(f"\r\n[vmfork: jail probe: {action}: {result}]\r\n".encode())
        return result
