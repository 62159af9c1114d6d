"""Host workarounds: what vmfork completes in user space because the host's KVM cannot.

On hosts where guest kernel mode is emulated (kvm_pvm; see `vmfork doctor`), some instructions stop the VM with an
emulation failure, and `syscall` from user mode does not switch to kernel mode. Everything vmfork does about that
lives in this package, one module per mechanism, and registers itself in `CATALOG` so `vmfork doctor` can list it.
None of it is scattered through the run loop: the loop only calls `Machine.exit_hooks` (below) on the exits that
such mechanisms handle, and goes on with its default (a crash report, or a stop) when none of them does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["CATALOG", "ExitHook", "ExitHooks", "Workaround", "register"]

# A hook sees the vCPU right after its exit (registers readable through the sync area) and returns True when it
# handled the exit completely: the vCPU then re-enters the guest, and later hooks are not asked.
ExitHook = Callable[["Vcpu"], bool]


@dataclass(slots=True)
class Workaround:
    """One host workaround, as `vmfork doctor` lists it."""

    name: str               # e.g. "int3-cpl0"
    what: str               # one line: what it completes, and how
    probe: str              # the doctor probe that says when it is needed


CATALOG: dict[str, Workaround] = {}


def register(w: Workaround) -> Workaround:
    CATALOG[w.name] = w
    return w


@dataclass(slots=True)
class ExitHooks:
    """The ordered hooks of one machine for the exits the run loop cannot handle itself.

    `emulation_failure`: KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION (an instruction the
    host's in-kernel emulator cannot run). `debug`: KVM_EXIT_DEBUG (hardware breakpoints, single-step; see
    vmfork.guest_debug for sharing the debug registers). Owners put their debugger first (a vmfork breakpoint is not
    the guest's own int3), then workarounds. `counts` tells how often each named hook handled an exit."""

    emulation_failure: list[tuple[str, ExitHook]] = field(default_factory=list)
    debug: list[tuple[str, ExitHook]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)      # of the hooks in both lists (every fork adds nine: cheaply)

    def add(self, kind: str, name: str, hook: ExitHook, *, first: bool = False) -> None:
        hooks = self.emulation_failure if kind == "emulation_failure" else self.debug
        if name in self.names:
            self.remove(name)
        if first:
            hooks.insert(0, (name, hook))
        else:
            hooks.append((name, hook))
        self.names.add(name)

    def remove(self, name: str) -> None:
        self.emulation_failure[:] = [h for h in self.emulation_failure if h[0] != name]
        self.debug[:] = [h for h in self.debug if h[0] != name]
        self.names.discard(name)

    def dispatch(self, hooks: list[tuple[str, ExitHook]], vcpu: Vcpu) -> bool:
        for name, hook in hooks:
            if hook(vcpu):
                self.counts[name] = self.counts.get(name, 0) + 1
                return True
        return False
