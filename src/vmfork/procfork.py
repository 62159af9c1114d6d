"""Process-isolated forks: every fork runs in a worker process of its own, so a fork that crashes, is killed or
corrupts its process cannot touch its parent or its siblings.

    from vmfork.procfork import fork_process
    handle = fork_process(parent)          # parent: a paused vmfork.fork.VM
    handle.memory_write(addr, data)
    event = handle.run(timeout=5)
    handle.reset()
    handle.destroy()

How it works:

- A KVM VM fd only works in the process that created it, so each worker builds its own VM shell (VM, vCPUs,
  irqchip, PIT, memory slots with dirty logging). That costs 10-20 ms plus the Python start-up, so workers are
  started ahead of time: `WorkerPool` keeps idle workers per machine shape, each with its shell built, and refills
  in the background.
- Forking sends the parent's frozen RAM (`GuestMemory.freeze()`: a base memfd plus sparse layer memfds) to an idle
  worker with SCM_RIGHTS, together with the parent's `MachineState` in its binary form. The worker maps the files
  copy-on-write at its slots (`GuestMemory.fork_of`) and builds the machine the way `fork.VM._spawn` does.
- The parent stays paused and its RAM read-only while process forks live, with the same bookkeeping as in-process
  forks (`parent.children`, `parent.memory.readonly`); a `ProcessFork` handle stands in the parent's children.
- Every operation on a fork is a request over a private socketpair, one at a time per handle: a message is a
  12-byte header (payload length, number of file descriptors) and a pickled payload. Pickle is used only between
  the VMM and the workers it started; payloads are plain dicts of builtin values.
- A worker that dies (kill -9, OOM killer) is noticed on the next request or by `alive()`: the handle becomes
  "dead", is reaped and unlinked from its parent, and reports how the process ended.
- Workers get SIGKILL when the VMM dies (PR_SET_PDEATHSIG). That signal follows the *thread* that started the
  child, so all workers are started by one launcher thread that lives as long as the process.
"""

from __future__ import annotations

import array
import atexit
import builtins
import ctypes
import dataclasses
import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import errors
from .devices import DeviceSetState
from .errors import ForkError, VmforkError, VmStateError
from .fork import DirtyLog, _linux_where_kernel_mode_is_emulated, dirty_log_mode, register_process_forker
from .kvm.structs import GPR_NAMES
from .memlimit import MemoryCgroup
from .memory import MemoryImage, describe_image, image_from_description
from .vm import MachineShape, MachineState, StopEvent, destroy_forks_first

if TYPE_CHECKING:
    from .fork import VM

LaunchDm = Literal["yes", "no", "late"]

# The worker pauses its guest when it gets this signal (used when another thread of the VMM is blocked in a
# run()/wait() request on the same handle and pause() or destroy() must not wait for it).
PAUSE_SIGNAL = signal.SIGUSR1

_HEADER = struct.Struct("<QI")          # payload bytes, file descriptors attached
_MAX_FDS = 253                          # SCM_MAX_FD
_ANC_SIZE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_SRC_DIR = str(Path(__file__).resolve().parents[1])

T = TypeVar("T")


# --- messages ---------------------------------------------------------------------------------------------------

class _Channel:
    """Length-prefixed messages with optional file descriptors over a connected AF_UNIX stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, msg: object, fds: Sequence[int] = ()) -> None:
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(fds) > _MAX_FDS:
            raise ForkError(f"cannot pass {len(fds)} file descriptors in one message (at most {_MAX_FDS})")
        header = _HEADER.pack(len(payload), len(fds))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([header, payload], anc)
        if sent < len(header):
            self.sock.sendall(header[sent:])
            sent = len(header)
        if sent - len(header) < len(payload):
            self.sock.sendall(memoryview(payload)[sent - len(header):])

    def recv(self) -> tuple[Any, list[int]]:
        """The next message and the file descriptors that came with it (close-on-exec, owned by the caller).
        EOFError when the other end is gone."""
        fds: list[int] = []
        try:
            nbytes, nfds = _HEADER.unpack(self._read(_HEADER.size, fds))
            payload = self._read(nbytes, fds)
            if len(fds) != nfds:
                raise ForkError(f"a message carried {len(fds)} file descriptors, its header says {nfds}")
            return pickle.loads(payload), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _read(self, n: int, fds: list[int]) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k, anc, flags, _ = self.sock.recvmsg_into([view[got:]], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(data[:len(data) - len(data) % received.itemsize])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise ForkError("file descriptors were lost in transit (control message truncated)")
            if k == 0:
                raise EOFError("the other end closed the connection")
            got += k
        return buf

    def close(self) -> None:
        self.sock.close()


def _error_payload(e: BaseException) -> dict[str, Any]:
    simple = (int, float, str, bytes, bool, type(None))
    args = e.args if all(isinstance(a, simple) for a in e.args) else (str(e),)
    attrs = {k: v for k, v in getattr(e, "__dict__", {}).items() if isinstance(v, simple)}
    return {"module": type(e).__module__, "name": type(e).__qualname__, "args": args, "attrs": attrs,
            "message": str(e)}


def _rebuild_error(err: dict[str, Any], where: str) -> Exception:
    """The exception a worker raised, as the same class with the same message (vmfork errors and builtins)."""
    cls: object = None
    if err["module"] == "vmfork.errors":
        cls = getattr(errors, err["name"], None)
    elif err["module"] == "builtins":
        cls = getattr(builtins, err["name"], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        e = cls.__new__(cls)
        e.args = tuple(err["args"])
        for k, v in err["attrs"].items():
            setattr(e, k, v)
    else:
        e = ForkError(f"{err['name']}: {err['message']}")
    e.add_note(f"(raised in {where})")
    return e


def _event_payload(ev: StopEvent) -> tuple[str, int | None, int | None, str]:
    return (ev.reason, ev.status, ev.vcpu, ev.detail)


def _image_payload(image: MemoryImage) -> tuple[dict[str, Any], list[int]]:
    return describe_image(image)


def _image_from_payload(desc: dict[str, Any], fds: list[int]) -> MemoryImage:
    try:
        return image_from_description(desc, fds)
    except VmforkError as e:
        raise ForkError(str(e)) from None


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# --- starting workers ---------------------------------------------------------------------------------------------

class _Launcher:
    """The one thread that starts worker processes. PR_SET_PDEATHSIG signals a child when the *thread* that
    created it exits, so workers must come from a thread that lives as long as the VMM process."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="vmfork-procfork-launcher", daemon=True)
                self._thread.start()
        return fut

    def _main(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)


_launcher = _Launcher()


class _Worker:
    """A started worker process that is not a fork yet."""

    def __init__(self, proc: subprocess.Popen[bytes], chan: _Channel, shape: MachineShape, dirty_ring: bool) -> None:
        self.proc = proc
        self.chan = chan
        self.shape = shape
        self.dirty_ring = dirty_ring            # its shell logs into dirty rings (else bitmaps)
        self.ready = False
        self._ready_lock = threading.Lock()     # prefill() and take() may both wait for the same worker
        self.busy = threading.Lock()            # held for a request in flight (a spawn, or a prepare ahead of one)
        self.prepared: str | None = None        # the WorkerPool.prefer() key this worker got ready for

    def wait_ready(self) -> None:
        """Block until the worker has built its VM shell."""
        with self._ready_lock:
            self._wait_ready()

    def _wait_ready(self) -> None:
        if self.ready:
            return
        try:
            msg, fds = self.chan.recv()
        except (OSError, EOFError):
            rc = self._reap(1.0)
            status = "is still running" if rc is None else _describe_status(rc)
            raise ForkError(f"fork worker (pid {self.proc.pid}) failed to start: {status}") from None
        for fd in fds:
            os.close(fd)
        if "error" in msg:
            raise _rebuild_error(msg["error"], f"fork worker pid {self.proc.pid} while building its VM")
        self.ready = True

    def _reap(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def discard(self) -> None:
        self.chan.close()
        self.proc.kill()
        self.proc.wait()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _SRC_DIR if not path else f"{_SRC_DIR}{os.pathsep}{path}"
    return env


def _launch(shape: MachineShape, dirty_ring: bool) -> _Worker:
    """Start a worker process for `shape` whose shell logs into dirty rings or bitmaps (runs on the launcher
    thread)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmfork.procfork", "--worker", str(theirs.fileno()), str(shape.memory_mib),
             str(shape.vcpus), str(os.getpid()), shape.cpuid, "ring" if dirty_ring else "bitmap"],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return _Worker(proc, _Channel(ours), shape, dirty_ring)


class WorkerPool:
    """Idle workers of one machine shape and dirty-log mode, each with its VM shell built, refilled in the
    background to `target`. The mode is fixed when a shell is made (KVM enables dirty rings before the first vCPU),
    so forks that need bitmaps (fork.dirty_log_mode: Linux where kernel mode is emulated) have a pool of their own
    and ordinary guests keep the pre-started ring workers."""

    def __init__(self, shape: MachineShape, *, target: int = 2, dirty_ring: bool = True) -> None:
        self.shape = shape
        self.dirty_ring = dirty_ring
        self.target = target
        self._idle: deque[_Worker] = deque()
        self._starting = 0
        self._lock = threading.Lock()
        self._closed = False
        self.started = 0
        self.cold = 0
        self.prepared_spawns = 0        # forks made from a worker prepared ahead (prefer())
        self._prefer: tuple[str, dict[str, Any], list[int], bytes] | None = None
        self._prepare_queue: SimpleQueue[_Worker | None] = SimpleQueue()
        self._preparer: threading.Thread | None = None
        self._prefer_parent: Callable[[], VM | None] = lambda: None

    def prefer(self, key: str, image: dict[str, Any], fds: list[int], state_bytes: bytes, parent: VM) -> None:
        """Have idle workers get ready, in the background, to become forks of this image and state (`key` names
        the pair): each maps the image and loads the state's clock-free parts, as fork.ShellPool does for
        in-process forks, so a spawn that names `key` only finishes the machine."""
        with self._lock:
            if self._prefer is not None and self._prefer[0] == key:
                return
            self._prefer = (key, image, list(fds), state_bytes)
            self._prefer_parent = weakref.ref(parent)       # its files are only valid while it lives
            todo = [w for w in self._idle if w.prepared != key]
        for w in todo:
            self._prepare_queue.put(w)
        self._ensure_preparer()

    def _ensure_preparer(self) -> None:
        with self._lock:
            if self._preparer is None and not self._closed:
                self._preparer = threading.Thread(target=self._prepare_loop, name="vmfork-procfork-preparer",
                                                  daemon=True)
                self._preparer.start()

    def _prepare_loop(self) -> None:
        while True:
            worker = self._prepare_queue.get()
            if worker is None:
                return
            with worker.busy:
                with self._lock:
                    prefer = self._prefer
                    idle = worker in self._idle
                    parent = self._prefer_parent()
                if parent is None or parent.state == "destroyed":
                    with self._lock:
                        self._prefer = None
                    continue
                if not idle or prefer is None or worker.prepared == prefer[0]:
                    continue
                key, image, fds, state_bytes = prefer
                try:
                    worker.wait_ready()
                    worker.chan.send({"op": "prepare", "key": key, "image": image, "state_bytes": state_bytes}, fds)
                    reply, rfds = worker.chan.recv()
                    for fd in rfds:
                        os.close(fd)
                    ok = "error" not in reply
                except (OSError, EOFError, VmforkError):
                    ok = False
                if ok:
                    worker.prepared = key
                    continue
                with self._lock:
                    mine = worker in self._idle
                    if mine:
                        self._idle.remove(worker)
            if mine:
                worker.discard()

    def take(self, key: str | None = None) -> _Worker:
        """A worker whose shell is built: one prepared for `key` if there is one, else the oldest idle one, else
        one started now (cold, hundreds of ms)."""
        while True:
            with self._lock:
                if self._closed:
                    raise ForkError("the worker pool is closed")
                worker = next((w for w in self._idle if key is not None and w.prepared == key), None)
                if worker is not None:
                    self._idle.remove(worker)
                else:
                    worker = self._idle.popleft() if self._idle else None
            cold = worker is None
            if worker is None:
                self.cold += 1
                worker = self._launch_now()
            self._refill()
            try:
                worker.wait_ready()
                return worker
            except VmforkError:
                worker.discard()
                if cold:
                    raise

    def _launch_now(self) -> _Worker:
        self.started += 1
        return _launcher.submit(lambda: _launch(self.shape, self.dirty_ring)).result()

    def _refill(self) -> None:
        with self._lock:
            need = self.target - len(self._idle) - self._starting
            if need <= 0 or self._closed:
                return
            self._starting += need
        for _ in range(need):
            _launcher.submit(self._launch_idle)

    def _launch_idle(self) -> None:
        try:
            self.started += 1
            worker = _launch(self.shape, self.dirty_ring)
        finally:
            with self._lock:
                self._starting -= 1
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                prepare: bool | None = self._prefer is not None
            else:
                prepare = None
        if prepare is None:
            worker.discard()
        elif prepare:
            self._prepare_queue.put(worker)
            self._ensure_preparer()

    def prefill(self, n: int) -> None:
        """Make sure at least n idle workers exist and have built their shells (synchronously)."""
        with self._lock:
            need = n - len(self._idle) - self._starting
            self._starting += max(0, need)
        futures = [_launcher.submit(self._launch_idle) for _ in range(need)]
        for f in futures:
            f.result()
        while True:
            with self._lock:
                if len(self._idle) >= n or self._closed or self._starting == 0:
                    idle = list(self._idle)
                    break
            time.sleep(0.005)
        for w in idle:
            try:
                w.wait_ready()
            except VmforkError:
                with self._lock:
                    mine = w in self._idle
                    if mine:
                        self._idle.remove(w)
                if mine:
                    w.discard()

    def ready(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Stop the idle workers (forks already made are not affected)."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
        self._prepare_queue.put(None)
        for w in idle:
            with w.busy:
                w.discard()


_pools: dict[tuple[MachineShape, bool], WorkerPool] = {}
_pools_lock = threading.Lock()


def worker_pool(shape: MachineShape, *, dirty_ring: bool = True) -> WorkerPool:
    """The pool of workers of this shape whose shells log into dirty rings (`dirty_ring`) or bitmaps."""
    with _pools_lock:
        pool = _pools.get((shape, dirty_ring))
        if pool is None:
            pool = _pools[(shape, dirty_ring)] = WorkerPool(shape, dirty_ring=dirty_ring)
        return pool


@atexit.register
def _close_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


# --- the parent-side handle -------------------------------------------------------------------------------------

class ProcessFork:
    """A fork running in a worker process. Offers the operations of an in-process fork as requests to it.

    `state`: "paused", "running", "crashed" (the guest crashed; reset or destroy it), "destroyed", or "dead" (the
    worker process ended without being asked to: every request then raises ForkError saying how)."""

    def __init__(self, worker: _Worker, name: str, *, parent: VM | ProcessFork, launch_dm: LaunchDm,
                 block_interrupts: bool) -> None:
        self.name = name
        self.shape = worker.shape
        self.pid = worker.proc.pid
        self.parent: VM | ProcessFork | None = parent
        self.children: list[ProcessFork] = []
        self.launch_dm = launch_dm
        self.irqs_blocked = block_interrupts
        self.stop_event: StopEvent | None = None
        self._proc = worker.proc
        self._chan = worker.chan
        self._lock = threading.RLock()
        self._state = "paused"
        self._death: str | None = None
        self._fork_count = 0
        self.cgroup: MemoryCgroup | None = None   # set when the fork has a memory limit
        self.spawn_us = 0.0         # time the worker took to build the machine (for benchmarks)
        # how its worker's machine tracks written pages and resets (fork.dirty_log_mode); its forks do the same
        self.dirty_ring = worker.dirty_ring
        self.flush_translations_on_reset = False

    @property
    def state(self) -> str:
        return self._state

    def __repr__(self) -> str:
        return f"<ProcessFork {self.name} pid {self.pid} {self._state}>"

    def __enter__(self) -> ProcessFork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy(tree=True)

    # --- requests -----------------------------------------------------------------------------------------------

    def _call(self, op: str, fds: Sequence[int] = (), **args: Any) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self._state == "destroyed":
                raise VmStateError(f"{self.name} is destroyed")
            if self._state == "dead":
                raise ForkError(self._death)
            try:
                self._chan.send({"op": op, **args}, fds)
                if op == "run":
                    self._state = "running"
                reply, rfds = self._chan.recv()
            except (OSError, EOFError):
                raise self._mark_dead() from None
            self._state = reply.get("state", self._state)
            if "error" in reply:
                for fd in rfds:
                    os.close(fd)
                raise _rebuild_error(reply["error"], f"process fork {self.name} (pid {self.pid})")
            return reply, rfds

    def _mark_dead(self) -> ForkError:
        """The worker is gone (or its connection is): reap it, release everything, unlink from the parent."""
        with self._lock:
            if self._state != "dead":
                rc = self._proc.poll()
                if rc is None:
                    try:
                        rc = self._proc.wait(2.0)
                    except subprocess.TimeoutExpired:   # alive but unreachable: unusable, so end it
                        self._proc.kill()
                        rc = self._proc.wait()
                self._death = f"fork {self.name} (pid {self.pid}) died: {_describe_status(rc)}"
                if self.cgroup is not None:
                    if self.cgroup.oom_kills():
                        self._death += (f" (out of memory: it reached its memory limit of "
                                        f"{self.cgroup.limit_bytes >> 20} MiB)")
                    self.cgroup.remove()
                    self.cgroup = None
                self._state = "dead"
                self._chan.close()
                self._detach()
            return ForkError(self._death)

    def _event(self, reply: dict[str, Any]) -> StopEvent:
        ev = StopEvent(*reply["event"])
        self.stop_event = ev
        return ev

    def _interrupt(self) -> None:
        """Ask the worker to pause its guest now, without a request (another thread holds the handle's lock)."""
        if self._state not in ("dead", "destroyed"):
            self._proc.send_signal(PAUSE_SIGNAL)    # does nothing once the process has been reaped

    def _acquire_interrupting(self) -> None:
        """Take the handle's lock, pausing the guest of a request that holds it (run() or wait() in another
        thread) so this does not wait for the guest."""
        while not self._lock.acquire(timeout=0.05):
            self._interrupt()

    def alive(self) -> bool:
        """Whether the worker process still runs; notices (and cleans up after) a worker that died."""
        if self._state in ("dead", "destroyed"):
            return False
        if self._proc.poll() is None:
            return True
        if self._lock.acquire(blocking=False):
            try:
                self._mark_dead()
            finally:
                self._lock.release()
        return False

    # --- run control --------------------------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> StopEvent:
        """Run until the guest stops (or `timeout` seconds: a "timeout" event, the fork paused)."""
        reply, _ = self._call("run", timeout=timeout)
        return self._event(reply)

    def start(self) -> None:
        """Start the guest and return at once; `wait()` or `pause()` later."""
        self._call("start")

    def wait(self, timeout: float | None = None, *, pause_on_timeout: bool = False) -> StopEvent:
        """Wait for a started fork to stop; a "timeout" event after `timeout` seconds (pausing it if asked)."""
        reply, _ = self._call("wait", timeout=timeout, pause_on_timeout=pause_on_timeout)
        return self._event(reply)

    def pause(self) -> StopEvent:
        """Stop the guest at a consistent point, also when another thread is blocked in run() or wait()."""
        self._acquire_interrupting()
        try:
            reply, _ = self._call("pause")
            return self._event(reply)
        finally:
            self._lock.release()

    def reset(self, *, memory: bool = True, state: bool = True) -> int:
        """Back to the fork-time state (see fork.VM.reset); returns the number of pages restored."""
        reply, _ = self._call("reset", memory=memory, state=state)
        return int(reply["pages"])

    # --- memory and state ---------------------------------------------------------------------------------------

    def memory_read(self, gpa: int, n: int) -> bytes:
        reply, _ = self._call("read", gpa=gpa, n=n)
        return bytes(reply["data"])

    def memory_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest RAM (tracked: the next reset undoes it)."""
        self._call("write", gpa=gpa, data=bytes(data))

    def get_regs(self, vcpu: int = 0) -> dict[str, int]:
        """The general-purpose registers, RIP and RFLAGS of a vCPU, by name."""
        reply, _ = self._call("get_regs", vcpu=vcpu)
        return dict(reply["regs"])

    def set_regs(self, values: dict[str, int], vcpu: int = 0) -> None:
        """Change some general-purpose registers (names as in get_regs())."""
        unknown = sorted(set(values) - set(GPR_NAMES))
        if unknown:
            raise VmStateError(f"unknown registers: {', '.join(unknown)}")
        self._call("set_regs", vcpu=vcpu, values=dict(values))

    def console(self) -> bytes:
        """The serial console's output buffer (empty without a device model)."""
        reply, _ = self._call("console")
        return bytes(reply["data"])

    def feed_console(self, data: bytes) -> None:
        """Input for the guest's serial console."""
        self._call("feed_console", data=bytes(data))

    def capture(self) -> MachineState:
        """The fork's complete machine state (it must be paused)."""
        reply, _ = self._call("capture")
        return MachineState.from_bytes(reply["state_bytes"])

    def ping(self) -> None:
        """A request that does nothing (a health check; also measures the request round trip)."""
        self._call("ping")

    # --- forks of this fork -------------------------------------------------------------------------------------

    def fork(self, *, name: str | None = None, block_interrupts: bool = False, launch_dm: LaunchDm = "yes",
             device_state: DeviceSetState | None = None, console_log: str | None = None) -> ProcessFork:
        """A process fork of this process fork: the worker freezes its RAM into a layer file and hands the
        image and its state over; a new worker maps them. This fork then stays paused until that one is
        destroyed."""
        _check_launch_dm(launch_dm)
        self._fork_count += 1
        child_name = name or f"{self.name}-fork-{self._fork_count}"
        reply, fds = self._call("freeze", child=child_name)
        try:
            state_bytes: bytes = reply["state_bytes"]
            if device_state is not None:
                st = MachineState.from_bytes(state_bytes)
                state_bytes = dataclasses.replace(st, devices=device_state).to_bytes()
            handle = _spawn(self.shape, child_name, reply["image"], fds, state_bytes, parent=self,
                            launch_dm=launch_dm, block_interrupts=block_interrupts, console_log=console_log,
                            dirty_ring=self.dirty_ring, flush_translations=self.flush_translations_on_reset)
        except BaseException:
            try:
                self._call("release", child=child_name)
            except VmforkError:
                pass
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self.children.append(handle)
        return handle

    def _release_child(self, name: str) -> None:
        if self._state in ("dead", "destroyed"):
            return
        try:
            self._call("release", child=name)
        except VmforkError:
            pass

    # --- teardown -----------------------------------------------------------------------------------------------

    def destroy(self, *, tree: bool = False) -> None:
        """End the worker process (and with `tree=True` the forks of this fork first). A fork with live forks is
        refused otherwise. Destroying a dead fork only unlinks it."""
        if self._state == "destroyed":
            return
        destroy_forks_first(self, tree=tree)
        if self._state == "dead":
            return
        self._acquire_interrupting()
        try:
            if self._state not in ("dead", "destroyed"):
                self._state = "destroyed"
                self._chan.close()
                self._proc.kill()
                self._proc.wait()
                if self.cgroup is not None:
                    self.cgroup.remove()
                    self.cgroup = None
        finally:
            self._lock.release()
        self._detach()

    def _detach(self) -> None:
        """Unlink from the parent; the parent's RAM becomes writable again when its last fork goes."""
        parent = self.parent
        if parent is None:
            return
        self.parent = None
        if self in parent.children:
            parent.children.remove(self)  # type: ignore[arg-type]
        if isinstance(parent, ProcessFork):
            parent._release_child(self.name)
        elif not parent.children:
            parent.memory.readonly = None


def _check_launch_dm(launch_dm: str) -> None:
    if launch_dm not in ("yes", "no", "late"):
        raise ForkError(f"launch_dm must be yes, no or late, not {launch_dm!r}")


def _spawn(shape: MachineShape, name: str, image: dict[str, Any], fds: list[int], state_bytes: bytes, *,
           parent: VM | ProcessFork, launch_dm: LaunchDm, block_interrupts: bool,
           console_log: str | None, key: str | None = None, dirty_ring: bool = True,
           flush_translations: bool = False) -> ProcessFork:
    """Turn an idle worker into a fork of `image` + `state_bytes` (`key`: the pair's WorkerPool.prefer() key; a
    worker prepared for it gets only the fork's name and options). `dirty_ring` picks the pool (rings or bitmaps),
    `flush_translations` sets the fork's VM.flush_translations_on_reset (see fork.dirty_log_mode)."""
    pool = worker_pool(shape, dirty_ring=dirty_ring)
    worker = pool.take(key)
    request: dict[str, Any] = {"op": "spawn", "name": name, "launch_dm": launch_dm,
                               "block_interrupts": block_interrupts, "console_log": console_log,
                               "flush_translations": flush_translations}
    try:
        with worker.busy:
            if key is not None and worker.prepared == key:
                request["prepared"] = key
                pool.prepared_spawns += 1
                worker.chan.send(request)
            else:
                request.update(image=image, state_bytes=state_bytes)
                worker.chan.send(request, fds)
            reply, rfds = worker.chan.recv()
    except (OSError, EOFError):
        rc = worker._reap(2.0)
        worker.discard()
        status = "is unreachable" if rc is None else _describe_status(rc)
        raise ForkError(f"the worker for fork {name} (pid {worker.proc.pid}) {status}") from None
    for fd in rfds:
        os.close(fd)
    if "error" in reply:
        worker.discard()
        raise _rebuild_error(reply["error"], f"the worker for fork {name} (pid {worker.proc.pid})")
    handle = ProcessFork(worker, name, parent=parent, launch_dm=launch_dm, block_interrupts=block_interrupts)
    handle.spawn_us = float(reply.get("us", 0.0))
    handle.flush_translations_on_reset = flush_translations
    return handle


# A parent's state in binary form, cached while it is the state its forks start from.
_state_cache: weakref.WeakKeyDictionary[VM, tuple[MachineState, bytes]] = weakref.WeakKeyDictionary()


# Idle workers get ready for the forks of the parent last forked (WorkerPool.prefer); False: every spawn sends the
# image and state and the worker builds everything then (the way to compare the two, bench/procfork.py).
PREPARE_WORKERS = True

_prepare_keys: weakref.WeakKeyDictionary[VM, tuple[MachineState, str]] = weakref.WeakKeyDictionary()
_key_count = 0


def _prepare_key(parent: VM, state: MachineState) -> str:
    """A name for (this parent's RAM, this fork state) that workers prepare for (WorkerPool.prefer)."""
    global _key_count
    cached = _prepare_keys.get(parent)
    if cached is not None and cached[0] is state:
        return cached[1]
    _key_count += 1
    key = f"{os.getpid()}-{parent.id}-{_key_count}"
    _prepare_keys[parent] = (state, key)
    return key


def _state_bytes(parent: VM, state: MachineState) -> bytes:
    cached = _state_cache.get(parent)
    if cached is not None and cached[0] is state:
        return cached[1]
    data = state.to_bytes()
    _state_cache[parent] = (state, data)
    return data


def fork_process(parent: VM | ProcessFork, *, name: str | None = None, block_interrupts: bool = False,
                 launch_dm: LaunchDm = "yes", device_state: DeviceSetState | None = None,
                 console_log: str | None = None, memory_limit_mib: int | None = None,
                 dirty_log: DirtyLog = "auto") -> ProcessFork:
    """A fork of the paused machine `parent` in a process of its own (see fork.VM.fork for the options).

    `memory_limit_mib`: memory the fork process may allocate from now on (its copies of guest pages, mostly).
    Going over it ends that fork alone, and the fork reports that it died out of memory. `dirty_log`: as for
    in-process forks (fork.dirty_log_mode); the fork comes from a worker whose shell was made in that mode, and a
    fork of a Linux guest where kernel mode is emulated drops KVM's translations at reset, as in-process ones do.
    Forks of a process fork inherit both."""
    if isinstance(parent, ProcessFork):
        return parent.fork(name=name, block_interrupts=block_interrupts, launch_dm=launch_dm,
                           device_state=device_state, console_log=console_log)
    parent.check_forkable()
    _check_launch_dm(launch_dm)
    if dirty_log not in ("auto", "ring", "bitmap"):
        raise ForkError(f"dirty_log must be auto, ring or bitmap, not {dirty_log!r}")
    dirty_ring = dirty_log_mode(parent, dirty_log) == "ring"
    flush = _linux_where_kernel_mode_is_emulated(parent)
    image = parent.memory.freeze()
    state = parent._state_for_forks()
    if device_state is None:
        state_bytes = _state_bytes(parent, state)
    else:
        state_bytes = dataclasses.replace(state, devices=device_state).to_bytes()
    parent._fork_count += 1
    child_name = name or f"{parent.name}-fork-{parent._fork_count}"
    desc, fds = _image_payload(image)
    key = None
    if device_state is None and PREPARE_WORKERS:
        key = _prepare_key(parent, state)
        worker_pool(parent.shape, dirty_ring=dirty_ring).prefer(key, desc, fds, state_bytes, parent)
    handle = _spawn(parent.shape, child_name, desc, fds, state_bytes, parent=parent, launch_dm=launch_dm,
                    block_interrupts=block_interrupts, console_log=console_log, key=key, dirty_ring=dirty_ring,
                    flush_translations=flush)
    if memory_limit_mib is not None:
        try:
            handle.cgroup = MemoryCgroup.create(f"{child_name}-{handle.pid}", memory_limit_mib)
            handle.cgroup.add(handle.pid)
        except BaseException:
            if handle.cgroup is not None:
                handle.cgroup.remove()
                handle.cgroup = None
            handle.destroy()
            raise
    parent.children.append(handle)  # type: ignore[arg-type]
    parent.memory.readonly = f"{parent.name} has live forks"
    return handle


# --- the worker process -----------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class _Hold:
    """Stands for a process fork of this worker's machine in its `children`, so that run, reset and memory writes
    are refused with the same messages as for in-process forks."""

    def __init__(self, name: str) -> None:
        self.name = name

    def destroy(self, *, tree: bool = False) -> None:
        pass


class _Server:
    """The worker side: one VM shell, then one fork machine, driven by requests."""

    def __init__(self, chan: _Channel, shape: MachineShape, dirty_ring: bool = True) -> None:
        from .vm import Shell, open_kvm
        self.chan = chan
        self.shape = shape
        self.vm: VM | None = None
        self.fds: list[int] = []        # the image files the machine maps: kept open for freeze()
        self.prepared: tuple[str, Any, MachineState, list[int], Any] | None = None   # op_prepare's (key, memory, ...)
        self.shell = Shell(open_kvm(), shape, dirty_logging=True, dirty_ring=dirty_ring)
        self._warm_up()

    def _warm_up(self) -> None:
        """Go once through everything a spawn does (imports, first-call caches of typing, json, numpy and ctypes)
        with a machine made from the empty shell and its own state, then put the shell back as it was, the way
        fork.ShellPool recycles shells: the spawn overwrites every piece of vCPU and platform state. Without this
        the first (and only) spawn of a worker costs about 10 ms more."""
        from .fork import VM
        from .memory import GuestMemory, clear_address_space
        from .vm import Machine
        shell = self.shell
        fd = os.memfd_create("vmfork-warm-up", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, shell.size)
            memory = GuestMemory.fork_of(MemoryImage(shell.size, shell.slots, fd), shell.host_addr)
            memory.bind(shell.vm, dirty_logging=True)
            vm = VM(shell, memory, name="warm-up")
            st = MachineState.from_bytes(vm.capture().to_bytes())
            vm.fork_state = st
            Machine.restore(vm, st)
            memory.close(unmap_view=False)
        finally:
            os.close(fd)
        clear_address_space(shell.host_addr, shell.size)
        for v in shell.vcpus:
            v.forget_runs()
        # Everything allocated so far lives as long as the worker: keep it out of the cyclic GC's way (a full
        # collection of it costs milliseconds, and would land in some request).
        gc.collect()
        gc.freeze()

    def serve(self) -> int:
        chan = self.chan
        while True:
            try:
                msg, fds = chan.recv()
            except (OSError, EOFError):
                return 0
            op = msg.get("op")
            rfds: list[int] = []
            try:
                handler = getattr(self, f"op_{op}", None)
                if handler is None:
                    raise ForkError(f"unknown request {op!r}")
                if self.vm is None and op not in ("spawn", "prepare"):
                    raise ForkError(f"request {op!r} before the fork exists")
                if op in ("spawn", "prepare"):
                    reply = handler(msg, fds)
                else:
                    for fd in fds:
                        os.close(fd)
                    reply = handler(msg)
                if isinstance(reply, tuple):
                    reply, rfds = reply
            except Exception as e:
                reply = {"error": _error_payload(e)}
            if self.vm is not None:
                reply["state"] = self.vm.state
            try:
                chan.send(reply, rfds)
            except OSError:
                return 0
            if self.vm is None and (op != "prepare" or "error" in reply):
                return 1        # the spawn (or prepare) failed: this worker's shell is in an unknown state

    # --- requests -----------------------------------------------------------------------------------------------

    def op_prepare(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Get ready to become a fork of this image and state (sent by the pool ahead of a spawn): map the image
        (the fork's view and the reset's source), parse the state and load its clock-free parts into the vCPUs
        (fork.ShellPool does the same for in-process forks). A later spawn naming msg["key"] only finishes."""
        from .memory import GuestMemory
        self._drop_prepared()
        try:
            image = _image_from_payload(msg["image"], fds)
            if image.slots != self.shell.slots or image.size != self.shell.size:
                raise ForkError(f"memory image does not fit a {self.shape.memory_mib} MiB machine")
            state = MachineState.from_bytes(msg["state_bytes"])
            memory = GuestMemory.fork_of(image, self.shell.host_addr)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        memory.bind(self.shell.vm, dirty_logging=True)
        for v, vs in zip(self.shell.vcpus, state.vcpus, strict=True):
            v.preload(vs)
        # The machine object too, for the common spawn (standard devices, no console log file): it is named then.
        from .fork import VM
        vm = VM(self.shell, memory, name="prepared")
        self.prepared = (msg["key"], memory, state, fds, vm)
        return {}

    def _drop_prepared(self) -> None:
        if self.prepared is not None:
            _, memory, _, fds, vm = self.prepared
            for d in vm.devices:
                close = getattr(d, "close", None)
                if close is not None:
                    close()
            memory.close(unmap_view=False)
            for fd in fds:
                os.close(fd)
            self.prepared = None

    def op_spawn(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Become a fork: map the image, build the machine as fork.VM._spawn does, load the state (or finish what
        op_prepare loaded, when the request names its key)."""
        from .fork import VM, _blocked
        from .memory import GuestMemory
        from .vm import Machine
        t0 = time.perf_counter()
        shell = self.shell
        launch_dm = msg["launch_dm"]
        prepared = self.prepared
        if msg.get("prepared") is not None:
            if prepared is None or prepared[0] != msg["prepared"]:
                raise ForkError("this worker is not prepared for that fork")
            _, memory, state, self.fds, prebuilt = prepared
            self.prepared = None
            preloaded = not msg["block_interrupts"]
        else:
            self._drop_prepared()
            self.fds = fds
            image = _image_from_payload(msg["image"], fds)
            if image.slots != self.shell.slots or image.size != self.shell.size:
                raise ForkError(f"memory image does not fit a {self.shape.memory_mib} MiB machine")
            state = MachineState.from_bytes(msg["state_bytes"])
            memory = GuestMemory.fork_of(image, shell.host_addr)
            memory.bind(shell.vm, dirty_logging=True)
            preloaded = False
            prebuilt = None
        if msg["block_interrupts"]:
            state = dataclasses.replace(state, vcpus=tuple(_blocked(v) for v in state.vcpus))
        if prebuilt is not None and launch_dm == "yes" and msg["console_log"] is None:
            vm = prebuilt
            vm.name = msg["name"]
        else:
            if prebuilt is not None:
                for d in prebuilt.devices:
                    close = getattr(d, "close", None)
                    if close is not None:
                        close()
            vm = VM(shell, memory, name=msg["name"], console_log=msg["console_log"],
                    with_devices=launch_dm == "yes")
        vm.irqs_blocked = msg["block_interrupts"]
        vm.launch_dm = launch_dm
        vm.fork_state = state
        vm.flush_translations_on_reset = bool(msg.get("flush_translations"))
        if preloaded:
            for v, vs in zip(vm.vcpus, state.vcpus, strict=True):
                v.finish_preload(vs)
            vm.restore_platform(state.platform)
            if launch_dm == "yes" and state.devices is not None and vm.devices:
                DeviceSetState.restore_all(vm.devices, state.devices)
                vm.bus.touched.clear()
            if vm.workarounds is not None:      # as Machine.restore does: the guest's IDT, LSTAR, ... anew
                vm.workarounds.state_loaded()
        else:
            Machine.restore(vm, state, devices=launch_dm == "yes")
        from . import vmgenid
        if vmgenid.present(vm):          # as VM.fork does: a new generation, so a Linux guest reseeds its RNG
            vm._vmgenid = True      # type: ignore[attr-defined]
            vmgenid.new_generation(vm)
        self.vm = vm
        signal.signal(PAUSE_SIGNAL, self._on_pause_signal)
        return {"us": (time.perf_counter() - t0) * 1e6}

    def _on_pause_signal(self, signum: int, frame: object) -> None:
        vm = self.vm
        if vm is not None and vm.state == "running":
            # Not vm._stop() here: the interrupted code may hold the machine's stop lock.
            threading.Thread(target=vm._stop, args=(StopEvent("pause"),), daemon=True).start()

    @property
    def machine(self) -> VM:
        assert self.vm is not None
        return self.vm

    def op_run(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"event": _event_payload(self.machine.run(msg["timeout"]))}

    def op_start(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.machine.start()
        return {}

    def op_wait(self, msg: dict[str, Any]) -> dict[str, Any]:
        vm = self.machine
        if vm.state != "running":
            ev = vm.stop_event or StopEvent("pause")
        else:
            ev = vm.wait(msg["timeout"], pause_on_timeout=msg["pause_on_timeout"])
        return {"event": _event_payload(ev)}

    def op_pause(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"event": _event_payload(self.machine.pause())}

    def op_reset(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"pages": self.machine.reset(memory=msg["memory"], state=msg["state"])}

    def op_read(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"data": self.machine.memory.read(msg["gpa"], msg["n"])}

    def op_write(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.machine.memory.write(msg["gpa"], msg["data"])
        return {}

    def _vcpu(self, index: int) -> Any:
        vcpus = self.machine.vcpus
        if not 0 <= index < len(vcpus):
            raise VmStateError(f"{self.machine.name} has no vCPU {index}")
        return vcpus[index]

    def op_get_regs(self, msg: dict[str, Any]) -> dict[str, Any]:
        vm = self.machine
        vm._require_paused("read the registers of")
        regs = self._vcpu(msg["vcpu"]).get_regs()
        return {"regs": {n: getattr(regs, n) for n in GPR_NAMES}}

    def op_set_regs(self, msg: dict[str, Any]) -> dict[str, Any]:
        vm = self.machine
        vm._require_paused("change the registers of")
        vcpu = self._vcpu(msg["vcpu"])
        regs = vcpu.get_regs()
        for n, v in msg["values"].items():
            setattr(regs, n, v)
        vcpu.set_regs(regs)
        vm.touch()
        return {}

    def op_console(self, msg: dict[str, Any]) -> dict[str, Any]:
        vm = self.machine
        if not any(d.name == "serial0" for d in vm.devices):
            return {"data": b""}
        return {"data": vm.device("serial0").output()}

    def op_feed_console(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.machine.feed_console(msg["data"])
        return {}

    def op_capture(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"state_bytes": self.machine.capture().to_bytes()}

    def op_freeze(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        vm = self.machine
        if vm.state == "running":
            raise ForkError(f"cannot fork {vm.name} while it runs: pause it first")
        if vm.state == "crashed":
            raise ForkError(f"cannot fork {vm.name}: it has crashed")
        image = vm.memory.freeze()
        state_bytes = vm._state_for_forks().to_bytes()
        vm.children.append(_Hold(msg["child"]))  # type: ignore[arg-type]
        vm.memory.readonly = f"{vm.name} has live forks"
        desc, fds = _image_payload(image)
        return {"image": desc, "state_bytes": state_bytes}, fds

    def op_release(self, msg: dict[str, Any]) -> dict[str, Any]:
        vm = self.machine
        for ch in list(vm.children):
            if ch.name == msg["child"]:
                vm.children.remove(ch)
                break
        if not vm.children:
            vm.memory.readonly = None
        return {}

    def op_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {}


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 7 or argv[0] != "--worker" or argv[6] not in ("ring", "bitmap"):
        print("vmfork.procfork is started by vmfork itself (fork_process), not by hand", file=sys.stderr)
        return 2
    sock_fd, memory_mib, vcpus, parent_pid = (int(a) for a in argv[1:5])
    cpuid = argv[5]         # the parent's concrete CPUID policy: the forks' vCPUs must show the same CPU
    dirty_ring = argv[6] == "ring"      # how the shell logs written pages (fork.dirty_log_mode)
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in a terminal is for the VMM, which owns the forks
    signal.signal(PAUSE_SIGNAL, signal.SIG_IGN)    # until there is a machine to pause
    chan = _Channel(socket.socket(fileno=sock_fd))
    try:
        server = _Server(chan, MachineShape(memory_mib, vcpus, cpuid), dirty_ring)
        # the jail (root's default): once the shell is built, before "ready"
        from . import procfork_jail
        if procfork_jail.wanted():
            procfork_jail.confine_worker(keep_fds={sock_fd}, parent_pid=parent_pid)
    except Exception as e:
        chan.send({"error": _error_payload(e)})
        return 1
    chan.send({"ready": os.getpid()})
    return server.serve()


register_process_forker(fork_process)      # VM.fork(isolation="process")

if __name__ == "__main__":
    code = _worker_main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)       # no interpreter teardown: the kernel frees the VM and the mappings faster
