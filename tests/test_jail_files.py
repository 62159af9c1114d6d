"""A jailed domain writes and reads files only through descriptors its client passes (toolstack/passfd.py,
jail_files.py): saves to new files, regular files, FIFOs and stdout; device-state files; console-log rotation by
the jailer; and a compromised domain (the test-only probe) cannot make the jailer write anywhere. Needs root (the
jail's default is on for root)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from cli_harness import CliHarness
from vmfork.toolstack.qmp import QmpCommandError

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the jail is set up by root (vmfork runs as non-root)"),
              pytest.mark.usefixtures("jail_probe")]       # conftest: `ts` with the jail-probe command


def _jailed(ts: CliHarness, dom: int | str) -> bool:
    return bool(ts.execute(dom, "vmfork-jail-probe", action="status")["jailed"])


def test_a_jailed_domain_cannot_make_the_jailer_write_anywhere(ts: CliHarness) -> None:
    dom = ts.create_program("wo", "demo")           # jailed: root's default
    ts.wait_state(dom, "paused")
    assert _jailed(ts, dom)
    target = ts.base / "outside" / "planted"
    target.parent.mkdir()
    result = ts.execute(dom, "vmfork-jail-probe", action="write-outside", path=str(target))
    assert result["open"]["ok"] is False, result                       # no such path in its root
    assert "unknown request 'deliver'" in result["deliver"]["error"], result
    assert "unknown request 'fetch'" in result["fetch"]["error"], result
    assert "error" not in result["rotate-log"]                         # its own log, the path is ignored
    assert not target.exists() and list(target.parent.iterdir()) == []
    # The file commands refuse names outright, before anything is paused or written.
    for cmd, args in (("vmfork-save", {"filename": str(target)}),
                      ("xen-save-devices-state", {"filename": str(target)}),
                      ("vmfork-attach-dm", {"filename": str(target)})):
        with pytest.raises(QmpCommandError, match="runs in the jail and opens no file by name"):
            ts.execute(dom, cmd, **args)
    assert not target.exists()
    assert ts.execute(dom, "query-status")["status"] == "paused"
    log = ts.log(dom) + (ts.run_dir / f"{dom}.log.1").read_text(errors="replace")
    assert "jail probe: write-outside" in log


def test_saves_from_a_jailed_domain_go_through_descriptors(ts: CliHarness) -> None:
    dom = ts.create_program("sv", "demo")
    ts.wait_state(dom, "paused")
    assert _jailed(ts, dom)
    # a new file, then replacing it: the invoking user's, 0600; a template 0444
    save = ts.base / "sv.sav"
    ts.ok("save", "sv", str(save))
    save.write_bytes(b"old")
    ts.ok("save", "sv", str(save))
    st = os.stat(save)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600) and save.read_bytes()[:8] == b"VMFKSAVE"
    tpl = ts.base / "sv.tpl"
    ts.ok("save", "--template", "sv", str(tpl))
    st = os.stat(tpl)
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_blocks * 512 < st.st_size       # holes kept
    # stdout and a FIFO
    p = ts.run_bytes("save", "sv", "-")
    assert p.returncode == 0 and p.stdout[:8] == b"VMFKSAVE", p.stderr
    fifo = ts.base / "sv.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    ts.ok("save", "sv", str(fifo))
    reader.join(30)
    assert got and got[0][:8] == b"VMFKSAVE"
    assert len(got[0]) == len(p.stdout)
    # a device-state file, and a fork given its device model late from one
    dm = ts.base / "sv.dm"
    ts.ok("save-devices-state", "sv", str(dm))
    assert dm.read_bytes()[:8] == b"VMFKDEVS" and os.stat(dm).st_uid == os.geteuid()
    fork = int(ts.ok("fork-vm", "--launch-dm", "no", "-p", "sv").strip())
    assert _jailed(ts, fork)
    ts.ok("fork-vm", "--launch-dm", "late", "-Q", str(dm), str(fork))
    assert ts.record(fork).launch_dm == "yes"
    # nothing left in the staging directory or beside the targets
    assert not [f for f in ts.base.iterdir() if f.name.endswith(".tmp")]
    assert list((ts.run_dir / f".jail-{dom}").iterdir()) == []
    # every file restores
    for f in (save, tpl):
        restored = int(ts.ok("restore", "-p", "-n", f"r-{f.suffix[1:]}", str(f)).strip())
        assert _jailed(ts, restored)
    ts.ok("destroy", "--force", "sv")


def test_the_console_log_of_a_jailed_domain_rotates(ts: CliHarness) -> None:
    """(test_hostile's rotation test runs jailed too, as root's default; here: who owns what afterwards)"""
    dom = ts.create(ts.config("chatty", "det 4000", console_log_max=64))    # about 150 KB of output, 64 KiB cap
    ts.wait_state(dom, "paused")
    assert _jailed(ts, dom)
    ts.ok("unpause", "chatty")
    ts.wait_gone(dom, timeout=120)
    log, old = ts.run_dir / f"{dom}.log", ts.run_dir / f"{dom}.log.1"
    assert old.stat().st_size <= 64 << 10 and log.stat().st_size <= 64 << 10
    assert "det 3999 " in log.read_text()
    for f in (log, old):
        assert (f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (os.geteuid(), 0o600)
    # the jailer removes what the domain could not, once the domain's process has ended
    ts.wait("the jailer's clean-up", lambda: not (ts.run_dir / f"{dom}.dom").exists()
            and not list(ts.run_dir.glob(".jail-*")))


def test_jail_0_runs_the_domain_unjailed_with_a_warning(ts: CliHarness) -> None:
    p = ts.run("create", str(ts.config("nj", "demo", jail=0)))
    assert p.returncode == 0 and "warning: nj runs without the jail (jail = 0)" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1
    ts.wait_state("nj", "paused")
    assert not _jailed(ts, "nj")
    ts.ok("save", "nj", str(ts.base / "nj.sav"))
    fork = int(ts.ok("fork-vm", "-p", "nj").strip())         # a fork takes its parent's jail = 0
    assert not _jailed(ts, fork)
    ts.ok("destroy", "--force", "nj")


def test_non_root_users_run_unjailed_without_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """As a user other than root the jail is off by default and nothing is said about it (see jail.wanted); as
    root it is on, and turning it off says so."""
    from vmfork.toolstack import jail
    spec = {"kind": "create", "config": {"jail": None}}
    assert jail.wanted(spec, "/nonexistent") is True                     # root: on
    jail.jail_spec(spec, no_jail=True, label="x")
    assert "warning: x runs without the jail (--no-jail)" in capsys.readouterr().err
    monkeypatch.setattr(jail.os, "geteuid", lambda: 1000)
    assert jail.wanted(spec, "/nonexistent") is False                    # another user: off
    for no_jail, config_jail in ((False, None), (True, None), (False, 0)):
        assert jail.wanted(jail.jail_spec(spec, no_jail=no_jail, config_jail=config_jail, label="x"),
                           "/nonexistent") is False
    assert capsys.readouterr().err == ""                                 # and no warning about it


def test_a_host_without_cgroup_controllers_refuses_jailed_domains(ts: CliHarness) -> None:
    """No cgroup v2 controllers and no v1 fallback: the domain is refused with one line naming what is missing and
    how to run without the jail, never started unjailed; with jail = 0 it starts."""
    empty = ts.base / "no-cgroups"
    empty.mkdir()
    ts.env["VMFORK_JAIL_CGROUP_ROOT"] = str(empty)
    err = ts.fail("create", str(ts.config("ncg", "demo")), match="the jail needs the cgroup controllers")
    assert "this host lacks memory, pids, cpu" in err and "jail = 0" in err and "--no-jail" in err
    assert ts.list_json() == [] and not list(ts.run_dir.glob("*.dom")) and not list(ts.run_dir.glob(".jail-*"))
    ts.ok("create", "--no-jail", str(ts.config("ncg", "demo")))
    ts.wait_state("ncg", "paused")
    assert not _jailed(ts, "ncg")
