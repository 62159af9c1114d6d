"""The pool of VM shells forks are made in: a KVM VM with its vCPUs, irqchip, PIT and memory slots with dirty logging
costs milliseconds here, far more than a fork's budget, so shells are made ahead by background threads, prepared
for a parent (its RAM mapped copy-on-write, its clock-free state loaded, and by prepare_machines its fork's whole
machine built), and recycled when a fork is destroyed (fork.py takes them)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import ForkError, KvmError
from .kvm import FdPlan, Kvm, PackedPlan, run_fd_plan
from .kvm import constants as c
from .kvm import structs as s
from .memory import (
    GuestMemory,
    MemoryImage,
    clear_address_space,
    file_id,
    make_slots,
    map_image,
    map_image_anywhere,
    release_address_space,
)
from .vm import MachineShape, MachineState, Shell, open_kvm

FDS_PER_SHELL = 2           # the VM and its vCPU (one more per extra vCPU)
SHELL_WAIT_S = 0.05         # how long a fork waits for a shell in flight before making its own
CLOSERS = 4                 # threads closing surplus shells (closing a VM waits in the kernel, ~10 ms)


class ShellPool:
    """Pre-created VM shells of one shape, made ahead of demand by background threads.

    A shell takes about 8-10 ms to make here, but almost all of it is waiting in the kernel (registering the memory
    slot waits for an SRCU grace period, KVM_CREATE_PIT2 for a new kernel thread), with the GIL released and well
    under 1 ms of CPU. So up to `makers` threads make shells at once, and the pool sizes itself by demand: it keeps
    `target` shells ready when idle; a take that finds the pool empty doubles the refill goal (up to `max_ready`),
    which halves again after a second without takes. A fork that finds the pool empty waits for a shell in flight
    rather than making one itself. Shells beyond the pool (destroyed forks' shells when it is full) are closed on a
    background thread too: closing a VM also waits in the kernel (about 10 ms).

    Shells are prepared for the preferred parent (prefer()): its RAM file premapped, the clock-free part of its fork
    state preloaded (_preload), and, by prepare_machines() on prepare_forks' thread, the fork's whole machine
    (shell.machine; _take_machine checks it fits the fork). Whatever prepares a shell for something else drops the
    machine (_drop_machine)."""

    IDLE_DECAY_S = 1.0

    def __init__(self, kvm: Kvm, shape: MachineShape, *, target: int = 2, makers: int = 16,
                 max_ready: int = 64, dirty_ring: bool = True) -> None:
        self.kvm = kvm
        self.shape = shape
        self.dirty_ring = dirty_ring        # False: shells log into bitmaps (fork(dirty_log="bitmap"))
        self.target = target
        self.makers = makers
        self.max_ready = max_ready
        self._ready: deque[Shell] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)        # shell wanted, shell arrived, closing
        self._threads: list[threading.Thread] = []
        self._thread: threading.Thread | None = None        # the first maker (kept for callers that poll it)
        self._closed = False
        self._want = target             # the refill goal now: target, raised by demand
        self._in_flight = 0             # shells being made
        self._idle = 0                  # maker threads waiting for work
        self._last_take = 0.0
        self._to_close: deque[Shell] = deque()
        self._closing = 0               # shells being closed now
        self._closers: list[threading.Thread] = []
        self.created = 0
        self.recycled = 0
        self.misses = 0                 # takes that found no shell ready
        # A root parent's RAM file that new and recycled shells are mapped to ahead of time (see prefer()).
        self._preferred: MemoryImage | None = None
        self._preferred_state: MachineState | None = None   # ... and its fork state, preloaded into shells
        # ... and that parent's own RAM (a fork's copy-back source), for the machines prepare_machines() builds
        self._preferred_base: GuestMemory | None = None
        self._ram_size = sum(sl.size for sl in make_slots(shape.regions()))

    def _new_shell(self) -> Shell:
        # The preferred RAM file is mapped first, where the kernel likes, and the shell's slots registered on that
        # mapping: premapping it over reserved space afterwards would call every VM's MMU notifier (_premap).
        image = self._preferred
        if image is not None and (image.layers or image.size != self._ram_size):
            image = None
        addr = map_image_anywhere(image, mmap.PROT_READ | mmap.PROT_WRITE) if image is not None else None
        try:
            shell = Shell(self.kvm, self.shape, dirty_logging=True, dirty_ring=self.dirty_ring, host_addr=addr)
        except BaseException as e:
            if addr is not None:
                release_address_space(addr, self._ram_size)
            if not isinstance(e, KvmError):
                raise
            if e.errno == errno.EMFILE:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                raise ForkError(f"cannot make a VM shell for a fork: this process has all {soft} file descriptors "
                                f"it may open (RLIMIT_NOFILE, hard limit {hard}) in use; each fork holds "
                                f"{FDS_PER_SHELL} plus its devices': destroy forks or raise the hard limit "
                                "(ulimit -Hn)") from None
            raise
        if image is not None:
            shell.owns_addr = True              # closing the shell unmaps it
            shell.premapped = image.base_fd
            shell.premapped_file = _image_file(image)
        with self._lock:
            self.created += 1
        try:
            if image is None:
                self._premap(shell, self._preferred)
            self._preload(shell, self._preferred_state)
        except BaseException:
            shell.close()
            raise
        return shell

    @staticmethod
    def _preload(shell: Shell, state: MachineState | None) -> None:
        """Load the clock-free parts of a parent's fork state into the shell's vCPUs (Vcpu.preload) and VM
        (_platform_ahead: the shell's PIT stopped first), so the fork itself issues only the few ioctls that must
        happen at fork time (_fork_plan)."""
        _drop_machine(shell)
        shell.preloaded = None
        if state is None or state.shape != shell.shape:
            return
        for v, vs in zip(shell.vcpus, state.vcpus, strict=True):
            v.preload(vs)
        chips, lapics = _platform_ahead(state)
        vm_fd = shell.vm.fd
        steps: FdPlan = [(vm_fd, c.KVM_SET_PIT2, ctypes.byref(_STOPPED_PIT))]
        steps += [(v.fd.fd, c.KVM_SET_LAPIC, ctypes.byref(vs.lapic))
                  for v, vs, ahead in zip(shell.vcpus, state.vcpus, lapics, strict=True) if ahead]
        if chips:
            steps += [(vm_fd, request, ptr) for request, ptr in state.platform.restore_plan()
                      if request == c.KVM_SET_IRQCHIP]
        run_fd_plan(steps)
        shell.preloaded = state

    @staticmethod
    def _premap(shell: Shell, image: MemoryImage | None) -> None:
        """Map a root parent's RAM file copy-on-write at the shell's slot range. Replacing a mapping under KVM
        memory slots costs over 100 µs here (KVM invalidates the whole range), so the pool does it off the fork
        path. The mapping is lazy: nothing is read until the fork runs, and the parent stays frozen while it has
        forks, so a fork sees exactly the parent's RAM at fork time either way."""
        _drop_machine(shell)
        if image is not None and not image.layers:
            map_image(image, shell.host_addr, mmap.PROT_READ | mmap.PROT_WRITE)
            shell.premapped = image.base_fd
            shell.premapped_file = _image_file(image)
        else:
            shell.premapped = None

    def prefer(self, image: MemoryImage, state: MachineState | None = None, base: GuestMemory | None = None) -> None:
        """Prepare future shells for forks of this root image (and, given, of this fork state; `base`: the
        parent's own RAM, which prepare_machines() needs)."""
        if image.layers:
            return
        if state is not None:
            self._preferred_state = state
        if base is not None and base.fd == image.base_fd:      # the root whose RAM file this is
            self._preferred_base = base
        if self._preferred is not None and self._preferred.base_fd == image.base_fd:
            return
        with self._lock:
            self._preferred = image
            if base is None or base.fd != image.base_fd:
                self._preferred_base = None

    def forget(self, fd: int) -> None:
        """A parent's RAM file is going away: drop every premapping of it (they keep the file alive)."""
        with self._lock:
            if self._preferred is not None and self._preferred.base_fd == fd:
                self._preferred = None
                self._preferred_state = None
                self._preferred_base = None
            shells = [sh for sh in self._ready if sh.premapped == fd]
        for sh in shells:
            _drop_machine(sh)               # its RAM view copies back from the parent's mapping, going away now
            clear_address_space(sh.host_addr, sh.size)
            sh.premapped = None

    def take(self) -> Shell:
        """A ready shell: from the pool, else the next one in flight, else made now. Raises the refill goal when
        the pool ran dry (demand outgrew it) and wakes the makers."""
        with self._lock:
            self._last_take = time.monotonic()
            shell = self._ready.popleft() if self._ready else None
            if shell is None:
                self.misses += 1
                self._want = min(self.max_ready, max(self._want * 2, self.target, 1))
            if len(self._ready) + self._in_flight < self._want:
                self._wake.notify_all()
        if self.target > 0 and len(self._threads) < self.makers:
            self._start_makers()        # as many as the refill goal needs beyond the idle ones
        if shell is not None:
            return shell
        with self._lock:
            deadline = time.monotonic() + SHELL_WAIT_S
            while not self._ready and self._in_flight and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            shell = self._ready.popleft() if self._ready else None
        return shell if shell is not None else self._new_shell()

    def prefill(self, n: int) -> None:
        """Make sure at least n shells are ready (synchronously; up to `makers` threads make them at once)."""
        errors: list[BaseException] = []

        def make() -> None:
            while not errors:
                with self._lock:
                    if len(self._ready) + self._in_flight >= n or self._closed:
                        return
                    self._in_flight += 1
                try:
                    shell = self._new_shell()
                except BaseException as e:
                    errors.append(e)
                    shell = None
                with self._lock:
                    self._in_flight -= 1
                    if shell is not None:
                        self._ready.append(shell)
                    self._wake.notify_all()

        while True:
            with self._lock:
                while len(self._ready) < n and self._in_flight and len(self._ready) + self._in_flight >= n:
                    self._wake.wait(0.05)          # the background makers' shells count too
                missing = n - len(self._ready) - self._in_flight
            if len(self._ready) >= n or self._closed:
                return
            helpers = [threading.Thread(target=make, name="vmfork-shell-prefill", daemon=True)
                       for _ in range(min(self.makers, missing) - 1)]
            for t in helpers:
                t.start()
            make()
            for t in helpers:
                t.join()
            if errors:
                raise errors[0]

    def refresh(self, n: int) -> None:
        """Point up to n ready shells made for another parent (or another state of it) at the preferred image and
        state: prepare_forks() promises shells ready for *its* machine."""
        image, state = self._preferred, self._preferred_state
        if image is None or image.layers:
            return
        with self._lock:
            file = _image_file(image)
            stale = [sh for sh in list(self._ready)[:n]
                     if sh.premapped != image.base_fd or sh.premapped_file != file
                     or (state is not None and sh.preloaded is not state)]
            for sh in stale:
                self._ready.remove(sh)
        try:
            for sh in stale:
                if sh.premapped != image.base_fd or sh.premapped_file != file:
                    self._premap(sh, image)
                self._preload(sh, state)
        finally:
            with self._lock:
                self._ready.extendleft(reversed(stale))

    def prepare_machines(self, n: int, build: Callable[[Shell, MemoryImage, MachineState, GuestMemory], Any]) -> None:
        """Build the fork's machine ahead (its RAM view, devices in the fork-time state, workarounds: everything
        but its name and the fork-time ioctls) in up to n ready shells that hold the preferred parent's RAM and
        state, so such a fork only takes it (machine_from_image). `build(shell, image, state, base)` makes one
        (fork._pooled_machine: the fork layer's VM class is built on this module). On the calling thread
        (prepare_forks): pool threads doing this Python work would hold the GIL while a burst of forks wants it."""
        image, state, base = self._preferred, self._preferred_state, self._preferred_base
        if image is None or state is None or base is None or base.closed or base.fd != image.base_fd:
            return
        with self._lock:
            file = _image_file(image)
            todo = [sh for sh in list(self._ready)[:n]
                    if sh.machine is None and sh.preloaded is state and sh.premapped == image.base_fd
                    and sh.premapped_file == file]
            for sh in todo:
                self._ready.remove(sh)
        try:
            for sh in todo:
                sh.machine = (build(sh, image, state, base), base)
        finally:
            with self._lock:
                self._ready.extendleft(reversed(todo))

    def drain(self) -> None:
        """Close every ready shell (in the background): the next forks find the pool empty."""
        with self._lock:
            shells = list(self._ready)
            self._ready.clear()
            self._want = self.target
        for sh in shells:
            _drop_machine(sh)
            self._close_later(sh)

    def give_back(self, shell: Shell) -> None:
        """Recycle a destroyed fork's shell: its RAM view is replaced by fresh reserved address space and its
        dirty log cleared; the next fork overwrites every piece of vCPU and platform state."""
        with self._lock:
            keep = len(self._ready) < max(self.target, self.max_ready, self._want) and not self._closed
        if not keep:
            self._close_later(shell)
            return
        preferred = self._preferred
        if preferred is not None and not preferred.layers:
            self._premap(shell, preferred)          # replaces the old view in place
        else:
            clear_address_space(shell.host_addr, shell.size)
            shell.premapped = None
        shell.clear_dirty_log()
        for v in shell.vcpus:
            v.forget_runs()
        self._preload(shell, self._preferred_state if preferred is not None else None)
        self.recycled += 1
        with self._lock:
            self._ready.append(shell)
            self._wake.notify_all()

    def ready(self) -> int:
        return len(self._ready)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no shell is being made or closed (e.g. before counting file descriptors)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._in_flight or self._to_close or self._closing) and time.monotonic() < deadline:
                self._wake.wait(0.01)

    def _start_makers(self) -> None:
        with self._lock:
            need = self._want - len(self._ready) - self._in_flight - self._idle
            missing = min(self.makers - len(self._threads), need)
            for _ in range(missing):
                t = threading.Thread(target=self._make_loop, name="vmfork-shell-pool", daemon=True)
                self._threads.append(t)
                t.start()
            if self._thread is None and self._threads:
                self._thread = self._threads[0]

    def _make_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and len(self._ready) + self._in_flight >= self._want:
                    self._idle += 1
                    woken = self._wake.wait(self.IDLE_DECAY_S)
                    self._idle -= 1
                    if not woken and self._want > self.target \
                            and time.monotonic() - self._last_take >= self.IDLE_DECAY_S:
                        self._want = max(self.target, self._want // 2)
                if self._closed:
                    return
                self._in_flight += 1
            shell: Shell | None
            try:
                shell = self._new_shell()
            except Exception:               # VmforkError, or OSError from a parent's file closed meanwhile
                with self._lock:
                    self._in_flight -= 1
                    self._threads.remove(threading.current_thread())   # a later take() starts another
                    self._wake.notify_all()
                return                                  # take() makes its shell itself and reports the error
            with self._lock:
                self._in_flight -= 1
                if not self._closed:
                    self._ready.append(shell)
                    shell = None
                self._wake.notify_all()
            if shell is not None:
                shell.close()

    def _close_later(self, shell: Shell) -> None:
        with self._lock:
            self._to_close.append(shell)
            if len(self._closers) < CLOSERS and len(self._to_close) > self._closing:
                t = threading.Thread(target=self._close_loop, name="vmfork-shell-closer", daemon=True)
                self._closers.append(t)
                t.start()
            self._wake.notify_all()

    def _close_loop(self) -> None:
        while True:
            with self._lock:
                while not self._to_close:
                    self._wake.wait()
                shell = self._to_close.popleft()
                self._closing += 1
            try:
                shell.close()
            finally:
                with self._lock:
                    self._closing -= 1
                    self._wake.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            shells = list(self._ready)
            self._ready.clear()
        for sh in shells:
            _drop_machine(sh)
            sh.close()


_pools: dict[tuple[MachineShape, bool], ShellPool] = {}


# KVM_SET_PIT2 with channel 0 in mode 0xff stops a PIT's timer: KVM arms it for modes 0-4 only and otherwise
# cancels it and waits for an injection in flight (i8254.c, pit_load_count and destroy_pit_timer), which is how it
# leaves a new PIT. A recycled shell's PIT may still tick from its last fork, raising IRQ 0 into its PICs and IOAPIC.
_STOPPED_PIT = s.PitState2()
_STOPPED_PIT.channels[0].mode = 0xFF


def _platform_ahead(state: MachineState) -> tuple[bool, tuple[bool, ...]]:
    """Which of the fork-time ioctls a pooled shell whose PIT is stopped can take ahead for `state`: (the PICs
    and the IOAPIC, each vCPU's LAPIC). Nothing in such a shell raises an interrupt line (its vCPUs do not run, no
    device drives it until the fork's own restore, which comes after these as at fork time), so the interrupt
    controllers keep what they are given. A LAPIC then changes only through its timer: ahead when the timer is off
    (VcpuState.lapic_timer_off). The IOAPIC delivers the inputs pending in its IRR when set, into the LAPICs as
    they are then: ahead only with none pending (the PICs signal the vCPU at its next entry, not the LAPIC). The
    PIT, the clock, the TSC MSRs and a ticking LAPIC follow time: fork time."""
    irr = int.from_bytes(bytes(state.platform.ioapic.data)[16:20], "little")
    return irr == 0, tuple(vs.lapic_timer_off() for vs in state.vcpus)


def _holds(preloaded: MachineState | None, state: MachineState) -> bool:
    """Whether a shell preloaded with `preloaded` holds `state`'s vCPU and platform parts: the same state, or one
    that differs only in its devices (fork(env=...) and fork(device_state=...) replace just those)."""
    return preloaded is not None and (preloaded is state or (preloaded.vcpus is state.vcpus
                                                              and preloaded.platform is state.platform))


def _fork_plan(shell: Shell, state: MachineState) -> PackedPlan:
    """The fork-time ioctls of a shell preloaded with `state` (ShellPool._preload): every vCPU's and the
    platform's that were not taken ahead, packed once per (shell, state) for one C call."""
    cached = shell.fork_plan
    if cached is None or not _holds(cached[0], state):
        chips, lapics = _platform_ahead(state)
        steps = [(v.fd.fd, request, ptr) for v, vs, ahead in zip(shell.vcpus, state.vcpus, lapics, strict=True)
                 for request, ptr in vs.preload_plans()[1] if not (ahead and request == c.KVM_SET_LAPIC)]
        steps += [(shell.vm.fd, request, ptr) for request, ptr in state.platform.restore_plan()
                  if not (chips and request == c.KVM_SET_IRQCHIP)]
        cached = shell.fork_plan = (state, PackedPlan(steps))
    plan: PackedPlan = cached[1]
    return plan


def _drop_machine(shell: Shell) -> None:
    """Forget the machine built ahead in this shell (its shell lives on)."""
    ready, shell.machine = shell.machine, None
    if ready is not None:
        vm = ready[0]
        for d in vm.devices:
            close = getattr(d, "close", None)
            if close is not None:
                close()
        vm.memory.close(unmap_view=False)


def shell_pool(shape: MachineShape, *, dirty_ring: bool = True) -> ShellPool:
    """The pool of shells of this shape (`dirty_ring`: shells that log into dirty rings, else bitmaps)."""
    pool = _pools.get((shape, dirty_ring))
    if pool is None:
        raise_fd_limit()
        pool = _pools[(shape, dirty_ring)] = ShellPool(open_kvm(), shape, dirty_ring=dirty_ring)
    return pool


def _image_file(image: MemoryImage) -> tuple[int, int]:
    return image.base_file if image.base_file is not None else file_id(image.base_fd)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (each live fork holds a few descriptors: 1,000 forks
    pass the usual soft limit of 1,024); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


__all__ = ["ShellPool", "raise_fd_limit", "shell_pool"]
