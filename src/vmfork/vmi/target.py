"""What introspection needs from a machine: the `Target` protocol, and `LocalTarget` for an in-process VM.

Everything in `vmfork.vmi` reaches a machine through these few operations, so the same code serves a VM object in
this process (`LocalTarget`) and, later, a domain behind a control socket (a proxy implementing the protocol).
Registers travel as KVM's own structures (`kvm_regs`, `kvm_sregs`, `kvm_fpu`; `bytes(regs)` and
`Regs.from_buffer_copy()` turn them into bytes and back for a socket).

Consistency: every read of a paused machine is consistent. A running machine can be read too, but the result is
racy: memory may change during the read, and a running vCPU's registers are those of its last exit to vmfork.
Registers can only be written while the machine is paused (or, for the vCPU in question, from a debug handler that
runs in that vCPU's exit).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import VmStateError
from ..kvm import constants as c
from ..kvm import structs as s
from .errors import BreakpointError, VcpuIndexError

if TYPE_CHECKING:
    from ..vm import Machine, StopEvent

__all__ = ["DebugHandler", "LocalTarget", "Target", "as_target"]

DebugHandler = Callable[[int], int]
"""Called in a vCPU's exit when the guest reads the debug port, with the vCPU index; returns the byte read."""


@runtime_checkable
class Target(Protocol):
    """A machine as introspection sees it. Indexes of vCPUs run from 0 to `vcpu_count - 1`; a wrong one is a
    `VcpuIndexError`, an address outside guest RAM a `MemoryAccessError`."""

    @property
    def name(self) -> str: ...

    @property
    def vcpu_count(self) -> int: ...

    @property
    def state(self) -> str:
        """"paused", "running", "crashed" or "destroyed"."""
        ...

    def ram_ranges(self) -> Sequence[tuple[int, int]]:
        """Guest-physical (start, size) of every RAM range."""
        ...

    def read_phys(self, gpa: int, length: int) -> bytes: ...

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Write guest RAM; on a fork the pages count as written (a reset undoes the write)."""
        ...

    def get_regs(self, vcpu: int) -> s.Regs: ...

    def set_regs(self, vcpu: int, regs: s.Regs) -> None: ...

    def get_sregs(self, vcpu: int) -> s.Sregs: ...

    def set_sregs(self, vcpu: int, sregs: s.Sregs) -> None: ...

    def get_fpu(self, vcpu: int) -> s.Fpu: ...

    def run(self, timeout: float | None = None) -> StopEvent:
        """Run until the machine stops (in the calling thread where possible)."""
        ...

    def start(self) -> None:
        """Start running in the background."""
        ...

    def wait(self, timeout: float | None = None) -> StopEvent:
        """Wait for a started machine to stop; StopEvent("timeout") if it still runs after `timeout`."""
        ...

    def pause(self) -> StopEvent: ...

    def request_stop(self, reason: str, status: int | None = None) -> None:
        """Ask a running machine to stop (from any thread, or from a debug handler); returns at once."""
        ...

    def set_debug_handler(self, handler: DebugHandler | None) -> None:
        """Answer reads of the debug port (0xf5) with `handler(vcpu)`; None: the port reads as absent (0xff)."""
        ...

    def set_guest_debug(self, vcpu: int, control: int, debugregs: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG on one vCPU, as the debugger's claim (owner "debugger"; 0 releases it)."""
        ...

    def touch(self) -> None:
        """Note that vCPU state was changed from outside (forks taken later must see it)."""
        ...


class LocalTarget:
    """A `Target` for a machine in this process (`vmfork.fork.VM` or `vmfork.vm.Machine`)."""

    is_vmi_target = True        # as_target() takes it as it is, without a protocol check

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._exit = threading.local()
        self._ram: memoryview | None = None
        self._ram_of: object = None

    # --- identity and shape -------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def vcpu_count(self) -> int:
        return len(self.machine.vcpus)

    @property
    def state(self) -> str:
        return self.machine.state

    def ram_ranges(self) -> Sequence[tuple[int, int]]:
        return [(sl.gpa, sl.size) for sl in self.machine.memory.slots]

    def _alive(self) -> None:
        if self.machine.state == "destroyed" or self.machine.memory.closed:
            raise VmStateError(f"{self.machine.name} is destroyed")

    # --- memory -------------------------------------------------------------------------------------------------

    def read_phys(self, gpa: int, length: int) -> bytes:
        memory = self.machine.memory
        if memory.closed or self.machine.state == "destroyed":
            raise VmStateError(f"{self.machine.name} is destroyed")
        if length <= 0:
            if length < 0:
                raise ValueError(f"negative length {length}")
            return b""
        # fast path: a range inside one slot, straight from the mapping (most reads are a few bytes)
        for sl in memory.slots:
            if sl.gpa <= gpa and gpa + length <= sl.gpa + sl.size:
                if self._ram is None or self._ram_of is not memory.pages:
                    self._ram_of = memory.pages
                    self._ram = memory.pages.reshape(-1).data
                off = sl.offset + gpa - sl.gpa
                return bytes(self._ram[off:off + length])
        return memory.read(gpa, length)

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._alive()
        if data:
            self.machine.memory.write(gpa, data)

    # --- registers ----------------------------------------------------------------------------------------------

    def _vcpu_index(self, vcpu: int) -> int:
        n = len(self.machine.vcpus)
        if not isinstance(vcpu, int) or not 0 <= vcpu < n:
            raise VcpuIndexError(f"{self.machine.name} has no vCPU {vcpu} (it has {n}: 0..{n - 1})")
        return vcpu

    def _writable(self, vcpu: int, what: str) -> None:
        self._alive()
        if self.machine.state == "running" and getattr(self._exit, "vcpu", None) != vcpu:
            raise VmStateError(f"cannot set the {what} of {self.machine.name} while it runs: pause it first")

    def get_regs(self, vcpu: int) -> s.Regs:
        self._alive()
        return self.machine.vcpus[self._vcpu_index(vcpu)].get_regs()

    def set_regs(self, vcpu: int, regs: s.Regs) -> None:
        i = self._vcpu_index(vcpu)
        self._writable(i, "registers")
        self.machine.vcpus[i].set_regs(regs)
        self.touch()

    def get_sregs(self, vcpu: int) -> s.Sregs:
        self._alive()
        return self.machine.vcpus[self._vcpu_index(vcpu)].get_sregs()

    def set_sregs(self, vcpu: int, sregs: s.Sregs) -> None:
        i = self._vcpu_index(vcpu)
        self._writable(i, "system registers")
        self.machine.vcpus[i].set_sregs(sregs)
        self.touch()

    def get_fpu(self, vcpu: int) -> s.Fpu:
        i = self._vcpu_index(vcpu)
        self._alive()
        if self.machine.state == "running" and getattr(self._exit, "vcpu", None) != i:
            # KVM_GET_FPU would wait for the vCPU's next exit to user space, which may never come.
            raise VmStateError(f"cannot read the FPU registers of {self.machine.name} while it runs: pause it first")
        fpu = s.Fpu()
        self.machine.vcpus[i].fd.get_fpu(fpu)
        return fpu

    def touch(self) -> None:
        touch = getattr(self.machine, "touch", None)
        if touch is not None:
            touch()

    # --- running ------------------------------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> StopEvent:
        return self.machine.run(timeout=timeout)

    def start(self) -> None:
        self.machine.start()

    def wait(self, timeout: float | None = None) -> StopEvent:
        return self.machine.wait(timeout)

    def pause(self) -> StopEvent:
        return self.machine.pause()

    def request_stop(self, reason: str, status: int | None = None) -> None:
        self.machine.request_stop(reason, status)

    # --- debugging hooks ----------------------------------------------------------------------------------------

    def set_debug_handler(self, handler: DebugHandler | None) -> None:
        from ..devices.debugport import DEBUG_PORT, DebugPort
        bus = self.machine.bus
        dev = bus.device_at(DEBUG_PORT)
        if handler is None:
            if isinstance(dev, DebugPort):
                dev.handler = None
            return
        if dev is None:
            dev = DebugPort(self.machine, None, bus=bus)
            bus.add(dev)
        elif not isinstance(dev, DebugPort):
            raise BreakpointError(f"port {DEBUG_PORT:#x} of {self.machine.name} is taken by device {dev.name!r}")
        dev.handler = lambda: self._dispatch(handler)

    def _current_vcpu(self) -> int:
        """The vCPU whose exit is being handled in this thread."""
        vcpus = self.machine.vcpus
        if len(vcpus) == 1:
            return 0
        tids = getattr(getattr(self.machine, "_kicker", None), "tids", None)
        if tids is not None:
            me = threading.get_ident()
            for i, tid in enumerate(tids):
                if tid == me:
                    return i
        raise BreakpointError("cannot tell which vCPU read the debug port")

    def _dispatch(self, handler: DebugHandler) -> int:
        vcpu = self._current_vcpu()
        self._exit.vcpu = vcpu
        try:
            return handler(vcpu)
        finally:
            self._exit.vcpu = None

    def set_guest_debug(self, vcpu: int, control: int, debugregs: Sequence[int] = ()) -> None:
        """The debugger's KVM_SET_GUEST_DEBUG wishes, as the claim of owner "debugger" in the vCPU's shared guest-debug
        state (vmfork.guest_debug: other owners' hardware breakpoints and single-steps stay). 0 releases it."""
        i = self._vcpu_index(vcpu)
        if debugregs:
            raise BreakpointError("the debugger claims no hardware breakpoints through set_guest_debug")
        self.machine.vcpus[i].debug.claim("debugger", control=control & ~c.KVM_GUESTDBG_ENABLE)

    def __repr__(self) -> str:
        return f"<LocalTarget {self.machine.name}>"


_local_targets: weakref.WeakKeyDictionary[Machine, LocalTarget] = weakref.WeakKeyDictionary()


def as_target(obj: object) -> Target:
    """A Target for `obj`: a Target itself, or an in-process machine (one LocalTarget per machine)."""
    if getattr(type(obj), "is_vmi_target", False):
        return obj  # type: ignore[return-value]
    from ..vm import Machine
    if isinstance(obj, Machine):
        found = _local_targets.get(obj)
        if found is None:
            found = _local_targets[obj] = LocalTarget(obj)
        return found
    if hasattr(obj, "read_phys") and hasattr(obj, "get_sregs") and isinstance(obj, Target):
        return obj
    raise TypeError(f"not a machine or an introspection target: {obj!r}")
