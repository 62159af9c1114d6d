"""Devices: the standard PC port devices of a vmfork machine and the state of a whole device set.

`standard_devices()` builds the fixed device set every machine gets, in a fixed order with stable names:

    serial0  16550A UART, COM1 0x3f8-0x3ff, IRQ 4      rtc      CMOS/RTC, 0x70-0x71
    i8042    PS/2 controller, 0x60 and 0x64              exit     exit device, 0xf4
    env      env channel, 0x520-0x521 (per-fork strings)  harness  harness port, 0xf6

`DeviceSetState` is the state of such a set ({name: state}); `capture_all()`/`restore_all()` take and load it,
checking that a stored set fits the machine's devices before touching any of them. A stored set from before the env
channel existed (the five other devices) restores with the env channel empty.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import DeviceStateError
from .base import DeviceContext, DeviceState, PortBus, PortDevice, UnknownPortHook, all_ones
from .envchannel import ENV_NAME, EnvChannel, EnvChannelState
from .exit_device import ExitDevice, ExitDeviceState
from .harness import HarnessPort, HarnessState
from .i8042 import I8042, I8042State
from .rtc import Rtc, RtcState
from .serial import Serial16550A, SerialState

__all__ = [
    "I8042",
    "STANDARD_DEVICE_NAMES",
    "STATE_TYPES",
    "DeviceContext",
    "DeviceSetState",
    "DeviceState",
    "EnvChannel",
    "EnvChannelState",
    "ExitDevice",
    "ExitDeviceState",
    "HarnessPort",
    "HarnessState",
    "I8042State",
    "PortBus",
    "PortDevice",
    "Rtc",
    "RtcState",
    "Serial16550A",
    "SerialState",
    "UnknownPortHook",
    "all_ones",
    "capture_all",
    "register_state_type",
    "restore_all",
    "standard_devices",
]

STANDARD_DEVICE_NAMES = ("serial0", "i8042", "rtc", "exit", "harness", "env")

STATE_TYPES: dict[str, type[DeviceState]] = {}
"""State class by KIND, for reading stored device states back."""


def register_state_type(cls: type[DeviceState]) -> type[DeviceState]:
    """Make `cls` known to `DeviceSetState.from_dict` (a KIND may be registered once)."""
    existing = STATE_TYPES.get(cls.KIND)
    if existing is not None and existing is not cls:
        raise ValueError(f"state kind {cls.KIND!r} is already used by {existing.__name__}")
    STATE_TYPES[cls.KIND] = cls
    return cls


for _cls in (SerialState, I8042State, RtcState, ExitDeviceState, HarnessState, EnvChannelState):
    register_state_type(_cls)


def standard_devices(ctx: DeviceContext, *, ram_size: int, console_log: str | None) -> list[PortDevice]:
    """The standard device set (see the module docstring), all driving `ctx`.

    `ram_size` (bytes) feeds the CMOS memory size fields; `console_log` is a file the UART appends its output to.
    """
    return [
        Serial16550A(ctx, name="serial0", log_path=console_log),
        I8042(ctx, name="i8042"),
        Rtc(ctx, name="rtc", ram_size=ram_size),
        ExitDevice(ctx, name="exit"),
        HarnessPort(ctx, name="harness"),
        EnvChannel(ctx, name=ENV_NAME),
    ]


def _names(names: Iterable[str]) -> str:
    listed = ", ".join(names)
    return listed if listed else "(none)"


@dataclass(frozen=True, slots=True)
class DeviceSetState:
    """The states of a device set, by device name, in device order. Immutable (`states` is a read-only mapping)."""

    VERSION: ClassVar[int] = 1

    states: Mapping[str, DeviceState]

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", types.MappingProxyType(dict(self.states)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.states)

    def __getitem__(self, name: str) -> DeviceState:
        return self.states[name]

    def __hash__(self) -> int:
        return hash(tuple(self.states.items()))

    def with_env(self, env: Mapping[str, str]) -> DeviceSetState:
        """This set with `env` set (added or replaced) in its env channel (an empty channel if the set has none
        yet); an EnvError for bad strings."""
        current = self.states.get(ENV_NAME)
        if not isinstance(current, EnvChannelState):
            current = EnvChannelState()
        return DeviceSetState({**self.states, ENV_NAME: current.with_env(env)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"version": 1, "devices": {name: state.to_dict(), ...}}."""
        return {"version": self.VERSION, "devices": {name: s.to_dict() for name, s in self.states.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSetState:
        """Rebuild from `to_dict()` output; a stored state of another version or unknown kind is a
        `DeviceStateError` naming the device."""
        if not isinstance(data, Mapping):
            raise DeviceStateError(f"device-state set: expected a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != cls.VERSION:
            raise DeviceStateError(f"device-state set version {version}, this vmfork supports {cls.VERSION}")
        devices = data.get("devices")
        if not isinstance(devices, Mapping):
            raise DeviceStateError("device-state set: \"devices\" must be an object of {name: state}")
        states: dict[str, DeviceState] = {}
        for name, entry in devices.items():
            if not isinstance(entry, Mapping):
                raise DeviceStateError(f"{name} state: expected a JSON object, got {type(entry).__name__}")
            kind = entry.get("kind")
            state_type = STATE_TYPES.get(kind) if isinstance(kind, str) else None
            if state_type is None:
                raise DeviceStateError(f"{name} state has unknown kind {kind!r}")
            stored_version = entry.get("version")
            if stored_version != state_type.VERSION:
                raise DeviceStateError(
                    f"{name} state version {stored_version}, this vmfork supports {state_type.VERSION}")
            try:
                states[name] = state_type.from_dict(entry)
            except DeviceStateError as e:
                raise DeviceStateError(f"{name}: {e}") from None
        return cls(states)

    @staticmethod
    def capture_all(devices: Iterable[PortDevice]) -> DeviceSetState:
        """The state of every device, by name."""
        states: dict[str, DeviceState] = {}
        for device in devices:
            if device.name in states:
                raise DeviceStateError(f"two devices are named {device.name!r}")
            states[device.name] = device.capture()
        return DeviceSetState(states)

    @staticmethod
    def restore_all(devices: Sequence[PortDevice], state: DeviceSetState) -> None:
        """Restore every device from `state`, after checking the whole set fits: the same device names, and for
        each device a state of its own type and version. On a mismatch nothing is restored."""
        have = [d.name for d in devices]
        stored = list(state.states)
        if stored and ENV_NAME in have and ENV_NAME not in stored:
            # a set stored before the env channel existed: the channel starts empty
            state = DeviceSetState({**state.states, ENV_NAME: EnvChannelState()})
            stored.append(ENV_NAME)
        if sorted(have) != sorted(stored) or len(set(have)) != len(have):
            raise DeviceStateError(f"device-state file has devices {_names(stored)}, this VM has {_names(have)}")
        for device in devices:
            s = state.states[device.name]
            expected = device.state_type
            if s.KIND != expected.KIND or not isinstance(s, expected):
                raise DeviceStateError(f"{device.name} state is a {s.KIND!r} state, "
                                       f"this VM's {device.name} needs a {expected.KIND!r} state")
            if s.VERSION != expected.VERSION:
                raise DeviceStateError(
                    f"{device.name} state version {s.VERSION}, this vmfork supports {expected.VERSION}")
            try:
                s.validate()
            except DeviceStateError as e:
                raise DeviceStateError(f"{device.name}: {e}") from None
        for device in devices:
            device.restore(state.states[device.name])


capture_all = DeviceSetState.capture_all
restore_all = DeviceSetState.restore_all
