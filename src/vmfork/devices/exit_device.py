"""The exit device: a one-byte port (0xf4) that stops the machine with an exit status.

A write of `v` calls `ctx.request_stop("exit", v & 0xff)`, so a guest ends a test run with `outb(status, 0xf4)`
and vmfork reports exactly `status`. QEMU's isa-debug-exit device answers the same write by exiting with
`(v << 1) | 1`; guests written for both must not rely on the raw number. Reads return all ones (0xff for a byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, all_ones

__all__ = ["EXIT_PORT", "ExitDevice", "ExitDeviceState"]

EXIT_PORT = 0xF4


@dataclass(frozen=True, slots=True)
class ExitDeviceState(DeviceState):
    """The exit device remembers nothing; the state exists so every device has one."""

    KIND: ClassVar[str] = "exit-port"
    VERSION: ClassVar[int] = 1


class ExitDevice:
    state_type: ClassVar[type[DeviceState]] = ExitDeviceState

    def __init__(self, ctx: DeviceContext, *, name: str = "exit", port: int = EXIT_PORT) -> None:
        self.name = name
        self.ports: tuple[tuple[int, int], ...] = ((port, 1),)
        self._ctx = ctx

    def io_read(self, port: int, size: int) -> int:
        return all_ones(size)

    def io_write(self, port: int, size: int, value: int) -> None:
        self._ctx.request_stop("exit", value & 0xFF)

    def capture(self) -> ExitDeviceState:
        return ExitDeviceState()

    def restore(self, state: ExitDeviceState) -> None:
        if not isinstance(state, ExitDeviceState):
            raise DeviceStateError(f"{self.name}: expected an ExitDeviceState, got {type(state).__name__}")
