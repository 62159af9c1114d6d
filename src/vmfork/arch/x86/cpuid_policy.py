"""A CPUID policy: which CPU features a VM's vCPUs are shown, in libxl's syntax (xl.cfg(5), `cpuid=`).

    cpuid = "host,popcnt=0,xsave=0"

The first word is the base: `host` (every feature this host's KVM supports, as libxl's "host") or `default`
(a vmfork extension, and what a machine gets when no policy is given: `host` minus the features whose instructions
this host's in-kernel emulator cannot run in guest kernel mode, see arch/x86/emulator_probe.py; on a VT-x/AMD-V
host that is `host`). Then comma-separated `name=value` items: `0` hides the feature, `1` shows it (it must be one
this host's KVM supports), and libxl's `x`, `k` and `s` keep the base's bit. A string without a base word has the
base `host`, as in xl.

Names are libxl's (`cmpxchg16`, `sse4.1`, `tsc-deadline`, `avx512-ifma`, ...), and Linux's /proc/cpuinfo names
are accepted as aliases (`cx16`, `sse4_1`, `pni`, `pclmulqdq`, ...); "-", "_" and "." are interchangeable and case
does not matter. An unknown name is a ConfigError naming it.

Hiding a feature also hides what depends on it, as CPUs never show (and Linux's cpuid-deps assumes they never
show) e.g. AVX without XSAVE: hiding `xsave` hides the AVX families, the XSAVE variants and CPUID leaf 0xD (so
KVM keeps XCR0 at x87 only); hiding `avx` drops the AVX state component from leaf 0xD.

A policy is a value: `CpuidPolicy.parse(text)` checks it, `str(policy)` is its canonical text (equal policies have
equal text), and `apply(cpuid)` edits a KVM CPUID table in place.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError

BASES = ("host", "default")
_KEEP_VALUES = ("x", "k", "s")      # libxl: don't care / the host's value / the saved value: keep the base's bit


@dataclass(frozen=True, slots=True)
class Feature:
    """One CPUID feature bit, named as libxl names it."""

    name: str
    leaf: int
    subleaf: int
    reg: str            # eax, ebx, ecx, edx
    bit: int
    aliases: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"CPUID.{self.leaf:X}.{self.subleaf}:{self.reg.upper()} bit {self.bit}"


def _f(name: str, leaf: int, subleaf: int, reg: str, bit: int, *aliases: str) -> Feature:
    return Feature(name, leaf, subleaf, reg, bit, aliases)


# libxl's single-bit feature names (tools/libs/light/libxl_cpuid.c), with Linux's names as aliases.
FEATURES: tuple[Feature, ...] = (
    # leaf 1 ECX
    _f("sse3", 1, 0, "ecx", 0, "pni"), _f("pclmulqdq", 1, 0, "ecx", 1, "pclmul"), _f("dtes64", 1, 0, "ecx", 2),
    _f("monitor", 1, 0, "ecx", 3, "mwait"), _f("dscpl", 1, 0, "ecx", 4, "ds_cpl"), _f("vmx", 1, 0, "ecx", 5),
    _f("smx", 1, 0, "ecx", 6), _f("est", 1, 0, "ecx", 7), _f("tm2", 1, 0, "ecx", 8), _f("ssse3", 1, 0, "ecx", 9),
    _f("cntxid", 1, 0, "ecx", 10, "cid"), _f("fma", 1, 0, "ecx", 12),
    _f("cmpxchg16", 1, 0, "ecx", 13, "cx16", "cmpxchg16b"), _f("xtpr", 1, 0, "ecx", 14), _f("pdcm", 1, 0, "ecx", 15),
    _f("pcid", 1, 0, "ecx", 17), _f("dca", 1, 0, "ecx", 18), _f("sse4.1", 1, 0, "ecx", 19),
    _f("sse4.2", 1, 0, "ecx", 20), _f("x2apic", 1, 0, "ecx", 21), _f("movbe", 1, 0, "ecx", 22),
    _f("popcnt", 1, 0, "ecx", 23), _f("tsc-deadline", 1, 0, "ecx", 24, "tsc_deadline_timer"),
    _f("aes", 1, 0, "ecx", 25, "aes-ni"), _f("xsave", 1, 0, "ecx", 26), _f("osxsave", 1, 0, "ecx", 27),
    _f("avx", 1, 0, "ecx", 28), _f("f16c", 1, 0, "ecx", 29), _f("rdrand", 1, 0, "ecx", 30),
    _f("hypervisor", 1, 0, "ecx", 31),
    # leaf 1 EDX
    _f("fpu", 1, 0, "edx", 0), _f("vme", 1, 0, "edx", 1), _f("de", 1, 0, "edx", 2), _f("pse", 1, 0, "edx", 3),
    _f("tsc", 1, 0, "edx", 4), _f("msr", 1, 0, "edx", 5), _f("pae", 1, 0, "edx", 6), _f("mce", 1, 0, "edx", 7),
    _f("cmpxchg8", 1, 0, "edx", 8, "cx8"), _f("apic", 1, 0, "edx", 9), _f("sysenter", 1, 0, "edx", 11, "sep"),
    _f("mtrr", 1, 0, "edx", 12), _f("pge", 1, 0, "edx", 13), _f("mca", 1, 0, "edx", 14), _f("cmov", 1, 0, "edx", 15),
    _f("pat", 1, 0, "edx", 16), _f("pse36", 1, 0, "edx", 17), _f("psn", 1, 0, "edx", 18, "pn"),
    _f("clfsh", 1, 0, "edx", 19), _f("ds", 1, 0, "edx", 21), _f("acpi", 1, 0, "edx", 22), _f("mmx", 1, 0, "edx", 23),
    _f("fxsr", 1, 0, "edx", 24), _f("sse", 1, 0, "edx", 25), _f("sse2", 1, 0, "edx", 26), _f("ss", 1, 0, "edx", 27),
    _f("htt", 1, 0, "edx", 28, "ht"), _f("tm", 1, 0, "edx", 29), _f("pbe", 1, 0, "edx", 31),
    # leaf 6
    _f("arat", 6, 0, "eax", 2),
    # leaf 7.0 EBX
    _f("fsgsbase", 7, 0, "ebx", 0), _f("tsc_adjust", 7, 0, "ebx", 1), _f("bmi1", 7, 0, "ebx", 3),
    _f("hle", 7, 0, "ebx", 4), _f("avx2", 7, 0, "ebx", 5), _f("smep", 7, 0, "ebx", 7), _f("bmi2", 7, 0, "ebx", 8),
    _f("erms", 7, 0, "ebx", 9), _f("invpcid", 7, 0, "ebx", 10), _f("rtm", 7, 0, "ebx", 11),
    _f("cmt", 7, 0, "ebx", 12, "pqm"), _f("mpx", 7, 0, "ebx", 14), _f("avx512f", 7, 0, "ebx", 16),
    _f("avx512dq", 7, 0, "ebx", 17), _f("rdseed", 7, 0, "ebx", 18), _f("adx", 7, 0, "ebx", 19),
    _f("smap", 7, 0, "ebx", 20), _f("avx512-ifma", 7, 0, "ebx", 21), _f("clflushopt", 7, 0, "ebx", 23),
    _f("clwb", 7, 0, "ebx", 24), _f("proc-trace", 7, 0, "ebx", 25, "intel_pt"), _f("avx512pf", 7, 0, "ebx", 26),
    _f("avx512er", 7, 0, "ebx", 27), _f("avx512cd", 7, 0, "ebx", 28), _f("sha", 7, 0, "ebx", 29, "sha_ni"),
    _f("avx512bw", 7, 0, "ebx", 30), _f("avx512vl", 7, 0, "ebx", 31),
    # leaf 7.0 ECX
    _f("prefetchwt1", 7, 0, "ecx", 0), _f("avx512-vbmi", 7, 0, "ecx", 1), _f("umip", 7, 0, "ecx", 2),
    _f("pku", 7, 0, "ecx", 3), _f("ospke", 7, 0, "ecx", 4), _f("waitpkg", 7, 0, "ecx", 5),
    _f("avx512-vbmi2", 7, 0, "ecx", 6), _f("cet-ss", 7, 0, "ecx", 7, "shstk"), _f("gfni", 7, 0, "ecx", 8),
    _f("vaes", 7, 0, "ecx", 9), _f("vpclmulqdq", 7, 0, "ecx", 10), _f("avx512-vnni", 7, 0, "ecx", 11),
    _f("avx512-bitalg", 7, 0, "ecx", 12), _f("avx512-vpopcntdq", 7, 0, "ecx", 14), _f("la57", 7, 0, "ecx", 16),
    _f("rdpid", 7, 0, "ecx", 22), _f("cldemote", 7, 0, "ecx", 25), _f("movdiri", 7, 0, "ecx", 27),
    _f("movdir64b", 7, 0, "ecx", 28), _f("pks", 7, 0, "ecx", 31),
    # leaf 7.0 EDX
    _f("avx512-4vnniw", 7, 0, "edx", 2), _f("avx512-4fmaps", 7, 0, "edx", 3), _f("fsrm", 7, 0, "edx", 4),
    _f("avx512-vp2intersect", 7, 0, "edx", 8), _f("srbds-ctrl", 7, 0, "edx", 9),
    _f("md-clear", 7, 0, "edx", 10), _f("serialize", 7, 0, "edx", 14), _f("tsxldtrk", 7, 0, "edx", 16),
    _f("cet-ibt", 7, 0, "edx", 20, "ibt"), _f("amx-bf16", 7, 0, "edx", 22), _f("avx512-fp16", 7, 0, "edx", 23),
    _f("amx-tile", 7, 0, "edx", 24), _f("amx-int8", 7, 0, "edx", 25), _f("ibrsb", 7, 0, "edx", 26, "spec_ctrl"),
    _f("stibp", 7, 0, "edx", 27, "intel_stibp"), _f("l1d-flush", 7, 0, "edx", 28, "flush_l1d"),
    _f("arch-caps", 7, 0, "edx", 29, "arch_capabilities"), _f("core-caps", 7, 0, "edx", 30),
    _f("ssbd", 7, 0, "edx", 31, "spec_ctrl_ssbd"),
    # leaf 7.1 EAX
    _f("avx-vnni", 7, 1, "eax", 4), _f("avx512-bf16", 7, 1, "eax", 5), _f("fzrm", 7, 1, "eax", 10),
    _f("fsrs", 7, 1, "eax", 11), _f("fsrcs", 7, 1, "eax", 12), _f("wrmsrns", 7, 1, "eax", 19),
    # leaf 0xD.1 EAX (XSAVE variants; libxl names them in its featureset)
    _f("xsaveopt", 0xD, 1, "eax", 0), _f("xsavec", 0xD, 1, "eax", 1), _f("xgetbv1", 0xD, 1, "eax", 2),
    _f("xsaves", 0xD, 1, "eax", 3),
    # leaf 0x80000001
    _f("lahfsahf", 0x80000001, 0, "ecx", 0, "lahf_lm"), _f("cmplegacy", 0x80000001, 0, "ecx", 1, "cmp_legacy"),
    _f("svm", 0x80000001, 0, "ecx", 2), _f("extapic", 0x80000001, 0, "ecx", 3),
    _f("altmovcr8", 0x80000001, 0, "ecx", 4, "cr8_legacy"), _f("abm", 0x80000001, 0, "ecx", 5, "lzcnt"),
    _f("sse4a", 0x80000001, 0, "ecx", 6), _f("misalignsse", 0x80000001, 0, "ecx", 7),
    _f("3dnowprefetch", 0x80000001, 0, "ecx", 8), _f("osvw", 0x80000001, 0, "ecx", 9),
    _f("ibs", 0x80000001, 0, "ecx", 10), _f("xop", 0x80000001, 0, "ecx", 11), _f("skinit", 0x80000001, 0, "ecx", 12),
    _f("wdt", 0x80000001, 0, "ecx", 13), _f("lwp", 0x80000001, 0, "ecx", 15), _f("fma4", 0x80000001, 0, "ecx", 16),
    _f("nodeid", 0x80000001, 0, "ecx", 19), _f("tbm", 0x80000001, 0, "ecx", 21),
    _f("topoext", 0x80000001, 0, "ecx", 22), _f("perfctr_core", 0x80000001, 0, "ecx", 23),
    _f("perfctr_nb", 0x80000001, 0, "ecx", 24),
    _f("syscall", 0x80000001, 0, "edx", 11), _f("nx", 0x80000001, 0, "edx", 20),
    _f("mmxext", 0x80000001, 0, "edx", 22), _f("ffxsr", 0x80000001, 0, "edx", 25, "fxsr_opt"),
    _f("page1gb", 0x80000001, 0, "edx", 26, "pdpe1gb"), _f("rdtscp", 0x80000001, 0, "edx", 27),
    _f("lm", 0x80000001, 0, "edx", 29), _f("3dnowext", 0x80000001, 0, "edx", 30),
    _f("3dnow", 0x80000001, 0, "edx", 31),
    # leaf 0x80000007 / 0x80000008
    _f("invtsc", 0x80000007, 0, "edx", 8, "constant_tsc"),
    _f("clzero", 0x80000008, 0, "ebx", 0), _f("wbnoinvd", 0x80000008, 0, "ebx", 9),
    _f("ibpb", 0x80000008, 0, "ebx", 12, "amd_ibpb"), _f("ibrs", 0x80000008, 0, "ebx", 14, "amd_ibrs"),
    _f("amd-stibp", 0x80000008, 0, "ebx", 15), _f("amd-ssbd", 0x80000008, 0, "ebx", 24),
    _f("virt-ssbd", 0x80000008, 0, "ebx", 25),
)

# Hiding the key hides these too (a CPU never shows them without it; Linux's cpuid-deps.c has the same rules).
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("avx", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "pku", "mpx", "amx-tile", "cet-ss", "cet-ibt"),
    "avx": ("avx2", "fma", "f16c", "avx512f", "vaes", "vpclmulqdq", "avx-vnni", "xop", "fma4"),
    "avx512f": ("avx512dq", "avx512-ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
                "avx512-vbmi", "avx512-vbmi2", "avx512-vnni", "avx512-bitalg", "avx512-vpopcntdq",
                "avx512-4vnniw", "avx512-4fmaps", "avx512-vp2intersect", "avx512-fp16", "avx512-bf16"),
    "amx-tile": ("amx-bf16", "amx-int8"),
    "sse2": ("sse3", "ssse3", "sse4.1", "sse4.2", "aes", "pclmulqdq", "gfni", "sha", "sse4a"),
    "sse3": ("ssse3",),
    "ssse3": ("sse4.1",),
    "sse4.1": ("sse4.2",),
    "pclmulqdq": ("vpclmulqdq",),
    "aes": ("vaes",),
    "fxsr": ("sse", "ffxsr"),
    "sse": ("sse2",),
    "pku": ("ospke",),
}

# XSAVE state components (bits of CPUID.0xD.0:EAX and XCR0) that go with a feature.
XSTATE_COMPONENTS: dict[str, int] = {
    "avx": 1 << 2, "mpx": (1 << 3) | (1 << 4), "avx512f": (1 << 5) | (1 << 6) | (1 << 7), "pku": 1 << 9,
    "amx-tile": (1 << 17) | (1 << 18),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


BY_NAME: dict[str, Feature] = {}
for _feat in FEATURES:
    for _n in (_feat.name, *_feat.aliases):
        BY_NAME.setdefault(_key(_n), _feat)
_ORDER = {f.name: i for i, f in enumerate(FEATURES)}


def feature(name: str) -> Feature:
    """The feature called `name` (a libxl name or an alias); KeyError if there is none."""
    return BY_NAME[_key(name)]


def hidden_closure(names: Iterable[str]) -> frozenset[str]:
    """`names` and every feature that depends on one of them (canonical names)."""
    out: set[str] = set()
    todo = [feature(n).name for n in names]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += DEPENDENTS.get(n, ())
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class CpuidPolicy:
    """A base ("host" or "default") and the features set to 0 or 1 on top of it (canonical names, table order)."""

    base: str = "host"
    settings: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str, *, where: str = "cpuid") -> CpuidPolicy:
        """Parse libxl's syntax; a ConfigError starting with `where` names any bad item."""
        return _parse(text, where)

    def __str__(self) -> str:
        return ",".join([self.base, *(f"{n}={v}" for n, v in self.settings)])

    @property
    def hidden(self) -> frozenset[str]:
        """Features this policy hides, dependents included (the base's own hiding is not known here)."""
        return hidden_closure(n for n, v in self.settings if v == 0)

    @property
    def shown(self) -> frozenset[str]:
        return frozenset(n for n, v in self.settings if v == 1)

    def on(self, base: CpuidPolicy) -> CpuidPolicy:
        """This policy's settings applied on top of a concrete policy for its base (e.g. the host's default)."""
        merged = dict(base.settings)
        merged.update(self.settings)
        return CpuidPolicy(base.base, _ordered(merged))

    def apply(self, cpuid: ctypes.Structure) -> None:
        """Edit a KVM CPUID table (struct kvm_cpuid2) in place: clear the hidden features' bits (and their
        dependents', and their XSAVE state components) and set the shown ones'. The base must be "host"."""
        if self.base != "host":
            raise ValueError(f"apply() needs a concrete policy (base host), not {self}")
        edits, zero_leaf_d, components = _plan(self)
        c: Any = cpuid
        for e in c.entries[:c.nent]:
            leaf = e.function
            if leaf == 0xD and (zero_leaf_d or (e.index >= 2 and components >> e.index & 1)):
                e.eax = e.ebx = e.ecx = e.edx = 0   # no XSAVE leaf: KVM keeps XCR0 at x87 (guest_supported_xcr0)
                continue
            for reg, clear, setbits in edits.get((leaf, e.index if e.flags & 1 else 0), ()):
                setattr(e, reg, (getattr(e, reg) & ~clear) | setbits)
            if leaf == 0xD and e.index == 0 and components:
                e.eax &= ~components


@functools.lru_cache(maxsize=64)
def _plan(policy: CpuidPolicy) -> tuple[dict[tuple[int, int], list[tuple[str, int, int]]], bool, int]:
    """What `apply` does, worked out once per policy: {(leaf, subleaf): [(register, clear mask, set mask)]},
    whether leaf 0xD goes, and the XSAVE components to drop."""
    hide = policy.hidden - policy.shown
    masks: dict[tuple[int, int, str], list[int]] = {}
    for names, index in ((hide, 0), (policy.shown, 1)):
        for name in names:
            f = BY_NAME[_key(name)]
            masks.setdefault((f.leaf, f.subleaf, f.reg), [0, 0])[index] |= 1 << f.bit
    edits: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for (leaf, subleaf, reg), (clear, setbits) in masks.items():
        edits.setdefault((leaf, subleaf), []).append((reg, clear, setbits))
    components = 0
    for name, bits in XSTATE_COMPONENTS.items():
        if name in hide:
            components |= bits
    return edits, "xsave" in hide, components


def _matching(entries: Any, leaf: int, subleaf: int) -> list[Any]:
    return [e for e in entries if e.function == leaf and (e.index == subleaf or not e.flags & 1)]


def _ordered(settings: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(settings.items(), key=lambda kv: _ORDER[kv[0]]))


@functools.lru_cache(maxsize=256)
def _parse(text: str, where: str) -> CpuidPolicy:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a string like \"host,popcnt=0\", got {text!r}")
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        items = []
    base = "host"
    if items and _key(items[0]) in BASES:
        base = _key(items.pop(0))
    settings: dict[str, int] = {}
    for item in items:
        if not item:
            raise ConfigError(f"{where}: {text!r} has an empty item (two commas, or a comma at an end)")
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if _key(name) in BASES:
            raise ConfigError(f"{where}: the base {name!r} must be the first word")
        if not eq:
            raise ConfigError(f"{where}: {item!r} needs a value: write {name}=0 to hide the feature, {name}=1 to "
                              "show it")
        f = BY_NAME.get(_key(name))
        if f is None:
            import difflib
            close = difflib.get_close_matches(_key(name), list(BY_NAME), n=1, cutoff=0.75)
            hint = f" (did you mean {BY_NAME[close[0]].name!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown CPU feature {name!r}{hint}")
        if value in _KEEP_VALUES:
            settings.pop(f.name, None)
            continue
        if value not in ("0", "1"):
            raise ConfigError(f"{where}: {item!r}: the value must be 0 (hide) or 1 (show), or x, k or s (keep)")
        settings[f.name] = int(value)
    return CpuidPolicy(base, _ordered(settings))


def parse(text: str, *, where: str = "cpuid") -> CpuidPolicy:
    """CpuidPolicy.parse."""
    return _parse(text, where)


HOST = CpuidPolicy("host")
DEFAULT = CpuidPolicy("default")


def unsupported(policy: CpuidPolicy, host_cpuid: ctypes.Structure) -> list[str]:
    """Features `policy` shows (=1) that this host's KVM does not offer."""
    c: Any = host_cpuid
    entries = c.entries[:c.nent]
    out = []
    for name in policy.shown:
        f = BY_NAME[_key(name)]
        if not any(getattr(e, f.reg) >> f.bit & 1 for e in _matching(entries, f.leaf, f.subleaf)):
            out.append(name)
    return sorted(out, key=_ORDER.__getitem__)


__all__ = ["BASES", "DEFAULT", "DEPENDENTS", "FEATURES", "HOST", "CpuidPolicy", "Feature", "feature",
           "hidden_closure", "parse", "unsupported"]
