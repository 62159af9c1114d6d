"""vmfork tried as a hostile but fair user tries it (issue 20, and issue 14's toolstack items): QMP abuse, save
targets that are not plain files, kills in the middle of commands, a broken registry, full disks, endless logs and
misleading messages. Each test reproduces a failure seen on the old code; every refusal must be one line that
names the problem and changes nothing."""

from __future__ import annotations

import base64
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
    time.sleep(1.0)
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
    with pytest.raises(QmpCommandError, match="it is a socket"):
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
