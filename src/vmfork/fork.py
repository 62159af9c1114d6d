"""VM forking: a paused parent is copied into children that share its RAM copy-on-write and start with its exact
CPU, platform and device state; a fork can be reset to that state, and forked again.

Creating a KVM VM with an irqchip costs milliseconds on this kind of host, far more than the whole fork budget, so
forks take pre-created shells (VM + vCPUs + irqchip + PIT + memory slots with dirty logging) from a pool refilled
in the background; a destroyed fork's shell goes back to the pool. The fork itself is then: map the parent's RAM
copy-on-write over the shell's slot range, and load the parent's captured state (cached while the parent stays
paused). Shells prepared for a root parent (prepare_forks) hold even that ahead: its RAM mapped, the clock-free
state loaded, and the fork's machine built with its devices in their fork-time states; such a fork names the
machine and issues the few ioctls that follow the clock.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import importlib
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

from . import vmgenid
from .devices import DeviceSetState
from .errors import ForkError
from .kvm import Entry, PackedPlan
from .kvm import constants as c
from .kvm import structs as s
from .memory import (
    PAGE_SHIFT,
    GuestMemory,
    MemoryImage,
)
from .shellpool import ShellPool, _drop_machine, _fork_plan, _holds, _image_file, _pools, shell_pool
from .vcpu import ResetPlan, VcpuState
from .vm import Machine, MachineState, Shell, StopEvent

LaunchDm = Literal["yes", "no", "late"]
DirtyLog = Literal["auto", "ring", "bitmap"]
LAPIC_TPR = 0x80

# Process forks are made one layer up, by vmfork.procfork (which imports this module): it registers its fork
# function here when it is imported, and `vmfork.VM` imports it, so this module never imports procfork.
_process_forker: Callable[..., Any] | None = None


def register_process_forker(maker: Callable[..., Any]) -> None:
    """Called by vmfork.procfork: `maker(parent, name=, block_interrupts=, launch_dm=, device_state=,
    console_log=, memory_limit_mib=, dirty_log=)` makes a process fork (VM.fork(isolation="process"))."""
    global _process_forker
    _process_forker = maker


_NO_PLAN = PackedPlan([])               # run_input's entry: the input and KVM_RUN, no ioctl before it


def machine_from_image(image: MemoryImage, state: MachineState, *, name: str, launch_dm: LaunchDm = "yes",
                       console_log: str | None = None, base: GuestMemory | None = None,
                       block_interrupts: bool = False, preferred_state: MachineState | None = None,
                       load: Callable[[VM, MachineState, bool, bool], None] | None = None,
                       dirty_ring: bool = True) -> VM:
    """A machine over `image` (mapped copy-on-write) in `state`, resettable to both: a fork when `image` is a
    parent's frozen RAM (`base`: that parent's in-process RAM, which saves mapping the image twice), a fork of a file
    when it is a template save file's RAM image. The shell comes from the pool of its shape (`preferred_state`: the
    state its shells may be preloaded with). `load(vm, state, devices, preloaded)` loads the state instead of
    Machine.restore (the fork path, which can use a shell preloaded with this very state, or the machine built in
    it ahead: _take_machine). `dirty_ring`: a shell that logs into dirty rings (else bitmaps; see
    dirty_log_mode)."""
    pool = shell_pool(state.shape, dirty_ring=dirty_ring)
    pool.prefer(image, preferred_state, base)
    shell = pool.take()
    if shell.machine is not None:
        vm = _take_machine(shell, image, state, base=base, name=name, launch_dm=launch_dm, console_log=console_log,
                           block_interrupts=block_interrupts, load=load)
        if vm is not None:
            return vm
    preloaded = load is not None and _holds(shell.preloaded, state)
    shell.preloaded = None                  # a shell prepared for another state: everything is set below
    try:
        if image.slots != shell.slots or image.size != shell.size:
            raise ForkError(f"the memory image does not fit a {state.shape.memory_mib} MiB machine")
        # The same descriptor number and the same file: a parent destroyed while a pool thread mapped its RAM
        # file may leave a shell whose descriptor number a newer parent's RAM file reuses.
        premapped = (shell.premapped is not None and shell.premapped == image.base_fd and not image.layers
                     and shell.premapped_file == _image_file(image))
        memory = GuestMemory.fork_of(image, shell.host_addr, base=base, premapped=premapped)
        shell.premapped = None
    except BaseException:
        pool.give_back(shell)
        raise
    memory.bind(shell.vm, dirty_logging=True)
    devices = launch_dm == "yes"
    try:
        vm = VM(shell, memory, name=name, console_log=console_log, with_devices=devices)
        vm.irqs_blocked = block_interrupts
        vm.launch_dm = launch_dm
        vm.fork_state = state
        if load is None:
            Machine.restore(vm, state, devices=devices)
        else:
            load(vm, state, devices, preloaded)
    except BaseException:
        memory.close(unmap_view=False)
        pool.give_back(shell)
        raise
    return vm


def _pooled_machine(shell: Shell, image: MemoryImage, state: MachineState, base: GuestMemory) -> VM:
    """What machine_from_image makes of a shell premapped with `image` and preloaded with `state` for a fork with
    the default arguments (devices, no console log, interrupts not blocked), up to the fork-time steps: the RAM
    view (copy-back source `base`), the machine with its devices in the fork-time device states. Built ahead by
    ShellPool.prepare_machines: nothing touches a pooled shell or these objects until a fork takes them."""
    memory = GuestMemory.fork_of(image, shell.host_addr, base=base, premapped=True)
    try:
        memory.bind(shell.vm, dirty_logging=True)
        vm = VM(shell, memory, name="pooled")
        vm.fork_state = state
        _fork_plan(shell, state)
        if state.devices is not None and vm.devices:
            DeviceSetState.restore_all(vm.devices, state.devices)
            vm.bus.touched.clear()
    except BaseException:
        memory.close(unmap_view=False)
        raise
    return vm


def _take_machine(shell: Shell, image: MemoryImage, state: MachineState, *, base: GuestMemory | None, name: str,
                  launch_dm: LaunchDm, console_log: str | None, block_interrupts: bool,
                  load: Callable[[VM, MachineState, bool, bool], None] | None) -> VM | None:
    """The fork from the machine ShellPool.prepare_machines built in `shell`, when it was built for exactly this
    fork: this state (block_interrupts, device_state and env make another), this parent's RAM, the default
    device model and console; else None (the machine is dropped, the shell goes the usual way)."""
    ready = shell.machine
    vm, vm_base = ready
    if (load is None or launch_dm != "yes" or console_log is not None or block_interrupts or vm_base is not base
            or vm.fork_state is not state or shell.preloaded is not state or image.layers
            or shell.premapped != image.base_fd or shell.premapped_file != _image_file(image)):
        _drop_machine(shell)
        return None
    shell.machine = shell.premapped = shell.preloaded = None
    Machine._ids += 1                       # numbered in the order forks are made, as built ones are
    vm.id = Machine._ids
    vm.name = name
    try:
        load(vm, state, False, True)        # the devices hold their fork-time states already
    except BaseException:
        vm.memory.close(unmap_view=False)
        shell_pool(state.shape, dirty_ring=shell.dirty_ring).give_back(shell)
        raise
    return vm


# Looked at once, when this module is imported (a module loaded with the host: fixed for this process). A jailed
# domain (toolstack/jail.py) imports this module before its jail hides /sys.
_KERNEL_MODE_EMULATED = os.path.isdir("/sys/module/kvm_pvm")


def kernel_mode_emulated() -> bool:
    """Whether this host's KVM emulates guest kernel mode instruction by instruction (kvm_pvm; host-kvm notes)."""
    return _KERNEL_MODE_EMULATED


def _ioapic_masked(ioapic: Any) -> bool:
    """Whether every input of this saved IOAPIC state (struct kvm_ioapic_state: base_address, ioregsel, id, irr,
    pad, then 24 redirection entries) is masked, with nothing in its IRR: no line raised by a device, the PIT or
    vmfork can then reach a LAPIC (PIC interrupts go to the vCPU as ExtINT, outside the LAPIC's state)."""
    data = bytes(ioapic.data)
    irr = int.from_bytes(data[16:20], "little")
    return irr == 0 and all(int.from_bytes(data[24 + 8 * i:32 + 8 * i], "little") & (1 << 16) for i in range(24))


def dirty_log_mode(parent: Machine, asked: str = "auto") -> str:
    """How forks of `parent` track written pages: "ring" or "bitmap" as asked; "auto" is "bitmap" for a Linux
    guest (a machine with vmfork's VMGenID device, which Linux kernels get by default) on a host that emulates
    guest kernel mode, "ring" otherwise. Why: emulated kernel-mode stores each log a ring entry (the bitmap
    dedupes them), so a Linux fork fills its 4,096-entry ring within one exit, exits to empty it again and again,
    and overflows (then a reset must scan the page tables); a fuzz target that writes a few pages per input resets
    faster from rings. VMFORK_DIRTY_RING=0 makes every fork use bitmaps."""
    if asked != "auto":
        return asked
    return "bitmap" if _linux_where_kernel_mode_is_emulated(parent) else "ring"


def _linux_where_kernel_mode_is_emulated(parent: Machine) -> bool:
    """A Linux guest (vmfork's VMGenID device, which Linux kernels get by default) on a host that emulates guest
    kernel mode: its forks log into bitmaps (dirty_log_mode) and drop KVM's translations at reset."""
    return kernel_mode_emulated() and vmgenid.present(parent)


def _blocked(st: VcpuState) -> VcpuState:
    """A copy of a vCPU state whose task priority blocks every maskable interrupt (TPR 0xFF, CR8 15)."""
    lapic = s.LapicState()
    ctypes.pointer(lapic)[0] = st.lapic
    ctypes.c_uint32.from_buffer(lapic.regs, LAPIC_TPR).value = 0xFF
    sregs = s.Sregs()
    ctypes.pointer(sregs)[0] = st.sregs
    sregs.cr8 = 15
    return dataclasses.replace(st, lapic=lapic, sregs=sregs)


_IO_CTYPES: dict[int, type[ctypes.c_uint8] | type[ctypes.c_uint16] | type[ctypes.c_uint32]] = {
    1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}


@dataclasses.dataclass(frozen=True, slots=True)
class _DeviceAccess:
    """A port access that stopped a machine (pause_on_device_access), as its vCPU's exit described it."""

    vcpu: int
    port: int
    is_write: bool
    size: int
    count: int                      # repetitions (string I/O)
    values: tuple[int, ...]         # the values written; empty for a read
    generation: int                 # the machine's state generation when it happened


class VM(Machine):
    """A machine that can be forked, and a fork that can be reset."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fork_state: MachineState | None = None     # what reset(state=True) returns to
        self.launch_dm: LaunchDm = "yes"
        self._fork_cache: tuple[int, MachineState] | None = None
        self._generation = 0
        self._reset_plan: tuple[MachineState, ResetPlan] | None = None     # for fork_state, built at first reset
        self._fork_count = 0
        self._checked_devices: DeviceSetState | None = None     # fork device states known to fit the device set
        self.dm_accesses: dict[int, int] = {}         # port accesses answered as absent hardware before a DM
        self.pause_on_device_access = False             # stop at the first access to each port no device answers
        self._dm_pending: _DeviceAccess | None = None   # the access that stopped it, for a device model attached late
        self.bus.on_unknown = self._on_device_access
        # Reset drops KVM's derived translations (memory.drop_translations) after restoring pages: set for forks of
        # guests that rewrite their page tables (Linux: processes come and go) on hosts that shadow them.
        self.flush_translations_on_reset = False
        self._vmgenid_id: bytes | None = None           # this fork's VM generation ID (vmgenid.py), if it has one
        # reset_and_run: ((pieces, compiled), host pieces, where pages start, {k: pages}), the pages the current
        # input writes, and the kvm.Entry values of steady-state resets (_steady_entry)
        self._entry_cache: tuple[Any, list[tuple[int, int]], list[tuple[int, int]],
                                 dict[int, frozenset[int]]] | None = None
        self._entries: dict[Any, tuple[Any, Any, Entry]] = {}
        self._steady_pages: frozenset[int] = frozenset()
        # What the last state reset left, for the next reset's proof that the guest did not touch the XCRs, debug
        # registers and clock-free MSRs since (_lean_count): (its plan, KVM's emulated-instruction count, exits,
        # generation) right after it
        self._lean_base: tuple[ResetPlan, int, int, int] | None = None
        self._reset_mark = -1               # _generation right after the last full reset() (just_reset)

    # Every change to the parent's state invalidates the cached state its forks start from.
    def _begin(self) -> None:
        self._generation += 1
        super()._begin()

    def restore(self, st: MachineState, *, devices: bool = True) -> None:
        self._generation += 1
        super().restore(st, devices=devices)

    def touch(self) -> None:
        """Note an out-of-band change to vCPU or device state (e.g. a register written by introspection)."""
        self._generation += 1

    def _state_for_forks(self) -> MachineState:
        cache = self._fork_cache
        if cache is not None and cache[0] == self._generation:
            return cache[1]
        st = self.capture()
        self._fork_cache = (self._generation, st)
        return st

    # --- fork ---------------------------------------------------------------------------------------------------

    def check_forkable(self) -> None:
        """Raise ForkError unless this machine can be forked now (it must exist, be paused and not crashed)."""
        if self.state == "destroyed":
            raise ForkError(f"cannot fork {self.name}: it is destroyed")
        if self.state == "running":
            raise ForkError(f"cannot fork {self.name} while it runs: pause it first")
        if self.state == "crashed":
            raise ForkError(f"cannot fork {self.name}: it has crashed")

    def prepare_forks(self, n: int, *, dirty_log: DirtyLog = "auto") -> None:
        """Have n VM shells ready for forks of this machine (made now, a few ms each), so forks skip creating a
        KVM VM and, for a root machine, mapping its RAM file and building the fork's machine (for forks with the
        default arguments, of the state it is in now; `dirty_log`: for forks made with that mode)."""
        pool = shell_pool(self.shape, dirty_ring=dirty_log_mode(self, dirty_log) == "ring")
        pool.prefer(self.memory.freeze(), self._state_for_forks() if self.state == "paused" else None,
                    self.memory)
        pool.refresh(n)
        pool.prefill(n)
        pool.prepare_machines(n, _pooled_machine)

    @overload
    def fork(self, *, name: str | None = ..., block_interrupts: bool = ..., launch_dm: LaunchDm = ...,
             device_state: DeviceSetState | None = ..., console_log: str | None = ...,
             memory_mib: int | None = ..., vcpus: int | None = ..., isolation: Literal["thread"] = ...,
             memory_limit_mib: None = ..., pause_on_device_access: bool = ...,
             new_generation: bool = ..., env: Mapping[str, str] | None = ...,
             dirty_log: DirtyLog = ...) -> VM: ...

    @overload
    def fork(self, *, name: str | None = ..., block_interrupts: bool = ..., launch_dm: LaunchDm = ...,
             device_state: DeviceSetState | None = ..., console_log: str | None = ...,
             memory_mib: int | None = ..., vcpus: int | None = ..., isolation: Literal["process"],
             memory_limit_mib: int | None = ..., pause_on_device_access: bool = ...,
             new_generation: bool = ..., env: Mapping[str, str] | None = ...,
             dirty_log: DirtyLog = ...) -> Any: ...

    def fork(self, *, name: str | None = None, block_interrupts: bool = False, launch_dm: LaunchDm = "yes",
             device_state: DeviceSetState | None = None, console_log: str | None = None,
             memory_mib: int | None = None, vcpus: int | None = None,
             isolation: Literal["thread", "process"] = "thread",
             memory_limit_mib: int | None = None, pause_on_device_access: bool = False,
             new_generation: bool = True, env: Mapping[str, str] | None = None,
             dirty_log: DirtyLog = "auto") -> Any:
        """A new machine identical to this paused one, sharing its RAM copy-on-write.

        `launch_dm`: "yes" gives the fork devices with this machine's device state (or `device_state`); "no" and
        "late" give it none (every port access is answered as by absent hardware and counted, see
        `device_accesses()`), and `attach_device_model()` can add them later. `pause_on_device_access`: the fork
        stops (StopEvent "device-access", naming port, direction and size) at the first access to each port no
        device answers. `new_generation`: a machine with a VMGenID device (Linux kernels; vmfork.vmgenid) gives the
        fork a new generation ID and notifies it, so the guest reseeds its RNG; False keeps the parent's. `env`:
        strings set (added or replaced) in the fork's env channel on top of the parent's (vmfork.devices.envchannel:
        the guest reads them, e.g. its hostname); they are part of the fork's fork-time state, so reset() keeps
        them, and a fork without a device model gets them with `attach_device_model()`. `dirty_log`: how the
        fork's written pages are tracked, "ring" (KVM's dirty rings), "bitmap" (KVM_GET_DIRTY_LOG) or "auto" (see
        dirty_log_mode)."""
        if dirty_log not in ("auto", "ring", "bitmap"):
            raise ForkError(f"dirty_log must be auto, ring or bitmap, not {dirty_log!r}")
        self.check_forkable()
        if env is not None:
            device_state = self._env_devices(device_state, env, launch_dm)
        if memory_mib is not None and memory_mib != self.shape.memory_mib:
            raise ForkError(f"a fork has its parent's memory: {self.name} has {self.shape.memory_mib} MiB, "
                            f"not {memory_mib}")
        if vcpus is not None and vcpus != self.shape.vcpus:
            raise ForkError(f"a fork has its parent's vCPUs: {self.name} has {self.shape.vcpus}, not {vcpus}")
        if launch_dm not in ("yes", "no", "late"):
            raise ForkError(f"launch_dm must be yes, no or late, not {launch_dm!r}")
        if isolation == "process":
            if pause_on_device_access:
                raise ForkError("pause_on_device_access is not available for process forks yet")
            if _process_forker is None:
                # The layer above registers itself when imported (no static import back up from here): load it.
                importlib.import_module("vmfork.procfork")
            if _process_forker is None:
                raise ForkError("process forks need vmfork.procfork, which did not register itself")
            return _process_forker(self, name=name, block_interrupts=block_interrupts, launch_dm=launch_dm,
                                   device_state=device_state, console_log=console_log,
                                   memory_limit_mib=memory_limit_mib, dirty_log=dirty_log)
        if isolation != "thread":
            raise ForkError(f"isolation must be thread or process, not {isolation!r}")
        if memory_limit_mib is not None:
            raise ForkError("a memory limit needs a process fork (isolation='process'): in-process forks share "
                            "their process's memory")
        image = self.memory.freeze()
        state = self._state_for_forks()
        if block_interrupts:
            state = dataclasses.replace(state, vcpus=tuple(_blocked(v) for v in state.vcpus))
        if device_state is not None:
            state = dataclasses.replace(state, devices=device_state)
        self._fork_count += 1
        child_name = name or f"{self.name}-fork-{self._fork_count}"
        child = self._spawn(child_name, image, state, launch_dm=launch_dm, block_interrupts=block_interrupts,
                            console_log=console_log, dirty_ring=dirty_log_mode(self, dirty_log) == "ring")
        child.pause_on_device_access = pause_on_device_access
        child.flush_translations_on_reset = _linux_where_kernel_mode_is_emulated(self)
        if new_generation and vmgenid.present(self):
            child._vmgenid = True       # type: ignore[attr-defined]
            vmgenid.new_generation(child)
        return child

    def _env_devices(self, device_state: DeviceSetState | None, env: Mapping[str, str],
                     launch_dm: LaunchDm) -> DeviceSetState:
        """The fork's device states with `env` set in its env channel (launch_dm "no"/"late": kept in its fork-time
        state for `attach_device_model()`, as `fork-vm --set --launch-dm no` keeps them)."""
        base = device_state if device_state is not None else self._state_for_forks().devices
        if base is None:
            raise ForkError(f"{self.name} has no device model, so its forks have no env channel")
        return base.with_env(env)

    def _spawn(self, name: str, image: MemoryImage, state: MachineState, *, launch_dm: LaunchDm,
               block_interrupts: bool, console_log: str | None, dirty_ring: bool = True) -> VM:
        child = machine_from_image(
            image, state, name=name, launch_dm=launch_dm, console_log=console_log, base=self.memory,
            block_interrupts=block_interrupts, dirty_ring=dirty_ring,
            preferred_state=self._fork_cache[1] if self._fork_cache is not None else None,
            load=lambda vm, st, devices, preloaded: self._load_fork_state(vm, st, devices=devices,
                                                                          preloaded=preloaded))
        child.parent = self
        self.children.append(child)
        self.memory.readonly = f"{self.name} has live forks"
        return child

    def _load_fork_state(self, child: VM, state: MachineState, *, devices: bool, preloaded: bool) -> None:
        """Machine.restore for a new fork: the shell's vCPUs and VM get every piece of state (`preloaded`: the
        pool loaded the clock-free parts of this very state already, see ShellPool). The device states are checked
        against the device set once per state value (every fork of it gets the same standard device set), then
        restored directly, as a reset does."""
        if preloaded:
            plan = _fork_plan(child.shell, state)
            for v, vs in zip(child.vcpus, state.vcpus, strict=True):
                v.finish_preload(vs, ioctls=False)
            plan.run()
        else:
            for v, vs in zip(child.vcpus, state.vcpus, strict=True):
                v.restore(vs)
            child.restore_platform(state.platform)
        saved = state.devices
        if devices and saved is not None and child.devices:
            if self._checked_devices is saved:
                states = saved.states
                for d in child.devices:
                    d.restore(states[d.name])
            else:
                DeviceSetState.restore_all(child.devices, saved)
                self._checked_devices = saved
            child.bus.touched.clear()
        if child.workarounds is not None:       # as Machine.restore does: the guest's IDT, LSTAR, ... anew
            child.workarounds.state_loaded()

    # --- reset --------------------------------------------------------------------------------------------------

    def reset(self, *, memory: bool = True, state: bool = True, lean: bool = True) -> int:
        """Return a fork to its parent's state: the pages written since the last reset get the parent's content
        back (`memory`) and every vCPU, the platform and the devices get the fork-time state (`state`).
        Returns the number of pages restored. `lean` False: restore every state part even where the run since
        the last reset provably left some alone (_lean_count)."""
        if self.fork_state is None:
            raise ForkError(f"{self.name} is not a fork: only forks can be reset")
        if self.broken is not None:
            raise ForkError(f"cannot reset {self.name}: {self.broken}")
        if self.state == "running":
            raise ForkError(f"cannot reset {self.name} while it runs: pause it first")
        if self.state == "destroyed":
            raise ForkError(f"cannot reset {self.name}: it is destroyed")
        if self.children:
            names = ", ".join(ch.name for ch in self.children)
            raise ForkError(f"cannot reset {self.name}: its forks ({names}) depend on its current state")
        st = self.fork_state
        plan = self._plan_for_reset()
        proven, count = self._lean_count()
        self._lean_base = None          # (set again below when this reset restores the state)
        steady = (self._steady_entry(None, (), -1, plan._full.compiled, lean=lean and proven)
                  if memory and state and not self.flush_translations_on_reset else None)
        if steady is not None:
            # the loop's steady state: page copy-back, sync-area image and state ioctls in one call
            self.memory.steady_done(frozenset())
            steady[0].enter(b"")
            pages = steady[1]
        else:
            pages = self.memory.reset_to_base() if memory else 0
            if pages and self.flush_translations_on_reset:
                self.memory.drop_translations()
            if state:
                plan.restore()
        if state:
            # The fork-time device states were checked when the fork was made: restore them directly, and only
            # when a port access (or console input) may have changed a device since the last restore.
            touched = self.bus.touched
            if touched and st.devices is not None:
                states = st.devices.states
                for d in touched:
                    saved = states.get(d.name)
                    if saved is not None:      # devices outside the device model (e.g. the debug port) have none
                        d.restore(saved)
                touched.clear()
            self._generation += 1
            if self.state == "crashed":
                self.state = "paused"
            if count is not None:
                self._lean_base = (plan, count, self.exits, self._generation)
        if self._vmgenid_id is not None:
            vmgenid.renotify(self)
        if memory and state:
            self._reset_mark = self._generation
        return pages

    def reset_and_run(self, data: bytes, at: tuple[tuple[int, int], ...], *, timeout: float | None = None,
                      compiled: bool = True, settle: bool = True, lean: bool = True) -> StopEvent:
        """`reset()`, write `data` across the guest-physical pieces `at` ((address, length) in order, as far as the
        data goes: a fuzzer's input buffer), then `run(timeout)`: a fuzzing iteration. In the loop's steady state
        (a one-vCPU fork whose last reset left nothing to harvest, see GuestMemory.steady_copies) the page
        copy-back, the vCPU's sync-area image, the input, the state ioctls and the first KVM_RUN are one call into
        vmfork._fastpath (`compiled`; else the same steps in Python); otherwise those three calls as written. The
        results are the same either way (tests/test_fastpath.py). `settle`: as for run(); False in a loop that
        resets next (the stop's port write is then completed only if someone looks at the vCPU first). `lean`
        False: restore every state part even where the last run provably left some alone (_lean_count)."""
        simple = len(self.vcpus) == 1 and not self.flush_translations_on_reset
        entry = self._iteration_entry(data, at, compiled, lean) if simple else None
        if entry is None:
            self.reset(lean=lean)
            self._write_input(data, at)
            return self.run(timeout=timeout, settle=settle)
        written = self._steady_pages
        # reset()'s bookkeeping, which the compiled call does not do
        touched = self.bus.touched
        if touched:
            states = self.fork_state.devices.states if self.fork_state and self.fork_state.devices else {}
            for d in touched:
                saved = states.get(d.name)
                if saved is not None:
                    d.restore(saved)
            touched.clear()
        self._generation += 1
        if self.state == "crashed":
            self.state = "paused"
        count = entry[1]
        self._lean_base = None if count is None else (self._plan_for_reset(), count, self.exits, self._generation)
        # the pages vmfork writes from here on (the input, and whatever the run's exit handlers write) are the
        # next reset's to copy back
        self.memory.steady_done(written)
        return self.run(timeout=timeout, enter=lambda: entry[0].enter(data), settle=settle)

    def _plan_for_reset(self) -> ResetPlan:
        st = self.fork_state
        assert st is not None
        prepared = self._reset_plan
        if prepared is None or prepared[0] is not st:
            prepared = self._reset_plan = (st, ResetPlan(self.vcpus, st.vcpus, self.vm.fd,
                                                         st.platform.restore_plan(),
                                                         interrupts_masked=_ioapic_masked(st.platform.ioapic)))
        return prepared[1]

    def _steady_entry(self, key: object, pieces: list[tuple[int, int]] | tuple[()], vcpu_fd: int,
                      compiled: bool, *, lean: bool = False) -> tuple[Entry, int] | None:
        """A kvm.Entry for a reset in the steady state (GuestMemory.steady_copies, ResetPlan.entry_parts) with
        `pieces` for an input (`key` names them) and KVM_RUN on `vcpu_fd` (-1: none), and the pages it restores;
        None when the reset needs its full path."""
        copies = self.memory.steady_copies()
        parts = self._plan_for_reset().entry_parts(lean=lean)
        if copies is None or parts is None:
            return None
        sync, plan = parts
        # copy list and plan are cached objects: one Entry per pair (and input, fd), a dict lookup per reset
        ekey = (id(copies[0]), id(plan), key, vcpu_fd, compiled)
        entry = self._entries.get(ekey)
        if entry is None or entry[0] is not copies[0] or entry[1] is not plan:
            if len(self._entries) > 16:
                self._entries.clear()
            entry = self._entries[ekey] = (copies[0], plan, Entry(copies[0] + sync, list(pieces), plan, vcpu_fd,
                                                                  compiled=compiled))
        return entry[2], copies[1]

    def _iteration_entry(self, data: bytes, at: tuple[tuple[int, int], ...], compiled: bool,
                         lean: bool = True) -> Any:
        """The kvm.Entry of reset_and_run's compiled call for this iteration, or None (take the three calls)."""
        if (self.fork_state is None or self.broken is not None or self.state not in ("paused", "crashed")
                or self.children or self._vmgenid_id is not None or self.memory.readonly):
            return None         # reset() says why, or does what the compiled call cannot
        key, pieces, written = self._input_layout(data, at, compiled)
        proven, count = self._lean_count()
        self._lean_base = None          # (reset_and_run sets it again when this reset goes ahead)
        steady = self._steady_entry(key, pieces, self.vcpus[0].fd.fd, compiled, lean=lean and proven)
        if steady is None:
            return None
        self._steady_pages = written
        return steady[0], count

    def _write_input(self, data: bytes, at: tuple[tuple[int, int], ...]) -> None:
        """`data` across the guest-physical pieces `at`, in order, as far as it goes (memory.write: the pages count
        as written for the next reset)."""
        for gpa, n in at:
            if not data:
                break
            self.memory.write(gpa, data[:n])
            data = data[n:]

    def _input_layout(self, data: bytes, at: tuple[tuple[int, int], ...],
                      compiled: bool) -> tuple[object, list[tuple[int, int]], frozenset[int]]:
        """(a key naming `at`, its pieces as host addresses, the pages `data` writes there), cached per `at`."""
        cached = self._entry_cache
        if cached is None or cached[0] != (at, compiled):
            memory = self.memory
            pieces: list[tuple[int, int]] = []
            starts: list[tuple[int, int]] = []          # (input byte where a page starts, that page), in order
            pos = 0
            for gpa, n in at:
                for off, k in memory._chunks(gpa, n):
                    pieces.append((memory.host_addr + off, k))
                    page = off >> PAGE_SHIFT
                    while (page << PAGE_SHIFT) < off + k:
                        starts.append((pos + max(0, (page << PAGE_SHIFT) - off), page))
                        page += 1
                    pos += k
            cached = self._entry_cache = ((at, compiled), pieces, starts, {})
        key, pieces, starts, by_pages = cached
        # the pages this input writes: the first k of `starts`, one frozenset per k
        n = len(data)
        k = bisect.bisect_left(starts, (n, -1)) if n else 0
        written = by_pages.get(k)
        if written is None:
            written = by_pages[k] = frozenset(page for _, page in starts[:k])
        return key, pieces, written

    @property
    def just_reset(self) -> bool:
        """Whether this fork is as its last reset() left it: nothing ran, restored or touched it since (a caller
        that resets ahead of its next input, see run_input, checks this first)."""
        return self._reset_mark == self._generation and self.state == "paused"

    def run_input(self, data: bytes, at: tuple[tuple[int, int], ...], *, timeout: float | None = None,
                  compiled: bool = True, settle: bool = True) -> StopEvent:
        """Write `data` across the guest-physical pieces `at` (as reset_and_run does) and `run(timeout)`: the
        second half of reset_and_run, for a fork its caller reset already. A fork server resets right after it
        answers (`reset()`), while its client prepares the next input, so the reset is off the serial path
        (fuzz/afl.py). A one-vCPU fork writes the input and enters the guest in one C call (`compiled`)."""
        if self.memory.readonly:
            raise ForkError(f"cannot write {self.name}'s input: {self.memory.readonly}")
        self._check_runnable()
        if len(self.vcpus) != 1:
            self._write_input(data, at)
            return self.run(timeout=timeout, settle=settle)
        key, pieces, written = self._input_layout(data, at, compiled)
        fd = self.vcpus[0].fd.fd
        ekey = ("input", key, fd)
        cached = self._entries.get(ekey)
        if cached is None:
            if len(self._entries) > 16:
                self._entries.clear()
            cached = self._entries[ekey] = (None, None, Entry([], list(pieces), _NO_PLAN, fd, compiled=compiled))
        entry = cached[2]
        self.memory.note_host_written(written)
        return self.run(timeout=timeout, enter=lambda: entry.enter(data), settle=settle)

    def _lean_count(self) -> tuple[bool, int | None]:
        """(whether this reset may leave out the XCRs, debug registers and clock-free MSRs, KVM's emulated-
        instruction count now: None where it proves nothing). Where guest kernel mode is emulated, KVM counts
        every kernel-mode instruction in its `insn_emulation` statistic, and the `out` of the end marker as one.
        The guest can change those parts only in kernel mode (xsetbv, mov to DRn, wrmsr; KVM itself writes DR6
        only when it delivers a #DB). So they still hold what the last reset gave them when, since it: one run
        (the generation rose by one: no restore or touch() either), whose only exit was the harness's end marker,
        left unsettled (nothing looked at or set the vCPU since the stop), no exception pending at the stop, and
        the count rose by exactly one (that `out`). The LAPIC too, where nothing outside the vCPU can reach it and
        its timer is off in the fork-time state (ResetPlan.lapic_quiet): then only kernel-mode code changes it.
        Elsewhere (VT-x/AMD-V run kernel mode natively: the statistic proves nothing) and for machines with more
        vCPUs every reset restores every part."""
        base = self._lean_base
        if not _KERNEL_MODE_EMULATED or len(self.vcpus) != 1:
            return False, None
        v = self.vcpus[0]
        if not v.io_unsettled:
            return False, None      # not a loop that resets right after its stops: no pread, no base for the next
        count = v.emulated_instructions()
        if count is None or base is None:
            return False, count
        plan, base_count, base_exits, base_generation = base
        ev = self.stop_event
        exc = v.run.s.regs.events.exception
        proven = (count == base_count + 1 and self.exits == base_exits + 1
                  and self._generation == base_generation + 1 and ev is not None and ev.reason == "harness-end"
                  and not (exc.injected or exc.pending) and plan is self._plan_for_reset())
        return proven, count

    # --- device model -------------------------------------------------------------------------------------------

    def attach_device_model(self, device_state: DeviceSetState | None = None, *,
                            console_log: str | None = None) -> None:
        """Give a machine without devices (a fork made with launch_dm "no" or "late", or a machine restored from
        such a fork's save file) the standard device set, in `device_state` (from `load_device_state()`, or the
        parent's) or else fresh, with the env strings `fork(env=...)` gave it (or it inherited). A state for
        another device set is refused with a DeviceStateError naming the mismatch, before anything changes.

        From now on the devices answer their ports and drive their interrupt lines (a machine without a device
        model raises none). If the machine stopped at a device access (`pause_on_device_access`) and has not run
        since, that access is delivered to the new device model: a write reaches the device, a read (not a string
        read) returns the device's answer instead of all ones. A later `reset()` returns the devices to
        `device_state`."""
        self._require_paused("attach a device model to")
        if self.devices:
            raise ForkError(f"{self.name} already has a device model")
        from .devices import standard_devices
        log = console_log if console_log is not None else self.console_log
        devices = standard_devices(self, ram_size=self.memory.size, console_log=log)
        try:
            pending = self.fork_state.devices if device_state is None and self.fork_state is not None else None
            if pending is not None and getattr(pending.states.get("env"), "env", None):
                # strings given to fork(env=...) (or inherited) waited in the fork-time state for this device model
                device_state = DeviceSetState({**DeviceSetState.capture_all(devices).states,
                                               "env": pending.states["env"]})
            if device_state is not None:
                DeviceSetState.restore_all(devices, device_state)
        except BaseException:
            for d in devices:
                close = getattr(d, "close", None)
                if close is not None:
                    close()
            raise
        attached = DeviceSetState.capture_all(devices)
        self.console_log = log
        for port, n in self.bus.unknown_accesses.items():
            self.dm_accesses[port] = self.dm_accesses.get(port, 0) + n
        self.attach_devices(devices)
        self.bus.on_unknown = self._on_device_access
        self.launch_dm = "yes"
        self._replay_device_access()
        self._generation += 1
        if self.fork_state is not None:
            self.fork_state = dataclasses.replace(self.fork_state, devices=attached)

    def device_accesses(self) -> dict[int, int]:
        """{port: count} of the port accesses no device answered (reads and writes), since this machine was made:
        for a machine without a device model, every port access it made."""
        out = dict(self.dm_accesses)
        for port, n in self.bus.unknown_accesses.items():
            out[port] = out.get(port, 0) + n
        return out

    def _on_device_access(self, port: int, is_write: bool, size: int) -> None:
        """PortBus hook, on the vCPU thread: the first access to a port no device answers."""
        if not self.pause_on_device_access:
            return
        access = self._exit_access(port, is_write, size)
        value = f", value {access.values[0]:#x}" if access is not None and access.values else ""
        detail = (f"port {port:#x} {'write' if is_write else 'read'}, {size} byte{'s' if size > 1 else ''}{value}; "
                  "no device answers it (answered as absent hardware)")
        event = StopEvent("device-access", None, access.vcpu if access is not None else None, detail)
        self._stop(event)
        if self._pending_stop is event:             # this access is what stops the machine (not another vCPU's)
            self._dm_pending = access

    def _exit_access(self, port: int, is_write: bool, size: int) -> _DeviceAccess | None:
        """The port-I/O exit the calling vCPU thread is handling, as a value."""
        me = threading.get_ident()
        vcpu = next((v for v in self.vcpus if self._kicker.tids[v.index] == me), None)
        if vcpu is None or vcpu.run.exit_reason != c.KVM_EXIT_IO:
            return None
        io = vcpu.run.exit.io
        if io.port != port or io.size != size or size not in _IO_CTYPES:
            return None
        values: tuple[int, ...] = ()
        if is_write:
            addr, ctype = vcpu.fd.run_addr + io.data_offset, _IO_CTYPES[size]
            values = tuple(ctype.from_address(addr + i * size).value for i in range(io.count))
        return _DeviceAccess(vcpu.index, port, is_write, size, int(io.count), values, self._generation)

    def _replay_device_access(self) -> None:
        access, self._dm_pending = self._dm_pending, None
        if access is None or access.generation != self._generation or self.bus.device_at(access.port) is None:
            return                                  # it ran, was reset or restored since, or the port has no device
        if access.is_write:
            for value in access.values:
                self.bus.io_write(access.port, access.size, value)
        elif access.count == 1:                     # IN put all ones in the accumulator; give it the real answer
            value = self.bus.io_read(access.port, access.size)
            vcpu = self.vcpus[access.vcpu]
            regs = vcpu.get_regs()
            keep = 0 if access.size == 4 else ((1 << 64) - 1) ^ ((1 << (8 * access.size)) - 1)
            regs.rax = (regs.rax & keep) | value
            vcpu.set_regs(regs)

    def _release(self) -> None:
        if self.fork_state is None and self.memory.fd is not None:
            for ring in (True, False):
                pool = _pools.get((self.shape, ring))
                if pool is not None:
                    pool.forget(self.memory.fd)
        shell = self.shell
        # (a shell whose dirty ring overflowed is closed, not recycled: KVM's ring indices may be off for good)
        if self.fork_state is not None and shell.owns_addr and shell.vcpus and not self.memory.ring_overflowed:
            self.memory.close(unmap_view=False)
            shell_pool(self.shape, dirty_ring=shell.dirty_ring).give_back(shell)
            return
        super()._release()


def create(*, memory_mib: int = 256, vcpus: int = 1, name: str = "vm", console_log: str | None = None,
           cpuid: str | None = None) -> VM:
    """A new root machine (`cpuid`: its CPUID policy, see Machine.create)."""
    vm = VM.create(memory_mib=memory_mib, vcpus=vcpus, name=name, console_log=console_log, cpuid=cpuid)
    assert isinstance(vm, VM)
    return vm


__all__ = ["VM", "ShellPool", "create", "dirty_log_mode", "shell_pool"]
