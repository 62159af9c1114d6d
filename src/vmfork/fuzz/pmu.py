"""Instruction budgets from the guest's virtual PMU: stop an input after N retired instructions.

KVM has no "exit after N guest instructions", but a virtual PMU counts a vCPU's retired instructions and raises
the counter's overflow interrupt in the guest (LAPIC LVTPC). So for a budget of N vmfork, from outside the guest:

- programs general-purpose counter 0 of the fuzz fork's vCPU 0 (KVM_SET_MSRS) to count retired instructions in
  user and kernel mode with its overflow interrupt on, preloaded with 2^width - N, again after every reset;
- points the sink's LAPIC LVTPC at a vector the guest does not use (a not-present gate of its IDT), and writes that
  gate and a 9-byte kernel-mode stub (`mov eax, BUDGET_MARK; out 0xf6, eax; jmp $`) into the sink's memory (the
  stub page is guest-physical STUB_GPA, next to the breakpoint stub's page in the reserved VGA window; see
  vmfork/vmi/breakpoints.py). The fuzz fork inherits all of it; resets restore it.

An input that retires N instructions overflows the counter; the PMI runs the stub, whose write to the harness port
stops the machine with StopEvent("harness", BUDGET_MARK): the fuzzer counts a hang of kind "instructions" and
reports the interrupted RIP (from the stub's interrupt frame). The count includes a few instructions of skid and
anything the guest's own interrupt handlers run meanwhile.

Which PMU (from the VMM's CPUID, as the guest sees it): Intel's architectural PMU (CPUID leaf 0xA: version,
counters, width; IA32_PERFEVTSEL0/IA32_PMC0, IA32_PERF_GLOBAL_CTRL from version 2); AMD's core counters
(PERF_CTL0/PERF_CTR0 at 0xC0010200 with PerfCtrExtCore, CPUID 0x80000001 ECX bit 23; else the legacy
0xC0010000/0xC0010004, which have no CPUID bit at all; PerfMonV2's global control with CPUID 0x80000022).
Event 0xC0 counts retired instructions on both. Whether the counter really counts guest instructions and
interrupts is measured by `vmfork doctor` (probe "vpmu"); the fuzzer refuses a budget on a host where it does not.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..kvm import structs as s
from .errors import FuzzError

__all__ = ["BUDGET_MARK", "STUB_GPA", "InstructionBudget", "PmuLayout", "detect", "enable_pmu_param",
           "msr_values", "read_msrs", "write_msrs"]

EVENT_RETIRED_INSTRUCTIONS = 0xC0   # Intel INST_RETIRED.ANY_P (umask 0), AMD "Retired Instructions"
EVTSEL_USR = 1 << 16
EVTSEL_OS = 1 << 17
EVTSEL_INT = 1 << 20                # overflow interrupt through the LAPIC's LVTPC
EVTSEL_EN = 1 << 22

INTEL_EVTSEL0, INTEL_PMC0 = 0x186, 0xC1
INTEL_GLOBAL_STATUS, INTEL_GLOBAL_CTRL = 0x38E, 0x38F
AMD_CTL0, AMD_CTR0 = 0xC0010200, 0xC0010201           # with PerfCtrExtCore (counters interleaved)
AMD_K7_EVNTSEL0, AMD_K7_PERFCTR0 = 0xC0010000, 0xC0010004
AMD_GLOBAL_STATUS, AMD_GLOBAL_CTL = 0xC0000300, 0xC0000301

LAPIC_SVR, LAPIC_LVTPC = 0xF0, 0x340
APIC_SW_ENABLE = 0x100
LVT_MASKED = 1 << 16

BUDGET_MARK = 0x13371339            # what the stub writes to the harness port
HARNESS_PORT = 0xF6
STUB_GPA = 0xAE000                  # the page below the breakpoint stub's (vmfork.vmi.breakpoints.STUB_GPA)
STUB_CODE = (
    b"\xb8" + struct.pack("<I", BUDGET_MARK)    # mov eax, BUDGET_MARK
    + b"\xe7" + bytes((HARNESS_PORT,))          # out 0xf6, eax
    + b"\xeb\xfe"                               # jmp $        (the fork is reset, never resumed, after this)
)


class PmuError(FuzzError):
    """The guest's PMU cannot give an instruction budget (the message says why)."""


@dataclass(frozen=True, slots=True)
class PmuLayout:
    """Counter 0 of the guest's PMU as its CPUID describes it."""

    vendor: str                 # "intel" or "amd"
    version: int                # Intel: CPUID.0xA EAX[7:0]; AMD: 2 with PerfMonV2, else 1
    counters: int
    width: int                  # counter bits
    evtsel: int                 # MSR: counter 0's event select
    counter: int                # MSR: counter 0
    global_ctrl: int | None     # MSR enabling counters globally (Intel v2+, AMD PerfMonV2)
    global_status: int | None   # MSR with the overflow bits (host writes may clear it)
    source: str                 # how it was found, for reports

    def describe(self) -> str:
        vendor = {"intel": "Intel", "amd": "AMD"}.get(self.vendor, self.vendor)
        return f"{vendor} PMU, {self.source}; counter MSR {self.counter:#x}"


def _leaf(entries: Iterable[Any], function: int, index: int = 0) -> Any | None:
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None


def _vendor(entries: Iterable[Any]) -> str:
    e = _leaf(entries, 0)
    if e is None:
        return "unknown"
    name = struct.pack("<III", e.ebx, e.edx, e.ecx)
    return {b"GenuineIntel": "intel", b"AuthenticAMD": "amd", b"HygonGenuine": "amd"}.get(name, name.decode(
        "ascii", "replace"))


def detect(entries: Iterable[Any]) -> PmuLayout | str:
    """Counter 0 from CPUID entries (`kvm_cpuid_entry2`s: the VMM's CPUID), or a sentence saying why there is
    none."""
    entries = list(entries)
    vendor = _vendor(entries)
    if vendor == "intel":
        a = _leaf(entries, 0xA)
        eax = int(a.eax) if a is not None else 0
        version, counters, width = eax & 0xFF, (eax >> 8) & 0xFF, (eax >> 16) & 0xFF
        if version == 0 or counters == 0:
            return f"CPUID leaf 0xA reports no architectural PMU (EAX = {eax:#x})"
        return PmuLayout("intel", version, counters, width, INTEL_EVTSEL0, INTEL_PMC0,
                         INTEL_GLOBAL_CTRL if version >= 2 else None, INTEL_GLOBAL_STATUS if version >= 2 else None,
                         f"CPUID leaf 0xA EAX = {eax:#x}")
    if vendor == "amd":
        ext = _leaf(entries, 0x80000001)
        perfctr_core = bool(ext is not None and int(ext.ecx) >> 23 & 1)
        v2 = _leaf(entries, 0x80000022)
        perfmon_v2 = bool(v2 is not None and int(v2.eax) & 1)
        if perfmon_v2:
            assert v2 is not None
            counters = int(v2.ebx) & 0xF
            source = f"CPUID 0x80000022: PerfMonV2, {counters} counters"
        elif perfctr_core:
            counters, source = 6, "CPUID 0x80000001 ECX bit 23: PerfCtrExtCore"
        else:
            counters, source = 4, "no PMU bit in CPUID: the legacy counters, if any"
        evtsel, counter = (AMD_CTL0, AMD_CTR0) if perfctr_core or perfmon_v2 else (AMD_K7_EVNTSEL0, AMD_K7_PERFCTR0)
        return PmuLayout("amd", 2 if perfmon_v2 else 1, counters, 48, evtsel, counter,
                         AMD_GLOBAL_CTL if perfmon_v2 else None, AMD_GLOBAL_STATUS if perfmon_v2 else None, source)
    return f"no PMU layout known for CPU vendor {vendor!r}"


def enable_pmu_param() -> str | None:
    """The host's kvm.enable_pmu module parameter ("Y"/"N"), if readable: a hint for reports."""
    try:
        with open("/sys/module/kvm/parameters/enable_pmu", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def msr_values(layout: PmuLayout, *, preload: int, interrupt: bool) -> dict[int, int]:
    """MSR writes (in this order: KVM applies them in order) that make counter 0 count retired instructions, user
    and kernel mode, from `preload`: the counter, a cleared overflow status, the global enable, the event select
    last."""
    values = {layout.counter: preload & ((1 << layout.width) - 1)}
    if layout.global_status is not None:
        values[layout.global_status] = 0
    if layout.global_ctrl is not None:
        values[layout.global_ctrl] = 1
    values[layout.evtsel] = (EVENT_RETIRED_INSTRUCTIONS | EVTSEL_USR | EVTSEL_OS | EVTSEL_EN
                             | (EVTSEL_INT if interrupt else 0))
    return values


def write_msrs(fd: Any, values: Mapping[int, int]) -> None:
    """KVM_SET_MSRS on a vCPU fd; an MSR KVM refuses is a PmuError naming it."""
    msrs: Any = s.msrs_type(len(values))()
    msrs.nmsrs = len(values)
    for entry, (index, value) in zip(msrs.entries, values.items(), strict=True):
        entry.index, entry.data = index, value
    done = fd.set_msrs(msrs)
    if done != len(values):
        bad = list(values)[done]
        raise PmuError(f"KVM refused MSR {bad:#x} = {values[bad]:#x}")


def read_msrs(fd: Any, indices: Iterable[int]) -> dict[int, int]:
    wanted = list(indices)
    msrs: Any = s.msrs_type(len(wanted))()
    msrs.nmsrs = len(wanted)
    for entry, index in zip(msrs.entries, wanted, strict=True):
        entry.index = index
    done = fd.get_msrs(msrs)
    if done != len(wanted):
        raise PmuError(f"KVM refused to read MSR {wanted[done]:#x}")
    return {int(e.index): int(e.data) for e in msrs.entries[:len(wanted)]}


def set_lvtpc(fd: Any, vector: int) -> None:
    """Route counter overflows to `vector` (fixed delivery, unmasked) in a vCPU's LAPIC, software-enabling the
    LAPIC if the guest has not (LVT entries cannot be unmasked otherwise)."""
    lapic = s.LapicState()
    fd.get_lapic(lapic)
    svr = ctypes.c_uint32.from_buffer(lapic.regs, LAPIC_SVR)
    svr.value |= APIC_SW_ENABLE
    ctypes.c_uint32.from_buffer(lapic.regs, LAPIC_LVTPC).value = vector
    fd.set_lapic(lapic)


def _gate(handler: int, selector: int) -> bytes:
    """A present 64-bit interrupt gate, DPL 0, IST 0."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)


class InstructionBudget:
    """A budget of `limit` retired instructions per input for the fuzz forks of `sink` (see the module docstring).
    `install` prepares the sink (before it has forks); `arm(fork)` after every reset of a fork."""

    def __init__(self, layout: PmuLayout, limit: int, vector: int) -> None:
        if limit <= 0 or limit >= 1 << (layout.width - 1):
            raise PmuError(f"an instruction budget must be 1 to 2^{layout.width - 1} - 1, not {limit}")
        self.layout = layout
        self.limit = limit
        self.vector = vector
        self._values = msr_values(layout, preload=-limit, interrupt=True)

    @classmethod
    def install(cls, sink: Any, limit: int, layout: PmuLayout) -> InstructionBudget:
        from ..vmi.memory import AddressSpace, find_virtual

        space = AddressSpace(sink, 0)
        if not space.mode.long:
            raise PmuError("an instruction budget needs a 64-bit guest (the overflow stub is 64-bit code)")
        sregs = sink.vcpus[0].get_sregs()
        found = find_virtual(space, STUB_GPA, supervisor_exec=True)
        if not found:
            raise PmuError(f"the guest's page tables map the budget stub's page ({STUB_GPA:#x}) nowhere kernel code "
                           "can execute")
        vector = _free_vector(space, sregs.idt.base, sregs.idt.limit)
        sink.memory.write(STUB_GPA, STUB_CODE)
        gate_gpa = space.translate(sregs.idt.base + vector * 16).paddr
        sink.memory.write(gate_gpa, _gate(found[0], _kernel_cs(space, sregs.idt.base, sregs.idt.limit)))
        set_lvtpc(sink.vcpus[0].fd, vector)
        return cls(layout, limit, vector)

    def arm(self, fork: Any) -> None:
        """Counter 0 of `fork`'s vCPU 0 from 2^width - limit (a reset does not restore PMU MSRs everywhere)."""
        write_msrs(fork.vcpus[0].fd, self._values)

    @staticmethod
    def is_budget_stop(ev: Any) -> bool:
        return bool(ev.reason == "harness" and ev.status == BUDGET_MARK)

    @staticmethod
    def interrupted_rip(fork: Any) -> int:
        """The RIP the overflow interrupted: the first qword of the interrupt frame the stub runs on."""
        from ..vmi.memory import AddressSpace
        regs = fork.vcpus[0].get_regs()
        return AddressSpace(fork, 0).read_u64(regs.rsp)


def _free_vector(space: Any, idt_base: int, idt_limit: int) -> int:
    """The highest external-interrupt vector (32-254) whose gate is inside the IDT and not present."""
    for vector in range(0xFE, 0x1F, -1):
        if vector * 16 + 15 > idt_limit:
            continue
        gate = space.read(idt_base + vector * 16, 16)
        if not gate[5] & 0x80:
            return vector
    raise PmuError("the guest's IDT has no free vector for the counter-overflow interrupt")


def _kernel_cs(space: Any, idt_base: int, idt_limit: int) -> int:
    """The code selector of the guest's own interrupt handlers (its first present gate): the kernel's."""
    for vector in range(min(256, (idt_limit + 1) // 16)):
        gate = space.read(idt_base + vector * 16, 16)
        if gate[5] & 0x80:
            return int(struct.unpack_from("<H", gate, 2)[0])
    raise PmuError("the guest's IDT has no present gate to take a kernel code selector from")
