"""x86-64 CPU setup: CPUID from what the host supports, the MSRs a machine's state includes, and initial register
state for a boot protocol's entry."""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

from ...kvm import Kvm, VcpuFd
from ...kvm import structs as s
from .cpuid_policy import HOST, CpuidPolicy
from .cpuid_policy import parse as parse_policy

# MSRs every vCPU state carries (filtered by what KVM actually accepts on this host, see usable_msrs()).
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_IA32_TSC_DEADLINE = 0x6E0
BASE_MSRS: tuple[int, ...] = (
    0x174, 0x175, 0x176,                    # SYSENTER_CS/ESP/EIP
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000102, 0xC0000103,                 # KERNEL_GS_BASE, TSC_AUX
    MSR_IA32_TSC, 0x3B,                     # TSC, TSC_ADJUST
    0x277,                                  # PAT
    MSR_IA32_MISC_ENABLE,
    MSR_MTRR_DEF_TYPE, 0x250, 0x258, 0x259, *range(0x268, 0x270), *range(0x200, 0x210),  # MTRRs
    MSR_IA32_TSC_DEADLINE,
    0x4B564D00, 0x4B564D01, 0x4B564D02, 0x4B564D03, 0x4B564D04,  # kvmclock, async PF, steal time, PV EOI
    0x11, 0x12,                             # old kvmclock MSRs
    0x48,                                   # SPEC_CTRL
)

TSS_SELECTOR = 0x20

_usable_msrs: tuple[int, ...] | None = None


def usable_msrs(vcpu: VcpuFd, kvm: Kvm) -> tuple[int, ...]:
    """The MSRs (of BASE_MSRS plus KVM's own save list) this host lets us read back, probed once per process."""
    global _usable_msrs
    if _usable_msrs is None:
        candidates = sorted(set(BASE_MSRS) | set(kvm.msr_index_list()))
        one = s.msrs_type(1)()
        ok = []
        for index in candidates:
            one.nmsrs = 1
            one.entries[0].index = index
            if vcpu.get_msrs(one) == 1:
                ok.append(index)
        _usable_msrs = tuple(ok)
    return _usable_msrs


_host_cpuid: ctypes.Structure | None = None


def vcpu_cpuid(kvm: Kvm, apic_id: int, tsc_khz: int = 0, policy: CpuidPolicy | str = HOST) -> ctypes.Structure:
    """CPUID for one vCPU: the host's supported leaves with this vCPU's APIC ID and the hypervisor bit, plus the
    timing leaf 0x40000010 (TSC and LAPIC bus frequency in kHz) so guests need not calibrate their clocks, with
    the features `policy` (a concrete policy, base "host": see cpuid_policy) hides or shows. Built once per
    (APIC ID, TSC rate, policy) and copied afterwards: machines and pool shells make one per vCPU."""
    key = (apic_id, tsc_khz, str(policy))
    made = _made.get(key)
    if made is None:
        made = _made[key] = _build_cpuid(host_cpuid(kvm), apic_id, tsc_khz, policy)
    return type(made).from_buffer_copy(made)


_made: dict[tuple[int, int, str], ctypes.Structure] = {}


def _build_cpuid(host: Any, apic_id: int, tsc_khz: int, policy: CpuidPolicy | str) -> ctypes.Structure:
    n = host.nent
    out: Any = s.cpuid2_type(n + 1)()
    ctypes.memmove(ctypes.addressof(out.entries), ctypes.addressof(host.entries), n * ctypes.sizeof(s.CpuidEntry2))
    has_hv_base = False
    for e in out.entries[:n]:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
            e.ecx |= 1 << 31            # running under a hypervisor
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
        elif e.function == 0x40000000:
            has_hv_base = True
            e.eax = max(e.eax, 0x40000010)
    if has_hv_base and tsc_khz and not any(e.function == 0x40000010 for e in out.entries[:n]):
        timing = out.entries[n]
        timing.function, timing.eax, timing.ebx = 0x40000010, tsc_khz, 1_000_000   # KVM's LAPIC timer: 1 GHz
        n += 1
    out.nent = n
    concrete = policy if isinstance(policy, CpuidPolicy) else parse_policy(policy)
    if concrete.settings:
        concrete.apply(out)
    return out


def host_cpuid(kvm: Kvm) -> ctypes.Structure:
    """What KVM_GET_SUPPORTED_CPUID says (read once per process)."""
    global _host_cpuid
    if _host_cpuid is None:
        _host_cpuid = kvm.supported_cpuid()
    return _host_cpuid


class EntryLike(Protocol):
    """What a boot loader returns (vmfork.arch.x86.boot.EntryState)."""

    @property
    def mode(self) -> str: ...
    @property
    def rip(self) -> int: ...
    @property
    def rsp(self) -> int: ...
    @property
    def rflags(self) -> int: ...
    @property
    def gprs(self) -> Any: ...
    @property
    def cr0(self) -> int: ...
    @property
    def cr3(self) -> int: ...
    @property
    def cr4(self) -> int: ...
    @property
    def efer(self) -> int: ...
    @property
    def gdt_base(self) -> int: ...
    @property
    def gdt_limit(self) -> int: ...
    @property
    def cs_selector(self) -> int: ...
    @property
    def ds_selector(self) -> int: ...


def _flat_segment(seg: s.Segment, selector: int, *, code: bool, long64: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3     # execute/read accessed, or read/write accessed
    seg.present = 1
    seg.dpl = 0
    seg.s = 1
    seg.g = 1
    seg.l = 1 if (code and long64) else 0
    seg.db = 0 if (code and long64) else 1
    seg.avl = 0
    seg.unusable = 0


def apply_entry(entry: EntryLike, regs: s.Regs, sregs: s.Sregs) -> None:
    """Set registers and segments for a boot protocol's entry (32-bit protected mode or 64-bit long mode)."""
    long64 = entry.mode == "long64"
    _flat_segment(sregs.cs, entry.cs_selector, code=True, long64=long64)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _flat_segment(getattr(sregs, name), entry.ds_selector, code=False, long64=long64)
    # A busy 32-bit TSS at base 0, limit 0x67, as the PVH entry convention asks (its GDT has the descriptor).
    sregs.tr.base, sregs.tr.limit, sregs.tr.selector, sregs.tr.type = 0, 0x67, TSS_SELECTOR, 0xB
    sregs.tr.present, sregs.tr.s, sregs.tr.g, sregs.tr.unusable = 1, 0, 0, 0
    sregs.ldt.selector, sregs.ldt.type, sregs.ldt.present, sregs.ldt.s, sregs.ldt.unusable = 0, 2, 1, 0, 0
    sregs.gdt.base, sregs.gdt.limit = entry.gdt_base, entry.gdt_limit
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF if not long64 else 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    for name in s.GPR_NAMES:
        setattr(regs, name, 0)
    regs.rip, regs.rsp, regs.rflags = entry.rip, entry.rsp, entry.rflags or 2
    for name, value in dict(entry.gprs).items():
        setattr(regs, name, value)


def lapic_virtual_wire(lapic: s.LapicState) -> None:
    """LINT0 = ExtINT and LINT1 = NMI, as firmware leaves the boot CPU's LAPIC (needed for PIC interrupts)."""
    def put(offset: int, value: int) -> None:
        ctypes.c_uint32.from_buffer(lapic.regs, offset).value = value

    def get(offset: int) -> int:
        return ctypes.c_uint32.from_buffer(lapic.regs, offset).value

    put(0x350, (get(0x350) & ~0x700 & ~0x10000) | (7 << 8))     # LVT LINT0: ExtINT, unmasked
    put(0x360, (get(0x360) & ~0x700 & ~0x10000) | (4 << 8))     # LVT LINT1: NMI, unmasked
