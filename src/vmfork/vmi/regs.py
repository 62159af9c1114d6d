"""vCPU registers by name: read, write, and print them.

General registers (rax..r15, rip, rflags) come from `kvm_regs`; segment selectors and bases, control registers,
EFER and the descriptor tables from `kvm_sregs`. Names are case-insensitive; `eflags` is an alias of `rflags`,
`fs_base`/`gs_base` of the FS/GS segment bases. Writing a register of an in-process VM notes the change
(`VM.touch()`) so forks taken afterwards start from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kvm import structs as s
from .errors import VmiError
from .target import Target, as_target

__all__ = ["CpuMode", "cpu_mode", "format_regs", "get_register", "register_names", "regs_dict", "set_register"]

GPRS = s.GPR_NAMES
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
ALIASES = {"eflags": "rflags", "fs_base": "fs.base", "gs_base": "gs.base", "pc": "rip", "sp": "rsp"}

RFLAGS_BITS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF"),
               (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID"))


@dataclass(frozen=True, slots=True)
class CpuMode:
    bits: int           # 64, 32 or 16: the code size of the current instruction stream
    name: str           # "64-bit long mode", "32-bit compatibility mode", "32-bit protected mode", "real mode", ...
    cpl: int


def cpu_mode(sregs: s.Sregs) -> CpuMode:
    cs = sregs.cs
    if not sregs.cr0 & 1:
        return CpuMode(16, "real mode", 0)
    cpl = cs.dpl if cs.present else cs.selector & 3
    if sregs.efer & (1 << 10):
        if cs.l:
            return CpuMode(64, "64-bit long mode", cpl)
        return CpuMode(32 if cs.db else 16, f"{32 if cs.db else 16}-bit compatibility mode", cpl)
    return CpuMode(32 if cs.db else 16, f"{32 if cs.db else 16}-bit protected mode", cpl)


def register_names() -> tuple[str, ...]:
    """Every name `get_register`/`set_register` accept (besides the aliases)."""
    return (*GPRS, *(f"{seg}.{f}" for seg in SEGMENTS for f in ("selector", "base", "limit")),
            *(f"{seg}" for seg in SEGMENTS), *CONTROL, "gdt.base", "gdt.limit", "idt.base", "idt.limit")


def _canonical(name: str) -> str:
    n = name.strip().lower()
    return ALIASES.get(n, n)


def _unknown(name: str) -> VmiError:
    return VmiError(f"no register named {name!r} (known: {', '.join(GPRS)}, eflags, cs..gs and .base/.limit, "
                    f"fs_base, gs_base, {', '.join(CONTROL)}, gdt/idt.base/.limit)")


def get_register(target: Target | object, name: str, *, vcpu: int = 0) -> int:
    t = as_target(target)
    n = _canonical(name)
    if n in GPRS:
        return int(getattr(t.get_regs(vcpu), n))
    sregs = t.get_sregs(vcpu)
    if n in CONTROL:
        return int(getattr(sregs, n))
    if n in SEGMENTS:
        return int(getattr(sregs, n).selector)
    part, _, fld = n.partition(".")
    if part in SEGMENTS and fld in ("selector", "base", "limit"):
        return int(getattr(getattr(sregs, part), fld))
    if part in ("gdt", "idt") and fld in ("base", "limit"):
        return int(getattr(getattr(sregs, part), fld))
    raise _unknown(name)


def set_register(target: Target | object, name: str, value: int, *, vcpu: int = 0) -> None:
    """Set one register. Segment selectors set only the selector (not the cached descriptor)."""
    t = as_target(target)
    n = _canonical(name)
    if n in GPRS:
        regs = t.get_regs(vcpu)
        setattr(regs, n, value & ((1 << 64) - 1))
        t.set_regs(vcpu, regs)
        return
    sregs = t.get_sregs(vcpu)
    part, _, fld = n.partition(".")
    if n in CONTROL:
        setattr(sregs, n, value & ((1 << 64) - 1))
    elif n in SEGMENTS:
        getattr(sregs, n).selector = value & 0xFFFF
    elif part in SEGMENTS and fld in ("selector", "base", "limit"):
        seg = getattr(sregs, part)
        bits = {"selector": 16, "base": 64, "limit": 32}[fld]
        setattr(seg, fld, value & ((1 << bits) - 1))
    elif part in ("gdt", "idt") and fld in ("base", "limit"):
        setattr(getattr(sregs, part), fld, value & ((1 << (64 if fld == "base" else 16)) - 1))
    else:
        raise _unknown(name)
    t.set_sregs(vcpu, sregs)


def regs_dict(regs: s.Regs, sregs: s.Sregs | None = None) -> dict[str, int]:
    """Name -> value of the general registers (and, with sregs, the segment and control registers)."""
    out = {n: int(getattr(regs, n)) for n in GPRS}
    if sregs is not None:
        for seg in SEGMENTS:
            sg = getattr(sregs, seg)
            out[seg] = int(sg.selector)
            out[f"{seg}.base"] = int(sg.base)
            out[f"{seg}.limit"] = int(sg.limit)
        for n in CONTROL:
            out[n] = int(getattr(sregs, n))
        for n in ("gdt", "idt"):
            out[f"{n}.base"] = int(getattr(sregs, n).base)
            out[f"{n}.limit"] = int(getattr(sregs, n).limit)
    return out


def flags_text(rflags: int) -> str:
    names = [n for bit, n in RFLAGS_BITS if rflags >> bit & 1]
    names.append(f"IOPL={rflags >> 12 & 3}")
    return " ".join(names)


def format_regs(target: Target | object, vcpu: int | None = None) -> str:
    """A register table of one vCPU, or of all of them (vcpu=None)."""
    t = as_target(target)
    indexes = range(t.vcpu_count) if vcpu is None else [vcpu]
    blocks = []
    for i in indexes:
        regs, sregs = t.get_regs(i), t.get_sregs(i)
        mode = cpu_mode(sregs)
        lines = [f"vCPU {i}: {mode.name}, CPL{mode.cpl}" + (" (running: values of its last exit)"
                                                            if t.state == "running" else "")]
        names = list(GPRS[:16])
        for k in range(0, 16, 4):
            lines.append("  " + "  ".join(f"{n:<3} {getattr(regs, n):016x}" for n in names[k:k + 4]))
        lines.append(f"  rip {regs.rip:016x}  rflags {regs.rflags:08x} [{flags_text(regs.rflags)}]")
        for seg in SEGMENTS:
            sg = getattr(sregs, seg)
            attrs = f"type {sg.type:#x} dpl {sg.dpl} {'P' if sg.present else 'not present'}"
            if seg in ("cs",):
                attrs += f" L={sg.l} D={sg.db}"
            lines.append(f"  {seg:<3} {sg.selector:04x}  base {sg.base:016x}  limit {sg.limit:08x}  {attrs}")
        lines.append("  " + "  ".join(f"{n} {getattr(sregs, n):x}" for n in ("cr0", "cr2", "cr3", "cr4", "cr8")))
        lines.append(f"  efer {sregs.efer:x}  apic_base {sregs.apic_base:x}  gdt {sregs.gdt.base:x}/{sregs.gdt.limit:x}"
                     f"  idt {sregs.idt.base:x}/{sregs.idt.limit:x}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
