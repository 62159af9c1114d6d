"""The env channel (ports 0x520-0x521): named strings a guest reads, a different set per fork.

`fork(env={"hostname": "web-3"})` and `vmfork fork-vm --set hostname=web-3` give a fork strings its guest can read
(its hostname, a machine-id, a role): vmfork's answer to "every fork is an identical copy". The design follows
QEMU's fw_cfg (a selector port, a data port, a directory of named items), smaller and with its own ports and
signature, so no fw_cfg driver mistakes it for QEMU's:

    port 0x520  selector, 16 bits: a write selects an item and rewinds its read offset (a read returns the selector)
    port 0x521  data, read only: the selected item's next byte (a wider read gives the next bytes, little endian);
                past the item's end it reads 0

    selector 0x0000   header, 16 bytes: "VMFKENV1", u32 count, u32 generation
    selector 0x0001   directory: count entries of 64 bytes, in the order the strings were set:
                      u32 size, u16 selector, u16 reserved (0), char name[56] (NUL-padded)
    selector 0x0020+i the value of entry i (size bytes, no terminator)

All little endian. `generation` counts changes of the set (a guest agent can poll it). Names are shell
identifiers of at most 55 bytes; values are UTF-8 text without NUL, at most 4096 bytes; at most 64 strings. The
guest side is `guests/linux/vmfork-env` (`eval "$(vmfork-env)"`: sets the hostname from the string `hostname` and
exports all of them).

A fork starts with its parent's strings; `env=` sets (adds or replaces) some of them, and the result is part of the
fork's fork-time state, so `reset()` keeps it; forks of that fork inherit it. The state is a typed, versioned
`EnvChannelState` in the device set, carried by forks, save files and device-state files. A device-state set
written before this device existed restores with no strings (see DeviceSetState.restore_all).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceStateError, VmforkError
from .base import DeviceContext, DeviceState, all_ones

__all__ = ["DATA_PORT", "ENV_NAME", "MAX_STRINGS", "MAX_VALUE", "SELECTOR_PORT", "SIGNATURE", "EnvChannel",
           "EnvChannelState", "EnvError", "parse_assignments", "validate_env"]

SELECTOR_PORT = 0x520
DATA_PORT = 0x521
SIGNATURE = b"VMFKENV1"
SEL_HEADER = 0x0000
SEL_DIRECTORY = 0x0001
SEL_FIRST_VALUE = 0x0020
MAX_STRINGS = 64
MAX_VALUE = 4096
NAME_FIELD = 56
ENV_NAME = "env"            # the device's name in the standard device set
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,54}")


class EnvError(VmforkError):
    """A bad env string (name, value or count); the message names it."""


def _check(name: object, value: object) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EnvError(f"env name {name!r}: must be a shell identifier ([A-Za-z_][A-Za-z0-9_]*) "
                       f"of at most {NAME_FIELD - 1} characters")
    if not isinstance(value, str):
        raise EnvError(f"env {name}: the value must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise EnvError(f"env {name}: the value contains a NUL character")
    if len(value.encode()) > MAX_VALUE:
        raise EnvError(f"env {name}: the value is {len(value.encode())} bytes, at most {MAX_VALUE} are allowed")


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` checked (names, values), as a plain dict; an EnvError names the first bad entry."""
    if not isinstance(env, Mapping):
        raise EnvError(f"env must be a mapping of names to strings, not {type(env).__name__}")
    for name, value in env.items():
        _check(name, value)
    if len(env) > MAX_STRINGS:
        raise EnvError(f"env has {len(env)} strings, at most {MAX_STRINGS} are allowed")
    return dict(env)


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--set KEY=VALUE` arguments as a dict (a later KEY wins); an EnvError names a malformed one."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise EnvError(f"--set {item!r}: expected KEY=VALUE")
        _check(name, value)
        out[name] = value
    return validate_env(out)


@dataclass(frozen=True, slots=True)
class EnvChannelState(DeviceState):
    """The strings (names and values in order), how often the set changed, and the guest's read position."""

    KIND: ClassVar[str] = "env-channel"
    VERSION: ClassVar[int] = 1

    names: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    generation: int = 0
    selector: int = 0
    offset: int = 0

    def validate(self) -> None:
        if len(self.names) != len(self.values):
            raise DeviceStateError(f"{self.KIND} state: {len(self.names)} names but {len(self.values)} values")
        if len(set(self.names)) != len(self.names):
            raise DeviceStateError(f"{self.KIND} state: a name appears twice")
        try:
            validate_env(dict(zip(self.names, self.values, strict=True)))
        except EnvError as e:
            raise DeviceStateError(f"{self.KIND} state: {e}") from None
        if not 0 <= self.generation < 1 << 32:
            raise DeviceStateError(f"{self.KIND} state: generation {self.generation} out of range")
        if not 0 <= self.selector <= 0xFFFF:
            raise DeviceStateError(f"{self.KIND} state: selector {self.selector:#x} out of range")
        if not 0 <= self.offset <= MAX_STRINGS * 64 + MAX_VALUE:
            raise DeviceStateError(f"{self.KIND} state: offset {self.offset} out of range")

    @property
    def env(self) -> dict[str, str]:
        return dict(zip(self.names, self.values, strict=True))

    def with_env(self, env: Mapping[str, str]) -> EnvChannelState:
        """This state with `env` set on top (added or replaced, order kept), generation + 1, read position at
        the header; an EnvError for bad strings."""
        merged = self.env
        merged.update(validate_env(env))
        merged = validate_env(merged)
        return EnvChannelState(tuple(merged), tuple(merged.values()), (self.generation + 1) & 0xFFFFFFFF, 0, 0)


class EnvChannel:
    state_type: ClassVar[type[DeviceState]] = EnvChannelState

    def __init__(self, ctx: DeviceContext, *, name: str = ENV_NAME, base: int = SELECTOR_PORT) -> None:
        self.name = name
        self.base = base
        self.ports: tuple[tuple[int, int], ...] = ((base, 2),)
        self._ctx = ctx
        self._state = EnvChannelState()
        self._items: dict[int, bytes] = {}
        self._build()

    def _build(self) -> None:
        st = self._state
        items = {SEL_HEADER: SIGNATURE + struct.pack("<II", len(st.names), st.generation)}
        directory = bytearray()
        for i, (name, value) in enumerate(zip(st.names, st.values, strict=True)):
            data = value.encode()
            directory += struct.pack("<IHH", len(data), SEL_FIRST_VALUE + i, 0)
            directory += name.encode().ljust(NAME_FIELD, b"\0")
            items[SEL_FIRST_VALUE + i] = data
        items[SEL_DIRECTORY] = bytes(directory)
        self._items = items

    @property
    def env(self) -> dict[str, str]:
        """The strings the guest sees now."""
        return self._state.env

    def io_read(self, port: int, size: int) -> int:
        st = self._state
        if port == self.base:
            return st.selector & all_ones(size)
        item = self._items.get(st.selector, b"")
        chunk = item[st.offset:st.offset + size]
        if st.offset < len(item):
            self._state = EnvChannelState(st.names, st.values, st.generation, st.selector,
                                          min(st.offset + size, len(item)))
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def io_write(self, port: int, size: int, value: int) -> None:
        if port != self.base:
            return                       # the data port is read only
        st = self._state
        self._state = EnvChannelState(st.names, st.values, st.generation, value & 0xFFFF, 0)

    def capture(self) -> EnvChannelState:
        return self._state

    def restore(self, state: EnvChannelState) -> None:
        if not isinstance(state, EnvChannelState):
            raise DeviceStateError(f"{self.name}: expected an EnvChannelState, got {type(state).__name__}")
        state.validate()
        rebuild = (state.names, state.values, state.generation) != (self._state.names, self._state.values,
                                                                    self._state.generation)
        self._state = state
        if rebuild:
            self._build()
