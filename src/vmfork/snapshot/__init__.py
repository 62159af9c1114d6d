"""File formats: save files (a whole machine) and device-state files (the device model alone).

    from vmfork.snapshot import save, restore, save_device_state, load_device_state

    save(vm, "target.vmfork")                       # atomic; the machine is not changed
    vm2 = restore("target.vmfork")                  # paused exactly where `vm` was
    save_device_state(parent, "dm.state")           # as QEMU's xen-save-devices-state for Xen
    child.attach_device_model(load_device_state("dm.state"))

Damaged, truncated or foreign files raise SnapshotFormatError naming the part that is wrong; a save file this host's
CPU cannot run raises SnapshotHostError naming the missing features. The container format is in container.py.
"""

from .devstate import load_device_state, save_device_state, write_device_state
from .savefile import SaveInfo, info, restore, save

__all__ = ["SaveInfo", "info", "load_device_state", "restore", "save", "save_device_state", "write_device_state"]
