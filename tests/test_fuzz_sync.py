"""Issue 18: `vmfork fuzz --out SYNC_DIR --name NAME` writes AFL++'s sync-dir layout (fuzz/syncdir.py), read by
AFL++'s own tools (afl-whatsup, afl-plot) and by a real `afl-fuzz -S` in the same sync dir, which picks up the
vmfork worker's finds as the worker picks up its; damaged or foreign entries are skipped with a warning.

Targets: the KF/x-style kernel guests/kfx (its own IDT and page tables, KF/x's int3 harness, faults caught at its own
handlers) and the jsmn example (jsmn-pvh.elf with breakpoint coverage for vmfork, jsmn-afl-pvh.elf with its own edge
map for afl-fuzz)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_fuzz import AFL_ENV, needs_afl

ROOT = Path(__file__).resolve().parents[1]
KFX_SEED = b"A" * 14 + b"KFX0"
KFX_BUG1 = b"A" * 14 + b"KFX1"         # guests/kfx: the planted #PF behind "KFX1"


def vmfork(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmfork.cli", *args]


def kfx_args(guest_dir: Path) -> list[str]:
    return ["fuzz", "--kernel", str(guest_dir / "kfx-multiboot.elf"), "--cmdline", "", "--harness", "int3",
            "--cover", "auto"]


def seeds(d: Path, *inputs: bytes) -> Path:
    d.mkdir(parents=True)
    for i, data in enumerate(inputs):
        (d / f"seed{i}").write_bytes(data)
    return d


def stats_of(instance: Path) -> dict[str, str]:
    from vmfork.fuzz.syncdir import status_file
    return status_file(instance)


def wait_for(what: str, cond: Any, timeout: float, procs: tuple[subprocess.Popen[Any], ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"{p.args!r} ended ({p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queue(instance: Path) -> dict[str, bytes]:
    d = instance / "queue"
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} if d.is_dir() else {}


# --- a campaign of two workers on the KF/x-style target, seen by AFL++'s tools ---------------------------------------

@pytest.fixture(scope="module")
def campaign(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`--jobs 2 --name kfx` for 12 s; afl-whatsup is run while both workers fuzz."""
    base = tmp_path_factory.mktemp("campaign")
    sync = base / "sync"
    proc = subprocess.Popen(vmfork(*kfx_args(guest_dir), "--corpus", str(seeds(base / "seeds", KFX_SEED)),
                                   "--out", str(sync), "--name", "kfx", "--jobs", "2", "--seconds", "12",
                                   "--seed", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("fuzzer_stats of both workers",
                 lambda: all((sync / w / "fuzzer_stats").exists() for w in ("kfx-1", "kfx-2")), 60, (proc,))
        time.sleep(1.5)
        whatsup = subprocess.run(["afl-whatsup", str(sync)], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "TERM": "dumb"}) if shutil.which("afl-whatsup") else None
        out, err = proc.communicate(timeout=90)
    finally:
        stop(proc)
    yield {"sync": sync, "proc": proc, "out": out, "err": err, "whatsup": whatsup}


def test_workers_are_afl_instances(campaign: dict[str, Any]) -> None:
    assert campaign["proc"].returncode == 0 and "Traceback" not in campaign["err"], campaign["err"]
    st = json.loads(campaign["out"])
    sync: Path = campaign["sync"]
    assert sorted(p.name for p in sync.iterdir()) == ["kfx-1", "kfx-2"]        # the scratch directory went
    assert [w["name"] for w in st["workers"]] == ["kfx-1", "kfx-2"]
    for w in st["workers"]:
        inst = sync / w["name"]
        names = sorted(queue(inst))
        assert names[0] == "id:000000,time:0,execs:0,orig:seed0", names
        assert [n[:9] for n in names] == [f"id:{i:06d}" for i in range(len(names))]
        assert all(re.fullmatch(r"id:\d{6},(time:0,execs:0,orig:seed0|src:\d{6},time:\d+,execs:\d+,op:havoc,\+cov|"
                                r"sync:kfx-[12],src:\d{6},\+cov)", n) for n in names), names
        fields = stats_of(inst)
        assert int(fields["execs_done"]) == w["execs"] and fields["afl_banner"] == w["name"]
        assert int(fields["corpus_count"]) == len(names) and int(fields["fuzzer_pid"]) > 0
        assert float(fields["bitmap_cvg"].rstrip("%")) > 0 and int(fields["total_edges"]) == st["blocks_total"]
        assert int(fields["saved_crashes"]) == w["unique_crashes"]
        assert set(fields) >= {"start_time", "last_update", "run_time", "execs_per_sec", "cycles_done",
                               "saved_hangs", "last_find", "last_crash", "last_hang", "pending_total",
                               "pending_favs", "cur_item", "exec_timeout", "cycles_wo_finds"}
        rows = (inst / "plot_data").read_text().splitlines()
        assert rows[0].startswith("# relative_time, cycles_done, cur_item, corpus_count,") and len(rows) >= 3, rows
        assert all(len(r.split(", ")) == 13 for r in rows[1:]), rows
    # the two planted #PF bugs of the kfx target, each saved once in the campaign (either worker), AFL++-named
    crashes = sorted(p.name for w in ("kfx-1", "kfx-2") for p in (sync / w / "crashes").iterdir())
    assert crashes and all(re.match(r"id:\d{6},sig:\d\d,time:\d+,execs:\d+,op:havoc,kind:", c) for c in crashes)
    assert any(",sig:11," in c and ",vec:14," in c for c in crashes), crashes
    assert len(crashes) == st["unique_crashes"] == len(st["crash_files"])
    for path in st["crash_files"]:
        report = Path(path).parent.parent / "crash_reports" / f"{Path(path).name}.json"
        assert json.loads(report.read_text())["outcome"] == "crash"


@pytest.mark.skipif(shutil.which("afl-whatsup") is None, reason="afl-whatsup not installed (Debian: afl++)")
def test_afl_whatsup_reports_the_workers_alive_with_their_execs(campaign: dict[str, Any]) -> None:
    r = campaign["whatsup"]
    assert r.returncode == 0, r.stderr
    assert ">>> kfx-1 " in r.stdout and ">>> kfx-2 " in r.stdout, r.stdout
    assert re.search(r"Fuzzers alive : 2\b", r.stdout), r.stdout
    assert "Instance is dead" not in r.stdout
    speed = re.search(r"Cumulative speed : (\d+) execs/sec", r.stdout)
    assert speed and int(speed.group(1)) > 0, r.stdout
    assert len(re.findall(r"lifetime speed [1-9]\d* execs/sec", r.stdout)) == 2, r.stdout


def test_afl_plot_draws_the_plot_data(campaign: dict[str, Any], tmp_path: Path) -> None:
    if shutil.which("afl-plot") is None:
        pytest.skip("afl-plot not installed (Debian: afl++)")
    if shutil.which("gnuplot") is None:
        pytest.skip("gnuplot not installed (Debian: gnuplot-nox, in ./dev's APT_TEST)")
    r = subprocess.run(["afl-plot", str(campaign["sync"] / "kfx-1"), str(tmp_path / "plot")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("index.html", "exec_speed.png", "high_freq.png", "low_freq.png", "edges.png"):
        data = (tmp_path / "plot" / name).read_bytes()
        assert data, name
    assert (tmp_path / "plot" / "exec_speed.png").read_bytes().startswith(b"\x89PNG")
    assert "kfx-1" in (tmp_path / "plot" / "index.html").read_text()          # the banner


# --- damaged and foreign sync dirs ------------------------------------------------------------------------------------

def test_foreign_and_corrupt_entries_are_skipped_with_a_warning(guest_dir: Path, tmp_path: Path) -> None:
    """Only the one good entry of a foreign instance is run (it is the planted bug: a crash here); everything else
    is one warning line each, and the campaign goes on."""
    sync = tmp_path / "sync"
    junk = sync / "junk" / "queue"
    junk.mkdir(parents=True)
    (junk / "README").write_text("not an entry")
    (junk / "id:000000,orig:bug").write_bytes(KFX_BUG1)
    (junk / "id:000001,dir").mkdir()
    (junk / "id:000002,big").write_bytes(b"A" * (2 << 20))
    (junk / "id:000003,empty").write_bytes(b"")
    (junk / ".state").mkdir()
    (sync / "notes.txt").write_text("a file in the sync dir")
    (sync / "bad name" / "queue").mkdir(parents=True)
    (sync / "broken").mkdir()
    (sync / "broken" / "queue").write_text("a file where a directory should be")
    (sync / "me" / ".synced").mkdir(parents=True)
    (sync / "me" / ".synced" / "junk").write_bytes(b"\x01\x02\x03")             # not a u32
    r = subprocess.run(vmfork(*kfx_args(guest_dir), "--corpus", str(seeds(tmp_path / "seeds", KFX_SEED)),
                              "--out", str(sync), "--name", "me", "--seconds", "3", "--seed", "1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("vmfork fuzz: warning: ")]
    expected = {f"{junk}/README: not an AFL++ queue entry": 1, f"{junk}/id:000001,dir: a directory": 1,
                f"{junk}/id:000002,big: 2097152 bytes, more than AFL++'s MAX_FILE": 1,
                f"{sync}/notes.txt: not an instance directory": 1,
                f"{sync}/bad name: not a name an instance can have": 1, f"{sync}/broken/queue:": 1,
                f"{sync}/me/.synced/junk: 3 bytes, not an AFL++ sync record": 1}
    for start, n in expected.items():
        assert sum(w.startswith(f"vmfork fuzz: warning: {start}") for w in warnings) == n, (start, warnings)
    assert len(warnings) == len(expected), warnings            # once each (the sync runs every second)
    assert struct.unpack("<I", (sync / "me" / ".synced" / "junk").read_bytes()) == (4,)    # next: id 4
    st = json.loads(r.stdout)
    assert st["unique_crashes"] >= 1
    crashed = [json.loads((sync / "me" / "crash_reports" / f"{Path(f).name}.json").read_text())
               for f in st["crash_files"]]
    assert any(c["vector"] == 14 for c in crashed), crashed       # the foreign input ran


def test_an_instance_in_use_is_refused(guest_dir: Path, tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    args = [*kfx_args(guest_dir), "--corpus", str(seeds(tmp_path / "seeds", KFX_SEED)), "--out", str(sync),
            "--name", "one", "--seconds", "20", "--quiet"]
    first = subprocess.Popen(vmfork(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the first fuzzer's stats", lambda: (sync / "one" / "fuzzer_stats").exists(), 60, (first,))
        r = subprocess.run(vmfork(*args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr == f"vmfork: error: {sync / 'one'} is in use by another fuzzer " \
                                                 "(give another --name)\n", r.stderr
    finally:
        stop(first)


@pytest.mark.parametrize(("extra", "message"), [
    (("--name", "a b"), "--name 'a b': an instance name is 1-64 letters"),
    (("--name", "x", "--replay", "f"), "--name is for a campaign of vmfork's own"),
    (("--main",), "--main is for an AFL++ sync dir: give --name NAME too"),
])
def test_bad_names_are_one_line(guest_dir: Path, tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    r = subprocess.run(vmfork(*kfx_args(guest_dir), "--out", str(tmp_path / "out"), *extra), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"vmfork fuzz: {message}") and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- a real afl-fuzz secondary and a vmfork worker in one sync dir ----------------------------------------------------

AFL_ONLY = b'["\\u00e9\\u0041\\n"]'                         # string escapes: jsmn code the vmfork side has not run
VMFORK_ONLY = b'{"a":{"b":[true,{"c":null}]},"d":-1.5}'     # nested objects and arrays


@needs_afl
def test_afl_fuzz_secondary_and_vmfork_worker_pick_up_each_others_finds(guest_dir: Path, tmp_path: Path) -> None:
    """The vmfork worker (`--main`: AFL++ secondaries import from main nodes) starts with an input the afl-fuzz -S
    instance lacks and the other way round; each must import the other's (AFL++ names it `sync:native`, vmfork
    `sync:other`), content unchanged."""
    sync = tmp_path / "sync"
    native = subprocess.Popen(vmfork("fuzz", "--kernel", str(guest_dir / "jsmn-pvh.elf"), "--cmdline", "jsmn",
                                     "--cover", "auto", "--corpus", str(seeds(tmp_path / "vm-in", VMFORK_ONLY)),
                                     "--out", str(sync), "--name", "native", "--main", "--seconds", "90",
                                     "--quiet", "--seed", "2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    afl: subprocess.Popen[bytes] | None = None
    try:
        wait_for("the vmfork worker's queue", lambda: (sync / "native" / "is_main_node").exists() and
                 len(queue(sync / "native")) >= 1, 60, (native,))
        env = {**os.environ, **AFL_ENV, "AFL_IMPORT_FIRST": "1"}
        afl = subprocess.Popen(["afl-fuzz", "-i", str(seeds(tmp_path / "afl-in", AFL_ONLY)), "-o", str(sync),
                                "-S", "other", "-t", "200", "-V", "80", "--",
                                sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel",
                                str(guest_dir / "jsmn-afl-pvh.elf"), "--cmdline", "jsmn", "--budget-ms", "400",
                                "--afl-map", "auto"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

        def imported(instance: str, origin: str, data: bytes) -> bool:
            return any(f",sync:{origin}," in name and content == data
                       for name, content in queue(sync / instance).items())
        wait_for("both imports", lambda: imported("other", "native", VMFORK_ONLY) and
                 imported("native", "other", AFL_ONLY), 80, (native, afl))
    finally:
        if afl is not None:
            stop(afl)
        stop(native)
    err = native.stderr.read() if native.stderr else ""
    assert "Traceback" not in err, err
    assert (sync / "native" / ".synced" / "other").stat().st_size == 4
    assert (sync / "other" / ".synced" / "native").exists()     # AFL++'s own record (written when it finishes one)
    assert not [w for w in err.splitlines() if "warning" in w], err                # AFL++'s layout is not foreign


# --- the live status for people ---------------------------------------------------------------------------------------

def _run_on_a_terminal(argv: list[str], columns: int) -> tuple[int, str, str]:
    """`argv` with its stderr on a pseudo-terminal of `columns` columns (stdout a pipe, as `| jq` would have it)."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:             # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    proc.wait(timeout=60)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("columns", [100, 60])
def test_the_live_status_is_a_panel_that_fits_the_terminal(guest_dir: Path, tmp_path: Path, columns: int) -> None:
    code, out, screen = _run_on_a_terminal(vmfork(*kfx_args(guest_dir), "--corpus",
                                                  str(seeds(tmp_path / "seeds", KFX_SEED)), "--out",
                                                  str(tmp_path / "sync"), "--name", "tty", "--seconds", "3"),
                                           columns)
    assert code == 0 and json.loads(out)["execs"] > 0, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)          # without the terminal's escape sequences
    assert "vmfork fuzz: tty" in text and "execs/s" in text and "coverage" in text and "last find" in text, text
    assert "crashes" in text and "blocks" in text and "╭" in text, text
    panel = [line for line in text.replace("\r", "\n").splitlines() if line.strip()[:1] in ("╭", "│", "╰")]
    assert panel and max(len(line.rstrip()) for line in panel) <= columns, panel
    assert "[    " not in text                                    # not the plain status line


def test_without_a_terminal_the_status_is_plain_lines(guest_dir: Path, tmp_path: Path) -> None:
    r = subprocess.run(vmfork(*kfx_args(guest_dir), "--corpus", str(seeds(tmp_path / "seeds", KFX_SEED)), "--out",
                              str(tmp_path / "sync"), "--name", "pipe", "--seconds", "2"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "\x1b[" not in r.stderr and "╭" not in r.stderr, r.stderr
    assert re.search(r"\[\s*\d+\.\ds\] execs \d+", r.stderr), r.stderr


def test_the_jobs_panel_has_a_row_per_worker(guest_dir: Path, tmp_path: Path) -> None:
    code, out, screen = _run_on_a_terminal(vmfork(*kfx_args(guest_dir), "--corpus",
                                                  str(seeds(tmp_path / "seeds", KFX_SEED)), "--out",
                                                  str(tmp_path / "sync"), "--name", "k", "--jobs", "2",
                                                  "--seconds", "4"), 80)
    assert code == 0 and json.loads(out)["jobs"] == 2, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "vmfork fuzz: k-1..2" in text and re.search(r"│\s*k-1\s+\d", text) and re.search(r"│\s*k-2\s+\d", text), \
        text
