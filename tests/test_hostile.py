"""vmfork tried as a hostile but fair user tries it (issue 20, and issue 14's toolstack items): QMP abuse, save
targets that are not plain files, kills in the middle of commands, a broken registry, full disks, endless logs and
misleading messages. Each test reproduces a failure seen on the old code; every refusal must be one line that
names the problem and changes nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_harness import CliHarness

INPUT_BUFFER = 0x800000


@pytest.fixture
def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    with CliHarness(tmp_path, pvh_guest) as t:
        yield t


def _raw_qmp(path: str, timeout: float = 30.0) -> tuple[socket.socket, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    f = sock.makefile("rb")
    json.loads(f.readline())            # greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert "return" in json.loads(f.readline())
    return sock, f


# --- QMP: garbage, long lines, parse errors ---------------------------------------------------------------------

def test_qmp_garbage_line_is_rejected_in_linear_time(ts: CliHarness) -> None:
    """A 32 MiB line that is not JSON used to take about a minute (the scan restarted with every chunk received):
    now one pass, an error reply, and the session goes on."""
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    sock, f = _raw_qmp(ts.record(spin).qmp_socket)
    line = b"x" * (32 << 20) + b"\n"
    t0 = time.monotonic()
    sock.sendall(line)
    reply = json.loads(f.readline())
    took = time.monotonic() - t0
    assert reply["error"]["class"] == "GenericError" and reply["error"]["desc"].startswith("JSON parse error"), reply
    assert took < 5.0, f"rejecting a 32 MiB garbage line took {took:.1f} s"
    sock.sendall(b'{"execute": "query-status", "id": 1}\n')        # the session survives
    assert json.loads(f.readline())["return"]["status"] == "running"
    sock.close()


def test_qmp_oversized_line_gets_an_error_before_the_close(ts: CliHarness) -> None:
    """A line over the 64 MiB limit is answered with a QMP error, then the connection closes (it used to just
    close); the domain keeps serving others."""
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    sock, f = _raw_qmp(ts.record(spin).qmp_socket)
    chunk = b"{" + b'"a": "' + b"y" * (1 << 20)
    try:
        sock.sendall(chunk)
        for _ in range(70):
            sock.sendall(b"y" * (1 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = json.loads(f.readline())
    assert reply["error"]["desc"].startswith("JSON parse error, message larger than 64 MiB"), reply
    assert f.readline() == b""
    sock.close()
    assert ts.execute(spin, "query-status")["status"] == "running"


def test_cli_qmp_not_json_is_a_parse_error(ts: CliHarness) -> None:
    """`vmfork qmp DOM 'not json'` is answered the way QEMU answers invalid JSON (it was taken for a command named
    "not json"); a bare command name still works."""
    dom = ts.create(ts.config("demo", "demo"))
    ts.wait_state(dom, "paused")
    p = ts.run("qmp", "demo", "not json")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    replies = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert replies and all(r["error"]["class"] == "GenericError" for r in replies), replies
    assert replies[0]["error"]["desc"].startswith("JSON parse error"), replies
    assert "has not been found" not in p.stdout
    assert p.stderr.startswith("vmfork: error: JSON parse error")
    assert json.loads(ts.ok("qmp", "demo", "query-status"))["return"]["status"] == "paused"


def test_mem_read_across_the_end_of_ram_returns_the_readable_part(ts: CliHarness) -> None:
    dom = ts.create(ts.config("demo", "demo"))          # 64 MiB of RAM
    ts.wait_state(dom, "paused")
    end = 64 << 20
    ts.ok("mem", "write", "demo", hex(end - 16), "11" * 16)
    p = ts.run_bytes("mem", "read", "demo", hex(end - 16), "64", "--raw")
    assert p.stdout == b"\x11" * 16
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"read 16 of 64 bytes: {end:#x} is not readable" in err, err
    text = ts.run("mem", "read", "demo", hex(end - 16), "64")
    assert text.returncode == 1 and "11 11 11 11" in text.stdout and f"{end:#x} is not readable" in text.stderr


# --- messages that mislead (item 8) --------------------------------------------------------------------------------

def test_config_messages_name_the_problem(ts: CliHarness, tmp_path: Path) -> None:
    cfg = ts.config("bad", "hello")
    text = cfg.read_text()

    def with_line(old: str, new: str) -> Path:
        p = tmp_path / "variant.cfg"
        p.write_text(text.replace(old, new))
        return p
    kernel_line = next(ln for ln in text.splitlines() if ln.startswith("kernel"))
    err = ts.fail("create", str(with_line(kernel_line, f'kernel = "{tmp_path}"')), match="is a directory")
    assert str(tmp_path) in err and "kernel" in err
    ts.fail("create", str(with_line(kernel_line, 'kernel = "/dev/zero"')), match="/dev/zero is a character device")
    ts.fail("create", str(with_line(kernel_line, 'kernel = "/nonexistent/k"')), match="/nonexistent/k: no such file")
    huge = ts.fail("create", str(with_line("memory = 64", "memory = 99999999999")), match="at most 67108864 MiB")
    assert "variant.cfg:2: memory" in huge
    one = ts.fail("create", str(with_line("memory = 64", "memory = 1")), match="memory: must be at least 2 MiB")
    zero = ts.fail("create", str(with_line("memory = 64", "memory = 0")), match="memory: must be at least 2 MiB")
    assert one.replace("got 1", "") == zero.replace("got 0", "")
    assert ts.list_json() == []


def test_memory_above_host_ram_warns_naming_both(ts: CliHarness) -> None:
    host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    cfg = ts.config("big", "hello")
    cfg.write_text(cfg.read_text().replace("memory = 64", f"memory = {host_mib + 1024}"))
    p = ts.run("create", "-p", str(cfg))
    assert p.returncode == 0, p.stderr
    assert f"memory = {host_mib + 1024} MiB is more than this host's RAM ({host_mib} MiB)" in p.stderr
    ts.ok("destroy", "big")


def test_console_says_when_the_domain_dies_under_it(ts: CliHarness) -> None:
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    pid = ts.record(spin).pid
    assert pid is not None
    con = ts.popen("console", "spin")

    def connected() -> bool:                            # the console command holds a socket: it is attached
        fds = []
        for fd in os.listdir(f"/proc/{con.pid}/fd"):
            with contextlib.suppress(OSError):
                fds.append(os.readlink(f"/proc/{con.pid}/fd/{fd}"))
        return any(f.startswith("socket:") for f in fds)
    ts.wait("the console to attach", connected)
    time.sleep(0.5)
    os.kill(pid, 9)
    _out, err = con.communicate(timeout=20)
    assert con.returncode == 1, err
    assert b"console of spin (domain" in err and b"its process died" in err, err
    ts.ok("destroy", "spin")


def test_a_stopped_domain_is_named_within_seconds(ts: CliHarness) -> None:
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    pid = ts.record(spin).pid
    assert pid is not None
    os.kill(pid, 19)                    # SIGSTOP
    try:
        t0 = time.monotonic()
        err = ts.fail("pause", "spin", match=f"spin (domain {spin}) does not answer: its process (pid {pid}) is "
                                              "stopped")
        assert time.monotonic() - t0 < 15, err
    finally:
        os.kill(pid, 18)                # SIGCONT
    ts.ok("pause", "spin")


# --- save targets (items 1 and 2) ------------------------------------------------------------------------------------

def test_save_over_devices_fifos_and_stdout_writes_in_place(ts: CliHarness, tmp_path: Path) -> None:
    """`vmfork save x /dev/null` used to replace the device with a regular file. A private null device (same
    major/minor) stands in for /dev/null so a regression cannot break the machine."""
    import stat
    import subprocess
    import threading
    dom = ts.create(ts.config("demo", "demo"))
    ts.wait_state(dom, "paused")
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    ts.ok("save", "demo", str(null))
    assert stat.S_ISCHR(os.stat(null).st_mode)

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    ts.ok("save", "demo", str(fifo))
    reader.join(30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and got and got[0][:8] == b"VMFKSAVE"

    plain = tmp_path / "plain.sav"
    ts.ok("save", "demo", str(plain))
    out = subprocess.run(ts.argv("save", "demo", "-"), env=ts.env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # The same file each time but for the header's time stamp: each restores.
    assert len(out.stdout) == len(plain.read_bytes()) == len(got[0])
    for i, data in enumerate((out.stdout, got[0])):
        copy = tmp_path / f"copy{i}.sav"
        copy.write_bytes(data)
        restored = int(ts.ok("restore", "-p", "-n", f"again{i}", str(copy)).strip())
        assert ts.record(restored).state == "paused"


def test_save_refuses_directories_and_sockets_changing_nothing(ts: CliHarness, tmp_path: Path) -> None:
    dom = ts.create(ts.config("demo", "demo"))
    ts.wait_state(dom, "paused")
    before = ts.list_json()
    qmp = ts.record(dom).qmp_socket
    err = ts.fail("save", "demo", qmp, match=f"cannot write save file {qmp}: it is a socket")
    assert "Traceback" not in err
    ts.fail("save", "demo", str(tmp_path), match="it is a directory")
    ts.fail("save", "demo", str(tmp_path / "nodir" / "x.sav"), match="does not exist")
    # the QMP command behind it refuses the same way, before pausing anything
    from vmfork.toolstack.qmp import QmpCommandError
    # (a jailed domain, root's default, opens no file by name at all: it refuses the name itself)
    with pytest.raises(QmpCommandError, match="opens no file by name" if os.geteuid() == 0 else "it is a socket"):
        ts.execute(dom, "vmfork-save", filename=qmp)
    assert os.path.exists(qmp) and ts.execute(dom, "query-status")["status"] == "paused"
    _same_listing(before, ts.list_json())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _same_listing(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """`vmfork list --json` unchanged but for the uptime."""
    def strip(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "uptime"} for e in entries]
    assert strip(before) == strip(after)


def test_a_domain_killed_during_save_leaves_no_temporary(ts: CliHarness, tmp_path: Path) -> None:
    """9 of 12 kills during a save used to leave a hidden 25-218 MB temporary; now the file is unnamed until
    complete, and the CLI says what happened to the target."""
    cfg = ts.config("big", "demo")
    cfg.write_text(cfg.read_text().replace("memory = 64", "memory = 512"))
    dom = ts.create(cfg)
    ts.wait_state(dom, "paused")
    # Dirty a lot of RAM so the save takes a while.
    for i in range(1, 25):
        ts.execute(dom, "vmfork-memory-write", gpa=(8 + 8 * i) << 20,
                   data=base64.b64encode(bytes([i]) * (8 << 20)).decode())
    target = tmp_path / "old.sav"
    target.write_bytes(b"previous contents")
    pid = ts.record(dom).pid
    assert pid is not None
    proc = ts.popen("save", "big", str(target))
    # Kill the domain once its temporary file is being written (its /proc fd list shows the unnamed file).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        if any(f.startswith(f"{tmp_path}/#") for f in fds):        # the unnamed file (O_TMPFILE)
            break
        time.sleep(0.005)
    os.kill(pid, 9)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert f"died during the save (its process, pid {pid}, is gone); {target} is unchanged".encode() in err, err
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stale_named_temporaries_are_removed_by_the_next_save(ts: CliHarness, tmp_path: Path) -> None:
    """Where a temporary had a name (no O_TMPFILE, or a kill between link and rename), the next save into that
    directory removes it once its writer's pid is gone."""
    dom = ts.create(ts.config("demo", "demo"))
    ts.wait_state(dom, "paused")
    dead = _dead_pid()
    stale = tmp_path / f".x.sav.{dead}.0123abcd.tmp"
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / f".y.sav.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"\0")
    ts.ok("save", "demo", str(tmp_path / "x.sav"))
    assert not stale.exists() and live.exists()


def _dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- the processes are the truth (items 3, 4, 5) ---------------------------------------------------------------------

def test_a_dead_domain_follows_on_crash(ts: CliHarness) -> None:
    """kill -9 used to keep the name taken ("already used by domain 1") until a destroy, whatever on_crash said."""
    cfg = ts.config("rel", "demo")                    # on_crash defaults to destroy
    dom = ts.create(cfg)
    ts.wait_state(dom, "paused")
    pid = ts.record(dom).pid
    assert pid is not None
    os.kill(pid, 9)
    ts.wait("the process to die", lambda: not ts.record(dom).alive)
    again = ts.create(cfg)                            # the name is free again: on_crash = destroy applied
    assert again > dom
    ended = [e for e in json.loads(ts.ok("list", "--all", "--json")) if e["state"] == "ended"]
    assert [(e["domid"], e["name"]) for e in ended] == [(dom, "rel")]
    assert f"pid {pid}" in ended[0]["reason"] and "on_crash = destroy" in ended[0]["reason"]
    assert "on_crash = destroy" in ts.ok("list", "--all")
    assert not (ts.run_dir / f"{dom}.qmp").exists() and not (ts.run_dir / f"{dom}.dom").exists()

    kept = ts.create(ts.config("kept", "demo", on_crash="preserve"))
    ts.wait_state(kept, "paused")
    kpid = ts.record(kept).pid
    assert kpid is not None
    os.kill(kpid, 9)
    ts.wait("the process to die", lambda: not ts.record(kept).alive)
    assert ts.listed("kept")["state"] == "crashed"
    ts.fail("create", str(ts.config("kept", "demo")), match="name 'kept' is already used")


def test_a_fork_killed_while_starting_leaves_no_entry(ts: CliHarness) -> None:
    parent = ts.create(ts.config("p8", "demo"))
    ts.wait_state(parent, "paused")
    proc = ts.popen("fork-vm", "p8")
    # Kill the fork's domain process as soon as its entry says "creating".
    deadline = time.monotonic() + 30
    victim = None
    while time.monotonic() < deadline and victim is None:
        for r in ts.registry.all():
            if r.parent == parent and r.state == "creating" and r.pid:
                victim = r.pid
        time.sleep(0.001)
    if victim is None:
        pytest.skip("the fork started before it could be caught while creating")
    os.kill(victim, 9)
    proc.communicate(timeout=30)
    names = [e["name"] for e in ts.list_json()]
    assert names == ["p8"], names


def test_a_deleted_registry_loses_no_domain(ts: CliHarness) -> None:
    """After registry.db was deleted, list showed nothing and create reused domid 1, its name and its socket: the
    old domains became unreachable ghosts."""
    a = ts.create(ts.config("alpha", "demo"))
    b = ts.create(ts.config("beta", "timer 60000"))
    ts.wait_state(a, "paused")
    ts.wait_state(b, "running")
    before = {e["name"]: e for e in ts.list_json()}
    ts.registry.close()
    ts._registry = None
    for suffix in ("", "-wal", "-shm"):
        with_suffix = ts.run_dir / f"registry.db{suffix}"
        if with_suffix.exists():
            with_suffix.unlink()
    after = {e["name"]: e for e in ts.list_json()}
    assert set(after) == {"alpha", "beta"}
    for name in after:
        for key in ("domid", "pid", "qmp_socket", "state", "parent", "config"):
            assert after[name][key] == before[name][key], (name, key)
    ts.fail("create", str(ts.config("alpha", "demo")), match=f"name 'alpha' is already used by domain {a}")
    c = ts.create(ts.config("gamma", "demo"))
    assert c > b
    ts.ok("pause", "beta")
    ts.ok("destroy", "alpha")
    ts.ok("destroy", "beta")
    ts.ok("destroy", "gamma")
    assert ts.list_json() == []


def test_a_damaged_registry_is_named_and_list_still_lists(ts: CliHarness) -> None:
    a = ts.create(ts.config("alpha", "demo"))
    ts.wait_state(a, "paused")
    ts.registry.close()
    ts._registry = None
    db = ts.run_dir / "registry.db"
    for suffix in ("-wal", "-shm"):
        p = ts.run_dir / f"registry.db{suffix}"
        if p.exists():
            p.unlink()
    db.write_bytes(b"this is not an SQLite database" * 100)
    p = ts.run("list")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("\n") == 1 and f"registry {db} is damaged" in p.stderr and "mv " in p.stderr
    assert any(ln.split()[:2] == ["alpha", str(a)] for ln in p.stdout.splitlines()), p.stdout
    db.rename(ts.run_dir / "registry.db.bad")
    assert ts.listed("alpha")["domid"] == a
    ts.ok("destroy", "alpha")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to fill up (needs root)."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_never_hides_the_domains(ts: CliHarness, small_fs: Path) -> None:
    """With the run directory's file system full, destroy --force killed the fork and then failed with "database or
    disk is full", and every list failed after that."""
    ts.run_dir = small_fs / "run"
    ts.env["VMFORK_RUN_DIR"] = str(ts.run_dir)
    par = ts.create(ts.config("par", "demo"))
    ts.wait_state(par, "paused")
    fork = int(ts.ok("fork-vm", "-p", "par").strip())
    before = ts.list_json()
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        assert [e["domid"] for e in ts.list_json()] == [par, fork]
        p = ts.run("destroy", "--force", "par")
        if p.returncode != 0:
            # refused: nothing changed, every process still runs
            assert p.stderr.startswith("vmfork: error: ") and p.stderr.count("\n") == 1, p.stderr
            _same_listing(before, ts.list_json())
            assert all(e["alive"] for e in ts.list_json())
        else:
            assert ts.list_json() == []
    finally:
        filler.unlink()
    ts.ok("list")
    if ts.list_json():
        ts.ok("destroy", "--force", "par")
    assert ts.list_json() == []


# --- commands are atomic (issue 14, item 5) ---------------------------------------------------------------------------

def _snapshot(ts: CliHarness, *domains: str) -> tuple[list[dict[str, Any]], dict[str, Any], set[str]]:
    """Everything a refused command must leave alone: the listing, the domains' registers, the run directory."""
    regs = {d: ts.execute(d, "vmfork-regs-get") for d in domains}
    return ts.list_json(), regs, set(os.listdir(ts.run_dir))


def _unchanged(ts: CliHarness, snap: tuple[list[dict[str, Any]], dict[str, Any], set[str]]) -> None:
    before, regs, files = snap
    _same_listing(before, ts.list_json())
    assert {d: ts.execute(d, "vmfork-regs-get") for d in regs} == regs
    assert set(os.listdir(ts.run_dir)) == files


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00garbage" * 512)
    text = tmp_path / "text.txt"
    text.write_text("not a vmfork file\n")
    return {"garbage": garbage, "text": text}


def test_late_dm_with_a_bad_state_file_renames_nothing(ts: CliHarness, bad_files: dict[str, Path],
                                                       multiboot_guest: Path) -> None:
    """The fork used to be renamed to the config's name before the device-state file was read. The parent is the
    Multiboot guest (its own conventions only), booted by its kernel."""
    cfg = ts.config("mb", "demo")
    cfg.write_text(cfg.read_text().replace(str(ts.kernel), str(multiboot_guest)))
    par = ts.create(cfg, "-p")
    fork = int(ts.ok("fork-vm", "--launch-dm", "no", "-p", "mb").strip())
    fork_name = ts.record(fork).name
    snap = _snapshot(ts, "mb", fork_name)
    renamed = ts.fork_config("renamed", on_crash="preserve")
    for bad in bad_files.values():
        err = ts.fail("fork-vm", "--launch-dm", "late", "-C", str(renamed), "-Q", str(bad), fork_name,
                      match=str(bad))
        assert "device-state file" in err
        _unchanged(ts, snap)
    # The QMP command behind it refuses the same way, renaming nothing.
    from vmfork.toolstack.qmp import QmpCommandError
    with pytest.raises(QmpCommandError, match="device-state file"), ts.qmp(fork_name) as q:
        fd = os.open(bad_files["garbage"], os.O_RDONLY)
        try:
            q.execute("getfd", {"fdname": "bad"}, fds=[fd])
        finally:
            os.close(fd)
        q.execute("vmfork-attach-dm", {"fdname": "bad", "name": "renamed"})
    with pytest.raises(QmpCommandError, match="already used"):
        ts.execute(fork_name, "vmfork-attach-dm", name="mb")
    _unchanged(ts, snap)
    assert ts.record(par).name == "mb"


def test_fork_vm_with_config_and_bad_state_file_creates_nothing(ts: CliHarness, bad_files: dict[str, Path]) -> None:
    par = ts.create(ts.config("par", "demo"))
    ts.wait_state(par, "paused")
    snap = _snapshot(ts, "par")
    cfg = ts.fork_config("child")
    for bad in bad_files.values():
        ts.fail("fork-vm", "-C", str(cfg), "-Q", str(bad), "par", match=str(bad))
        _unchanged(ts, snap)
    ts.fail("fork-vm", "-C", str(ts.fork_config("par")), "par", match="a fork needs a name of its own")
    ts.fail("fork-vm", "-C", str(cfg), "-m", "4", "par", match="-m 4")
    _unchanged(ts, snap)
    child = int(ts.ok("fork-vm", "-C", str(cfg), "-p", "par").strip())     # a good one still works, and takes
    assert ts.record(child).name == "child"                                 # the next domid
    assert child == par + 1


def test_restore_of_a_bad_file_or_name_changes_nothing(ts: CliHarness, bad_files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    par = ts.create(ts.config("par", "demo"))
    ts.wait_state(par, "paused")
    good = tmp_path / "par.sav"
    ts.ok("save", "par", str(good))
    snap = _snapshot(ts, "par")
    for bad in bad_files.values():
        ts.fail("restore", str(bad), match=str(bad))
        _unchanged(ts, snap)
    ts.fail("restore", "-n", "par", str(good), match="name 'par' is already used")
    ts.fail("restore", "-n", "bad/name", str(good), match="name")
    from vmfork.toolstack.qmp import QmpCommandError
    with pytest.raises(QmpCommandError):
        ts.execute("par", "vmfork-save", filename=str(tmp_path))
    _unchanged(ts, snap)
    new = int(ts.ok("restore", "-p", "-n", "copy", str(good)).strip())
    assert new == par + 1


def test_save_to_a_bad_target_changes_nothing(ts: CliHarness, tmp_path: Path) -> None:
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    ts.ok("pause", "spin")
    snap = _snapshot(ts, "spin")
    ts.fail("save", "spin", str(tmp_path), match="it is a directory")
    ts.fail("save", "-p", "spin", ts.record(spin).qmp_socket, match="it is a socket")
    ts.fail("save", "--destroy", "spin", str(tmp_path / "no" / "where.sav"), match="does not exist")
    _unchanged(ts, snap)


# --- pause holders (issue 14, item 4) ---------------------------------------------------------------------------------

GDB = __import__("shutil").which("gdb")


def _gdb_session(ts: CliHarness, port: int, *commands: str) -> str:
    """Real gdb: attach, run the commands (a `continue` is interrupted after a second, as Ctrl-C would), detach."""
    import subprocess
    import sys
    assert GDB is not None
    cmds = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        if c == "continue":
            cmds += ["shell (sleep 1; kill -INT $PPID) &", "continue"]
        elif c.startswith("vmfork "):
            cmds.append(f"shell {sys.executable} -m vmfork.cli {c[len('vmfork '):]}")
        else:
            cmds.append(c)
    cmds.append("detach")
    r = subprocess.run([GDB, "-nx", "-batch", *[a for c in cmds for a in ("-ex", c)]], capture_output=True,
                       text=True, timeout=90, env=ts.env, cwd=ts.base)
    assert "detached" in r.stdout, r.stdout + r.stderr + ts.debug()
    return r.stdout


@pytest.mark.skipif(GDB is None, reason="needs gdb (Debian package gdb)")
def test_a_domain_paused_by_the_toolstack_stays_paused_when_gdb_detaches(ts: CliHarness, tmp_path: Path) -> None:
    """It used to run again after a gdb session that ran it. Xen and QEMU keep the toolstack's pause apart from the
    debugger's; `vmfork list` shows both."""
    import re
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    ts.ok("pause", "spin")
    assert ts.listed("spin")["pause_holders"] == ["toolstack"]
    server = ts.popen("gdbserver", "spin", "--listen", "127.0.0.1:0")
    assert server.stdout is not None
    m = re.fullmatch(r"gdb: target remote 127\.0\.0\.1:(\d+)\n", server.stdout.readline().decode())
    assert m, ts.debug()
    port = int(m.group(1))

    during = tmp_path / "during.json"
    out = _gdb_session(ts, port, "continue", "info registers rip", f"vmfork list --json spin > {during}")
    assert re.search(r"^rip\s+0x", out, re.M), out
    row = json.loads(during.read_text())[0]
    assert row["state"] == "paused" and row["pause_holders"] == ["debugger", "toolstack"], row
    assert "paused by debugger and toolstack" in row["reason"]
    time.sleep(0.5)
    after = ts.listed("spin")
    assert after["state"] == "paused" and after["pause_holders"] == ["toolstack"], after
    assert ts.execute("spin", "query-status")["status"] == "paused"

    # The toolstack's unpause under the debugger's stop lets go of its own pause only; the debugger's detach then
    # resumes the domain, since no holder is left.
    mid = tmp_path / "mid.json"
    _gdb_session(ts, port, "continue", "vmfork unpause spin", f"vmfork list --json spin > {mid}")
    row = json.loads(mid.read_text())[0]
    assert row["state"] == "paused" and row["pause_holders"] == ["debugger"], row
    ts.wait_state(spin, "running")
    assert ts.listed("spin")["pause_holders"] == []


# --- logs without end (item 7) ------------------------------------------------------------------------------------

def test_console_log_is_capped_by_rotation_and_empty_logs_go(ts: CliHarness) -> None:
    dom = ts.create(ts.config("chatty", "det 4000", console_log_max=64))    # about 150 KB of output, 64 KiB cap
    log = ts.run_dir / f"{dom}.log"
    ts.wait_state(dom, "paused")                        # at its ready marker
    ts.ok("unpause", "chatty")
    ts.wait_gone(dom, timeout=120)                      # prints, exits; on_poweroff = destroy
    old = Path(f"{log}.1")
    assert old.exists() and old.stat().st_size <= 64 << 10 and log.stat().st_size <= 64 << 10
    assert "det 3999 " in log.read_text()               # the newest output is kept
    ts.fail("create", str(ts.config("tiny", "hello", console_log_max=1)), match="console_log_max: must be at "
                                                                               "least 64 KiB")
    quiet = ts.create(ts.config("quiet", "hello"), "-p")
    assert (ts.run_dir / f"{quiet}.log").exists()
    ts.ok("destroy", "quiet")
    assert not (ts.run_dir / f"{quiet}.log").exists()   # the guest never wrote to it


def test_console_clients_that_never_read_share_one_cap() -> None:
    import socket as socketlib
    import tempfile

    from vmfork.toolstack.console import CLIENTS_BUFFER, ConsoleHub
    with tempfile.TemporaryDirectory() as d:
        hub = ConsoleHub(f"{d}/1.log", lambda: None, log_max=1 << 20)
        pairs = [socketlib.socketpair() for _ in range(65)]
        for a, _b in pairs:
            hub.add(a, device_model=True)
        for _ in range(64):
            hub.write(b"x" * (64 << 10))               # 4 MiB of output nobody reads
        total = sum(len(c.out) for c in hub.clients.values())
        assert total <= CLIENTS_BUFFER + 65 * 1024, total
        assert os.path.getsize(f"{d}/1.log") <= 1 << 20 and os.path.getsize(f"{d}/1.log.1") <= 1 << 20
        hub.close()
        for a, b in pairs:
            a.close()
            b.close()
