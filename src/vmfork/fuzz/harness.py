"""Harnesses: how a target marks the start and the end of the code under test, and how vmfork gets a parent VM
paused at the start.

Three kinds, after KF/x's conventions where they fit KVM:

"port"        the vmfork harness port (0xf6): a 32-bit `out` of 1 is the start marker (RDI/RSI = the input buffer
              and its size), 2 the end marker. The machine stops right after the `out` (vmfork.devices.harness).
"int3"        KF/x's breakpoint harness: `int3` with RAX = 0x13371337 is the start marker (RDI/RSI as above),
              RAX = 0x13371338 the end marker; in a fuzz fork, already past its start, either magic ends the input
              (KF/x harnesses put 0x13371337 at both ends, so the first one vmfork sees is the start). With
              `start_byte` (KF/x's --start-byte) the int3 was written over an instruction's first byte: the byte is
              put back and each input starts on it (`restore_start_byte`). vmfork sees them through its #BP route
              (vmfork.vmi.breakpoints, `Debugger.watch_guest_int3`) and stops right after the int3; every other
              int3 (the guest's own
              breakpoints, kernel services called through int3 like the test guest's) still reaches the guest's
              handler. Why not KF/x's default, CPUID with leaf 0x13371337: KVM answers CPUID in the kernel
              (KVM_SET_CPUID2 tables), it never exits to user space, so a VMM built on KVM cannot see it; and on
              hosts like this project's CI (kvm_pvm) CPUID in guest user mode runs natively on the host CPU.
"breakpoint"  no instrumentation in the target: vmfork breakpoints at a start address and at one or more end
              addresses (numbers or symbols from a map/ELF). The input buffer is RDI/RSI at the start address
              (the first two arguments of a SysV `parse(buf, size)`), or given explicitly.

Getting to the start (`run_to_start`): the target boots (or resumes) until its start marker. For "int3" and
"breakpoint" vmfork's #BP route can only be set up once the guest runs in long mode with an IDT (and the start
address is mapped), so the boot runs in short slices (ATTACH_SLICE_S) until the debugger attaches; a stop at a port
marker on the way is passed over. A start the target reaches before that point is missed; a target that loops
(the usual fuzzing target) comes back to it.

At the start the parent is left exactly in the interrupted code: the #BP stub's frame is unwound into the vCPU
(RIP at the start address, or right after the marker's int3, in the code's own privilege level) and the debugger
is detached, so the parent carries no breakpoint and forks resume at the start without a trip through the stub.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..kvm import structs as s
from ..vmi import Debugger, as_target, debugger
from ..vmi.errors import BreakpointError, SymbolError
from ..vmi.symbols import SymbolTable
from .errors import FuzzError

__all__ = ["ATTACH_SLICE_S", "INT3_END", "INT3_START", "KINDS", "Harness", "HarnessError", "StartPoint",
           "int3_end_marker", "int3_marker", "resolve", "restore_start_byte", "run_to_start"]

INT3_START = 0x13371337
INT3_END = 0x13371338
KINDS = ("port", "int3", "breakpoint")
ATTACH_SLICE_S = 0.005
# stops on the way to the start
_PASSED_OVER = ("timeout", "harness-start", "harness-end", "harness", "harness-pending")
_EARLY_HOOK = "fuzz-start-pending"            # _hold_early_marker's name in the exit hooks


class HarnessError(FuzzError):
    """A target that cannot be brought to its start marker, or a harness asked for wrongly."""


@dataclass(frozen=True)
class Harness:
    """`kind`: "port", "int3" or "breakpoint" (see the module docstring); `start`: the start address or symbol
    (breakpoint only); `ends`: end addresses or symbols (required for "breakpoint"; extra end points otherwise);
    `start_byte`: KF/x's --start-byte (int3 only: `restore_start_byte`); `stub_gpa`: where the debugger's #BP stub
    goes (None: its default)."""

    kind: str = "port"
    start: int | str | None = None
    ends: tuple[int | str, ...] = ()
    symbols: SymbolTable | None = None
    start_byte: int | None = None
    stub_gpa: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HarnessError(f"harness must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if (self.kind == "breakpoint") != (self.start is not None):
            raise HarnessError("a start address goes with the breakpoint harness, and only with it")
        if self.kind == "breakpoint" and not self.ends:
            raise HarnessError("the breakpoint harness needs at least one end address")
        if self.start_byte is not None and self.kind != "int3":
            raise HarnessError("--start-byte goes with --harness int3 (an int3 patched over an instruction)")
        if self.start_byte is not None and not 0 <= self.start_byte <= 0xFF:
            raise HarnessError(f"--start-byte {self.start_byte:#x}: not a byte")

    @classmethod
    def of(cls, kind: str | None = None, start: int | str | None = None, ends: Sequence[int | str] = (),
           symbols: SymbolTable | None = None, *, start_byte: int | None = None,
           stub_gpa: int | None = None) -> Harness:
        """The harness a command line asks for: a start address means "breakpoint", else `kind` or "port".
        Without a start address, "breakpoint" is KF/x's name for its int3 harness."""
        if start is not None and kind not in (None, "breakpoint"):
            raise HarnessError(f"--start sets a breakpoint harness; it does not go with --harness {kind}")
        if start is None and kind == "breakpoint":
            kind = "int3"
        return cls("breakpoint" if start is not None else kind or "port", start, tuple(ends), symbols, start_byte,
                   stub_gpa)

    def start_name(self) -> str:
        """The start marker in words, for messages: "int3 start marker", "start breakpoint at prog_fuzz.input
        (0x10a471)"."""
        if self.kind != "breakpoint":
            return "ready marker" if self.kind == "port" else f"{self.kind} start marker"
        assert self.start is not None
        address = resolve(self.start, self.symbols, "start")
        name = self.symbols.describe(address) if self.symbols is not None else f"{address:#x}"
        return f"start breakpoint at {name}" + (f" ({address:#x})" if name != f"{address:#x}" else "")


@dataclass(frozen=True)
class StartPoint:
    """Where the parent stopped: the marker's kind, the vCPU's RIP there, and RDI/RSI (the input buffer and its
    size by the port and int3 conventions)."""

    kind: str
    rip: int
    rdi: int
    rsi: int


def int3_marker(vcpu: int, regs: s.Regs) -> tuple[str, int | None] | None:
    """`Debugger.watch_guest_int3` hook for the int3 harness: the markers stop the machine like the port's do."""
    rax = regs.rax
    if rax == INT3_START:
        return ("harness-start", 1)
    if rax == INT3_END:
        return ("harness-end", 2)
    return None


def int3_end_marker(vcpu: int, regs: s.Regs) -> tuple[str, int | None] | None:
    """The int3 hook of a fuzz fork, which is past its start: either magic ends the input (KF/x harnesses use
    0x13371337 at both ends)."""
    if regs.rax in (INT3_START, INT3_END):
        return ("harness-end", 2)
    return None


def restore_start_byte(parent: Any, start: StartPoint, byte: int) -> StartPoint:
    """KF/x's `--start-byte`: the harness wrote its int3 over the first byte of an instruction. Put `byte` back
    there (in `parent`'s memory, through its page tables) and move RIP back onto it, so every fork runs the whole
    instruction. Only for the int3 harness (RIP is right after the int3)."""
    from ..vmi.memory import AddressSpace
    at = start.rip - 1
    space = AddressSpace(parent, 0)
    try:
        if space.read(at, 1) != b"\xcc":
            raise HarnessError(f"--start-byte: the byte at {at:#x}, before the start marker's RIP, is not an int3")
        space.write(at, bytes((byte,)))
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"--start-byte: cannot patch {at:#x}: {e}") from None
    target = as_target(parent)
    regs = target.get_regs(0)
    regs.rip = at
    target.set_regs(0, regs)
    return StartPoint(start.kind, at, start.rdi, start.rsi)


def run_to_start(parent: Any, harness: Harness, *, timeout: float) -> StartPoint:
    """Boot or resume `parent` (paused) until its start marker and leave it paused there (see the module
    docstring). Raises HarnessError naming how the target stopped instead."""
    deadline = time.monotonic() + timeout
    if harness.kind == "port":
        ev = parent.run(timeout=timeout)
        if ev.reason != "harness-start":
            raise HarnessError(f"the target did not reach its ready marker: {ev.reason} {ev.detail}".strip())
        regs = parent.vcpus[0].get_regs()
        return StartPoint("port", int(regs.rip), int(regs.rdi), int(regs.rsi))
    dbg = _attach(parent, harness, deadline, timeout)
    try:
        ev = _run_until_start(dbg, harness, deadline, timeout)
        regs = dbg.get_regs(ev.vcpu if isinstance(ev.vcpu, int) else 0)
        _settle(dbg)
    except BaseException:
        if parent.state != "destroyed":
            dbg.detach()
        raise
    point = StartPoint(harness.kind, int(regs.rip), int(regs.rdi), int(regs.rsi))
    if harness.start_byte is not None:
        point = restore_start_byte(parent, point, harness.start_byte)
    return point


def resolve(where: int | str, symbols: SymbolTable | None, what: str) -> int:
    """An address, or a symbol looked up in `symbols`; HarnessError names the option (`what`) otherwise."""
    if isinstance(where, int):
        return where
    try:
        return int(where, 0)
    except ValueError:
        pass
    if symbols is None:
        raise HarnessError(f"--{what} {where}: not an address, and no --symbols to look it up in")
    try:
        return symbols.address(where)
    except SymbolError as e:
        raise HarnessError(f"--{what} {where}: {e}") from None


def _stopped(ev: Any) -> str:
    status = f" status {ev.status}" if ev.status is not None else ""
    return f"it stopped with {ev.reason}{status}" + (f" ({ev.detail})" if ev.detail else "")


def _attach(parent: Any, harness: Harness, deadline: float, timeout: float) -> Debugger:
    """A debugger on `parent` with the start breakpoint or the int3 hook in place, running the boot in slices
    until the guest can take them. With the int3 harness, a start marker the guest reaches in kernel mode during a
    slice is held (`_hold_early_marker`) rather than missed."""
    start = None
    if harness.start is not None:
        start = resolve(harness.start, harness.symbols, "start")
    hooks = getattr(parent, "exit_hooks", None) if harness.kind == "int3" else None
    try:
        while True:
            dbg = debugger(parent, symbols=harness.symbols, stub_gpa=harness.stub_gpa)
            try:
                if start is None:
                    dbg.watch_guest_int3(int3_marker)
                else:
                    dbg.add_breakpoint(start, owner="start")
                return dbg
            except BreakpointError as e:
                dbg.detach()
                if time.monotonic() >= deadline:
                    raise HarnessError(f"the target never got to where vmfork can catch its "
                                       f"{harness.start_name()} within {timeout:g} s (--boot-timeout): {e}") from None
            if hooks is not None:
                hooks.add("emulation_failure", _EARLY_HOOK, _hold_early_marker(parent), first=True)
            ev = parent.run(timeout=ATTACH_SLICE_S)
            if ev.reason not in _PASSED_OVER:
                raise HarnessError(f"the target stopped before its {harness.start_name()}: {_stopped(ev)}")
    finally:
        if hooks is not None:
            hooks.remove(_EARLY_HOOK)


def _hold_early_marker(parent: Any) -> Callable[[Any], bool]:
    """An emulation-failure hook for the attach slices: the guest's kernel-mode int3 with the start magic stops
    the machine ON the int3 (nothing of the guest's changed; reason "harness-pending"), so the debugger attached
    next sees that very int3 again when the guest resumes.

    Why: on hosts that emulate guest kernel mode (kvm_pvm), the watcher of the int3 harness can attach only between
    slices of ATTACH_SLICE_S; a kernel-mode target that reaches its first start marker inside a slice had it
    delivered to its own #BP handler, ran its input, and the first magic vmfork saw was the END marker (KF/x's
    harnesses use one magic at both ends), so the parent was left after the end marker and every fuzz fork ended
    at once without running the parser. There an int3 in kernel mode is an emulation failure, which this hook sees
    whether or not the debugger is attached (on hosts that run kernel mode natively it never fires)."""
    from ..workarounds.guest_access import GuestAccessError, read_virt

    def hook(vcpu: Any) -> bool:
        sregs = vcpu.get_sregs()
        if sregs.cs.dpl != 0 or not sregs.cr0 & 1:
            return False
        regs = vcpu.get_regs()
        if regs.rax != INT3_START:
            return False
        try:
            if read_virt(vcpu, parent.memory, regs.rip, 1) != b"\xcc":
                return False
        except GuestAccessError:
            return False
        parent.request_stop("harness-pending", None)
        return True

    return hook


def _run_until_start(dbg: Debugger, harness: Harness, deadline: float, timeout: float) -> Any:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HarnessError(f"the target did not reach its {harness.start_name()} within {timeout:g} s "
                               "(--boot-timeout)")
        ev = dbg.run(timeout=left)
        if harness.kind == "int3" and ev.reason == "harness-start" and _at_int3_marker(dbg):
            return ev
        if harness.kind == "breakpoint" and ev.reason == "breakpoint":
            return ev
        if ev.reason not in _PASSED_OVER:
            raise HarnessError(f"the target did not reach its {harness.start_name()}: {_stopped(ev)}")


def _at_int3_marker(dbg: Debugger) -> bool:
    """A harness-start stop came from the int3 hook (not from a port marker the target also has: RAX = 1)."""
    return int(dbg.get_regs(0).rax) == INT3_START


def _settle(dbg: Debugger) -> None:
    """Unwind every vCPU the debugger stopped in its #BP stub into the interrupted code (what the stub's `iretq`
    would do), then detach: the machine is left with no trace of the debugger."""
    target = dbg.target
    moved: list[tuple[int, s.Regs, s.Sregs]] = []
    for v in range(target.vcpu_count):
        regs, sregs = dbg.get_regs(v), dbg.get_sregs(v)
        raw = target.get_regs(v)
        if (raw.rip, raw.rsp) != (regs.rip, regs.rsp):
            moved.append((v, regs, sregs))
    dbg.detach()
    for v, regs, sregs in moved:
        target.set_sregs(v, sregs)      # first: the privilege level and mode the registers belong to
        target.set_regs(v, regs)
