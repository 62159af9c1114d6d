"""KVM's own guest debugging, on hosts whose KVM intercepts software breakpoints (VT-x/AMD-V): an `int3` of
vmfork's exits with KVM_EXIT_DEBUG (KVM_GUESTDBG_USE_SW_BP) in any guest mode, with or without a guest IDT, and
steps use KVM single-step. Every KVM_SET_GUEST_DEBUG goes through the vCPU's debug claims as owner "debugger"
(Target.set_guest_debug). The guest's own int3s are given back to it as #BP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...kvm import constants as c
from ...kvm import structs as s
from ...workarounds.bp_stub import INT3
from ..errors import BreakpointError, SteppingError, TranslationError
from ..memory import AddressSpace
from .base import DebuggerBase
from .values import Hit, _Parked, copy_struct

if TYPE_CHECKING:
    from ...vm import StopEvent

__all__ = ["CONTINUE", "KvmMixin"]

CONTINUE: Any = object()      # a stop the debugger handled itself: run on


class KvmMixin(DebuggerBase):
    """Breakpoints and steps through KVM_SET_GUEST_DEBUG."""

    def _kvm_prepare(self, step_vcpu: int | None) -> None:
        self.sync()
        self._kvm_step_vcpu = step_vcpu
        for v in range(self.target.vcpu_count):
            control = 0
            if self.breakpoints or self._guest_int3 is not None or v == step_vcpu or v in self._skip:
                control = c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_SW_BP
                if v == step_vcpu or v in self._skip:
                    control |= c.KVM_GUESTDBG_SINGLESTEP
                    regs = self.target.get_regs(v)
                    try:
                        gpa = AddressSpace(self.target, v).translate(regs.rip).paddr
                    except TranslationError:
                        gpa = -1
                    if gpa in self.breakpoints:
                        self._lifted.setdefault(gpa, set()).add(v)
                        self._poke(gpa, self.breakpoints[gpa].original)
            self.target.set_guest_debug(v, control)
        self._kvm_debug_on = True
        self._parked.clear()

    def _kvm_reinsert(self) -> None:
        for gpa in list(self._lifted):
            del self._lifted[gpa]
            if gpa in self.breakpoints:
                self._poke(gpa, INT3)

    def _kvm_finish(self, ev: StopEvent) -> StopEvent:
        """Classify a stop under KVM guest debugging; returns None-equivalent by looping in _kvm_run."""
        with self._lock:
            self._kvm_reinsert()
            if ev.reason != "debug" or ev.vcpu is None:
                return ev
            vcpu = ev.vcpu
            regs = self.target.get_regs(vcpu)
            stepping = self._kvm_step_vcpu
            if ev.status == 1:                  # #DB: a single step finished
                skipping = self._skip.pop(vcpu, None)
                if vcpu == stepping:
                    self._parked[vcpu] = _Parked(0, regs.rip, "step", None, True)
                    return self._event("step", vcpu, regs.rip)
                if skipping is not None:
                    return CONTINUE  # type: ignore[no-any-return]
                return ev
            space = AddressSpace(self.target, vcpu)
            try:
                gpa = space.translate(regs.rip).paddr
            except TranslationError:
                gpa = -1
            bp = self.breakpoints.get(gpa)
            if bp is None and self._guest_int3 is not None:
                after = copy_struct(regs)
                after.rip = regs.rip + 1            # as the stub mechanism reports it: right after the int3
                stop = self._guest_int3(vcpu, after)
                if stop is not None:
                    self.target.set_regs(vcpu, after)
                    from ...vm import StopEvent
                    return StopEvent(stop[0], stop[1], vcpu)
            if bp is None:
                # not ours: give the guest its #BP (the int3 is re-executed as an exception the guest handles)
                events = s.VcpuEvents()
                fd = getattr(getattr(self.target, "machine", None), "vcpus", None)
                if fd is None:
                    raise BreakpointError("the guest's own int3 cannot be re-injected through this target")
                fd[vcpu].fd.get_vcpu_events(events)
                events.exception.injected = 1
                events.exception.nr = 3
                events.exception.has_error_code = 0
                fd[vcpu].fd.set_vcpu_events(events)
                return CONTINUE  # type: ignore[no-any-return]
            bp.hits += 1
            sregs = self.target.get_sregs(vcpu)
            hit = Hit(vcpu, bp.address, "breakpoint", bp, regs, sregs, self._as_debugger())
            self.last_hit = hit
            self._skip[vcpu] = bp.address
            callback = bp.callback or self.on_hit
            if callback is not None and callback(hit) is True:
                return CONTINUE  # type: ignore[no-any-return]
            self._parked[vcpu] = _Parked(0, bp.address, "breakpoint", bp, True)
            return self._event("breakpoint", vcpu, bp.address)

    def _kvm_run(self, timeout: float | None, step_vcpu: int | None = None) -> StopEvent:
        while True:
            with self._lock:
                self._kvm_prepare(step_vcpu)
            ev = self._kvm_finish(self.target.run(timeout))
            if ev is not CONTINUE:
                return ev
            step_vcpu = None

    def _kvm_step(self, vcpu: int, timeout: float | None) -> StopEvent:
        if not self._kvm_single_step():
            raise SteppingError(f"this host cannot single-step ({self._probe_reason('single_step')})")
        return self._kvm_run(timeout, step_vcpu=vcpu)
