"""Decoding one guest instruction with its operands (capstone, detail on) for the fallbacks that must compute
with them: register reads and writes by name (with x86's partial-register rules) and memory operands' linear
addresses (base + index * scale + displacement, RIP-relative, FS/GS bases)."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .guest_access import GuestAccessError, read_virt

if TYPE_CHECKING:
    from ..kvm import structs as s
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["Decoded", "decode_at", "decode_one_of", "finish", "mem_address", "read_reg", "write_reg"]

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
          "r15")
_ALIASES: dict[str, tuple[str, int]] = {}     # register name -> (64-bit register, size in bytes)
for _r in _GPR64:
    _ALIASES[_r] = (_r, 8)
    if _r.startswith("r") and _r[1:].isdigit():
        _ALIASES[_r + "d"], _ALIASES[_r + "w"], _ALIASES[_r + "b"] = (_r, 4), (_r, 2), (_r, 1)
    else:
        base = _r[1:]                       # ax, bx, si, bp ...
        _ALIASES["e" + base] = (_r, 4)
        _ALIASES[base] = (_r, 2)
        _ALIASES[(base[0] + "l") if base in ("ax", "bx", "cx", "dx") else base + "l"] = (_r, 1)
_ALIASES["rip"] = ("rip", 8)

_CS: Any = None


@dataclass(slots=True)
class Decoded:
    mnemonic: str
    size: int
    operands: list[Any]            # capstone X86Op objects
    insn: Any                      # the capstone instruction


def decode_at(vcpu: Vcpu, memory: GuestMemory, rip: int) -> Decoded | None:
    global _CS
    if _CS is None:
        import capstone
        _CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        _CS.detail = True
    try:
        code = read_virt(vcpu, memory, rip, 15)
    except GuestAccessError:
        code = read_virt(vcpu, memory, rip, 16 - (rip & 0xF) or 1)   # the instruction may end a mapped page
    for insn in _CS.disasm(code, rip, 1):
        # capstone names prefixes in the mnemonic ("lock cmpxchg16b"): the instruction is the last word
        return Decoded(str(insn.mnemonic).split()[-1], int(insn.size), list(insn.operands), insn)
    return None


def decode_one_of(vcpu: Vcpu, memory: GuestMemory, rip: int, mnemonics: Container[str]) -> Decoded | None:
    """The instruction at `rip` if it is one of `mnemonics` (what a fallback completes), else None: the common
    start of every fallback that computes with operands."""
    try:
        d = decode_at(vcpu, memory, rip)
    except GuestAccessError:
        return None
    return d if d is not None and d.mnemonic in mnemonics else None


def finish(vcpu: Vcpu, regs: s.Regs, d: Decoded) -> bool:
    """The instruction `d` completed: RIP past it, the registers written back; True for the exit hook."""
    regs.rip += d.size
    vcpu.set_regs(regs)
    return True


def reg_name(reg_id: int) -> str:
    return str(_CS.reg_name(reg_id))


def read_reg(regs: s.Regs, name: str) -> int:
    full, size = _ALIASES[name]
    return int(getattr(regs, full)) & ((1 << (8 * size)) - 1)


def write_reg(regs: s.Regs, name: str, value: int) -> None:
    full, size = _ALIASES[name]
    if size == 8 or size == 4:              # a 32-bit write zero-extends
        setattr(regs, full, value & ((1 << (8 * size)) - 1))
    else:
        mask = (1 << (8 * size)) - 1
        setattr(regs, full, (int(getattr(regs, full)) & ~mask) | (value & mask))


def mem_address(op: Any, regs: s.Regs, sregs: s.Sregs, next_rip: int) -> int:
    """The linear address of a capstone memory operand."""
    m = op.mem
    addr = m.disp
    if m.base:
        base = reg_name(m.base)
        addr += next_rip if base == "rip" else read_reg(regs, base)
    if m.index:
        addr += read_reg(regs, reg_name(m.index)) * m.scale
    if m.segment:
        seg = reg_name(m.segment)
        if seg in ("fs", "gs"):
            addr += getattr(sregs, seg).base
    return addr & 0xFFFF_FFFF_FFFF_FFFF
