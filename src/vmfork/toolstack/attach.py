"""Forks of a domain: receiving a paused domain's RAM and state, and holding such a fork in a process that is not a
domain process.

A fork domain and a held fork get their parent the same way: they connect to the parent's control socket and run
`vmfork-fork-source`; the parent (paused) answers with its frozen RAM (the RAM files travel as SCM_RIGHTS file
descriptors with the reply) and its machine state. The connection then stays open for as long as the fork lives:
while it is open the parent stays paused, its RAM read-only, and `cont`/`quit` are refused naming the fork; when the
holding process ends for any reason, the kernel closes it and the parent is free.

A held fork (`vmfork fuzz --domain`) is an in-process machine of the holding process, so that process can fork it
again and run those forks at in-process speed. It has a registry entry of its own (kind "fuzz", state running, its
parent, its pid), so `vmfork list` shows it under its parent and the parent's rules apply to it like to any fork;
it has no control socket or console. The entry goes when the fork is let go, or at the next sweep if the holding
process was killed.

    from vmfork.toolstack.attach import hold_fork
    with hold_fork("target", kind="fuzz") as held:      # the domain must be paused
        child = held.vm.fork()                          # an ordinary in-process fork of the domain's RAM and state
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .. import vmgenid
from ..fork import VM, shell_pool
from ..memory import GuestMemory, MemoryImage, image_from_description
from ..vm import Machine, MachineState, Shell, open_kvm
from .client import open_registry, require_control, sweep
from .qmp import QmpChannel
from .registry import HELD_KINDS, DomainRecord, Registry
from .runtime import ToolstackError, pid_start_time

__all__ = ["ForkSource", "HeldFork", "fork_machine", "hold_fork", "receive_fork_source"]

# A caller's check of the parent before it is asked for its RAM: (the parent, its vmfork-query answer).
ParentCheck = Callable[[DomainRecord, dict[str, Any]], None]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ForkSource(NamedTuple):
    """What a paused parent domain hands a new fork (vmfork-fork-source)."""

    image: MemoryImage
    state: MachineState
    fds: list[int]                  # the received RAM files (the caller owns them; the image refers to them)
    dirty_ring: bool                # the fork logs written pages into dirty rings, else bitmaps (fork.dirty_log_mode)
    flush_translations: bool        # the fork drops KVM's translations at reset (VM.flush_translations_on_reset)


def receive_fork_source(link: QmpChannel, *, child: int, name: str) -> ForkSource:
    """Ask the parent at the other end of `link` for its RAM, its state and how its forks track memory
    (`vmfork-fork-source`). From this call on, the open link holds the fork."""
    src = link.execute("vmfork-fork-source", {"child": child, "name": name})
    fds = link.take_fds()
    try:
        image = image_from_description(src["image"], fds)
        state = MachineState.from_bytes(base64.b64decode(src["state"]))
    except BaseException:
        _close_fds(fds)
        raise
    # A parent from before these keys: rings and no flush, as its forks were made then.
    return ForkSource(image, state, fds, src.get("dirty_log", "ring") == "ring", bool(src.get("flush_translations")))


def fork_machine(image: MemoryImage, state: MachineState, *, name: str, with_devices: bool,
                 dirty_ring: bool = True, flush_translations: bool = False) -> VM:
    """An in-process machine over `image` (mapped copy-on-write) in `state`, resettable to it: what a fork domain
    runs, and what a held fork forks again. `dirty_ring` and `flush_translations`: as the parent says its forks
    need (ForkSource; for a Linux guest where kernel mode is emulated, bitmaps and a flush at reset)."""
    shell = Shell(open_kvm(), state.shape, dirty_logging=True, dirty_ring=dirty_ring)
    try:
        if image.slots != shell.slots or image.size != shell.size:
            raise ToolstackError(f"the parent's memory image does not fit a {state.shape.memory_mib} MiB machine")
        memory = GuestMemory.fork_of(image, shell.host_addr)
    except BaseException:
        shell.close()
        raise
    memory.bind(shell.vm, dirty_logging=True)
    try:
        vm = VM(shell, memory, name=name, with_devices=with_devices)
        vm.launch_dm = "yes" if with_devices else "no"
        vm.fork_state = state
        vm.flush_translations_on_reset = flush_translations
        Machine.restore(vm, state, devices=with_devices)
        vmgenid.new_generation(vm)
    except BaseException:
        memory.close(unmap_view=False)
        shell.close()
        raise
    return vm


@dataclass(eq=False)
class HeldFork:
    """A fork of a domain held by this process: `vm` is an in-process machine paused in the parent's state."""

    registry: Registry
    record: DomainRecord                    # this fork's registry entry
    parent: DomainRecord                    # the domain it is a fork of
    parent_info: dict[str, Any]             # the parent's vmfork-query answer when it was forked (state, reason, ...)
    vm: VM
    link: QmpChannel                        # open while the fork lives: the parent's hold on it
    fds: list[int] = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        """Destroy the machine and its forks, let the parent go, remove the entry. The link closes before the
        entry goes: a parent that sees a fork's entry gone waits for its link to close."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.vm.state != "destroyed":
                self.vm.destroy(tree=True)
            if self.fds:
                # Pooled shells premapped with the parent's RAM file must not outlive its descriptor.
                shell_pool(self.vm.shape).forget(self.fds[0])
        finally:
            self.link.close()
            _close_fds(self.fds)
            with contextlib.suppress(ToolstackError):
                self.registry.remove(self.record.domid)

    def __enter__(self) -> HeldFork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_parent(parent: DomainRecord, info: dict[str, Any]) -> None:
    """The parent must be paused (and not ended) to be forked; say so in the user's terms."""
    state, reason = info.get("state"), info.get("reason") or ""
    why = f" ({reason})" if reason else ""
    if state == "running":
        raise ToolstackError(f"{parent.label()} is running: it must be paused to be forked (vmfork pause "
                             f"{parent.domid})")
    if state in ("shutdown", "crashed"):
        raise ToolstackError(f"cannot fork {parent.label()}: it has {'crashed' if state == 'crashed' else 'shut down'}"
                             f"{why}")
    if state != "paused":
        raise ToolstackError(f"cannot fork {parent.label()}: it is {state}{why}, not paused")


def _reserve(reg: Registry, parent: DomainRecord, kind: str) -> DomainRecord:
    """This process's entry as a fork of `parent`, named `<parent>-<kind>-<n>` (state creating until it holds)."""
    pid = os.getpid()
    record = reg.reserve(name=None, auto_name=parent.name, auto_word=kind, parent=parent.domid, kind=kind,
                         config=dict(parent.config), launch_dm="yes", pid=pid, pid_start=pid_start_time(pid),
                         memory=parent.memory, vcpus=parent.vcpus)
    reg.update(record.domid, config={**parent.config, "name": record.name})
    return record


def hold_fork(domain: str | int, *, kind: str = "fuzz", check: ParentCheck | None = None,
              registry: Registry | None = None) -> HeldFork:
    """Fork the paused domain `domain` (domid or name) into this process and register the fork as
    `<parent>-<kind>-<n>`. `check` may refuse the parent (raise) with the caller's own message; it runs before the
    generic checks (paused, not ended) and before the parent's RAM is taken. Raises ToolstackError (one line) when
    the domain is unknown, gone, running, ended, or itself a held fork."""
    if kind not in HELD_KINDS:
        raise ValueError(f"kind must be one of {sorted(HELD_KINDS)}, not {kind!r}")
    reg = registry if registry is not None else open_registry()
    sweep(reg)
    parent = reg.find(domain)
    require_control(parent)
    link = QmpChannel.connect(parent.qmp_socket, timeout=60.0, pid=parent.pid, label=parent.label())
    record: DomainRecord | None = None
    fds: list[int] = []
    try:
        info = link.execute("vmfork-query")
        if check is not None:
            check(parent, info)
        _check_parent(parent, info)
        record = _reserve(reg, parent, kind)
        src = receive_fork_source(link, child=record.domid, name=record.name)
        fds = src.fds
        vm = fork_machine(src.image, src.state, name=record.name, with_devices=True, dirty_ring=src.dirty_ring,
                          flush_translations=src.flush_translations)
        reg.update(record.domid, state="running", reason=f"vmfork {kind} (pid {os.getpid()})")
    except BaseException:
        link.close()
        _close_fds(fds)
        if record is not None:
            with contextlib.suppress(ToolstackError):
                reg.remove(record.domid)
        raise
    return HeldFork(reg, record, parent, info, vm, link, fds)
