"""The toolstack on real /dev/kvm, driven as a user drives it: `vmfork` commands in subprocesses, each domain a
process of its own, QMP through the real `qemu.qmp` client and through socat, the console through `vmfork console`.

Every test has its own runtime directory (VMFORK_RUN_DIR); a finalizer kills whatever domain processes a test left,
even when it fails."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_harness import CliHarness, domain_pids, result_line
from vmfork.toolstack.qmp import QmpCommandError
from vmfork.toolstack.runtime import pid_alive

INPUT_BUFFER = 0x800000        # where the test guest reads its input (guests/README.md)


@pytest.fixture
def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    with CliHarness(tmp_path, pvh_guest) as t:
        yield t


# --- domains, list, console, pause/unpause, destroy ---------------------------------------------------------------

def test_create_list_pause_unpause_destroy(ts: CliHarness) -> None:
    demo = ts.create(ts.config("demo", "demo"))
    rec = ts.wait_state(demo, "paused")                 # at its ready marker: the harness start
    assert rec.reason == "harness-start"
    assert "vmfork-guest: ready" in ts.log(demo)

    spin = ts.create(ts.config("spin", "timer 60000"))  # busy in CPL3 for a minute
    assert spin == demo + 1
    ts.wait_state(spin, "running")
    held = ts.create(ts.config("held", "hello"), "-p")
    assert ts.record(held).state == "paused" and ts.record(held).reason == "created paused"
    assert ts.execute(held, "query-status") == {"status": "prelaunch", "running": False, "singlestep": False}
    assert ts.log(held) == ""

    table = ts.ok("list")
    assert table.splitlines()[0].split()[:5] == ["Name", "ID", "Mem", "VCPUs", "State"]
    row = next(ln for ln in table.splitlines() if ln.startswith("demo "))
    assert row.split()[:5] == ["demo", str(demo), "64", "1", "paused"] and "harness-start" in row
    entries = {e["name"]: e for e in ts.list_json()}
    assert entries["spin"]["state"] == "running" and entries["held"]["state"] == "paused"
    e = entries["demo"]
    assert e["console_log"] == str(ts.run_dir / f"{demo}.log") and Path(e["console_log"]).exists()
    assert e["qmp_socket"] == str(ts.run_dir / f"{demo}.qmp") and e["parent"] is None
    assert (e["memory"], e["vcpus"], e["launch_dm"]) == (64, 1, "yes")
    assert ts.ok("list", "demo", "--json").count('"domid"') == 1

    # Owner-only permissions on the runtime directory and the sockets.
    assert os.stat(ts.run_dir).st_mode & 0o777 == 0o700
    for suffix in ("qmp", "console", "log"):
        assert os.stat(ts.run_dir / f"{spin}.{suffix}").st_mode & 0o777 == 0o600

    ts.ok("pause", "spin")
    assert ts.record(spin).state == "paused"
    assert ts.execute(spin, "query-status")["status"] == "paused"
    ts.ok("unpause", str(spin))
    assert ts.execute(spin, "query-status") == {"status": "running", "running": True, "singlestep": False}

    # A hello domain runs to its exit (on_poweroff = destroy) and is gone; its log stays.
    ts.ok("unpause", "held")
    ts.wait_gone(held)
    assert "vmfork-guest: hello pvh ram=64MiB" in ts.log(held)

    # A guest that crashes, with on_crash = "preserve", stays listed as crashed with the reason.
    crash = ts.create(ts.config("crash", "fault", on_crash="preserve"))
    rec = ts.wait_state(crash, "crashed")
    assert "shut down" in rec.reason and ts.execute(crash, "query-status")["status"] == "guest-panicked"
    ts.fail("unpause", "crash", match="has crashed")
    ts.ok("destroy", "crash")

    ts.ok("destroy", "spin")
    assert ts.registry.get(spin) is None
    assert not (ts.run_dir / f"{spin}.qmp").exists() and not (ts.run_dir / f"{spin}.console").exists()
    ts.ok("destroy", "demo")
    assert ts.list_json() == []


def test_console_replays_follows_and_takes_input(ts: CliHarness) -> None:
    det = ts.create(ts.config("det", "det 3"))
    ts.wait_state(det, "paused")
    con = subprocess.Popen(ts.argv("console", "det"), env=ts.env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert con.stdout is not None and con.stdin is not None
        seen = b""
        while b"vmfork-guest: ready\n" not in seen:            # replayed from the log
            chunk = con.stdout.read1(4096)                        # type: ignore[attr-defined]
            assert chunk, f"console ended early: {seen!r} {con.stderr.read() if con.stderr else ''}"
            seen += chunk
        con.stdin.write(b"hi!\n")
        con.stdin.flush()
        ts.wait("the console input to arrive", lambda: ts.execute(det, "vmfork-query")["console_input_bytes"] == 4)
        ts.ok("unpause", "det")                                   # the guest goes on: 3 lines, then it exits
        while seen.count(b"\ndet ") < 3:
            chunk = con.stdout.read1(4096)                        # type: ignore[attr-defined]
            assert chunk, seen
            seen += chunk
        con.stdin.close()
        assert con.wait(20) == 0                                  # the domain ended: the console ends too
    finally:
        if con.poll() is None:
            con.kill()
            con.wait()
    out = seen.decode()
    assert out.index("vmfork-guest: ready") < out.index("det 0 ") < out.index("det 2 ")
    assert out.count("vmfork-guest: ready") == 1                  # nothing shown twice
    ts.wait_gone(det)


def test_console_on_a_terminal_detaches_with_ctrl_bracket(ts: CliHarness) -> None:
    import pty
    dom = ts.create(ts.config("tty", "demo"))
    ts.wait_state(dom, "paused")
    master, slave = pty.openpty()
    con = subprocess.Popen(ts.argv("console", "tty"), env=ts.env, stdin=slave,
                           stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        seen = b""
        while b"Ctrl-] detaches" not in seen or b"vmfork-guest: ready" not in seen:
            seen += os.read(master, 4096)
        assert b"vmfork-guest: ready\r\n" in seen                      # raw mode, but output keeps CR LF
        os.write(master, b"ab\x1d")                                    # Ctrl-] after two bytes of input
        assert con.wait(10) == 0
    finally:
        if con.poll() is None:
            con.kill()
            con.wait()
        os.close(master)
    assert ts.execute(dom, "vmfork-query")["console_input_bytes"] == 2
    assert ts.record(dom).state == "paused"                           # detaching leaves the domain alone


def test_create_with_console_attached(ts: CliHarness) -> None:
    p = ts.run("create", "-c", str(ts.config("hi", "hello")))
    assert p.returncode == 0, p.stderr + ts.debug()
    lines = p.stdout.splitlines()
    assert lines[0].strip().isdigit()
    assert any("vmfork-guest: hello pvh" in ln for ln in lines) and "vmfork-guest: ready" in p.stdout


# --- fork-vm ---------------------------------------------------------------------------------------------------------

def _qemu_qmp_save_devices_state(sock: str, filename: str) -> dict[str, Any]:
    from qemu.qmp import QMPClient

    async def go() -> dict[str, Any]:
        qmp = QMPClient("vmfork-test")
        await qmp.connect(sock)
        try:
            status = await qmp.execute("query-status")
            assert await qmp.execute("xen-save-devices-state", {"filename": filename, "live": False}) == {}
            return dict(status)  # type: ignore[call-overload]
        finally:
            await qmp.disconnect()
    return asyncio.run(go())


def _socat(sock: str, text: str) -> list[dict[str, Any]]:
    """Type `text` into `socat - UNIX-CONNECT:<sock>` as the seed shows, line by line; returns the replies."""
    p = subprocess.Popen(["socat", "-", f"UNIX-CONNECT:{sock}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    msgs = [json.loads(p.stdout.readline())]                          # the greeting
    for line in text.splitlines(keepends=True):
        p.stdin.write(line.encode())
        p.stdin.flush()
    want = text.count('"execute"')
    while len(msgs) < want + 1:
        line = p.stdout.readline()
        assert line, msgs
        msgs.append(json.loads(line))
    p.stdin.close()
    assert p.wait(10) == 0, p.stderr.read() if p.stderr else ""
    return msgs


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (./dev test installs it)")
def test_fork_vm_all_three_device_model_modes(ts: CliHarness) -> None:
    # The seed's flow names files in QMP messages (socat cannot pass descriptors): a domain outside the jail opens
    # them itself. A jailed domain (root's default) takes descriptors only: test_jail_files.py.
    parent = ts.create(ts.config("parent", "demo", jail=0))
    ts.wait_state(parent, "paused")
    sock = ts.record(parent).qmp_socket

    # The parent's device state, through its QMP socket: with the qemu.qmp library ...
    dm1 = str(ts.base / "dm-qemu-qmp.state")
    assert _qemu_qmp_save_devices_state(sock, dm1)["status"] == "paused"
    # ... and with socat, typed exactly as the seed shows it (backslash line breaks included).
    dm2 = str(ts.base / "qemu_state")
    seed = ('{ "execute": "qmp_capabilities" }\n'
            '{ "execute": "xen-save-devices-state", \\\n'
            f'    "arguments": {{ "filename": "{dm2}", \\\n'
            '                    "live": false} }\n')
    msgs = _socat(sock, seed)
    assert "QMP" in msgs[0] and msgs[1:] == [{"return": {}}, {"return": {}}]
    assert Path(dm1).read_bytes()[:8] == Path(dm2).read_bytes()[:8] == b"VMFKDEVS"
    # the CLI shortcut does the same, and so does "live": true (or no "live", QEMU's default: true), which only
    # concerns disk images in QEMU: the same devices (the RTC's clock moves between saves, so not the same bytes)
    from vmfork.snapshot import load_device_state
    ts.ok("save-devices-state", "parent", str(ts.base / "dm-cli.state"))
    devices = set(load_device_state(dm2).states)
    assert set(load_device_state(ts.base / "dm-cli.state").states) == devices
    for live in ({"live": True}, {}):
        dm3 = str(ts.base / f"dm-live-{len(live)}.state")
        assert ts.execute("parent", "xen-save-devices-state", filename=dm3, **live) == {}
        assert set(load_device_state(dm3).states) == devices

    # --launch-dm no: a fork without a device model (prints its domid), paused.
    nodm_cfg = ts.fork_config("nodm", on_poweroff="preserve", memory=64)
    nodm = int(ts.ok("fork-vm", "--launch-dm", "no", "-p", "-C", str(nodm_cfg), "parent").strip())
    q = ts.execute(nodm, "vmfork-query")
    assert (q["parent"], q["launch_dm"], q["state"]) == (parent, "no", "paused")
    assert ts.record(nodm).launch_dm == "no"
    # The seed's late launch: the fork config and the device-state file saved above; then its console works.
    ts.ok("fork-vm", "--launch-dm", "late", "-C", str(nodm_cfg), "-Q", dm2, "nodm")
    assert ts.record(nodm).launch_dm == "yes"
    ts.ok("unpause", "nodm")
    rec = ts.wait_state(nodm, "shutdown")
    assert rec.reason == "the guest exited with status 37"          # demo with no input: 0x25
    assert result_line(ts.log(nodm)) == "result: len=0 fnv=cbf29ce484222325 primes=904"
    assert ts.execute(nodm, "vmfork-query")["unknown_port_accesses"] == {}

    # --launch-dm yes with -C and -Q (the seed's full fork), and a DM-less fork that runs without one.
    full = int(ts.ok("fork-vm", "-C", str(ts.fork_config("full", on_poweroff="preserve")), "-Q", dm1,
                     "-m", "1", "parent").strip())
    ts.wait_state(full, "shutdown")
    assert result_line(ts.log(full)) == "result: len=0 fnv=cbf29ce484222325 primes=904"
    bare = int(ts.ok("fork-vm", "--launch-dm", "no", "--block-interrupts", "parent").strip())
    ts.wait("the DM-less fork to touch the absent UART",
            lambda: "0x3f8" in ts.execute(bare, "vmfork-query")["unknown_port_accesses"])
    assert ts.execute(bare, "vmfork-query")["irqs_blocked"] is True
    assert ts.log(bare) == "" and ts.record(bare).state == "running"

    # `fork-vm PARENT` alone: a full fork named <parent>-fork-<n>, device state straight from the parent.
    plain = int(ts.ok("fork-vm", "-p", "parent").strip())
    rec = ts.record(plain)
    assert rec.name.startswith("parent-fork-") and rec.parent == parent and rec.launch_dm == "yes"
    # Input written into the fork's memory changes its result (and not the parent's).
    data = b"\x05\0\0\0\0\0\0\0hello"
    ts.execute(plain, "vmfork-memory-write", gpa=INPUT_BUFFER, data=data.hex(), encoding="hex")
    assert ts.execute(parent, "vmfork-memory-read", gpa=INPUT_BUFFER, length=8)["data"] == \
        base64.b64encode(bytes(8)).decode()
    ts.ok("unpause", rec.name)
    ts.wait_gone(plain)                                               # on_poweroff = destroy
    assert "result: len=5 " in ts.log(plain)

    # The parent stays paused while it has forks; the tree shows them.
    err = ts.fail("unpause", "parent", match="live forks")
    assert "nodm" in err and "full" in err
    tree = ts.ok("list", "--tree")
    assert tree.splitlines()[0].startswith(f"parent ({parent}) paused")
    assert any(ln.startswith(("├── nodm", "└── nodm")) for ln in tree.splitlines())
    owned = {e["name"]: e["pages_owned"] for e in ts.list_json()}
    assert owned["parent"] is None and owned["full"] > 0
    ts.ok("destroy", "--force", "parent")
    assert ts.list_json() == []
    assert domain_pids(ts.run_dir) == []


def test_fork_reset_and_forks_of_forks(ts: CliHarness) -> None:
    parent = ts.create(ts.config("p", "det 2"))
    ts.wait_state(parent, "paused")
    f = int(ts.ok("fork-vm", "-p", "-C", str(ts.fork_config("f", on_poweroff="preserve")), "p").strip())
    seed = (12345).to_bytes(8, "little")
    ts.ok("qmp", "f", json.dumps({"execute": "vmfork-memory-write",
                                   "arguments": {"gpa": INPUT_BUFFER, "data": base64.b64encode(seed).decode()}}))
    ts.ok("unpause", "f")
    ts.wait_state(f, "shutdown")
    first = [ln for ln in ts.log(f).splitlines() if ln.startswith("det ")]
    assert len(first) == 2

    ts.ok("fork-reset", "f")
    assert ts.record(f).state == "paused"
    assert ts.execute(f, "vmfork-memory-read", gpa=INPUT_BUFFER, length=8)["data"] == \
        base64.b64encode(bytes(8)).decode()                           # the memory is the parent's again
    ts.ok("unpause", "f")
    ts.wait_state(f, "shutdown")
    lines = [ln for ln in ts.log(f).splitlines() if ln.startswith("det ")]
    assert len(lines) == 4 and lines[2:] != first                     # the default seed this time
    ts.ok("fork-reset", "--state-only", "f")
    ts.ok("fork-reset", "--memory-only", "f")
    ts.fail("fork-reset", "p", match="not a fork")

    # A fork of a fork: the middle fork holds its own RAM (a layer on top of the parent's).
    ts.ok("fork-reset", "f")
    ts.execute(f, "vmfork-memory-write", gpa=INPUT_BUFFER, data=base64.b64encode(seed).decode())
    g = int(ts.ok("fork-vm", "-C", str(ts.fork_config("g", on_poweroff="preserve")), "f").strip())
    ts.wait_state(g, "shutdown")
    assert [ln for ln in ts.log(g).splitlines() if ln.startswith("det ")] == first
    assert ts.record(g).parent == f
    ts.fail("unpause", "f", match="live forks (g (domain")
    ts.fail("destroy", "f", match="has live forks")
    ts.fail("destroy", "p", match="has live forks")
    ts.ok("destroy", "g")
    ts.ok("unpause", "f")                                             # free again
    ts.ok("destroy", "--force", "p")
    assert ts.list_json() == []


# --- save and restore ------------------------------------------------------------------------------------------------

def test_save_and_restore(ts: CliHarness) -> None:
    demo = ts.create(ts.config("sv", "demo"))
    ts.wait_state(demo, "paused")
    path = ts.base / "sv.vmfork"
    ts.ok("save", "sv", str(path))                                    # the saved domain stays as it was
    assert path.exists() and ts.record(demo).state == "paused"
    ts.fail("restore", str(path), match="already used by domain")     # same name
    copy = int(ts.ok("restore", "-p", "-n", "copy", str(path)).strip())
    assert ts.record(copy).state == "paused" and ts.record(copy).kind == "restore"
    ts.ok("unpause", "copy")
    ts.wait_gone(copy)
    assert result_line(ts.log(copy)) == "result: len=0 fnv=cbf29ce484222325 primes=904"

    ts.ok("save", "--destroy", "sv", str(path))                       # as plain xl save: gone after
    ts.wait_gone(demo)
    again = int(ts.ok("restore", str(path)).strip())
    ts.wait_gone(again)
    assert "result: len=0" in ts.log(again)
    ts.fail("restore", str(ts.base / "nope.vmfork"), match="nope.vmfork")


# --- bad input and faults ---------------------------------------------------------------------------------------------

def test_bad_input(ts: CliHarness) -> None:
    ts.fail("pause", "99", match="no domain with id 99")
    ts.fail("destroy", "nosuch", match="no domain named 'nosuch'")
    bad = ts.base / "bad.cfg"
    bad.write_text('name = "x"\nkernel = "k"\nmemroy = 64\n')
    ts.fail("create", str(bad), match="bad.cfg:3: unknown key \"memroy\"")
    ts.fail("create", str(ts.base / "missing.cfg"), match="missing.cfg")
    nokernel = ts.base / "nok.cfg"
    nokernel.write_text('name = "x"\nkernel = "no-such-kernel"\n')
    ts.fail("create", str(nokernel), match="kernel")

    demo = ts.create(ts.config("demo", "demo"))
    ts.wait_state(demo, "paused")
    ts.fail("create", str(ts.config("demo", "hello")), match="'demo' is already used by domain")
    ts.fail("fork-vm", "-m", "2", "demo", match="-m 2")
    ts.fail("fork-vm", "-C", str(ts.fork_config("demo")), "demo", match="name: a fork needs a name of its own")
    ts.fail("fork-vm", "-C", str(ts.fork_config("big", memory=128)), "demo", match="memory: a fork has its parent")
    ts.fail("fork-vm", "-C", str(ts.fork_config("wide", vcpus=2)), "demo", match="vcpus")
    noname = ts.base / "noname.cfg"
    noname.write_text('on_crash = "preserve"\n')
    ts.fail("fork-vm", "-C", str(noname), "demo", match="missing required key \"name\"")
    ts.fail("fork-vm", "--launch-dm", "late", "demo", match="not a fork")
    spin = ts.create(ts.config("spin", "timer 60000"))
    ts.wait_state(spin, "running")
    ts.fail("fork-vm", "spin", match="while it runs: pause it first")
    assert ts.list_json()[-1]["name"] == "spin" and len(ts.list_json()) == 2   # no half-made fork left

    # QMP: malformed JSON, unknown commands and bad arguments get errors; the domain keeps running.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ts.record(spin).qmp_socket)
        f = s.makefile("rwb")

        def send(raw: bytes) -> dict[str, Any]:
            f.write(raw)
            f.flush()
            return dict(json.loads(f.readline()))
        assert "QMP" in json.loads(f.readline())
        assert send(b'{"execute": "query-status"}')["error"]["desc"].startswith("Expecting capabilities")
        assert send(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        assert send(b'{"execute": "nope", "id": 7}') == {
            "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 7}
        assert send(b'{"execute": "query-status" ]\n')["error"]["class"] == "GenericError"
        assert "JSON parse error" in send(b"garbage\n")["error"]["desc"]
        assert send(b"[1, 2]")["error"]["desc"] == "QMP input must be a JSON object"
        assert send(b'{"execute": "xen-save-devices-state"}')["error"]["desc"] == "Parameter 'filename' is missing"
        assert send(b'{"execute": "stop", "arguments": {"x": 1}}')["error"]["desc"] == "Parameter 'x' is unexpected"
        assert "expected: integer" in send(b'{"execute": "vmfork-memory-read", "arguments": '
                                           b'{"gpa": "0", "length": 1}}')["error"]["desc"]
        assert "outside guest RAM" in send(b'{"execute": "vmfork-memory-read", "arguments": '
                                           b'{"gpa": 1099511627776, "length": 1}}')["error"]["desc"]
        assert "pause it first" in send(b'{"execute": "vmfork-regs-get"}')["error"]["desc"]
        msgs = [send(b'{"execute": "stop"}')]
        while "return" not in msgs[-1]:
            msgs.append(json.loads(f.readline()))
        assert [m["event"] for m in msgs if "event" in m] == ["STOP"]
        msgs = [send(b'{"execute": "cont"}')]
        while "return" not in msgs[-1]:
            msgs.append(json.loads(f.readline()))
        assert [m["event"] for m in msgs if "event" in m] == ["RESUME"]
        reply = send(b'{"execute":\n "query-status",\n "id": "a"}{"execute": "query-name", "id": "b"}')
        assert reply == {"return": {"status": "running", "running": True, "singlestep": False}, "id": "a"}
        assert json.loads(f.readline()) == {"return": {"name": "spin"}, "id": "b"}
    p = ts.run("qmp", "spin", '{"execute": "query-status"')           # incomplete, then the end of input
    assert p.returncode == 1 and "JSON parse error" in p.stdout and "Traceback" not in p.stderr
    assert ts.execute(spin, "query-status")["status"] == "running"
    assert ts.record(spin).state == "running"
    with pytest.raises(QmpCommandError, match="unknown registers: rxx"):
        ts.execute("demo", "vmfork-regs-set", regs={"rxx": 1})
    regs = ts.execute("demo", "vmfork-regs-get")
    assert regs["rdi"] == INPUT_BUFFER and regs["cr3"] > 0 and regs["segments"]["cs"]["dpl"] == 3
    ts.ok("destroy", "spin")
    ts.ok("destroy", "demo")


def test_racing_creates_get_distinct_domids_and_names(ts: CliHarness) -> None:
    cfgs = [ts.config(f"r{i}", "demo") for i in range(3)] + [ts.config("same", "demo")] * 2
    procs = [subprocess.Popen(ts.argv("create", str(c)), env=ts.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cfgs]
    results = [(p.wait(60), p.stdout.read() if p.stdout else "", p.stderr.read() if p.stderr else "")
               for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    ok = [int(out) for rc, out, _ in results if rc == 0]
    failed = [err for rc, _, err in results if rc != 0]
    assert len(ok) == 4 and len(set(ok)) == 4, results
    assert len(failed) == 1 and "'same' is already used by domain" in failed[0], results
    names = sorted(e["name"] for e in ts.list_json())
    assert names == ["r0", "r1", "r2", "same"]
    ts.ok("destroy", "same")
    later = ts.create(ts.config("later", "demo"))
    assert later > max(ok)                                            # domids are not reused


def test_killed_domain_shows_crashed_and_destroy_cleans_up(ts: CliHarness) -> None:
    # on_crash = "preserve" keeps a domain whose process died, as crashed (the default, destroy, removes it: see
    # test_hostile.py).
    dom = ts.create(ts.config("victim", "demo", on_crash="preserve"))
    ts.wait_state(dom, "paused")
    parent = ts.create(ts.config("par", "demo"))
    ts.wait_state(parent, "paused")
    child = int(ts.ok("fork-vm", "-p", "par").strip())
    pid = ts.record(dom).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    ts.wait("the process to die", lambda: not ts.record(dom).alive)
    entry = next(e for e in ts.list_json() if e["domid"] == dom)
    assert entry["state"] == "crashed" and f"pid {pid}" in entry["reason"] and not entry["alive"]
    assert not (ts.run_dir / f"{dom}.qmp").exists()                  # list swept its stale sockets
    ts.fail("pause", "victim", match="its process")
    ts.ok("destroy", "victim")
    assert ts.registry.get(dom) is None and not (ts.run_dir / f"{dom}.console").exists()

    # A killed fork frees its parent at once (the kernel closes its hold on the parent).
    cpid = ts.record(child).pid
    assert cpid is not None
    ts.fail("unpause", "par", match="live forks")
    os.kill(cpid, signal.SIGKILL)
    ts.wait("the fork to die", lambda: not ts.record(child).alive)
    ts.ok("unpause", "par")                        # runs to its exit, and ends (on_poweroff = destroy)
    ts.wait_gone(parent)
    assert ts.list_json() == [] and domain_pids(ts.run_dir) == []  # the fork's on_crash (destroy) removed it


def test_destroy_parent_with_forks_needs_force(ts: CliHarness) -> None:
    parent = ts.create(ts.config("root", "demo"))
    ts.wait_state(parent, "paused")
    a = int(ts.ok("fork-vm", "-p", "root").strip())
    b = int(ts.ok("fork-vm", "-p", str(a)).strip())
    ts.fail("destroy", "root", match="has live forks")
    with pytest.raises(QmpCommandError, match="live forks"):
        ts.execute("root", "quit")
    assert {e["domid"] for e in ts.list_json()} == {parent, a, b}
    pids = [ts.record(d).pid for d in (parent, a, b)]
    ts.ok("destroy", "--force", "root")
    assert ts.list_json() == []
    assert not any(pid_alive(p, None) for p in pids)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid (os.setuid)")
def test_peer_of_another_uid_is_refused(pvh_guest: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="vmfork-uid-", dir="/tmp"))
    os.chmod(base, 0o711)                      # reachable by uid 65534, as /run is
    ts = CliHarness(base, pvh_guest)
    try:
        dom = ts.create(ts.config("mine", "demo"))
        ts.wait_state(dom, "paused")
        sock = ts.record(dom).qmp_socket

        def as_nobody() -> str:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                                 # the child: never returns into pytest
                try:
                    os.close(r)
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX)
                    s.settimeout(5)
                    try:
                        s.connect(sock)
                        data = b""
                        while chunk := s.recv(4096):
                            data += chunk
                        msg = "reply " + data.decode()
                    except OSError as e:
                        msg = f"oserror {e.errno}"
                    os.write(w, msg.encode())
                finally:
                    os._exit(0)
            os.close(w)
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
            os.close(r)
            os.waitpid(pid, 0)
            return out.decode()

        import errno
        assert as_nobody() == f"oserror {errno.EACCES}"       # 0700 directory, 0600 socket
        # Even with the file permissions opened up, the domain checks the peer's credentials.
        os.chmod(ts.run_dir, 0o711)
        os.chmod(sock, 0o666)
        got = as_nobody()
        assert got.startswith("reply ")
        reply = json.loads(got[len("reply "):])
        assert "permission denied" in reply["error"]["desc"] and "uid 65534" in reply["error"]["desc"]
        os.chmod(ts.run_dir, 0o700)
        assert ts.execute(dom, "query-status")["status"] == "paused"   # still serving its owner
        ts.ok("destroy", "mine")
    finally:
        ts.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_the_cli_harness_fails_a_test_that_leaves_an_orphan_domain_process(tmp_path: Path, pvh_guest: Path) -> None:
    """The teardown check every CLI test relies on: a domain process no registry entry names (what a destroy
    that left its process behind would look like) fails the test, and is killed anyway."""
    h = CliHarness(tmp_path, pvh_guest)
    with pytest.raises(AssertionError, match="outlived their registry entries"):
        with h:
            dom = h.create(h.config("orphan", "hello"), "-p")
            pid = h.record(dom).pid
            assert pid is not None and pid_alive(pid, None)
            h.registry.remove(dom)
    assert not domain_pids(h.run_dir)


# --- reset, reboot, shutdown ------------------------------------------------------------------------------------------

def test_reboot_boots_a_created_domain_again(ts: CliHarness) -> None:
    banner = "vmfork-guest: fuzz parse="
    dom = ts.create(ts.config("rb", "fuzz 2"))          # prints its banner at boot, then parses forever, no markers
    ts.wait("the first boot", lambda: ts.log(dom).count(banner) == 1)
    ts.wait_state(dom, "running")
    ts.execute(dom, "vmfork-memory-write", gpa=0x2000000, data="abcd", encoding="hex")   # unused RAM
    ts.ok("reboot", "rb")
    ts.wait("the second boot", lambda: ts.log(dom).count(banner) == 2)
    rec = ts.record(dom)
    assert (rec.domid, rec.name, rec.state) == (dom, "rb", "running")
    assert ts.execute(dom, "query-status")["status"] == "running"
    assert ts.execute(dom, "vmfork-memory-read", gpa=0x2000000, length=2, encoding="hex")["data"] == "0000"

    # QMP system_reset on the paused domain: reset, still paused (QEMU's prelaunch), no boot until unpaused.
    ts.ok("pause", "rb")
    with ts.qmp(dom) as q:
        assert q.execute("system_reset") == {}
        events = q.events
    assert [(e["event"], e["data"]) for e in events] == [
        ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]
    assert ts.record(dom).state == "paused"
    assert ts.execute(dom, "query-status")["status"] == "prelaunch"
    assert ts.log(dom).count(banner) == 2
    ts.ok("unpause", "rb")
    ts.wait("the third boot", lambda: ts.log(dom).count(banner) == 3)

    names = {c["name"] for c in ts.execute(dom, "query-commands")}
    assert {"system_reset", "system_powerdown"} <= names
    ts.ok("destroy", "rb")


def test_system_reset_returns_a_paused_fork_to_its_fork_point(ts: CliHarness) -> None:
    parent = ts.create(ts.config("p", "det 2"))
    ts.wait_state(parent, "paused")
    f = int(ts.ok("fork-vm", "-p", "-C", str(ts.fork_config("f", on_poweroff="preserve")), "p").strip())
    seed = (12345).to_bytes(8, "little")
    ts.execute(f, "vmfork-memory-write", gpa=INPUT_BUFFER, data=seed.hex(), encoding="hex")
    ts.ok("unpause", "f")
    ts.wait_state(f, "shutdown")
    seeded = [ln for ln in ts.log(f).splitlines() if ln.startswith("det ")]
    assert len(seeded) == 2

    ts.fail("unpause", "f", match=f"reset it (vmfork reboot {f})")
    # From the shut-down state: reset, paused at the fork point (the parent's harness marker), memory back.
    ts.ok("qmp", "f", "system_reset")
    rec = ts.record(f)
    assert (rec.state, rec.reason) == ("paused", "harness-start")
    assert ts.execute(f, "vmfork-memory-read", gpa=INPUT_BUFFER, length=8, encoding="hex")["data"] == "00" * 8
    # Written again, then reset while paused: the write is undone and it stays paused.
    ts.execute(f, "vmfork-memory-write", gpa=INPUT_BUFFER, data=seed.hex(), encoding="hex")
    with ts.qmp(f) as q:
        assert q.execute("system_reset") == {}
        assert [e["event"] for e in q.events] == ["RESET"]
    assert ts.record(f).state == "paused"
    assert ts.execute(f, "query-status")["status"] == "paused"
    assert ts.execute(f, "vmfork-memory-read", gpa=INPUT_BUFFER, length=8, encoding="hex")["data"] == "00" * 8
    ts.ok("unpause", "f")
    ts.wait_state(f, "shutdown")
    lines = [ln for ln in ts.log(f).splitlines() if ln.startswith("det ")]
    assert len(lines) == 4 and lines[2:] != seeded                    # the default seed: the parent's memory
    ts.ok("destroy", "--force", "p")


def test_reset_refusals_and_shutdown(ts: CliHarness) -> None:
    parent = ts.create(ts.config("par", "demo"))
    ts.wait_state(parent, "paused")
    child = int(ts.ok("fork-vm", "-p", "par").strip())
    child_name = ts.record(child).name
    err = ts.fail("reboot", "par", match="has live forks")
    assert f"{child_name} (domain {child})" in err
    with pytest.raises(QmpCommandError, match="live forks"):
        ts.execute("par", "system_reset")
    assert ts.record(parent).state == "paused" and ts.record(child).state == "paused"

    # shutdown / system_powerdown: nothing to ask the guest with; the domain is untouched.
    err = ts.fail("shutdown", "par", match="no ACPI power button or PV shutdown channel")
    assert "vmfork destroy" in err
    with pytest.raises(QmpCommandError, match="no ACPI power button"):
        ts.execute(child, "system_powerdown")
    ts.fail("reboot", "nosuch", match="no domain named 'nosuch'")
    ts.ok("destroy", str(child))
    ts.wait("the fork's hold to go", lambda: ts.execute(parent, "vmfork-query")["forks"] == [])

    # A restored domain has no kernel to boot again nor a fork point.
    path = ts.base / "par.vmfork"
    ts.ok("save", "par", str(path))
    copy = int(ts.ok("restore", "-p", "-n", "copy", str(path)).strip())
    ts.fail("reboot", "copy", match="restored from")
    assert ts.record(copy).state == "paused"
    ts.ok("unpause", "copy")                                          # it still works: runs to its exit
    ts.wait_gone(copy)
    assert result_line(ts.log(copy)) == "result: len=0 fnv=cbf29ce484222325 primes=904"

    # The parent, free again, resets: back to its kernel's start, then to its ready marker again.
    ts.ok("reboot", "par")
    assert ts.execute(parent, "query-status")["status"] == "prelaunch"
    ts.ok("unpause", "par")
    ts.wait("the second ready marker", lambda: ts.log(parent).count("vmfork-guest: ready") == 2)
    ts.wait_state(parent, "paused")
    ts.ok("destroy", "par")


def test_a_guest_reset_follows_on_reboot_and_reports_as_qemu_does(ts: CliHarness) -> None:
    """The guest resets itself (the i8042 pulse): on_reboot = restart boots it again (QMP RESET, guest: true, each
    time), preserve leaves it shut down (SHUTDOWN, guest-reset), destroy ends it."""
    line = "vmfork-guest: reboot"
    again = ts.create(ts.config("again", "reboot", on_reboot="restart"), "-p")
    with ts.qmp(again) as q:
        q.execute("cont")
        ts.wait("two reboots", lambda: q.execute("query-status") is not None and
                sum(e["event"] == "RESET" for e in q.events) >= 2)
        resets = [e["data"] for e in q.events if e["event"] == "RESET"]
        assert all(r == {"guest": True, "reason": "guest-reset"} for r in resets), q.events
        assert not [e for e in q.events if e["event"] == "SHUTDOWN"], q.events
    assert ts.log(again).count(line) >= 2
    ts.ok("destroy", "again")

    kept = ts.create(ts.config("kept", "reboot", on_reboot="preserve"), "-p")
    with ts.qmp(kept) as q:
        q.execute("cont")
        ts.wait("the reset", lambda: q.execute("query-status")["status"] == "shutdown")
        assert [(e["event"], e["data"]) for e in q.events if e["event"] in ("RESET", "SHUTDOWN")] == [
            ("SHUTDOWN", {"guest": True, "reason": "guest-reset"})]
    rec = ts.record(kept)
    assert (rec.state, rec.reason) == ("shutdown", "the guest reset itself")
    assert ts.log(kept).count(line) == 1
    ts.ok("destroy", "kept")

    gone = ts.create(ts.config("gone", "reboot", on_reboot="destroy"))
    ts.wait_gone(gone)
