"""The debugger's values: breakpoints, hits, and its bookkeeping of parked vCPUs, steps and the stub."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...kvm import structs as s
from ...workarounds.lent_idt import Lent

if TYPE_CHECKING:
    from .debugger import Debugger

__all__ = ["Breakpoint", "GuestInt3Hook", "Hit"]

# Debugger.watch_guest_int3: (vCPU, the interrupted code's registers) -> (stop reason, status) or None
GuestInt3Hook = Callable[[int, s.Regs], "tuple[str, int | None] | None"]


def copy_struct(struct_value: Any) -> Any:
    new = type(struct_value)()
    ctypes.pointer(new)[0] = struct_value
    return new


# --- values ---------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Breakpoint:
    """A software breakpoint at a virtual address (and the guest-physical byte it was translated to)."""

    address: int
    gpa: int
    original: int
    label: str = ""
    callback: Callable[[Hit], object] | None = None
    owner: str = ""
    hits: int = 0
    user: bool | None = True            # in a user-accessible page: may be hit in guest user mode (the #BP stub);
                                        # None: set before the guest ran in long mode, not known yet

    def describe(self) -> str:
        name = f" <{self.label}>" if self.label else ""
        return f"breakpoint at {self.address:#x}{name} (physical {self.gpa:#x}, {self.hits} hits)"


@dataclass(frozen=True)
class Hit:
    """A vCPU stopped at a breakpoint (reason "breakpoint") or after a step (reason "step"). `regs`/`sregs` are the
    interrupted code's registers (RIP = `address`)."""

    vcpu: int
    address: int
    reason: str
    breakpoint: Breakpoint | None
    regs: s.Regs
    sregs: s.Sregs
    debugger: Debugger = field(repr=False)

    def describe(self) -> str:
        where = self.debugger.describe_address(self.address)
        what = "breakpoint" if self.reason == "breakpoint" else "step"
        return f"vCPU {self.vcpu}: {what} at {where}"


@dataclass
class _Parked:
    """A vCPU the debugger stopped: in the stub right after the `in` (stub), or at the address (kvm)."""

    frame: int              # virtual address of the interrupt frame (stub), 0 for kvm
    address: int
    reason: str
    breakpoint: Breakpoint | None
    reported: bool = False


@dataclass
class _Step:
    kind: str                           # "over" (continue past a breakpoint) or "step"
    origin: int
    lifted: int | None                  # gpa of the breakpoint lifted for the step
    temps: list[int]                    # gpas of temporary breakpoints
    targets: set[int]                   # virtual addresses that end the step
    single: bool = False                # KVM single-step (kernel mode where the host can) instead of temporaries


@dataclass
class _Temp:
    address: int
    original: int
    owners: set[int]
    user: bool = True


@dataclass
class _Stub:
    gpa: int
    va: int
    handler: int                        # the guest's own #BP handler (virtual address)
    gates: dict[int, bytes] = field(default_factory=dict)      # gate gpa -> the guest's own 16 bytes
    lent: dict[int, Lent] = field(default_factory=dict)        # vCPU -> what it was lent (stub.py)

