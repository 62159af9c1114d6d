"""The fuzz fork's own answers to the #BP stub: vmfork's breakpoints of a fuzzing run at a fraction of the
Debugger's cost.

The sink's debugger (vmfork.vmi.breakpoints, stub mechanism) puts the fuzzing breakpoints into the sink's memory:
the int3 bytes of sinks, ends and coverage blocks, the patched #BP gate and the stub. A fuzz fork starts from that
memory after every reset, so on the fork side nothing needs the Debugger's general upkeep (before each run it
re-checks every breakpoint byte, the gate and the stub; it steps over a breakpoint a callback continues from with
temporary breakpoints, a second exit; it reads the frame and descriptors through the page tables at every trap). On
this host that upkeep costs more than the rest of an iteration. `ForkTraps` is the fork's debug-port handler
instead; per trap it reads the vCPU's registers and the interrupt frame, and:

- an int3 marker (harness.int3_end_marker: in a fork either magic ends the input) stops the machine like the
  port's end marker (the int3 is consumed);
- an end breakpoint stops it with "harness-end", as the port's end marker does;
- a sink stops it with "breakpoint" and hands `on_sink` the interrupted code's registers;
- a coverage block calls `on_block(address)` and lifts its int3 (the original byte back, in the fork's memory only)
  so the guest runs on at once: one exit per block. One-shot coverage leaves it lifted (the fuzzer rebuilds the
  fork without it). Persistent coverage (AFL++'s edge map) puts the previously lifted block's int3 back instead, so
  every block hit is seen, with one limit: a block is seen again only after another covered block ran. A loop
  whose body is one covered block (or whose other blocks lie outside the covered ranges) counts once per entry,
  where stepping over each hit (the Debugger's way, two exits per hit) counts every turn.
- any other int3 (the guest's own) goes on to the guest's #BP handler.

The fork's reset restores every byte it lifted. Single-vCPU forks only (a lifted block is lifted for every vCPU);
others, and hosts where KVM intercepts int3 itself ("kvm" mechanism), run under their Debugger.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from ..kvm import structs as s
from ..vmi import Breakpoint, as_target
from ..vmi.breakpoints import ANSWER_ABSENT, ANSWER_PASS, ANSWER_RESUME, INT3, STUB_AFTER_IN
from ..vmi.memory import AddressSpace
from .harness import int3_end_marker

__all__ = ["ForkTraps"]

_HARNESS_END = 2


class ForkTraps:
    """The debug-port handler of one single-vCPU fuzz fork (see the module docstring). `breakpoints`: the sink
    debugger's, by owner "sink", "end" and "coverage". Must not raise (it runs in the vCPU's exit): a failure
    stops the machine with "debugger-error" and is kept in `error`."""

    def __init__(self, fork: Any, stub_va: int, breakpoints: Iterable[Breakpoint], *, int3_markers: bool,
                 on_sink: Callable[[int, s.Regs], object], on_block: Callable[[int], object],
                 persistent: bool) -> None:
        self.target = as_target(fork)
        self.memory = fork.memory
        self.vcpu = fork.vcpus[0]
        self.stub_rips = (stub_va + 1, stub_va + STUB_AFTER_IN)     # at the `in`, before or after KVM moved RIP
        self.int3_markers = int3_markers
        self.on_sink = on_sink
        self.on_block = on_block
        self.persistent = persistent
        self.ends: set[int] = set()
        self.sinks: set[int] = set()
        self.blocks: dict[int, tuple[int, int]] = {}        # address -> (gpa, original byte)
        for bp in breakpoints:
            if bp.original == INT3:
                continue            # over the guest's own int3: that one is the guest's (as the Debugger has it)
            if bp.owner == "end":
                self.ends.add(bp.address)
            elif bp.owner == "coverage":
                self.blocks[bp.address] = (bp.gpa, bp.original)
            else:
                self.sinks.add(bp.address)
        self.lifted: int | None = None                       # gpa of the block run through last (persistent)
        self.error: BaseException | None = None

    def install(self) -> None:
        self.target.set_debug_handler(self)

    def __call__(self, vcpu: int) -> int:
        try:
            return self._answer()
        except Exception as e:
            self.error = e
            self.target.request_stop("debugger-error", None)
            return ANSWER_ABSENT

    def _answer(self) -> int:
        regs = self.vcpu.get_regs()
        if regs.rip not in self.stub_rips:
            return ANSWER_ABSENT
        space = AddressSpace(self.target, 0)
        frame = regs.rsp + 8                            # above the pushed RAX: the #BP frame, RIP first
        address = space.read_u64(frame) - 1
        block = self.blocks.get(address)
        if block is not None:
            self._lift(block)
            self.on_block(address)
        elif address in self.ends:
            self.target.request_stop("harness-end", _HARNESS_END)
        elif address in self.sinks:
            self.on_sink(address, self._interrupted(regs, space, frame, address))
            self.target.request_stop("breakpoint", 0)
        else:
            return self._guest_int3(regs)
        space.write_u64(frame, address)                 # back to the int3's instruction: run it, or stop there
        return ANSWER_RESUME

    def _guest_int3(self, regs: s.Regs) -> int:
        """The guest's own int3 (none of vmfork's is there): a marker, or the guest handler's business. Only
        here: at one of vmfork's breakpoints RAX may well still hold a marker's value."""
        if self.int3_markers:
            # RAX is still the interrupted code's: the stub's `push rax` kept it, and its `in` has not completed
            stop = int3_end_marker(0, regs)
            if stop is not None:
                self.target.request_stop(*stop)
                return ANSWER_RESUME
        return ANSWER_PASS

    def _lift(self, block: tuple[int, int]) -> None:
        gpa, original = block
        write = self.memory.write
        if self.persistent:
            if self.lifted is not None:
                write(self.lifted, bytes((INT3,)))     # the block run through before this one traps again
            self.lifted = gpa
        write(gpa, bytes((original,)))

    @staticmethod
    def _interrupted(regs: s.Regs, space: AddressSpace, frame: int, address: int) -> s.Regs:
        """The interrupted code's general registers: RAX, RFLAGS and RSP from the stub's stack and frame."""
        rax, _rip, _cs, rflags, rsp = struct.unpack("<5Q", space.read(frame - 8, 40))
        out = s.Regs()
        for name in s.GPR_NAMES:
            setattr(out, name, getattr(regs, name))
        out.rax, out.rip, out.rflags, out.rsp = rax, address, rflags, rsp
        return out
