"""Basic-block coverage of a code range with one-shot breakpoints.

The range is disassembled (capstone, through the guest's page tables); a block starts at the range's start, at
every branch or call target inside the range and after every branch, call or return. Each block gets a breakpoint;
its first hit records the block and removes the breakpoint, so a block costs its breakpoint's exits once per fuzz
fork, and once a `Fuzzer` rebuilds its fuzz fork from the sink, never again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from capstone import CS_GRP_CALL, CS_GRP_JUMP, CS_GRP_RET, CS_OP_IMM

from ..vmi import read_virt
from ..vmi.disasm import decoder

__all__ = ["Coverage", "basic_blocks"]

_BRANCH_GROUPS = (CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET)


def basic_blocks(target: object, start: int, end: int, *, bits: int = 64, vcpu: int = 0) -> list[int]:
    """Start addresses of the basic blocks in [start, end) of `target`'s code (virtual addresses). Blocks whose
    first instruction jumps to itself (a spin loop) are left out: a breakpoint there could not be stepped over."""
    if end <= start:
        raise ValueError(f"empty code range {start:#x}-{end:#x}")
    code = read_virt(target, start, end - start, vcpu=vcpu)
    md = decoder(bits, detail=True)
    leaders = {start}
    spins: set[int] = set()
    for insn in md.disasm(code, start):
        if not any(insn.group(g) for g in _BRANCH_GROUPS):
            continue
        nxt = insn.address + insn.size
        if nxt < end:
            leaders.add(nxt)
        for op in insn.operands:
            if op.type == CS_OP_IMM and start <= op.imm < end:
                leaders.add(op.imm)
                if op.imm == insn.address:
                    spins.add(insn.address)
    return sorted(leaders - spins)


@dataclass
class Coverage:
    """The blocks of one or more code ranges and which of them inputs have reached so far."""

    blocks: list[int]
    hit: set[int] = field(default_factory=set)
    ranges: tuple[tuple[int, int], ...] = ()        # the code ranges the blocks came from (faults there are crashes)

    @classmethod
    def of_ranges(cls, target: object, ranges: Iterable[tuple[int, int]], *, bits: int = 64) -> Coverage:
        found: set[int] = set()
        spans = tuple(ranges)
        for start, end in spans:
            found.update(basic_blocks(target, start, end, bits=bits))
        return cls(sorted(found), ranges=spans)

    @property
    def remaining(self) -> list[int]:
        return [b for b in self.blocks if b not in self.hit]

    def describe(self) -> str:
        return f"{len(self.hit)}/{len(self.blocks)} blocks"
