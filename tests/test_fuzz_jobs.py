"""`vmfork fuzz --jobs N` (fuzz/jobs.py) end to end: the real CLI in a subprocess, N worker processes fuzzing the
test guest's `fuzz` program (its planted bug: a 'B' record with a nonzero bank, #PF), one crash file per crash,
the corpus shared through AFL++'s sync-dir layout (each worker an instance OUT/vmfork-N), the campaign's limits,
signals, and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cli_harness import CliHarness
from test_fuzz import _alive, _descendants

SEED = b"FUZZA\x00"
BUG = b"FUZZB\x01"


def _fuzz(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _seeds(tmp_path: Path, *inputs: bytes) -> Path:
    d = tmp_path / "seeds"
    d.mkdir()
    for i, data in enumerate(inputs):
        (d / f"s{i}").write_bytes(data)
    return d


def _ours(marker: Path) -> list[int]:
    """Live processes whose command line names `marker` (the workers are forks of the CLI process: its argv)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive({int(entry)}):
            try:
                if str(marker).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _summary(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_two_jobs_find_the_bug_and_stop_together(pvh_guest: Path, tmp_path: Path) -> None:
    """From a seed two byte changes away from the bug: the first crash in either worker stops both."""
    out = tmp_path / "out"
    r = _fuzz("--kernel", str(pvh_guest), "--corpus", str(_seeds(tmp_path, SEED)), "--out", str(out),
              "--cover", "auto", "--seconds", "30", "--seed", "1", "--stop-on-crash", "--jobs", "2")
    st = _summary(r)
    assert st["jobs"] == 2 and st["unique_crashes"] == 1 and st["first_crash_s"] is not None, st
    assert st["seconds"] < 20, st                                   # stopped at the crash, not at --seconds
    assert [w["seed"] for w in st["workers"]] == [1, 2]             # a seed of its own each
    assert all(w["execs"] > 0 for w in st["workers"]), st["workers"]
    assert st["execs"] == sum(w["execs"] for w in st["workers"])
    (crash,) = st["crash_files"]
    # AFL++'s layout: the workers are instances vmfork-1 and vmfork-2 of the sync dir OUT (fuzz/syncdir.py)
    assert Path(crash).name.startswith("id:000000,sig:11,") and ",vec:14," in Path(crash).name, crash
    assert sorted(p.name for w in ("vmfork-1", "vmfork-2") for p in (out / w / "crashes").iterdir()) == \
        [Path(crash).name]
    assert (Path(crash).parent.parent / "crash_reports" / f"{Path(crash).name}.json").is_file()
    assert "2 jobs" in r.stderr and "19 blocks to cover" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vmfork-1", "vmfork-2"]    # the scratch directory went


def test_one_crash_file_per_crash_and_a_shared_corpus(pvh_guest: Path, tmp_path: Path) -> None:
    """Both workers run the bug among their seeds, so both crash on it: one file. Each runs the inputs the other
    added to OUT/corpus/ (nothing was there before), counted as `imported`."""
    out = tmp_path / "out"
    r = _fuzz("--kernel", str(pvh_guest), "--corpus", str(_seeds(tmp_path, SEED, BUG)), "--out", str(out),
              "--cover", "auto", "--seconds", "3", "--seed", "7", "--jobs", "2", "--quiet")
    st = _summary(r)
    w0, w1 = st["workers"]
    assert w0["crashes"] >= 1 and w1["crashes"] >= 1, st["workers"]       # each ran BUG
    files = sorted(p.name for w in ("vmfork-1", "vmfork-2") for p in (out / w / "crashes").glob("id:*"))
    assert st["unique_crashes"] == w0["unique_crashes"] + w1["unique_crashes"] == len(files), (files, st)
    assert len([f for f in files if ",vec:14," in f]) == 1, files          # (the fuzzer may find `TF` too)
    queues = {w: sorted(p.name for p in (out / w / "queue").iterdir()) for w in ("vmfork-1", "vmfork-2")}
    for w, names in queues.items():
        assert all(name.startswith("id:") for name in names), names       # no temporary file left
        assert [n.split(",")[0] for n in names] == [f"id:{i:06d}" for i in range(len(names))]  # AFL++'s numbering
        assert sum(",orig:" in n for n in names) == 2                      # the seeds
        found = [n for n in names if ",op:havoc,+cov" in n]
        assert len(found) == w0["added"] if w == "vmfork-1" else w1["added"]
    # each ran the inputs the other queued (AFL++'s .synced/ bookkeeping), those new to it joined its queue
    assert w0["imported"] <= w1["added"] and w1["imported"] <= w0["added"]
    assert w0["imported"] + w1["imported"] > 0, st["workers"]
    assert sum(",sync:vmfork-2," in n for n in queues["vmfork-1"]) == w0["imported_new"]
    assert sum(",sync:vmfork-1," in n for n in queues["vmfork-2"]) == w1["imported_new"]
    assert (out / "vmfork-1" / ".synced" / "vmfork-2").stat().st_size == 4
    assert st["blocks_hit"] <= st["blocks_total"] == 19
    assert r.stderr.count("input buffer") == 1                     # one banner, no live line with --quiet


def test_execs_is_for_the_whole_campaign_and_too_many_jobs_are_warned(pvh_guest: Path, tmp_path: Path) -> None:
    jobs = len(os.sched_getaffinity(0)) + 1
    r = _fuzz("--kernel", str(pvh_guest), "--corpus", str(_seeds(tmp_path, SEED)), "--out", str(tmp_path / "out"),
              "--execs", "3000", "--seconds", "30", "--jobs", str(jobs), "--quiet")
    st = _summary(r)
    assert 3000 <= st["execs"] <= 3000 + jobs * 64, st             # each looks at the board every 32 inputs
    assert len(st["workers"]) == jobs and all(w["execs"] > 0 for w in st["workers"])
    assert f"warning: --jobs {jobs} on {jobs - 1} CPU" in r.stderr


def _default_sigint() -> None:
    """A shell starting pytest in the background (`cmd &`) has its children ignore SIGINT, and Python then never
    raises KeyboardInterrupt: give the CLI process the default, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(pvh_guest: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], set[int]]:
    """A long campaign of two jobs, once both workers are fuzzing (the live status line counts them)."""
    seeds = _seeds(tmp_path, SEED)
    proc = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "fuzz", "--kernel", str(pvh_guest), "--corpus",
                             str(seeds), "--out", str(tmp_path / "out"), "--cover", "auto", "--seconds", "60",
                             "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_default_sigint)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    seen = b""
    deadline = time.monotonic() + 30
    while b"2/2 jobs" not in seen and time.monotonic() < deadline and proc.poll() is None:
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    os.set_blocking(fd, True)
    assert b"2/2 jobs" in seen, seen
    workers = _descendants(proc.pid)
    assert len(_alive(workers)) == 2
    return proc, workers


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_campaign_leaves_no_worker_behind(pvh_guest: Path, tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it), SIGTERM to the CLI process, or SIGKILL
    of it (the workers follow by PR_SET_PDEATHSIG)."""
    proc, workers = _start(pvh_guest, tmp_path)
    try:
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        err = proc.communicate(timeout=30)[1].decode()
        deadline = time.monotonic() + 10
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(workers) and _ours(tmp_path / "out") == []
        if how != "sigkill":
            assert proc.returncode == 130 and "Traceback" not in err and err.endswith("vmfork: interrupted\n"), err
            assert not (tmp_path / "out" / ".vmfork.jobs").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("extra", "message"), [
    (("--jobs", "0"), "vmfork fuzz: --jobs 0: must be at least 1"),
    (("--jobs", "2", "--keep"), "vmfork fuzz: --jobs 2 and --keep: a kept fork lives in the one process that found "
                                "the crash"),
    (("--jobs", "2", "--gdb", "0"), "vmfork fuzz: --jobs 2 and --gdb: a kept fork lives in the one process that "
                                    "found the crash"),
    (("--jobs", "2", "--afl"), "vmfork fuzz: --jobs 2 and --afl: AFL++ runs one fork server per afl-fuzz (run "
                               "afl-fuzz -M/-S for more cores)"),
    (("--jobs", "2", "--replay", "x.bin"), "vmfork fuzz: --jobs 2 and --replay: one input runs in one process"),
])
def test_options_that_cannot_be_shared_are_refused(pvh_guest: Path, tmp_path: Path, extra: tuple[str, ...],
                                                   message: str) -> None:
    r = _fuzz("--kernel", str(pvh_guest), "--out", str(tmp_path / "out"), *extra)
    assert (r.returncode, r.stderr, r.stdout) == (2, message + "\n", "")
    assert not (tmp_path / "out").exists()


def test_a_failing_worker_is_one_line_and_leaves_nothing(pvh_guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _fuzz("--kernel", str(pvh_guest), "--corpus", str(tmp_path / "missing"), "--out", str(out), "--jobs", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"vmfork: error: {tmp_path / 'missing'}: no such file (worker") and "of 2)" in line
    assert not out.exists() and _ours(out) == []


def test_two_jobs_on_a_domain_hold_a_fork_each(pvh_guest: Path, tmp_path: Path) -> None:
    """--domain: each worker holds its own fork of the domain (`target-fuzz-1`, `-2`) while it runs; all are let
    go at the end, and the domain stays paused at its marker."""
    with CliHarness(tmp_path, pvh_guest) as ts:
        domid = ts.create(ts.config("target", "fuzz"))
        assert ts.wait_state(domid, "paused").reason == "harness-start"
        seeds = _seeds(tmp_path, SEED)
        proc = subprocess.Popen(ts.argv("fuzz", "--domain", "target", "--corpus", str(seeds), "--out",
                                        str(tmp_path / "out"), "--seconds", "2", "--quiet", "--jobs", "2",
                                        "--seed", "1", "--cover", "auto"),
                                env=ts.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            held: list[str] = []
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline and len(held) < 2:
                held = sorted(r.name for r in ts.registry.all() if r.kind == "fuzz" and r.state == "running")
                time.sleep(0.05)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0 and "Traceback" not in err, err
        st = json.loads(out)
        assert all(w["execs"] > 0 for w in st["workers"]) and st["blocks_total"] == 19, st
        assert len(held) == 2 and all(name.startswith("target-fuzz-") for name in held), held     # at once
        assert [r.name for r in ts.registry.all() if r.kind == "fuzz"] == []
        assert ts.record(domid).state == "paused"
