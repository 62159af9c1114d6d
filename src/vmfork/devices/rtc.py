"""The CMOS RAM and real-time clock (MC146818-compatible) at ports 0x70 (index) and 0x71 (data).

Port 0x70 takes the register index; its bit 7 is the NMI-disable bit of a PC (remembered, not acted on). Reads of
0x70 return 0xff (the index register is write-only). Port 0x71 reads and writes the indexed register.

The clock is the guest clock: host wall time (`clock()`, default `time.time`) plus an offset kept in the state.
The guest starts at host time (offset 0) unless `start_time` is given, and setting the time moves the offset.
Time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (Sunday = 1), 0x07 day of month,
0x08 month, 0x09 year, 0x32 century) are computed on every read, in UTC, encoded as register B asks: BCD unless
bit 2 (DM) is set, 12-hour with bit 7 = PM unless bit 1 (24/12) is set. While register B's SET bit (7) is set the
clock is frozen: the time registers read and write plain CMOS RAM, latched from the clock when SET was set, and
clearing SET starts the clock from what the guest wrote there. Writing a time register with SET clear changes that
field of the clock at once. Day-of-week writes are stored but do not move the clock (it follows from the date).

Registers A-D: A reads UIP = 0 (an update is never in progress), default 0x26; B defaults to 0x02 (24-hour, BCD);
C (interrupt flags) reads 0 (no periodic, alarm or update interrupts are generated); D reads 0x80 (valid RAM).

Memory size fields (as SeaBIOS and QEMU's PC machines use them), from `ram_size` and `low_ram_limit` (where RAM
below 4 GiB stops; the rest is above 4 GiB):
0x15/0x16 base memory in KiB (640); 0x17/0x18 and 0x30/0x31 KiB above 1 MiB, at most 65535; 0x34/0x35 64 KiB
units of RAM between 16 MiB and the below-4 GiB end, at most 65535; 0x5b-0x5d 64 KiB units of RAM above 4 GiB.
The standard checksum of 0x10-0x2d is stored at 0x2e (high) / 0x2f (low).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, all_ones

__all__ = ["CMOS_SIZE", "DATA_PORT", "INDEX_PORT", "Rtc", "RtcState", "cmos_memory_fields"]

INDEX_PORT = 0x70
DATA_PORT = 0x71
CMOS_SIZE = 128
NMI_DISABLE = 0x80

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)

A_UIP = 0x80
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate
B_SET = 0x80
B_BINARY = 0x04  # DM: binary instead of BCD
B_24H = 0x02
B_DEFAULT = B_24H
D_VRT = 0x80

DEFAULT_LOW_RAM_LIMIT = 0xE000_0000  # QEMU's i440fx PC keeps up to 3.5 GiB below 4 GiB
MIB = 1 << 20
GIB = 1 << 30


def cmos_memory_fields(ram_size: int, low_ram_limit: int = DEFAULT_LOW_RAM_LIMIT) -> dict[int, int]:
    """{CMOS offset: byte} for the memory size fields of a machine with `ram_size` bytes of RAM."""
    below_4g = min(ram_size, low_ram_limit)
    above_4g = ram_size - below_4g
    fields: dict[int, int] = {0x15: 640 & 0xFF, 0x16: 640 >> 8}
    ext_kib = min(max(ram_size // 1024 - 1024, 0), 0xFFFF)
    for lo, hi in ((0x17, 0x18), (0x30, 0x31)):
        fields[lo] = ext_kib & 0xFF
        fields[hi] = ext_kib >> 8
    above_16m = min(max(below_4g - 16 * MIB, 0) // 65536, 0xFFFF)
    fields[0x34] = above_16m & 0xFF
    fields[0x35] = above_16m >> 8
    high = min(above_4g // 65536, 0xFFFFFF)
    fields[0x5B] = high & 0xFF
    fields[0x5C] = (high >> 8) & 0xFF
    fields[0x5D] = high >> 16
    return fields


def _default_ram(ram_size: int, low_ram_limit: int) -> bytes:
    ram = bytearray(CMOS_SIZE)
    ram[REG_A] = A_DEFAULT
    ram[REG_B] = B_DEFAULT
    ram[REG_D] = D_VRT
    for offset, value in cmos_memory_fields(ram_size, low_ram_limit).items():
        ram[offset] = value
    checksum = sum(ram[0x10:0x2E])
    ram[0x2E] = checksum >> 8
    ram[0x2F] = checksum & 0xFF
    return bytes(ram)


@dataclass(frozen=True, slots=True)
class RtcState(DeviceState):
    """`index` is the last value written to port 0x70 (bit 7 = NMI disabled); `ram` the 128 CMOS bytes;
    `offset` the guest clock minus the host clock, in seconds."""

    KIND: ClassVar[str] = "cmos-rtc"
    VERSION: ClassVar[int] = 1

    index: int
    ram: bytes
    offset: float

    def validate(self) -> None:
        if not 0 <= self.index <= 0xFF:
            raise DeviceStateError(f"{self.KIND} state: index = {self.index} is not a byte")
        if len(self.ram) != CMOS_SIZE:
            raise DeviceStateError(f"{self.KIND} state: ram has {len(self.ram)} bytes, expected {CMOS_SIZE}")


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    hi, lo = value >> 4, value & 0x0F
    if hi > 9 or lo > 9:
        raise ValueError(f"{value:#x} is not BCD")
    return hi * 10 + lo


class Rtc:
    """The CMOS RTC. See the module docstring for the model."""

    state_type: ClassVar[type[DeviceState]] = RtcState

    def __init__(
        self,
        ctx: DeviceContext,
        *,
        name: str = "rtc",
        ram_size: int,
        low_ram_limit: int = DEFAULT_LOW_RAM_LIMIT,
        clock: Callable[[], float] = time.time,
        start_time: float | None = None,
    ) -> None:
        if ram_size < 1 * MIB:
            raise ValueError(f"ram_size {ram_size} is below 1 MiB")
        self.name = name
        self.ports: tuple[tuple[int, int], ...] = ((INDEX_PORT, 2),)
        self._ctx = ctx
        self._clock = clock
        self._index = 0
        self._ram = bytearray(_default_ram(ram_size, low_ram_limit))
        self._offset = 0.0 if start_time is None else start_time - clock()

    # -- port interface ---------------------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        high = all_ones(size) & ~0xFF
        if port == INDEX_PORT:
            return high | 0xFF
        return high | self._read(self._index & 0x7F)

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == INDEX_PORT:
            self._index = value
        else:
            self._write(self._index & 0x7F, value)

    @property
    def nmi_disabled(self) -> bool:
        return bool(self._index & NMI_DISABLE)

    # -- registers --------------------------------------------------------------------------------------------

    def _read(self, reg: int) -> int:
        ram = self._ram
        if reg in TIME_REGISTERS and not ram[REG_B] & B_SET:
            return self._time_fields(ram[REG_B])[reg]
        if reg == REG_A:
            return ram[REG_A] & ~A_UIP
        if reg == REG_C:
            value = ram[REG_C]
            ram[REG_C] = 0
            return value
        if reg == REG_D:
            return D_VRT
        return ram[reg]

    def _write(self, reg: int, value: int) -> None:
        ram = self._ram
        b = ram[REG_B]
        if reg in TIME_REGISTERS:
            ram[reg] = value
            if not b & B_SET and reg != REG_WEEKDAY:
                fields = self._time_fields(b)
                fields[reg] = value
                self._set_clock(fields, b)
        elif reg == REG_A:
            ram[REG_A] = value & ~A_UIP
        elif reg == REG_B:
            if value & B_SET and not b & B_SET:
                # freeze: latch the running time into RAM, in the mode being set
                for r, v in self._time_fields(value).items():
                    ram[r] = v
            elif b & B_SET and not value & B_SET:
                self._set_clock({r: ram[r] for r in TIME_REGISTERS}, value)
            ram[REG_B] = value
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            ram[reg] = value

    # -- clock ------------------------------------------------------------------------------------------------

    def guest_time(self) -> float:
        """The guest clock, in seconds since the epoch."""
        return self._clock() + self._offset

    def _time_fields(self, b: int) -> dict[int, int]:
        now = dt.datetime.fromtimestamp(int(self.guest_time()), dt.UTC)
        enc: Callable[[int], int] = (lambda v: v) if b & B_BINARY else _to_bcd
        if b & B_24H:
            hours = enc(now.hour)
        else:
            hours = enc(now.hour % 12 or 12) | (0x80 if now.hour >= 12 else 0)
        return {
            REG_SECONDS: enc(now.second),
            REG_MINUTES: enc(now.minute),
            REG_HOURS: hours,
            REG_WEEKDAY: enc(now.isoweekday() % 7 + 1),
            REG_DAY: enc(now.day),
            REG_MONTH: enc(now.month),
            REG_YEAR: enc(now.year % 100),
            REG_CENTURY: enc(now.year // 100),
        }

    def _set_clock(self, fields: dict[int, int], b: int) -> None:
        """Move the guest clock to the time in `fields` (register values in mode `b`); invalid times are ignored."""
        dec: Callable[[int], int] = (lambda v: v) if b & B_BINARY else _from_bcd
        try:
            raw_hours = fields[REG_HOURS]
            if b & B_24H:
                hour = dec(raw_hours)
            else:
                h12 = dec(raw_hours & 0x7F)
                if not 1 <= h12 <= 12:
                    return
                hour = h12 % 12 + (12 if raw_hours & 0x80 else 0)
            when = dt.datetime(
                dec(fields[REG_CENTURY]) * 100 + dec(fields[REG_YEAR]), dec(fields[REG_MONTH]),
                dec(fields[REG_DAY]), hour, dec(fields[REG_MINUTES]), dec(fields[REG_SECONDS]), tzinfo=dt.UTC,
            )
        except ValueError:
            return  # a field out of range or not BCD: the clock keeps running as it was
        self._offset = when.timestamp() - self._clock()

    # -- state ------------------------------------------------------------------------------------------------

    def capture(self) -> RtcState:
        return RtcState(index=self._index, ram=bytes(self._ram), offset=self._offset)

    def restore(self, state: RtcState) -> None:
        if not isinstance(state, RtcState):
            raise DeviceStateError(f"{self.name}: expected an RtcState, got {type(state).__name__}")
        state.validate()
        self._index = state.index
        self._ram = bytearray(state.ram)
        self._offset = state.offset
