"""`vmfork doctor`: what this host's KVM really does, measured by tiny guests.

Every line of the report comes from a guest that ran here: a few bytes of hand-assembled code in the flat long-mode
environment of `vmfork.arch.x86.flat` (no boot code), one fresh machine per probe, each run with a timeout (a probe
that never stops reports "hangs") and inside its own try/except (a probe that fails reports "error"; the others
still run). The whole probe takes about a second.

`probe_host()` returns a `HostReport`; tests ask it `supports(name)` and skip with `reason(name)`. Reports are cached
per process and in `${XDG_CACHE_HOME:-~/.cache}/vmfork/doctor.json` (keyed by kernel release, CPU model and vmfork
version, valid for a day) for callers that pass `cached=True`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json as _json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .arch.x86 import flat
from .arch.x86.emulator_probe import cpu_model
from .arch.x86.flat import DATA_ADDR, exit_with
from .errors import VmforkError
from .kvm import constants as c
from .kvm import structs as s
from .workarounds.syscall_probe import (
    NOT_REACHED,
    OK,
    SYSCALL_CODE,
    USER_MODE_HANDLER,
    kernel_handler,
    stays_in_user_mode,
)

__all__ = ["PROBES", "HostReport", "ProbeItem", "cache_path", "main", "probe_host", "run_doctor"]

# --- statuses -------------------------------------------------------------------------------------------------------

WORKS = "works"
NATIVE = "native"
EMULATED = "emulated"
IGNORED = "ignored"               # the host accepted the request and did nothing
SHUTS_DOWN = "shuts-down"         # KVM_EXIT_SHUTDOWN
EMULATION_FAILURE = "emulation-failure"   # KVM_EXIT_INTERNAL_ERROR
WRONG_TRAP = "wrong-trap"         # the guest got another exception than the one expected
HANGS = "hangs"
BROKEN = "broken"
MEASURED = "measured"
ERROR = "error"                   # the probe itself failed (a host ioctl refused, a bug)
USER_MODE = "user-mode"           # a kernel entry ran its handler with CPL 3
LEAKS = "leaks"                   # the guest reads a value that is not its own
GUEST_TRAP = "guest-trap"         # a debug event went to the guest's IDT instead of exiting to the host
CPL0_ONLY = "cpl0-only"           # works in (emulated) kernel mode only
UNAVAILABLE = "unavailable"       # no usable /dev/kvm
ABSENT = "absent"                 # the VMM's CPUID or KVM says the feature is not there

# Guest exit statuses used by the probes (the flat environment's default handlers report 0xdf-0xff).
# OK, NOT_REACHED and USER_MODE_HANDLER, and kernel_handler, come from the syscall probe's guest (syscall_probe.py).
GUEST_HANDLER = 0x03              # the guest's own #BP handler ran (a debug exit was expected instead)

NATIVE_CPL3_INSTR_PER_S = 200e6   # a counted loop above this rate runs natively
NATIVE_CPL0_NS = 20.0             # a CPL0 instruction below this cost runs natively (emulation is ~1000x slower)
CACHE_TTL = 24 * 3600.0
REPORT_VERSION = 1

# --- the report -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeItem:
    """One measured line of the report. `detail` is a sentence about the host ("guest kernel mode ... is emulated")."""

    name: str
    status: str
    supported: bool
    value: float | None = None
    unit: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "supported": self.supported, "value": self.value, "unit": self.unit,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ProbeItem:
        value = d.get("value")
        return cls(name, str(d["status"]), bool(d["supported"]), None if value is None else float(value),
                   str(d.get("unit", "")), str(d.get("detail", "")))

    def value_text(self) -> str:
        if self.value is None:
            return ""
        v = self.value
        text = f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"
        return f"{text} {self.unit}".strip()


@dataclass(frozen=True, slots=True)
class HostReport:
    """What `vmfork doctor` measured on this host."""

    VERSION: ClassVar[int] = REPORT_VERSION
    items: tuple[ProbeItem, ...]
    kernel: str = ""
    cpu: str = ""
    vmfork_version: str = ""
    created: float = 0.0           # time.time() of the measurement
    duration: float = 0.0          # seconds the probes took
    quick: bool = False

    def item(self, name: str) -> ProbeItem:
        for it in self.items:
            if it.name == name:
                return it
        known = ", ".join(it.name for it in self.items)
        raise KeyError(f"vmfork doctor has no probe named {name!r} (known: {known})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(it.name for it in self.items)

    def supports(self, name: str) -> bool:
        """Whether the host has feature `name` (a probe name). Unknown names raise KeyError."""
        return self.item(name).supported

    def reason(self, name: str) -> str:
        """One line naming the measurement, e.g. "host KVM: guest kernel mode (CPL0) is emulated at
        1.9 µs/instruction, not native (vmfork doctor)"."""
        it = self.item(name)
        return f"host KVM: {it.detail or it.status} (vmfork doctor: {name} = {it.status})"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "kernel": self.kernel, "cpu": self.cpu, "vmfork": self.vmfork_version,
                "created": self.created, "duration_s": self.duration, "quick": self.quick,
                "items": {it.name: it.to_dict() for it in self.items}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HostReport:
        if d.get("version") != cls.VERSION:
            raise ValueError(f"doctor report version {d.get('version')!r}, expected {cls.VERSION}")
        items = tuple(ProbeItem.from_dict(name, v) for name, v in dict(d["items"]).items())
        return cls(items, str(d.get("kernel", "")), str(d.get("cpu", "")), str(d.get("vmfork", "")),
                   float(d.get("created", 0.0)), float(d.get("duration_s", 0.0)), bool(d.get("quick", False)))

    def table(self) -> str:
        """The report as a readable table."""
        rows = [(it.name, it.status, it.value_text(), it.detail) for it in self.items]
        w0 = max(len("probe"), *(len(r[0]) for r in rows))
        w1 = max(len("status"), *(len(r[1]) for r in rows))
        w2 = max(len("value"), *(len(r[2]) for r in rows))
        head = (f"vmfork doctor: kernel {self.kernel or '?'}, CPU {self.cpu or '?'}, vmfork {self.vmfork_version}"
                f" ({self.duration:.2f} s{', quick' if self.quick else ''})")
        lines = [head, "", f"{'probe':<{w0}}  {'status':<{w1}}  {'value':>{w2}}  detail"]
        lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * w2}  {'-' * 6}")
        lines += [f"{a:<{w0}}  {b:<{w1}}  {v:>{w2}}  {d}" for a, b, v, d in rows]
        return "\n".join(lines)


# --- running a tiny guest -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How a probe guest stopped."""

    kind: str              # exit, debug, crash, timeout, other
    status: int | None     # exit status (kind == exit)
    exit_reason: int       # the last KVM exit reason
    elapsed: float         # seconds in Machine.run
    detail: str = ""
    suberror: int = 0      # KVM_EXIT_INTERNAL_ERROR's suberror


class _Guest:
    """A fresh machine running `code` in the flat environment, with the exit device on port 0xf4."""

    def __init__(self, code: bytes, *, memory_mib: int = 8, workarounds: bool = False, **flat_options: Any) -> None:
        from .devices import ExitDevice
        from .vm import Machine

        # the host's own CPU: probes measure KVM, not a policy
        self.m = Machine.create(memory_mib=memory_mib, vcpus=1, name="doctor", with_devices=False, cpuid="host",
                                workarounds=workarounds)
        try:
            self.m.attach_devices([ExitDevice(self.m)])
            self.layout = flat.setup_long_mode(self.m, code=code, **flat_options)
        except BaseException:
            self.m.destroy()
            raise
        self.vcpu = self.m.vcpus[0]

    def __enter__(self) -> _Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.m.destroy()

    def set_rcx(self, value: int) -> None:
        regs = self.vcpu.get_regs()
        regs.rcx = value
        self.vcpu.set_regs(regs)

    def restart(self, *, rcx: int = 0, interrupts: bool = False) -> None:
        flat.reset_regs(self.m, self.layout, interrupts=interrupts)
        if rcx:
            self.set_rcx(rcx)

    def run(self, timeout: float) -> _Outcome:
        t0 = time.perf_counter()
        ev = self.m.run(timeout=timeout)
        elapsed = time.perf_counter() - t0
        reason = int(self.vcpu.run.exit_reason)
        if ev.reason == "exit":
            return _Outcome("exit", ev.status, reason, elapsed)
        if ev.reason == "debug":     # KVM_EXIT_DEBUG; the detail carries "pc=0x..."
            return _Outcome("debug", ev.status, c.KVM_EXIT_DEBUG, elapsed, ev.detail)
        if ev.reason in ("crash", "timeout"):
            sub = int(self.vcpu.run.exit.internal.suberror) if reason == c.KVM_EXIT_INTERNAL_ERROR else 0
            return _Outcome(ev.reason, None, reason, elapsed, ev.detail, sub)
        return _Outcome("other", ev.status, reason, elapsed, f"stopped: {ev.reason} {ev.detail}".strip())

    def set_guest_debug(self, control: int, debugregs: Sequence[int] = ()) -> None:
        dbg = s.GuestDebug()
        dbg.control = control
        for i, value in enumerate(debugregs):
            dbg.debugreg[i] = value
        self.vcpu.fd.set_guest_debug(dbg)

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.m.memory.read(gpa, 8), "little")


_VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF"}


def _vector_name(vector: int) -> str:
    return _VECTOR_NAMES.get(vector, f"vector {vector}")


def _classify(o: _Outcome, *, ok: int = OK) -> tuple[str, str]:
    """(status, phrase) for a probe whose guest reports `ok` on success."""
    if o.kind == "exit":
        if o.status == ok:
            return WORKS, "works"
        if o.status == USER_MODE_HANDLER:
            return USER_MODE, "enters its handler, but in user mode (CPL3), not kernel mode"
        if o.status is not None and o.status >= flat.UNEXPECTED_VECTOR_STATUS:
            if o.status == flat.UNEXPECTED_VECTOR_STATUS:
                return WRONG_TRAP, "raises an unexpected interrupt instead"
            v = o.status & 0x1F
            return WRONG_TRAP, f"raises {_vector_name(v)} (vector {v}) instead"
        if o.status == NOT_REACHED:
            return IGNORED, "does nothing (execution continued after it)"
        return BROKEN, f"ends with exit status {o.status:#x}" if o.status is not None else "ends without a status"
    if o.kind == "crash":
        if o.exit_reason == c.KVM_EXIT_SHUTDOWN:
            return SHUTS_DOWN, "shuts the VM down (KVM_EXIT_SHUTDOWN)"
        if o.exit_reason == c.KVM_EXIT_INTERNAL_ERROR:
            if o.suberror == c.KVM_INTERNAL_ERROR_EMULATION:
                return EMULATION_FAILURE, "stops the VM with a KVM internal error (emulation failure)"
            return BROKEN, f"stops the VM with a KVM internal error (suberror {o.suberror})"
        name = c.EXIT_REASON_NAMES.get(o.exit_reason, str(o.exit_reason))
        return BROKEN, f"stops the VM with KVM_EXIT_{name.upper()}"
    if o.kind == "timeout":
        return HANGS, f"hangs (no exit within {o.elapsed:.1f} s)"
    return BROKEN, o.detail


# --- the probes -----------------------------------------------------------------------------------------------------

COUNT_LOOP = (
    b"\xff\xc9"                     # l: dec ecx           (RCX = iterations, set by the host)
    b"\x75\xfc"                     #    jnz l
    + exit_with(OK)                 #    mov al, OK; out 0xf4, al; jmp $
)


def _loop_rate(g: _Guest, iterations: int, timeout: float) -> tuple[float, float, bool]:
    """Run COUNT_LOOP for `iterations`; returns (instructions executed, seconds, finished)."""
    g.restart(rcx=iterations)
    o = g.run(timeout)
    if o.kind == "exit" and o.status == OK:
        return 2.0 * iterations + 1, o.elapsed, True
    if o.kind == "timeout":
        left = g.vcpu.get_regs().rcx & 0xFFFFFFFF
        return 2.0 * (iterations - left), o.elapsed, False
    raise VmforkError(f"the counted loop {_classify(o)[1]}")


def probe_cpl3_speed(quick: bool) -> ProbeItem:
    iterations = 20_000_000 if quick else 100_000_000
    with _Guest(COUNT_LOOP, cpl=3) as g:
        instr, secs, _ = _loop_rate(g, iterations, 1.0 if quick else 2.0)
    rate = instr / secs
    native = rate > NATIVE_CPL3_INSTR_PER_S
    what = "runs natively" if native else "runs slowly, not native"
    return ProbeItem("cpl3_speed", NATIVE if native else EMULATED, native, rate / 1e6, "Minstr/s",
                     f"guest user mode (CPL3) {what}: a dec/jnz loop ran {rate / 1e6:.0f} M instructions/s")


def probe_cpl0_speed(quick: bool) -> ProbeItem:
    iterations = 5_000 if quick else 20_000
    with _Guest(COUNT_LOOP, cpl=0) as g:
        base_instr, base_secs, _ = _loop_rate(g, 1, 1.0)
        instr, secs, _ = _loop_rate(g, iterations, 2.0)
    ns = max(secs - base_secs, 0.0) / max(instr - base_instr, 1.0) * 1e9
    native = ns < NATIVE_CPL0_NS
    if native:
        detail = f"guest kernel mode (CPL0) runs natively ({ns:.1f} ns/instruction)"
    elif ns >= 1000:
        detail = f"guest kernel mode (CPL0) is emulated at {ns / 1000:.1f} µs/instruction, not native"
    else:
        detail = f"guest kernel mode (CPL0) is emulated at {ns:.0f} ns/instruction, not native"
    return ProbeItem("cpl0_speed", NATIVE if native else EMULATED, native, ns, "ns/instr", detail)


def probe_iopl_cpl3(quick: bool) -> ProbeItem:
    with _Guest(exit_with(OK), cpl=3, io_bitmap=False) as g:
        o = g.run(1.0)
    status, phrase = _classify(o)
    if status == WRONG_TRAP and o.status == flat.trap_status(13):
        return ProbeItem("iopl_cpl3", IGNORED, False, None, "",
                         "RFLAGS.IOPL=3 does not give CPL3 port I/O (#GP); only the TSS I/O bitmap does")
    if status == WORKS:
        return ProbeItem("iopl_cpl3", WORKS, True, None, "", "RFLAGS.IOPL=3 gives CPL3 port I/O")
    return ProbeItem("iopl_cpl3", status, False, None, "", f"port I/O from CPL3 with IOPL=3 {phrase}")


def _binary_probe(name: str, what: str, code: bytes, *, timeout: float = 1.0, **flat_options: Any) -> ProbeItem:
    with _Guest(code, **flat_options) as g:
        o = g.run(timeout)
    status, phrase = _classify(o)
    return ProbeItem(name, status, status == WORKS, None, "", f"{what} {phrase}")


def probe_syscall_cpl3(quick: bool) -> ProbeItem:
    return _binary_probe("syscall_cpl3", "`syscall` from CPL3 (EFER.SCE, STAR and LSTAR set)", SYSCALL_CODE, cpl=3,
                         syscall_entry=kernel_handler())


def probe_int_n_cpl3(quick: bool) -> ProbeItem:
    code = (
        b"\xcd\x80"                 # int 0x80
        + exit_with(NOT_REACHED)
    )
    return _binary_probe("int_n_cpl3", "`int 0x80` from CPL3 through a DPL3 gate", code, cpl=3,
                         handlers={0x80: kernel_handler()})


def probe_int3_cpl3(quick: bool) -> ProbeItem:
    code = (
        b"\xcc"                     # int3
        + exit_with(NOT_REACHED)
    )
    return _binary_probe("int3_cpl3", "`int3` from CPL3 to the guest's #BP handler", code, cpl=3,
                         handlers={3: kernel_handler()})


def probe_selectors_cpl3(quick: bool) -> ProbeItem:
    name = "selectors_cpl3"
    code = (
        b"\x8c\xc8"                 # mov eax, cs
        b"\xe6\xf4"                 # out 0xf4, al
        b"\xeb\xfe"                 # jmp $
    )
    with _Guest(code, cpl=3) as g:
        o = g.run(1.0)
    if o.kind != "exit" or o.status is None:
        status, phrase = _classify(o)
        return ProbeItem(name, status, False, None, "", f"reading CS in CPL3 {phrase}")
    if o.status == flat.USER_CS:
        return ProbeItem(name, WORKS, True, None, "", f"`mov eax, cs` in CPL3 reads {o.status:#x}, "
                         "the selector loaded")
    return ProbeItem(name, LEAKS, False, None, "",
                     f"`mov eax, cs` in CPL3 reads {o.status:#x}, not the {flat.USER_CS:#x} loaded (the host's own "
                     "user code selector shows through)")


EXCEPTION_CASES: tuple[tuple[int, str, bytes], ...] = (
    (0, "div by zero", b"\x31\xc9"            # xor ecx, ecx
                       b"\xf7\xf1"),          # div ecx
    (6, "ud2", b"\x0f\x0b"),                  # ud2
    (13, "hlt", b"\xf4"),                     # hlt (privileged: #GP in CPL3)
    (14, "write to an unmapped page", b"\xc6\x04\x25\x00\x00\x00\x40\x01"),  # mov byte [0x40000000], 1
)


def probe_exceptions_cpl3(quick: bool) -> ProbeItem:
    """Faults raised by CPL3 instructions reach their guest IDT handler, in kernel mode."""
    good, bad = [], []
    for vector, what, insn in EXCEPTION_CASES:
        ok = 0x40 | vector
        with _Guest(insn + exit_with(NOT_REACHED), cpl=3, handlers={vector: kernel_handler(ok)}) as g:
            o = g.run(1.0)
        status, phrase = _classify(o, ok=ok)
        label = f"{_vector_name(vector)} ({what})"
        if status == WORKS:
            good.append(label)
        else:
            bad.append(f"{label} {phrase}")
    if not bad:
        return ProbeItem("exceptions_cpl3", WORKS, True, float(len(good)), "vectors",
                         f"CPL3 faults reach their guest IDT handlers in kernel mode: {', '.join(good)}")
    return ProbeItem("exceptions_cpl3", BROKEN, False, float(len(good)), "vectors",
                     f"CPL3 faults: {'; '.join(bad)}" + (f" (working: {', '.join(good)})" if good else ""))


def probe_int3_cpl0(quick: bool) -> ProbeItem:
    code = (
        b"\xcc"                     # int3
        + exit_with(NOT_REACHED)
    )
    return _binary_probe("int3_cpl0", "`int3` in CPL0", code, cpl=0, handlers={3: exit_with(OK)})


def probe_xrstor_cpl0(quick: bool) -> ProbeItem:
    code = (
        b"\x31\xd2"                 # xor edx, edx
        b"\xb8\x03\x00\x00\x00"     # mov eax, 3                 (RFBM = x87 | SSE)
        b"\x0f\xae\x2c\x25" + DATA_ADDR.to_bytes(4, "little")   # xrstor [DATA_ADDR]   (a zeroed area)
        + exit_with(OK)
    )
    return _binary_probe("xrstor_cpl0", "`xrstor` in CPL0 (CR4.OSXSAVE, XCR0 = 3)", code, cpl=0, xcr0=3)


BREAKPOINT_CODE = (
    b"\x90"                         # nop
    b"\xcc"                         # int3
    + exit_with(NOT_REACHED)
)


def _debug_pc(o: _Outcome) -> int:
    """The pc of a debug stop, from its StopEvent detail ("pc=0x... dr6=..."); -1 for other outcomes."""
    if o.kind != "debug":
        return -1
    for word in o.detail.split():
        if word.startswith("pc="):
            return int(word[3:], 16)
    return -1


def probe_sw_breakpoints(quick: bool) -> ProbeItem:
    name, what = "sw_breakpoints", "KVM_SET_GUEST_DEBUG(USE_SW_BP), then `int3` in CPL3"
    with _Guest(BREAKPOINT_CODE, cpl=3, handlers={3: exit_with(GUEST_HANDLER)}) as g:
        g.set_guest_debug(c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_SW_BP)
        o = g.run(1.0)
        pc = _debug_pc(o)
        bp = g.layout.entry + 1
    if o.kind == "debug":
        if pc == bp:
            return ProbeItem(name, WORKS, True, None, "", f"{what} gives KVM_EXIT_DEBUG at the breakpoint")
        return ProbeItem(name, BROKEN, False, None, "",
                         f"{what} gives KVM_EXIT_DEBUG at pc {pc:#x}, not at the breakpoint {bp:#x}")
    if o.kind == "exit" and o.status == GUEST_HANDLER:
        return ProbeItem(name, IGNORED, False, None, "", f"{what}: the guest's #BP handler ran, no debug exit")
    status, phrase = _classify(o)
    return ProbeItem(name, status, False, None, "", f"{what} {phrase}")


STEP_CODE = (
    b"\x90"                         # nop
    b"\x90"                         # nop
    b"\x90"                         # nop      <- DR0 for the hardware breakpoint probe
    + exit_with(OK)
)


def _debug_outcome(cpl: int, control: int, debugregs: Sequence[int], want_pc_offset: int) -> tuple[str, str]:
    """Run STEP_CODE in `cpl` under KVM_SET_GUEST_DEBUG(control); (works | ignored | guest-trap | ..., phrase)."""
    with _Guest(STEP_CODE, cpl=cpl) as g:
        want = g.layout.entry + want_pc_offset
        regs = [want if i == 0 and r == -1 else r for i, r in enumerate(debugregs)]
        g.set_guest_debug(c.KVM_GUESTDBG_ENABLE | control, regs)
        o = g.run(1.0)
        pc = _debug_pc(o)
    if o.kind == "debug":
        if pc == want:
            return WORKS, "gives KVM_EXIT_DEBUG at the expected pc"
        stubs = flat.STUBS_ADDR
        if stubs <= pc < stubs + 256 * flat.STUB_SIZE:
            v = (pc - stubs) // flat.STUB_SIZE
            return GUEST_TRAP, (f"raises {_vector_name(v)} in the guest (its vector {v} handler ran) instead of "
                                f"exiting; KVM_EXIT_DEBUG came only inside that CPL0 handler (pc {pc:#x})")
        return BROKEN, f"gives KVM_EXIT_DEBUG at pc {pc:#x}, expected {want:#x}"
    if o.kind == "exit" and o.status == OK:
        return IGNORED, "is ignored: the guest ran on to its exit"
    return _classify(o)


def _debug_probe(name: str, what: str, control: int, debugregs: Sequence[int], want_pc_offset: int) -> ProbeItem:
    user, user_phrase = _debug_outcome(3, control, debugregs, want_pc_offset)
    if user == WORKS:
        return ProbeItem(name, WORKS, True, None, "", f"{what} in CPL3 {user_phrase}")
    kernel, kernel_phrase = _debug_outcome(0, control, debugregs, want_pc_offset)
    if kernel == WORKS:
        return ProbeItem(name, CPL0_ONLY, False, None, "",
                         f"{what} in CPL3 {user_phrase}; in (emulated) CPL0 it works")
    return ProbeItem(name, user, False, None, "", f"{what} in CPL3 {user_phrase}; in CPL0 it {kernel_phrase}")


def probe_single_step(quick: bool) -> ProbeItem:
    return _debug_probe("single_step", "KVM_SET_GUEST_DEBUG(SINGLESTEP)", c.KVM_GUESTDBG_SINGLESTEP, (), 1)


def probe_hw_breakpoints(quick: bool) -> ProbeItem:
    dr7 = 0x1                       # L0: DR0 enabled, break on execution, length 1
    return _debug_probe("hw_breakpoints", "KVM_SET_GUEST_DEBUG(USE_HW_BP) with DR0 on an instruction",
                        c.KVM_GUESTDBG_USE_HW_BP, (-1, 0, 0, 0, 0, 0, 0, dr7), 2)


TIMER_VECTOR = 0x20
TIMER_PERIOD_NS = 1_000_000


def probe_lapic_timer(quick: bool) -> ProbeItem:
    name = "lapic_timer"
    ticks = 10 if quick else 30
    counter = DATA_ADDR
    code = (
        b"\x48\x83\x3c\x25" + counter.to_bytes(4, "little") + bytes((ticks,))  # l: cmp qword [counter], ticks
        + b"\x72\xf5"                                                          #    jb l
        + exit_with(OK)
    )
    with _Guest(code, cpl=3, interrupts=True, x2apic=True,
                handlers={TIMER_VECTOR: flat.x2apic_eoi_iretq(counter)}) as g:
        flat.start_lapic_timer(g.m, vector=TIMER_VECTOR, period_ns=TIMER_PERIOD_NS)
        timeout = ticks * TIMER_PERIOD_NS / 1e9 * 5 + 0.1
        o = g.run(timeout)
        seen = g.read_u64(counter)
    ms = o.elapsed * 1000
    what = f"x2APIC periodic timer (vector {TIMER_VECTOR:#x}, {TIMER_PERIOD_NS / 1e6:g} ms) over a CPL3 loop"
    if o.kind == "exit" and o.status == OK:
        return ProbeItem(name, WORKS, True, float(seen), "ticks",
                         f"{what}: {seen} ticks in {ms:.0f} ms, each acknowledged with wrmsr(0x80b)")
    if o.kind == "timeout":
        if seen == 0:
            detail = f"{what}: no tick in {ms:.0f} ms"
        elif seen == 1:
            detail = f"{what}: one tick in {ms:.0f} ms, then none (EOI through wrmsr(0x80b) did not work?)"
        else:
            detail = f"{what}: only {seen} ticks in {ms:.0f} ms"
        return ProbeItem(name, BROKEN, False, float(seen), "ticks", detail)
    status, phrase = _classify(o)
    return ProbeItem(name, status, False, float(seen), "ticks", f"{what}: the guest {phrase}")


DIRTY_TARGETS = (DATA_ADDR, DATA_ADDR + 0x1000, DATA_ADDR + 0x5000, DATA_ADDR + 0x40000, 0x400000, 0x5FF000)
DIRTY_READ_ONLY = 0x700000          # read, never written, in a 2 MiB page the guest never writes


def _dirty_run(code: bytes, *, preset_dirty: bool) -> tuple[_Outcome, set[int]]:
    """Run `code` (CPL3) with dirty logging on the RAM slot; returns the outcome and the pages KVM reported."""
    with _Guest(code, cpl=3, preset_dirty=preset_dirty) as g:
        mem = g.m.memory
        slot = mem.slots[0]
        bitmap = (ctypes.c_uint64 * (((slot.size >> 12) + 63) // 64))()
        g.m.vm.set_user_memory_region(slot.index, slot.gpa, slot.size, mem.host_addr + slot.offset,
                                      c.KVM_MEM_LOG_DIRTY_PAGES)
        g.m.vm.get_dirty_log(slot.index, ctypes.addressof(bitmap))      # start from a clean log
        ctypes.memset(bitmap, 0, ctypes.sizeof(bitmap))
        o = g.run(1.0)
        g.m.vm.get_dirty_log(slot.index, ctypes.addressof(bitmap))
    reported = {slot.gpa + ((w * 64 + b) << 12) for w, word in enumerate(bitmap) if word
                for b in range(64) if word >> b & 1}
    return o, reported


def _pages(p: set[int]) -> str:
    return ", ".join(f"{a:#x}" for a in sorted(p)[:8]) + (" ..." if len(p) > 8 else "")


def probe_dirty_logging(quick: bool) -> ProbeItem:
    """A CPL3 guest writes DIRTY_TARGETS and reads another page, through PTEs with clear dirty bits: the log must
    hold exactly the written pages plus the page directory (the CPU's own dirty-bit writes)."""
    name = "dirty_logging"
    code = b"".join(
        b"\xc6\x04\x25" + gpa.to_bytes(4, "little") + b"\x01"     # mov byte [gpa], 1
        for gpa in DIRTY_TARGETS
    ) + (
        b"\x8a\x04\x25" + DIRTY_READ_ONLY.to_bytes(4, "little")   # mov al, [DIRTY_READ_ONLY]
        + exit_with(OK)
    )
    o, reported = _dirty_run(code, preset_dirty=False)
    if not (o.kind == "exit" and o.status == OK):
        status, phrase = _classify(o)
        return ProbeItem(name, status, False, None, "", f"the dirty-logging guest {phrase}")
    wanted = set(DIRTY_TARGETS)
    allowed = wanted | {flat.PD_ADDR}
    what = f"KVM_GET_DIRTY_LOG after a CPL3 guest wrote {len(wanted)} pages"
    if wanted <= reported <= allowed:
        tables = " (and the page directory, whose dirty bits the CPU set)" if flat.PD_ADDR in reported else ""
        return ProbeItem(name, WORKS, True, float(len(reported)), "pages",
                         f"{what} reports exactly those{tables}")
    parts = []
    if wanted - reported:
        parts.append(f"missing {_pages(wanted - reported)}")
    if reported - allowed:
        parts.append(f"extra {_pages(reported - allowed)}")
    return ProbeItem(name, BROKEN, False, float(len(reported)), "pages", f"{what}: {'; '.join(parts)}")


def probe_dirty_log_reads(quick: bool) -> ProbeItem:
    """A CPL3 guest only reads a page, through PTEs whose dirty bit is already set: is the page logged as dirty?"""
    name = "dirty_log_reads"
    code = (
        b"\x8a\x04\x25" + DIRTY_READ_ONLY.to_bytes(4, "little")   # mov al, [DIRTY_READ_ONLY]
        + exit_with(OK)
    )
    o, reported = _dirty_run(code, preset_dirty=True)
    if not (o.kind == "exit" and o.status == OK):
        status, phrase = _classify(o)
        return ProbeItem(name, status, False, None, "", f"the dirty-logging guest {phrase}")
    what = "pages only read or executed through PTEs with the dirty bit set"
    if not reported:
        return ProbeItem(name, "exact", True, 0.0, "pages", f"{what} stay out of the dirty log")
    return ProbeItem(name, "over-reports", False, float(len(reported)), "pages",
                     f"{what} are logged as dirty ({_pages(reported)}: shadow paging maps them writable at first "
                     "touch), so a fork reset copies every page a guest kernel merely read")


def probe_exit_cost(quick: bool) -> ProbeItem:
    n = 500 if quick else 2000
    code = (
        b"\xe6\x80"                 # l: out 0x80, al      (a port no device answers)
        b"\xff\xc9"                 #    dec ecx
        b"\x75\xfa"                 #    jnz l
        + exit_with(OK)
    )
    with _Guest(code, cpl=3) as g:
        g.restart(rcx=n)
        o = g.run(5.0)
        left = g.vcpu.get_regs().rcx & 0xFFFFFFFF if o.kind == "timeout" else 0
        if o.kind not in ("exit", "timeout") or (o.kind == "exit" and o.status != OK):
            raise VmforkError(f"the port I/O loop {_classify(o)[1]}")
        exits = g.m.exits
    done = max(n - left, 1)
    us = o.elapsed / done * 1e6
    return ProbeItem("exit_cost", MEASURED, True, us, "µs/exit",
                     f"a port I/O exit handled by vmfork's Python loop costs {us:.0f} µs ({exits} exits measured)")


PMI_OK = 0x2B                     # the counter-overflow interrupt's handler ran
PMU_VECTOR = 0xF0
PMU_LOOP = 1_000_000              # COUNT_LOOP iterations: 2,000,001 instructions to the exit
PMU_OVERFLOW_AFTER = 100_000      # instructions before the preloaded counter overflows


def _pmu_hint() -> str:
    from .fuzz.pmu import enable_pmu_param
    param = enable_pmu_param()
    return f" (the host's kvm.enable_pmu is {param})" if param is not None else ""


def _pmu_count(layout: Any) -> int:
    """Retired instructions counter 0 saw over COUNT_LOOP in CPL3, read back by the host."""
    from .fuzz.pmu import msr_values, read_msrs, write_msrs
    with _Guest(COUNT_LOOP, cpl=3) as g:
        g.restart(rcx=PMU_LOOP)
        write_msrs(g.vcpu.fd, msr_values(layout, preload=0, interrupt=False))
        o = g.run(2.0)
        if not (o.kind == "exit" and o.status == OK):
            raise VmforkError(f"the counted loop {_classify(o)[1]}")
        return read_msrs(g.vcpu.fd, [layout.counter])[layout.counter]


def _pmu_interrupts(layout: Any) -> _Outcome:
    """COUNT_LOOP with counter 0 preloaded to overflow early and its interrupt routed to a handler."""
    from .fuzz.pmu import msr_values, set_lvtpc, write_msrs
    with _Guest(COUNT_LOOP, cpl=3, interrupts=True, handlers={PMU_VECTOR: exit_with(PMI_OK)}) as g:
        g.restart(rcx=PMU_LOOP, interrupts=True)
        set_lvtpc(g.vcpu.fd, PMU_VECTOR)
        write_msrs(g.vcpu.fd, msr_values(layout, preload=-PMU_OVERFLOW_AFTER, interrupt=True))
        return g.run(2.0)


def probe_vpmu(quick: bool) -> ProbeItem:
    """A virtual PMU that counts the guest's retired instructions and interrupts it on overflow (what `vmfork fuzz
    --budget-instructions` needs): the VMM's CPUID, then a counted CPL3 loop, then an overflow interrupt."""
    from .arch.x86 import cpu
    from .fuzz.pmu import PmuError, detect
    from .vm import open_kvm
    name = "vpmu"
    cpuid: Any = cpu.vcpu_cpuid(open_kvm(), 0)
    layout = detect(cpuid.entries[:cpuid.nent])
    if isinstance(layout, str):
        return ProbeItem(name, ABSENT, False, None, "", f"no virtual PMU: {layout}{_pmu_hint()}")
    what = f"counter 0 ({layout.describe()}) over {2 * PMU_LOOP + 1:,} guest instructions in CPL3"
    try:
        counted = _pmu_count(layout)
    except PmuError as e:
        return ProbeItem(name, ABSENT, False, None, "", f"no virtual PMU: {e}{_pmu_hint()}")
    expected = 2 * PMU_LOOP + 1
    if counted == 0:
        return ProbeItem(name, IGNORED, False, 0.0, "instr",
                         f"no virtual PMU: {what} stayed 0, its MSRs accepted and ignored{_pmu_hint()}")
    if not 0.95 * expected <= counted <= 1.05 * expected + 1000:
        return ProbeItem(name, BROKEN, False, float(counted), "instr", f"{what} counted {counted:,}")
    o = _pmu_interrupts(layout)
    if o.kind == "exit" and o.status == PMI_OK:
        return ProbeItem(name, WORKS, True, float(counted), "instr",
                         f"{what} counted {counted:,}; its overflow interrupt reaches the guest (LVTPC)")
    phrase = _classify(o)[1]
    return ProbeItem(name, BROKEN, False, float(counted), "instr",
                     f"{what} counted {counted:,}, but with its overflow interrupt on, the guest {phrase}")


# --- instructions in guest kernel mode and the default CPUID policy (arch/x86/emulator_probe.py) ----------------------

def probe_cpl0_instructions(quick: bool) -> ProbeItem:
    """Which instruction families this host's KVM cannot run in CPL0 (one tiny guest per family), measured afresh
    (this also refreshes the cached result new machines take their default CPUID policy from)."""
    from .arch.x86 import emulator_probe
    from .vm import open_kvm
    report = emulator_probe.report(open_kvm(), fresh=True)
    failing = report.failing
    families = {f.name: f for f in emulator_probe.FAMILIES}
    absent_failing = [r.name for r in report.results if r.status == emulator_probe.ABSENT
                      and "in CPL0 runs" not in r.detail and "in CPL0" in r.detail]
    tail = (f"; KVM does not offer (so hides) {', '.join(absent_failing)}, which would fail too"
            if absent_failing else "")
    if not failing:
        return ProbeItem("cpl0_instructions", WORKS, True, 0.0, "families",
                         f"guest kernel mode runs every probed instruction family ({len(report.results)}){tail}")
    parts = [f"{r.name} ({families[r.name].what.split(' (')[0]}: {r.status})" for r in failing]
    return ProbeItem("cpl0_instructions", EMULATION_FAILURE, False, float(len(failing)), "families",
                     f"in guest kernel mode this host's KVM cannot run {', '.join(parts)}{tail}")


def probe_cpuid_default(quick: bool) -> ProbeItem:
    """The default CPUID policy new machines get here (from the cpl0_instructions probe)."""
    from .arch.x86 import emulator_probe
    from .vm import open_kvm
    kvm = open_kvm()
    report = emulator_probe.report(kvm)
    policy = report.default_policy()
    unhideable = report.unhideable
    note = (f"; no CPUID bit hides {', '.join(unhideable)} (baseline instructions: they need fallbacks)"
            if unhideable else "")
    if report.leaks:
        note += f"; hiding {', '.join(report.leaks)} has no effect here"
    status = "host" if not policy.settings else "hides"
    return ProbeItem("cpuid_default", status, not policy.settings, float(len(policy.hidden)), "features",
                     f"{emulator_probe.describe_default(kvm)}: \"{policy}\"{note}")


def probe_tsc_deadline(quick: bool) -> ProbeItem:
    """Whether guests may use the LAPIC's TSC-deadline timer here (emulator_probe.probe_tsc_deadline): its interrupt
    arrives on time, and guest kernel mode is fast enough for a periodic tick driven by a one-shot timer; where not,
    the default CPUID policy hides `tsc-deadline`."""
    from .arch.x86 import emulator_probe
    from .vm import open_kvm
    r = emulator_probe.report(open_kvm()).result(emulator_probe.TIMER)
    hidden = r.fails
    return ProbeItem("tsc_deadline", r.status, not hidden, None, "",
                     f"{r.detail}{'; the default CPUID policy hides tsc-deadline' if hidden else ''}")


Probe = Callable[[bool], ProbeItem]

PROBES: dict[str, tuple[str, Probe]] = {
    "cpl3_speed": ("guest user mode runs natively", probe_cpl3_speed),
    "cpl0_speed": ("guest kernel mode runs natively", probe_cpl0_speed),
    "iopl_cpl3": ("IOPL 3 gives CPL3 port I/O", probe_iopl_cpl3),
    "syscall_cpl3": ("syscall from CPL3", probe_syscall_cpl3),
    "int_n_cpl3": ("int 0x80 from CPL3", probe_int_n_cpl3),
    "int3_cpl3": ("int3 from CPL3 reaches the guest IDT", probe_int3_cpl3),
    "selectors_cpl3": ("CPL3 reads back the code selector it runs with", probe_selectors_cpl3),
    "exceptions_cpl3": ("#DE, #UD, #GP, #PF from CPL3 reach the guest IDT", probe_exceptions_cpl3),
    "int3_cpl0": ("int3 in CPL0", probe_int3_cpl0),
    "xrstor_cpl0": ("xrstor in CPL0", probe_xrstor_cpl0),
    "sw_breakpoints": ("KVM software breakpoints", probe_sw_breakpoints),
    "single_step": ("KVM single-step", probe_single_step),
    "hw_breakpoints": ("KVM hardware breakpoints", probe_hw_breakpoints),
    "lapic_timer": ("x2APIC timer interrupts a CPL3 loop", probe_lapic_timer),
    "dirty_logging": ("KVM dirty logging reports guest writes exactly", probe_dirty_logging),
    "dirty_log_reads": ("pages only read stay out of the dirty log", probe_dirty_log_reads),
    "exit_cost": ("cost of a port I/O exit handled in Python", probe_exit_cost),
    "vpmu": ("a virtual PMU counts guest instructions and interrupts on overflow", probe_vpmu),
    "cpl0_instructions": ("guest kernel mode runs every probed instruction family", probe_cpl0_instructions),
    "cpuid_default": ("the default CPUID policy shows the host's whole CPU", probe_cpuid_default),
    "tsc_deadline": ("guests may use the TSC-deadline timer", probe_tsc_deadline),
}
"""Probe name -> (what it checks, function). The report lists the probes in this order."""


# --- host identity and caching --------------------------------------------------------------------------------------


def _vmfork_version() -> str:
    try:
        from importlib.metadata import version
        return version("vmfork")
    except Exception:
        return "unknown"


def _cache_key() -> dict[str, str]:
    return {"kernel": platform.release(), "cpu": cpu_model(), "vmfork": _vmfork_version()}


def cache_path() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/vmfork/doctor.json`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmfork" / "doctor.json"


def _load_cached(quick: bool) -> HostReport | None:
    try:
        data = _json.loads(cache_path().read_text(encoding="utf-8"))
        if data.get("key") != _cache_key():
            return None
        report = HostReport.from_dict(data["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= time.time() - report.created < CACHE_TTL:
        return None
    if set(report.names) != set(PROBES):
        return None         # measured by a vmfork with other probes
    if report.quick and not quick:
        return None
    return report


def _store_cached(report: HostReport) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".doctor-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _json.dump({"key": _cache_key(), "report": report.to_dict()}, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


_process_cache: dict[bool, HostReport] = {}


# --- entry points ---------------------------------------------------------------------------------------------------


def _run_probes(quick: bool, names: Sequence[str] | None = None) -> Iterator[ProbeItem]:
    for name, (_, fn) in PROBES.items():
        if names is not None and name not in names:
            continue
        try:
            item = fn(quick)
        except Exception as e:  # one failing probe never stops the report
            item = ProbeItem(name, ERROR, False, None, "", f"the {name} probe failed: {type(e).__name__}: {e}")
        yield item


def probe_host(*, quick: bool = False, cached: bool = False) -> HostReport:
    """Measure this host's KVM (about a second; `quick` shortens the timing loops).

    With `cached=True` a report measured earlier in this process, or stored in the cache file within the last day
    for the same kernel, CPU and vmfork version, is returned instead (a full report also answers a quick request;
    of two in this process the newer). A fresh measurement refreshes both caches; a stored report that lacks one
    of today's probes is measured again.
    """
    if cached:
        # the newest answer this process has: a quick measurement made after a full one was read wins
        hits = [r for r in (_process_cache.get(False), _process_cache.get(True) if quick else None) if r is not None]
        if hits:
            return max(hits, key=lambda r: r.created)
        stored = _load_cached(quick)
        if stored is not None:
            _process_cache[quick] = stored
            return stored
    key = _cache_key()
    t0 = time.perf_counter()
    created = time.time()
    try:
        from .vm import open_kvm
        open_kvm()
    except VmforkError as e:
        items = tuple(ProbeItem(name, UNAVAILABLE, False, None, "", str(e)) for name in PROBES)
        return HostReport(items, key["kernel"], key["cpu"], key["vmfork"], created, time.perf_counter() - t0, quick)
    items = tuple(_run_probes(quick))
    report = HostReport(items, key["kernel"], key["cpu"], key["vmfork"], created, time.perf_counter() - t0, quick)
    _process_cache[quick] = report
    _store_cached(report)
    return report


# --- host workarounds and the Linux boot time ------------------------------------------------------------------------

# A guest that needs each instruction fallback, run with vmfork's workarounds on: (code, handlers, flat options)
_DATA32 = DATA_ADDR.to_bytes(4, "little")
_FALLBACK_CHECKS: dict[str, tuple[bytes, dict[int, bytes], dict[str, Any]]] = {
    "int3-cpl0": (b"\xcc" + exit_with(NOT_REACHED), {3: exit_with(OK)}, {}),
    "fwait-cpl0": (b"\xdb\xe3\x9b" + exit_with(OK), {}, {}),                 # fninit; fwait
    "clac-stac-cpl0": (b"\x0f\x01\xcb\x0f\x01\xca" + exit_with(OK), {}, {}),   # stac; clac
    "popcnt-cpl0": (b"\xf3\x48\x0f\xb8\xc0" + exit_with(OK), {}, {}),          # popcnt rax, rax
    "cmpxchg16b-cpl0": (b"\xf0\x48\x0f\xc7\x0c\x25" + _DATA32 + exit_with(OK), {}, {}),   # lock cmpxchg16b [data]
    "xsave-cpl0": (b"\xb8\x03\x00\x00\x00\x31\xd2\x0f\xae\x24\x25" + _DATA32      # xsave [data] (x87, SSE)
                   + b"\x0f\xae\x2c\x25" + _DATA32 + exit_with(OK), {}, {"xcr0": 3}),  # xrstor [data]
}


def check_workarounds(report: HostReport) -> list[dict[str, Any]]:
    """Every host workaround (vmfork.workarounds.CATALOG): whether this host needs it (its probe), and for the
    instruction fallbacks a tiny guest run with it on, with how many instructions the fallback completed there."""
    from .vm import Machine
    from .workarounds import CATALOG
    rows = []
    for w in CATALOG.values():
        row: dict[str, Any] = {"name": w.name, "what": w.what, "probe": w.probe}
        if w.probe in report.names:
            it = report.item(w.probe)
            row["needed"] = it.status not in (WORKS, NATIVE, UNAVAILABLE)
            row["probe_status"] = it.status
        if w.name == "syscall-completion":
            row["installed"] = stays_in_user_mode(Machine)
        check = _FALLBACK_CHECKS.get(w.name)
        if check is not None and not all(it.status == UNAVAILABLE for it in report.items):
            code, handlers, options = check
            try:
                with _Guest(code, cpl=0, handlers=handlers, workarounds=True, **options) as g:
                    o = g.run(2.0)
                    ws = g.m.workarounds
                    row["count"] = ws.counts().get(w.name, 0) if ws is not None else 0
                status, phrase = _classify(o)
                row["check"] = "works" if status == WORKS else phrase
                row.setdefault("needed", row["count"] > 0)     # no probe of its own: the check tells
            except Exception as e:  # a failing check never stops the report
                row["check"] = f"error: {type(e).__name__}: {e}"
        rows.append(row)
    return rows


def linux_boot_path() -> Path:
    """Where bench/linux.py leaves its latest measurement of a Linux boot to the shell on this host."""
    return cache_path().parent / "linux-boot.json"


def linux_boot_line() -> str:
    """One line: how long a Linux boot to the shell takes here, as bench/linux.py last measured it."""
    try:
        d = _json.loads(linux_boot_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "Linux boot to the shell: not measured on this host yet (run bench/linux.py)"
    if d.get("host") != _cache_key()["kernel"]:
        return (f"Linux boot to the shell: measured under another host kernel ({d.get('host')}); "
                "run bench/linux.py again")
    if d.get("prompt_s") is None:
        return (f"Linux boot to the shell: {d.get('kernel', '?')} did not reach the prompt within "
                f"{d.get('limit_s', 0):.0f} s ({d.get('stop', '?')}; bench/linux.py, {d.get('date', '?')})")
    return (f"Linux boot to the shell: {d['prompt_s']:.0f} s to the prompt, {d.get('answer_s', 0):.0f} s to the "
            f"answer of a command, {d.get('kernel', '?')} ({d.get('release', '?')}; bench/linux.py, "
            f"{d.get('date', '?')})")


def _workaround_text(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["", "host workarounds (vmfork.workarounds):"]
    for r in rows:
        need = ("needed here" if r.get("needed") else "not needed here") if "needed" in r else ""
        if "probe_status" in r:
            need += f" ({r['probe']} = {r['probe_status']})"
        parts = [p for p in (need.strip(),
                             ("installed" if r["installed"] else "not installed") if "installed" in r else "",
                             f"check: {r['check']}, {r.get('count', 0)} completed" if "check" in r else "") if p]
        lines.append(f"  {r['name']:<20} {r['what']}")
        if parts:
            lines.append(f"  {'':<20} {'; '.join(parts)}")
    return "\n".join(lines)


def run_doctor(json: bool = False, *, quick: bool = False, cached: bool = False) -> int:
    """`vmfork doctor [--json]`: print the report; 0 when the probes ran, 1 when /dev/kvm is unusable."""
    report = probe_host(quick=quick, cached=cached)
    unusable = all(it.status == UNAVAILABLE for it in report.items)
    rows = [] if unusable else check_workarounds(report)
    boot = linux_boot_line()
    if json:
        d = report.to_dict()
        d["workarounds"] = rows
        d["linux_boot"] = boot
        print(_json.dumps(d, indent=2, ensure_ascii=False))
    else:
        print(report.table())
        if rows:
            print(_workaround_text(rows))
        print("\n" + boot)
    return 1 if unusable else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmfork doctor", description="Measure what this host's KVM supports.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--cached", action="store_true", help="reuse a report measured within the last day")
    args = parser.parse_args(argv)
    return run_doctor(args.json, quick=args.quick, cached=args.cached)


if __name__ == "__main__":
    sys.exit(main())
