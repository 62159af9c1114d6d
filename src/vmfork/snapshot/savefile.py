"""Save files: `save` writes a whole machine to one file and `restore` makes a new machine from it, in either RAM
layout: compact (non-zero pages and a map, compact.py, which also describes the container sections and header) or
template (a page-aligned image mapped copy-on-write, template.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import vmgenid
from ..errors import SnapshotFormatError, VmStateError
from .compact import FORMAT, LAYOUTS, MAGIC, SaveInfo, layout_of, read_plan, read_ram, save_compact
from .container import ContainerFile
from .template import read_image_copy, restore_template, save_template

if TYPE_CHECKING:
    from ..fork import VM
    from ..vm import Machine

# --- save ---------------------------------------------------------------------------------------------------------

def save(vm: Machine, path: str | os.PathLike[str], *, template: bool = False) -> SaveInfo:
    """Write the whole machine to `path` (atomically: the file appears complete or not at all).

    The machine is not changed. A paused machine stays paused. A running one (started with `start()`; not one
    running inside `run()` in another thread) is paused for the save and resumed afterwards, whether the save
    succeeded or not (unless it stopped by itself meanwhile, e.g. at a harness marker: then it stays stopped, as it
    would have). A machine with live forks can be saved (it is paused and its RAM frozen anyway); forks can be
    saved too.

    `template=True` writes RAM as a page-aligned image with zero pages as holes, which a restore maps copy-on-write
    instead of reading (see template.py); the file is made read-only."""
    if vm.state == "destroyed":
        raise VmStateError(f"cannot save {vm.name}: it is destroyed")
    resume = False
    if vm.state == "running":
        resume = vm.pause().reason == "pause"
    try:
        if vm.state == "crashed":
            detail = vm.stop_event.detail if vm.stop_event else ""
            raise VmStateError(f"cannot save {vm.name}: it has crashed ({detail})")
        if template:
            return save_template(vm, Path(path))
        return save_compact(vm, Path(path))
    finally:
        if resume and vm.state == "paused":
            vm.unpause()



def restore(path: str | os.PathLike[str], *, paused: bool = True, name: str | None = None,
            console_log: str | None = None, template: bool | None = None, cpuid: str | None = None) -> VM:
    """A new machine exactly as saved in `path`: paused (or started, `paused=False`), named as saved unless `name`.

    Its vCPUs are shown the CPU the saved ones were (the saved CPUID policy), unless `cpuid` asks for another
    policy, which must not hide a feature the saved machine was given. A file saved under its host's default
    policy is refused where this host's default would hide a feature it was given (the guest may already use an
    instruction this host cannot run in guest kernel mode); the error names the feature.

    Everything but RAM is read and checked first (format, checksums, state sizes, this host's CPU); only then is a
    machine created, and if anything fails after that (RAM checksum, a KVM ioctl) it is destroyed before the error
    propagates: a failed restore leaves nothing behind.

    `template`: a file saved with `template=True` is mapped copy-on-write (None or True: the machine is then a fork
    of the file, resettable to it, and needs the file unchanged while it lives: see template.py) or read into fresh
    RAM like any other (False). True for a compact file is refused."""
    from ..fork import VM
    with ContainerFile.open(path, MAGIC, FORMAT) as f:
        layout = layout_of(f)
        if layout == "image" and template is not False:
            return restore_template(f, paused=paused, name=name, console_log=console_log, cpuid=cpuid)
        if layout == "compact" and template:
            raise SnapshotFormatError(f"{f.path} is a compact save file: only a file saved as a template "
                                      "(`vmfork save --template`) can be mapped")
        plan = read_plan(f, cpuid) if layout == "compact" else None
        vm: VM
        if plan is None:
            vm = read_image_copy(f, name=name, console_log=console_log, cpuid=cpuid)
        else:
            vm = VM.create(memory_mib=plan.shape.memory_mib, vcpus=plan.shape.vcpus, name=name or plan.name,
                           console_log=console_log, with_devices=plan.state.devices is not None,
                           cpuid=plan.shape.cpuid)
            try:
                read_ram(f, vm.memory, plan.bits)
                vm.restore(plan.state)
                vm.irqs_blocked = plan.block_interrupts
                vmgenid.new_generation(vm)
                if plan.state.devices is None:
                    vm.launch_dm = "no"
            except BaseException:
                vm.destroy()
                raise
    if not paused:
        vm.start()
    return vm


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A save file's header (container checks only: sections are not read)."""
    with ContainerFile.open(path, MAGIC, FORMAT) as f:
        return dict(f.header)


__all__ = ["FORMAT", "LAYOUTS", "MAGIC", "SaveInfo", "info", "restore", "save"]
