"""The env channel (vmfork.devices.envchannel): per-fork strings through a selector/data port pair, carried by
forks, resets, forks of forks, save files and device-state files; `fork-vm --set` for domains. A Linux guest
reading them with guests/linux/vmfork-env is in tests/test_envchannel_linux.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cli_harness import CliHarness
from guest import boot, run_to_ready
from vmfork.devices import DeviceSetState, standard_devices
from vmfork.devices.base import PortBus
from vmfork.devices.envchannel import (
    DATA_PORT,
    SELECTOR_PORT,
    SIGNATURE,
    EnvChannel,
    EnvChannelState,
    EnvError,
    parse_assignments,
)
from vmfork.errors import DeviceStateError, ForkError
from vmfork.fork import VM
from vmfork.snapshot import load_device_state, restore, save, save_device_state


class _Ctx:
    def set_irq(self, gsi: int, level: bool) -> None:
        pass

    def request_stop(self, reason: str, status: int | None) -> None:
        pass


def _read_item(bus: PortBus, selector: int, n: int) -> bytes:
    bus.io_write(SELECTOR_PORT, 2, selector)
    return bytes(bus.io_read(DATA_PORT, 1) for _ in range(n))


def _guest_view(bus: PortBus) -> tuple[int, dict[str, str]]:
    """What a guest reads: the generation and the strings, through the ports alone."""
    head = _read_item(bus, 0, 16)
    assert head[:8] == SIGNATURE
    count, generation = struct.unpack_from("<II", head, 8)
    directory = _read_item(bus, 1, 64 * count)
    out = {}
    for i in range(count):
        size, sel, _ = struct.unpack_from("<IHH", directory, 64 * i)
        name = directory[64 * i + 8:64 * i + 64].rstrip(b"\0").decode()
        out[name] = _read_item(bus, sel, size).decode()
    return generation, out


def test_the_port_protocol() -> None:
    dev = EnvChannel(_Ctx())
    bus = PortBus([dev])
    assert _guest_view(bus) == (0, {})
    dev.restore(EnvChannelState().with_env({"hostname": "web-3", "ROLE": "db 'primary'", "EMPTY": ""}))
    assert _guest_view(bus) == (1, {"hostname": "web-3", "ROLE": "db 'primary'", "EMPTY": ""})
    # a wider read gives the next bytes little endian, past the end reads 0, the selector reads back
    bus.io_write(SELECTOR_PORT, 2, 0)
    assert bus.io_read(DATA_PORT, 4) == int.from_bytes(b"VMFK", "little")
    assert bus.io_read(DATA_PORT, 4) == int.from_bytes(b"ENV1", "little")
    assert bus.io_read(SELECTOR_PORT, 2) == 0
    bus.io_write(SELECTOR_PORT, 2, 0x20)
    assert bytes(bus.io_read(DATA_PORT, 1) for _ in range(7)) == b"web-3\0\0"
    bus.io_write(SELECTOR_PORT, 2, 0x7777)              # no such item: zeros
    assert bus.io_read(DATA_PORT, 4) == 0
    bus.io_write(DATA_PORT, 1, 0x55)                   # the data port is read only
    # mid-read state is part of the state
    bus.io_write(SELECTOR_PORT, 2, 0x20)
    bus.io_read(DATA_PORT, 2)
    st = dev.capture()
    assert (st.selector, st.offset) == (0x20, 2)
    again = EnvChannel(_Ctx())
    again.restore(EnvChannelState.from_dict(st.to_dict()))
    assert PortBus([again]).io_read(DATA_PORT, 1) == ord("b")


@pytest.mark.parametrize("env, match", [
    ({"1abc": "x"}, "env name '1abc'"),
    ({"a-b": "x"}, "env name 'a-b'"),
    ({"A" * 56: "x"}, "at most 55"),
    ({"A": "x\0y"}, "NUL"),
    ({"A": "x" * 4097}, "4097 bytes"),
    ({f"K{i}": "" for i in range(65)}, "65 strings"),
])
def test_bad_strings_are_named(env: dict[str, str], match: str) -> None:
    with pytest.raises(EnvError, match=match):
        EnvChannelState().with_env(env)


def test_set_arguments() -> None:
    assert parse_assignments(["A=1", "B=x=y", "A=2", "C="]) == {"A": "2", "B": "x=y", "C": ""}
    with pytest.raises(EnvError, match="expected KEY=VALUE"):
        parse_assignments(["novalue"])


def test_a_device_set_stored_before_the_channel_restores_empty() -> None:
    devices = standard_devices(_Ctx(), ram_size=64 << 20, console_log=None)
    full = DeviceSetState.capture_all(devices)
    old = DeviceSetState({k: v for k, v in full.states.items() if k != "env"})
    devices[-1].restore(EnvChannelState().with_env({"A": "1"}))
    DeviceSetState.restore_all(devices, DeviceSetState.from_dict(old.to_dict()))
    assert devices[-1].env == {}
    bad = full.to_dict()
    bad["devices"]["env"]["names"] = ["A", "A"]
    bad["devices"]["env"]["values"] = ["1", "2"]
    with pytest.raises(DeviceStateError, match="env: env-channel state: a name appears twice"):
        DeviceSetState.from_dict(bad)


@pytest.fixture
def parent(pvh_guest: Path, machines: list) -> VM:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "demo", machines)
    run_to_ready(vm)
    return vm


def test_forks_get_their_strings_and_keep_them(parent: VM, machines: list,  # type: ignore[type-arg]
                                               tmp_path: Path) -> None:
    a = parent.fork(env={"hostname": "a", "ROLE": "web"})
    b = parent.fork(env={"hostname": "b"})
    plain = parent.fork()
    machines[:0] = [a, b, plain]
    assert _guest_view(a.bus) == (1, {"hostname": "a", "ROLE": "web"})
    assert _guest_view(b.bus) == (1, {"hostname": "b"})
    assert _guest_view(plain.bus) == (0, {})
    assert parent.device("env").env == {}
    # the fork runs (its guest exits) and is reset: the strings stay the fork's own
    assert a.run(timeout=30).reason == "exit"
    a.reset()
    assert _guest_view(a.bus) == (1, {"hostname": "a", "ROLE": "web"})
    # forks of forks inherit them, and set more on top
    grandchild = a.fork(env={"ROLE": "db", "ZONE": "2"})
    machines.insert(0, grandchild)
    assert _guest_view(grandchild.bus) == (2, {"hostname": "a", "ROLE": "db", "ZONE": "2"})
    # save files and device-state files carry them
    save(grandchild, tmp_path / "g.save")
    restored = restore(tmp_path / "g.save")
    machines.insert(0, restored)
    assert restored.device("env").env == {"hostname": "a", "ROLE": "db", "ZONE": "2"}
    save_device_state(b, tmp_path / "b.dm")
    assert load_device_state(tmp_path / "b.dm")["env"].env == {"hostname": "b"}   # type: ignore[attr-defined]


def test_a_bad_env_changes_nothing(parent: VM) -> None:
    count = parent._fork_count
    with pytest.raises(EnvError, match="env name 'no space'"):
        parent.fork(env={"no space": "x"})
    assert (parent.children, parent._fork_count, parent.memory.readonly) == ([], count, None)


@pytest.mark.parametrize("launch_dm", ["no", "late"])
def test_a_fork_without_a_device_model_keeps_its_strings_for_the_late_one(
        parent: VM, machines: list, launch_dm: str) -> None:  # type: ignore[type-arg]
    """fork(env=..., launch_dm="no"|"late") as `fork-vm --set --launch-dm no`: the strings wait in the fork-time
    state and its late device model has them, through a reset too. Refused in one line, as fork-vm refuses: strings
    for a fork of a machine without a device model (nothing changes)."""
    child = parent.fork(env={"hostname": "nodm", "ROLE": "a"}, launch_dm=launch_dm)  # type: ignore[arg-type]
    machines.insert(0, child)
    assert child.devices == []
    child.attach_device_model()
    assert _guest_view(child.bus) == (1, {"hostname": "nodm", "ROLE": "a"})
    assert child.run(timeout=30).reason == "exit"
    child.reset()
    assert _guest_view(child.bus) == (1, {"hostname": "nodm", "ROLE": "a"})
    # a fork without strings still gets a fresh device model; a bad string is named, changing nothing
    plain = parent.fork(launch_dm=launch_dm)  # type: ignore[arg-type]
    machines.insert(0, plain)
    count = parent._fork_count
    with pytest.raises(EnvError, match="env name 'no space'"):
        parent.fork(env={"no space": "x"}, launch_dm=launch_dm)  # type: ignore[arg-type]
    assert parent._fork_count == count
    with pytest.raises(ForkError, match=f"{plain.name} has no device model"):
        plain.fork(env={"A": "1"}, launch_dm="no")
    assert (plain.children, plain._fork_count) == ([], 0)
    plain.attach_device_model()
    assert _guest_view(plain.bus) == (0, {})


def test_fork_vm_set(ts: CliHarness) -> None:
    parent = ts.create(ts.config("parent", "demo"))
    ts.wait_state(parent, "paused")
    ts.ok("fork-vm", "-p", "--set", "hostname=web-1", "--set", "ROLE=a b", "parent")
    ts.ok("fork-vm", "-p", "--set", "hostname=web-2", "parent")
    ts.ok("save-devices-state", "parent-fork-1", str(ts.base / "f1.dm"))
    ts.ok("save-devices-state", "parent-fork-2", str(ts.base / "f2.dm"))
    assert load_device_state(ts.base / "f1.dm")["env"].env == {"hostname": "web-1", "ROLE": "a b"}  # type: ignore[attr-defined]
    assert load_device_state(ts.base / "f2.dm")["env"].env == {"hostname": "web-2"}  # type: ignore[attr-defined]
    before = ts.list_json()
    ts.fail("fork-vm", "--set", "bad name=1", "parent", match="env name 'bad name'")
    ts.fail("fork-vm", "--set", "novalue", "parent", match="expected KEY=VALUE")
    assert [(d["domid"], d["name"]) for d in ts.list_json()] == [(d["domid"], d["name"]) for d in before]


def _env_of(ts: CliHarness, domain: str) -> dict[str, str]:
    """The strings in a domain's env channel, as its device-state file carries them (what the guest reads)."""
    path = ts.base / f"{domain}.dm"
    ts.ok("save-devices-state", domain, str(path))
    env: dict[str, str] = load_device_state(path)["env"].env  # type: ignore[attr-defined]
    path.unlink()
    return env


def _domains(ts: CliHarness) -> list[tuple[object, ...]]:
    return [(e["domid"], e["name"], e["state"], e["launch_dm"]) for e in ts.list_json()]


def test_fork_vm_set_with_launch_dm_no_and_late(ts: CliHarness) -> None:
    """--set on a fork without a device model: the strings wait in its device state and its late device model
    has them; --launch-dm late --set adds more; a reset keeps them. Refused, changing nothing: a bad string, a fork
    that has its device model already, a parent without one."""
    ts.wait_state(ts.create(ts.config("parent", "demo")), "paused")
    ts.ok("fork-vm", "-p", "--launch-dm", "no", "--set", "hostname=nodm", "--set", "ROLE=a", "parent")
    assert ts.listed("parent-fork-1")["launch_dm"] == "no"
    ts.ok("fork-vm", "--launch-dm", "late", "--set", "ROLE=b", "--set", "ZONE=z", "parent-fork-1")
    assert _env_of(ts, "parent-fork-1") == {"hostname": "nodm", "ROLE": "b", "ZONE": "z"}
    ts.ok("fork-reset", "parent-fork-1")
    assert _env_of(ts, "parent-fork-1") == {"hostname": "nodm", "ROLE": "b", "ZONE": "z"}
    # a fork made without strings gets them with its late device model
    ts.ok("fork-vm", "-p", "--launch-dm", "no", "parent")
    before = _domains(ts)
    ts.fail("fork-vm", "--launch-dm", "late", "--set", "bad name=1", "parent-fork-2", match="env name 'bad name'")
    ts.fail("fork-vm", "--launch-dm", "late", "--set", "A=1", "parent-fork-1", match="already has a device model")
    ts.fail("fork-vm", "--launch-dm", "no", "--set", "A=1", "parent-fork-2", match="has no device model")
    assert _domains(ts) == before
    assert _env_of(ts, "parent-fork-1") == {"hostname": "nodm", "ROLE": "b", "ZONE": "z"}
    ts.ok("fork-vm", "--launch-dm", "late", "--set", "hostname=later", "parent-fork-2")
    assert _env_of(ts, "parent-fork-2") == {"hostname": "later"}
    assert _env_of(ts, "parent") == {}


def test_fork_vm_from_a_template_set(ts: CliHarness) -> None:
    """fork-vm --from FILE --set: the fork of the file has the strings, and keeps them through a reset; a template
    saved without a device model is refused with one line, changing nothing."""
    ts.env["XDG_CACHE_HOME"] = str(ts.base / "cache")
    ts.wait_state(ts.create(ts.config("tp", "demo")), "paused")
    tpl = ts.base / "tp.tpl"
    ts.ok("save", "--template", "tp", str(tpl))
    fork = ts.ok("fork-vm", "--from", str(tpl), "-p", "--set", "hostname=t1", "--set", "ROLE=x").strip()
    assert _env_of(ts, fork) == {"hostname": "t1", "ROLE": "x"}
    ts.ok("fork-reset", fork)
    assert _env_of(ts, fork) == {"hostname": "t1", "ROLE": "x"}
    other = ts.ok("fork-vm", "--from", str(tpl), "-p").strip()
    assert _env_of(ts, other) == {}
    # a template of a fork without a device model
    nodm = ts.ok("fork-vm", "-p", "--launch-dm", "no", "tp").strip()
    bare = ts.base / "bare.tpl"
    ts.ok("save", "--template", nodm, str(bare))
    before = _domains(ts)
    ts.fail("fork-vm", "--from", str(bare), "--set", "A=1", match="saved without a device model")
    ts.fail("fork-vm", "--from", str(tpl), "--set", "bad name=1", match="env name 'bad name'")
    ts.fail("fork-vm", "--from", str(tpl), "--launch-dm", "no", "--set", "A=1", match="--from takes")
    assert _domains(ts) == before


def test_process_forks_get_their_strings(parent: VM) -> None:
    p = parent.fork(isolation="process", env={"hostname": "proc-1"})
    try:
        assert p.capture().devices["env"].env == {"hostname": "proc-1"}  # type: ignore[union-attr, attr-defined]
    finally:
        p.destroy()
