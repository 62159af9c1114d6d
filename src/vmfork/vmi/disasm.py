"""Disassembly of guest code (capstone), and the instructions that may run next after one (for stepping with
temporary breakpoints where the host cannot single-step).

The instruction size follows the vCPU: 64-bit in long mode, 32-bit in protected or compatibility mode with a 32-bit
code segment, 16-bit otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import capstone
from capstone import x86

from ..errors import MemoryAccessError
from .errors import SteppingError
from .memory import AddressSpace
from .regs import cpu_mode
from .symbols import SymbolTable
from .target import Target, as_target

__all__ = ["Instruction", "decode", "disassemble", "format_disassembly", "successors"]

MAX_INSN = 15


@dataclass(frozen=True, slots=True)
class Instruction:
    address: int
    size: int
    raw: bytes
    mnemonic: str
    op_str: str

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def next_address(self) -> int:
        return self.address + self.size


@functools.cache
def decoder(bits: int, detail: bool = False) -> capstone.Cs:
    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}.get(bits)
    if mode is None:
        raise ValueError(f"no x86 mode with {bits}-bit code")
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = detail
    return md


def decode(code: bytes, address: int, bits: int = 64, count: int = 0) -> list[Instruction]:
    """Instructions in `code` (placed at `address`), stopping at the first undecodable byte."""
    return [Instruction(i.address, i.size, bytes(i.bytes), i.mnemonic, i.op_str)
            for i in decoder(bits).disasm(code, address, count)]


def _read_code(space: AddressSpace, address: int, length: int) -> bytes:
    """As many bytes as are mapped from `address` (up to `length`); the first byte must be mapped."""
    out = b""
    pos = address
    end = address + length
    while pos < end:
        n = min(end - pos, 4096 - (pos & 0xFFF))
        try:
            out += space.read(pos, n)
        except MemoryAccessError:
            if not out:
                raise
            break
        pos += n
    return out


def disassemble(target: Target | object, address: int | None = None, count: int = 8, *, vcpu: int = 0,
                bits: int | None = None) -> list[Instruction]:
    """`count` instructions from `address` (default: the vCPU's RIP), read through the vCPU's page tables."""
    t = as_target(target)
    sregs = t.get_sregs(vcpu)
    if address is None:
        regs = t.get_regs(vcpu)
        mode = cpu_mode(sregs)
        address = regs.rip if mode.bits == 64 else sregs.cs.base + regs.rip
    if bits is None:
        bits = cpu_mode(sregs).bits
    space = AddressSpace(t, vcpu, sregs=sregs)
    code = _read_code(space, address, count * MAX_INSN)
    return decode(code, address, bits, count)


def format_disassembly(instructions: list[Instruction], symbols: SymbolTable | None = None,
                       current: int | None = None) -> str:
    lines = []
    for insn in instructions:
        mark = "=>" if insn.address == current else "  "
        where = ""
        if symbols is not None:
            found = symbols.lookup(insn.address)
            if found is not None:
                sym, off = found
                where = f" <{sym.name}+{off}>" if off else f" <{sym.name}>"
        lines.append(f"{mark} {insn.address:#x}{where}:".ljust(34) + f" {insn.raw.hex(' '):<24} {insn.text}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def _decode_one(code: bytes, address: int, bits: int) -> Any:
    return next(decoder(bits, True).disasm(code, address, 1), None)


# --- successors ---------------------------------------------------------------------------------------------------

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
_ALIASES: dict[str, tuple[str, int]] = {}
for _r in _GPR64:
    _ALIASES[_r] = (_r, 64)
    _ALIASES["e" + _r[1:]] = (_r, 32)
    _ALIASES[_r[1:]] = (_r, 16)
for _k in range(8, 16):
    _ALIASES[f"r{_k}"] = (f"r{_k}", 64)
    _ALIASES[f"r{_k}d"] = (f"r{_k}", 32)
    _ALIASES[f"r{_k}w"] = (f"r{_k}", 16)
_ALIASES["rip"] = ("rip", 64)
_ALIASES["eip"] = ("rip", 32)

_NO_STEP = {getattr(x86, n) for n in ("X86_INS_SYSCALL", "X86_INS_SYSENTER", "X86_INS_SYSEXIT", "X86_INS_SYSRET",
                                      "X86_INS_HLT", "X86_INS_UD2", "X86_INS_UD1", "X86_INS_UD0", "X86_INS_RETF",
                                      "X86_INS_RETFQ", "X86_INS_LJMP", "X86_INS_LCALL", "X86_INS_INTO",
                                      "X86_INS_INT1", "X86_INS_INT", "X86_INS_INT3", "X86_INS_IRET",
                                      "X86_INS_IRETD", "X86_INS_IRETQ", "X86_INS_VMCALL", "X86_INS_VMMCALL")
            if hasattr(x86, n)}


def successors(code: bytes, address: int, bits: int, regs: Mapping[str, int],
               read_mem: Callable[[int, int], bytes], *, fs_base: int = 0, gs_base: int = 0) -> tuple[Instruction,
                                                                                                      list[int]]:
    """The instruction at `address` and the addresses that can run right after it: the fall-through and, for
    branches, the target (computed from `regs`, a name -> 64-bit value mapping of the general registers, and
    memory read with `read_mem(vaddr, size)`). Interrupt, system-call, far and privileged control transfers raise
    SteppingError."""
    found = _decode_one(code[:MAX_INSN], address, bits)
    if found is None:
        raise SteppingError(f"cannot decode the instruction at {address:#x} ({code[:MAX_INSN].hex(' ')})")
    insn = Instruction(found.address, found.size, bytes(found.bytes), found.mnemonic, found.op_str)
    mask = (1 << bits) - 1
    nxt = (address + found.size) & mask
    if found.id in _NO_STEP or found.group(x86.X86_GRP_INT) or found.group(x86.X86_GRP_IRET):
        raise SteppingError(f"cannot step over `{insn.text}` at {address:#x} with temporary breakpoints (the next "
                            "instruction is in another privilege level or handler)")

    def reg(name: str) -> int:
        base, width = _ALIASES.get(name, (name, 64))
        if base == "rip":
            return nxt
        if base not in regs:
            raise SteppingError(f"`{insn.text}` at {address:#x} uses register {name}, which stepping cannot follow")
        return regs[base] & ((1 << width) - 1)

    def operand_target(op: x86.X86Op) -> int:
        if op.type == x86.X86_OP_IMM:
            return op.imm & mask
        if op.type == x86.X86_OP_REG:
            return reg(found.reg_name(op.reg)) & mask
        if op.type == x86.X86_OP_MEM:
            mem = op.mem
            ea = mem.disp
            if mem.base:
                ea += reg(found.reg_name(mem.base))
            if mem.index:
                ea += reg(found.reg_name(mem.index)) * mem.scale
            if mem.segment:
                seg = found.reg_name(mem.segment)
                ea += fs_base if seg == "fs" else gs_base if seg == "gs" else 0
            size = op.size or bits // 8
            if size not in (2, 4, 8):
                raise SteppingError(f"cannot step over the far transfer `{insn.text}` at {address:#x}")
            return int.from_bytes(read_mem(ea & mask, size), "little") & mask
        raise SteppingError(f"cannot follow operand {op.type} of `{insn.text}` at {address:#x}")

    if found.group(x86.X86_GRP_RET):
        return insn, [int.from_bytes(read_mem(regs["rsp"] & mask, bits // 8), "little") & mask]
    ops = found.operands
    if found.group(x86.X86_GRP_CALL):
        return insn, [operand_target(ops[0])]
    if found.group(x86.X86_GRP_JUMP) or found.group(x86.X86_GRP_BRANCH_RELATIVE):
        target = operand_target(ops[0])
        if found.id == x86.X86_INS_JMP:
            return insn, [target]
        return insn, list(dict.fromkeys([nxt, target]))
    return insn, [nxt]
