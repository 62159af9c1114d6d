"""The device interface: the context a device talks to, the port-device protocol, state values, and the port bus.

A device is driven by the machine's exit loop through a `PortBus`: one dict lookup per port I/O exit, then a call
of the device's `io_read`/`io_write`. A device reaches back into the machine only through its `DeviceContext`.

Every device state is a frozen dataclass deriving from `DeviceState`, which gives it a JSON-able
`to_dict()`/`from_dict()` pair with a version check, so save files and device-state files can store it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, Self, cast

from ..errors import DeviceStateError

__all__ = [
    "DeviceContext",
    "DeviceState",
    "PortBus",
    "PortDevice",
    "UnknownPortHook",
    "all_ones",
    "split_read",
    "split_write",
]


class DeviceContext(Protocol):
    """What a device may ask of the machine it sits in.

    `set_irq` may be called from a thread other than the vCPU thread (the UART's `feed()` raises its receive
    interrupt from the console thread), so implementations must be thread-safe (KVM_IRQ_LINE is).
    """

    def set_irq(self, gsi: int, level: bool) -> None:
        """Drive interrupt line `gsi` of the in-kernel irqchip to `level`."""
        ...

    def request_stop(self, reason: str, status: int | None) -> None:
        """Ask the machine to stop after the current exit, e.g. ("exit", 3) or ("reset", None)."""
        ...


class DeviceState:
    """Base of every device state value.

    Subclasses are `@dataclass(frozen=True, slots=True)` classes that set `KIND` (a stable type name stored in
    files) and `VERSION` (bumped whenever the fields change meaning). Fields may be `int`, `bool`, `float`, `str`,
    `bytes`, `tuple[int, ...]` or `X | None` of those; `to_dict()`/`from_dict()` convert them to and from JSON-able
    values (bytes as hex strings, tuples as lists). A subclass may override `validate()` to check ranges.
    """

    __slots__ = ()

    KIND: ClassVar[str]
    VERSION: ClassVar[int]

    def validate(self) -> None:
        """Raise `DeviceStateError` when a field is out of range. Called by `from_dict()` and device `restore()`."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: {"kind": KIND, "version": VERSION, field: value, ...}."""
        data: dict[str, Any] = {"kind": self.KIND, "version": self.VERSION}
        for name in _field_types(type(self)):
            data[name] = _encode(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a state from `to_dict()` output, checking kind, version, field names and field types."""
        if not isinstance(data, Mapping):
            raise DeviceStateError(f"{cls.KIND} state: expected a JSON object, got {type(data).__name__}")
        kind = data.get("kind")
        if kind != cls.KIND:
            raise DeviceStateError(f"{cls.KIND} state: the data is a {kind!r} state, not a {cls.KIND!r} state")
        version = data.get("version")
        if version != cls.VERSION:
            raise DeviceStateError(f"{cls.KIND} state version {version}, this vmfork supports {cls.VERSION}")
        hints = _field_types(cls)
        given = set(data) - {"kind", "version"}
        missing = [name for name in hints if name not in given]
        extra = sorted(given - set(hints))
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing field(s) " + ", ".join(missing))
            if extra:
                parts.append("unknown field(s) " + ", ".join(extra))
            raise DeviceStateError(f"{cls.KIND} state: " + "; ".join(parts))
        values = {name: _decode(cls.KIND, name, hint, data[name]) for name, hint in hints.items()}
        state: Self = cast(Any, cls)(**values)
        state.validate()
        return state


_FIELD_TYPES: dict[type[DeviceState], dict[str, Any]] = {}


def _field_types(cls: type[DeviceState]) -> dict[str, Any]:
    """Field name -> resolved type hint, in declaration order."""
    found = _FIELD_TYPES.get(cls)
    if found is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        hints = typing.get_type_hints(cls)
        found = _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return found


def _encode(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(kind: str, name: str, hint: Any, value: object) -> object:
    def bad(expected: str) -> DeviceStateError:
        return DeviceStateError(f"{kind} state: field {name}: expected {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{kind}.{name}: unsupported field type {hint!r}")
        return _decode(kind, name, inner[0], value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint is bytes:
        if not isinstance(value, str):
            raise bad("a hex string")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise bad("a hex string") from None
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{kind}.{name}: unsupported field type {hint!r}")
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_decode(kind, name, args[0], v) for v in value)
    raise TypeError(f"{kind}.{name}: unsupported field type {hint!r}")


class PortDevice(Protocol):
    """A device on the I/O port bus (see docs/design.md, "Devices").

    `state_type` is the device's state class: `DeviceSetState` uses it to check a stored state fits the device
    before restoring anything.
    """

    name: str
    ports: tuple[tuple[int, int], ...]
    state_type: ClassVar[type[DeviceState]]

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...

    def capture(self) -> DeviceState: ...

    def restore(self, state: Any) -> None: ...


def all_ones(size: int) -> int:
    """What a read of `size` bytes from a port nobody drives returns: all data lines float high."""
    return (1 << (8 * size)) - 1


UnknownPortHook = Callable[[int, bool, int], None]
"""Called as hook(port, is_write, size) on the first access to a port no device answers."""


MAX_UNKNOWN_MMIO = 4096           # distinct addresses PortBus.unknown_mmio counts one by one
UNKNOWN_MMIO_OTHER = -1           # ... and the key counting the rest


class PortBus:
    """Routes port I/O to devices with one dict lookup, and answers ports without a device like absent hardware.

    Reads of an unknown port return all ones for the access size, writes are dropped. Every access to an unknown
    port is counted in `unknown_accesses` ({port: count}, reads and writes together); `on_unknown`, if given, is
    called on the first access to each unknown port (a fork without a device model uses this to learn which ports
    a guest touches).

    A device receives the exact port of the access (not an offset) and the access size; a multi-byte access is
    routed by its first port only.

    No device is memory-mapped yet: MMIO exits (guest-physical addresses with neither RAM nor an in-kernel device)
    are answered like absent hardware too, reads all ones and writes dropped, counted per address in
    `unknown_mmio` (for the first MAX_UNKNOWN_MMIO addresses; later ones together under UNKNOWN_MMIO_OTHER, so a
    guest writing all over its address space cannot grow the table without end).
    """

    __slots__ = ("_devices", "_map", "on_unknown", "touched", "unknown_accesses", "unknown_mmio")

    def __init__(self, devices: Iterable[PortDevice] = (), *, on_unknown: UnknownPortHook | None = None) -> None:
        self._devices: list[PortDevice] = []
        self._map: dict[int, PortDevice] = {}
        self.unknown_accesses: dict[int, int] = {}
        self.unknown_mmio: dict[int, int] = {}
        # Devices accessed since the owner last cleared this: only their state can have changed (a fork reset
        # restores just these).
        self.touched: set[PortDevice] = set()
        self.on_unknown = on_unknown
        for device in devices:
            self.add(device)

    def add(self, device: PortDevice) -> None:
        """Map `device`'s port ranges; a port claimed twice is a programming error (ValueError)."""
        names = {d.name for d in self._devices}
        if device.name in names:
            raise ValueError(f"two devices named {device.name!r} on the port bus")
        claimed: list[int] = []
        for base, count in device.ports:
            if count < 1 or base < 0 or base + count > 0x10000:
                raise ValueError(f"{device.name}: bad port range ({base:#x}, {count})")
            claimed.extend(range(base, base + count))
        for port in claimed:
            other = self._map.get(port)
            if other is not None:
                raise ValueError(f"port {port:#x} is claimed by both {other.name} and {device.name}")
        for port in claimed:
            self._map[port] = device
        self._devices.append(device)

    @property
    def devices(self) -> tuple[PortDevice, ...]:
        """The devices in the order they were added."""
        return tuple(self._devices)

    def device_at(self, port: int) -> PortDevice | None:
        """The device answering `port`, or None."""
        return self._map.get(port)

    def io_read(self, port: int, size: int) -> int:
        device = self._map.get(port)
        if device is not None:
            self.touched.add(device)
            return device.io_read(port, size)
        self._unknown(port, False, size)
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        device = self._map.get(port)
        if device is not None:
            self.touched.add(device)
            device.io_write(port, size, value)
            return
        self._unknown(port, True, size)

    def _unknown(self, port: int, is_write: bool, size: int) -> None:
        count = self.unknown_accesses.get(port, 0)
        self.unknown_accesses[port] = count + 1
        if count == 0 and self.on_unknown is not None:
            self.on_unknown(port, is_write, size)

    def _count_mmio(self, addr: int) -> None:
        counts = self.unknown_mmio
        if addr not in counts and len(counts) >= MAX_UNKNOWN_MMIO:
            addr = UNKNOWN_MMIO_OTHER
        counts[addr] = counts.get(addr, 0) + 1

    def mmio_read(self, addr: int, size: int) -> int:
        self._count_mmio(addr)
        return (1 << (8 * size)) - 1

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._count_mmio(addr)


def split_read(read_byte: Callable[[int], int], offset: int, size: int, span: int) -> int:
    """Read `size` bytes of an 8-bit register file as successive byte accesses (like an ISA bus splits a wide
    access); offsets at or beyond `span` read as 0xff."""
    value = 0
    for i in range(size):
        o = offset + i
        value |= (read_byte(o) if o < span else 0xFF) << (8 * i)
    return value


def split_write(write_byte: Callable[[int, int], None], offset: int, size: int, value: int, span: int) -> None:
    """Write `size` bytes of an 8-bit register file as successive byte accesses; offsets beyond `span` are dropped."""
    for i in range(size):
        o = offset + i
        if o < span:
            write_byte(o, (value >> (8 * i)) & 0xFF)
