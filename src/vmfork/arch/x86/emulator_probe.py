"""Which instruction families this host's KVM cannot run in guest kernel mode, and the default CPUID policy that
hides them.

On hosts where guest kernel mode (CPL0) is emulated instruction by instruction (kvm_pvm, see
shared notes host-kvm.md), KVM's emulator stops the VM with KVM_EXIT_INTERNAL_ERROR (emulation failure) at
instructions it does not know: the XSAVE family, `lock cmpxchg16b`, `popcnt`, `clac`/`stac`, ... A guest kernel
picks those code paths by CPUID, so hiding the features keeps it on paths the emulator can run.

Each family is probed by a tiny guest: one fresh KVM VM (no irqchip: a few ms) running the instruction in CPL0 of
the flat long-mode environment (arch/x86/flat.py's tables, written here without a Machine so this module stays in
the arch layer), with the host's full CPUID and whatever CR4/XCR0 bits the instruction needs, then an `out` to
the exit port. Outcomes: "works", "emulation-failure", "#UD"/"#GP"/... (a fault the CPU would not raise), "hangs",
"absent" (this host's KVM does not offer the feature: nothing to hide), "error" (the probe itself failed).

The result is cached per process and in `${XDG_CACHE_HOME:-~/.cache}/vmfork/cpl0-instructions.json`, keyed by the
kernel release, the KVM modules loaded (name and srcversion), the CPU model and PROBE_VERSION, so creating a
machine normally costs a dictionary lookup. The whole probe takes well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import platform
import signal
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError, VmforkError
from ...kvm import Kvm
from ...kvm import constants as c
from ...kvm import structs as s
from . import cpu, flat
from .cpuid_policy import FEATURES, CpuidPolicy, feature, hidden_closure, unsupported

PROBE_VERSION = 3
RAM = 4 << 20                       # the flat layout's tables, stacks, code at 1 MiB and data at 2 MiB
D = flat.DATA_ADDR.to_bytes(4, "little")    # a disp32 operand: [DATA_ADDR], 64-byte aligned, zeroed
TIMEOUT_S = 2.0

CR4_FSGSBASE = 1 << 16
XCR0_X87_SSE = 0x3
XCR0_AVX = 0x4
XCR0_AVX512 = 0xE0

WORKS = "works"
EMULATION_FAILURE = "emulation-failure"
ABSENT = "absent"
HANGS = "hangs"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Family:
    """An instruction family: code that runs its instructions, and the CPUID features that advertise it (hidden
    when the code fails; empty for baseline instructions no CPUID bit can hide)."""

    name: str
    what: str                       # the instructions, as a reader knows them
    code: bytes
    features: tuple[str, ...]       # hidden when the family fails here
    needs: tuple[str, ...] = ()     # host features the code needs (default: `features`)
    cr4: int = 0                    # extra CR4 bits to set
    xcr0: int | None = None         # set CR4.OSXSAVE and XCR0 to this (masked by what the host supports)

    @property
    def required(self) -> tuple[str, ...]:
        return self.needs or self.features


FAMILIES: tuple[Family, ...] = (
    Family("xsave", "xsave/xrstor/xgetbv/xsetbv",
           b"\xb8\x03\x00\x00\x00"          # mov eax, 3           (x87 | SSE)
           b"\x31\xd2"                      # xor edx, edx
           b"\x0f\xae\x24\x25" + D +        # xsave [DATA]
           b"\x0f\xae\x2c\x25" + D +        # xrstor [DATA]
           b"\x31\xc9"                      # xor ecx, ecx
           b"\x0f\x01\xd0"                  # xgetbv
           b"\x0f\x01\xd1",                 # xsetbv
           ("xsave",), xcr0=XCR0_X87_SSE),
    Family("xsaveopt", "xsaveopt", b"\xb8\x03\x00\x00\x00\x31\xd2"   # mov eax, 3; xor edx, edx
           b"\x0f\xae\x34\x25" + D,         # xsaveopt [DATA]
           ("xsaveopt",), xcr0=XCR0_X87_SSE),
    Family("fxsave", "fxsave/fxrstor (baseline: no CPUID bit can hide it)",
           b"\x0f\xae\x04\x25" + D +        # fxsave [DATA]
           b"\x0f\xae\x0c\x25" + D,         # fxrstor [DATA]
           (), ("fxsr",)),
    Family("sse", "movaps to memory (baseline)", b"\x0f\x29\x04\x25" + D, (), ("sse",)),   # movaps [DATA], xmm0
    Family("sse2", "paddd (baseline)", b"\x66\x0f\xfe\xc1", (), ("sse2",)),             # paddd xmm0, xmm1
    Family("cmpxchg8b", "lock cmpxchg8b (baseline)", b"\xf0\x0f\xc7\x0c\x25" + D, (), ("cmpxchg8",)),
    Family("cmpxchg16b", "lock cmpxchg16b", b"\xf0\x48\x0f\xc7\x0c\x25" + D, ("cmpxchg16",)),
    Family("popcnt", "popcnt", b"\xf3\x48\x0f\xb8\xc0", ("popcnt",)),             # popcnt rax, rax
    Family("lzcnt", "lzcnt (abm)", b"\xf3\x48\x0f\xbd\xc0", ("abm",)),            # lzcnt rax, rax
    Family("bmi1", "andn, tzcnt",
           b"\xc4\xe2\xf0\xf2\xc0"          # andn rax, rcx, rax
           b"\xf3\x48\x0f\xbc\xc0",         # tzcnt rax, rax
           ("bmi1",)),
    Family("bmi2", "bzhi", b"\xc4\xe2\xf0\xf5\xc0", ("bmi2",)),                  # bzhi rax, rax, rcx
    Family("adx", "adcx", b"\x66\x48\x0f\x38\xf6\xc0", ("adx",)),                # adcx rax, rax
    Family("movbe", "movbe", b"\x0f\x38\xf0\x04\x25" + D, ("movbe",)),          # movbe eax, [DATA]
    Family("smap", "clac/stac", b"\x0f\x01\xca\x0f\x01\xcb", ("smap",)),          # clac; stac
    Family("fsgsbase", "rd/wrfsbase, rd/wrgsbase",
           b"\xf3\x48\x0f\xae\xc0"          # rdfsbase rax
           b"\xf3\x48\x0f\xae\xd0"          # wrfsbase rax
           b"\xf3\x48\x0f\xae\xc8"          # rdgsbase rax
           b"\xf3\x48\x0f\xae\xd8",         # wrgsbase rax
           ("fsgsbase",), cr4=CR4_FSGSBASE),
    Family("invpcid", "invpcid",
           b"\xb8\x02\x00\x00\x00"          # mov eax, 2           (all contexts, globals included)
           b"\x66\x0f\x38\x82\x04\x25" + D,  # invpcid rax, [DATA]  (a zeroed descriptor)
           ("invpcid",)),
    Family("pcid", "CR4.PCIDE and a tagged, non-flushing mov to CR3",
           b"\x0f\x20\xe0"                  # mov rax, cr4
           b"\x0f\xba\xe8\x11"              # bts eax, 17          (PCIDE)
           b"\x0f\x22\xe0"                  # mov cr4, rax
           b"\x0f\x20\xd8"                  # mov rax, cr3
           b"\x48\x0f\xba\xe8\x3f"          # bts rax, 63          (keep the TLB)
           b"\x48\x83\xc8\x01"              # or rax, 1            (PCID 1)
           b"\x0f\x22\xd8",                 # mov cr3, rax
           ("pcid",)),
    Family("sse3", "haddps", b"\xf2\x0f\x7c\xc1", ("sse3",)),                     # haddps xmm0, xmm1
    Family("ssse3", "pshufb", b"\x66\x0f\x38\x00\xc1", ("ssse3",)),               # pshufb xmm0, xmm1
    Family("sse4.1", "ptest, roundps",
           b"\x66\x0f\x38\x17\xc1"          # ptest xmm0, xmm1
           b"\x66\x0f\x3a\x08\xc1\x00",     # roundps xmm0, xmm1, 0
           ("sse4.1",)),
    Family("sse4.2", "crc32, pcmpistri",
           b"\xf2\x0f\x38\xf1\xc1"          # crc32 eax, ecx
           b"\x66\x0f\x3a\x63\xc1\x00",     # pcmpistri xmm0, xmm1, 0
           ("sse4.2",)),
    Family("aes", "aesenc", b"\x66\x0f\x38\xdc\xc1", ("aes",)),                   # aesenc xmm0, xmm1
    Family("pclmulqdq", "pclmulqdq", b"\x66\x0f\x3a\x44\xc1\x00", ("pclmulqdq",)),
    Family("sha", "sha1nexte", b"\x0f\x38\xc8\xc1", ("sha",)),                    # sha1nexte xmm0, xmm1
    Family("gfni", "gf2p8mulb", b"\x66\x0f\x38\xcf\xc1", ("gfni",)),              # gf2p8mulb xmm0, xmm1
    Family("avx", "VEX-encoded SSE (vpxor xmm)", b"\xc5\xf1\xef\xc2", ("avx",),  # vpxor xmm0, xmm1, xmm2
           xcr0=XCR0_X87_SSE | XCR0_AVX),
    Family("avx2", "256-bit integer AVX (vpaddd ymm)", b"\xc5\xf5\xfe\xc2", ("avx2",),  # vpaddd ymm0, ymm1, ymm2
           xcr0=XCR0_X87_SSE | XCR0_AVX),
    Family("fma", "vfmadd132ps", b"\xc4\xe2\x71\x98\xc2", ("fma",), xcr0=XCR0_X87_SSE | XCR0_AVX),
    Family("f16c", "vcvtph2ps", b"\xc4\xe2\x79\x13\xc1", ("f16c",), xcr0=XCR0_X87_SSE | XCR0_AVX),
    Family("avx512f", "EVEX-encoded AVX-512 (vpxord zmm)", b"\x62\xf1\x75\x48\xef\xc2", ("avx512f",),
           xcr0=XCR0_X87_SSE | XCR0_AVX | XCR0_AVX512),
    Family("rdrand", "rdrand", b"\x0f\xc7\xf0", ("rdrand",)),                    # rdrand eax
    Family("rdseed", "rdseed", b"\x0f\xc7\xf8", ("rdseed",)),                    # rdseed eax
    Family("rdtscp", "rdtscp", b"\x0f\x01\xf9", ("rdtscp",)),
    Family("rdpid", "rdpid", b"\xf3\x0f\xc7\xf8", ("rdpid",)),                    # rdpid rax
    Family("clflushopt", "clflushopt", b"\x66\x0f\xae\x3c\x25" + D, ("clflushopt",)),
    Family("clwb", "clwb", b"\x66\x0f\xae\x34\x25" + D, ("clwb",)),
    Family("fwait", "fwait (baseline)", b"\x9b", (), ("fpu",)),
)
"""The families probed, in report order."""


@dataclass(frozen=True, slots=True)
class FamilyResult:
    name: str
    status: str
    detail: str = ""

    @property
    def fails(self) -> bool:
        """The instruction cannot run here (an absent feature needs no hiding)."""
        return self.status not in (WORKS, ABSENT)


@dataclass(frozen=True, slots=True)
class EmulatorReport:
    """What the probe found, and the default policy it derives."""

    results: tuple[FamilyResult, ...]
    key: Mapping[str, str]
    seen: Mapping[str, int] = dataclasses.field(default_factory=dict)   # the guest's CPUID view, policy host
    stuck: tuple[str, ...] = ()      # features the guest sees even when the CPUID table hides them
    timers: tuple[FamilyResult, ...] = ()   # the TSC-deadline timer (probe_tsc_deadline)

    @property
    def leaks(self) -> tuple[str, ...]:
        """Features of failing families that this host's KVM shows the guest whatever its CPUID table says: no
        policy can hide them, so they need fallbacks (or the guest's own switch, e.g. Linux's clearcpuid=)."""
        return tuple(n for n in self.wanted if n in self.stuck)

    def result(self, name: str) -> FamilyResult:
        for r in (*self.results, *self.timers):
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def failing_timers(self) -> tuple[FamilyResult, ...]:
        return tuple(r for r in self.timers if r.fails)

    @property
    def timer_hidden(self) -> tuple[str, ...]:
        """Features the default policy hides because of the timer probe (not an instruction family)."""
        names: list[str] = []
        for r in self.failing_timers:
            names += [f for f in TIMER_FEATURES[r.name] if f not in names and f not in self.stuck]
        return tuple(names)

    @property
    def failing(self) -> tuple[FamilyResult, ...]:
        return tuple(r for r in self.results if r.fails)

    @property
    def wanted(self) -> tuple[str, ...]:
        """The features of every failing family, in report order."""
        names: list[str] = []
        for r in self.failing:
            for f in _FAMILY[r.name].features:
                if f not in names:
                    names.append(f)
        for r in self.failing_timers:
            names += [f for f in TIMER_FEATURES[r.name] if f not in names]
        return tuple(names)

    @property
    def hidden(self) -> tuple[str, ...]:
        """Features the default policy hides (without dependents): the failing families' features a CPUID table
        can hide here."""
        return tuple(n for n in self.wanted if n not in self.stuck)

    @property
    def unhideable(self) -> tuple[str, ...]:
        """Failing families no CPUID bit can hide (baseline instructions: need a fallback, not a policy)."""
        return tuple(r.name for r in self.failing if not _FAMILY[r.name].features)

    def default_policy(self) -> CpuidPolicy:
        """`host` with every failing family's features set to 0, where that hides them (see `leaks`)."""
        return CpuidPolicy.parse(",".join(["host", *(f"{n}=0" for n in self.hidden)]))

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROBE_VERSION, "key": dict(self.key), "seen": dict(self.seen), "stuck": list(self.stuck),
                "results": {r.name: {"status": r.status, "detail": r.detail} for r in self.results},
                "timers": {r.name: {"status": r.status, "detail": r.detail} for r in self.timers}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmulatorReport:
        if d.get("version") != PROBE_VERSION:
            raise ValueError("another probe version")
        results = tuple(FamilyResult(n, str(v["status"]), str(v.get("detail", "")))
                        for n, v in dict(d["results"]).items())
        if {r.name for r in results} != set(_FAMILY):
            raise ValueError("other families")
        timers = tuple(FamilyResult(n, str(v["status"]), str(v.get("detail", "")))
                       for n, v in dict(d.get("timers", {})).items())
        if {r.name for r in timers} != set(TIMER_FEATURES):
            raise ValueError("other timers")
        return cls(results, dict(d["key"]), {str(k): int(v) for k, v in dict(d.get("seen", {})).items()},
                   tuple(str(n) for n in d.get("stuck", ())), timers)


_FAMILY = {f.name: f for f in FAMILIES}

# --- running one family -------------------------------------------------------------------------------------------

_VECTORS = {0: "#DE", 3: "#BP", 6: "#UD", 7: "#NM", 13: "#GP", 14: "#PF", 19: "#XM"}
KICK_SIGNAL = signal.SIGRTMIN + 5       # the same no-op signal vm.py uses to interrupt KVM_RUN


def _ensure_kick_handler() -> bool:
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return True


def _host_has(host: Any, name: str) -> bool:
    f = feature(name)
    for e in host.entries[:host.nent]:
        if e.function == f.leaf and (e.index == f.subleaf or not e.flags & 1):
            return bool(getattr(e, f.reg) >> f.bit & 1)
    return False


def _host_xcr0(host: Any) -> int:
    for e in host.entries[:host.nent]:
        if e.function == 0xD and e.index == 0:
            return int(e.eax) | int(e.edx) << 32
    return XCR0_X87_SSE


def _write_flat(buf: mmap.mmap, code: bytes, handlers: Mapping[int, bytes] | None = None) -> None:
    pml4, pdpt, pd = flat.page_table_bytes(preset_dirty=True)
    gates = {v: flat.STUBS_ADDR + v * flat.STUB_SIZE for v in range(256)}
    placed = []
    at = flat.HANDLERS_ADDR
    for vector, blob in sorted((handlers or {}).items()):
        gates[vector] = at
        placed.append((at, blob))
        at = (at + len(blob) + 15) & ~15
    if at > flat.HANDLERS_END:
        raise VmforkError("probe handlers do not fit")
    for addr, blob in ((flat.PML4_ADDR, pml4), (flat.PDPT_ADDR, pdpt), (flat.PD_ADDR, pd),
                       (flat.GDT_ADDR, flat.gdt_bytes()), (flat.TSS_ADDR, flat.tss_bytes()),
                       (flat.STUBS_ADDR, b"".join(flat._default_stub(v) for v in range(256))),
                       (flat.IDT_ADDR, b"".join(flat._gate(gates[v], 0) for v in range(256))),
                       (flat.CODE_ADDR, code), *placed):
        buf[addr:addr + len(blob)] = blob


def run_cpl0(kvm: Kvm, code: bytes, *, cpuid: ctypes.Structure, cr4: int = 0, xcr0: int | None = None,
             timeout: float = TIMEOUT_S, out: bytearray | None = None, lapic: bool = False,
             handlers: Mapping[int, bytes] | None = None) -> tuple[str, str]:
    """Run `code` once in CPL0 of a fresh flat VM; (status, detail). The code is followed by an exit. `out` is
    filled with the guest's bytes at DATA_ADDR afterwards. `lapic`: the VM gets KVM's in-kernel irqchip and the
    vCPU's LAPIC starts in x2APIC mode (the CPUID table must offer x2apic); `handlers`: vector -> handler code."""
    ok = 0x2A
    program = code + flat.exit_with(ok)
    buf = mmap.mmap(-1, RAM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm = kvm.create_vm()
    vcpu = None
    timer: threading.Timer | None = None
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        _write_flat(buf, program, handlers)
        vm.set_tss_addr(0xFFFBD000)
        if lapic:
            vm.create_irqchip()
        vm.set_user_memory_region(0, 0, RAM, ctypes.addressof(anchor), 0)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(cpuid)
        sregs = s.Sregs()
        vcpu.get_sregs(sregs)
        flat.long_mode_sregs(sregs, cpl=0, osxsave=xcr0 is not None, x2apic=lapic)
        sregs.cr4 |= cr4
        vcpu.set_sregs(sregs)
        regs = s.Regs()
        regs.rip, regs.rsp, regs.rflags = flat.CODE_ADDR, flat.KERNEL_STACK_TOP, flat.RFLAGS_FIXED
        vcpu.set_regs(regs)
        if xcr0 is not None:
            xcrs = s.Xcrs()
            xcrs.nr_xcrs = 1
            xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, xcr0
            vcpu.set_xcrs(xcrs)
        run = vcpu.run
        if _ensure_kick_handler():
            tid = threading.get_ident()

            def kick() -> None:
                run.immediate_exit = 1
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(tid, KICK_SIGNAL)
            timer = threading.Timer(timeout, kick)
            timer.daemon = True
            timer.start()
        for _ in range(64):
            if vcpu.run_once() < 0:
                return HANGS, f"no exit within {timeout:g} s"
            reason = run.exit_reason
            if reason == c.KVM_EXIT_IO and run.exit.io.port == flat.EXIT_PORT:
                value = ctypes.c_uint8.from_address(vcpu.run_addr + run.exit.io.data_offset).value
                if value == ok:
                    return WORKS, "runs"
                if flat.TRAP_STATUS_BASE <= value < flat.TRAP_STATUS_BASE + 32:
                    v = value - flat.TRAP_STATUS_BASE
                    name = _VECTORS.get(v, f"vector {v}")
                    return name, f"raises {name} (vector {v})"
                return ERROR, f"exit status {value:#x}"
            if reason in (c.KVM_EXIT_IO, c.KVM_EXIT_INTR):
                continue
            if reason == c.KVM_EXIT_INTERNAL_ERROR:
                sub = run.exit.internal.suberror
                if sub == c.KVM_INTERNAL_ERROR_EMULATION:
                    return EMULATION_FAILURE, "stops the VM with KVM_EXIT_INTERNAL_ERROR (emulation failure)"
                return ERROR, f"KVM internal error, suberror {sub}"
            name = c.EXIT_REASON_NAMES.get(reason, str(reason))
            return ERROR, f"unexpected exit {name}"
        return ERROR, "too many exits"
    finally:
        if timer is not None:
            timer.cancel()
        if out is not None:
            out[:] = buf[flat.DATA_ADDR:flat.DATA_ADDR + len(out)]
        if vcpu is not None:
            vcpu.close()
        vm.close()
        del anchor
        buf.close()


# The CPUID words the guest's view is read from: (leaf, subleaf); 16 bytes (EAX, EBX, ECX, EDX) each.
SEEN_LEAVES: tuple[tuple[int, int], ...] = ((1, 0), (6, 0), (7, 0), (7, 1), (0xD, 0), (0xD, 1), (0x80000001, 0),
                                            (0x80000007, 0), (0x80000008, 0))
_REGS = ("eax", "ebx", "ecx", "edx")


def _cpuid_reader() -> bytes:
    code = b""
    for i, (leaf, subleaf) in enumerate(SEEN_LEAVES):
        code += b"\xb8" + leaf.to_bytes(4, "little")          # mov eax, leaf
        code += b"\xb9" + subleaf.to_bytes(4, "little")       # mov ecx, subleaf
        code += b"\x0f\xa2"                                    # cpuid
        for j, modrm in enumerate((0x04, 0x1C, 0x0C, 0x14)):   # mov [DATA + 16i + 4j], eax/ebx/ecx/edx
            code += b"\x89" + bytes((modrm, 0x25)) + (flat.DATA_ADDR + 16 * i + 4 * j).to_bytes(4, "little")
    return code


def guest_cpuid(kvm: Kvm, table: ctypes.Structure) -> dict[str, int]:
    """What a CPL0 guest given the CPUID `table` reads with the `cpuid` instruction: {"leaf.subleaf.reg": value}
    (leaf in hex). On some hosts this is not the table: kvm_pvm shows most host bits whatever the table says."""
    data = bytearray(16 * len(SEEN_LEAVES))
    status, detail = run_cpl0(kvm, _cpuid_reader(), cpuid=table, out=data)
    if status != WORKS:
        raise VmforkError(f"a guest reading CPUID {detail}")
    words = struct.unpack(f"<{4 * len(SEEN_LEAVES)}I", data)
    return {f"{leaf:x}.{sub}.{reg}": words[4 * i + j]
            for i, (leaf, sub) in enumerate(SEEN_LEAVES) for j, reg in enumerate(_REGS)}


def _sees(seen: Mapping[str, int], name: str) -> bool:
    f = feature(name)
    return bool(seen.get(f"{f.leaf:x}.{f.subleaf}.{f.reg}", 0) >> f.bit & 1)


def probe_family(kvm: Kvm, fam: Family, host: Any, seen: Mapping[str, int] | None = None) -> FamilyResult:
    """One family's outcome. A family whose features this host's KVM does not offer at all is "absent" (nothing
    to hide), but still run where it can be, so the report says what the emulator would do with it."""
    missing = [n for n in fam.required if not (_sees(seen, n) if seen is not None else _host_has(host, n))]
    if fam.xcr0 is not None:
        offered = seen.get("d.0.eax", 0) if seen is not None else _host_xcr0(host)
        xsave = _sees(seen, "xsave") if seen is not None else _host_has(host, "xsave")
        if fam.xcr0 & ~offered or not xsave:
            missing = missing or [f"XCR0 {fam.xcr0:#x}"]
            return FamilyResult(fam.name, ABSENT, f"the guest does not see {', '.join(missing)} (nothing to hide)")
    xcr0 = fam.xcr0
    try:
        status, detail = run_cpl0(kvm, fam.code, cpuid=host, cr4=fam.cr4, xcr0=xcr0)
    except VmforkError as e:
        status, detail = ERROR, f"cannot be probed: {e}"
    if missing:
        return FamilyResult(fam.name, ABSENT, f"the guest does not see {', '.join(missing)} (nothing to hide); "
                                              f"{fam.what} in CPL0 {detail}")
    return FamilyResult(fam.name, status, f"{fam.what} in CPL0 {detail}")


# --- the TSC-deadline timer ----------------------------------------------------------------------------------------
#
# Linux uses the LAPIC's TSC-deadline mode whenever CPUID offers it (and the MADT gives it the APIC). That mode is
# one-shot only, so a kernel with a periodic tick (Linux without HIGH_RES_TIMERS, e.g. the CI kernel) re-arms it
# from every tick and, finding the next tick already due, runs it at once (tick_handle_periodic): it catches up on
# every tick it missed. Where guest kernel mode is emulated, one tick costs milliseconds, and on a busy host about a
# tick period: the kernel then runs its tick and nothing else. Measured here (2026-12-07, Linux 6.1 HZ=100, host
# load 10-14): with TSC-deadline, jiffies advanced at 100/s with the vCPU inside the tick (interrupts off) in 8 of
# 10 samples, and the boot never got past "pnp: PnP ACPI" (RCU stall warnings later); with it hidden, the LAPIC
# timer's periodic mode drops the ticks the guest misses (jiffies at 70/s, in the tick in 4 of 10 samples) and the
# boot goes on. The interrupt itself arrives on time here. So the probe checks both: that a TSC-deadline interrupt
# arrives, not early, and how fast guest kernel mode runs; either failing hides `tsc-deadline`.

TIMER_VECTOR = 0x40
MSR_TSC_DEADLINE = 0x6E0
X2APIC_SVR, X2APIC_LVT_TIMER = 0x80F, 0x832
LVT_TSC_DEADLINE = 2 << 17
DEADLINE_DELTA_TSC = 10_000_000         # a few ms at any TSC rate
SPEED_LOOP = 10_000                     # iterations of a 2-instruction loop, timed by the guest's TSC
EMULATED_NS = 20.0                      # ns per instruction above which kernel mode is emulated (native: < 1 ns)
TIMER = "tsc-deadline"
EARLY = "early"
NO_INTERRUPT = "no-interrupt"
EMULATED_TICK = "emulated-tick"
TIMER_FEATURES: dict[str, tuple[str, ...]] = {TIMER: ("tsc-deadline",)}


def _wrmsr(index: int, value: int) -> bytes:
    return (b"\xb9" + struct.pack("<I", index)                  # mov ecx, index
            + b"\xb8" + struct.pack("<I", value & 0xFFFFFFFF)   # mov eax, low
            + b"\xba" + struct.pack("<I", value >> 32)          # mov edx, high
            + b"\x0f\x30")                                     # wrmsr


_RDTSC_RAX = b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0"         # rdtsc; shl rdx, 32; or rax, rdx


def _store_rax(addr: int) -> bytes:
    return b"\x48\x89\x04\x25" + struct.pack("<I", addr)        # mov [addr], rax


def tsc_deadline_guest(delta: int = DEADLINE_DELTA_TSC) -> tuple[bytes, bytes]:
    """(code, handler): the code enables the x2APIC, puts its timer in TSC-deadline mode, arms it `delta` TSC ticks
    ahead (the deadline stored at DATA_ADDR) and halts with interrupts on; the handler stores the TSC at its arrival
    (DATA_ADDR + 8) and stops the machine with run_cpl0's success status."""
    code = (_wrmsr(X2APIC_SVR, 0x1FF)                             # APIC software-enabled
            + _wrmsr(X2APIC_LVT_TIMER, TIMER_VECTOR | LVT_TSC_DEADLINE)
            + _RDTSC_RAX
            + b"\x48\xb9" + struct.pack("<Q", delta)             # mov rcx, delta
            + b"\x48\x01\xc8"                                    # add rax, rcx
            + _store_rax(flat.DATA_ADDR)
            + b"\x48\x89\xc2\x48\xc1\xea\x20"                    # mov rdx, rax; shr rdx, 32
            + b"\xb9" + struct.pack("<I", MSR_TSC_DEADLINE)       # mov ecx, IA32_TSC_DEADLINE
            + b"\x0f\x30"                                         # wrmsr
            + b"\xfb\xf4\xeb\xfd")                                # sti; hlt; jmp to the hlt
    handler = _RDTSC_RAX + _store_rax(flat.DATA_ADDR + 8) + flat.exit_with(_OK)
    return code, handler


_OK = 0x2A                              # run_cpl0's success status


def cpl0_ns_per_instruction(kvm: Kvm, host: ctypes.Structure) -> float:
    """About how many nanoseconds one instruction of a CPL0 loop takes: the guest times the loop with its TSC (so the
    VM's set-up does not count), converted to ns at the TSC rate KVM gives the vCPU; the best of two runs."""
    loop = (_RDTSC_RAX + _store_rax(flat.DATA_ADDR)
            + b"\xb9" + struct.pack("<I", SPEED_LOOP) + b"\xff\xc9\x75\xfc"     # mov ecx, N; 1: dec ecx; jnz 1b
            + _RDTSC_RAX + _store_rax(flat.DATA_ADDR + 8))
    best = float("inf")
    for _ in range(2):
        data = bytearray(16)
        status, detail = run_cpl0(kvm, loop, cpuid=host, timeout=30.0, out=data)
        if status != WORKS:
            raise VmforkError(f"a CPL0 loop {detail}")
        start, end = struct.unpack("<QQ", data)
        best = min(best, (end - start) / (2 * SPEED_LOOP))
    return best / (_tsc_khz(kvm) / 1e6)


_tsc_khz_value: int | None = None


def _tsc_khz(kvm: Kvm) -> int:
    """The vCPU TSC rate KVM uses here (KVM_GET_TSC_KHZ on a throw-away vCPU; 1 GHz if KVM cannot say)."""
    global _tsc_khz_value
    if _tsc_khz_value is None:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                _tsc_khz_value = vcpu.get_tsc_khz() or 1_000_000
            except VmforkError:
                _tsc_khz_value = 1_000_000
            finally:
                vcpu.close()
        finally:
            vm.close()
    return _tsc_khz_value


def probe_tsc_deadline(kvm: Kvm, host: ctypes.Structure, seen: Mapping[str, int] | None = None) -> FamilyResult:
    """Whether a kernel can use the TSC-deadline timer here: its interrupt arrives, not before its deadline, and
    guest kernel mode runs natively (see above)."""
    has = (lambda n: _sees(seen, n)) if seen else (lambda n: _host_has(host, n))
    missing = [n for n in ("tsc-deadline", "x2apic") if not has(n)]
    if missing:
        return FamilyResult(TIMER, ABSENT, f"the guest does not see {', '.join(missing)} (nothing to hide)")
    code, handler = tsc_deadline_guest()
    data = bytearray(16)
    try:
        status, detail = run_cpl0(kvm, code, cpuid=host, lapic=True, handlers={TIMER_VECTOR: handler}, out=data)
    except VmforkError as e:
        return FamilyResult(TIMER, ERROR, f"cannot be probed: {e}")
    if status == HANGS:
        return FamilyResult(TIMER, NO_INTERRUPT, f"a TSC-deadline timer armed {DEADLINE_DELTA_TSC:,} TSC ticks ahead "
                                                 f"gave no interrupt within {TIMEOUT_S:g} s")
    if status != WORKS:
        return FamilyResult(TIMER, status, f"arming the TSC-deadline timer {detail}")
    deadline, arrived = struct.unpack("<QQ", data)
    if arrived < deadline:
        return FamilyResult(TIMER, EARLY, f"the TSC-deadline interrupt came {deadline - arrived:,} TSC ticks before "
                                          "its deadline")
    try:
        ns = cpl0_ns_per_instruction(kvm, host)
    except VmforkError as e:
        return FamilyResult(TIMER, ERROR, f"guest kernel-mode speed cannot be measured: {e}")
    arrives = f"its interrupt arrives {arrived - deadline:,} TSC ticks after the deadline"
    if ns >= EMULATED_NS:
        return FamilyResult(TIMER, EMULATED_TICK,
                            f"{arrives}, but guest kernel mode is emulated here ({ns:,.0f} ns per instruction): a "
                            "kernel that drives its periodic tick with this one-shot timer catches up on every tick "
                            "it missed and, where an emulated tick costs about a tick period, does nothing else "
                            "(Linux 6.1 stalled in its tick); the LAPIC timer's periodic mode drops missed ticks")
    return FamilyResult(TIMER, WORKS, f"{arrives}; guest kernel mode runs at {ns:.1f} ns per instruction")


HIDE_ALL = CpuidPolicy.parse(",".join(["host", *(f"{f.name}=0" for f in FEATURES
                                                 if (f.leaf, f.subleaf) in SEEN_LEAVES and f.name != "hypervisor")]))


def probe(kvm: Kvm) -> EmulatorReport:
    """Run every family (no cache), after reading which CPUID bits the guest really sees, and which stay set
    even when the CPUID table hides them."""
    host = cpu.vcpu_cpuid(kvm, 0)
    try:
        seen = guest_cpuid(kvm, host)
        with_all_hidden = guest_cpuid(kvm, cpu.vcpu_cpuid(kvm, 0, policy=HIDE_ALL))
    except VmforkError:
        seen, with_all_hidden = {}, {}
    stuck = tuple(f.name for f in FEATURES if (f.leaf, f.subleaf) in SEEN_LEAVES and f.name in HIDE_ALL.hidden
                  and _sees(with_all_hidden, f.name))
    results = tuple(probe_family(kvm, f, host, seen or None) for f in FAMILIES)
    timers = (probe_tsc_deadline(kvm, host, seen or None),)
    return EmulatorReport(results, cache_key(), seen, stuck, timers)


# --- cache --------------------------------------------------------------------------------------------------------

def _kvm_modules() -> str:
    out = []
    for name in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        base = Path("/sys/module") / name
        if base.is_dir():
            try:
                version = (base / "srcversion").read_text().strip()
            except OSError:
                version = "?"
            out.append(f"{name}:{version}")
    return ",".join(out)


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo): part of the keys of cached host measurements."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cache_key() -> dict[str, str]:
    return {"kernel": platform.release(), "kvm": _kvm_modules(), "cpu": cpu_model(),
            "probe": str(PROBE_VERSION)}


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmfork" / "cpl0-instructions.json"


_cached: EmulatorReport | None = None
_lock = threading.Lock()


def _load() -> EmulatorReport | None:
    try:
        report = EmulatorReport.from_dict(json.loads(cache_path().read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if dict(report.key) == cache_key() else None


def _store(report: EmulatorReport) -> None:
    path = cache_path()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cpl0-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def report(kvm: Kvm, *, fresh: bool = False) -> EmulatorReport:
    """This host's report: from this process, else the cache file if it is for this kernel and KVM, else probed
    now (and stored). `fresh` probes again."""
    global _cached
    with _lock:
        if not fresh:
            if _cached is not None:
                return _cached
            stored = _load()
            if stored is not None:
                _cached = stored
                return stored
        _cached = probe(kvm)
        _store(_cached)
        return _cached


def default_policy(kvm: Kvm) -> CpuidPolicy:
    """The policy a machine gets when none is given: `host` minus what this host cannot run in guest kernel mode."""
    return report(kvm).default_policy()


def resolve(policy: CpuidPolicy | str | None, kvm: Kvm) -> CpuidPolicy:
    """A concrete policy (base `host`) for this host: None and base `default` take the probe's default."""
    p = CpuidPolicy.parse("default") if policy is None else (
        policy if isinstance(policy, CpuidPolicy) else CpuidPolicy.parse(policy))
    if p.base == "host":
        return p
    return p.on(default_policy(kvm))


def concrete(kvm: Kvm, policy: CpuidPolicy | str | None) -> str:
    """The canonical text of `policy` made concrete for this host (what MachineShape.cpuid holds). A feature the
    policy shows (=1) that this host's KVM does not offer is a ConfigError naming it."""
    p = resolve(policy, kvm)
    lacking = unsupported(p, cpu.host_cpuid(kvm))
    if lacking:
        raise ConfigError(f"cpuid: {', '.join(f'{n}=1' for n in lacking)}: this host's KVM does not offer "
                          f"{', '.join(lacking)}")
    return str(p)


def boot_note(kvm: Kvm, policy: str) -> str | None:
    """The one line to say when a machine with this concrete policy boots: which CPU features it hides and which
    this host shows the guest anyway (None for a policy that hides nothing, on a host where that is the default)."""
    p = CpuidPolicy.parse(policy)
    if not p.hidden and not (policy == str(default_policy(kvm)) and report(kvm).leaks):
        return None
    r = report(kvm)
    if policy == str(r.default_policy()):
        line = describe_default(kvm)
    else:
        visible = [n for n in sorted(p.hidden) if not r.seen or _sees(r.seen, n)]   # what hiding changes at all
        leaks = [n for n in visible if n in r.stuck]
        shown = [n for n in visible if n not in r.stuck]
        line = f"CPUID policy {policy}: the guest does not see {', '.join(shown) or 'any of them'}"
        if leaks:
            line += f"; this host's KVM shows it {', '.join(leaks)} whatever the CPUID table says"
    return line


def describe_default(kvm: Kvm) -> str:
    """One line: what the default policy hides here and why, and what it cannot hide."""
    r = report(kvm)
    timer = set(r.timer_hidden)
    hidden = tuple(n for n in r.hidden if n not in timer)
    leaks = r.leaks
    if not r.hidden and not leaks:
        return "CPUID policy: host (guest kernel mode runs every probed instruction family here)"
    closure = sorted(hidden_closure(hidden) - set(hidden))
    extra = f" (and with them {', '.join(closure)})" if closure else ""
    parts = []
    if hidden:
        parts.append(f"{', '.join(hidden)}{extra}: this host's KVM cannot run those instructions in guest kernel mode")
    if timer:
        why = {EMULATED_TICK: "guest kernel mode is emulated, too slow for a periodic tick driven by a one-shot timer",
               NO_INTERRUPT: "its interrupt does not arrive", EARLY: "its interrupt comes before its deadline"}
        reasons = "; ".join(why.get(t.status, t.status) for t in r.failing_timers)
        parts.append(f"{', '.join(sorted(timer))}: the TSC-deadline timer ({reasons})")
    head = "CPUID policy: host" + (" minus " + "; minus ".join(parts) if parts else "")
    tail = (f"; it cannot run {', '.join(leaks)} either, but shows them to the guest whatever the CPUID table says, "
            "so they need fallbacks" if leaks else "")
    return f"{head}{tail} (vmfork doctor)"


__all__ = ["FAMILIES", "TIMER", "EmulatorReport", "Family", "FamilyResult", "boot_note", "cache_path", "concrete",
           "cpl0_ns_per_instruction", "default_policy", "describe_default", "probe", "probe_tsc_deadline", "report",
           "resolve", "run_cpl0", "tsc_deadline_guest"]
