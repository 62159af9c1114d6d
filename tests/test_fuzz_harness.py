"""Issue 6, the harness kinds beyond the harness port: start/end breakpoints by address or symbol, KF/x-style int3
markers (int3 + a magic RAX), the instruction budget (virtual PMU) and the CLI's checks of them.

The `fuzz` test guest takes a marker mode (guests/testguest/programs.asm): `fuzz` marks its iterations through the
harness port, `fuzz 1` with int3 markers, `fuzz 2` not at all (so only breakpoints can fuzz it). Every mode runs an
iteration from prog_fuzz.input to prog_fuzz.done, and the parser is the same.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostprobe
from guest import boot, console, run_to_ready
from vmfork.arch.x86 import cpu
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer, FuzzError, loop
from vmfork.fuzz.harness import Harness, HarnessError, run_to_start
from vmfork.fuzz.pmu import InstructionBudget, PmuLayout, detect, msr_values
from vmfork.kvm import structs as s
from vmfork.vm import open_kvm
from vmfork.vmi import debugger
from vmfork.vmi.memory import read_virt
from vmfork.vmi.symbols import SymbolTable

SEED = b"FUZZA\x00"
BUG = b"FUZZB\x01"
TRIPLE = b"FUZZTF"
INBUF, INBUF_SIZE = 0x800000, 0x10000


def _parent(kernel: Path, cmdline: str, harness: Harness) -> Iterator[VM]:
    vm = VM.create(memory_mib=64, name="fuzz-target")
    try:
        vm.load_kernel(kernel, cmdline=cmdline)
        run_to_start(vm, harness, timeout=30)
        yield vm
    finally:
        vm.destroy(tree=True)


@pytest.fixture(scope="module")
def unmarked(pvh_guest: Path, symbols: SymbolTable) -> Iterator[VM]:
    """`fuzz 2` (no markers at all) paused at a start breakpoint on prog_fuzz.input."""
    yield from _parent(pvh_guest, "fuzz 2", Harness.of(None, "prog_fuzz.input", ["prog_fuzz.done"], symbols))


@pytest.fixture(scope="module")
def int3_marked(pvh_guest: Path) -> Iterator[VM]:
    """`fuzz 1` paused right after its int3 start marker."""
    yield from _parent(pvh_guest, "fuzz 1", Harness("int3"))


def _outcomes(fz: Fuzzer) -> list[tuple[str, str]]:
    return [(r.outcome, r.kind) for r in (fz.execute(d) for d in (b"", SEED, BUG, b"HANG", TRIPLE, SEED))]


EXPECTED = [("ok", "end"), ("ok", "end"), ("crash", "vector"), ("hang", "timeout"), ("crash", "triple-fault"),
            ("ok", "end")]


# --- start and end breakpoints ----------------------------------------------------------------------------------

def test_start_breakpoint_leaves_the_parent_clean_in_user_mode(unmarked: VM, symbols: SymbolTable) -> None:
    start = symbols.address("prog_fuzz.input")
    regs, sregs = unmarked.vcpus[0].get_regs(), unmarked.vcpus[0].get_sregs()
    assert regs.rip == start and sregs.cs.selector & 3 == 3          # unwound out of the #BP stub into CPL3
    assert read_virt(unmarked, start, 1) != b"\xcc"                   # no breakpoint left in the parent
    assert b"ready" in unmarked.device("serial0").output()            # it booted through, no port marker on the way


def test_start_and_end_breakpoints_by_symbol(unmarked: VM, symbols: SymbolTable) -> None:
    with Fuzzer(unmarked, INBUF, INBUF_SIZE, input_format="len64", ends=["prog_fuzz.done"], symbols=symbols,
                budget_s=0.2) as fz:
        assert fz.ends == {symbols.address("prog_fuzz.done"): "prog_fuzz.done"}
        assert _outcomes(fz) == EXPECTED
        res = fz.execute(BUG)
        assert res.rip is not None and symbols.address("fuzz_parse") <= res.rip < symbols.address("fuzz_parse_end")


def test_several_ends_and_a_sink(unmarked: VM, symbols: SymbolTable) -> None:
    """A second end on the parser's spin loop makes "HANG" end its input; a sink on the faulting store is reached
    before the fault. The fork's own trap answers (ForkTraps) and its full Debugger give the same outcomes and the
    same registers at the sink (the interrupted code's)."""
    hang = symbols.address("fuzz_parse.hang")
    at_sink = []
    for fast_traps in (True, False):
        with Fuzzer(unmarked, INBUF, INBUF_SIZE, input_format="len64", ends=["prog_fuzz.done", f"{hang:#x}"],
                    symbols=symbols, budget_s=0.2, fast_traps=fast_traps) as fz:
            assert (fz.fork_dbg is None) == fast_traps
            res = fz.execute(b"HANG")
            assert (res.outcome, res.kind) == ("ok", "end")
            store = fz.execute(BUG).rip
        with Fuzzer(unmarked, INBUF, INBUF_SIZE, input_format="len64", ends=["prog_fuzz.done"], sinks=[store],
                    symbols=symbols, budget_s=0.2, fast_traps=fast_traps) as fz:
            assert [fz.execute(d).kind for d in (b"HANG", SEED)] == ["timeout", "end"]
            res = fz.execute(BUG)
            assert (res.outcome, res.kind, res.rip, res.sink) == ("crash", "sink", store, symbols.describe(store))
            assert res.registers is not None and res.registers["rip"] == store
            at_sink.append(res.registers)
            assert fz.execute(SEED).kind == "end"
    assert at_sink[0] == at_sink[1]
    assert at_sink[0]["rbx"] == 1 << 32                             # the bank offset the store is about to use


def test_an_end_that_is_also_a_sink_is_refused(unmarked: VM, symbols: SymbolTable) -> None:
    done = symbols.address("prog_fuzz.done")
    with pytest.raises(FuzzError, match="is a sink and an end"):
        Fuzzer(unmarked, INBUF, INBUF_SIZE, input_format="len64", ends=[done], sinks=[done], budget_s=0.2)


@pytest.mark.parametrize("harness", [Harness("int3"), Harness("breakpoint", "prog_fuzz.input", ("prog_fuzz.done",))])
def test_a_target_that_never_gets_to_its_start_is_an_error(pvh_guest: Path, machines: list,  # type: ignore[type-arg]
                                                             symbols: SymbolTable, harness: Harness) -> None:
    vm = boot(pvh_guest, "hello", machines)                           # prints a line and exits
    with pytest.raises(HarnessError, match="stopped with exit"):
        run_to_start(vm, Harness(harness.kind, harness.start, harness.ends, symbols), timeout=10)


def test_cli_start_and_end_by_address(pvh_guest: Path, symbols: SymbolTable, tmp_path: Path) -> None:
    """By address, no symbols: a campaign finds the planted bug, and the replay reproduces it."""
    start, done = symbols.address("prog_fuzz.input"), symbols.address("prog_fuzz.done")
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "a").write_bytes(SEED)
    common = ["--kernel", str(pvh_guest), "--cmdline", "fuzz 2", "--input-format", "len64", "--start", f"{start:#x}",
              "--end", f"{done:#x}", "--input-addr", f"{INBUF:#x}", "--input-size", f"{INBUF_SIZE:#x}"]
    r = _vmfork("fuzz", *common, "--corpus", str(tmp_path / "seeds"), "--out", str(tmp_path / "out"), "--seed", "1",
                "--seconds", "30", "--stop-on-crash", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "breakpoint harness" in r.stderr and f"input buffer {INBUF:#x}" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["unique_crashes"] == 1 and summary["ok"] > 0, summary
    crash = next((tmp_path / "out" / "crashes").glob("*.bin"))
    r = _vmfork("fuzz", *common, "--replay", str(crash))
    assert r.returncode == 10, r.stderr     # a crash
    res, saved = json.loads(r.stdout), json.loads(crash.with_suffix(".json").read_text())
    assert (res["outcome"], res["kind"], res["rip"]) == ("crash", saved["kind"], saved["rip"])


# --- int3 markers ---------------------------------------------------------------------------------------------------

def test_int3_markers_give_the_buffer_and_end_each_input(int3_marked: VM, symbols: SymbolTable) -> None:
    regs = int3_marked.vcpus[0].get_regs()
    assert (regs.rip, regs.rdi, regs.rsi) == (symbols.address("prog_fuzz.input"), INBUF, INBUF_SIZE)
    assert int3_marked.vcpus[0].get_sregs().cs.selector & 3 == 3
    with Fuzzer(int3_marked, input_format="len64", int3_markers=True, budget_s=0.2) as fz:
        assert (fz.input_addr, fz.input_size) == (INBUF, INBUF_SIZE)   # from RDI/RSI at the marker
        assert _outcomes(fz) == EXPECTED                                # TRIPLE: the guest's own int3 service ran
    parser = (symbols.address("fuzz_parse"), symbols.address("fuzz_parse_end"))
    covered = []
    for fast_traps in (True, False):                                    # ForkTraps, or the Debugger's int3 hook
        with Fuzzer(int3_marked, input_format="len64", int3_markers=True, coverage=[parser], budget_s=0.2,
                    fast_traps=fast_traps) as fz:
            first = fz.execute(SEED)
            assert first.outcome == "ok" and first.new_blocks
            covered.append(sorted(first.new_blocks))
            assert _outcomes(fz) == EXPECTED
    assert covered[0] == covered[1]


def test_without_vmfork_the_markers_are_unknown_services(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    """Nothing watching: the guest's handler answers the magic int3s like any unknown service and the loop runs
    on (under QEMU too); the machine never stops by itself."""
    vm = boot(pvh_guest, "fuzz 1", machines)
    ev = vm.run(timeout=0.3)
    assert ev.reason == "timeout", (ev, console(vm))
    assert "EXCEPTION" not in console(vm)


def test_the_int3_hook_sees_the_guests_own_int3s(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    """Debugger.watch_guest_int3 on the `vmi` program, whose one int3 asks for unknown service 0x7f: passed on, the
    guest's handler answers -1; stopped, the handler never runs (RAX stays 0x7f) and the guest carries on."""
    seen: list[int] = []
    for stop in (False, True):
        vm = boot(pvh_guest, "vmi 2", machines)
        run_to_ready(vm)
        dbg = debugger(vm)

        def hook(vcpu: int, regs: s.Regs, stop: bool = stop) -> tuple[str, int | None] | None:
            seen.append(regs.rax)
            return ("svc", 0x7F) if stop else None
        dbg.watch_guest_int3(hook)
        ev = dbg.run(timeout=10)
        if stop:
            assert (ev.reason, ev.status) == ("svc", 0x7F), ev
            regs = dbg.get_regs(0)
            assert regs.rax == 0x7F and read_virt(vm, regs.rip - 1, 1) == b"\xcc"   # right after the int3
            ev = dbg.run(timeout=10)
        assert ev.reason == "exit", ev
        assert f"svc={'000000000000007f' if stop else 'ffffffffffffffff'}" in console(vm)
        dbg.detach()
    assert seen == [0x7F, 0x7F]


# --- the instruction budget --------------------------------------------------------------------------------------

def test_instruction_budget_stops_a_hang(int3_marked: VM, symbols: SymbolTable) -> None:
    hostprobe.require("vpmu")
    with Fuzzer(int3_marked, input_format="len64", int3_markers=True, budget_s=5.0,
                budget_instructions=1_000_000) as fz:
        assert fz.execute(SEED).outcome == "ok"
        t = time.monotonic()
        res = fz.execute(b"HANG")
        assert (res.outcome, res.kind) == ("hang", "instructions"), res
        assert time.monotonic() - t < 1.0                               # well before the 5 s time budget
        assert res.rip == symbols.address("fuzz_parse.hang")
        assert fz.execute(SEED).outcome == "ok"


def _entry(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0) -> s.CpuidEntry2:
    e = s.CpuidEntry2()
    e.function, e.eax, e.ebx, e.ecx, e.edx = function, eax, ebx, ecx, edx
    return e


def _vendor(name: bytes) -> s.CpuidEntry2:
    ebx, edx, ecx = struct.unpack("<III", name)
    return _entry(0, 0x16, ebx, ecx, edx)


def test_the_pmu_layout_comes_from_the_vmm_cpuid() -> None:
    intel = _vendor(b"GenuineIntel")
    assert detect([intel]) == "CPUID leaf 0xA reports no architectural PMU (EAX = 0x0)"
    v2 = detect([intel, _entry(0xA, eax=0x07300802)])               # version 2, 8 counters of 48 bits
    assert isinstance(v2, PmuLayout)
    assert (v2.version, v2.counters, v2.width, v2.evtsel, v2.counter, v2.global_ctrl) == (2, 8, 48, 0x186, 0xC1,
                                                                                          0x38F)
    amd = _vendor(b"AuthenticAMD")
    legacy, core = detect([amd]), detect([amd, _entry(0x80000001, ecx=1 << 23)])
    assert isinstance(legacy, PmuLayout) and (legacy.evtsel, legacy.counter) == (0xC0010000, 0xC0010004)
    assert isinstance(core, PmuLayout) and (core.evtsel, core.counter, core.global_ctrl) == (0xC0010200, 0xC0010201,
                                                                                              None)
    values = msr_values(v2, preload=-1000, interrupt=True)
    assert list(values) == [0xC1, 0x38E, 0x38F, 0x186]                 # the event select goes last
    assert values[0xC1] == (1 << 48) - 1000 and values[0x186] == 0xC0 | 1 << 16 | 1 << 17 | 1 << 20 | 1 << 22


def test_a_counter_overflow_stops_an_input_as_an_instruction_hang(int3_marked: VM, symbols: SymbolTable,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything after the counter: the overflow interrupt (here raised by hand in the LAPIC, as the counter would
    raise it through LVTPC) runs vmfork's stub through the gate it added, and the input is a hang of kind
    "instructions" at the interrupted RIP. The counting itself needs a virtual PMU (the test above)."""
    cpuid = cpu.vcpu_cpuid(open_kvm(), 0)
    layout = detect(cpuid.entries[:cpuid.nent])  # type: ignore[attr-defined]
    if isinstance(layout, str):
        pytest.skip(f"no PMU layout to program: {layout}")
    monkeypatch.setattr(loop, "_budget_layout", lambda: layout)     # past the host check: no counter counts here
    arm = InstructionBudget.arm

    def arm_and_overflow(self: InstructionBudget, fork: VM) -> None:
        arm(self, fork)
        lapic = s.LapicState()
        fork.vcpus[0].fd.get_lapic(lapic)
        irr = 0x200 + (self.vector // 32) * 0x10
        lapic.regs[irr + (self.vector % 32) // 8] |= 1 << (self.vector % 8)
        fork.vcpus[0].fd.set_lapic(lapic)
    monkeypatch.setattr(InstructionBudget, "arm", arm_and_overflow)
    with Fuzzer(int3_marked, input_format="len64", int3_markers=True, budget_s=2.0, budget_instructions=1000) as fz:
        assert fz.budget is not None and 0x20 <= fz.budget.vector < 0xFF
        t = time.monotonic()
        res = fz.execute(SEED)
        assert (res.outcome, res.kind) == ("hang", "instructions"), res
        assert res.rip == symbols.address("prog_fuzz.input") and time.monotonic() - t < 1.0
    with Fuzzer(int3_marked, input_format="len64", int3_markers=True, budget_s=2.0) as fz:     # no budget: fine
        assert fz.execute(SEED).outcome == "ok"


def test_without_a_vpmu_an_instruction_budget_is_refused(int3_marked: VM) -> None:
    report = hostprobe.report()
    if report.supports("vpmu"):
        pytest.skip("this host has a virtual PMU: the refusal cannot happen here")
    with pytest.raises(FuzzError) as e:
        Fuzzer(int3_marked, input_format="len64", int3_markers=True, budget_instructions=1000)
    assert str(e.value) == f"an instruction budget needs a virtual PMU, and this host has none: {report.reason('vpmu')}"
    assert not int3_marked.children                                      # the sink went with the refusal


def test_the_vpmu_probe_answers_in_one_line() -> None:
    item = hostprobe.report().item("vpmu")
    assert item.supported == (item.status == "works"), item
    reason = hostprobe.report().reason("vpmu")
    assert "\n" not in reason and "vpmu" in reason
    if not item.supported:
        assert item.detail.startswith("no virtual PMU") or "counted" in item.detail, item.detail


# --- the command line -----------------------------------------------------------------------------------------------

def _vmfork(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfork.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("extra", "message"), [
    (["--start", "0x10a471"], "--start needs at least one --end"),
    (["--start", "0x10a471", "--end", "0x10a490", "--harness", "int3"], "does not go with --harness int3"),
    (["--end", "prog_fuzz.done"], "--end prog_fuzz.done: not an address, and no --symbols"),
    (["--budget-instructions", "0"], "must be at least 1"),
])
def test_cli_refuses_bad_harness_options_in_one_line(pvh_guest: Path, tmp_path: Path, extra: list[str],
                                                     message: str) -> None:
    r = _vmfork("fuzz", "--kernel", str(pvh_guest), "--out", str(tmp_path), *extra)
    assert r.returncode == 2, r
    assert message in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


def test_cli_budget_instructions_names_the_missing_vpmu(pvh_guest: Path, tmp_path: Path) -> None:
    report = hostprobe.report()
    if report.supports("vpmu"):
        pytest.skip("this host has a virtual PMU: the refusal cannot happen here")
    t = time.monotonic()
    r = _vmfork("fuzz", "--kernel", str(pvh_guest), "--out", str(tmp_path), "--budget-instructions", "1000000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"vmfork fuzz: --budget-instructions needs a virtual PMU, and this host has none: " \
                               f"{report.reason('vpmu')}"
    assert time.monotonic() - t < 20                                    # refused before anything booted

