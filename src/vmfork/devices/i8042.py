"""Enough of the i8042 PS/2 controller for guests to find it, probe it and reset the machine through it.

Ports: 0x60 data, 0x64 status (read) / command (write). No keyboard or mouse is attached and the controller raises
no interrupts. What it does:

- status (0x64 read): OBF when a command result waits in the output buffer, the system flag (command byte bit 2),
  the "last write was a command" bit, and "keyboard not inhibited"; never input-buffer-full.
- data (0x60 read): the waiting command result (clearing OBF), or 0 when there is none.
- commands: 0x20 read command byte, 0x60 write command byte (next data byte), 0xA7/0xA8 disable/enable the aux
  port, 0xA9 test aux port (0x00), 0xAA self test (0x55, sets the system flag), 0xAB test keyboard port (0x00),
  0xAD/0xAE disable/enable the keyboard port, 0xD0 read output port, 0xD1 write output port (next data byte; a
  value with bit 0 clear pulls the CPU reset line), 0xF0-0xFF pulse output-port bits low for 6 us: a command with
  bit 0 clear (0xFE in particular) resets the machine through `ctx.request_stop("reset", None)`.
- data writes with no command waiting go to the (absent) keyboard and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, all_ones

__all__ = ["DATA_PORT", "I8042", "STATUS_PORT", "I8042State"]

DATA_PORT = 0x60
STATUS_PORT = 0x64

STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_CMD = 0x08  # last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited

CB_KBD_INT = 0x01
CB_AUX_INT = 0x02
CB_SYS = 0x04
CB_KBD_DISABLED = 0x10
CB_AUX_DISABLED = 0x20
CB_TRANSLATE = 0x40

DEFAULT_COMMAND_BYTE = CB_TRANSLATE | CB_SYS | CB_KBD_INT  # what a PC BIOS leaves behind
DEFAULT_OUTPUT_PORT = 0x03  # bit 0: CPU reset line not asserted, bit 1: A20 enabled

CMD_READ_CB = 0x20
CMD_WRITE_CB = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_BASE = 0xF0
CMD_RESET = 0xFE


@dataclass(frozen=True, slots=True)
class I8042State(DeviceState):
    """`pending_command` is the command waiting for its data byte (0 when none); `output` the byte waiting in the
    output buffer (None when OBF is clear)."""

    KIND: ClassVar[str] = "i8042"
    VERSION: ClassVar[int] = 1

    command_byte: int = DEFAULT_COMMAND_BYTE
    output_port: int = DEFAULT_OUTPUT_PORT
    pending_command: int = 0
    output: int | None = None
    last_write_command: bool = False

    def validate(self) -> None:
        for field in ("command_byte", "output_port", "pending_command"):
            value = getattr(self, field)
            if not 0 <= value <= 0xFF:
                raise DeviceStateError(f"{self.KIND} state: {field} = {value} is not a byte")
        if self.output is not None and not 0 <= self.output <= 0xFF:
            raise DeviceStateError(f"{self.KIND} state: output = {self.output} is not a byte")
        if self.pending_command not in (0, CMD_WRITE_CB, CMD_WRITE_OUTPUT_PORT):
            raise DeviceStateError(
                f"{self.KIND} state: pending_command {self.pending_command:#x} takes no data byte")


class I8042:
    """The PS/2 controller, without devices behind it."""

    state_type: ClassVar[type[DeviceState]] = I8042State

    def __init__(self, ctx: DeviceContext, *, name: str = "i8042") -> None:
        self.name = name
        self.ports: tuple[tuple[int, int], ...] = ((DATA_PORT, 1), (STATUS_PORT, 1))
        self._ctx = ctx
        self._command_byte = DEFAULT_COMMAND_BYTE
        self._output_port = DEFAULT_OUTPUT_PORT
        self._pending_command = 0
        self._output: int | None = None
        self._last_write_command = False

    def io_read(self, port: int, size: int) -> int:
        high = all_ones(size) & ~0xFF  # an 8-bit device: the upper bytes of a wide read float
        if port == STATUS_PORT:
            status = STATUS_UNLOCKED
            if self._output is not None:
                status |= STATUS_OBF
            if self._command_byte & CB_SYS:
                status |= STATUS_SYS
            if self._last_write_command:
                status |= STATUS_CMD
            return high | status
        value = self._output if self._output is not None else 0
        self._output = None
        return high | value

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == STATUS_PORT:
            self._last_write_command = True
            self._pending_command = 0
            self._command(value)
            return
        self._last_write_command = False
        pending, self._pending_command = self._pending_command, 0
        if pending == CMD_WRITE_CB:
            self._command_byte = value
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self._write_output_port(value)
        # else: a byte for the keyboard, which is not there

    def _command(self, cmd: int) -> None:
        if cmd == CMD_READ_CB:
            self._output = self._command_byte
        elif cmd in (CMD_WRITE_CB, CMD_WRITE_OUTPUT_PORT):
            self._pending_command = cmd
        elif cmd == CMD_DISABLE_AUX:
            self._command_byte |= CB_AUX_DISABLED
        elif cmd == CMD_ENABLE_AUX:
            self._command_byte &= ~CB_AUX_DISABLED
        elif cmd in (CMD_TEST_AUX, CMD_TEST_KBD):
            self._output = 0x00  # port test passed
        elif cmd == CMD_SELF_TEST:
            self._command_byte |= CB_SYS
            self._output = 0x55
        elif cmd == CMD_DISABLE_KBD:
            self._command_byte |= CB_KBD_DISABLED
        elif cmd == CMD_ENABLE_KBD:
            self._command_byte &= ~CB_KBD_DISABLED
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._output = self._output_port
        elif cmd >= CMD_PULSE_BASE:
            if not cmd & 0x01:
                self._ctx.request_stop("reset", None)
        # other commands: ignored

    def _write_output_port(self, value: int) -> None:
        self._output_port = value | 0x01  # the reset line is only pulsed; it reads back as released
        if not value & 0x01:
            self._ctx.request_stop("reset", None)

    @property
    def command_byte(self) -> int:
        return self._command_byte

    def capture(self) -> I8042State:
        return I8042State(
            command_byte=self._command_byte, output_port=self._output_port, pending_command=self._pending_command,
            output=self._output, last_write_command=self._last_write_command,
        )

    def restore(self, state: I8042State) -> None:
        if not isinstance(state, I8042State):
            raise DeviceStateError(f"{self.name}: expected an I8042State, got {type(state).__name__}")
        state.validate()
        self._command_byte = state.command_byte
        self._output_port = state.output_port
        self._pending_command = state.pending_command
        self._output = state.output
        self._last_write_command = state.last_write_command
