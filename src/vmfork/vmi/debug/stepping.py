"""Stepping: one instruction of one vCPU, by KVM single-step where the host can in the vCPU's mode, and otherwise
by temporary breakpoints on every instruction that can run next (capstone: the fall-through and the branch target;
`ret` through the stack; indirect jumps and calls through the registers and memory), removed as soon as one is
reached. Continuing over a breakpoint is the same without the stop. On every stop every byte is the guest's again.
"""

from __future__ import annotations

import functools
from typing import Any

from ...errors import MemoryAccessError
from ...kvm import structs as s
from ...workarounds.bp_stub import INT3
from ..disasm import MAX_INSN, decoder, successors
from ..errors import BreakpointError, SteppingError, TranslationError
from ..memory import AddressSpace
from ..regs import cpu_mode
from .base import DebuggerBase, probe_status
from .values import _Step, _Temp

__all__ = ["StepMixin"]

# instructions after which the vCPU may run in user mode, where this kind of host cannot single-step
_MODE_CHANGES = ("iret", "sysret", "sysexit")
# instructions whose guest handler returns right after them: stepping over one ends there
_TRAPS_AND_RETURNS = ("int3", "int", "into", "int1")


@functools.cache
def _decoder(bits: int) -> Any:
    return decoder(bits)


def _leaves_kernel(code: bytes, bits: int) -> bool:
    for insn in _decoder(bits).disasm(code, 0, 1):
        return insn.mnemonic.startswith(_MODE_CHANGES)
    return False


class StepMixin(DebuggerBase):
    """Stepping and continuing over breakpoints."""

    def _context_for_step(self, vcpu: int) -> tuple[s.Regs, s.Sregs, AddressSpace]:
        regs, sregs = self.get_regs(vcpu), self.get_sregs(vcpu)
        space = AddressSpace(self.target, vcpu, sregs=self.target.get_sregs(vcpu))
        return regs, sregs, space

    def _begin_step(self, vcpu: int, kind: str, origin: int | None = None,
                    ctx: tuple[s.Regs, s.Sregs, AddressSpace] | None = None) -> None:
        """Start running the vCPU's current instruction and nothing more (a "step", which stops after it, or an
        "over", which runs on past a breakpoint of ours there): KVM single-step where the host can in the vCPU's
        mode (kernel.py), else temporary breakpoints on whatever can run next, through the #BP stub in user mode
        (armed for the step, breakpoints or not) or the emulation-failure exit in kernel mode."""
        regs, sregs, space = self._context_for_step(vcpu) if ctx is None else ctx
        rip = regs.rip if origin is None else origin
        mode = cpu_mode(sregs)
        if mode.bits == 16 and self.mechanism == "stub":
            raise SteppingError(f"vCPU {vcpu} runs in {mode.name}: vmfork cannot step or break there on this host "
                                f"({self._probe_reason('sw_breakpoints')})")
        code = self._read_code(space, rip)
        kernel_stub = mode.cpl == 0 and self.mechanism == "stub"
        if kernel_stub and self._kernel_single_step() and not _leaves_kernel(code, mode.bits):
            self._begin_single_step(vcpu, kind, rip, space)
            return
        if mode.cpl == 0 and self.mechanism == "stub" and not self._cpl0_int3_is_exit() and \
                probe_status("int3_cpl0") != "works":
            raise SteppingError(f"vCPU {vcpu} is in guest kernel mode at {rip:#x}: this host can neither single-step "
                                f"there ({self._probe_reason('single_step')}) nor stop at an int3 there "
                                f"({self._probe_reason('int3_cpl0')})")
        names = {n: int(getattr(regs, n)) for n in s.GPR_NAMES}

        def read_mem(addr: int, size: int) -> bytes:
            return self._shadow(space.read(addr, size), space, addr)

        try:
            _insn, targets = successors(code, rip, mode.bits, names, read_mem, fs_base=sregs.fs.base,
                                        gs_base=sregs.gs.base)
        except SteppingError:
            first = next(iter(_decoder(mode.bits).disasm(code, rip, 1)), None)
            if first is None or first.mnemonic not in _TRAPS_AND_RETURNS or self.mechanism != "stub":
                raise
            # the guest's own handler runs (its int3s still reach it) and returns after the instruction
            targets = [(rip + first.size) & ((1 << mode.bits) - 1)]
        origin_gpa = space.resolve(rip)[0]
        if rip in targets:
            raise SteppingError(f"the instruction at {rip:#x} jumps to itself: stepping over it would never end")
        users: dict[int, bool] = {}
        if self.mechanism == "stub" and self._stub is None:     # (an armed stub is kept up to date at resume)
            for target_va in targets:
                try:
                    users[target_va] = space.translate(target_va).user
                except TranslationError:
                    pass
            if mode.cpl == 3 or any(users.values()) or not self._cpl0_int3_is_exit():
                try:
                    self._arm(user=True)    # the stub sees temporaries in user mode, breakpoints or not
                except BreakpointError as e:
                    raise SteppingError(f"cannot step vCPU {vcpu} at {rip:#x}: {e}") from None
            else:
                self._arm(user=False)
        lifted = origin_gpa if origin_gpa in self.breakpoints else None
        temps: list[int] = []
        planted: list[int] = []
        try:
            for target_va in targets:
                try:
                    gpa = space.resolve(target_va)[0]
                except TranslationError:
                    continue        # a fault will run the guest's handler first; the step ends when it returns
                if gpa in self.breakpoints and gpa != origin_gpa:
                    continue        # our int3 is there already
                temp = self._temps.get(gpa)
                if temp is None:
                    original = self.target.read_phys(gpa, 1)[0]
                    self._temps[gpa] = _Temp(target_va, original, {vcpu}, users.get(target_va, True))
                    self._known.setdefault(gpa, original)
                    planted.append(gpa)
                    if gpa != origin_gpa:
                        self._poke(gpa, INT3)
                else:
                    temp.owners.add(vcpu)
                temps.append(gpa)
        except BaseException:
            for gpa in planted:
                self._poke(gpa, self._temps.pop(gpa).original)
            raise
        if lifted is not None:
            self._lifted.setdefault(lifted, set()).add(vcpu)
            self._poke(lifted, self.breakpoints[lifted].original)
        self._steps[vcpu] = _Step(kind, rip, lifted, temps, set(targets))
        self._skip.pop(vcpu, None)
        if not self._in_exit():     # in an exit the table is brought up to date when the machine stops
            self._write_table()

    def _finish_step(self, vcpu: int) -> None:
        step = self._steps.pop(vcpu, None)
        if step is None:
            return
        if step.single:
            self._end_single_step(vcpu)
        for gpa in step.temps:
            temp = self._temps.get(gpa)
            if temp is None:
                continue
            temp.owners.discard(vcpu)
            if not temp.owners:
                del self._temps[gpa]
                if gpa not in self.breakpoints or gpa in self._lifted:
                    self._poke(gpa, temp.original)
        if step.lifted is not None:
            owners = self._lifted.get(step.lifted, set())
            owners.discard(vcpu)
            if not owners:
                self._lifted.pop(step.lifted, None)
                if step.lifted in self.breakpoints:
                    self._poke(step.lifted, INT3)
        if not self._in_exit():
            self._write_table()

    def _shadow(self, data: bytes, space: AddressSpace, vaddr: int) -> bytes:
        inserted = self._inserted()
        if not inserted:
            return data
        buf = bytearray(data)
        for i in range(len(buf)):
            if buf[i] == INT3:
                try:
                    gpa = space.resolve(vaddr + i)[0]
                except TranslationError:
                    continue
                if gpa in inserted:
                    buf[i] = inserted[gpa][1]
                elif gpa in self.breakpoints:
                    buf[i] = self.breakpoints[gpa].original
        return bytes(buf)

    def _read_code(self, space: AddressSpace, rip: int) -> bytes:
        out = b""
        for n in (MAX_INSN, 4096 - (rip & 0xFFF)):
            try:
                out = space.read(rip, min(n, MAX_INSN))
                break
            except MemoryAccessError:
                continue
        if not out:
            raise SteppingError(f"the code at {rip:#x} is not mapped")
        return self._shadow(out, space, rip)
