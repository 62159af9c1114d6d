"""Running under AFL++: `afl-fuzz -i in -o out -t 200 -- vmfork fuzz --afl --kernel ... --budget-ms 400`.

vmfork plays AFL++'s fork server (the classic protocol): a 4-byte hello on fd 199 (announcing the map size and
shared-memory test cases, below), then per input a 4-byte request read from fd 198, a 4-byte "child pid" written to
199, the run, and a 4-byte wait status written to 199. There is no child process per input (the input runs in the
fuzz fork, in this process), so the pid is always the same, and vmfork sends it ahead: once after the hello and then
in the same write as each status (afl-fuzz reads exactly four bytes each time, so the next request finds its pid
waiting). That is one write, one wake-up of afl-fuzz, per input instead of two. Right after that write vmfork
resets the fuzz fork for the next input (Fuzzer.reset_ahead), while afl-fuzz looks at the run and makes the next
input: the request then finds the fork ready, and only the input's write and the run are serial. The pid is that
of a placeholder child that has already exited and that vmfork does not reap while it serves: a zombie keeps its
pid from being reused, and AFL++'s kill() of it on a timeout does nothing (vmfork's own `--budget-ms` ends the
run). Outcomes map to wait statuses: ok = exit 0; a fault vector = SIGSEGV (SIGILL for #UD, SIGFPE for #DE); a
sink or a triple fault = SIGABRT; a hang = SIGKILL. Give `--budget-ms` above AFL++'s `-t` so that AFL++'s own
timer sees hangs first.

The input: when afl-fuzz offers shared-memory test cases (it sets `__AFL_SHM_FUZZ_ID`, AFL++ 3.0 and later) and no
`--afl-input` is given, the hello asks for them (FS_OPT_SHDMEM_FUZZ) and afl-fuzz answers with a 4-byte word on fd
198; each input is then a u32 length and the bytes in that System V segment, with no file write on afl-fuzz's side
and no read on vmfork's. Otherwise it comes from the file named by `--afl-input` (AFL++'s `@@`), or from stdin
(AFL++'s `.cur_input`, read from offset 0).

Coverage goes into AFL++'s shared-memory map (`__AFL_SHM_ID`, `AFL_MAP_SIZE` or 64 KiB) as AFL-style edges
(hash(previous block) ^ hash(block)), from persistent block breakpoints of the `--cover` ranges: one exit per block
hit where the fuzz fork answers its breakpoints itself (traps.ForkTraps; a loop of a single covered block then
counts once per entry), two under the Debugger.

A target compiled with its own edge map needs no breakpoints: `--afl-map ADDR:SIZE`, or `--afl-map auto` for the
map the target printed on its console before its ready marker as `afl-map=0x... size=0x...` (the jsmn example's
jsmn-afl-pvh.elf: gcc's -fsanitize-coverage=trace-pc callback in guests/jsmn/afl_cov.c counts AFL-style edges into
8 KiB of its .bss at 0x410000: a map no bigger than the target's edges need, since afl-fuzz, the copy and the reset
all pay per byte of it). The guest map must be zero in the parent paused at the ready marker; a fork's reset
then brings it back to zero before every input, so there is no clearing pass. Per input vmfork runs the fork
without any breakpoint (no exit but the markers) and then copies the guest's map into AFL++'s in one go (a read of
the fork's RAM, no exit). AFL++ zeroes its whole map before each run, so a guest map smaller than AFL++'s fills its
start; a larger one is refused (run afl-fuzz with AFL_MAP_SIZE set to the guest map's size).

The map size: the hello is AFL++'s options word (FS_OPT_ENABLED | FS_OPT_MAPSIZE, the size - 1 in bits 1-23, so up
to 8 MiB) announcing the size vmfork fills: the guest map's, else the one it hashes breakpoint edges into. afl-fuzz
then looks at only that much of its map, or, when the announced size is larger than its own (AFL_MAP_SIZE, default
64 KiB), stops with "Target's coverage map size of N is larger than ... set AFL_MAP_SIZE=N" (afl-fuzz only grows
its map to a target's in its pre-run map-size probe, which AFL_SKIP_BIN_CHECK skips, and vmfork needs that). vmfork
itself then ends too, with the same advice on its stderr, rather than write past AFL++'s map.

AFL++'s other tools: afl-tmin and `afl-showmap -i DIR` (so afl-cmin) are fork-server clients like afl-fuzz.
afl-showmap with one input is not: after a fork server of its own that only learns the map size, it runs its
target once by plain fork and exec, no pipe on fd 199, and expects what an instrumented program does when nothing
answers its hello: run normally, fill `__AFL_SHM_ID`'s map, end as the input ends. So with no fd 199 and an AFL++
map, vmfork runs one input (run_once: stdin, a file or a pipe, or --afl-input; the shared-memory test cases are
for a fork server only, even where their variable is still set) and ends with its status (end_as: killed by the
signal), after closing the target (cli.py). With neither, it is a one-line error.

SIGTERM and SIGKILL leave nothing behind: the machines are this process's own KVM file descriptors and memory, and
the placeholder process dies with it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import os
import re
import signal
import struct
import subprocess
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import MemoryAccessError
from .loop import Fuzzer, FuzzError, Result

__all__ = ["AUTO_MAP", "FORKSRV_FD", "AflInput", "AflMap", "GuestMap", "afl_map_arg", "end_as",
           "forkserver_present", "guest_map", "hello", "run_once", "serve_afl", "wait_status"]

FORKSRV_FD = 198
FS_OPT_ENABLED = 0x80000001         # AFL++'s fork-server options word: these bits say the hello carries options,
FS_OPT_MAPSIZE = 0x40000000         # this one that bits 1-23 hold the map size - 1
FS_OPT_SHDMEM_FUZZ = 0x01000000     # and this one that the fork server takes test cases from shared memory
FS_OPT_MAX_MAPSIZE = 1 << 23
SHM_FUZZ_ENV = "__AFL_SHM_FUZZ_ID"  # afl-fuzz's test-case segment: a u32 length, then up to MAX_FILE bytes
MAX_FILE = 1 << 20                  # AFL++'s config.h
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
            self.map = _attach(shm_id, self.size, "shared memory")
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


def _attach(shm_id: str, size: int, what: str) -> Any:
    """`size` bytes of the System V segment `shm_id` as a ctypes array (FuzzError naming it if shmat fails)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    try:
        ident = int(shm_id)
    except ValueError:
        raise FuzzError(f"AFL++'s {what} id {shm_id!r} is not a number") from None
    addr = libc.shmat(ident, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise FuzzError(f"cannot attach AFL++'s {what} {shm_id}: {os.strerror(ctypes.get_errno())}")
    return (ctypes.c_ubyte * size).from_address(addr)


class AflInput:
    """AFL++'s shared-memory test cases (`__AFL_SHM_FUZZ_ID`): a u32 length, then the input's bytes."""

    def __init__(self, shm_id: str) -> None:
        self.buf = memoryview(_attach(shm_id, MAX_FILE + 4, "test-case shared memory")).cast("B")

    def read(self, limit: int) -> bytes:
        n = min(int.from_bytes(self.buf[:4], "little"), limit, MAX_FILE)
        return self.buf[4:4 + n].tobytes()


class GuestMap(NamedTuple):
    """An edge map the target keeps in its own memory (guest-physical address and size in bytes)."""

    addr: int
    size: int


AUTO_MAP = GuestMap(-1, -1)         # --afl-map auto: the map the target printed at boot
_PRINTED_MAP = re.compile(rb"afl-map=(0x[0-9a-fA-F]+) size=(0x[0-9a-fA-F]+)")


def afl_map_arg(text: str) -> GuestMap:
    """argparse type of --afl-map: `auto` or ADDR:SIZE (numbers in any base int() takes with base 0)."""
    if text == "auto":
        return AUTO_MAP
    addr, sep, size = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or ADDR:SIZE (e.g. 0x410000:0x10000)")
    try:
        spec = GuestMap(int(addr, 0), int(size, 0))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ADDR and SIZE must be numbers") from None
    if spec.size <= 0 or spec.size & (spec.size - 1):          # said before anything boots
        raise argparse.ArgumentTypeError(f"{text!r}: SIZE must be a power of two")
    return spec


def guest_map(spec: GuestMap, parent: Any, console: bytes, what: str) -> GuestMap:
    """The guest map `spec` names (AUTO_MAP: the last `afl-map=... size=...` in `console`), checked against the
    parent's RAM and contents: FuzzError with one line saying what is wrong."""
    if spec == AUTO_MAP:
        found = list(_PRINTED_MAP.finditer(console))
        if not found:
            raise FuzzError(f"--afl-map auto: {what} printed no `afl-map=0x... size=0x...` line on its console "
                            "before its ready marker; give --afl-map ADDR:SIZE")
        spec = GuestMap(int(found[-1].group(1), 16), int(found[-1].group(2), 16))
    addr, size = spec
    if size <= 0 or size & (size - 1):
        raise FuzzError(f"--afl-map: the size {size:#x} is not a power of two (AFL-style edges index the map by a "
                        "hash masked to its size)")
    if addr < 0:
        raise FuzzError(f"--afl-map: the address {addr:#x} is negative")
    try:
        parent.memory.offset_of(addr, size)          # in one RAM slot: the per-input copy is one slice
    except MemoryAccessError as e:
        raise FuzzError(f"--afl-map {addr:#x}:{size:#x} is not inside the guest's RAM ({e})") from None
    if any(parent.memory.view(addr, size)):
        raise FuzzError(f"--afl-map {addr:#x}:{size:#x} is not zero in the parent at its ready marker: every input "
                        "would start with those counts (is it the target's map, and untouched before the marker?)")
    return spec


def hello(map_size: int, *, shmem_input: bool = False) -> bytes:
    """The fork server's hello: AFL++'s options word announcing `map_size` (a size the word cannot carry announces
    none) and, with `shmem_input`, asking for shared-memory test cases; the classic four zero bytes when it would
    say nothing."""
    word = FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ if shmem_input else 0
    if 2 <= map_size <= FS_OPT_MAX_MAPSIZE:
        word |= FS_OPT_ENABLED | FS_OPT_MAPSIZE | (map_size - 1) << 1
    return struct.pack("<I", word)


def forkserver_present() -> bool:
    """Whether a fork-server pipe is open on fd 199 (afl-fuzz, afl-tmin and afl-showmap -i give one; afl-showmap
    with one input runs its target once without it, after a fork server of its own only told it the map size)."""
    try:
        os.fstat(FORKSRV_FD + 1)
    except OSError:
        return False
    return True


def run_once(fz: Fuzzer, amap: AflMap, *, input_path: str | None = None, guest: GuestMap | None = None) -> int:
    """One input without a fork server, as an AFL-instrumented program runs when nothing answers its hello: the
    input from `input_path` (AFL++'s @@) or stdin to its end (a file or a pipe; never the shared-memory test cases,
    which only a fork server is given), its edges into AFL++'s map, and its wait status to end with (end_as()).
    FuzzError when there is no AFL++ map either: then no AFL++ tool started vmfork."""
    if not amap.attached:
        raise FuzzError(f"not started by an AFL++ tool (no fork-server pipe on fd {FORKSRV_FD + 1} and no "
                        "__AFL_SHM_ID): run it under afl-fuzz, afl-showmap, afl-tmin or afl-cmin; `vmfork fuzz "
                        "--replay FILE` runs one input alone")
    limit = fz.capacity + 1
    if input_path is not None:
        data = _read_input(input_path, limit)
    else:
        try:
            data = os.pread(0, limit, 0)
        except OSError:                  # a pipe: no offsets, read it to its end
            with os.fdopen(os.dup(0), "rb") as stdin:
                data = stdin.read(limit)
    amap.prev = 0
    res = fz.execute(data)
    if guest is not None:
        memoryview(amap.map).cast("B")[:guest.size] = fz.fork.memory.view(guest.addr, guest.size)
    return wait_status(res)


def end_as(status: int) -> int:
    """End this process with the wait status `status` (run_once's): exit code 0, or killed by that signal, so
    that AFL++'s tools see the crash or hang they would see from an instrumented program (afl-showmap's
    child_crashed, afl-cmin's crash filter). Returns an exit code only if the signal did not end the process."""
    if status == 0:
        return 0
    if status != signal.SIGKILL:
        signal.signal(status, signal.SIG_DFL)       # no handler of Python's (faulthandler's) in between
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [status])
    os.kill(os.getpid(), status)
    return 128 + status


def _placeholder() -> subprocess.Popen[bytes]:
    """A child that exits at once and stays a zombie (not reaped until serve_afl ends): its pid is the "child pid"
    AFL++ is given, which no other process can take and whose kill() does nothing. A zombie left by a vmfork that
    was killed is reaped by whoever inherits it."""
    child = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)     # exited, and still unreaped
    return child


def _read_input(path: str | None, limit: int) -> bytes:
    if path is not None:
        with open(path, "rb") as f:
            return f.read(limit)
    return os.pread(0, limit, 0)


def serve_afl(fz: Fuzzer, amap: AflMap, *, input_path: str | None = None, max_execs: int | None = None,
              guest: GuestMap | None = None) -> int:
    """The fork-server loop; returns the number of inputs run when AFL++ closes the control pipe. `guest`: the
    target's own edge map (guest_map()), copied into AFL++'s after every input."""
    filled = guest.size if guest is not None else amap.size
    shm = memoryview(amap.map).cast("B")
    shm_input = os.environ.get(SHM_FUZZ_ENV) if input_path is None else None
    try:
        os.write(FORKSRV_FD + 1, hello(filled, shmem_input=bool(shm_input)))
    except OSError as e:
        raise FuzzError(f"not started by afl-fuzz (fd {FORKSRV_FD + 1}: {e.strerror})") from None
    if filled > amap.size:
        # afl-fuzz has the announced size by now and stops naming AFL_MAP_SIZE; the guest map must not be copied
        # past the end of AFL++'s (and an AFL that ignores the announcement learns it from this exit)
        raise FuzzError(f"the guest's edge map ({filled} bytes) is larger than AFL++'s ({amap.size}): run "
                        f"afl-fuzz with AFL_MAP_SIZE={filled}")
    limit = fz.capacity + 1
    read_input: Callable[[], bytes]
    if shm_input:
        if len(os.read(FORKSRV_FD, 4)) != 4:          # afl-fuzz's yes to shared-memory test cases
            return 0
        read_input = functools.partial(AflInput(shm_input).read, limit)
    else:
        read_input = functools.partial(_read_input, input_path, limit)
    child = _placeholder()
    pid = struct.pack("<i", child.pid)
    statuses = {s: struct.pack("<i", s) + pid for s in (0, *map(int, signal.Signals))}
    write, read, execute, reset_ahead = os.write, os.read, fz.execute, fz.reset_ahead
    status_fd = FORKSRV_FD + 1
    execs = 0
    try:
        write(status_fd, pid)                       # the first request's "child pid", sent ahead
        reset_ahead()
        while max_execs is None or execs < max_execs:
            if len(read(FORKSRV_FD, 4)) != 4:
                break
            amap.prev = 0
            res = execute(read_input())
            if guest is not None:
                # the fork that ran it (a crashed one is replaced only at the next input); AFL++ zeroed its whole
                # map before this run, so a smaller guest map leaves the rest zero
                shm[:guest.size] = fz.fork.memory.view(guest.addr, guest.size)
            write(status_fd, statuses[wait_status(res)])    # this status and the next request's pid, one write
            execs += 1
            reset_ahead()           # while afl-fuzz looks at this run and makes the next input
    finally:
        child.wait()
    return execs
