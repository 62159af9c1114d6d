"""The fuzzing example on a third-party parser (issue 6): Debian's jsmn, compiled freestanding into the test guest's
user mode with a planted off-by-one (guests/jsmn/), found by `vmfork fuzz` through the real command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import console
from test_guest_build import PT_LOAD, elf_header
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer

ROOT = Path(__file__).resolve().parents[1]
JSMN_DIR = ROOT / "guests" / "jsmn"
SEEDS = JSMN_DIR / "seeds"
JSMN_ADDR = 0x400000
MAX_TOKENS = 24                      # harness.c: the token array on fuzz_json's stack

ORIGINAL = "  if (parser->toknext >= num_tokens) {"
PLANTED = "  if (parser->toknext > num_tokens) {"
DEBIAN_JSMN_H = Path("/usr/include/jsmn.h")


def array_of(n: int) -> bytes:
    """A JSON array with n - 1 numbers: n tokens (the array and its elements)."""
    return b"[" + b",".join(b"%d" % i for i in range(n - 1)) + b"]"


@pytest.fixture(scope="module")
def images(guest_dir: Path) -> dict[str, Path]:
    return {v: guest_dir / f"jsmn-{v}.elf" for v in ("pvh", "multiboot")}


@pytest.fixture(scope="module")
def symbols(guest_dir: Path) -> dict[str, int]:
    """Symbols of the C part (guests/jsmn/build.sh leaves jsmn.elf next to the flat image)."""
    out = subprocess.run(["nm", str(guest_dir / "jsmn" / "jsmn.elf")], check=True, capture_output=True,
                         text=True).stdout
    return {name: int(value, 16) for value, _kind, name in (line.split() for line in out.splitlines())}


@pytest.fixture(scope="module")
def target(images: dict[str, Path]) -> Iterator[tuple[VM, int, int]]:
    """The `jsmn` program paused at its ready marker, and the C code's range it printed."""
    vm = VM.create(memory_mib=64, name="jsmn-target")
    try:
        vm.load_kernel(images["pvh"], cmdline="jsmn")
        ev = vm.run(timeout=30)
        assert ev.reason == "harness-start", f"{ev} / {console(vm)!r}"
        m = re.search(r"vmfork-guest: jsmn parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)\nvmfork-guest: ready\n", console(vm))
        assert m, console(vm)
        yield vm, int(m.group(1), 16), int(m.group(2), 16)
    finally:
        vm.destroy(tree=True)


def test_images_carry_the_c_code_in_a_second_segment(images: dict[str, Path], symbols: dict[str, int],
                                                     guest_dir: Path) -> None:
    flat = (guest_dir / "jsmn" / "jsmn.bin").read_bytes()
    for path in images.values():
        img = path.read_bytes()
        loads = [ph for ph in elf_header(img)[3] if ph.type == PT_LOAD]
        assert [ph.paddr for ph in loads] == [0x100000, JSMN_ADDR], path
        c = loads[1]
        assert c.offset % 4096 == 0 and img[c.offset:c.offset + c.filesz] == flat
        assert c.memsz == symbols["__end"] - JSMN_ADDR >= c.filesz      # .bss (zeroed by the loader) included
    assert symbols["fuzz_json"] == symbols["__text_start"] == JSMN_ADDR


def test_the_planted_bug_is_the_one_documented_line(guest_dir: Path) -> None:
    built = (guest_dir / "jsmn" / "jsmn.h").read_text().splitlines()
    original = DEBIAN_JSMN_H.read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, built, strict=True) if a != b]
    assert changed == [(ORIGINAL, PLANTED)]


def test_a_header_the_change_does_not_fit_is_refused(tmp_path: Path) -> None:
    header = tmp_path / "jsmn.h"
    header.write_text(DEBIAN_JSMN_H.read_text().replace(ORIGINAL, PLANTED))     # e.g. a jsmn that changed there
    r = subprocess.run([str(JSMN_DIR / "build.sh")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "JSMN_H": str(header), "VMFORK_GUEST_DIR": str(tmp_path / "out")})
    assert r.returncode == 1 and "the planted bug no longer applies" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "jsmn" / "jsmn.inc").exists()


def test_valid_documents_run_to_the_end_marker(target: tuple[VM, int, int]) -> None:
    vm, _, _ = target
    with Fuzzer(vm, budget_s=0.5) as fz:
        for seed in sorted(SEEDS.iterdir()):
            assert fz.execute(seed.read_bytes()).outcome == "ok", seed.name
        for data in (b"", b"{", b"not json", b'{"a": 1', b"[" * MAX_TOKENS, array_of(MAX_TOKENS)):
            res = fz.execute(data)
            assert (res.outcome, res.kind) == ("ok", "end"), (data, res)


def test_one_token_too_many_is_a_stack_smash_caught_by_the_canary(target: tuple[VM, int, int],
                                                                   symbols: dict[str, int]) -> None:
    vm, start, end = target
    assert (start, end) == (symbols["__text_start"], symbols["__text_end"])
    # faults seen by vmfork at the guest's #UD handler (the default), or reported by the guest itself (port 0xf4)
    for faults in (True, False):
        with Fuzzer(vm, budget_s=0.5, faults=faults) as fz:
            assert fz.execute(array_of(MAX_TOKENS)).outcome == "ok"          # exactly full: fine
            for data in (array_of(MAX_TOKENS + 1), array_of(200), b'{"k": ' + array_of(MAX_TOKENS)[:-1] + b","):
                res = fz.execute(data)
                assert (res.outcome, res.kind, res.vector) == ("crash", "vector", 6), (data, res)
                # the `ud2` in __stack_chk_fail, inside the printed code range
                assert res.rip is not None and symbols["__stack_chk_fail"] <= res.rip < end, hex(res.rip or 0)
                assert fz.fork.memory.read(res.rip, 2) == b"\x0f\x0b"
                if not faults:
                    assert res.status == 0x86 and b"EXCEPTION vec=6 rip=" in fz.fork.device("serial0").output()
                # ... called from fuzz_json's epilogue (__stack_chk_fail records its return address first)
                caller = int.from_bytes(fz.fork.memory.read(symbols["stack_chk_failed_in"], 8), "little")
                assert JSMN_ADDR < caller < min(v for v in symbols.values() if v > JSMN_ADDR), hex(caller)
            assert fz.execute(array_of(MAX_TOKENS)).outcome == "ok"          # a fresh fork after the crash


def test_the_multiboot_image_runs_the_same_program(images: dict[str, Path]) -> None:
    vm = VM.create(memory_mib=64, name="jsmn-multiboot")
    try:
        vm.load_kernel(images["multiboot"], cmdline="jsmn")
        assert vm.run(timeout=30).reason == "harness-start", console(vm)
        with Fuzzer(vm, budget_s=0.5) as fz:
            assert fz.execute(array_of(MAX_TOKENS)).outcome == "ok"
            assert fz.execute(array_of(MAX_TOKENS + 1)).vector == 6
    finally:
        vm.destroy(tree=True)


def vmfork(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The real command line, as the README's quick start runs it: the console script of this interpreter's
    environment (.venv/bin/vmfork), or the same entry point through -m where it is not installed as a script."""
    script = Path(sys.executable).parent / "vmfork"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vmfork.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_vmfork_fuzz_finds_the_planted_bug_and_replays_it(images: dict[str, Path], symbols: dict[str, int],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "fz"
    t = time.monotonic()
    r = vmfork("fuzz", "--kernel", str(images["pvh"]), "--cmdline", "jsmn", "--corpus", str(SEEDS), "--out", str(out),
               "--cover", "auto", "--seed", "3", "--seconds", "30", "--stop-on-crash", "--quiet",
               timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["unique_crashes"] == 1 and summary["first_crash_s"] is not None, summary
    assert summary["blocks_total"] > 100 and summary["blocks_hit"] > 0, summary   # --cover auto took the C code
    assert time.monotonic() - t < 40
    (crash,) = (out / "crashes").glob("*.bin")
    saved = json.loads(crash.with_suffix(".json").read_text())
    assert (saved["outcome"], saved["kind"], saved["vector"]) == ("crash", "vector", 6)
    assert symbols["__stack_chk_fail"] <= saved["rip"] < symbols["__text_end"]
    r = vmfork("fuzz", "--kernel", str(images["pvh"]), "--cmdline", "jsmn", "--replay", str(crash), timeout=60)
    assert r.returncode == 10, r.stderr     # a crash
    res = json.loads(r.stdout)
    assert (res["outcome"], res["vector"], res["rip"]) == ("crash", 6, saved["rip"])


def test_time_spent_on_first_block_hits_does_not_make_a_hang(target: tuple[VM, int, int]) -> None:
    """The first run of a seed reaches about a hundred new coverage blocks, an exit each (tens of ms here): with a
    budget far below that, the input is run again without those breakpoints instead of being called a hang."""
    vm, start, end = target
    seed = (SEEDS / "vm.json").read_bytes()
    with Fuzzer(vm, coverage=[(start, end)], budget_s=0.005) as fz:
        res = fz.execute(seed)
        assert res.outcome == "ok", res
        assert len(res.new_blocks) > 50, res
        assert len(set(res.new_blocks)) == len(res.new_blocks)
        assert fz.execute(seed).outcome == "ok"
