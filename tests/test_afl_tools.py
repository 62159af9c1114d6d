"""AFL++'s companion tools against `vmfork fuzz --afl` (the afl++ Debian package's own binaries, real /dev/kvm, the
jsmn example guest): afl-showmap prints an input's edges, afl-tmin shrinks a crash, afl-cmin shrinks a corpus.

afl-showmap with one input runs its target once with no fork-server pipe (its own fork server beforehand only
learned the map size) and expects the target to fill `__AFL_SHM_ID`'s map and end like the program would: vmfork
runs the input, copies its edges and ends killed by the crash's signal (fuzz/afl.py run_once, end_as). afl-tmin
and afl-showmap -i (so afl-cmin) use the fork server. Only afl-cmin needs a variable: AFL_SKIP_BIN_CHECK=1, since
it greps the target file for `__AFL_SHM_ID` and the target is a Python program (AFL_ALLOW_TMP=1 here: pytest's
directories are under /tmp, which afl-cmin refuses otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_fuzz_example import MAX_TOKENS, SEEDS, array_of
from vmfork.fuzz.cli import REPLAY_STATUS

TOOLS = ("afl-showmap", "afl-tmin", "afl-cmin")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="AFL++'s afl-showmap/afl-tmin/afl-cmin not installed (Debian: afl++)")
# no AFL_* of the caller's: showmap and tmin must work without any
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AFL_")}
SHOWMAP_CRASHED = 2                  # afl-showmap's exit code when its target was killed by a signal


@pytest.fixture(scope="module")
def guest_map_target(guest_dir: Path) -> list[str]:
    """vmfork with the jsmn example's own edge map (8 KiB, no breakpoints)."""
    return [sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel", str(guest_dir / "jsmn-afl-pvh.elf"),
            "--cmdline", "jsmn", "--budget-ms", "400", "--afl-map", "auto"]


@pytest.fixture(scope="module")
def breakpoint_target(guest_dir: Path) -> list[str]:
    """vmfork with breakpoint edges (--cover) of the uninstrumented jsmn example."""
    return [sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel", str(guest_dir / "jsmn-pvh.elf"),
            "--cmdline", "jsmn", "--budget-ms", "2000", "--cover", "auto"]


def crashing_input() -> bytes:
    """MAX_TOKENS + 1 tokens: the planted off-by-one overflows harness.c's token array (SIGILL: the canary's #UD),
    inside an object with some padding for afl-tmin to remove."""
    return b'{"list": ' + array_of(MAX_TOKENS + 1).replace(b",", b", ") + b', "pad": "' + b"x" * 40 + b'"}'


def showmap(target: list[str], out: Path, *args: str, stdin: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    with open(stdin or os.devnull, "rb") as f:
        return subprocess.run(["afl-showmap", "-q", "-t", "5000", "-o", str(out), *args, "--", *target], stdin=f,
                              env=env or CLEAN_ENV, capture_output=True, text=True, timeout=60)


def tuples(path: Path) -> dict[int, int]:
    """afl-showmap's output: one `edge:count-bucket` line per edge hit."""
    return {int(k): int(v) for k, _, v in (line.partition(":") for line in path.read_text().split())}


def edges_of(directory: Path, target: list[str], tmp_path: Path, name: str) -> set[int]:
    """The union of the edges of every input in `directory` (afl-showmap -i, the fork server), from raw counts
    (-r): AFL++ 4.04c's afl-showmap prints only edges whose count is 1-4, 8, 16, 32 or 128 otherwise (its
    count_class_human table, fixed in 4.08c)."""
    out = tmp_path / name
    r = showmap(target, out, "-r", "-i", str(directory))
    assert r.returncode == 0 and out.is_dir(), r.stderr
    return {edge for trace in out.iterdir() for edge in tuples(trace)}


def test_showmap_prints_an_inputs_edges(guest_map_target: list[str], tmp_path: Path) -> None:
    """afl-showmap with one input (stdin), as it used to say "No instrumentation detected": the same input gives the
    same edges twice, the edges the fork server gives it for that input (afl-showmap -i), another input others."""
    seed = SEEDS / "vm.json"
    first, second, small = tmp_path / "first", tmp_path / "second", tmp_path / "small"
    for out, data in ((first, seed), (second, seed), (small, SEEDS / "small.json")):
        r = showmap(guest_map_target, out, stdin=data)
        assert r.returncode == 0 and "No instrumentation" not in r.stderr, r.stderr
    assert first.read_text() == second.read_text()
    assert len(tuples(first)) > 50 and tuples(first) != tuples(small)
    assert all(edge < 0x2000 for edge in tuples(first))             # in the guest's 8 KiB map, which it announced
    (tmp_path / "in").mkdir()
    shutil.copy(seed, tmp_path / "in" / "vm.json")
    r = showmap(guest_map_target, tmp_path / "traces", "-i", str(tmp_path / "in"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "traces" / "vm.json").read_text() == first.read_text()


def test_showmap_sees_the_crash(guest_map_target: list[str], tmp_path: Path) -> None:
    """A crashing input ends vmfork killed by the crash's signal, as the program would end: afl-showmap says so in
    its exit code and still prints the edges up to the crash (the input through @@ this time)."""
    crash = tmp_path / "crash.json"
    crash.write_bytes(crashing_input())
    target = [*guest_map_target, "--afl-input", "@@"]
    r = showmap(target, tmp_path / "map", "-H", str(crash))
    assert r.returncode == SHOWMAP_CRASHED and tuples(tmp_path / "map"), r.stderr
    r = showmap(target, tmp_path / "ok", "-H", str(SEEDS / "vm.json"))
    assert r.returncode == 0 and tuples(tmp_path / "ok"), r.stderr


def test_showmap_with_breakpoint_edges(breakpoint_target: list[str], tmp_path: Path) -> None:
    """--cover: the edges come from breakpoints, hashed into AFL++'s 64 KiB map; an input piped into stdin."""
    out = [tmp_path / "a", tmp_path / "b"]
    for path in out:
        with subprocess.Popen(["cat", str(SEEDS / "vm.json")], stdout=subprocess.PIPE) as cat:
            assert cat.stdout is not None
            r = subprocess.run(["afl-showmap", "-q", "-t", "5000", "-o", str(path), "--", *breakpoint_target],
                               stdin=cat.stdout, env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert out[0].read_text() == out[1].read_text() and len(tuples(out[0])) > 50


def test_tmin_shrinks_a_crash_that_still_crashes(guest_map_target: list[str], guest_dir: Path,
                                                 tmp_path: Path) -> None:
    crash, small = tmp_path / "crash.json", tmp_path / "min.json"
    crash.write_bytes(crashing_input())
    r = subprocess.run(["afl-tmin", "-t", "5000", "-i", str(crash), "-o", str(small), "--", *guest_map_target],
                       env=CLEAN_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Program exits with a signal" in r.stdout, r.stdout[-2000:]        # afl-tmin's crash mode
    assert 0 < len(small.read_bytes()) < len(crash.read_bytes()) // 2, small.read_bytes()
    replay = subprocess.run([sys.executable, "-m", "vmfork.fuzz", "--kernel", str(guest_dir / "jsmn-afl-pvh.elf"),
                             "--cmdline", "jsmn", "--replay", str(small)], capture_output=True, text=True, timeout=60)
    assert replay.returncode == REPLAY_STATUS["crash"], replay.stdout + replay.stderr


def test_cmin_keeps_fewer_inputs_with_the_same_edges(guest_map_target: list[str], tmp_path: Path) -> None:
    corpus, kept = tmp_path / "corpus", tmp_path / "kept"
    corpus.mkdir()
    for seed in SEEDS.iterdir():
        shutil.copy(seed, corpus / seed.name)
        shutil.copy(seed, corpus / f"copy-of-{seed.name}")              # the same edges twice
    for name, data in (("a", b"[1,2]"), ("b", b"[3,4]"), ("c", b'{"k": 1}')):
        (corpus / name).write_bytes(data)
    env = {**CLEAN_ENV, "AFL_SKIP_BIN_CHECK": "1", "AFL_ALLOW_TMP": "1"}
    r = subprocess.run(["afl-cmin", "-t", "5000", "-i", str(corpus), "-o", str(kept), "--", *guest_map_target],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    before, after = list(corpus.iterdir()), list(kept.iterdir())
    assert 0 < len(after) <= len(before) - len(list(SEEDS.iterdir())) - 1, after
    assert edges_of(kept, guest_map_target, tmp_path, "after") == edges_of(corpus, guest_map_target, tmp_path,
                                                                           "before")


def test_run_by_no_afl_tool_is_a_one_line_error(guest_map_target: list[str]) -> None:
    """Neither a fork-server pipe nor AFL++'s map: vmfork says which AFL++ tools run it (and how to run one input)."""
    r = subprocess.run(guest_map_target, stdin=subprocess.DEVNULL, env=CLEAN_ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        "vmfork: error: not started by an AFL++ tool (no fork-server pipe on fd 199 and no __AFL_SHM_ID): run it "
        "under afl-fuzz, afl-showmap, afl-tmin or afl-cmin; `vmfork fuzz --replay FILE` runs one input alone")
