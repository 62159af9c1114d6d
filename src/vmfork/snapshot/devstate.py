"""Device-state files: the device model's state alone (every emulated device; not RAM, not vCPUs, not the in-kernel
irqchip), as QEMU's `xen-save-devices-state` writes it for Xen's `xl fork-vm -Q`.

The container is described in `container.py`: magic b"VMFKDEVS", header "format" "vmfork-device-state", one section
"devices" holding `DeviceSetState.to_dict()` as UTF-8 JSON, and the header keys "vm" (the machine's name),
"devices" (the device names, for a quick look), "created" and "vmfork".

A fork without a device model (`launch_dm="no"` or `"late"`) gets one from such a file:

    save_device_state(parent, "dm.state")
    child.attach_device_model(load_device_state("dm.state"))

A file for another device set (other device names, another device state version) is refused with a
`DeviceStateError` naming the mismatch: a state version this vmfork does not know when the file is loaded, other
device names when it is attached.
"""

from __future__ import annotations

import datetime
import json
import os

from .. import __version__
from ..devices import DeviceSetState
from ..errors import DeviceStateError, VmStateError
from ..vm import Machine
from .container import ContainerFile, ContainerWriter, SectionSpec

MAGIC = b"VMFKDEVS"
FORMAT = "vmfork-device-state"


def save_device_state(vm: Machine, path: str | os.PathLike[str]) -> DeviceSetState:
    """Write the state of every device of `vm` to `path` (atomically), and return it.

    Like `save()`: a paused machine stays paused; a running one is paused for the capture and resumed after it."""
    if vm.state == "destroyed":
        raise VmStateError(f"cannot save the device state of {vm.name}: it is destroyed")
    if not vm.devices:
        raise DeviceStateError(f"{vm.name} has no device model: there is no device state to save")
    resume = False
    if vm.state == "running":
        resume = vm.pause().reason == "pause"
    try:
        state = DeviceSetState.capture_all(vm.devices)
    finally:
        if resume and vm.state == "paused":
            vm.unpause()
    write_device_state(state, path, vm_name=vm.name)
    return state


def write_device_state(state: DeviceSetState, path: str | os.PathLike[str], *, vm_name: str = "") -> None:
    """Write a device-state value to `path` (atomically)."""
    data = json.dumps(state.to_dict(), separators=(",", ":")).encode()
    header = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "vmfork": __version__,
              "vm": vm_name, "devices": list(state.names)}
    with ContainerWriter(path, MAGIC, FORMAT, header, [SectionSpec("devices", len(data))]) as w:
        w.write("devices", data)
        w.commit()


def load_device_state(path: str | os.PathLike[str]) -> DeviceSetState:
    """Read a device-state file; a damaged or foreign file is a SnapshotFormatError, a device state this vmfork
    cannot use (unknown kind, other version, bad field) a DeviceStateError, both naming the file."""
    with ContainerFile.open(path, MAGIC, FORMAT) as f:
        raw = f.read("devices")
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise f.fail(f"section 'devices' is not valid JSON ({e})") from None
        try:
            return DeviceSetState.from_dict(data)
        except DeviceStateError as e:
            raise DeviceStateError(f"device-state file {f.path}: {e}") from None


__all__ = ["FORMAT", "MAGIC", "load_device_state", "save_device_state", "write_device_state"]
