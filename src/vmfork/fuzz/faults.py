"""Faults as crashes without the guest's help: hardware execution breakpoints on the guest's own fault handlers.

A target that follows none of vmfork's conventions handles its faults itself (Linux oopses, a small kernel prints
and halts); the fuzzer must still see each one, and tell two bugs with the same vector apart. So the fuzz fork gets
hardware execution breakpoints (vmfork.guest_debug, owner "fuzz-faults") on the entries of the guest's handlers for
the fault vectors, read from its IDT at the fork point. At a hit the exception frame is still untouched on the
handler's stack (RSP points at it: the error code where the vector has one, then RIP, CS, RFLAGS, RSP, SS), and the
general registers are still the faulting code's. So the crash is recorded with the FAULTING instruction's RIP, RSP,
RFLAGS and CS, its error code and (for #PF) CR2: its signature is (vector, faulting RIP), and the saved registers
are those of the faulting code, not of the handler.

Which faults are crashes: those whose RIP lies in one of `ranges` (the code under test: the fuzzer's coverage
ranges), or every one when there are no ranges. A fault elsewhere (a Linux #PF in user space, the guest's own
probing) goes on to the guest's handler: the breakpoint is stepped past (`vcpu.debug.step_past`, one more exit). A
double fault (#DF: a fault while delivering a fault, e.g. in a crash handler) is always a crash.

Needs no guest memory and no guest cooperation; costs one exit per fault (and, where kernel mode is emulated, a
little on every emulated instruction, which the host checks against the breakpoints). vCPU 0 only: the fuzz forks
answer their traps on one vCPU (traps.py). Hardware breakpoints are shared (four
slots per vCPU): the vectors are hooked in the order of FAULT_VECTORS while slots are free, and vectors whose gates
point at the same handler share one slot. Exceptions raised in guest user mode are delivered to handlers that run
in kernel mode, where hardware breakpoints work on every host (on kvm_pvm only there: see docs).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import VmforkError
from ..guest_debug import DebugSlotsExhausted, HwBreakpoint
from ..kvm import structs as s
from ..vmi import as_target
from ..vmi.disasm import decode
from ..vmi.memory import AddressSpace

__all__ = ["FAULT_VECTORS", "OWNER", "VECTOR_NAMES", "Fault", "FaultHandlers", "FaultTrap"]

OWNER = "fuzz-faults"
FAULT_VECTORS = (14, 13, 6, 8, 0)           # #PF, #GP, #UD, #DF, #DE: the order they get the free slots in
VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF", 10: "#TS",
                11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM"}
_WITH_ERROR_CODE = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))
_DOUBLE_FAULT = 8


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault as the exception frame tells it: the faulting instruction's RIP, CS, RFLAGS, RSP, SS, the error
    code (None for vectors without one) and CR2 (#PF only)."""

    vector: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int
    error_code: int | None
    cr2: int | None

    @property
    def name(self) -> str:
        return VECTOR_NAMES.get(self.vector, f"vector {self.vector}")

    def describe(self) -> str:
        err = f" error code {self.error_code:#x}" if self.error_code is not None else ""
        cr2 = f" CR2 {self.cr2:#x}" if self.cr2 is not None else ""
        return f"{self.name} at rip {self.rip:#x} (CPL{self.cs & 3}){err}{cr2}"

    def registers(self, at_handler: s.Regs) -> dict[str, int]:
        """The faulting code's general registers: the handler's (it has run nothing yet) with RIP, RSP and RFLAGS
        from the frame."""
        out = {name: int(getattr(at_handler, name)) for name in s.GPR_NAMES}
        out.update(rip=self.rip, rsp=self.rsp, rflags=self.rflags)
        return out


@dataclass(frozen=True, slots=True)
class FaultHandlers:
    """The guest's fault handler entries at the fork point (handler address -> vector), the code ranges whose
    faults are crashes (empty: all), and the vectors that could not be hooked with the reason."""

    entries: dict[int, int]
    ranges: tuple[tuple[int, int], ...] = ()
    skipped: tuple[str, ...] = ()

    @classmethod
    def of_idt(cls, vm: object, *, vectors: Sequence[int] = FAULT_VECTORS,
               ranges: Sequence[tuple[int, int]] = (), vcpu: int = 0) -> FaultHandlers:
        """Read the handlers of `vectors` from vCPU `vcpu`'s IDT (a 64-bit one: 16-byte gates). Vectors whose gate
        is absent or unreadable are skipped (and named in `skipped`)."""
        target = as_target(vm)
        sregs = target.get_sregs(vcpu)
        skipped: list[str] = []
        entries: dict[int, int] = {}
        if not sregs.efer & (1 << 10):
            return cls({}, tuple(ranges), ("the guest is not in long mode at the start marker",))
        space = AddressSpace(target, vcpu, sregs=sregs)
        for vector in vectors:
            name = VECTOR_NAMES.get(vector, str(vector))
            if vector * 16 + 15 > sregs.idt.limit:
                skipped.append(f"{name}: beyond the IDT limit")
                continue
            try:
                gate = space.read(sregs.idt.base + vector * 16, 16)
            except VmforkError as e:
                skipped.append(f"{name}: IDT gate unreadable ({e})")
                continue
            lo, _sel, _ist, attr, mid, hi = struct.unpack_from("<HHBBHI", gate)
            if not attr & 0x80:
                skipped.append(f"{name}: gate not present")
                continue
            entries.setdefault(lo | (mid << 16) | (hi << 32), vector)
        return cls(entries, tuple(ranges), tuple(skipped))

    def is_crash(self, fault: Fault) -> bool:
        if fault.vector == _DOUBLE_FAULT or not self.ranges:
            return True
        return any(start <= fault.rip < end for start, end in self.ranges)


class FaultTrap:
    """The fault breakpoints of one fuzz fork (vCPU 0) and their debug exit hook. `on_crash(fault, registers)`
    is told of a crash, and the fork stops with reason "fault" (status = the vector). Must not raise: a failure
    stops the fork with "debugger-error" and is kept in `error`."""

    def __init__(self, fork: object, handlers: FaultHandlers,
                 on_crash: Callable[[Fault, dict[str, int]], object]) -> None:
        self.fork = fork
        self.handlers = handlers
        self.on_crash = on_crash
        self.vcpu = fork.vcpus[0]           # type: ignore[attr-defined]
        self.breakpoints: list[HwBreakpoint] = []
        self.error: BaseException | None = None

    def install(self) -> list[HwBreakpoint]:
        """Claim as many of the handler breakpoints as there are free slots (in FAULT_VECTORS order); returns
        those claimed."""
        wanted = [HwBreakpoint(address) for address in self.handlers.entries]
        while wanted:
            try:
                self.vcpu.debug.claim(OWNER, breakpoints=wanted)
                break
            except DebugSlotsExhausted:
                wanted.pop()
        self.breakpoints = wanted
        if wanted:
            self.fork.exit_hooks.add("debug", OWNER, self, first=True)      # type: ignore[attr-defined]
        return wanted

    def uninstall(self) -> None:
        """Give the slots back (pooled vCPUs are reused by later forks)."""
        if self.breakpoints:
            self.fork.exit_hooks.remove(OWNER)                               # type: ignore[attr-defined]
            self.vcpu.debug.release(OWNER)
            self.breakpoints = []

    def __call__(self, vcpu: object) -> bool:
        try:
            return self._hit()
        except Exception as e:
            self.error = e
            self.fork.request_stop("debugger-error", None)                   # type: ignore[attr-defined]
            return True

    def _hit(self) -> bool:
        vcpu = self.vcpu
        mine = [bp for owner, bp in vcpu.debug.hit(vcpu.run.exit.debug.dr6) if owner == OWNER]
        if not mine:
            return False
        bp = mine[0]
        vector = self.handlers.entries.get(bp.address)
        if vector is None:
            return False        # the one-shot breakpoint of a step_past: the built-in hook finishes that
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        space = AddressSpace(self.fork, vcpu.index, sregs=sregs, cache=False)
        try:
            fault = _read_frame(space, regs, sregs, vector)
        except VmforkError:
            # No readable frame (a broken stack): still a crash, at the handler, with what the vCPU holds.
            fault = Fault(vector, int(regs.rip),
                          int(sregs.cs.selector), int(regs.rflags), int(regs.rsp), int(sregs.ss.selector), None,
                          int(sregs.cr2) if vector == 14 else None)
            self.on_crash(fault, fault.registers(regs))
            self.fork.request_stop("fault", vector)                         # type: ignore[attr-defined]
            return True
        if self.handlers.is_crash(fault):
            self.on_crash(fault, fault.registers(regs))
            self.fork.request_stop("fault", vector)                         # type: ignore[attr-defined]
            return True
        vcpu.debug.step_past(OWNER, bp, bp.address + _length(space, bp.address))
        return True


def _length(space: AddressSpace, address: int) -> int:
    """The length of the instruction at `address`, decoded now (the guest may patch its handlers' code) from as many
    of its 15 possible bytes as are mapped."""
    first = min(15, 4096 - (address & 0xFFF))
    code = space.read(address, first)
    if first < 15:
        try:
            code += space.read(address + first, 15 - first)
        except VmforkError:
            pass
    return decode(code, address, count=1)[0].size


def _read_frame(space: AddressSpace, regs: s.Regs, sregs: s.Sregs, vector: int) -> Fault:
    """The exception frame at the handler's entry (RSP): [error code], RIP, CS, RFLAGS, RSP, SS."""
    has_error = vector in _WITH_ERROR_CODE
    words = struct.unpack("<6Q" if has_error else "<5Q", space.read(regs.rsp, 48 if has_error else 40))
    error = words[0] if has_error else None
    rip, cs, rflags, rsp, ss = words[1:] if has_error else words
    return Fault(vector, rip, cs & 0xFFFF, rflags, rsp, ss & 0xFFFF, error, int(sregs.cr2) if vector == 14 else None)
