"""VM forking: a paused parent is copied into children that share its RAM copy-on-write and start with its exact
CPU, platform and device state; a fork can be reset to that state, and forked again.

Creating a KVM VM with an irqchip costs milliseconds on this kind of host, far more than the whole fork budget, so
forks take pre-created shells (VM + vCPUs + irqchip + PIT + memory slots with dirty logging) from a pool refilled
in the background; a destroyed fork's shell goes back to the pool. The fork itself is then: map the parent's RAM
copy-on-write over the shell's slot range, and load the parent's captured state (cached while the parent stays
paused).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import threading
from collections import deque
from typing import TYPE_CHECKING, Literal, overload

from . import vmgenid
from .devices import DeviceSetState
from .errors import ForkError, VmforkError
from .kvm import Kvm
from .kvm import constants as c
from .kvm import structs as s
from .memory import GuestMemory, MemoryImage, clear_address_space, map_image
from .vcpu import ResetPlan, VcpuState
from .vm import Machine, MachineShape, MachineState, Shell, StopEvent, open_kvm

if TYPE_CHECKING:
    from .procfork import ProcessFork

LaunchDm = Literal["yes", "no", "late"]
LAPIC_TPR = 0x80


class ShellPool:
    """Pre-created VM shells of one shape."""

    def __init__(self, kvm: Kvm, shape: MachineShape, *, target: int = 2) -> None:
        self.kvm = kvm
        self.shape = shape
        self.target = target
        self._ready: deque[Shell] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.created = 0
        self.recycled = 0
        # A root parent's RAM file that new and recycled shells are mapped to ahead of time (see prefer()).
        self._preferred: MemoryImage | None = None

    def _new_shell(self) -> Shell:
        self.created += 1
        shell = Shell(self.kvm, self.shape, dirty_logging=True)
        self._premap(shell, self._preferred)
        return shell

    @staticmethod
    def _premap(shell: Shell, image: MemoryImage | None) -> None:
        """Map a root parent's RAM file copy-on-write at the shell's slot range. Replacing a mapping under KVM
        memory slots costs over 100 µs here (KVM invalidates the whole range), so the pool does it off the fork
        path. The mapping is lazy: nothing is read until the fork runs, and the parent stays frozen while it has
        forks, so a fork sees exactly the parent's RAM at fork time either way."""
        if image is not None and not image.layers:
            map_image(image, shell.host_addr, mmap.PROT_READ | mmap.PROT_WRITE)
            shell.premapped = image.base_fd
        else:
            shell.premapped = None

    def prefer(self, image: MemoryImage) -> None:
        """Prepare future shells for forks of this root image."""
        if image.layers or (self._preferred is not None and self._preferred.base_fd == image.base_fd):
            return
        with self._lock:
            self._preferred = image

    def forget(self, fd: int) -> None:
        """A parent's RAM file is going away: drop every premapping of it (they keep the file alive)."""
        with self._lock:
            if self._preferred is not None and self._preferred.base_fd == fd:
                self._preferred = None
            shells = [sh for sh in self._ready if sh.premapped == fd]
        for sh in shells:
            clear_address_space(sh.host_addr, sh.size)
            sh.premapped = None

    def take(self) -> Shell:
        """A ready shell: from the pool if one is there, else made now. Wakes the refiller."""
        with self._lock:
            shell = self._ready.popleft() if self._ready else None
            self._wake.notify()
        self._ensure_refiller()
        return shell if shell is not None else self._new_shell()

    def prefill(self, n: int) -> None:
        """Make sure at least n shells are ready (synchronously)."""
        while True:
            with self._lock:
                if len(self._ready) >= n:
                    return
            shell = self._new_shell()
            with self._lock:
                self._ready.append(shell)

    def give_back(self, shell: Shell) -> None:
        """Recycle a destroyed fork's shell: its RAM view is replaced by fresh reserved address space and its
        dirty log cleared; the next fork overwrites every piece of vCPU and platform state."""
        preferred = self._preferred
        if preferred is not None and not preferred.layers:
            self._premap(shell, preferred)          # replaces the old view in place
        else:
            clear_address_space(shell.host_addr, shell.size)
            shell.premapped = None
        shell.clear_dirty_log()
        for v in shell.vcpus:
            v.forget_runs()
        self.recycled += 1
        with self._lock:
            if len(self._ready) < max(self.target, 64) and not self._closed:
                self._ready.append(shell)
                return
        shell.close()

    def ready(self) -> int:
        return len(self._ready)

    def _ensure_refiller(self) -> None:
        if self._thread is None and self.target > 0:
            self._thread = threading.Thread(target=self._refill, name="vmfork-shell-pool", daemon=True)
            self._thread.start()

    def _refill(self) -> None:
        while True:
            with self._lock:
                while not self._closed and len(self._ready) >= self.target:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                shell = self._new_shell()
            except VmforkError:
                return
            with self._lock:
                if self._closed:
                    shell.close()
                    return
                self._ready.append(shell)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            shells = list(self._ready)
            self._ready.clear()
        for sh in shells:
            sh.close()


_pools: dict[MachineShape, ShellPool] = {}


def shell_pool(shape: MachineShape) -> ShellPool:
    pool = _pools.get(shape)
    if pool is None:
        pool = _pools[shape] = ShellPool(open_kvm(), shape)
    return pool


def _blocked(st: VcpuState) -> VcpuState:
    """A copy of a vCPU state whose task priority blocks every maskable interrupt (TPR 0xFF, CR8 15)."""
    lapic = s.LapicState()
    ctypes.pointer(lapic)[0] = st.lapic
    ctypes.c_uint32.from_buffer(lapic.regs, LAPIC_TPR).value = 0xFF
    sregs = s.Sregs()
    ctypes.pointer(sregs)[0] = st.sregs
    sregs.cr8 = 15
    return dataclasses.replace(st, lapic=lapic, sregs=sregs)


_IO_CTYPES: dict[int, type[ctypes.c_uint8] | type[ctypes.c_uint16] | type[ctypes.c_uint32]] = {
    1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}


@dataclasses.dataclass(frozen=True, slots=True)
class _DeviceAccess:
    """A port access that stopped a machine (pause_on_device_access), as its vCPU's exit described it."""

    vcpu: int
    port: int
    is_write: bool
    size: int
    count: int                      # repetitions (string I/O)
    values: tuple[int, ...]         # the values written; empty for a read
    generation: int                 # the machine's state generation when it happened


class VM(Machine):
    """A machine that can be forked, and a fork that can be reset."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fork_state: MachineState | None = None     # what reset(state=True) returns to
        self.launch_dm: LaunchDm = "yes"
        self._fork_cache: tuple[int, MachineState] | None = None
        self._generation = 0
        self._reset_plan: tuple[MachineState, ResetPlan] | None = None     # for fork_state, built at first reset
        self._fork_count = 0
        self.dm_accesses: dict[int, int] = {}         # port accesses answered as absent hardware before a DM
        self.pause_on_device_access = False             # stop at the first access to each port no device answers
        self._dm_pending: _DeviceAccess | None = None   # the access that stopped it, for a device model attached late
        self.bus.on_unknown = self._on_device_access
        self._vmgenid_id: bytes | None = None           # this fork's VM generation ID (vmgenid.py), if it has one

    # Every change to the parent's state invalidates the cached state its forks start from.
    def _begin(self) -> None:
        self._generation += 1
        super()._begin()

    def restore(self, st: MachineState, *, devices: bool = True) -> None:
        self._generation += 1
        super().restore(st, devices=devices)

    def touch(self) -> None:
        """Note an out-of-band change to vCPU or device state (e.g. a register written by introspection)."""
        self._generation += 1

    def _state_for_forks(self) -> MachineState:
        cache = self._fork_cache
        if cache is not None and cache[0] == self._generation:
            return cache[1]
        st = self.capture()
        self._fork_cache = (self._generation, st)
        return st

    # --- fork ---------------------------------------------------------------------------------------------------

    def check_forkable(self) -> None:
        """Raise ForkError unless this machine can be forked now (it must exist, be paused and not crashed)."""
        if self.state == "destroyed":
            raise ForkError(f"cannot fork {self.name}: it is destroyed")
        if self.state == "running":
            raise ForkError(f"cannot fork {self.name} while it runs: pause it first")
        if self.state == "crashed":
            raise ForkError(f"cannot fork {self.name}: it has crashed")

    def prepare_forks(self, n: int) -> None:
        """Have n VM shells ready for forks of this machine (made now, a few ms each), so forks skip creating a
        KVM VM and, for a root machine, mapping its RAM file."""
        pool = shell_pool(self.shape)
        pool.prefer(self.memory.freeze())
        pool.prefill(n)

    @overload
    def fork(self, *, name: str | None = ..., block_interrupts: bool = ..., launch_dm: LaunchDm = ...,
             device_state: DeviceSetState | None = ..., console_log: str | None = ...,
             memory_mib: int | None = ..., vcpus: int | None = ..., isolation: Literal["thread"] = ...,
             memory_limit_mib: None = ..., pause_on_device_access: bool = ...,
             new_generation: bool = ...) -> VM: ...

    @overload
    def fork(self, *, name: str | None = ..., block_interrupts: bool = ..., launch_dm: LaunchDm = ...,
             device_state: DeviceSetState | None = ..., console_log: str | None = ...,
             memory_mib: int | None = ..., vcpus: int | None = ..., isolation: Literal["process"],
             memory_limit_mib: int | None = ..., pause_on_device_access: bool = ...,
             new_generation: bool = ...) -> ProcessFork: ...

    def fork(self, *, name: str | None = None, block_interrupts: bool = False, launch_dm: LaunchDm = "yes",
             device_state: DeviceSetState | None = None, console_log: str | None = None,
             memory_mib: int | None = None, vcpus: int | None = None,
             isolation: Literal["thread", "process"] = "thread",
             memory_limit_mib: int | None = None, pause_on_device_access: bool = False,
             new_generation: bool = True) -> VM | ProcessFork:
        """A new machine identical to this paused one, sharing its RAM copy-on-write.

        `launch_dm`: "yes" gives the fork devices with this machine's device state (or `device_state`); "no" and
        "late" give it none (every port access is answered as by absent hardware and counted, see
        `device_accesses()`), and `attach_device_model()` can add them later. `pause_on_device_access`: the fork
        stops (StopEvent "device-access", naming port, direction and size) at the first access to each port no
        device answers. `new_generation`: a machine with a VMGenID device (Linux kernels; vmfork.vmgenid) gives the
        fork a new generation ID and notifies it, so the guest reseeds its RNG; False keeps the parent's."""
        self.check_forkable()
        if memory_mib is not None and memory_mib != self.shape.memory_mib:
            raise ForkError(f"a fork has its parent's memory: {self.name} has {self.shape.memory_mib} MiB, "
                            f"not {memory_mib}")
        if vcpus is not None and vcpus != self.shape.vcpus:
            raise ForkError(f"a fork has its parent's vCPUs: {self.name} has {self.shape.vcpus}, not {vcpus}")
        if launch_dm not in ("yes", "no", "late"):
            raise ForkError(f"launch_dm must be yes, no or late, not {launch_dm!r}")
        if isolation == "process":
            if pause_on_device_access:
                raise ForkError("pause_on_device_access is not available for process forks yet")
            from .procfork import fork_process
            return fork_process(self, name=name, block_interrupts=block_interrupts, launch_dm=launch_dm,
                                device_state=device_state, console_log=console_log,
                                memory_limit_mib=memory_limit_mib)
        if isolation != "thread":
            raise ForkError(f"isolation must be thread or process, not {isolation!r}")
        if memory_limit_mib is not None:
            raise ForkError("a memory limit needs a process fork (isolation='process'): in-process forks share "
                            "their process's memory")
        image = self.memory.freeze()
        state = self._state_for_forks()
        if block_interrupts:
            state = dataclasses.replace(state, vcpus=tuple(_blocked(v) for v in state.vcpus))
        if device_state is not None:
            state = dataclasses.replace(state, devices=device_state)
        self._fork_count += 1
        child_name = name or f"{self.name}-fork-{self._fork_count}"
        child = self._spawn(child_name, image, state, launch_dm=launch_dm, block_interrupts=block_interrupts,
                            console_log=console_log)
        child.pause_on_device_access = pause_on_device_access
        if new_generation and vmgenid.present(self):
            child._vmgenid = True       # type: ignore[attr-defined]
            vmgenid.new_generation(child)
        return child

    def _spawn(self, name: str, image: MemoryImage, state: MachineState, *, launch_dm: LaunchDm,
               block_interrupts: bool, console_log: str | None) -> VM:
        pool = shell_pool(self.shape)
        pool.prefer(image)
        shell = pool.take()
        try:
            premapped = shell.premapped is not None and shell.premapped == image.base_fd and not image.layers
            memory = GuestMemory.fork_of(image, shell.host_addr, base=self.memory, premapped=premapped)
            shell.premapped = None
        except BaseException:
            pool.give_back(shell)
            raise
        memory.bind(shell.vm, dirty_logging=True)
        try:
            child = VM(shell, memory, name=name, console_log=console_log, with_devices=launch_dm == "yes")
            child.irqs_blocked = block_interrupts
            child.launch_dm = launch_dm
            child.fork_state = state
            Machine.restore(child, state, devices=launch_dm == "yes")
        except BaseException:
            memory.close(unmap_view=False)
            pool.give_back(shell)
            raise
        child.parent = self
        self.children.append(child)
        self.memory.readonly = f"{self.name} has live forks"
        return child

    # --- reset --------------------------------------------------------------------------------------------------

    def reset(self, *, memory: bool = True, state: bool = True) -> int:
        """Return a fork to its parent's state: the pages written since the last reset get the parent's content
        back (`memory`) and every vCPU, the platform and the devices get the fork-time state (`state`).
        Returns the number of pages restored."""
        if self.fork_state is None:
            raise ForkError(f"{self.name} is not a fork: only forks can be reset")
        if self.state == "running":
            raise ForkError(f"cannot reset {self.name} while it runs: pause it first")
        if self.state == "destroyed":
            raise ForkError(f"cannot reset {self.name}: it is destroyed")
        if self.children:
            names = ", ".join(ch.name for ch in self.children)
            raise ForkError(f"cannot reset {self.name}: its forks ({names}) depend on its current state")
        pages = self.memory.reset_to_base() if memory else 0
        if state:
            st = self.fork_state
            prepared = self._reset_plan
            if prepared is None or prepared[0] is not st:
                prepared = self._reset_plan = (st, ResetPlan(self.vcpus, st.vcpus, self.vm.fd,
                                                             st.platform.restore_plan()))
            prepared[1].restore()
            # The fork-time device states were checked when the fork was made: restore them directly, and only
            # when a port access (or console input) may have changed a device since the last restore.
            touched = self.bus.touched
            if touched and st.devices is not None:
                states = st.devices.states
                for d in touched:
                    saved = states.get(d.name)
                    if saved is not None:      # devices outside the device model (e.g. the debug port) have none
                        d.restore(saved)
                touched.clear()
            self._generation += 1
            if self.state == "crashed":
                self.state = "paused"
        if self._vmgenid_id is not None:
            vmgenid.renotify(self)
        return pages

    # --- device model -------------------------------------------------------------------------------------------

    def attach_device_model(self, device_state: DeviceSetState | None = None, *,
                            console_log: str | None = None) -> None:
        """Give a machine without devices (a fork made with launch_dm "no" or "late", or a machine restored from
        such a fork's save file) the standard device set, in `device_state` (from `load_device_state()`, or the
        parent's) or else fresh. A state for another device set is refused with a DeviceStateError naming the
        mismatch, before anything changes.

        From now on the devices answer their ports and drive their interrupt lines (a machine without a device
        model raises none). If the machine stopped at a device access (`pause_on_device_access`) and has not run
        since, that access is delivered to the new device model: a write reaches the device, a read (not a string
        read) returns the device's answer instead of all ones. A later `reset()` returns the devices to
        `device_state`."""
        self._require_paused("attach a device model to")
        if self.devices:
            raise ForkError(f"{self.name} already has a device model")
        from .devices import standard_devices
        log = console_log if console_log is not None else self.console_log
        devices = standard_devices(self, ram_size=self.memory.size, console_log=log)
        try:
            if device_state is not None:
                DeviceSetState.restore_all(devices, device_state)
        except BaseException:
            for d in devices:
                close = getattr(d, "close", None)
                if close is not None:
                    close()
            raise
        attached = DeviceSetState.capture_all(devices)
        self.console_log = log
        for port, n in self.bus.unknown_accesses.items():
            self.dm_accesses[port] = self.dm_accesses.get(port, 0) + n
        self.attach_devices(devices)
        self.bus.on_unknown = self._on_device_access
        self.launch_dm = "yes"
        self._replay_device_access()
        self._generation += 1
        if self.fork_state is not None:
            self.fork_state = dataclasses.replace(self.fork_state, devices=attached)

    def device_accesses(self) -> dict[int, int]:
        """{port: count} of the port accesses no device answered (reads and writes), since this machine was made:
        for a machine without a device model, every port access it made."""
        out = dict(self.dm_accesses)
        for port, n in self.bus.unknown_accesses.items():
            out[port] = out.get(port, 0) + n
        return out

    def _on_device_access(self, port: int, is_write: bool, size: int) -> None:
        """PortBus hook, on the vCPU thread: the first access to a port no device answers."""
        if not self.pause_on_device_access:
            return
        access = self._exit_access(port, is_write, size)
        value = f", value {access.values[0]:#x}" if access is not None and access.values else ""
        detail = (f"port {port:#x} {'write' if is_write else 'read'}, {size} byte{'s' if size > 1 else ''}{value}; "
                  "no device answers it (answered as absent hardware)")
        event = StopEvent("device-access", None, access.vcpu if access is not None else None, detail)
        self._stop(event)
        if self._pending_stop is event:             # this access is what stops the machine (not another vCPU's)
            self._dm_pending = access

    def _exit_access(self, port: int, is_write: bool, size: int) -> _DeviceAccess | None:
        """The port-I/O exit the calling vCPU thread is handling, as a value."""
        me = threading.get_ident()
        vcpu = next((v for v in self.vcpus if self._kicker.tids[v.index] == me), None)
        if vcpu is None or vcpu.run.exit_reason != c.KVM_EXIT_IO:
            return None
        io = vcpu.run.exit.io
        if io.port != port or io.size != size or size not in _IO_CTYPES:
            return None
        values: tuple[int, ...] = ()
        if is_write:
            addr, ctype = vcpu.fd.run_addr + io.data_offset, _IO_CTYPES[size]
            values = tuple(ctype.from_address(addr + i * size).value for i in range(io.count))
        return _DeviceAccess(vcpu.index, port, is_write, size, int(io.count), values, self._generation)

    def _replay_device_access(self) -> None:
        access, self._dm_pending = self._dm_pending, None
        if access is None or access.generation != self._generation or self.bus.device_at(access.port) is None:
            return                                  # it ran, was reset or restored since, or the port has no device
        if access.is_write:
            for value in access.values:
                self.bus.io_write(access.port, access.size, value)
        elif access.count == 1:                     # IN put all ones in the accumulator; give it the real answer
            value = self.bus.io_read(access.port, access.size)
            vcpu = self.vcpus[access.vcpu]
            regs = vcpu.get_regs()
            keep = 0 if access.size == 4 else ((1 << 64) - 1) ^ ((1 << (8 * access.size)) - 1)
            regs.rax = (regs.rax & keep) | value
            vcpu.set_regs(regs)

    def _release(self) -> None:
        if self.fork_state is None and self.memory.fd is not None:
            pool = _pools.get(self.shape)
            if pool is not None:
                pool.forget(self.memory.fd)
        shell = self.shell
        if self.fork_state is not None and shell.owns_addr and shell.vcpus:
            self.memory.close(unmap_view=False)
            shell_pool(self.shape).give_back(shell)
            return
        super()._release()


def create(*, memory_mib: int = 256, vcpus: int = 1, name: str = "vm", console_log: str | None = None,
           cpuid: str | None = None) -> VM:
    """A new root machine (`cpuid`: its CPUID policy, see Machine.create)."""
    vm = VM.create(memory_mib=memory_mib, vcpus=vcpus, name=name, console_log=console_log, cpuid=cpuid)
    assert isinstance(vm, VM)
    return vm


__all__ = ["VM", "ShellPool", "create", "shell_pool"]
