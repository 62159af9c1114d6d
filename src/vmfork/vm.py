"""A machine: guest RAM, vCPUs, the in-kernel irqchip and PIT, port devices, and the run loop.

State is data: `Machine.capture()` returns a `MachineState` (every vCPU, the platform's interrupt controllers, PIT
and clock, and every device) and `Machine.restore()` loads one. Forks, resets and save files are built on these.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from .arch.x86 import cpu, emulator_probe
from .devices import DeviceSetState, PortBus, standard_devices
from .errors import VmforkError, VmStateError
from .kvm import IoctlPlan, Kvm, VcpuFd, VmFd, plan_entry, run_plan
from .kvm import constants as c
from .kvm import structs as s
from .memory import GuestMemory, Slot, make_slots, release_address_space, reserve_address_space
from .vcpu import Vcpu, VcpuState
from .workarounds import ExitHooks
from .workarounds.installed import MachineWorkarounds

TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# A no-op handler for this signal makes pthread_kill() interrupt a vCPU thread's KVM_RUN with EINTR.
KICK_SIGNAL = signal.SIGRTMIN + 5
_kick_installed = False


def _ensure_kick_handler() -> None:
    global _kick_installed
    if _kick_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmforkError("create the first vmfork machine from the main thread (it installs a signal handler)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _kick_installed = True


_kvm: Kvm | None = None


def open_kvm() -> Kvm:
    """The process-wide /dev/kvm handle."""
    global _kvm
    if _kvm is None:
        _kvm = Kvm()
    return _kvm


@dataclass(frozen=True, slots=True)
class MachineShape:
    """What must match between a parent and its forks: RAM, vCPUs and the CPU they are shown (the concrete CPUID
    policy, base "host", in its canonical text: see arch/x86/cpuid_policy.py)."""

    memory_mib: int
    vcpus: int
    cpuid: str = "host"

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    def regions(self) -> list[tuple[int, int]]:
        from .arch.x86.layout import ram_regions
        return ram_regions(self.memory_bytes)


@dataclass(frozen=True, slots=True, eq=False)
class PlatformState:
    """The in-kernel interrupt controllers, PIT and kvmclock."""

    VERSION: ClassVar[int] = 1
    pic_master: s.IrqChip
    pic_slave: s.IrqChip
    ioapic: s.IrqChip
    pit: s.PitState2
    clock: s.ClockData
    _plan: IoctlPlan | None = field(default=None, compare=False, repr=False)

    def restore_plan(self) -> IoctlPlan:
        if self._plan is None:
            plan = [plan_entry(c.KVM_SET_IRQCHIP, self.pic_master), plan_entry(c.KVM_SET_IRQCHIP, self.pic_slave),
                    plan_entry(c.KVM_SET_IRQCHIP, self.ioapic), plan_entry(c.KVM_SET_PIT2, self.pit),
                    plan_entry(c.KVM_SET_CLOCK, self.clock)]
            object.__setattr__(self, "_plan", plan)
            return plan
        return self._plan

    def parts(self) -> dict[str, bytes]:
        return {n: bytes(getattr(self, n)) for n in ("pic_master", "pic_slave", "ioapic", "pit", "clock")}

    _PART_TYPES: ClassVar[tuple[tuple[str, type[Any]], ...]] = (
        ("pic_master", s.IrqChip), ("pic_slave", s.IrqChip), ("ioapic", s.IrqChip), ("pit", s.PitState2),
        ("clock", s.ClockData))

    def to_bytes(self) -> bytes:
        """This state in the versioned binary part format of VcpuState.to_bytes (magic b"VMFKPLAT")."""
        return VcpuState._pack_parts(b"VMFKPLAT", self.VERSION, list(self.parts().items()))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> PlatformState:
        """Rebuild a state from `to_bytes()` output; bad input is a VmStateError naming the part."""
        what = "platform state"
        parts = VcpuState._unpack_parts(data, b"VMFKPLAT", cls.VERSION, what)
        VcpuState._expect_parts(parts, [name for name, _ in cls._PART_TYPES], what)
        return cls(**{name: VcpuState._struct_part(parts, name, ctype, what) for name, ctype in cls._PART_TYPES})


@dataclass(frozen=True, slots=True, eq=False)
class MachineState:
    """A whole machine's state except RAM."""

    VERSION: ClassVar[int] = 1
    shape: MachineShape
    vcpus: tuple[VcpuState, ...]
    platform: PlatformState
    devices: DeviceSetState | None

    def to_bytes(self) -> bytes:
        """This state in the versioned binary part format of VcpuState.to_bytes (magic b"VMFKMACH"): parts
        "shape" (u32 MiB, u32 vCPUs, then the CPUID policy as UTF-8; none means "host"), "vcpu0".."vcpuN-1" and
        "platform" (nested binary states) and "devices"
        (DeviceSetState.to_dict() as UTF-8 JSON, `null` for none)."""
        import json
        import struct
        parts = [("shape", struct.pack("<II", self.shape.memory_mib, self.shape.vcpus) + self.shape.cpuid.encode())]
        parts += [(f"vcpu{i}", v.to_bytes()) for i, v in enumerate(self.vcpus)]
        parts.append(("platform", self.platform.to_bytes()))
        devices = None if self.devices is None else self.devices.to_dict()
        parts.append(("devices", json.dumps(devices, separators=(",", ":")).encode()))
        return VcpuState._pack_parts(b"VMFKMACH", self.VERSION, parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> MachineState:
        """Rebuild a state from `to_bytes()` output; bad input is a VmStateError (DeviceStateError for the
        "devices" part) naming the part."""
        import json
        import struct

        from .errors import DeviceStateError
        what = "machine state"
        parts = VcpuState._unpack_parts(data, b"VMFKMACH", cls.VERSION, what)
        if "shape" not in parts:
            raise VmStateError(f"{what}: part 'shape' is missing")
        if len(parts["shape"]) < 8:
            raise VmStateError(f"{what}: part 'shape' is {len(parts['shape'])} bytes, expected at least 8")
        memory_mib, nvcpus = struct.unpack_from("<II", parts["shape"])
        try:
            from .arch.x86.cpuid_policy import CpuidPolicy
            cpuid = str(CpuidPolicy.parse(parts["shape"][8:].decode() or "host"))
        except (UnicodeDecodeError, VmforkError) as e:
            raise VmStateError(f"{what}: part 'shape' has a bad CPUID policy: {e}") from None
        if not 1 <= nvcpus <= 64:
            raise VmStateError(f"{what}: part 'shape' gives {nvcpus} vCPUs")
        VcpuState._expect_parts(parts, ["shape", *(f"vcpu{i}" for i in range(nvcpus)), "platform", "devices"], what)
        vcpus = []
        for i in range(nvcpus):
            try:
                v = VcpuState.from_bytes(parts[f"vcpu{i}"])
            except VmStateError as e:
                raise VmStateError(f"{what}: part 'vcpu{i}': {e}") from None
            if v.index != i:
                raise VmStateError(f"{what}: part 'vcpu{i}' holds the state of vCPU {v.index}")
            vcpus.append(v)
        try:
            platform = PlatformState.from_bytes(parts["platform"])
        except VmStateError as e:
            raise VmStateError(f"{what}: part 'platform': {e}") from None
        try:
            raw = json.loads(parts["devices"].decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise DeviceStateError(f"{what}: part 'devices' is not valid JSON: {e}") from None
        try:
            devices = None if raw is None else DeviceSetState.from_dict(raw)
        except DeviceStateError as e:
            raise DeviceStateError(f"{what}: part 'devices': {e}") from None
        return cls(MachineShape(memory_mib, nvcpus, cpuid), tuple(vcpus), platform, devices)


@dataclass(frozen=True, slots=True)
class StopEvent:
    """Why a machine stopped running."""

    reason: str          # exit, harness-start, harness-end, harness, pause, timeout, reset, poweroff, debug, crash
    status: int | None = None
    vcpu: int | None = None
    detail: str = ""

    @property
    def crashed(self) -> bool:
        return self.reason == "crash"


class Shell:
    """A KVM VM with its vCPUs, irqchip, PIT and memory slots registered at a host address range, but no RAM
    content yet. Creating one costs milliseconds here (KVM_CREATE_IRQCHIP alone about 15 ms), so forks take shells
    from a pool prepared in advance."""

    def __init__(self, kvm: Kvm, shape: MachineShape, *, dirty_logging: bool, host_addr: int | None = None,
                 dirty_ring: bool = True) -> None:
        self.kvm = kvm
        self.shape = shape
        self.slots: tuple[Slot, ...] = make_slots(shape.regions())
        self.size = sum(sl.size for sl in self.slots)
        self.dirty_logging = dirty_logging
        self.dirty_ring = dirty_ring          # asked for rings (the host may have none: vm.dirty_ring_bytes == 0)
        self.vm: VmFd = kvm.create_vm()
        self.vcpus: list[Vcpu] = []
        self.premapped: int | None = None     # fd of the RAM file mapped at host_addr ahead of time, if any
        self.premapped_file: tuple[int, int] | None = None   # (st_dev, st_ino) of that file
        self.preloaded: MachineState | None = None    # the state whose clock-free parts the vCPUs hold already
        self.fork_plan: tuple[MachineState, Any] | None = None  # fork-time ioctls for a state (vmfork.fork)
        self.machine: Any = None    # a fork's machine built ahead for `preloaded`, with its RAM base (vmfork.fork)
        self.owns_addr = host_addr is None
        self.host_addr = reserve_address_space(self.size) if host_addr is None else host_addr
        try:
            vm = self.vm
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit2()
            if dirty_logging and dirty_ring:         # else KVM_GET_DIRTY_LOG bitmaps (see fork.dirty_log_mode)
                ring = dirty_ring_bytes(kvm)
                if ring:
                    vm.enable_dirty_ring(ring)
            flags = c.KVM_MEM_LOG_DIRTY_PAGES if dirty_logging else 0
            for sl in self.slots:
                vm.set_user_memory_region(sl.index, sl.gpa, sl.size, self.host_addr + sl.offset, flags)
            sync = kvm.check_extension(c.KVM_CAP_SYNC_REGS) & 7 == 7
            for i in range(shape.vcpus):
                fd = vm.create_vcpu(i)
                fd.set_cpuid2(_cpuid(kvm, i, _tsc_khz(fd), shape.cpuid))
                self.vcpus.append(Vcpu(kvm, fd, i, sync_regs=sync))
        except BaseException:
            self.close()
            raise

    def clear_dirty_log(self) -> None:
        """Forget every page logged so far (a recycled shell starts clean)."""
        if not self.dirty_logging:
            return
        if self.vm.dirty_ring_bytes:
            self.vm.discard_dirty_rings()
            return
        bitmap = (ctypes.c_uint64 * ((max(sl.size for sl in self.slots) >> 12) // 64 + 1))()
        for sl in self.slots:
            self.vm.get_dirty_log(sl.index, ctypes.addressof(bitmap))

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        self.vm.close()
        if self.owns_addr and self.host_addr:
            release_address_space(self.host_addr, self.size)
            self.host_addr = 0


# Forks log dirty pages into per-vCPU rings when the host has them: reading the few entries a fuzzing iteration
# leaves costs less than fetching and scanning a whole bitmap (docs/design.md, "Reset"). 4096 entries (64 KiB of
# kernel memory per vCPU, vmalloc): an iteration that dirties more pages exits to vmfork to empty the ring
# (KVM_EXIT_DIRTY_RING_FULL); runs writing 1,000-10,000 pages took as long with 1,024 to 8,192 entries here
# (docs/benchmarks.md, "sustained forks"). VMFORK_DIRTY_RING=0 keeps the bitmaps.
DIRTY_RING_ENTRIES = 4096


def dirty_ring_bytes(kvm: Kvm) -> int:
    """The ring size forks use on this host, 0 for bitmaps."""
    if os.environ.get("VMFORK_DIRTY_RING", "1") == "0":
        return 0
    limit = kvm.check_extension(c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) or kvm.check_extension(c.KVM_CAP_DIRTY_LOG_RING)
    want = DIRTY_RING_ENTRIES * ctypes.sizeof(s.DirtyGfn)
    return want if limit >= want else 0


_tsc_khz_cache: int | None = None
_cpuid_cache: dict[tuple[int, int, str], ctypes.Structure] = {}


def _cpuid(kvm: Kvm, index: int, tsc_khz: int, policy: Any) -> ctypes.Structure:
    """vCPU `index`'s CPUID table under `policy`, built once per process and shared (KVM_SET_CPUID2 only reads
    it; about 0.1 ms of Python per shell otherwise)."""
    key = (index, tsc_khz, str(policy))
    table = _cpuid_cache.get(key)
    if table is None:
        table = _cpuid_cache[key] = cpu.vcpu_cpuid(kvm, index, tsc_khz, policy)
    return table


def _tsc_khz(fd: VcpuFd) -> int:
    global _tsc_khz_cache
    if _tsc_khz_cache is None:
        try:
            _tsc_khz_cache = fd.get_tsc_khz()
        except VmforkError:
            _tsc_khz_cache = 0
    return _tsc_khz_cache


class _Kicker:
    """Knows which OS thread runs each vCPU so a stop request can interrupt KVM_RUN."""

    def __init__(self, n: int) -> None:
        self.tids: list[int | None] = [None] * n

    def kick(self, index: int) -> None:
        tid = self.tids[index]
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass


def destroy_forks_first(node: Any, *, tree: bool) -> None:
    """The rule of every machine with forks (in-process or a process fork's handle): its live forks go first, and
    only when the caller asked for the whole tree; otherwise a VmStateError names them."""
    if node.children:
        if not tree:
            names = ", ".join(ch.name for ch in node.children)
            raise VmStateError(f"{node.name} has live forks ({names}): destroy them first, or the whole tree")
        for ch in list(node.children):
            ch.destroy(tree=True)


def _finish_step_past(vcpu: Vcpu) -> bool:
    """The built-in debug exit hook: the one-shot breakpoint of `vcpu.debug.step_past` (vmfork.guest_debug)."""
    return vcpu.debug.finish_step_past(vcpu.run.exit.debug.dr6)


RING_OVERFLOW = ("its dirty ring overflowed: one run wrote more pages than the ring holds, which this host's KVM "
                 "allows where it emulates guest kernel mode, and KVM counts the ring full for good; make its forks "
                 "with dirty_log='bitmap'")


class Machine:
    """A virtual machine. Create roots with `Machine.create()`; forks come from `vmfork.fork`."""

    _ids = 0

    def __init__(self, shell: Shell, memory: GuestMemory, *, name: str = "vm", console_log: str | None = None,
                 with_devices: bool = True, workarounds: bool = True) -> None:
        _ensure_kick_handler()
        Machine._ids += 1
        self.id = Machine._ids
        self.name = name
        self.shell = shell
        self.kvm = shell.kvm
        self.shape = shell.shape
        self.memory = memory
        self.vcpus = shell.vcpus
        self.vm = shell.vm
        self.state = "paused"            # paused | running | crashed | destroyed
        self.stop_event: StopEvent | None = None
        self.parent: Machine | None = None
        self.children: list[Machine] = []
        self.irqs_blocked = False
        self.console_log = console_log
        self.devices: list[Any] = []
        self.bus: PortBus = PortBus([])
        self._flush_on_stop: list[Callable[[], None]] = []
        if with_devices:
            self.attach_devices(standard_devices(self, ram_size=memory.size, console_log=console_log))
        self._stop_lock = threading.Lock()
        self._stop_cond = threading.Condition(self._stop_lock)
        self._pending_stop: StopEvent | None = None
        self._kicker = _Kicker(len(self.vcpus))
        self._threads: list[threading.Thread] = []
        self._live_threads = 0
        self.exits = 0
        self.cpuid_note: str | None = None       # set at load_kernel: what its CPUID policy hides (emulator_probe)
        self.on_stop: list[Callable[[StopEvent], None]] = []
        # Exits the loop cannot handle itself (emulation failures, debug exits) go to these first:
        # the debugger's breakpoints, then host workarounds (vmfork.workarounds).
        self.exit_hooks = ExitHooks()
        self.exit_hooks.add("debug", "step-past", _finish_step_past)
        self.template: str | None = None      # the template save file this machine's RAM maps, if any
        self.broken: str | None = None        # why this machine can never run again (its memory is untrustworthy)
        # This host's fallbacks and syscall completion (vmfork.workarounds); doctor's probe guests go without.
        self.workarounds = MachineWorkarounds(self, Machine) if workarounds else None

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, *, memory_mib: int = 256, vcpus: int = 1, name: str = "vm", console_log: str | None = None,
               with_devices: bool = True, cpuid: str | None = None, workarounds: bool = True) -> Self:
        """A new root machine with zeroed RAM (boot it with `load_kernel`).

        `cpuid`: the CPU features its vCPUs are shown, in xl.cfg's syntax ("host,popcnt=0"); None (or base
        "default") is this host's default policy: the host's features minus those whose instructions its KVM
        cannot run in guest kernel mode (probed once per host and kernel, see arch/x86/emulator_probe.py).
        `workarounds`: install this host's instruction fallbacks and syscall completion (vmfork.workarounds)."""
        if memory_mib < 2:
            raise VmforkError(f"memory must be at least 2 MiB, got {memory_mib}")
        if not 1 <= vcpus <= 64:
            raise VmforkError(f"vcpus must be between 1 and 64, got {vcpus}")
        kvm = open_kvm()
        shape = MachineShape(memory_mib, vcpus, emulator_probe.concrete(kvm, cpuid))
        memory = GuestMemory.allocate(shape.regions(), name=f"vmfork-{name}")
        try:
            shell = Shell(kvm, shape, dirty_logging=False, host_addr=memory.host_addr)
        except BaseException:
            memory.close()
            raise
        memory.bind(shell.vm, dirty_logging=False)
        try:
            m = cls(shell, memory, name=name, console_log=console_log, with_devices=with_devices,
                    workarounds=workarounds)
        except BaseException:
            shell.close()
            memory.close()
            raise
        m._init_boot_cpu_state()
        return m

    def _init_boot_cpu_state(self) -> None:
        bsp = self.vcpus[0]
        lapic = s.LapicState()
        bsp.fd.get_lapic(lapic)
        cpu.lapic_virtual_wire(lapic)
        bsp.fd.set_lapic(lapic)
        msrs: Any = s.msrs_type(2)()
        msrs.nmsrs = 2
        msrs.entries[0].index, msrs.entries[0].data = cpu.MSR_IA32_MISC_ENABLE, 1       # fast strings
        msrs.entries[1].index, msrs.entries[1].data = cpu.MSR_MTRR_DEF_TYPE, (1 << 11) | 6  # MTRRs on, WB
        for v in self.vcpus:
            v.fd.set_msrs(msrs)

    def load_kernel(self, path: str | os.PathLike[str], *, cmdline: str = "", initrd: str | None = None,
                    protocol: str = "auto", acpi: bool = True, acpi_devices: Sequence[Any] = (),
                    vmgenid: bool | None = None) -> str:
        """Load a kernel through a standard boot protocol and point the boot vCPU at its entry; returns the
        protocol used. `acpi`: also write ACPI tables describing this machine (its vCPUs, IOAPIC and ISA
        devices, plus `acpi_devices`: arch.x86.acpi.Device values; see arch/x86/acpi) and pass the kernel their
        address. `vmgenid`: describe a VMGenID device in them, so forks and restores get a new generation ID
        (vmfork.vmgenid); None: for Linux kernels only (other guests, fuzz targets above all, get no notification
        interrupt at fork and reset)."""
        from . import vmgenid as generation
        from .arch.x86 import acpi as acpi_tables
        from .arch.x86.boot import load_kernel
        tables = (acpi_tables.build(self.shape.vcpus, devices=[*acpi_tables.standard_devices(), *acpi_devices])
                  if acpi else None)
        entry = load_kernel(path, self.memory, cmdline=cmdline, initrd=initrd, protocol=protocol,  # type: ignore[arg-type]
                            acpi=tables)
        if vmgenid is None:
            vmgenid = str(entry.protocol).startswith("linux")
        if tables is not None and vmgenid:
            generation.install(self, tables, extra=acpi_devices)
        bsp = self.vcpus[0]
        regs, sregs = bsp.get_regs(), bsp.get_sregs()
        cpu.apply_entry(entry, regs, sregs)
        bsp.set_sregs(sregs)
        bsp.set_regs(regs)
        # what the guest is kept away from, and what it is not: `vmfork run` prints it, the API logs it
        self.cpuid_note = emulator_probe.boot_note(self.kvm, self.shape.cpuid)
        if self.cpuid_note:
            logging.getLogger("vmfork").info("%s: %s", self.name, self.cpuid_note)
        return str(entry.protocol)

    def attach_devices(self, devices: Sequence[Any]) -> None:
        self.devices = list(devices)
        self.bus = PortBus(self.devices)
        # Devices that batch their output (the UART's console log and listeners) write it out whenever we stop.
        self._flush_on_stop = [d.flush_output for d in self.devices if hasattr(d, "flush_output")]

    def device(self, name: str) -> Any:
        for d in self.devices:
            if d.name == name:
                return d
        raise VmforkError(f"{self.name} has no device {name!r}")

    # --- DeviceContext ------------------------------------------------------------------------------------------

    def set_irq(self, gsi: int, level: bool) -> None:
        if not self.irqs_blocked:
            self.vm.irq_line(gsi, 1 if level else 0)

    def request_stop(self, reason: str, status: int | None) -> None:
        self._stop(StopEvent(reason, status))

    def feed_console(self, data: bytes) -> int:
        """Input for the guest's serial console; returns how many bytes it took (the rest is dropped)."""
        serial = self.device("serial0")
        self.bus.touched.add(serial)
        return int(serial.feed(data))

    # --- run control --------------------------------------------------------------------------------------------

    def mark_broken(self, why: str) -> None:
        """This machine can never run again (its template file changed: its memory is untrustworthy; its dirty ring
        overflowed, RING_OVERFLOW): stop it for good; it can only be destroyed. Safe from any thread."""
        self.broken = why
        if self.state == "running":
            self._stop(StopEvent("crash", None, None, why))
        elif self.state != "destroyed":
            self.state = "crashed"
            self.stop_event = StopEvent("crash", None, None, why)

    def _check_runnable(self) -> None:
        if self.broken is not None:
            raise VmStateError(f"{self.name} cannot run: {self.broken}")
        if self.state == "destroyed":
            raise VmStateError(f"{self.name} is destroyed")
        if self.state == "crashed":
            raise VmStateError(f"{self.name} has crashed ({self.stop_event.detail if self.stop_event else ''}); "
                               "reset or destroy it")
        if self.children:
            names = ", ".join(ch.name for ch in self.children)
            raise VmStateError(f"{self.name} has live forks ({names}): it stays paused until they are destroyed")
        if self.state == "running":
            raise VmStateError(f"{self.name} is already running")

    def _stop(self, event: StopEvent) -> None:
        with self._stop_lock:
            if self._pending_stop is not None:
                return
            self._pending_stop = event
        for v in self.vcpus:
            v.run.immediate_exit = 1
        for v in self.vcpus:
            self._kicker.kick(v.index)

    def run(self, timeout: float | None = None, *, enter: Callable[[], int] | None = None,
            settle: bool = True) -> StopEvent:
        """Run in the calling thread until the machine stops (single-vCPU machines run inline, others in threads).
        `enter`: a single-vCPU machine's first KVM_RUN is this call instead (it returns what VcpuFd.run_once
        returns; vmfork.fork's reset_and_run puts its reset and input into the same C call). `settle` False: a
        single-vCPU machine stopped by a port write (a harness marker) returns without the KVM_RUN that completes
        the write (about 10 µs here); the vCPU completes it at its next run, or first thing when its registers are
        read or set, or drops it when a reset moves RIP elsewhere (Vcpu.settle): for a loop that resets next."""
        if len(self.vcpus) > 1:
            if enter is not None:
                raise VmforkError("run(enter=) is for single-vCPU machines")
            self.start()
            return self.wait(timeout, pause_on_timeout=True)
        self._check_runnable()
        self._begin()
        if timeout is not None:
            self._arm_watchdog(timeout)
        try:
            self._vcpu_loop(self.vcpus[0], enter, settle)
        finally:
            self._disarm_watchdog()
        return self._finish()

    def start(self) -> None:
        """Run every vCPU in its own thread; returns at once. `wait()` or `pause()` later."""
        self._check_runnable()
        self._begin()
        self._threads = [threading.Thread(target=self._thread_main, args=(v,), name=f"{self.name}-vcpu{v.index}",
                                          daemon=True) for v in self.vcpus]
        with self._stop_cond:
            self._live_threads = len(self._threads)
        for t in self._threads:
            t.start()

    def _thread_main(self, vcpu: Vcpu) -> None:
        try:
            self._vcpu_loop(vcpu)
        except BaseException as e:  # a bug or host failure: stop the machine with a report, never hang
            self._stop(StopEvent("crash", None, vcpu.index, f"vCPU thread failed: {e!r}"))
        finally:
            with self._stop_cond:
                self._live_threads -= 1
                self._stop_cond.notify_all()

    def wait(self, timeout: float | None = None, *, pause_on_timeout: bool = False) -> StopEvent:
        """Wait for a started machine to stop; on timeout returns a 'timeout' event (pausing it if asked).

        Waits on a condition the vCPU threads signal, not on Thread.join(): a join interrupted by Ctrl-C can mark
        a still-running thread as finished in CPython 3.11, and tearing the machine down under a live vCPU thread
        would crash the process."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._stop_cond:
            while self._live_threads > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._stop_cond.wait(remaining)
            done = self._live_threads == 0
        if not done:
            if not pause_on_timeout:
                return StopEvent("timeout")
            self._stop(StopEvent("timeout"))
            with self._stop_cond:
                while self._live_threads > 0:
                    self._stop_cond.wait()
        self._threads = []
        return self._finish()

    def pause(self) -> StopEvent:
        """Stop a running machine at a consistent point (every pending I/O completed)."""
        if self.state != "running":
            if self.state == "destroyed":
                raise VmStateError(f"{self.name} is destroyed")
            return self.stop_event or StopEvent("pause")
        self._stop(StopEvent("pause"))
        return self.wait()

    def unpause(self) -> None:
        self.start()

    def _begin(self) -> None:
        self._pending_stop = None
        self.stop_event = None
        for v in self.vcpus:
            v.run.immediate_exit = 0
            v.io_unsettled = False      # this run's first KVM_RUN completes a pending `out` (Vcpu.settle)
        self.state = "running"

    def _finish(self) -> StopEvent:
        event = self._pending_stop or StopEvent("pause")
        for flush in self._flush_on_stop:
            flush()
        self.stop_event = event
        self.state = "crashed" if event.crashed else "paused"
        for cb in self.on_stop:
            cb(event)
        return event

    def _arm_watchdog(self, timeout: float) -> None:
        _watchdog.arm(self, time.monotonic() + timeout)

    def _disarm_watchdog(self) -> None:
        _watchdog.disarm(self)

    # --- the exit loop ------------------------------------------------------------------------------------------

    def _vcpu_loop(self, vcpu: Vcpu, enter: Callable[[], int] | None = None, settle: bool = True) -> None:
        run = vcpu.run
        fd = vcpu.fd
        run_addr = fd.run_addr
        bus = self.bus
        hooks = self.exit_hooks
        self._kicker.tids[vcpu.index] = threading.get_ident()
        try:
            while True:
                if self._pending_stop is not None:
                    run.immediate_exit = 1
                if enter is None:
                    ret = fd.run_once()
                else:
                    ret, enter = enter(), None
                vcpu.after_run()
                if ret < 0:
                    run.immediate_exit = 0
                    if self._pending_stop is not None:
                        return
                    continue
                self.exits += 1
                reason = run.exit_reason
                if reason == c.KVM_EXIT_IO:
                    io = run.exit.io
                    size = io.size
                    ctype = _IO_TYPES[size]
                    addr = run_addr + io.data_offset
                    if io.direction == c.KVM_EXIT_IO_OUT:
                        for i in range(io.count):
                            bus.io_write(io.port, size, ctype.from_address(addr + i * size).value)
                        if not settle and self._pending_stop is not None:
                            vcpu.io_unsettled = True        # see run(settle=False)
                            return
                    else:
                        for i in range(io.count):
                            ctype.from_address(addr + i * size).value = bus.io_read(io.port, size)
                elif reason == c.KVM_EXIT_MMIO:
                    mm = run.exit.mmio
                    if mm.is_write:
                        bus.mmio_write(mm.phys_addr, mm.len, int.from_bytes(bytes(mm.data)[:mm.len], "little"))
                    else:
                        value = bus.mmio_read(mm.phys_addr, mm.len)
                        ctypes.memmove(mm.data, value.to_bytes(8, "little"), 8)
                elif reason == c.KVM_EXIT_SYSTEM_EVENT:
                    kind = run.exit.system_event.type
                    if kind == c.KVM_SYSTEM_EVENT_RESET:
                        self._stop(StopEvent("reset", None, vcpu.index))
                    elif kind == c.KVM_SYSTEM_EVENT_SHUTDOWN:
                        self._stop(StopEvent("poweroff", None, vcpu.index))
                    else:
                        self._crash(vcpu, "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
                        return
                elif reason == c.KVM_EXIT_INTR:
                    continue
                elif reason == c.KVM_EXIT_DIRTY_RING_FULL:
                    if self.memory.ring_full(vcpu.index):   # else the rings are empty again: KVM_RUN goes on
                        self.mark_broken(RING_OVERFLOW)
                        return
                elif reason == c.KVM_EXIT_DEBUG:
                    if hooks.debug and hooks.dispatch(hooks.debug, vcpu):
                        continue
                    # Guest debugging (breakpoints, single-step) pauses the machine; it can be continued.
                    dbg = run.exit.debug
                    self._stop(StopEvent("debug", dbg.exception, vcpu.index,
                                         f"pc={dbg.pc:#x} dr6={dbg.dr6:#x} dr7={dbg.dr7:#x}"))
                elif (reason == c.KVM_EXIT_INTERNAL_ERROR and hooks.emulation_failure
                      and run.exit.internal.suberror == c.KVM_INTERNAL_ERROR_EMULATION
                      and hooks.dispatch(hooks.emulation_failure, vcpu)):
                    continue
                else:
                    self._crash(vcpu, self._describe_exit(vcpu))
                    return
        finally:
            self._kicker.tids[vcpu.index] = None

    def _describe_exit(self, vcpu: Vcpu) -> str:
        run = vcpu.run
        reason = run.exit_reason
        name = c.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        if reason == c.KVM_EXIT_SHUTDOWN:
            return "the guest shut down (triple fault, or an instruction this host cannot run from user mode)"
        if reason == c.KVM_EXIT_INTERNAL_ERROR:
            sub = run.exit.internal.suberror
            what = {c.KVM_INTERNAL_ERROR_EMULATION: "emulation failure (an instruction KVM cannot emulate)",
                    c.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
                    c.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed"}.get(sub, f"suberror {sub}")
            return f"KVM internal error: {what}"
        if reason == c.KVM_EXIT_FAIL_ENTRY:
            return f"VM entry failed (hardware reason {run.exit.fail_entry.hardware_entry_failure_reason:#x})"
        if reason == c.KVM_EXIT_HLT:
            return "the guest halted with no interrupt source (KVM_EXIT_HLT)"
        return f"unexpected exit: {name}"

    def _crash(self, vcpu: Vcpu, what: str) -> None:
        self._stop(StopEvent("crash", None, vcpu.index, self.crash_report(vcpu, what)))

    def crash_report(self, vcpu: Vcpu, what: str) -> str:
        """A one-paragraph report: what happened, where (RIP, mode), and the instruction bytes there."""
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        except VmforkError as e:
            return f"{what} (registers unreadable: {e})"
        mode = "long" if sregs.efer & 0x400 else ("protected" if sregs.cr0 & 1 else "real")
        cpl = sregs.cs.selector & 3 if sregs.cr0 & 1 else 0
        linear = regs.rip + (0 if mode == "long" else sregs.cs.base)
        insn = "unavailable"
        mnemonic = ""
        try:
            gpa = linear
            if sregs.cr0 & 0x80000000:
                t = vcpu.fd.translate(linear)
                gpa = t.physical_address if t.valid else -1
            if gpa >= 0:
                code = self.memory.read(gpa, 16)
                insn = code.hex(" ")
                if mode == "long" and sregs.cs.l:
                    from .workarounds.guest_access import decode
                    d = decode(code, regs.rip)
                    if d is not None:
                        mnemonic = f"instruction `{' '.join(x for x in d[:2] if x)}`; "
        except VmforkError:
            pass
        return (f"{what}; vCPU {vcpu.index} in {mode} mode CPL{cpl} at rip={regs.rip:#x} rsp={regs.rsp:#x} "
                f"cr3={sregs.cr3:#x}; {mnemonic}instruction bytes: {insn}")

    # --- state --------------------------------------------------------------------------------------------------

    def _require_paused(self, what: str) -> None:
        if self.state == "running":
            raise VmStateError(f"cannot {what} {self.name} while it runs: pause it first")
        if self.state == "destroyed":
            raise VmStateError(f"cannot {what} {self.name}: it is destroyed")

    def capture_platform(self) -> PlatformState:
        chips = []
        for chip_id in (c.KVM_IRQCHIP_PIC_MASTER, c.KVM_IRQCHIP_PIC_SLAVE, c.KVM_IRQCHIP_IOAPIC):
            chip = s.IrqChip()
            chip.chip_id = chip_id
            self.vm.get_irqchip(chip)
            chips.append(chip)
        pit = s.PitState2()
        self.vm.get_pit2(pit)
        clock = s.ClockData()
        self.vm.get_clock(clock)
        clock.flags = 0      # restore the value as is, no realtime/TSC adjustment
        return PlatformState(chips[0], chips[1], chips[2], pit, clock)

    def restore_platform(self, st: PlatformState) -> None:
        run_plan(self.vm.fd, st.restore_plan())

    def capture(self) -> MachineState:
        """The complete machine state except RAM. The machine must be paused."""
        self._require_paused("capture the state of")
        devices = DeviceSetState.capture_all(self.devices) if self.devices else None
        return MachineState(self.shape, tuple(v.capture() for v in self.vcpus), self.capture_platform(), devices)

    def restore(self, st: MachineState, *, devices: bool = True) -> None:
        """Load a captured state (RAM is not touched). The machine must be paused."""
        self._require_paused("restore the state of")
        if st.shape != self.shape and st.shape.cpuid != self.shape.cpuid:
            raise VmStateError(f"state is for vCPUs shown the CPU {st.shape.cpuid!r}, {self.name}'s are shown "
                               f"{self.shape.cpuid!r}")
        if st.shape != self.shape:
            raise VmStateError(f"state is for a {st.shape.memory_mib} MiB / {st.shape.vcpus}-vCPU machine, "
                               f"{self.name} is {self.shape.memory_mib} MiB / {self.shape.vcpus} vCPUs")
        for v, vs in zip(self.vcpus, st.vcpus, strict=True):
            v.restore(vs)
        self.restore_platform(st.platform)
        if devices and st.devices is not None and self.devices:
            DeviceSetState.restore_all(self.devices, st.devices)
            self.bus.touched.clear()
        if self.workarounds is not None:
            self.workarounds.state_loaded()
        if self.state == "crashed":
            self.state = "paused"

    # --- teardown -----------------------------------------------------------------------------------------------

    def destroy(self, *, tree: bool = False) -> None:
        """Destroy this machine. A parent with live forks is refused unless `tree=True` (forks go first)."""
        if self.state == "destroyed":
            return
        destroy_forks_first(self, tree=tree)
        if self.state == "running":
            self.pause()
        self.state = "destroyed"
        for d in self.devices:
            close = getattr(d, "close", None)
            if close is not None:
                close()
        if self.parent is not None and self in self.parent.children:
            self.parent.children.remove(self)
            if not self.parent.children:
                self.parent.memory.readonly = None
        self._release()

    def _release(self) -> None:
        view_owned_by_shell = self.shell.owns_addr
        self.shell.close()
        self.memory.close(unmap_view=not view_owned_by_shell)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy(tree=True)

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.state} {self.shape.memory_mib}MiB {self.shape.vcpus}vcpu>"


class _Watchdog:
    """One daemon thread for every machine's run timeout (a thread per run would cost more than a short run).

    The thread is woken only when a new deadline comes before the time it already sleeps until: a fuzzer's
    back-to-back short runs (arm, run, disarm, each with a later deadline) then wake it about once per timeout,
    not once per run (a notify and a switch to the watchdog thread cost 10-15 µs per run here)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[Machine, float] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf            # when the thread wakes up next by itself

    def arm(self, machine: Machine, deadline: float) -> None:
        with self._cond:
            self._deadlines[machine] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="vmfork-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:
                self._wake_at = deadline        # (the thread sets its own when it runs)
                self._cond.notify()

    def disarm(self, machine: Machine) -> None:
        with self._cond:
            self._deadlines.pop(machine, None)      # the thread may wake for nothing at the old deadline: harmless

    def _main(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for m, when in list(self._deadlines.items()):
                    if when <= now:
                        del self._deadlines[m]
                        m._stop(StopEvent("timeout"))
                earliest = min(self._deadlines.values(), default=None)
                self._wake_at = math.inf if earliest is None else earliest
                self._cond.wait(None if earliest is None else max(0.0, earliest - now))


_watchdog = _Watchdog()

_IO_TYPES: dict[int, Any] = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}


__all__ = ["Machine", "MachineShape", "MachineState", "PlatformState", "Shell", "StopEvent", "open_kvm"]
