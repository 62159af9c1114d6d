"""The debug port (0xf5): how vmfork's breakpoint stub in guest memory asks vmfork what to do.

On hosts whose KVM cannot intercept software breakpoints, the debugger (`vmfork.vmi.debug`) routes the guest's
#BP vector through a small kernel-mode stub that reads this port (`in al, 0xf5`). Reading the port calls the handler the
debugger installed, in the vCPU's exit, and the byte it returns is what the stub does next (1: return to the
interrupted code, whose frame vmfork has rewritten; 0: continue into the guest's own #BP handler). A machine without
the device answers 0xff, like any absent port, and the stub then handles vmfork's breakpoints it inherited by
itself (see the stub's description in vmfork/workarounds/bp_stub.py). Writes are ignored.

The device is not one of the standard devices: a debugger adds it to a machine's port bus when it arms the stub
and sets its `handler` to None when it detaches (the port then reads 0xff, as if absent). It keeps no state, and it
takes itself off the bus's `touched` set (which a fork reset uses to restore the devices the guest used), since it is
not part of the machine's device-state set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, PortBus, all_ones

__all__ = ["DEBUG_PORT", "DebugPort", "DebugPortState"]

DEBUG_PORT = 0xF5


@dataclass(frozen=True, slots=True)
class DebugPortState(DeviceState):
    """The debug port remembers nothing."""

    KIND: ClassVar[str] = "debug-port"
    VERSION: ClassVar[int] = 1


class DebugPort:
    state_type: ClassVar[type[DeviceState]] = DebugPortState

    def __init__(self, ctx: DeviceContext, handler: Callable[[], int] | None, *, bus: PortBus | None = None,
                 name: str = "debugport", port: int = DEBUG_PORT) -> None:
        self.name = name
        self.port = port
        self.ports: tuple[tuple[int, int], ...] = ((port, 1),)
        self._ctx = ctx
        self.handler = handler
        self._bus = bus
        self.reads = 0

    def io_read(self, port: int, size: int) -> int:
        if self._bus is not None:
            self._bus.touched.discard(self)
        self.reads += 1
        handler = self.handler
        return all_ones(size) if handler is None else handler() & all_ones(size)

    def io_write(self, port: int, size: int, value: int) -> None:
        if self._bus is not None:
            self._bus.touched.discard(self)

    def capture(self) -> DebugPortState:
        return DebugPortState()

    def restore(self, state: DebugPortState) -> None:
        if not isinstance(state, DebugPortState):
            raise DeviceStateError(f"{self.name}: expected a DebugPortState, got {type(state).__name__}")
