"""The CPU a saved machine was given, and whether this host can give it the same.

A save file records the CPUID vendor, family/model/stepping and the feature bit words of the CPUID its vCPUs were
given (vmfork gives every vCPU the host's KVM-supported CPUID, see arch/x86/cpu.py). A restore is refused when the
vendor differs or this host lacks a recorded feature bit: the guest may have chosen code paths (AVX, XSAVE
components, ...) by those bits at boot. Family and model are recorded for information only.

The machine's CPUID policy (arch/x86/cpuid_policy.py) is recorded beside it, in the header key "cpuid":
{"policy": its concrete text, "default": whether it was the saving host's default policy}. A restore gives the
machine the same policy. It is refused, naming the feature, when this host's default policy would hide a feature a
default-policy machine was given (this host cannot run it in guest kernel mode, and the guest may already use
it), and when a policy asked for at restore hides a feature the saved machine was given.

Feature words are named "leaf.subleaf.register" with the leaf in hex, e.g. "7.0.ebx" or "80000001.0.ecx", so a
file from a newer vmfork that records more words is still checked word by word.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..arch.x86 import cpu, emulator_probe
from ..arch.x86.cpuid_policy import CpuidPolicy
from ..errors import ConfigError, SnapshotHostError
from ..kvm import Kvm

if TYPE_CHECKING:
    from .container import ContainerFile

# The words recorded, and bits that describe OS or VMM state rather than CPU capability (ignored).
WORDS: tuple[str, ...] = ("1.0.ecx", "1.0.edx", "7.0.ebx", "7.0.ecx", "7.0.edx", "7.1.eax", "d.0.eax", "d.1.eax",
                          "80000001.0.ecx", "80000001.0.edx", "80000008.0.ebx")
IGNORED: dict[str, int] = {
    "1.0.ecx": (1 << 27) | (1 << 31),   # OSXSAVE (CR4.OSXSAVE), hypervisor (set by vmfork)
    "7.0.ecx": 1 << 4,                  # OSPKE (CR4.PKE)
}

_NAMES: dict[str, dict[int, str]] = {
    "1.0.edx": dict(enumerate(
        "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 pn clflush - ds acpi mmx fxsr "
        "sse sse2 ss ht tm - pbe".split())),
    "1.0.ecx": dict(enumerate(
        "sse3 pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cnxt_id sdbg fma cx16 xtpr pdcm - pcid dca "
        "sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave osxsave avx f16c rdrand hypervisor".split())),
    "7.0.ebx": dict(enumerate(
        "fsgsbase tsc_adjust sgx bmi1 hle avx2 fdp_excptn_only smep bmi2 erms invpcid rtm pqm zero_fcs_fds mpx "
        "rdt_a avx512f avx512dq rdseed adx smap avx512ifma pcommit clflushopt clwb intel_pt avx512pf avx512er "
        "avx512cd sha_ni avx512bw avx512vl".split())),
    "7.0.ecx": dict(enumerate(
        "prefetchwt1 avx512vbmi umip pku ospke waitpkg avx512_vbmi2 cet_ss gfni vaes vpclmulqdq avx512_vnni "
        "avx512_bitalg tme avx512_vpopcntdq - la57 - - - - - rdpid kl - cldemote - movdiri movdir64b enqcmd "
        "sgx_lc pks".split())),
    "7.0.edx": {2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 8: "avx512_vp2intersect", 10: "md_clear",
                14: "serialize", 16: "tsx_ldtrk", 18: "pconfig", 20: "cet_ibt", 22: "amx_bf16", 23: "avx512_fp16",
                24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl", 27: "intel_stibp", 28: "flush_l1d",
                29: "arch_capabilities", 30: "core_capabilities", 31: "spec_ctrl_ssbd"},
    "7.1.eax": {4: "avx_vnni", 5: "avx512_bf16"},
    "d.0.eax": {0: "xsave component x87", 1: "xsave component sse", 2: "xsave component avx",
                3: "xsave component bndregs", 4: "xsave component bndcsr", 5: "xsave component opmask",
                6: "xsave component zmm_hi256", 7: "xsave component hi16_zmm", 9: "xsave component pkru",
                17: "xsave component xtilecfg", 18: "xsave component xtiledata"},
    "d.1.eax": {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    "80000001.0.edx": {11: "syscall", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb", 27: "rdtscp",
                       29: "lm", 30: "3dnowext", 31: "3dnow"},
    "80000001.0.ecx": dict(enumerate(
        "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs xop skinit wdt - "
        "lwp fma4 tce - nodeid_msr - tbm topoext perfctr_core perfctr_nb - bpext ptsc perfctr_llc mwaitx".split())),
    "80000008.0.ebx": {0: "clzero", 2: "xsaveerptr", 9: "wbnoinvd", 12: "amd_ibpb", 14: "amd_ibrs",
                       15: "amd_stibp", 24: "amd_ssbd", 25: "virt_ssbd"},
}

_REGS = ("eax", "ebx", "ecx", "edx")


def parse_word(word: str) -> tuple[int, int, str]:
    """"7.0.ebx" -> (0x7, 0, "ebx"); ValueError if malformed."""
    leaf, subleaf, reg = word.split(".")
    if reg not in _REGS:
        raise ValueError(f"bad register in {word!r}")
    return int(leaf, 16), int(subleaf), reg


def feature_name(word: str, bit: int) -> str:
    """A readable name for one bit, e.g. "avx2 (CPUID.7.0:EBX bit 5)"."""
    leaf, subleaf, reg = parse_word(word)
    where = f"CPUID.{leaf:X}.{subleaf}:{reg.upper()} bit {bit}"
    name = _NAMES.get(word, {}).get(bit)
    return f"{name} ({where})" if name and name != "-" else where


def _value(entries: Any, n: int, leaf: int, subleaf: int, reg: str) -> int:
    for e in entries[:n]:
        if e.function == leaf and (e.index == subleaf or not e.flags & 1):
            return int(getattr(e, reg))
    return 0


def _vendor(entries: Any, n: int) -> str:
    regs = [_value(entries, n, 0, 0, r) for r in ("ebx", "edx", "ecx")]
    return b"".join(r.to_bytes(4, "little") for r in regs).decode("ascii", "replace")


def describe(cpuid: ctypes.Structure) -> dict[str, Any]:
    """What a save file records of a vCPU's CPUID (JSON-able)."""
    c: Any = cpuid
    n, entries = c.nent, c.entries
    eax1 = _value(entries, n, 1, 0, "eax")
    family, model, stepping = (eax1 >> 8) & 0xF, (eax1 >> 4) & 0xF, eax1 & 0xF
    if family == 0xF:
        family += (eax1 >> 20) & 0xFF
    if family in (0x6, 0xF) or family > 0xF:
        model |= ((eax1 >> 16) & 0xF) << 4
    features = {}
    for word in WORDS:
        leaf, subleaf, reg = parse_word(word)
        features[word] = _value(entries, n, leaf, subleaf, reg) & ~IGNORED.get(word, 0)
    return {"vendor": _vendor(entries, n), "family": family, "model": model, "stepping": stepping,
            "features": features}


def host_cpu(kvm: Kvm) -> dict[str, Any]:
    """What this host would give a new vCPU (the same CPUID vmfork's machines get)."""
    return describe(cpu.vcpu_cpuid(kvm, 0))


def words_of(cpuid: ctypes.Structure, words: Mapping[str, int]) -> dict[str, int]:
    """This CPUID's value of each named word (also words this vmfork does not record itself)."""
    c: Any = cpuid
    out = {}
    for word in words:
        leaf, subleaf, reg = parse_word(word)
        out[word] = _value(c.entries, c.nent, leaf, subleaf, reg) & ~IGNORED.get(word, 0)
    return out


def missing(saved: Mapping[str, int], host: Mapping[str, int]) -> list[str]:
    """Names of the saved feature bits the host words lack."""
    out = []
    for word, bits in saved.items():
        lacking = bits & ~host.get(word, 0) & ~IGNORED.get(word, 0)
        out += [feature_name(word, b) for b in range(32) if lacking >> b & 1]
    return out


# --- the CPUID policy -------------------------------------------------------------------------------------------

def policy_header(kvm: Kvm, policy: str) -> dict[str, Any]:
    """The header's "cpuid" value for a machine with this concrete policy."""
    return {"policy": policy, "default": policy == str(emulator_probe.default_policy(kvm))}


def saved_policy(f: ContainerFile) -> str:
    """The concrete policy a save file's machine had ("host" for files older than policies)."""
    raw = f.header.get("cpuid", {"policy": "host", "default": False})
    if not isinstance(raw, dict) or not isinstance(raw.get("policy"), str) \
            or not isinstance(raw.get("default", False), bool):
        raise f.fail(f"the header's \"cpuid\" description is malformed: {raw!r}")
    try:
        policy = CpuidPolicy.parse(raw["policy"], where="the header's cpuid policy")
    except ConfigError as e:
        raise f.fail(str(e)) from None
    if policy.base != "host":
        raise f.fail(f"the header's cpuid policy {raw['policy']!r} is not concrete (base host)")
    return str(policy)


def _given(f: ContainerFile) -> dict[str, int]:
    features: dict[str, int] = f.header["cpu"]["features"]
    return features


def check_policy(f: ContainerFile, kvm: Kvm, requested: str | None) -> str:
    """The concrete policy a restored machine gets: the saved one, or `requested`. Raises SnapshotHostError naming
    the features a requested policy, or this host's default for a default-policy file, would take away."""
    saved = saved_policy(f)
    given = _given(f)
    if requested is not None:
        policy = emulator_probe.concrete(kvm, requested)
        taken = missing(given, words_of(cpu.vcpu_cpuid(kvm, 0, policy=policy), given))
        if taken:
            raise SnapshotHostError(f"{f.path}: the CPUID policy {requested!r} hides {', '.join(taken)}, which the "
                                    "saved machine was given (its guest may already use it)")
        return policy
    if f.header.get("cpuid", {}).get("default"):
        default = str(emulator_probe.default_policy(kvm))
        taken = missing(given, words_of(cpu.vcpu_cpuid(kvm, 0, policy=default), given))
        if taken:
            raise SnapshotHostError(
                f"{f.path}: this host's default CPUID policy hides {', '.join(taken)}, which the saved machine was "
                "given: this host's KVM cannot run it in guest kernel mode (vmfork doctor). Restore with "
                "cpuid=\"host\" to give it anyway")
    return saved
