"""Issue 13 item 7: a Linux kernel module fuzzed the KF/x way, end to end.

guests/linux-kfx/: an out-of-tree module (kfx_target.c) with KF/x's breakpoint harness (int3, RAX = 0x13371337,
RDI/RSI = a vmalloc'ed buffer of 8 KiB and its size, the same magic at the end) around a record parser whose type-2
record indexes a table of four handlers unchecked. It is built against the CI kernel (guests/linux/build-kernel.sh,
CONFIG_MODULES=y), and a tiny static /init (init.c, no libc) finit_module()s it from its own initramfs; the module's
init runs the harness once and prints the parser's range (`parse=0x... end=0x...`: the module's load address as
the module itself sees it).

One module-scoped fixture boots the kernel to the start marker (inside finit_module, in kernel mode) and saves the
machine under build/linux-kfx-test/, keyed by the kernel, the initramfs, the CPU policy and the save-file format;
later sessions restore it (CI boots fresh). The fuzzer then forks it, writes each input through the kernel's page
tables, covers the module's code, and catches the planted bug through Linux's default sinks (from System.map) and
its fault breakpoints. Where guest kernel mode is emulated (kvm_pvm), every input runs as emulated kernel code."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from linux_guest import BOOT_LIMIT, CMDLINE, CPUID, ROOT, _key
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer
from vmfork.fuzz.harness import INT3_START, Harness, run_to_start
from vmfork.fuzz.sinks import resolve_sinks
from vmfork.snapshot import savefile
from vmfork.vmi.symbols import SymbolTable

KFX = ROOT / "build" / "linux-kfx"
CACHE = ROOT / "build" / "linux-kfx-test"
KERNEL = ROOT / "build" / "linux-min" / "vmlinux"
SYSTEM_MAP = ROOT / "build" / "linux-min" / "System.map"
BUF_SIZE = 8192
VALID = bytes.fromhex("0103414243" "020300050a" "0000")      # name "ABC"; handler 0 (add) over 5, 10; the end
BUG = bytes.fromhex("02020907" "0000")                      # handler index 9 of 4


@dataclass
class AtStart:
    vm: VM
    console: bytes
    how: str
    parse: tuple[int, int]          # the module's fuzzed code, as it printed it


def _build() -> Path:
    r = subprocess.run([str(ROOT / "guests" / "linux-kfx" / "build.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return KFX / "initramfs.cpio"


def _range(console: bytes) -> tuple[int, int]:
    m = re.search(rb"kfx_target: input=0x[0-9a-f]+ size=\d+ parse=0x([0-9a-f]+) end=0x([0-9a-f]+)", console)
    assert m, console[-3000:]
    return int(m.group(1), 16), int(m.group(2), 16)


def _boot(initrd: Path) -> tuple[VM, bytes, float]:
    vm = VM.create(memory_mib=256, vcpus=1, name="linux-kfx", cpuid=CPUID)
    try:
        assert vm.load_kernel(KERNEL, initrd=str(initrd), cmdline=CMDLINE) == "linux-pvh"
        t0 = time.monotonic()
        run_to_start(vm, Harness("int3"), timeout=BOOT_LIMIT)
        return vm, bytes(vm.device("serial0").output()), time.monotonic() - t0
    except BaseException as e:
        tail = bytes(vm.device("serial0").output())[-2000:].decode(errors="replace")
        vm.destroy()
        if isinstance(e, Exception):
            pytest.fail(f"the module's start marker was not reached: {e}\nconsole tail:\n{tail}")
        raise


@pytest.fixture(scope="module")
def at_start() -> Iterator[AtStart]:
    initrd = _build()
    h = hashlib.sha256(_key(KERNEL, initrd).encode())
    h.update((ROOT / "src" / "vmfork" / "fuzz" / "harness.py").read_bytes())   # where the parent stops
    saved = CACHE / f"{h.hexdigest()[:20]}.save"
    transcript = saved.with_suffix(".log")
    if saved.exists() and transcript.exists() and not os.environ.get("CI"):
        t0 = time.monotonic()
        vm = savefile.restore(saved)
        console, how = transcript.read_bytes(), f"restored in {time.monotonic() - t0:.2f} s"
    else:
        vm, console, took = _boot(initrd)
        how = f"booted to the start marker in {took:.0f} s"
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob("*.save"):
            old.unlink()
        tmp = saved.with_suffix(".tmp")
        savefile.save(vm, tmp)
        transcript.write_bytes(console)
        tmp.rename(saved)
    print(f"\nLinux with kfx_target at its start marker: {how}")
    try:
        yield AtStart(vm, console, how, _range(console))
    finally:
        vm.destroy(tree=True)


@pytest.fixture(scope="module")
def symbols() -> SymbolTable:
    return SymbolTable.load(SYSTEM_MAP)


def _fuzzer(at: AtStart, symbols: SymbolTable, **options: object) -> Fuzzer:
    return Fuzzer(at.vm, int3_markers=True, coverage=[at.parse], symbols=symbols,
                  sinks=resolve_sinks([], symbols), budget_s=2.0, **options)   # type: ignore[arg-type]


def test_the_kernel_stops_at_the_modules_start_marker_in_kernel_mode(at_start: AtStart) -> None:
    vm = at_start.vm
    regs, sregs = vm.vcpus[0].get_regs(), vm.vcpus[0].get_sregs()
    assert sregs.cs.selector & 3 == 0
    assert regs.rax == INT3_START
    assert regs.rsi == BUF_SIZE
    assert regs.rdi >> 44 == 0xFFFFC, f"{regs.rdi:#x} is not a vmalloc address"
    assert regs.rip >> 32 == 0xFFFFFFFF                 # in the module's code (modules live at the top)
    assert b"Run /init as init process" in at_start.console
    assert b"kfx_target: parse returned" not in at_start.console        # stopped before its end marker


def test_a_valid_input_runs_the_parser_to_the_end_marker_with_module_coverage(at_start: AtStart,
                                                                            symbols: SymbolTable) -> None:
    start, end = at_start.parse
    with _fuzzer(at_start, symbols) as fz:
        assert len(fz.input.pieces) >= 2            # vmalloc: two pages, not contiguous in physical memory
        assert sum(n for _gpa, n in fz.input.pieces) == BUF_SIZE
        res = fz.execute(VALID)
        assert (res.outcome, res.kind) == ("ok", "end"), res
        assert res.new_blocks and all(start <= b < end for b in res.new_blocks)
        assert fz.execute(VALID).outcome == "ok"            # the same again, from a reset fork


def test_the_fuzz_forks_log_into_bitmaps_and_drop_translations_at_each_reset(at_start: AtStart, symbols: SymbolTable,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzzer's sink and fuzz forks of a Linux parent are made like any Linux fork here (fork.dirty_log_mode,
    flush_translations_on_reset), and its resets take the flush: without it a reset Linux fork ran on stale shadow
    translations (issue 15); without bitmaps it drowned in dirty-ring-full exits (4-6 execs/s, issue 13)."""
    from vmfork.fork import kernel_mode_emulated
    from vmfork.memory import GuestMemory
    flushes = []
    drop = GuestMemory.drop_translations
    monkeypatch.setattr(GuestMemory, "drop_translations", lambda self: (flushes.append(self), drop(self))[1])
    with _fuzzer(at_start, symbols) as fz:
        for _ in range(3):
            assert fz.execute(VALID).outcome == "ok"
        emulated = kernel_mode_emulated()
        for fork in (fz.sink, fz.fork):
            assert fork.flush_translations_on_reset is emulated, fork.name
            assert fork.shell.dirty_ring is not emulated, fork.name
        assert len([m for m in flushes if m is fz.fork.memory]) >= (2 if emulated else 0), flushes


def test_the_planted_bug_is_a_crash_in_the_parser(at_start: AtStart, symbols: SymbolTable) -> None:
    """The unchecked handler index: the parser's indirect call faults (a kernel-mode fault inside the covered
    module code, caught at Linux's own handler with the faulting RIP)."""
    start, end = at_start.parse
    with _fuzzer(at_start, symbols) as fz:
        res = fz.execute(BUG)
        assert res.outcome == "crash", res
        assert res.kind == "vector" and start <= (res.rip or 0) < end, res
        assert fz.execute(VALID).outcome == "ok"            # a crashed fork is replaced; the next input is fine


def test_the_default_linux_sinks_catch_it_without_fault_breakpoints(at_start: AtStart, symbols: SymbolTable) -> None:
    """With `--faults none` the oops path is all there is: one of Linux's default sinks stops it."""
    with _fuzzer(at_start, symbols, faults=False) as fz:
        res = fz.execute(BUG)
        assert (res.outcome, res.kind) == ("crash", "sink"), res
        assert res.sink in resolve_sinks([], symbols), res


def test_a_campaign_from_a_valid_seed_finds_the_planted_bug(at_start: AtStart, symbols: SymbolTable,
                                                           tmp_path: Path) -> None:
    with _fuzzer(at_start, symbols) as fz:
        st = fz.fuzz([VALID], seconds=240, rng_seed=1, stop_on_crash=True, out_dir=tmp_path, max_len=64)
    print(f"\n{st.execs} inputs in {st.elapsed_s:.1f} s ({st.execs / st.elapsed_s:.0f} execs/s, kernel mode emulated "
          f"here); first crash after {st.first_crash_execs} inputs")
    assert st.unique_crashes >= 1, st
    assert list((tmp_path / "crashes").glob("*.bin"))
