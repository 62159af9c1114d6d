"""The fuzzing loop, KF/x style: parent (paused at its start marker) -> sink fork (crash breakpoints, end
breakpoints, coverage breakpoints) -> fuzz fork; per input: reset, write the input, run to an end marker, a sink, a
fault or the time or instruction budget, classify.

    parent.run(timeout=10)                    # -> StopEvent("harness-start"): RDI/RSI = input buffer and size
    fz = Fuzzer(parent, sinks=[0x10a4d5], coverage=[(start, end)], budget_s=0.05)
    fz.execute(b"FUZZB\\x01")                  # Result(outcome="crash", kind="vector", vector=14, rip=...)
    stats = fz.fuzz([b"FUZZA\\x00"], seconds=10, rng_seed=1, out_dir="out")
    fz.close()

A parent paused at another kind of start marker (int3 markers, a start breakpoint: `harness.run_to_start`) is
fuzzed the same way, with `int3_markers=True` or `ends=[...]` saying what ends an input.

Outcomes: "ok" (an end marker or end breakpoint, or an exit status below 0x80), "crash" (a sink breakpoint; a fault
caught at the guest's own handler by a hardware breakpoint (faults.py), kind "vector", signed by the faulting RIP;
an exit status >= 0x80, the test guests' convention for "exception vector = status & 0x7f"; a triple fault, kind
"triple-fault" (KVM_EXIT_SHUTDOWN); a guest reset, a KVM internal error or another fatal stop), "hang" (the time
budget ran out, kind "timeout", in a run that reached no new coverage block and was not a new fork's first: those
are run again, since their time went partly to vmfork; the instruction budget ran out, kind "instructions"),
"rejected" (an input larger than the buffer with `oversize="reject"`). Crashes carry the vCPU's general registers
and (`system`) its control registers, EFER and descriptor tables at the stop.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..kvm import constants as c
from ..kvm import structs as s
from ..vm import RING_OVERFLOW
from ..vmi import Debugger, Hit, debugger
from ..vmi.symbols import SymbolTable
from .coverage import Coverage
from .errors import FuzzError
from .faults import Fault, FaultHandlers, FaultTrap
from .harness import int3_end_marker
from .inputbuf import InputBuffer
from .mutate import Mutator
from .pmu import InstructionBudget
from .traps import ForkTraps

__all__ = ["CampaignSync", "FuzzError", "Fuzzer", "Result", "Stats"]

_EXCEPTION = re.compile(rb"EXCEPTION vec=(\d+) rip=0x([0-9a-f]+) err=0x([0-9a-f]+)")


@dataclass
class Result:
    """What one input did. `rip` is the faulting instruction (vector crashes: from the exception frame at the
    guest's handler, or the guest's `EXCEPTION vec=.. rip=..` report on the console, else the vCPU's RIP at the
    stop), the sink's address, or where a hang was stopped. `registers`: at a sink, the interrupted code's; for a
    fault caught at the guest's handler, the faulting code's (with `error_code` and, for #PF, `cr2`); for a vector
    crash the guest reported or a triple fault, the vCPU's at the stop."""

    outcome: str                        # ok, crash, hang, rejected
    kind: str                           # end, exit, vector, sink, triple-fault, <stop reason>, timeout, oversize
    status: int | None = None
    vector: int | None = None
    sink: str | None = None
    rip: int | None = None
    error_code: int | None = None
    registers: dict[str, int] | None = None
    system: dict[str, int] | None = None
    detail: str = ""
    new_blocks: list[int] = field(default_factory=list)
    cr2: int | None = None

    @property
    def signature(self) -> tuple[str, str, int | None]:
        """Crashes with the same signature are the same bug (for saving one input per crash)."""
        what = self.sink or (str(self.vector) if self.vector is not None else "")
        return (self.kind, what, self.rip)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["new_blocks"] = len(self.new_blocks)
        if self.rip is not None:
            d["rip_hex"] = f"{self.rip:#x}"
        return d


_OK = Result("ok", "end", 2)
_LEN64 = struct.Struct("<Q").pack          # the len64 input format's prefix


@dataclass
class Stats:
    execs: int = 0
    ok: int = 0
    crashes: int = 0
    hangs: int = 0
    rejected: int = 0
    unique_crashes: int = 0
    corpus: int = 0
    blocks_hit: int = 0
    blocks_total: int = 0
    elapsed_s: float = 0.0
    reset_s: float = 0.0
    first_crash_s: float | None = None
    first_crash_execs: int | None = None
    crash_files: list[str] = field(default_factory=list)

    @property
    def execs_per_s(self) -> float:
        return self.execs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def reset_share(self) -> float:
        return self.reset_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        cov = f"  cov {self.blocks_hit}/{self.blocks_total}" if self.blocks_total else ""
        return (f"[{self.elapsed_s:7.1f}s] execs {self.execs}  {self.execs_per_s:6.0f}/s  corpus {self.corpus}"
                f"{cov}  crashes {self.crashes} ({self.unique_crashes} unique)  hangs {self.hangs}")


class CampaignSync(Protocol):
    """How one process of a campaign on several cores (`vmfork fuzz --jobs N`, fuzz/jobs.py) shares it with the
    others. Without one, `Fuzzer.fuzz` is a campaign of its own, as it always was."""

    def begin(self, start: float, corpus: Sequence[bytes]) -> None:
        """The loop starts (time.monotonic() `start`) from this corpus (the seeds)."""

    def tick(self, st: Stats, now: float) -> list[bytes] | None:
        """A look at the clock (every 32 inputs, sooner after an interesting one): publish `st`; None stops this
        process's loop (the campaign is over), else inputs other processes found, to run next."""

    def add(self, data: bytes, src: int) -> None:
        """`data` joined this process's corpus: share it (unless it came from another process). `src`: the index
        in the corpus of the input it was mutated from (-1 for a seed or an input from `tick`)."""

    def claim(self, signature: tuple[str, str, int | None]) -> bool:
        """A crash with this signature, new to this process: True if no other process saved it first (then this
        one saves it)."""

    def crashed(self) -> None:
        """A crash, with stop_on_crash: stop the whole campaign."""


def _registers(regs: s.Regs) -> dict[str, int]:
    return {name: int(getattr(regs, name)) for name in s.GPR_NAMES}


def _system(sregs: s.Sregs) -> dict[str, int]:
    """What a crash report needs of the system registers: paging, mode, privilege and the descriptor tables (an
    IDT limit of 0 is how the test guest triple-faults)."""
    return {"cr0": int(sregs.cr0), "cr2": int(sregs.cr2), "cr3": int(sregs.cr3), "cr4": int(sregs.cr4),
            "efer": int(sregs.efer), "cs": int(sregs.cs.selector), "ss": int(sregs.ss.selector),
            "cpl": int(sregs.cs.selector & 3), "idt_base": int(sregs.idt.base), "idt_limit": int(sregs.idt.limit),
            "gdt_base": int(sregs.gdt.base), "gdt_limit": int(sregs.gdt.limit)}


_EXIT_KINDS = {c.KVM_EXIT_SHUTDOWN: "triple-fault", c.KVM_EXIT_INTERNAL_ERROR: "internal-error"}


class Fuzzer:
    """Fuzzes a parent VM paused at its start marker. `input_addr`/`input_size` default to RDI/RSI there (the
    harness port's and the int3 markers' convention; the first two arguments at a start breakpoint on a SysV
    function). `sinks`: addresses or symbols (with `symbols`) that are crashes when reached. `ends`: addresses or
    symbols that end an input like the end marker (end breakpoints). `int3_markers`: the target marks its end with
    KF/x's int3 + RAX = 0x13371338 (vmfork.fuzz.harness). `coverage`: a `Coverage`, or (start, end) code ranges to
    cover by basic blocks. `budget_s`: time per input. `budget_instructions`: retired instructions per input
    (needs a virtual PMU: `vmfork doctor`'s "vpmu"; vmfork.fuzz.pmu). `oversize`: "truncate" or "reject" an input
    that does not fit the buffer (with its length prefix). `block_hook`: makes the coverage breakpoints persistent
    (every hit of every block, in order, is passed to it): for AFL-style edge maps. Without it they are one-shot.
    `fast_traps`: the fuzz fork answers its breakpoints itself (traps.ForkTraps: one exit per block hit, a loop of
    one covered block seen once per entry) where it can; False runs it under its Debugger (two exits per
    persistent block hit, every hit seen).

    The input buffer (`input_addr`, or RDI) is a guest-VIRTUAL address of the vCPU at the start marker, translated
    once through its page tables (fuzz/inputbuf.py); `input_physical=True` takes it as guest-physical.
    `input_format`: "raw" (the bytes only, KF/x's way) or "len64" (a u64 length first); by default "len64" with
    vmfork's port markers and "raw" with KF/x's int3 markers or end breakpoints. `faults`: catch the fault vectors
    at the guest's own handlers (fuzz/faults.py: True for the default vectors, or a list of vectors, or False);
    a fault is a crash when its RIP lies in `fault_ranges` (default: the coverage ranges; none: every fault).
    `input_limit`: the longest input (KF/x's --input-limit). `stub_gpa`: the guest-physical page of the
    debugger's #BP stub (vmfork.vmi.breakpoints; None: its default)."""

    def __init__(self, parent: Any, input_addr: int | None = None, input_size: int | None = None, *,
                 sinks: Sequence[int | str] = (), budget_s: float = 0.05,
                 coverage: Coverage | Iterable[tuple[int, int]] | None = None, oversize: str = "truncate",
                 symbols: SymbolTable | None = None, input_format: str | None = None, input_physical: bool = False,
                 block_hook: Callable[[int], object] | None = None, ends: Sequence[int | str] = (),
                 int3_markers: bool = False, budget_instructions: int | None = None,
                 fast_traps: bool = True, faults: bool | Sequence[int] = True,
                 fault_ranges: Sequence[tuple[int, int]] | None = None, input_limit: int | None = None,
                 stub_gpa: int | None = None) -> None:
        if oversize not in ("truncate", "reject"):
            raise FuzzError(f"oversize must be 'truncate' or 'reject', not {oversize!r}")
        if parent.state != "paused":
            raise FuzzError(f"{parent.name} must be paused at its start marker (it is {parent.state})")
        layout = _budget_layout() if budget_instructions is not None else None
        regs = parent.vcpus[0].get_regs()
        self.parent = parent
        self.input_addr = int(regs.rdi if input_addr is None else input_addr)
        self.input_size = int(regs.rsi if input_size is None else input_size)
        if input_format is None:
            input_format = "raw" if int3_markers or ends else "len64"
        self.input = InputBuffer.at(parent, self.input_addr, self.input_size, format=input_format,
                                    physical=input_physical)
        self.capacity = self.input.capacity if input_limit is None else min(self.input.capacity, input_limit)
        if self.capacity <= 0:
            raise FuzzError(f"an input buffer of {self.input_size} bytes has no room for input")
        self.budget_s = budget_s
        self.oversize = oversize
        self.block_hook = block_hook
        if coverage is not None and not isinstance(coverage, Coverage):
            coverage = Coverage.of_ranges(parent, list(coverage))
        self.coverage = coverage
        if fault_ranges is None:
            fault_ranges = coverage.ranges if coverage is not None else ()
        self.fault_handlers: FaultHandlers | None = None
        if faults:
            vectors = tuple(faults) if not isinstance(faults, bool) else None
            self.fault_handlers = (FaultHandlers.of_idt(parent, vectors=vectors, ranges=fault_ranges)
                                   if vectors is not None else FaultHandlers.of_idt(parent, ranges=fault_ranges))
        self._faults: FaultTrap | None = None
        self.faults_hooked: list[int] = []      # the vectors the fuzz forks catch (as far as debug slots allowed)
        self._fault_hit: tuple[Fault, dict[str, int]] | None = None
        self._write_input: Callable[[bytes], None] = lambda data: None
        self._new: list[int] = []               # blocks first reached by the current input
        self._covered: list[int] = []           # blocks to remove from the sink at the next rebuild
        self._sink_hit: tuple[int, s.Regs] | None = None      # (sink address, the interrupted code's registers)
        self._end_hit = False
        self._stale = False
        # the fuzz fork has not run yet: its first run also makes the sink's pages present in KVM and copies those it
        # writes (page faults, tens of µs each where an exit from guest user mode costs 45 µs), which is vmfork's time
        self._fresh = False
        self._ahead: Any = None                 # the fork reset_ahead() reset for the next input
        # how the fuzz forks log their writes (VM.fork's dirty_log): "bitmap" after a run overflowed a dirty ring
        self.dirty_log = "auto"
        self.reset_s = 0.0
        # reset + input + run as one call into the fork (VM.reset_and_run), where nothing runs between them; False:
        # the three steps apart (then `reset_s` times the resets)
        self.compiled_iteration = True
        # False: the end marker's `out` is not completed before the next input's reset (VM.run(settle=False));
        # True completes it at every stop (for comparisons: bench/fuzz.py)
        self.settle = False
        # resets leave out the state parts the last input provably did not touch (VM.reset_and_run's `lean`);
        # False restores every part (for comparisons: bench/fuzz.py)
        self.lean_resets = True
        self._plain_run = False                 # the fuzz fork runs with fork.run (not under a Debugger)
        self.kept: list[Any] = []
        self.last_crash: Result | None = None
        self.sink = parent.fork(name=f"{parent.name}-sink")
        self.sink_dbg: Debugger | None = None
        self.sinks: dict[int, str] = {}
        self.ends: dict[int, str] = {}
        self.int3_markers = int3_markers
        self.fast_traps = fast_traps
        self.budget: InstructionBudget | None = None
        self.fork_dbg: Debugger | None = None
        self._traps: ForkTraps | None = None
        self._run: Callable[..., Any]
        try:
            if sinks or ends or int3_markers or (coverage is not None and coverage.blocks):
                self._arm_sink(debugger(self.sink, symbols=symbols, stub_gpa=stub_gpa), sinks, ends)
            if layout is not None and budget_instructions is not None:
                self.budget = InstructionBudget.install(self.sink, budget_instructions, layout)
            self.fork: Any = None
            self._make_fork()
        except BaseException:
            self.sink.destroy(tree=True)
            raise

    def _arm_sink(self, dbg: Debugger, sinks: Sequence[int | str], ends: Sequence[int | str]) -> None:
        """The sink's breakpoints (sinks, ends, coverage blocks) and int3 hook, which every fuzz fork inherits."""
        self.sink_dbg = dbg
        for where in sinks:
            bp = dbg.add_breakpoint(where, self._on_sink, owner="sink")
            self.sinks[bp.address] = bp.label or f"{bp.address:#x}"
        for where in ends:
            bp = dbg.add_breakpoint(where, self._on_end, owner="end")
            if bp.owner != "end":       # add_breakpoint returned the sink's breakpoint at that address
                raise FuzzError(f"{where} is a sink and an end: which should it be?")
            self.ends[bp.address] = bp.label or f"{bp.address:#x}"
        if self.int3_markers:
            # markers in kernel mode (the parent's start marker was): no #BP stub needed for them where kernel-mode
            # int3s exit by themselves (a Linux module target: Linux maps the stub's page nowhere executable)
            kernel = self.parent.vcpus[0].get_sregs().cs.selector & 3 == 0
            dbg.watch_guest_int3(int3_end_marker, kernel_only=kernel)
        if self.coverage is not None:
            for block in self.coverage.remaining:
                if block not in self.sinks and block not in self.ends:
                    dbg.add_breakpoint(block, self._on_block, owner="coverage")

    # --- forks ------------------------------------------------------------------------------------------------

    def _runner(self, fork: Any) -> Callable[..., Any]:
        """Make `fork` the fuzz fork: its input writer, its fault breakpoints (faults.FaultTrap), and how to run it:
        plainly when the sink has no breakpoints and no int3 hook; else with the fork's own answers to the #BP stub
        (traps.ForkTraps) where they work, or under the fork's Debugger."""
        self._write_input = self.input.writer(fork.memory)
        self._faults = None
        if self.fault_handlers is not None and self.fault_handlers.entries:
            self._faults = FaultTrap(fork, self.fault_handlers, self._at_fault)
            entries = self.fault_handlers.entries
            self.faults_hooked = [entries[bp.address] for bp in self._faults.install()]
        dbg = self.sink_dbg
        self.fork_dbg = None
        self._traps = None
        self._plain_run = hasattr(fork, "reset_and_run")
        if dbg is None or not (dbg.breakpoints or self.int3_markers):
            return fork.run  # type: ignore[no-any-return]
        stub = dbg.stub_address
        if self.fast_traps and stub is not None and len(fork.vcpus) == 1:
            self._traps = ForkTraps(fork, stub, dbg.breakpoints.values(), int3_markers=self.int3_markers,
                                    on_sink=self._at_sink, on_block=self.block_hook or self._new.append,
                                    persistent=self.block_hook is not None)
            self._traps.install()
            return fork.run  # type: ignore[no-any-return]
        self.fork_dbg = debugger(fork)
        self._plain_run = False
        return self.fork_dbg.run

    def describe_faults(self) -> str:
        """Which faults the fuzz forks catch at the guest's handlers, in words (for the CLI's first line)."""
        from .faults import VECTOR_NAMES
        if self.fault_handlers is None:
            return "fault breakpoints off"
        hooked = ", ".join(VECTOR_NAMES.get(v, str(v)) for v in self.faults_hooked)
        why = "; ".join(self.fault_handlers.skipped)
        return (f"faults caught at the guest's handlers: {hooked or 'none'}"
                + (f" ({why})" if why else ""))

    def _drop_fork(self) -> None:
        """Destroy the fuzz fork, first giving back the debug slots its vCPU holds (pooled vCPUs are reused)."""
        if self._faults is not None:
            self._faults.uninstall()
            self._faults = None
        self.fork.destroy()

    def _make_fork(self) -> None:
        if self.fork is not None:
            self._drop_fork()
        dbg = self.sink_dbg
        if dbg is not None and self._covered and not self.sink.children:     # kept forks freeze the sink
            for block in self._covered:
                bp = dbg.find(block)
                if bp is not None and bp.owner == "coverage":
                    dbg.remove_breakpoint(bp)
        self._covered.clear()
        self._next_fork(f"{self.parent.name}-fuzz")

    def _next_fork(self, name: str) -> None:
        """A new fuzz fork of the sink, logging its writes as the fuzz forks now do (self.dirty_log)."""
        self.fork = self.sink.fork(name=name, dirty_log=self.dirty_log)
        self._run = self._runner(self.fork)
        self._stale = False
        self._fresh = True

    def _on_block(self, hit: Hit) -> bool:
        hook = self.block_hook
        if hook is not None:
            hook(hit.address)
            return True
        self._new.append(hit.address)
        dbg = hit.debugger
        if hit.breakpoint is not None and len(dbg.breakpoints) > 1:
            dbg.remove_breakpoint(hit.breakpoint)       # one-shot; the last one goes when the fork is rebuilt
        return True

    def _on_sink(self, hit: Hit) -> bool:
        self._sink_hit = (hit.address, hit.regs)
        return False

    def _at_sink(self, address: int, regs: s.Regs) -> None:
        self._sink_hit = (address, regs)

    def _at_fault(self, fault: Fault, registers: dict[str, int]) -> None:
        self._fault_hit = (fault, registers)

    def _on_end(self, hit: Hit) -> bool:
        self._end_hit = True        # the run stops with "breakpoint": _exec takes it for the end marker
        return False

    # --- one input --------------------------------------------------------------------------------------------

    def execute(self, data: bytes) -> Result:
        """Run one input in the fuzz fork (reset first, unless reset_ahead() did) and say what it did."""
        return self._exec(data) or _OK

    def reset_ahead(self) -> None:
        """Reset the fuzz fork now for the next input, so that execute() only writes the input and runs it. A
        fork server calls this right after it answers, while its client (afl-fuzz) works on the next input: the
        reset then costs the serial path nothing (fuzz/afl.py). Only where execute() would reset in one call with
        its run anyway (a plain run, no instruction budget); anything that runs or touches the fork before the
        next execute() makes it reset again as usual (VM.just_reset)."""
        if self._stale:
            self._make_fork()
        if not self._one_call():
            return
        self.fork.reset(lean=self.lean_resets)
        self._ahead = self.fork

    def _one_call(self) -> bool:
        """Whether an input's reset, write and first KVM_RUN go into the fork in one call (VM.reset_and_run, or
        VM.run_input after reset_ahead): a plain run, no instruction budget."""
        return self.compiled_iteration and self._plain_run and self.budget is None

    def _exec(self, data: bytes) -> Result | None:
        """None for the common case: the end marker and nothing new covered."""
        if self._stale:
            self._make_fork()
        n = len(data)
        if n > self.capacity:
            if self.oversize == "reject":
                return Result("rejected", "oversize", detail=f"{n} bytes > {self.capacity}")
            n = self.capacity
            data = data[:n]
        fork = self.fork
        one_call = self._one_call()
        if one_call:
            payload = _LEN64(n) + data if self.input.format == "len64" else data
        if one_call and self._ahead is fork and fork.just_reset:
            # reset_ahead() reset it already: the input and the first KVM_RUN in one call (VM.run_input)
            self._ahead = None
            ev = fork.run_input(payload, self.input.pieces, timeout=self.budget_s, settle=self.settle)
        elif one_call:
            # reset, input and the first KVM_RUN in one call (VM.reset_and_run); the reset is not timed apart
            # settle=False: the next input resets anyway, so the end marker's `out` is left for KVM to drop
            # (or for whoever looks at the fork's registers first to complete: Vcpu.settle)
            ev = fork.reset_and_run(payload, self.input.pieces, timeout=self.budget_s, settle=self.settle,
                                    lean=self.lean_resets)
        else:
            t0 = time.perf_counter()
            fork.reset()
            self.reset_s += time.perf_counter() - t0
            if self.budget is not None:
                self.budget.arm(fork)
            self._write_input(data)
            ev = self._run(timeout=self.budget_s)
        if fork.broken == RING_OVERFLOW and self.dirty_log != "bitmap":
            # this host's KVM let the run overflow the fork's dirty ring for good (vm.RING_OVERFLOW): from now on
            # the fuzz forks log into bitmaps, and this input runs again in one
            self.dirty_log = "bitmap"
            self._stale = True
            return self._exec(data)
        fresh, self._fresh = self._fresh, False
        reason = ev.reason
        if reason == "breakpoint" and self._end_hit:
            self._end_hit = False
            reason = "harness-end"
        if reason == "harness-end" and not self._new:
            return None
        if reason == "timeout" and (self._new or fresh) and self.block_hook is None:
            return self._run_again(data, self._classify(ev, reason))
        return self._classify(ev, reason)

    def _run_again(self, data: bytes, first: Result) -> Result:
        """A run that timed out after it reached new coverage blocks, or in a fork's first run, spent part of its
        time budget in vmfork, not in the guest: an exit per first hit (about 50 µs here), or the faults that make a
        new fork's pages present. Run the input again, without those breakpoints or in the now warm fork, and let
        that run decide whether it is a hang. Each pass removes the blocks it hit, and a fork is fresh for one run
        only, so this ends."""
        again = self._exec(data)
        if again is None:
            return Result("ok", "end", 2, new_blocks=first.new_blocks)
        return replace(again, new_blocks=first.new_blocks + again.new_blocks)

    def _classify(self, ev: Any, reason: str | None = None) -> Result:
        reason = ev.reason if reason is None else reason
        self._end_hit = False
        new = self._new
        if not new:
            new = []                    # never hand out self._new itself: ForkTraps appends to it
        else:
            new = new[:]
            self._new.clear()           # the same list: ForkTraps appends to it
            self._covered.extend(new)
            if self.coverage is not None:
                self.coverage.hit.update(new)
            self._stale = True
        if reason == "harness-end":
            return Result("ok", "end", ev.status, new_blocks=new)
        fork = self.fork
        if reason == "exit" and isinstance(ev.status, int) and ev.status < 0x80:
            return Result("ok", "exit", ev.status, new_blocks=new)
        if reason == "harness-start":
            return Result("ok", "harness-start", ev.status, new_blocks=new)
        if reason == "timeout":
            rip = fork.vcpus[0].get_regs().rip
            return Result("hang", "timeout", rip=int(rip), detail=f"no end marker within {self.budget_s}s",
                          new_blocks=new)
        if self.budget is not None and self.budget.is_budget_stop(ev):
            return Result("hang", "instructions", rip=self.budget.interrupted_rip(fork),
                          detail=f"no end marker within {self.budget.limit} instructions", new_blocks=new)
        if reason == "debugger-error":
            error = self._traps.error if self._traps is not None else None
            if error is None and self._faults is not None:
                error = self._faults.error
            raise FuzzError(f"the debugger failed in {fork.name}: {ev.detail or repr(error)}")
        self._stale = True      # a crashed fork (or one stopped at a sink) is replaced by a fresh one
        if reason == "fault" and self._fault_hit is not None:
            (fault, registers), self._fault_hit = self._fault_hit, None
            system = _system(fork.vcpus[0].get_sregs())
            system.update(cs=fault.cs, ss=fault.ss, cpl=fault.cs & 3)      # the faulting code's, from the frame
            return Result("crash", "vector", vector=fault.vector, rip=fault.rip, error_code=fault.error_code,
                          registers=registers, system=system, cr2=fault.cr2,
                          detail=f"{fault.describe()}, stopped at the guest's handler", new_blocks=new)
        if reason == "breakpoint" and self._sink_hit is not None:
            (address, regs_at), self._sink_hit = self._sink_hit, None
            label = self.sinks.get(address, f"{address:#x}")
            return Result("crash", "sink", sink=label, rip=address, registers=_registers(regs_at),
                          detail=ev.detail or label, new_blocks=new)
        vcpu = ev.vcpu if isinstance(ev.vcpu, int) else 0
        regs = _registers(fork.vcpus[vcpu].get_regs())
        system = _system(fork.vcpus[vcpu].get_sregs())
        if reason == "exit" and isinstance(ev.status, int):
            vector = ev.status & 0x7F
            rip, err = regs["rip"], None
            tail = fork.device("serial0").output()[-256:]
            found = list(_EXCEPTION.finditer(tail))
            if found:
                m = found[-1]
                vector, rip, err = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)
            return Result("crash", "vector", ev.status, vector=vector, rip=rip, error_code=err, registers=regs,
                          system=system, detail=f"exception vector {vector}", new_blocks=new)
        kind = _EXIT_KINDS.get(fork.vcpus[vcpu].run.exit_reason, "crash") if reason == "crash" else reason
        return Result("crash", kind, ev.status, rip=regs["rip"], registers=regs, system=system,
                      detail=ev.detail or reason, new_blocks=new)

    def keep_fork(self) -> Any:
        """Keep the current fuzz fork as it is (e.g. paused at a crash) and stop using it. The sink can no longer
        change (its breakpoints are frozen) while kept forks live."""
        kept = self.fork
        if self._faults is not None:
            self._faults.uninstall()
            self._faults = None
        self.kept.append(kept)
        self.fork = None
        self.fork_dbg = None
        self._covered.clear()
        self._next_fork(f"{self.parent.name}-fuzz-{len(self.kept)}")
        return kept

    # --- a campaign -------------------------------------------------------------------------------------------

    def fuzz(self, seeds: Sequence[bytes] = (), *, seconds: float = 10.0, rng_seed: int | None = None,
             max_execs: int | None = None, stop_on_crash: bool = False, out_dir: str | os.PathLike[str] | None = None,
             status: TextIO | None = None, status_interval: float = 0.5, max_len: int = 4096,
             dictionary: Sequence[bytes] = (), keep: bool = False, sync: CampaignSync | None = None,
             progress: Callable[[Stats], None] | None = None) -> Stats:
        """Mutate the corpus for `seconds` (or `max_execs`). Inputs that reach new blocks join the corpus; each
        distinct crash is saved in OUT/crashes/ with a JSON sidecar; a live status line goes to `status`. `sync`:
        this is one process of a campaign on several cores (fuzz/jobs.py), which may stop it early, hand it inputs
        the others found, share its corpus and decide which process saves a crash. `progress` is called with the
        numbers whenever the status line is due (every `status_interval`, never per input), with or without
        `status`."""
        rng = random.Random(rng_seed)
        mutator = Mutator(rng, max_len=min(max_len, self.capacity), dictionary=dictionary)
        corpus: list[bytes] = [bytes(x) for x in seeds] or [b"\0" * 8]
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            (out / "crashes").mkdir(parents=True, exist_ok=True)
            (out / "corpus").mkdir(parents=True, exist_ok=True)
            (out / "hangs").mkdir(parents=True, exist_ok=True)
        st = Stats(blocks_total=len(self.coverage.blocks) if self.coverage else 0)
        seen: set[tuple[str, str, int | None]] = set()
        self.reset_s = 0.0
        gc.collect()
        gc.freeze()
        start = time.monotonic()
        deadline = start + seconds
        next_status = start + status_interval
        execute = self._exec
        mutate = mutator.mutate
        pending = corpus[::-1]          # the seeds run first, unchanged, in order
        stop = False
        countdown = 0                   # inputs until the next look at the clock (every 32, and after slow ones)
        if sync is not None:
            sync.begin(start, corpus)
        src = -1                        # the corpus entry the input was mutated from (-1: a seed or an import)
        while not stop:
            if pending:
                data = pending.pop()
                src = -1
            else:
                countdown -= 1
                if countdown <= 0:
                    countdown = 32
                    now = time.monotonic()
                    if now >= deadline or (max_execs is not None and st.execs >= max_execs):
                        break
                    if sync is not None:
                        st.corpus = len(corpus)
                        if self.coverage is not None:
                            st.blocks_hit = len(self.coverage.hit)
                        incoming = sync.tick(st, now)
                        if incoming is None:
                            break
                        if incoming:                # run them first, as they are (AFL++'s sync does the same)
                            pending = incoming[::-1]
                            continue
                    if (status is not None or progress is not None) and now >= next_status:
                        st.elapsed_s = now - start
                        st.corpus = len(corpus)
                        if self.coverage is not None:
                            st.blocks_hit = len(self.coverage.hit)
                        if status is not None:
                            status.write("\r" + st.line())
                            status.flush()
                        if progress is not None:
                            progress(st)
                        next_status = now + status_interval
                src = rng.randrange(len(corpus))
                data = mutate(corpus[src], corpus)
            res = execute(data)
            st.execs += 1
            if res is None:
                st.ok += 1
                continue
            countdown = 0
            if res.new_blocks and res.outcome == "ok" and data not in corpus:
                corpus.append(data)
                if sync is not None:
                    sync.add(data, src)
                elif out is not None:
                    (out / "corpus" / hashlib.sha1(data).hexdigest()).write_bytes(data)
            o = res.outcome
            if o == "ok":
                st.ok += 1
            elif o == "hang":
                st.hangs += 1
                if out is not None:
                    (out / "hangs" / hashlib.sha1(data).hexdigest()).write_bytes(data)
            elif o == "rejected":
                st.rejected += 1
            else:
                st.crashes += 1
                self.last_crash = res
                if st.first_crash_s is None:
                    st.first_crash_s = time.monotonic() - start
                    st.first_crash_execs = st.execs
                if res.signature not in seen:
                    seen.add(res.signature)
                    if sync is None or sync.claim(res.signature):
                        st.unique_crashes += 1
                        if out is not None:
                            st.crash_files.append(str(save_crash(out / "crashes", data, res)))
                if keep:
                    self.keep_fork()
                    stop = True
                elif stop_on_crash:
                    stop = True
                    if sync is not None:
                        sync.crashed()
        gc.unfreeze()
        st.elapsed_s = time.monotonic() - start
        st.reset_s = self.reset_s
        st.corpus = len(corpus)
        if self.coverage is not None:
            st.blocks_hit = len(self.coverage.hit)
        if status is not None:
            status.write("\r" + st.line() + "\n")
            status.flush()
        return st

    def close(self) -> None:
        """Destroy the fuzz fork, any kept forks and the sink (the parent stays)."""
        if self._faults is not None:
            self._faults.uninstall()
            self._faults = None
        if self.sink.state != "destroyed":
            self.sink.destroy(tree=True)

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _budget_layout() -> Any:
    """The PMU layout for an instruction budget, or FuzzError naming why this host has none (vmfork doctor)."""
    from ..arch.x86 import cpu
    from ..doctor import probe_host
    from ..vm import open_kvm
    from .pmu import detect
    report = probe_host(cached=True)
    if not report.supports("vpmu"):
        raise FuzzError(f"an instruction budget needs a virtual PMU, and this host has none: {report.reason('vpmu')}")
    cpuid: Any = cpu.vcpu_cpuid(open_kvm(), 0)
    layout = detect(cpuid.entries[:cpuid.nent])
    if isinstance(layout, str):
        raise FuzzError(f"an instruction budget needs a virtual PMU: {layout}")
    return layout


def save_crash(directory: Path, data: bytes, res: Result) -> Path:
    """OUT/crashes/<kind>-<vector or sink>-<rip>-<sha1>.bin and a .json sidecar with the outcome."""
    what = res.sink or (str(res.vector) if res.vector is not None else "")
    rip = f"{res.rip:x}" if res.rip is not None else "none"
    name = f"{res.kind}-{what}-{rip}-{hashlib.sha1(data).hexdigest()[:12]}".replace("/", "_")
    path = directory / f"{name}.bin"
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return path


def status_stream() -> TextIO:
    return sys.stderr
