"""Fuzzing on forks (KF/x style): a parent paused at its start marker, a sink fork with the crash, end and coverage
breakpoints, a fuzz fork reset per input. See `loop.Fuzzer`; `vmfork fuzz` is the command (`cli.py`).

Harnesses (`harness.py`), how a target marks the code under test:

    port        the vmfork harness port 0xf6: `out` 1 = start (RDI/RSI = input buffer, size), `out` 2 = end
    int3        KF/x's breakpoint harness: int3 with RAX = 0x13371337 (start; RDI/RSI as above) or 0x13371338
                (end). KF/x's default CPUID harness cannot work on KVM: CPUID never leaves the kernel.
    breakpoint  no instrumentation: `--start ADDR|SYMBOL` and one or more `--end ADDR|SYMBOL` (`--symbols FILE`);
                the input buffer is RDI/RSI at the start (a SysV `parse(buf, size)`) or --input-addr/--input-size

Targets with none of vmfork's conventions (KF/x's): the input buffer is a guest-virtual address translated through
the page tables at the start marker (`inputbuf.py`; raw or length-prefixed inputs), faults are caught at the guest's
own handlers by hardware breakpoints and signed by the faulting RIP (`faults.py`), and a Linux symbol table adds
default crash sinks (`sinks.py`).

The parent is booted to its start and left there exactly as the interrupted code (no breakpoint, no stub frame),
so every fork starts at the start marker. Each input ends at an end marker or end breakpoint (outcome "ok"), a
sink breakpoint or a fault (a crash, e.g. kind "vector", "sink", "triple-fault"), or a budget (a hang: kind
"timeout" for `budget_s`, "instructions" for `budget_instructions`, which counts retired instructions with the
guest's virtual PMU, `pmu.py`, and needs `vmfork doctor`'s "vpmu"). Crashes are saved with the vCPU's registers.

On hosts where KVM ignores software breakpoints (the #BP stub of vmfork.vmi.breakpoints), the fuzz fork answers
its breakpoints itself (`traps.py`): one exit per breakpoint hit, also per block of AFL++'s edge map (`afl.py`).

    from vmfork.fuzz import Fuzzer
    from vmfork.fuzz.harness import Harness, run_to_start
    run_to_start(vm, Harness("int3"), timeout=30)      # vm created and loaded, not yet run
    with Fuzzer(vm, int3_markers=True, coverage=[(start, end)]) as fz:
        print(fz.execute(b"FUZZB\\x01"))
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .coverage import Coverage, basic_blocks
    from .errors import FuzzError
    from .harness import Harness, StartPoint, run_to_start
    from .loop import Fuzzer, Result, Stats, save_crash
    from .mutate import Mutator

__all__ = ["Coverage", "FuzzError", "Fuzzer", "Harness", "Mutator", "Result", "StartPoint", "Stats", "basic_blocks",
           "run_to_start", "save_crash"]
_EXPORTS = {"Coverage": "coverage", "basic_blocks": "coverage", "FuzzError": "errors", "Harness": "harness",
            "StartPoint": "harness", "run_to_start": "harness", "Fuzzer": "loop", "Result": "loop", "Stats": "loop",
            "save_crash": "loop", "Mutator": "mutate"}
assert set(_EXPORTS) == set(__all__)
__getattr__ = lazy_exports(__name__, _EXPORTS)
