"""The state every part of the debugger shares, and the small helpers they all use (host probes, guest bytes).

`Debugger` (debugger.py) is assembled from one mixin per mechanism: the #BP stub (stub.py), kernel-mode breakpoints
and single-step on this kind of host (kernel.py), stepping with temporary breakpoints (stepping.py) and KVM's guest
debugging (kvm.py). They all derive from `DebuggerBase`, which declares the shared state and, for the type checker,
the methods one part calls in another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ...errors import MemoryAccessError, VmforkError
from ...kvm import structs as s
from ..errors import BreakpointError
from ..memory import AddressSpace
from ..symbols import SymbolTable
from ..target import Target
from .values import Breakpoint, GuestInt3Hook, Hit, _Parked, _Step, _Stub, _Temp

if TYPE_CHECKING:
    from ...vm import StopEvent
    from .debugger import Debugger

__all__ = ["DebuggerBase"]


_statuses: dict[str, str] = {}


def probe_status(name: str) -> str:
    """The status of host probe `name` (`vmfork doctor`), "unknown" if there is no such probe. Kept for the
    process's life: the debugger asks at every step."""
    found = _statuses.get(name)
    if found is None:
        from ...doctor import probe_host
        try:
            found = probe_host(cached=True).item(name).status
        except KeyError:
            found = "unknown"
        _statuses[name] = found
    return found


class DebuggerBase:
    """Shared state of a debugger (see `Debugger` for what each part does with it)."""

    target: Target
    symbols: SymbolTable | None
    stub_gpa: int
    stub_va: int | None
    mechanism: str
    breakpoints: dict[int, Breakpoint]              # by gpa
    on_hit: Callable[[Hit], object] | None
    last_hit: Hit | None
    error: BaseException | None
    round_trips: int
    _lock: threading.RLock
    _known: dict[int, int]                          # gpa -> original byte, for every byte an int3 of ours replaced
    _temps: dict[int, _Temp]
    _steps: dict[int, _Step]
    _lifted: dict[int, set[int]]
    _parked: dict[int, _Parked]
    _skip: dict[int, int]                           # vcpu -> breakpoint address to step over on the next resume
    _stub: _Stub | None
    _inherited_stub: _Stub | None
    _kvm_step_vcpu: int | None
    _regs_changed: bool
    _descriptors: dict[tuple[int, int, int], int]
    _kvm_debug_on: bool
    _detached: bool
    _guest_int3: GuestInt3Hook | None
    _settling: int                                  # kernel-mode steps left to find where user mode begins
    _lent_selector: int                             # the kernel code selector of the lent #BP gate
    _hooked: object | None                          # the machine whose exit hooks carry ours (kernel.py)

    # --- host probes ----------------------------------------------------------------------------------------------

    @staticmethod
    def _choose(mechanism: str) -> str:
        if mechanism not in ("auto", "kvm", "stub"):
            raise BreakpointError(f"mechanism must be auto, kvm or stub, not {mechanism!r}")
        if mechanism != "auto":
            return mechanism
        from ...doctor import probe_host
        return "kvm" if probe_host(cached=True).supports("sw_breakpoints") else "stub"

    @staticmethod
    def _probe_reason(name: str) -> str:
        from ...doctor import probe_host
        try:
            return probe_host(cached=True).reason(name)
        except (KeyError, VmforkError) as e:
            return str(e)

    def _kvm_single_step(self) -> bool:
        """KVM single-step works in every mode (VT-x/AMD-V hosts)."""
        return probe_status("single_step") == "works"

    def _kernel_single_step(self) -> bool:
        """KVM single-step works at least in guest kernel mode (also kvm_pvm, "cpl0-only")."""
        return probe_status("single_step") in ("works", "cpl0-only")

    def _cpl0_int3_is_exit(self) -> bool:
        """`int3` in guest kernel mode stops the VM with an emulation failure (kvm_pvm): vmfork's kernel-mode
        breakpoints are recognised there (kernel.py) instead of going through the #BP stub."""
        return probe_status("int3_cpl0") == "emulation-failure"

    # --- small helpers ----------------------------------------------------------------------------------------------

    def describe_address(self, address: int) -> str:
        if self.symbols is not None:
            name = self.symbols.describe(address)
            if not name.startswith("0x"):
                return f"{address:#x} <{name}>"
        return f"{address:#x}"

    def _inserted(self) -> dict[int, tuple[int, int]]:
        """gpa -> (virtual address, original byte) of every int3 of ours that should be in memory now."""
        out = {gpa: (t.address, t.original) for gpa, t in self._temps.items()}
        for gpa, bp in self.breakpoints.items():
            if gpa not in self._lifted and gpa not in out:
                out[gpa] = (bp.address, bp.original)
        return out

    def _require_paused(self, what: str) -> None:
        if self._detached:
            raise BreakpointError("this debugger is detached")
        state = self.target.state
        if state == "running" and not self._in_exit():
            raise BreakpointError(f"cannot {what} {self.target.name} while it runs: pause it first")
        if state == "destroyed":
            raise BreakpointError(f"cannot {what} {self.target.name}: it is destroyed")

    def _in_exit(self) -> bool:
        local = getattr(self.target, "_exit", None)
        return local is not None and getattr(local, "vcpu", None) is not None

    def _poke(self, gpa: int, value: int) -> None:
        try:
            self.target.write_phys(gpa, bytes([value]))
        except MemoryAccessError as e:
            raise BreakpointError(f"cannot write {self.target.name}'s memory at {gpa:#x}: {e}") from None

    def _as_debugger(self) -> Debugger:
        return cast("Debugger", self)

    def _event(self, reason: str, vcpu: int, address: int) -> StopEvent:
        from ...vm import StopEvent
        return StopEvent(reason, None, vcpu, self.describe_address(address))

    if TYPE_CHECKING:
        # implemented by the other parts
        def get_regs(self, vcpu: int) -> s.Regs: ...
        def get_sregs(self, vcpu: int) -> s.Sregs: ...
        def sync(self) -> None: ...
        def _arm(self, user: bool = True) -> None: ...
        def _begin_single_step(self, vcpu: int, kind: str, rip: int, space: AddressSpace) -> None: ...
        def _end_single_step(self, vcpu: int) -> None: ...
        def _begin_settle(self) -> None: ...
        def _end_settle(self) -> None: ...
        def _settle_modes(self) -> None: ...
        def _begin_step(self, vcpu: int, kind: str, origin: int | None = None,
                        ctx: tuple[s.Regs, s.Sregs, AddressSpace] | None = None) -> None: ...
        def _finish_step(self, vcpu: int) -> None: ...
        def _park(self, vcpu: int, parked: _Parked) -> None: ...
        def _write_table(self) -> None: ...
        def _shadow(self, data: bytes, space: AddressSpace, vaddr: int) -> bytes: ...
        def _install_kernel_hooks(self) -> None: ...
