"""The workarounds of one machine: installed into its `exit_hooks` when it is made (roots, thread forks and process
forks alike, since all are `Machine`s), told when its state is loaded, and counted.

The instruction fallbacks are installed everywhere: they only ever run on an emulation failure, which a host that
runs guest kernel mode natively never reports. The syscall completion costs a debug exit per guest page fault, so
it is installed only where the syscall probe (syscall_probe.py, the guest of doctor's `syscall_cpl3`) finds that
`syscall` stays in user mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import ExitHook
from .cmpxchg16b import Cmpxchg16bFallback
from .fwait import FwaitFallback
from .int3 import Int3Fallback
from .popcnt import PopcntFallback
from .smap import SmapFallback
from .syscall import SyscallCompletion
from .syscall_probe import stays_in_user_mode
from .xsave import XsaveFallback

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from ..vm import Machine

__all__ = ["MachineWorkarounds"]

class MachineWorkarounds:
    """What one machine has installed, and how often each part has done its work."""

    def __init__(self, machine: Machine, machine_type: type[Machine]) -> None:
        """`machine_type`: the class that makes the syscall probe's own machine (vm.py's Machine)."""
        self.machine = machine
        hooks = machine.exit_hooks
        mem = machine.memory
        self.fallbacks: dict[str, ExitHook] = {
            "int3-cpl0": Int3Fallback(mem), "fwait-cpl0": FwaitFallback(mem), "clac-stac-cpl0": SmapFallback(mem),
            "xsave-cpl0": XsaveFallback(mem), "cmpxchg16b-cpl0": Cmpxchg16bFallback(mem),
            "popcnt-cpl0": PopcntFallback(mem)}
        for name, hook in self.fallbacks.items():
            hooks.add("emulation_failure", name, hook)
        self.syscall: SyscallCompletion | None = None
        self._seen: dict[int, tuple[int, int, int]] = {}     # vCPU index -> (IDT base, IDT limit, EFER) last looked at
        self._failures = 0
        if stays_in_user_mode(machine_type):
            self.syscall = SyscallCompletion(machine.memory)
            hooks.add("debug", "syscall-completion", self.syscall)
            # first in line, handling nothing: every emulation failure is a moment to look at the IDT again
            hooks.add("emulation_failure", "syscall-refresh", self._refresh_hook, first=True)
        for v in machine.vcpus:     # a recycled VM shell may still hold a previous fork's claim
            if self.syscall is None and "syscall" in v.debug.owners():
                v.debug.release("syscall")

    def _refresh_hook(self, vcpu: Vcpu) -> bool:
        """Look at the guest's IDT again when its IDTR or EFER changed, and at every 64th emulation failure (a gate
        rewritten in place): not at each one, since clac/stac alone make thousands during a Linux boot."""
        assert self.syscall is not None
        sregs = vcpu.get_sregs()
        key = (sregs.idt.base, sregs.idt.limit, sregs.efer)
        self._failures += 1
        if key != self._seen.get(vcpu.index) or self._failures % 64 == 0:
            self._seen[vcpu.index] = key
            self.syscall.refresh(vcpu)
        return False

    def state_loaded(self) -> None:
        """After the machine's vCPU state was loaded (a restore, a fork): the breakpoints follow the guest's IDT."""
        if self.syscall is not None:
            for v in self.machine.vcpus:
                self.syscall.refresh(v)

    def counts(self) -> dict[str, int]:
        """Fallback name -> completed instructions; `syscall-completion` -> system calls entered in kernel mode
        and `syscall-passed-on` -> other page faults sent on to the guest's handler (where installed)."""
        hook_counts = self.machine.exit_hooks.counts
        out = {name: hook_counts.get(name, 0) for name in self.fallbacks}
        if self.syscall is not None:
            out["syscall-completion"] = self.syscall.counts.completed
            out["syscall-passed-on"] = self.syscall.counts.passed_on
        return out
