"""The vmfork harness port (0xf6): a 32-bit register a guest writes markers to.

A write of 1 is the ready/start marker: `ctx.request_stop("harness-start", 1)` (the machine pauses right after the
`out`; by convention RDI holds the input buffer's guest-physical address and RSI its size). A write of 2 is the end
marker: `ctx.request_stop("harness-end", 2)`. Any other value stops with `("harness", value)`. Only port 0xf6
itself is a register; the device claims 0xf6-0xf9 (the bytes a 32-bit access at 0xf6 spans) so that no other
device lands there, and ignores accesses that start at 0xf7-0xf9. Reads return all ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, all_ones

__all__ = ["HARNESS_END", "HARNESS_PORT", "HARNESS_START", "HarnessPort", "HarnessState"]

HARNESS_PORT = 0xF6
HARNESS_START = 1
HARNESS_END = 2


@dataclass(frozen=True, slots=True)
class HarnessState(DeviceState):
    """`markers` counts the writes to the harness register (every value is a marker of some kind)."""

    KIND: ClassVar[str] = "harness-port"
    VERSION: ClassVar[int] = 1

    markers: int = 0

    def validate(self) -> None:
        if self.markers < 0:
            raise DeviceStateError(f"{self.KIND} state: markers = {self.markers} is negative")


class HarnessPort:
    state_type: ClassVar[type[DeviceState]] = HarnessState

    def __init__(self, ctx: DeviceContext, *, name: str = "harness", port: int = HARNESS_PORT) -> None:
        self.name = name
        self.port = port
        self.ports: tuple[tuple[int, int], ...] = ((port, 4),)
        self._ctx = ctx
        self.markers = 0

    def io_read(self, port: int, size: int) -> int:
        return all_ones(size)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port != self.port:
            return
        value &= all_ones(size)
        self.markers += 1
        if value == HARNESS_START:
            self._ctx.request_stop("harness-start", HARNESS_START)
        elif value == HARNESS_END:
            self._ctx.request_stop("harness-end", HARNESS_END)
        else:
            self._ctx.request_stop("harness", value)

    def capture(self) -> HarnessState:
        return HarnessState(markers=self.markers)

    def restore(self, state: HarnessState) -> None:
        if not isinstance(state, HarnessState):
            raise DeviceStateError(f"{self.name}: expected a HarnessState, got {type(state).__name__}")
        state.validate()
        self.markers = state.markers
