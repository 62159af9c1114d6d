"""The introspection commands as plain functions returning printable text, for the CLI
(`vmfork mem read|write`, `regs`, `translate`, `diff`, `disasm`) and the toolstack's control socket.

Each takes a machine or a `Target` and raises a `VmforkError` (with a message naming the problem) on bad input:
an address outside RAM, an unmapped or non-canonical virtual address, a vCPU that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import VmforkError
from .diff import diff
from .disasm import disassemble, format_disassembly
from .errors import VmiError
from .memory import AddressSpace, hexdump, translate
from .regs import format_regs
from .symbols import SymbolTable
from .target import Target, as_target

__all__ = ["PartialRead", "diff_report", "disasm_text", "mem_read", "mem_read_partial", "mem_write", "parse_bytes",
           "regs_text", "translate_text"]

MAX_READ = 1 << 24


def _check_vcpu(t: Target, vcpu: int | None) -> None:
    if vcpu is not None and not 0 <= vcpu < t.vcpu_count:
        from .errors import VcpuIndexError
        raise VcpuIndexError(f"{t.name} has no vCPU {vcpu} (it has {t.vcpu_count}: 0..{t.vcpu_count - 1})")


def mem_read(target: Target | object, address: int, length: int, *, virt: bool = False, vcpu: int = 0,
             raw: bool = False) -> str | bytes:
    """Hexdump lines of guest memory (physical, or virtual through vCPU `vcpu`'s page tables); `raw`: the bytes."""
    t = as_target(target)
    if not 0 < length <= MAX_READ:
        raise VmiError(f"length must be 1..{MAX_READ} bytes, got {length}")
    _check_vcpu(t, vcpu)
    data = AddressSpace(t, vcpu).read(address, length) if virt else t.read_phys(address, length)
    if raw:
        return data
    return "\n".join(hexdump(data, address))


@dataclass(frozen=True, slots=True)
class PartialRead:
    """What a read across the end of what is readable got: the bytes up to `stopped_at` (None: all of them), and
    why it stopped there."""

    data: bytes
    stopped_at: int | None = None
    error: str = ""


def mem_read_partial(target: Target | object, address: int, length: int, *, virt: bool = False,
                     vcpu: int = 0) -> PartialRead:
    """Read like `mem_read(raw=True)`, but a range that runs into unreadable memory (past the end of RAM, an
    unmapped page) gives the readable part before it and the first unreadable address, not an error for all."""
    t = as_target(target)
    if not 0 < length <= MAX_READ:
        raise VmiError(f"length must be 1..{MAX_READ} bytes, got {length}")
    _check_vcpu(t, vcpu)
    space = AddressSpace(t, vcpu) if virt else None

    def read(addr: int, n: int) -> bytes:
        return space.read(addr, n) if space is not None else t.read_phys(addr, n)
    try:
        return PartialRead(read(address, length))
    except VmforkError:
        pass
    # Page by page up to the first page that fails (pages are the unit of both RAM slots and mappings).
    got = bytearray()
    pos, end = address, address + length
    while pos < end:
        n = min(end - pos, 4096 - (pos & 0xFFF))
        try:
            got += read(pos, n)
        except VmforkError as e:
            return PartialRead(bytes(got), pos, str(e).splitlines()[0] if str(e) else type(e).__name__)
        pos += n
    return PartialRead(bytes(got))


def parse_bytes(text: str) -> bytes:
    """Bytes from hex text ("de ad be ef", "deadbeef", "0xdeadbeef" is read as bytes de ad be ef in that order)."""
    cleaned = text.strip().removeprefix("0x").replace(" ", "").replace(":", "")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise VmiError(f"not hex bytes: {text!r}") from None


def mem_write(target: Target | object, address: int, data: bytes, *, virt: bool = False, vcpu: int = 0) -> str:
    t = as_target(target)
    _check_vcpu(t, vcpu)
    if not data:
        raise VmiError("nothing to write")
    if virt:
        AddressSpace(t, vcpu).write(address, data)
    else:
        t.write_phys(address, data)
    return f"wrote {len(data)} bytes at {'virtual' if virt else 'physical'} {address:#x}"


def regs_text(target: Target | object, vcpu: int | None = None) -> str:
    t = as_target(target)
    _check_vcpu(t, vcpu)
    return format_regs(t, vcpu)


def translate_text(target: Target | object, vaddr: int, *, vcpu: int = 0) -> str:
    """The walk of `vaddr` through vCPU `vcpu`'s page tables, level by level; an unmapped address shows the walk up
    to the level where it stopped."""
    t = as_target(target)
    _check_vcpu(t, vcpu)
    from .errors import TranslationError
    try:
        return translate(t, vaddr, vcpu=vcpu).describe()
    except TranslationError as e:
        lines = [str(e)] + ["  " + lv.describe() for lv in e.walk]  # type: ignore[attr-defined]
        raise type(e)("\n".join(lines), e.vaddr, e.level, e.walk) from None


def disasm_text(target: Target | object, address: int | None = None, count: int = 10, *, vcpu: int = 0,
                symbols: SymbolTable | None = None) -> str:
    t = as_target(target)
    _check_vcpu(t, vcpu)
    rip = t.get_regs(vcpu).rip
    return format_disassembly(disassemble(t, address, count, vcpu=vcpu), symbols, rip)


def diff_report(fork: Any, ancestor: Any | None = None, *, max_pages: int | None = 64,
                max_lines: int | None = 16) -> str:
    return diff(fork, ancestor).text(max_pages=max_pages, max_lines=max_lines)
