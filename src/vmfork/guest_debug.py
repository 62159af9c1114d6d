"""KVM_SET_GUEST_DEBUG shared by several users of one vCPU.

A vCPU has one guest-debug control word and four hardware breakpoint slots (DR0-DR3), but several parts of vmfork
want them at once: the debugger (single-step, hardware breakpoints), host workarounds (a hardware breakpoint on the
guest's #PF handler to complete `syscall` on hosts that cannot), and the fuzzer (breakpoints on fault handlers). Each
owner states what it wants under its own name; this merges the claims into the one ioctl and tells, at a
KVM_EXIT_DEBUG, which owners' breakpoints were hit (DR6 bits B0-B3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import VmforkError
from .kvm import VcpuFd
from .kvm import constants as c
from .kvm import structs as s

__all__ = ["DebugClaims", "DebugSlotsExhausted", "HwBreakpoint"]

SLOTS = 4
_RW_BITS = {"x": 0b00, "w": 0b01, "io": 0b10, "rw": 0b11}
_LEN_BITS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}


class DebugSlotsExhausted(VmforkError):
    """More than four hardware breakpoints were claimed on one vCPU."""


@dataclass(frozen=True, slots=True)
class HwBreakpoint:
    """One hardware breakpoint: a linear address, the access that triggers it ("x", "w", "rw") and its length."""

    address: int
    access: str = "x"
    length: int = 1

    def dr7_bits(self, slot: int) -> int:
        rw = _RW_BITS[self.access]
        ln = 0 if self.access == "x" else _LEN_BITS[self.length]
        return (1 << (2 * slot)) | (((ln << 2) | rw) << (16 + 4 * slot))


class DebugClaims:
    """The merged guest-debug wishes of one vCPU's owners. `apply()` happens on every change."""

    def __init__(self, fd: VcpuFd, supported: int = 0) -> None:
        self._fd = fd
        # Single-steps block interrupts where KVM can (KVM_GUESTDBG_BLOCKIRQ, KVM_CAP_SET_GUEST_DEBUG2): otherwise an
        # interrupt injected during a step pushes RFLAGS with KVM's TF, and once the step is released the handler's
        # iret brings TF back and the guest takes a #DB of its own (Linux: asm_exc_debug) after the stepped
        # instruction. On this host a step right after an emulation-failure stop met the timer interrupt that way.
        self._blockirq = c.KVM_GUESTDBG_BLOCKIRQ if supported & c.KVM_GUESTDBG_BLOCKIRQ else 0
        self._control: dict[str, int] = {}
        self._bps: dict[str, tuple[HwBreakpoint, ...]] = {}
        self._slots: list[tuple[str, HwBreakpoint] | None] = [None] * SLOTS
        # step_past in progress: (owner, the lifted breakpoint, the one-shot breakpoint after it)
        self._stepping: tuple[str, HwBreakpoint, HwBreakpoint] | None = None

    def claim(self, owner: str, *, control: int = 0, breakpoints: Sequence[HwBreakpoint] = ()) -> None:
        """Replace `owner`'s wishes: extra control bits (e.g. KVM_GUESTDBG_SINGLESTEP) and hardware breakpoints.
        Refused (nothing changed) when the breakpoints of all owners would need more than four slots."""
        bps = tuple(breakpoints)
        others = sum(len(v) for k, v in self._bps.items() if k != owner)
        if others + len(bps) > SLOTS:
            raise DebugSlotsExhausted(
                f"{owner} needs {len(bps)} hardware breakpoint(s) but only {SLOTS - others} of {SLOTS} are free "
                f"(held by {', '.join(k for k, v in self._bps.items() if v and k != owner)})")
        if control or bps:
            self._control[owner] = control
            self._bps[owner] = bps
        else:
            self._control.pop(owner, None)
            self._bps.pop(owner, None)
        if self._stepping is not None and self._stepping[0] == owner:
            self._stepping = None
        self.apply()

    def release(self, owner: str) -> None:
        self.claim(owner)

    def owners(self) -> list[str]:
        return sorted(self._control)

    def hit(self, dr6: int) -> list[tuple[str, HwBreakpoint]]:
        """The (owner, breakpoint) pairs whose slot DR6 reports as triggered."""
        return [slot for i, slot in enumerate(self._slots) if slot is not None and dr6 & (1 << i)]

    def step_past(self, owner: str, bp: HwBreakpoint, next_address: int) -> None:
        """Let the vCPU, stopped at `owner`'s execution breakpoint `bp`, run on past it.

        Neither RFLAGS.RF nor single-step gets past a hardware breakpoint on every host (kvm_pvm repeats the exit),
        so the breakpoint is lifted and a one-shot breakpoint put on `next_address` (the next instruction, decoded by
        the caller); at that exit `finish_step_past` (a built-in debug exit hook of every machine) arms `bp` again.
        One extra exit per pass."""
        bps = self._bps.get(owner, ())
        if bp not in bps:
            raise VmforkError(f"{owner} holds no hardware breakpoint at {bp.address:#x}")
        one_shot = HwBreakpoint(next_address)
        self._bps[owner] = tuple(one_shot if b == bp else b for b in bps)
        self._stepping = (owner, bp, one_shot)
        self.apply()

    def finish_step_past(self, dr6: int) -> bool:
        """At a debug exit: True (and `bp` armed again) when it is the one-shot breakpoint of `step_past`."""
        if self._stepping is None:
            return False
        owner, bp, one_shot = self._stepping
        if not any(o == owner and b == one_shot for o, b in self.hit(dr6)):
            return False
        self._stepping = None
        bps = self._bps.get(owner)
        if bps is not None:
            self._bps[owner] = tuple(bp if b == one_shot else b for b in bps)
        self.apply()
        return True

    def single_stepping(self) -> list[str]:
        return [k for k, v in self._control.items() if v & c.KVM_GUESTDBG_SINGLESTEP]

    def apply(self) -> None:
        dbg = s.GuestDebug()
        control = 0
        for v in self._control.values():
            control |= v
        slots: list[tuple[str, HwBreakpoint] | None] = [None] * SLOTS
        i = 0
        for owner, bps in self._bps.items():
            for bp in bps:
                slots[i] = (owner, bp)
                i += 1
        dr7 = 0
        for i, slot in enumerate(slots):
            if slot is not None:
                dbg.debugreg[i] = slot[1].address
                dr7 |= slot[1].dr7_bits(i)
        if control & c.KVM_GUESTDBG_SINGLESTEP:
            control |= self._blockirq
        if dr7:
            control |= c.KVM_GUESTDBG_USE_HW_BP
            dbg.debugreg[7] = dr7 | 0x400
        if control:
            control |= c.KVM_GUESTDBG_ENABLE
        dbg.control = control
        self._fd.set_guest_debug(dbg)
        self._slots = slots
