"""Forks of a Linux at its shell prompt (issue 15): each fork's console answers, and no two forks produce the same
"random" bytes, because each gets a new VMGenID generation and Linux reseeds (add_vmfork_randomness, which says
"crng reseeded due to virtual machine fork" on the console). Forks made with new_generation=False get no
notification and never say it: the test can fail. (Their bytes are not compared: a kernel a minute into its boot
reseeds every few seconds from interrupt timings, which differ between forks where kernel mode is emulated.)"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli_harness import CliHarness
from linux_guest import Booted, ask
from vmfork.fork import VM

COMMAND = b"head -c 16 /dev/urandom | od -An -tx1\n"
RESEEDED = b"crng reseeded due to virtual machine fork"


def _random_bytes(answer: bytes) -> str:
    m = re.search(rb"((?:[0-9a-f]{2}\s+){15}[0-9a-f]{2})", answer)
    assert m, answer
    return m.group(1).decode().replace(" ", "").replace("\n", "")


def test_forks_of_a_linux_shell_answer_with_different_random_bytes(linux_at_prompt: Booted) -> None:
    if linux_at_prompt.vm is None:
        pytest.skip(f"Linux did not reach its shell here: {linux_at_prompt.reason}")
    # Linux reseeds on a VM fork only once its RNG is ready ("crng init done", about two minutes of guest time into
    # this kernel's boot here): a fork of the prompt waits for it (/dev/random blocks until then), and is forked.
    base = linux_at_prompt.vm.fork()
    assert b"ready" in ask(base, b"head -c 1 /dev/random >/dev/null; echo ready\n", timeout=600)
    parent = base
    fresh = [parent.fork() for _ in range(3)]
    same = [parent.fork(new_generation=False) for _ in range(2)]
    try:
        answers = [ask(f, COMMAND) for f in fresh]
        got = [_random_bytes(a) for a in answers]
        assert len(set(got)) == len(got), got
        assert all(RESEEDED in a for a in answers), answers
        for f in same:
            assert RESEEDED not in ask(f, COMMAND)
    finally:
        base.destroy(tree=True)


def _parent(booted: Booted) -> VM:
    if booted.vm is None:
        pytest.skip(f"Linux did not reach its shell here: {booted.reason}")
    return booted.vm


def _uptime(answer: bytes) -> list[float]:
    return [float(x) for x in re.findall(rb"UP:(\d+\.\d+)", answer)]


def test_a_fork_answers_keeps_time_and_forks_again(linux_at_prompt: Booted) -> None:
    parent = _parent(linux_at_prompt)
    child = parent.fork()
    try:
        # the clock: a 1 s timeout takes about 1 s of guest time, and the fork's time never goes back. Only shell
        # builtins between the two readings (`read -t 1` waits in poll() on the console): a new process costs seconds
        # where kernel mode is emulated, and more on a loaded host, which would measure process creation, not time.
        out = ask(child, b"read a r </proc/uptime; read -t 1 x; read b r </proc/uptime; echo UP:$a; echo UP:$b\n")
        before, after = _uptime(out)
        assert 0.9 <= after - before <= 2.5, out
        assert b"slept-1" in ask(child, b"sleep 1; echo slept-$((2-1))\n")    # sleep, an external program, returns
        assert b"soft lockup" not in out and b"BUG" not in out, out
        assert b"answer-42" in ask(child, b"echo answer-$((6*7))\n")
        # forks of forks: the grandchild starts where the child stopped (a shell variable set in the child)
        ask(child, b"MARK=child-was-here\n")
        grandchild = child.fork()
        try:
            assert b"child-was-here" in ask(grandchild, b"echo $MARK\n")
            (later,) = _uptime(ask(grandchild, b"echo UP:$(cut -d' ' -f1 /proc/uptime)\n"))
            assert later >= after
        finally:
            grandchild.destroy()
        # reset: back to the prompt at the fork point (the variable is gone), and it answers again
        child.reset()
        assert b"[]" in ask(child, b"echo [$MARK]\n")
        assert b"answer-43" in ask(child, b"echo answer-$((6*7+1))\n")
    finally:
        child.destroy(tree=True)


def test_console_input_while_paused_is_delivered_on_unpause(linux_at_prompt: Booted) -> None:
    parent = _parent(linux_at_prompt)
    child = parent.fork()
    try:
        line = b"echo typed-while-paused-" + b"x" * 40 + b"\n"       # more than the UART's 16-byte FIFO
        child.feed_console(line)
        time.sleep(0.5)
        assert child.state == "paused"
        out = ask(child, b"\n")
        assert b"typed-while-paused-" + b"x" * 40 in out.replace(b"\r", b""), out
    finally:
        child.destroy()


def test_process_forks_of_linux_survive_a_killed_sibling(linux_at_prompt: Booted) -> None:
    """Process forks of the Linux at its prompt, with strings of their own: SIGKILL of one leaves its siblings and
    the parent working; a process fork is reset back to its prompt (its reset drops KVM's translations, as an
    in-process Linux fork's does) and answers again, and is forked again; a fork without strings (a worker prepared
    ahead) answers too."""
    import os
    import signal

    from vmfork.fork import kernel_mode_emulated
    parent = _parent(linux_at_prompt)
    forks = [parent.fork(isolation="process", env={"hostname": f"p{i}"}) for i in range(3)]
    try:
        # the cause of the old failure, stated: where kernel mode is emulated a Linux fork logs into bitmaps
        assert all(f.dirty_ring is not kernel_mode_emulated() for f in forks)
        assert all(f.flush_translations_on_reset is kernel_mode_emulated() for f in forks)
        os.kill(forks[1].pid, signal.SIGKILL)
        for i in (0, 2):
            out = ask(forks[i], b"eval \"$(vmfork-env)\"; echo host-$(hostname)\n")
            assert f"host-p{i}".encode() in out, out
        assert not forks[1].alive()
        # reset: the shell variable set after the fork point is gone, and the shell answers again
        # (processes run before and after it: a reset that kept KVM's stale translations crashed those after)
        ask(forks[0], b"MARK=set-in-p0; cat /proc/uptime; ls / | wc -l\n")
        assert forks[0].reset() > 0
        out = ask(forks[0], b"echo [$MARK] $(ls / | wc -l) after-$(echo 42 | cat)\n")
        assert re.search(rb"\[\] \d+ after-42", out), out
        # a fork of a process fork (its worker freezes the RAM): same mode, and it answers
        grandchild = forks[2].fork()
        try:
            assert grandchild.dirty_ring is forks[2].dirty_ring
            assert b"p2 again" in ask(grandchild, b"echo $(hostname) again\n")
        finally:
            grandchild.destroy()
        # the parent still forks (in-process, and a process fork from a worker prepared ahead) and answers
        again = parent.fork()
        plain = parent.fork(isolation="process")
        try:
            assert b"still-42" in ask(again, b"echo still-$((40+2))\n")
            assert b"plain-43" in ask(plain, b"echo plain-$((40+3))\n")
        finally:
            again.destroy()
            plain.destroy()
    finally:
        for f in forks:
            f.destroy()


@contextlib.contextmanager
def _restored_domain(booted: Booted, tmp_path: Path) -> Iterator[tuple[CliHarness, str]]:
    """The toolstack (CliHarness) with the Linux at its prompt restored paused from the fixture's save file as a
    domain, and that domain's name."""
    from linux_guest import CACHE
    _parent(booted)
    saved = sorted(CACHE.glob("*.save"))
    assert saved, "the fixture saves the machine at the prompt"
    with CliHarness(tmp_path, saved[0]) as ts:
        ts.ok("restore", "-p", str(saved[0]))
        yield ts, ts.list_json()[0]["name"]


@contextlib.contextmanager
def _console(ts: CliHarness, name: str) -> Iterator[Callable[[bytes], None]]:
    """`vmfork console NAME` running; yields a function that types a line into it."""
    con = subprocess.Popen(ts.argv("console", name), env=ts.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert con.stdin is not None
    stdin = con.stdin

    def type_line(line: bytes) -> None:
        stdin.write(line)
        stdin.flush()
    try:
        yield type_line
    finally:
        con.kill()
        con.wait()


def _wait_for_typed_input(ts: CliHarness, name: str) -> None:
    """Wait until the (paused) domain's console holds the typed input."""
    ts.wait("the console input to arrive", lambda: ts.execute(name, "vmfork-query")["console_input_bytes"] > 0,
            timeout=30)


def test_domain_forks_of_linux_take_console_input_and_strings(linux_at_prompt: Booted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through domains: the Linux at its prompt restored paused, two fork-vm --set forks (paused); console input
    typed while a fork is paused arrives when it is unpaused; SIGKILL of one fork leaves the parent and its sibling
    working; the sibling is reset and answers again; list --json says what the guest does with VMGenID."""
    import os
    import signal

    with _restored_domain(linux_at_prompt, tmp_path) as (ts, parent):
        for i in range(2):
            ts.ok("fork-vm", "-p", "--set", f"hostname=dom{i}", parent)
        forks = [e for e in ts.list_json() if e["parent"] is not None]
        assert len(forks) == 2
        gen = ts.listed(parent)["vmgenid"]
        assert gen["present"] is True and isinstance(gen["active"], bool) and gen["why"], gen
        # SIGKILL the second fork: the first and the parent go on
        os.kill(ts.record(forks[1]["domid"]).pid, signal.SIGKILL)
        first = forks[0]["name"]
        with _console(ts, first) as type_line:
            type_line(b"MARK=set; eval \"$(vmfork-env)\"; echo via-console-$(hostname)\n")
            _wait_for_typed_input(ts, first)
            assert ts.record(first).state == "paused"
            ts.ok("unpause", first)
            ts.wait("the answer", lambda: "via-console-dom0" in ts.log(forks[0]["domid"]), timeout=300)
            # fork-reset back to the prompt (MARK gone), and processes run again after it (a reset that kept
            # KVM's stale translations crashed them: the fork drops them, as the parent told it to)
            ts.ok("pause", first)
            ts.ok("fork-reset", first)
            ts.ok("unpause", first)
            type_line(b"echo [$MARK] again-$(echo 42 | cat)\n")
            ts.wait("the answer after the reset", lambda: "[] again-42" in ts.log(forks[0]["domid"]), timeout=300)
        assert ts.record(parent).state == "paused"
        ts.ok("fork-vm", "-p", parent)             # the parent still forks


def test_domain_fork_of_linux_gets_its_strings_with_a_late_device_model(linux_at_prompt: Booted,
                                                                         tmp_path) -> None:  # type: ignore[no-untyped-def]
    """fork-vm --launch-dm no --set: the strings wait for the fork's device model; --launch-dm late --set adds one;
    the Linux shell of the fork then reads both through vmfork-env."""
    with _restored_domain(linux_at_prompt, tmp_path) as (ts, parent):
        fork = ts.ok("fork-vm", "-p", "--launch-dm", "no", "--set", "hostname=late0", parent).strip()
        assert ts.listed(f"{parent}-fork-1")["launch_dm"] == "no"
        ts.ok("fork-vm", "--launch-dm", "late", "--set", "ROLE=r1", fork)
        with _console(ts, fork) as type_line:
            type_line(b"eval \"$(vmfork-env)\"; echo got-$(hostname)-$ROLE\n")
            _wait_for_typed_input(ts, fork)
            ts.ok("unpause", fork)
            ts.wait("the answer", lambda: "got-late0-r1" in ts.log(int(fork)), timeout=300)
