"""Running under AFL++: `afl-fuzz -i in -o out -t 200 -- vmfork fuzz --afl --kernel ... --budget-ms 400`.

vmfork plays AFL++'s fork server (the classic protocol): a 4-byte hello on fd 199, then per input a 4-byte request
read from fd 198, a 4-byte "child pid" written to 199, the run, and a 4-byte wait status written to 199. There is
no child process per input (the input runs in the fuzz fork, in this process): the pid given is that of a
placeholder process that AFL++ may kill on a timeout (it is replaced then; it dies with vmfork by
PR_SET_PDEATHSIG). Outcomes map to wait statuses: ok = exit 0; a fault vector = SIGSEGV (SIGILL for #UD, SIGFPE for
#DE); a sink or a triple fault = SIGABRT; a hang = SIGKILL. Give `--budget-ms` above AFL++'s `-t` so that AFL++'s
own timer sees hangs first.

Coverage goes into AFL++'s shared-memory map (`__AFL_SHM_ID`, `AFL_MAP_SIZE` or 64 KiB) as AFL-style edges
(hash(previous block) ^ hash(block)), from persistent block breakpoints of the `--cover` ranges: one exit per block
hit where the fuzz fork answers its breakpoints itself (traps.ForkTraps; a loop of a single covered block then
counts once per entry), two under the Debugger. The input comes
from the file named by `--afl-input` (AFL++'s `@@`), or else from stdin (AFL++'s `.cur_input`, read from offset 0).

SIGTERM and SIGKILL leave nothing behind: the machines are this process's own KVM file descriptors and memory, and
the placeholder process dies with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import struct
import subprocess
from collections.abc import Callable
from typing import Any

from .loop import Fuzzer, FuzzError, Result

__all__ = ["FORKSRV_FD", "AflMap", "serve_afl", "wait_status"]

FORKSRV_FD = 198
PR_SET_PDEATHSIG = 1
_SIGNAL_FOR_VECTOR = {0: signal.SIGFPE, 6: signal.SIGILL, 16: signal.SIGFPE, 19: signal.SIGFPE}


def wait_status(res: Result) -> int:
    """The waitpid() status AFL++ is told for an outcome (a signal number is "killed by that signal")."""
    if res.outcome in ("ok", "rejected"):
        return 0
    if res.outcome == "hang":
        return int(signal.SIGKILL)
    if res.kind == "vector" and res.vector is not None:
        return int(_SIGNAL_FOR_VECTOR.get(res.vector, signal.SIGSEGV))
    return int(signal.SIGABRT)


class AflMap:
    """AFL++'s coverage map (System V shared memory named by `__AFL_SHM_ID`), or a private one without it."""

    def __init__(self, shm_id: str | None = None, size: int | None = None) -> None:
        shm_id = os.environ.get("__AFL_SHM_ID") if shm_id is None else shm_id
        self.size = size or int(os.environ.get("AFL_MAP_SIZE", "65536") or 65536)
        self.mask = self.size - 1 if self.size & (self.size - 1) == 0 else None
        self.attached = False
        self.map: Any
        if shm_id:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.shmat.restype = ctypes.c_void_p
            libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
            addr = libc.shmat(int(shm_id), None, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise FuzzError(f"cannot attach AFL++'s shared memory {shm_id}: {os.strerror(ctypes.get_errno())}")
            self.map = (ctypes.c_ubyte * self.size).from_address(addr)
            self.attached = True
        else:
            self.map = (ctypes.c_ubyte * self.size)()
        self.prev = 0

    def hook(self) -> Callable[[int], None]:
        m, size = self.map, self.size

        def on_block(address: int) -> None:
            cur = ((address * 0x9E3779B1) >> 7) % size
            i = cur ^ self.prev
            m[i] = (m[i] + 1) & 0xFF
            self.prev = cur >> 1
        return on_block


def _placeholder() -> subprocess.Popen[bytes]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def die_with_parent() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=die_with_parent, close_fds=True)


def _read_input(path: str | None, limit: int) -> bytes:
    if path is not None:
        with open(path, "rb") as f:
            return f.read(limit)
    return os.pread(0, limit, 0)


def serve_afl(fz: Fuzzer, amap: AflMap, *, input_path: str | None = None, max_execs: int | None = None) -> int:
    """The fork-server loop; returns the number of inputs run when AFL++ closes the control pipe."""
    try:
        os.write(FORKSRV_FD + 1, b"\0\0\0\0")
    except OSError as e:
        raise FuzzError(f"not started by afl-fuzz (fd {FORKSRV_FD + 1}: {e.strerror})") from None
    child = _placeholder()
    limit = fz.capacity + 1
    execs = 0
    try:
        while max_execs is None or execs < max_execs:
            req = os.read(FORKSRV_FD, 4)
            if len(req) != 4:
                break
            if child.poll() is not None:            # AFL++ killed it on a timeout
                child = _placeholder()
            os.write(FORKSRV_FD + 1, struct.pack("<i", child.pid))
            amap.prev = 0
            res = fz.execute(_read_input(input_path, limit))
            os.write(FORKSRV_FD + 1, struct.pack("<i", wait_status(res)))
            execs += 1
    finally:
        child.kill()
        child.wait()
    return execs
