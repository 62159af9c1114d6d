"""Issue 13: fuzzing a target nobody wrote for vmfork (guests/kfx/kfx.asm, a Multiboot kernel with KF/x's
conventions): a virtual input buffer over two non-contiguous physical pages or in a direct map, faults seen at the
guest's own handlers (two bugs with one vector are two crashes, with the faulting RIPs; a double fault is a crash;
a fault outside the covered code goes to the guest), KF/x's option names, and `--replay`'s exit status."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostprobe
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer
from vmfork.fuzz.errors import FuzzError
from vmfork.fuzz.faults import FAULT_VECTORS
from vmfork.fuzz.harness import Harness, run_to_start
from vmfork.fuzz.sinks import LINUX_SINKS, resolve_sinks
from vmfork.vmi import read_virt
from vmfork.vmi.symbols import SymbolTable

ROOT = Path(__file__).resolve().parents[1]
BUF_A, BUF_B = 0x300000, 0x280000
VMALLOC_BUF = 0xFFFFC90000000FF0
DIRECT_BUF = 0xFFFF888000000000 + BUF_A + 0xFF0
SIZE = 0x100


def bug(digit: str) -> bytes:
    """The planted bugs' magic straddles the buffer's page boundary: bytes 14..16 "KFX" (16 is on page 1)."""
    return b"A" * 14 + b"KFX" + digit.encode()


def _hw_breakpoints_in_handlers() -> None:
    """The fault breakpoints sit on the guest's handlers, which run in kernel mode: hardware breakpoints must work
    there (on kvm_pvm only there)."""
    item = hostprobe.report().item("hw_breakpoints")
    if item.status not in ("works", "cpl0-only"):
        pytest.skip(hostprobe.report().reason("hw_breakpoints"))


@pytest.fixture(scope="module")
def kfx(guest_dir: Path) -> tuple[Path, SymbolTable]:
    _hw_breakpoints_in_handlers()
    image = guest_dir / "kfx-multiboot.elf"
    if not image.exists():
        pytest.skip(f"{image} is not built (guests/build.sh)")
    return image, SymbolTable.load(image.with_suffix(".map"))


def _parent(image: Path, cmdline: str = "") -> VM:
    vm = VM.create(memory_mib=64, name="kfx")
    try:
        vm.load_kernel(image, cmdline=cmdline)
        run_to_start(vm, Harness("int3"), timeout=60)
    except BaseException:
        vm.destroy(tree=True)
        raise
    return vm


@pytest.fixture(scope="module")
def parent(kfx: tuple[Path, SymbolTable]) -> Iterator[VM]:
    vm = _parent(kfx[0])
    yield vm
    vm.destroy(tree=True)


def _parser(vm: VM) -> tuple[int, int]:
    m = re.search(rb"parse=0x([0-9a-f]+) end=0x([0-9a-f]+)", vm.device("serial0").output())
    assert m, vm.device("serial0").output()
    return int(m.group(1), 16), int(m.group(2), 16)


def test_the_buffer_is_virtual_and_crosses_two_non_contiguous_pages(parent: VM, kfx: tuple[Path, SymbolTable]) -> None:
    symbols = kfx[1]
    regs = parent.vcpus[0].get_regs()
    assert (regs.rdi, regs.rsi) == (VMALLOC_BUF, SIZE)             # what the harness handed over: a virtual address
    with Fuzzer(parent, int3_markers=True, budget_s=0.2) as fz:
        assert fz.input.format == "raw"                            # KF/x's default with the int3 harness
        assert fz.input.pieces == ((BUF_A + 0xFF0, 16), (BUF_B, SIZE - 16))
        res = fz.execute(bug("1"))
        # the bytes after the 16th went to the second page's physical frame, where the guest reads them
        assert fz.fork.memory.read(BUF_B, 2) == b"X1"
        assert read_virt(fz.fork, VMALLOC_BUF + 14, 4) == b"KFX1"
        assert (res.outcome, res.kind, res.vector) == ("crash", "vector", 14)
        assert res.rip == symbols.address("parse.bug1_load")
        assert fz.execute(bug("0")).outcome == "ok"


def test_a_direct_map_buffer_is_translated_too(kfx: tuple[Path, SymbolTable]) -> None:
    vm = _parent(kfx[0], "direct")
    try:
        assert vm.vcpus[0].get_regs().rdi == DIRECT_BUF            # 0xffff888000000000 + physical, as in Linux
        with Fuzzer(vm, int3_markers=True, budget_s=0.2) as fz:
            assert fz.input.pieces == ((BUF_A + 0xFF0, SIZE),)
            assert fz.execute(bug("2")).rip == kfx[1].address("parse.bug2_store")
    finally:
        vm.destroy(tree=True)


def test_phys_keeps_the_old_meaning_and_misses_the_second_page(parent: VM) -> None:
    """The old physical write: contiguous from BUF_A + 0xff0, so bytes 16.. land in the frame after BUF_A, which
    the guest's buffer does not use: the bug behind the page boundary is never reached."""
    with Fuzzer(parent, BUF_A + 0xFF0, SIZE, input_physical=True, int3_markers=True, budget_s=0.2) as fz:
        assert fz.input.pieces == ((BUF_A + 0xFF0, SIZE),)
        assert fz.execute(bug("1")).outcome == "ok"
        assert fz.fork.memory.read(BUF_A + 0x1000, 2) == b"X1"


@pytest.mark.parametrize(("address", "size", "where"), [
    (0xFFFFC90000002000, 16, "0xffffc90000002000"),                 # the vmalloc area's third page: not mapped
    (0xFFFFC90000001F00, 0x200, "0xffffc90000002000 (byte 0x100 of the buffer)"),   # runs into it
    (0x0000800000000000, 16, "0x800000000000"),                     # not canonical
])
def test_a_buffer_that_does_not_translate_is_refused_naming_the_page(parent: VM, address: int, size: int,
                                                                      where: str) -> None:
    with pytest.raises(FuzzError, match=re.escape(f"input buffer {address:#x}: the page at {where}")):
        Fuzzer(parent, address, size, int3_markers=True)
    assert not parent.children                                      # nothing left behind


def test_two_bugs_with_one_vector_are_two_crashes_with_the_faulting_code_state(parent: VM,
                                                                             kfx: tuple[Path, SymbolTable]) -> None:
    symbols = kfx[1]
    start, end = _parser(parent)
    with Fuzzer(parent, int3_markers=True, coverage=[(start, end)], budget_s=0.2) as fz:
        assert fz.fault_handlers is not None and set(fz.fault_handlers.entries.values()) >= set(FAULT_VECTORS[:4])
        one, two = fz.execute(bug("1")), fz.execute(bug("2"))
        assert (one.vector, two.vector) == (14, 14)
        assert one.rip == symbols.address("parse.bug1_load") and two.rip == symbols.address("parse.bug2_store")
        assert one.signature != two.signature
        # the faulting instruction's state: #PF error codes (read / write, user mode), CR2, its registers
        assert (one.error_code, one.cr2) == (0x4, 0x40000000)
        assert (two.error_code, two.cr2) == (0x6, 0x40001000)
        assert one.registers is not None and one.registers["rip"] == one.rip
        assert one.registers["rbx"] == 0x40000000 and one.registers["rdi"] == VMALLOC_BUF
        assert one.system is not None and one.system["cr2"] == 0x40000000
        assert (one.system["cpl"], one.system["cs"]) == (3, 0x1B)            # the user-mode parser's


def test_a_double_fault_is_a_crash_and_a_fault_outside_the_covered_code_goes_to_the_guest(
        parent: VM, kfx: tuple[Path, SymbolTable]) -> None:
    start, end = _parser(parent)
    helper = kfx[1].address("helper")
    assert not start <= helper < end
    with Fuzzer(parent, int3_markers=True, coverage=[(start, end)], budget_s=0.2) as fz:
        double = fz.execute(bug("4"))            # RSP0 broken, then ud2: #UD -> #PF -> #DF on its IST stack
        assert (double.outcome, double.vector) == ("crash", 8), double
        assert double.error_code == 0
        outside = fz.execute(bug("3"))           # ud2 in `helper`: passed on; the guest's handler prints, halts
        assert (outside.outcome, outside.kind) == ("hang", "timeout"), outside
        assert b"FAULT vec=0x0000000000000006 rip=0x%016x" % helper in fz.fork.device("serial0").output()
        assert fz.execute(bug("0")).outcome == "ok"
    with Fuzzer(parent, int3_markers=True, budget_s=0.2) as fz:     # no covered range: every fault is a crash
        res = fz.execute(bug("3"))
        assert (res.outcome, res.vector, res.rip) == ("crash", 6, helper)


def test_without_fault_breakpoints_the_guests_own_handler_halts(parent: VM) -> None:
    """What the issue saw: with no convention in common, a fault is only a hang (or the guest's own report)."""
    with Fuzzer(parent, int3_markers=True, budget_s=0.1, faults=False) as fz:
        assert fz.execute(bug("1")).outcome == "hang"
        assert b"FAULT vec=0x000000000000000e" in fz.fork.device("serial0").output()


def test_the_stub_goes_where_it_is_told(parent: VM) -> None:
    with Fuzzer(parent, int3_markers=True, budget_s=0.2, stub_gpa=0xAE000) as fz:
        assert fz.sink_dbg is not None and fz.sink_dbg.stub_gpa == 0xAE000
        assert fz.execute(bug("0")).outcome == "ok"
        assert fz.execute(bug("1")).vector == 14


# --- the command line -------------------------------------------------------------------------------------------

def _vmfork(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_finds_both_bugs_as_two_crashes_and_replay_tells_the_outcome(kfx: tuple[Path, SymbolTable],
                                                                        tmp_path: Path) -> None:
    image, symbols = kfx
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "a").write_bytes(bug("0"))
    common = ["--kernel", str(image), "--cmdline", "", "--harness", "int3", "--budget-ms", "100"]
    r = _vmfork(*common, "--corpus", str(tmp_path / "seeds"), "--out", str(tmp_path / "out"), "--cover", "auto",
                "--seconds", "40", "--seed", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "input buffer 0xffffc90000000ff0 (256 bytes) in 2 physical pieces, raw inputs" in r.stderr
    assert "faults caught at the guest's handlers: #PF, #GP, #UD, #DF" in r.stderr, r.stderr
    crashes = {}
    for path in (tmp_path / "out" / "crashes").glob("*.json"):
        saved = json.loads(path.read_text())
        crashes[(saved["vector"], saved["rip"])] = path.with_suffix(".bin")
    assert (14, symbols.address("parse.bug1_load")) in crashes, crashes
    assert (14, symbols.address("parse.bug2_store")) in crashes, crashes
    replay = crashes[(14, symbols.address("parse.bug1_load"))]
    r = _vmfork(*common, "--replay", str(replay))
    assert r.returncode == 10, r.stderr                                         # crash
    assert json.loads(r.stdout)["rip"] == symbols.address("parse.bug1_load")
    (tmp_path / "ok.bin").write_bytes(bug("0"))
    (tmp_path / "hang.bin").write_bytes(bug("3"))
    assert _vmfork(*common, "--replay", str(tmp_path / "ok.bin")).returncode == 0
    assert _vmfork(*common, "--cover", "auto", "--replay", str(tmp_path / "hang.bin")).returncode == 11
    r = _vmfork(*common, "--input-addr", "0xffffc90000002000", "--replay", str(tmp_path / "ok.bin"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "0xffffc90000002000" in r.stderr, r.stderr


def test_cli_takes_kfx_option_names(kfx: tuple[Path, SymbolTable], tmp_path: Path) -> None:
    """KF/x's --harness breakpoint, --address, --input-limit, --start-byte (0x90: the harness int3 becomes a nop
    that each input runs first) and --sink-vaddr."""
    image, symbols = kfx
    (tmp_path / "in.bin").write_bytes(bug("1"))
    base = ["--kernel", str(image), "--cmdline", "", "--harness", "breakpoint", "--address", f"{VMALLOC_BUF:#x}",
            "--input-limit", "18", "--start-byte", "0x90", "--budget-ms", "100", "--replay", str(tmp_path / "in.bin")]
    r = _vmfork(*base)
    assert r.returncode == 10, r.stderr
    assert json.loads(r.stdout)["rip"] == symbols.address("parse.bug1_load")
    r = _vmfork(*base, "--sink-vaddr", f"{symbols.address('parse.bug1'):#x}")
    assert r.returncode == 10 and json.loads(r.stdout)["kind"] == "sink", r.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (["--start-byte", "0x90"], "--start-byte goes with --harness int3"),
    (["--harness", "int3", "--start-byte", "0x190"], "--start-byte 0x190: not a byte"),
    (["--harness", "int3", "--sink", "no_such_function", "--symbols", "MAP"], "--sink no_such_function: "),
    (["--harness", "int3", "--sink", "no_such_function"], "--sink no_such_function: not an address, and no"),
    (["--harness", "int3", "--input-addr", "phys:zz"], "'phys:zz' is not an address"),
    (["--harness", "int3", "--faults", "14,99"], "fault vectors are 0-31"),
    (["--harness", "int3", "--stub-addr", "0xaf010"], "must be the address of a 4 KiB page"),
])
def test_bad_options_are_one_line_before_anything_boots(kfx: tuple[Path, SymbolTable], tmp_path: Path,
                                                        extra: list[str], message: str) -> None:
    extra = [str(kfx[0].with_suffix(".map")) if x == "MAP" else x for x in extra]
    r = _vmfork("--kernel", str(kfx[0]), "--out", str(tmp_path / "out"), *extra, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 or r.stderr.startswith("usage:"), r.stderr
    assert not (tmp_path / "out").exists()


# --- Linux default sinks ----------------------------------------------------------------------------------------

def test_linux_default_sinks_are_those_the_kernel_has() -> None:
    system_map = SymbolTable.from_text("\n".join([
        "ffffffff81000000 T _stext", "ffffffff81e0a000 T start_kernel", "ffffffff81100000 T panic",
        "ffffffff81100100 T oops_begin", "ffffffff81100200 T __die", "ffffffff81100300 T report_bug",
        "ffffffff81100400 T my_module_parse"]), source="System.map")
    assert resolve_sinks([], system_map) == ["panic", "oops_begin", "__die", "report_bug"]
    assert resolve_sinks(["my_module_parse", "panic"], system_map) == ["my_module_parse", "panic", "oops_begin",
                                                                      "__die", "report_bug"]
    assert resolve_sinks([], system_map, defaults=False) == []
    with pytest.raises(FuzzError, match="--sink kasan_report: "):
        resolve_sinks(["kasan_report"], system_map)                 # an explicit sink must exist
    not_linux = SymbolTable.from_text("0000000000100000 T parse", source="kfx.map")
    assert resolve_sinks([], not_linux) == []
    assert "kasan_report" in LINUX_SINKS and "ubsan_prologue" in LINUX_SINKS


# --- the same target in kernel mode -----------------------------------------------------------------------------

def _kernel_int3() -> None:
    """An int3 in guest kernel mode must reach vmfork: natively (KVM), or through a registered host workaround
    for the emulation failure it causes on hosts that emulate kernel mode (vmfork.workarounds)."""
    from vmfork.workarounds import CATALOG
    if hostprobe.report().supports("int3_cpl0"):
        return
    if not any(w.probe == "int3_cpl0" for w in CATALOG.values()):
        pytest.skip(hostprobe.report().reason("int3_cpl0") + "; no workaround for it is registered")


def test_the_kernel_mode_target_is_paused_at_its_start_marker_every_time(kfx: tuple[Path, SymbolTable]) -> None:
    """One magic at both ends, and the harness in CPL0 (emulated here): a start marker reached between two attach
    slices was once delivered to the guest's own #BP handler, so the first magic vmfork saw was the end marker and
    the parent stopped after it (half the boots), where every fork ended at once without running the parser. The
    instruction after the start marker is `call parse`; after the end marker, `jmp .loop`."""
    _kernel_int3()
    image, symbols = kfx
    for _ in range(6):
        vm = _parent(image, "kernel")
        try:
            rip = vm.vcpus[0].get_regs().rip
            code = read_virt(vm, rip, 5)
            assert code[0] == 0xE8, f"not at the start marker: {code.hex()} at {rip:#x}"
            assert rip + 5 + int.from_bytes(code[1:], "little", signed=True) == symbols.address("parse")
        finally:
            vm.destroy(tree=True)


def test_the_kernel_mode_target_finds_both_bugs(kfx: tuple[Path, SymbolTable]) -> None:
    """`kernel`: the harness and the parser in CPL0, faults taken without a stack switch."""
    _kernel_int3()
    image, symbols = kfx
    vm = _parent(image, "kernel")
    try:
        assert vm.vcpus[0].get_sregs().cs.selector & 3 == 0
        start, end = _parser(vm)
        with Fuzzer(vm, int3_markers=True, coverage=[(start, end)], budget_s=2.0) as fz:
            assert fz.input.pieces == ((BUF_A + 0xFF0, 16), (BUF_B, SIZE - 16))
            assert fz.execute(bug("0")).outcome == "ok"
            one, two = fz.execute(bug("1")), fz.execute(bug("2"))
            assert (one.vector, one.rip) == (14, symbols.address("parse.bug1_load"))
            assert (two.vector, two.rip) == (14, symbols.address("parse.bug2_store"))
            assert one.system is not None and one.system["cpl"] == 0
        with Fuzzer(vm, int3_markers=True, budget_s=2.0) as fz:     # no coverage: no breakpoint, only the markers
            assert [fz.execute(bug("0")).outcome for _ in range(3)] == ["ok"] * 3
            assert fz.execute(bug("1")).vector == 14
    finally:
        vm.destroy(tree=True)
