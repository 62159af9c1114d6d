"""The fuzzer (issue 6) on the `fuzz` test guest: outcomes, the planted bug, replay, oversized inputs, hangs."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import console
from vmfork.fork import VM
from vmfork.fuzz import Coverage, Fuzzer, basic_blocks
from vmfork.fuzz.cli import register_fuzz_commands
from vmfork.vmi import read_virt

SEED = b"FUZZA\x00"
BUG = b"FUZZB\x01"


@pytest.fixture(scope="module")
def target(pvh_guest: Path) -> Iterator[tuple[VM, int, int]]:
    """The `fuzz` guest paused at its ready marker, and its parser's code range."""
    vm = VM.create(memory_mib=64, name="fuzz-target")
    try:
        vm.load_kernel(pvh_guest, cmdline="fuzz")
        ev = vm.run(timeout=30)
        assert ev.reason == "harness-start", f"{ev} / {console(vm)!r}"
        m = re.search(r"parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)", console(vm))
        assert m, console(vm)
        yield vm, int(m.group(1), 16), int(m.group(2), 16)
    finally:
        vm.destroy(tree=True)


def test_outcomes_of_crafted_inputs(target: tuple[VM, int, int]) -> None:
    vm, start, end = target
    with Fuzzer(vm, budget_s=0.2) as fz:
        assert (fz.input_addr, fz.input_size) == (0x800000, 0x10000)
        for data in (b"", b"hello", SEED, b"FUZZB\x00C\x00"):
            res = fz.execute(data)
            assert (res.outcome, res.kind) == ("ok", "end"), (data, res)
        res = fz.execute(BUG)
        assert (res.outcome, res.kind, res.vector) == ("crash", "vector", 14)
        assert res.rip is not None and start <= res.rip < end
        assert res.registers is not None and "rip" in res.registers
        fault_rip = res.rip
        t = time.monotonic()
        res = fz.execute(b"HANG")
        took = time.monotonic() - t
        # the crash replaced the fork: a new fork's first timeout is confirmed by a second run in the warm fork
        assert res.outcome == "hang" and 2 * 0.2 <= took < 2 * 0.2 + 0.5, (res, took)
        assert res.rip is not None and start <= res.rip < end
        assert fz.execute(SEED).outcome == "ok"          # the fork carries on after a crash and a hang
    # a sink breakpoint on the faulting store is reached before the fault
    with Fuzzer(vm, sinks=[fault_rip], budget_s=0.2) as fz:
        assert fz.execute(SEED).outcome == "ok"
        res = fz.execute(BUG)
        assert (res.outcome, res.kind, res.rip, res.sink) == ("crash", "sink", fault_rip, f"{fault_rip:#x}")
        assert res.registers is not None and res.registers["rip"] == fault_rip
        assert fz.execute(b"FUZZB\x00").kind == "sink"     # the sink is the store itself, bank 0 reaches it too
        assert fz.execute(SEED).outcome == "ok"


def test_coverage_blocks_are_one_shot(target: tuple[VM, int, int]) -> None:
    vm, start, end = target
    blocks = basic_blocks(vm, start, end)
    assert blocks[0] == start and len(blocks) >= 10
    cov = Coverage(list(blocks))
    with Fuzzer(vm, coverage=cov, budget_s=0.2) as fz:
        first = fz.execute(b"hello")
        assert first.outcome == "ok" and first.new_blocks
        assert fz.execute(b"hello").new_blocks == []     # nothing new the second time
        deeper = fz.execute(SEED)
        assert deeper.new_blocks and not set(deeper.new_blocks) & set(first.new_blocks)
        assert fz.sink_dbg is not None
        assert fz.execute(b"").new_blocks == []           # the fork is rebuilt from the sink before this one
        assert not any(bp.address in cov.hit for bp in fz.sink_dbg.list())  # covered blocks left the sink
        assert cov.hit == set(first.new_blocks) | set(deeper.new_blocks)


def test_planted_bug_is_found_and_replays(target: tuple[VM, int, int], tmp_path: Path) -> None:
    vm, start, end = target
    with Fuzzer(vm, coverage=[(start, end)], budget_s=0.05) as fz:
        st = fz.fuzz([SEED], seconds=20, rng_seed=1, stop_on_crash=True, out_dir=tmp_path)
    assert st.unique_crashes == 1 and st.first_crash_s is not None and st.first_crash_s <= 20, st
    assert st.execs_per_s > 200
    (crash,) = st.crash_files
    saved = json.loads(Path(crash).with_suffix(".json").read_text())
    assert saved["outcome"] == "crash" and saved["vector"] == 14 and start <= saved["rip"] < end
    data = Path(crash).read_bytes()
    for _ in range(2):                                    # a fresh sink and fork each time: same outcome and RIP
        with Fuzzer(vm, budget_s=0.2) as fz:
            res = fz.execute(data)
        assert (res.outcome, res.kind, res.vector, res.rip) == ("crash", "vector", 14, saved["rip"])


def test_oversized_inputs_are_truncated_or_rejected(target: tuple[VM, int, int]) -> None:
    vm, _, _ = target
    size = 64
    after = vm.memory.read(0x800000 + size, 4096)
    big = b"FUZZ" + b"C\x00" * 200 + b"B\x01"             # the bug lies beyond the buffer: truncated away
    with Fuzzer(vm, input_size=size, budget_s=0.2) as fz:
        assert fz.capacity == size - 8
        res = fz.execute(big)
        assert res.outcome == "ok"
        mem = fz.fork.memory
        assert int.from_bytes(mem.read(0x800000, 8), "little") == size - 8
        assert mem.read(0x800008, size - 8) == big[:size - 8]
        assert mem.read(0x800000 + size, 4096) == after      # nothing written past the buffer
    with Fuzzer(vm, input_size=size, oversize="reject", budget_s=0.2) as fz:
        res = fz.execute(big)
        assert (res.outcome, res.kind) == ("rejected", "oversize")
        assert fz.fork.memory.read(0x800000 + size, 4096) == after
        assert fz.execute(b"x" * (size - 8)).outcome == "ok"  # exactly full is fine


def test_hangs_are_counted_within_their_budget(target: tuple[VM, int, int]) -> None:
    vm, _, _ = target
    with Fuzzer(vm, budget_s=0.1) as fz:
        t = time.monotonic()
        st = fz.fuzz([b"HANG", b"HANG\x00"], seconds=0.0)     # only the seeds run
        elapsed = time.monotonic() - t
    assert (st.execs, st.hangs, st.crashes) == (2, 2, 0)
    assert elapsed < 3 * 0.1 + 0.6          # the first seed's timeout, in a new fork, is confirmed by a second run


def test_a_hang_that_reaches_new_blocks_is_still_a_hang(target: tuple[VM, int, int]) -> None:
    """The run is repeated without the blocks it hit first (their exits are vmfork's time, not the guest's), and
    the repeat, reaching no new block, is what times out (in a new fork, since the first run's blocks were removed
    by rebuilding it: its own timeout is confirmed by a third run in the warm fork)."""
    vm, start, end = target
    with Fuzzer(vm, coverage=[(start, end)], budget_s=0.1) as fz:
        t = time.monotonic()
        res = fz.execute(b"HANG")
        assert (res.outcome, res.kind) == ("hang", "timeout"), res
        assert res.new_blocks, "the first run's new blocks are kept"
        assert time.monotonic() - t < 3 * 0.1 + 0.6
        assert fz.execute(b"HANG").new_blocks == []


def test_cli_fuzz_and_replay(pvh_guest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="vmfork")
    register_fuzz_commands(parser.add_subparsers(dest="command", required=True))
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a").write_bytes(SEED)
    out = tmp_path / "out"
    args = parser.parse_args(["fuzz", "--kernel", str(pvh_guest), "--corpus", str(seeds), "--out", str(out),
                              "--seconds", "20", "--seed", "1", "--stop-on-crash", "--quiet"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["unique_crashes"] == 1
    crash = next((out / "crashes").glob("*.bin"))
    args = parser.parse_args(["fuzz", "--kernel", str(pvh_guest), "--replay", str(crash)])
    assert args.func(args) == 10            # a crash's exit status
    res = json.loads(capsys.readouterr().out)
    saved = json.loads(crash.with_suffix(".json").read_text())
    assert (res["outcome"], res["vector"], res["rip"]) == ("crash", 14, saved["rip"])


# --- under AFL++ ------------------------------------------------------------------------------------------------

def test_persistent_block_hits_cost_one_exit_each(target: tuple[VM, int, int]) -> None:
    """AFL++'s edge map needs every block hit, in order. The fuzz fork's own trap answers (ForkTraps) take one exit
    per hit (the block's int3 goes back when another block traps); the Debugger's step-over takes two. Both see the
    same hits in the parser, whose loops all run through more than one block."""
    vm, start, end = target
    data = b"FUZZA\x01C\x00A\x02C\x00B\x00"
    seen: dict[bool, list[int]] = {}
    exits: dict[bool, int] = {}
    for fast_traps in (True, False):
        hits: list[int] = []
        with Fuzzer(vm, coverage=[(start, end)], block_hook=hits.append, budget_s=0.5, fast_traps=fast_traps) as fz:
            for _ in range(2):                                      # the second run: after a reset
                hits.clear()
                before = fz.fork.exits
                assert fz.execute(data).outcome == "ok"
                exits[fast_traps] = fz.fork.exits - before
        seen[fast_traps] = hits
    assert seen[True] == seen[False] and len(seen[True]) > 20
    assert set(seen[True]) <= set(basic_blocks(vm, start, end))
    assert exits[True] == len(seen[True]) + 1                       # one per hit, and the end marker
    assert exits[False] == 2 * len(seen[True]) + 1                  # a step over each hit: a second exit


AFL_ENV = {"AFL_SKIP_BIN_CHECK": "1", "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1", "AFL_NO_AFFINITY": "1",
           "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1", "AFL_FORKSRV_INIT_TMOUT": "60000"}
needs_afl = pytest.mark.skipif(shutil.which("afl-fuzz") is None, reason="afl-fuzz not installed (Debian: afl++)")


def _afl_command(tmp_path: Path, guest: Path, seed: bytes, seconds: int, code: tuple[int, int]) -> list[str]:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "seed").write_bytes(seed)
    return ["afl-fuzz", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-t", "200", "-V", str(seconds),
            "--", sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel", str(guest), "--budget-ms", "400",
            "--cover", f"{code[0]:#x}-{code[1]:#x}"]


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.add(k)
            todo.append(k)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z":
                alive.add(p)
        except (OSError, IndexError):
            pass
    return alive


@needs_afl
def test_afl_fuzz_finds_the_bug_through_the_fork_server(target: tuple[VM, int, int], pvh_guest: Path,
                                                        tmp_path: Path) -> None:
    vm, start, end = target
    env = {**os.environ, **AFL_ENV, "AFL_BENCH_UNTIL_CRASH": "1"}
    command = _afl_command(tmp_path, pvh_guest, b"FUZZB\x00", 40, (start, end))
    proc = subprocess.run(command, env=env, capture_output=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:]
    crashes = [p for p in (tmp_path / "out" / "default" / "crashes").iterdir() if p.name.startswith("id:")]
    assert crashes and all(",sig:11," in p.name for p in crashes)
    with Fuzzer(vm, budget_s=0.2) as fz:
        res = fz.execute(crashes[0].read_bytes())
    assert (res.outcome, res.vector) == ("crash", 14) and res.rip is not None and start <= res.rip < end
    stats = (tmp_path / "out" / "default" / "fuzzer_stats").read_text()
    assert int(re.search(r"execs_done\s*:\s*(\d+)", stats).group(1)) > 0  # type: ignore[union-attr]


@needs_afl
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_afl_fuzz_leaves_nothing_behind(target: tuple[VM, int, int], pvh_guest: Path, tmp_path: Path,
                                                 sig: signal.Signals) -> None:
    _, start, end = target
    env = {**os.environ, **AFL_ENV}
    command = _afl_command(tmp_path, pvh_guest, SEED, 60, (start, end))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop_afl_and_check_nothing_is_left(proc, tmp_path / "out", sig, start_timeout=45)


def stop_afl_and_check_nothing_is_left(proc: subprocess.Popen[bytes], out: Path, sig: signal.Signals, *,
                                       start_timeout: float) -> None:
    """Wait until afl-fuzz (`proc`, writing to `out`) runs, send it `sig`, and check that none of the processes
    under it (vmfork, the fork server, and its placeholder, an exited child) outlive it."""
    try:
        stats = out / "default" / "fuzzer_stats"
        deadline = time.monotonic() + start_timeout
        while not stats.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert stats.exists(), "afl-fuzz did not get going"
        ours = _descendants(proc.pid)
        assert _alive(ours)                       # vmfork (the fork server; its placeholder is a zombie)
        proc.send_signal(sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _alive(ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(ours)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keep_stops_at_the_first_crash_and_keeps_its_fork(target: tuple[VM, int, int]) -> None:
    vm, start, end = target
    with Fuzzer(vm, coverage=[(start, end)], budget_s=0.05) as fz:
        st = fz.fuzz([SEED, BUG, b"hello"], seconds=10, keep=True)
        assert st.crashes == 1 and st.execs == 2
        (kept,) = fz.kept
        assert kept.state == "paused" and kept is not fz.fork
        # kept where vmfork caught the fault: at the guest's #PF handler, the faulting code's frame on its stack
        crash = fz.last_crash
        assert crash is not None and crash.rip is not None and start <= crash.rip < end
        regs = kept.vcpus[0].get_regs()
        assert fz.fault_handlers is not None and fz.fault_handlers.entries.get(regs.rip) == 14
        assert int.from_bytes(read_virt(kept, regs.rsp + 8, 8), "little") == crash.rip
        assert fz.execute(b"hello").outcome == "ok"      # fuzzing can go on in a fresh fork
        assert fz.execute(BUG).outcome == "crash"
    assert kept.state == "destroyed"                    # close() takes kept forks too


TRIPLE = b"FUZZTF"          # the parser's 'T' record with value 'F': the kernel's triple-fault service


def test_a_triple_fault_is_a_crash_with_its_state_saved(target: tuple[VM, int, int], tmp_path: Path) -> None:
    """The guest really triple-faults (an empty IDT, then ud2 in CPL0): KVM_EXIT_SHUTDOWN, a crash of kind
    triple-fault with the vCPU's registers in the crash JSON, and a replay does the same."""
    vm, _, _ = target
    with Fuzzer(vm, budget_s=0.5) as fz:
        st = fz.fuzz([SEED, TRIPLE, SEED], seconds=0.0, out_dir=tmp_path)   # only the seeds run
        assert (st.execs, st.ok, st.crashes) == (3, 2, 1), st                # the fuzzing goes on after it
        res = fz.last_crash
        assert res is not None and (res.outcome, res.kind) == ("crash", "triple-fault"), res
        assert "shut down" in res.detail and fz.fork.state != "crashed"      # a fresh fork replaced the dead one
    (crash,) = st.crash_files
    saved = json.loads(Path(crash).with_suffix(".json").read_text())
    assert (saved["outcome"], saved["kind"], saved["vector"]) == ("crash", "triple-fault", None)
    regs, system = saved["registers"], saved["system"]
    assert regs["rip"] == saved["rip"] and regs["rax"] == 0x10                # in the service, RAX = SVC_TRIPLE_FAULT
    assert system["idt_limit"] == 0 and system["cpl"] == 0                   # how the guest made the fault fatal
    with Fuzzer(vm, budget_s=0.5) as fz:
        again = fz.execute(Path(crash).read_bytes())
    assert (again.outcome, again.kind, again.rip) == ("crash", "triple-fault", saved["rip"])
    assert again.registers == regs


def test_cover_auto_takes_the_range_the_target_prints(pvh_guest: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a").write_bytes(b"FUZZA\x00")
    r = subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", "--kernel", str(pvh_guest), "--cmdline", "fuzz",
                        "--corpus", str(seeds), "--out", str(tmp_path / "out"), "--cover", "auto", "--execs", "50",
                        "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "19 blocks to cover" in r.stderr


def test_keep_with_gdb_serves_the_crashing_fork_to_a_real_gdb(pvh_guest: Path, tmp_path: Path) -> None:
    """--gdb: after the first crash the fuzzer keeps that fork and serves it to one GDB client, which sees the
    crashed state (the guest's exception report runs in its kernel, past the fault), then ends when it detaches."""
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed (the test setup installs it)")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "bug").write_bytes(BUG)
    proc = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "fuzz", "--kernel", str(pvh_guest), "--corpus",
                             str(seeds), "--out", str(tmp_path / "out"), "--seconds", "30", "--quiet", "--gdb", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, f"no gdb line: {''.join(lines)} {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
            m = re.fullmatch(r"gdb: target remote 127\.0\.0\.1:(\d+)\n", line)
            if m:
                break
        summary = json.loads("".join(lines[:-1]))
        assert summary["unique_crashes"] == 1
        r = subprocess.run([gdb, "-nx", "-batch", "-ex", "set confirm off", "-ex",
                            f"target remote 127.0.0.1:{m.group(1)}", "-ex", "info registers rax", "-ex", "detach"],
                           capture_output=True, text=True, timeout=60)
        assert "[Inferior 1 (Remote target) detached]" in r.stdout, r.stdout + r.stderr
        assert re.search(r"^rax\s+0x[0-9a-f]+", r.stdout, re.M), r.stdout
        assert proc.wait(timeout=30) == 0
        assert "kept the crashing fork" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gdb_option_bad_input_is_one_line(pvh_guest: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", "--kernel", str(pvh_guest), "--out",
                        str(tmp_path), "--gdb", "localhost:http"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "--gdb localhost:http" in r.stderr and "Traceback" not in r.stderr


def test_kernel_only_options_are_refused_with_a_domain(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", "--domain", "target", "--out", str(tmp_path),
                        "--memory", "128", "--cmdline", "fuzz"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("vmfork fuzz: --cmdline, --memory are for --kernel: a domain is already booted "
                                "(its config sets them)")
