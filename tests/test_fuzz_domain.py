"""`vmfork fuzz --domain` (issue 6, item 4a) end to end: real domains from `vmfork create`, the fuzzer as a real
`vmfork fuzz` process holding a fork of one, and the registry's view of it while it runs and after it ends (normally,
by SIGTERM, by SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_harness import CliHarness
from vmfork.toolstack.registry import DomainRecord

NEAR_BUG = b"FUZZB\x00"         # one byte from the `fuzz` program's planted bug (a 'B' record with a nonzero value)
INBUF = ("--input-addr", "0x800000", "--input-size", "0x10000")    # the `fuzz` program's input buffer


@pytest.fixture
def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    with CliHarness(tmp_path, pvh_guest) as t:
        yield t


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    d = tmp_path / "seeds"
    d.mkdir()
    (d / "near").write_bytes(NEAR_BUG)
    return d


class Fuzzers:
    """`vmfork fuzz` processes started in the background; whatever is left is killed at the end of the test."""

    def __init__(self, ts: CliHarness) -> None:
        self.ts = ts
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(self.ts.argv("fuzz", *args), env=self.ts.env, cwd=self.ts.base,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)


@pytest.fixture
def fuzzers(ts: CliHarness) -> Iterator[Fuzzers]:
    f = Fuzzers(ts)
    try:
        yield f
    finally:
        f.kill_all()


def _target(ts: CliHarness, name: str = "target", program: str = "fuzz") -> int:
    """A domain of the test guest paused at its harness ready marker."""
    domid = ts.create(ts.config(name, program))
    rec = ts.wait_state(domid, "paused")
    assert rec.reason == "harness-start", rec
    return domid


def _fuzz_entries(ts: CliHarness) -> list[DomainRecord]:
    return [r for r in ts.registry.all() if r.kind == "fuzz"]


def _wait_holding(ts: CliHarness, proc: subprocess.Popen[str]) -> DomainRecord:
    """Wait until the fuzzer process holds its fork (its entry is running) and return its entry."""
    def holding() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the fuzzer ended early ({proc.returncode}): {out}{err}{ts.debug()}")
        return any(r.state == "running" for r in _fuzz_entries(ts))
    ts.wait("the fuzzer to hold its fork", holding, timeout=30)
    [rec] = _fuzz_entries(ts)
    return rec


def test_fuzzing_a_domain_finds_the_bug_and_holds_the_domain_meanwhile(ts: CliHarness, seeds: Path,
                                                                         fuzzers: Fuzzers) -> None:
    target = _target(ts)
    out = ts.base / "out"

    # A long campaign, to look at the registry while it runs; SIGTERM (what `destroy --force` sends) ends it.
    proc = fuzzers.start("--domain", "target", "--corpus", str(seeds), "--out", str(out), "--seconds", "60",
                         "--quiet")
    held = _wait_holding(ts, proc)
    assert (held.name, held.parent, held.pid) == ("target-fuzz-1", target, proc.pid)
    entries = {e["name"]: e for e in ts.list_json()}
    assert entries["target-fuzz-1"]["parent"] == target and entries["target-fuzz-1"]["state"] == "running"
    assert entries["target"]["state"] == "paused"
    forks = ts.execute(target, "vmfork-query")["forks"]
    assert forks == [{"domid": held.domid, "name": "target-fuzz-1"}]
    ts.fail("unpause", "target", match=f"it has live forks (target-fuzz-1 (domain {held.domid}))")
    ts.fail("destroy", "target", match="has live forks (target-fuzz-1")
    ts.fail("console", "target-fuzz-1", match="held by a `vmfork fuzz` process")
    ts.fail("fuzz", "--domain", "target-fuzz-1", "--out", str(ts.base / "o2"), match="held by a `vmfork fuzz`")

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert _fuzz_entries(ts) == []                      # it removed its own entry on the way out
    ts.ok("unpause", "target")                          # the parent is free: it parses, pauses at the end marker,
    ts.wait_state(target, "paused")
    ts.ok("unpause", "target")                          # and, resumed again, at its next ready marker
    ts.wait("the target back at its ready marker", lambda: ts.record(target).reason == "harness-start")

    # A campaign that ends by itself at the first crash: the planted bug, with its status line and crash file.
    r = ts.run("fuzz", "--domain", str(target), "--corpus", str(seeds), "--out", str(out), "--seconds", "30",
               "--seed", "1", "--stop-on-crash", "--cover", "auto")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    stats = json.loads(r.stdout)
    assert stats["unique_crashes"] == 1 and stats["blocks_total"] > 0, stats
    assert f"{stats['blocks_total']} blocks to cover" in r.stderr          # the range printed in target's log
    assert "execs" in r.stderr.rsplit("\r", 1)[-1]                         # the live status line
    [crash] = stats["crash_files"]
    assert Path(crash).name.startswith("vector-14-")
    assert _fuzz_entries(ts) == [] and ts.record(target).state == "paused"
    r = ts.run("fuzz", "--domain", "target", "--replay", str(ts.base / crash))
    assert r.returncode == 10, r.stderr     # a crash
    assert json.loads(r.stdout)["vector"] == 14
    assert [e["name"] for e in ts.list_json()] == ["target"]


def test_a_killed_fuzzer_leaves_nothing_after_a_sweep(ts: CliHarness, seeds: Path, fuzzers: Fuzzers) -> None:
    target = _target(ts)
    args = ("--domain", "target", "--corpus", str(seeds), "--out", str(ts.base / "out"), "--seconds", "60",
            "--quiet")
    proc = fuzzers.start(*args)
    held = _wait_holding(ts, proc)
    proc.kill()
    proc.communicate(timeout=10)
    assert [e["name"] for e in ts.list_json()] == ["target"]        # list sweeps: the dead fuzzer's entry goes
    assert ts.registry.get(held.domid) is None
    assert ts.execute(target, "vmfork-query")["forks"] == []

    # destroy --force of the parent ends a running fuzzer first (SIGTERM), then the parent.
    proc = fuzzers.start(*args)
    held = _wait_holding(ts, proc)
    assert held.name == "target-fuzz-1"                # the number of an ended fuzzer is free again
    ts.ok("destroy", "--force", "target")
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert ts.registry.all() == []


def _fuzz_listed(ts: CliHarness) -> dict[str, Any] | None:
    """The fuzz entry's live numbers as `vmfork list --json` shows them (None: none yet)."""
    [entry] = [e for e in ts.list_json() if e["kind"] == "fuzz"]
    stats: dict[str, Any] | None = entry["fuzz"]
    return stats


def test_list_shows_a_fuzzers_live_numbers_until_it_ends(ts: CliHarness, seeds: Path, fuzzers: Fuzzers) -> None:
    target = _target(ts)
    args = ("--domain", "target", "--corpus", str(seeds), "--out", str(ts.base / "out"), "--seconds", "60",
            "--cover", "auto", "--quiet")
    proc = fuzzers.start(*args)
    held = _wait_holding(ts, proc)
    stats_file = ts.run_dir / f"{held.domid}.stats"
    assert held.parent == target and ts.listed("target")["fuzz"] is None     # only fuzz entries have numbers
    first: dict[str, Any] = {}

    def counting() -> bool:
        first.update(_fuzz_listed(ts) or {})
        return bool(first.get("execs"))
    ts.wait("the fuzzer's numbers in vmfork list", counting, timeout=30)
    assert stats_file.exists()
    # (the seed is one byte from the planted bug: it crashes often, always the same way)
    assert first["execs_per_s"] > 0 and first["corpus"] >= 1 and first["crashes"] >= first["unique_crashes"] >= 0
    assert first["blocks_total"] > 0 and 0 < first["blocks_hit"] <= first["blocks_total"]
    assert 0 <= first["age_s"] < 5

    def grown() -> bool:
        now = _fuzz_listed(ts)
        return now is not None and now["execs"] > first["execs"]
    ts.wait("the fuzzer's execs to grow", grown, timeout=10)

    table = ts.ok("list").splitlines()
    row = next(i for i, ln in enumerate(table) if ln.startswith("target-fuzz-1 "))
    line = table[row + 1]
    assert re.fullmatch(r" +fuzz: execs [1-9]\d*  [\d.]+/s  crashes \d+ \(\d+ unique\)  corpus [1-9]\d*  "
                        r"cov [1-9]\d*/[1-9]\d*  age [\d.]+s", line), table
    assert not any("fuzz:" in ln for ln in table[:row] + table[row + 2:]), table    # the target has no numbers
    tree = ts.ok("list", "--tree")
    assert re.search(r"target-fuzz-1 \(\d+\) .*\[fuzz: execs [1-9]\d*  [\d.]+/s  crashes \d+", tree), tree

    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert _fuzz_entries(ts) == [] and not stats_file.exists()
    assert "fuzz:" not in ts.ok("list")

    # Killed outright, a fuzzer leaves its file behind; the sweep of the next `vmfork list` removes it with the entry.
    proc = fuzzers.start(*args)
    held = _wait_holding(ts, proc)
    stats_file = ts.run_dir / f"{held.domid}.stats"
    ts.wait("the second fuzzer's numbers", lambda: stats_file.exists(), timeout=30)
    proc.kill()
    proc.communicate(timeout=10)
    assert stats_file.exists()
    assert [(e["name"], e["fuzz"]) for e in ts.list_json()] == [("target", None)]
    assert "fuzz:" not in ts.ok("list")
    assert not list(ts.run_dir.glob("*stats*"))


def test_list_shows_each_jobs_workers_own_numbers(ts: CliHarness, seeds: Path, fuzzers: Fuzzers) -> None:
    """--jobs 2 on a domain: two held forks, each with the numbers of the worker holding it."""
    _target(ts)
    proc = fuzzers.start("--domain", "target", "--corpus", str(seeds), "--out", str(ts.base / "out"), "--seconds",
                         "60", "--jobs", "2", "--quiet")
    listed: dict[str, Any] = {}

    def both_counting() -> bool:
        assert proc.poll() is None, proc.communicate()
        listed.clear()
        listed.update({e["name"]: e for e in ts.list_json() if e["kind"] == "fuzz"})
        return len(listed) == 2 and all(e["fuzz"] is not None and e["fuzz"]["execs"] > 0 for e in listed.values())
    ts.wait("both workers' numbers in vmfork list", both_counting, timeout=30)
    assert sorted(listed) == ["target-fuzz-1", "target-fuzz-2"]
    files = {e["domid"]: json.loads((ts.run_dir / f"{e['domid']}.stats").read_text()) for e in listed.values()}
    assert sorted(f["pid"] for f in files.values()) == sorted(e["pid"] for e in listed.values())  # its own worker's
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert _fuzz_entries(ts) == [] and not list(ts.run_dir.glob("*stats*"))


def test_errors_are_one_line(ts: CliHarness, seeds: Path) -> None:
    out = str(ts.base / "out")
    ts.fail("fuzz", "--domain", "nosuch", "--out", out, match="no domain named 'nosuch'")

    # busy in CPL3, never at a marker; kept as crashed when killed below (on_crash = destroy would remove it)
    spin = ts.create(ts.config("spin", "timer 60000", on_crash="preserve"))
    ts.wait_state(spin, "running")
    ts.fail("fuzz", "--domain", "spin", "--out", out, match="spin (domain 1) is running: vmfork fuzz --domain needs "
                                                            "it paused at its harness ready marker")
    ts.ok("pause", "spin")
    ts.fail("fuzz", "--domain", "spin", "--out", out, match="is paused, not at its harness ready marker")

    held = ts.create(ts.config("held", "fuzz"), "-p")
    ts.fail("fuzz", "--domain", str(held), "--out", out, match="is paused (created paused), not at its harness ready "
                                                               "marker: let it run to the marker (vmfork unpause")

    demo = _target(ts, "demo", "demo")                           # at a marker, but prints no code range
    ts.fail("fuzz", "--domain", "demo", "--out", out, "--cover", "auto",
            match=f"--cover auto: demo (domain {demo}) printed no `parse=0x... end=0x...` range")

    pid = ts.record(spin).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    ts.wait("spin's process to end", lambda: not ts.record(spin).alive)
    ts.fail("fuzz", "--domain", "spin", "--out", out, match="spin (domain 1) is not running: its process")

    p = ts.run("fuzz", "--out", out)
    assert p.returncode == 2 and "one of the arguments --kernel --template --domain is required" in p.stderr
    p = ts.run("fuzz", "--domain", "demo", "--kernel", str(ts.kernel), "--out", out)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr
    assert _fuzz_entries(ts) == []


def test_a_fork_made_paused_at_its_parents_marker_can_be_fuzzed(ts: CliHarness, seeds: Path, tmp_path: Path) -> None:
    """`fork-vm -p` of a target at its ready marker starts exactly there, and says so: its pause reason is the
    parent's "harness-start", so `fuzz --domain` needs no --input-addr/--input-size for it."""
    target = _target(ts)
    ts.ok("fork-vm", "-p", str(target))
    fork = next(r for r in ts.registry.all() if r.parent == target and r.kind == "fork")
    assert (fork.state, fork.reason) == ("paused", "harness-start")
    out = ts.ok("fuzz", "--domain", str(fork.domid), "--corpus", str(seeds), "--out", str(tmp_path / "out"),
                "--seconds", "20", "--stop-on-crash", "--quiet", timeout=90)
    assert json.loads(out)["unique_crashes"] == 1


# --- other start markers: the held fork runs from where the domain is paused to the start -------------------------

def _unchanged(ts: CliHarness, domid: int, regs: str, reason: str) -> None:
    """The domain is paused as before, with the same registers, and no fuzzer entry is left."""
    assert _fuzz_entries(ts) == []
    rec = ts.record(domid)
    assert (rec.state, rec.reason) == ("paused", reason)
    assert ts.ok("regs", str(domid)) == regs


def test_a_domain_paused_before_its_int3_start_is_fuzzed_from_there(ts: CliHarness, seeds: Path) -> None:
    """`fuzz 1` (int3 markers, no ready marker) created paused before its first instruction: the held fork boots
    it to the int3 start marker, the buffer comes from RDI/RSI there, and the campaign finds the planted bug, with
    the code range the fork printed on its way for --cover auto."""
    target = ts.create(ts.config("target", "fuzz 1"), "-p")
    regs = ts.ok("regs", "target")
    r = ts.run("fuzz", "--domain", "target", "--harness", "int3", "--input-format", "len64", "--corpus", str(seeds),
               "--out", str(ts.base / "out"), "--seconds", "30", "--seed", "1", "--stop-on-crash", "--cover", "auto",
               "--quiet")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "input buffer 0x800000 (65536 bytes)" in r.stderr and "int3 harness" in r.stderr, r.stderr
    stats = json.loads(r.stdout)
    assert stats["unique_crashes"] == 1 and stats["ok"] > 0 and stats["blocks_total"] > 0, stats
    [crash] = stats["crash_files"]
    assert Path(crash).name.startswith("vector-14-")
    _unchanged(ts, target, regs, "created paused")

    r = ts.run("fuzz", "--domain", "target", "--harness", "int3", "--input-format", "len64", "--replay",
               str(ts.base / crash))
    assert r.returncode == 10, r.stderr     # a crash
    assert json.loads(r.stdout)["vector"] == 14
    _unchanged(ts, target, regs, "created paused")


def test_a_domain_paused_anywhere_is_fuzzed_from_a_start_symbol(ts: CliHarness, seeds: Path,
                                                                  symbol_map: Path) -> None:
    """`fuzz 2` (no markers at all) paused wherever `vmfork pause` caught its loop: the held fork runs to a start
    breakpoint on prog_fuzz.input, inputs end at prog_fuzz.done, and the domain itself never moves."""
    target = ts.create(ts.config("target", "fuzz 2"))
    ts.wait_state(target, "running")
    common = ("--domain", "target", "--input-format", "len64", "--symbols", str(symbol_map), "--start",
              "prog_fuzz.input", "--end", "prog_fuzz.done", *INBUF)
    ts.fail("fuzz", *common, "--out", str(ts.base / "out"),
            match=f"target (domain {target}) is running: vmfork fuzz --domain needs it paused somewhere before its "
                  "start breakpoint at prog_fuzz.input (0x")
    ts.ok("pause", "target")
    regs = ts.ok("regs", "target")
    reason = ts.record(target).reason
    r = ts.run("fuzz", *common, "--corpus", str(seeds), "--out", str(ts.base / "out"), "--seconds", "30",
               "--seed", "1", "--stop-on-crash", "--quiet", "--boot-timeout", "20")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "breakpoint harness" in r.stderr, r.stderr
    stats = json.loads(r.stdout)
    assert stats["unique_crashes"] == 1 and stats["ok"] > 0, stats
    _unchanged(ts, target, regs, reason)
    ts.ok("unpause", "target")                          # free again, and it runs on
    ts.wait_state(target, "running")


def test_a_start_that_is_not_reached_is_one_line_and_leaves_nothing(ts: CliHarness, symbol_map: Path) -> None:
    out = ts.base / "out"
    target = _target(ts)                                # port markers only: no int3 marker will ever come
    regs = ts.ok("regs", "target")
    t = time.monotonic()
    ts.fail("fuzz", "--domain", "target", "--harness", "int3", "--boot-timeout", "2", "--out", str(out),
            match=f"target (domain {target}), run in its fork target-fuzz-1: the target did not reach its int3 "
                  "start marker within 2 s (--boot-timeout)")
    assert time.monotonic() - t < 30
    _unchanged(ts, target, regs, "harness-start")
    ts.fail("fuzz", "--domain", "target", "--symbols", str(symbol_map), "--start", "fuzz_parse.hang", "--end",
            "prog_fuzz.done", "--boot-timeout", "1", "--out", str(out),
            match="did not reach its start breakpoint at fuzz_parse.hang (0x")
    _unchanged(ts, target, regs, "harness-start")

    hello = ts.create(ts.config("hello", "hello"), "-p")   # prints a line and exits: it never gets to a start
    regs = ts.ok("regs", "hello")
    # (it may exit before or after the int3 hook can be set up: "stopped before" or "did not reach" its marker)
    ts.fail("fuzz", "--domain", "hello", "--harness", "int3", "--out", str(out),
            match="its int3 start marker: it stopped with exit status 0")
    _unchanged(ts, hello, regs, "created paused")
    assert not out.exists()

    for extra, message in ((("--boot-timeout", "5"), "--boot-timeout is for --kernel, or for --domain with "
                                                       "--harness int3 or --start"),
                           (("--harness", "int3", "--boot-timeout", "0"), "--boot-timeout 0: must be more than 0")):
        p = ts.run("fuzz", "--domain", "target", "--out", str(out), *extra)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert [e["name"] for e in ts.list_json()] == ["target", "hello"]
